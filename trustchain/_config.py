"""Configuration: a frozen tree of dataclasses, loaded once from TOML.

Every field documents its unit and default; ``spec/config.md`` is the
reference. Keys this version does not know produce a warning naming them;
a value of the wrong type or out of range is a :class:`ConfigError` naming
the key. Durations are strings such as ``"250ms"``, ``"30s"``, ``"10m"``,
``"24h"``, ``"1d"``, or numbers of seconds.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import config as _embedded


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


def _duration(default: float, doc: str = "") -> Any:
    return field(default=default, metadata={"duration": True, "doc": doc})


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    data_dir: str = "./trustchain-data"
    """Directory holding keys, certificates, databases and logs."""
    names: list[str] = field(default_factory=list)
    """DNS names in the node's own TLS certificate (under the TrustChain domains)."""
    addresses: list[str] = field(default_factory=list)
    """IPv6 addresses in the node's own TLS certificate; empty: the listen
    addresses that are not ``::``, and ``::1``."""


@dataclass(frozen=True, kw_only=True)
class HsmConfig:
    provider: str = "software"
    """``software`` (development only), ``softhsm2``, ``pkcs11``, ``aws_cloudhsm``, ``yubihsm``."""
    cluster_id: str = ""
    """AWS CloudHSM cluster id (informational; the PKCS#11 module finds the cluster)."""
    root_key_id: str = ""
    """Label or id of the root key in the token."""
    backup_enabled: bool = False
    """Whether the HSM provider's own backups are expected (informational)."""
    module_path: str = ""
    """PKCS#11 module (shared library); empty selects SoftHSM2's for ``softhsm2``."""
    token_label: str = "trustchain"
    """Label of the PKCS#11 token holding the keys."""
    pin_env: str = "TRUSTCHAIN_HSM_PIN"
    """Environment variable holding the token's user PIN (never put it in a file)."""


@dataclass(frozen=True, kw_only=True)
class CaPolicyConfig:
    allow_wildcards: bool = False
    """Whether a leftmost ``*`` label may be requested."""
    name_conflict: Literal["reject", "allow"] = "reject"
    """A name held by an unexpired, unrevoked certificate for another key:
    ``reject`` the request, or ``allow`` several keys per name."""


@dataclass(frozen=True, kw_only=True)
class CaConfig:
    ca_id: str = "trustchain-ca-development"
    bind_address: str = "::1"
    port: int = 8443
    cert_validity_days: float = 1.0
    """Lifetime of issued certificates in days (1 = 24 hours)."""
    rotation_interval: float = _duration(86400.0)
    mode: Literal["production", "development"] = "development"
    backdate: float = _duration(300.0)
    """How far before issuance a certificate's validity starts (clock skew)."""
    intermediate_lifetime: float = _duration(90 * 86400.0)
    root_lifetime: float = _duration(3650 * 86400.0)
    hsm: HsmConfig = field(default_factory=HsmConfig)
    policy: CaPolicyConfig = field(default_factory=CaPolicyConfig)


@dataclass(frozen=True, kw_only=True)
class CtStorageConfig:
    backend: Literal["filesystem", "s3"] = "filesystem"
    bucket: str = ""
    region: str = ""
    encryption: str = ""


@dataclass(frozen=True, kw_only=True)
class CtConfig:
    log_id: str = "trustchain-ct-development"
    bind_address: str = "::1"
    port: int = 6962
    max_entries_per_shard: int = 10_000_000
    merkle_update_interval: float = _duration(1.0)
    storage_path: str = ""
    """Directory for CT tiles; empty means ``<data_dir>/ct``."""
    enable_realtime_fingerprinting: bool = True
    storage: CtStorageConfig = field(default_factory=CtStorageConfig)


@dataclass(frozen=True, kw_only=True)
class DnsDomainsConfig:
    trustchain_domains: list[str] = field(
        default_factory=lambda: ["hypermesh", "caesar", "trust", "assets"])


@dataclass(frozen=True, kw_only=True)
class DnsConfig:
    server_id: str = "trustchain-dns-development"
    bind_address: str = "::1"
    quic_port: int = 8853
    cache_ttl: float = _duration(600.0)
    enable_cert_validation: bool = True
    domains: DnsDomainsConfig = field(default_factory=DnsDomainsConfig)


@dataclass(frozen=True, kw_only=True)
class ConsensusConfig:
    provider: str = "nkrypt_four_proof"
    minimum_stake: int = 1000
    minimum_work_difficulty: int = 20
    byzantine_tolerance: float = 0.33
    finality_timeout: float = _duration(30.0)


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    server_id: str = "trustchain-api-development"
    bind_address: str = "::1"
    port: int = 8443
    enable_tls: bool = True
    rate_limit_per_minute: int = 0
    """Requests a minute per client /64; 0 means unlimited."""
    rate_limit_prefix_length: int = 64
    cors_origins: list[str] = field(default_factory=list)
    """Accepted for compatibility; there is no HTTP layer, so it has no effect."""


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    ipv6_only: bool = True
    connection_timeout: float = _duration(30.0)
    keep_alive_interval: float = _duration(15.0)
    max_concurrent_connections: int = 10_000
    quic_engine: Literal["qh3", "aioquic"] = "qh3"
    max_frame_size: int = 1 << 20
    max_streams_per_connection: int = 100
    drain_timeout: float = _duration(10.0)


@dataclass(frozen=True, kw_only=True)
class LoggingOutputConfig:
    type: Literal["stdout", "stderr", "file"] = "stderr"
    path: str = ""


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    structured: bool = True
    output: LoggingOutputConfig = field(default_factory=LoggingOutputConfig)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration of one node."""

    node: NodeConfig = field(default_factory=NodeConfig)
    ca: CaConfig = field(default_factory=CaConfig)
    ct: CtConfig = field(default_factory=CtConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"
    """Where this configuration was loaded from (not a TOML key)."""
    warnings: tuple[str, ...] = ()
    """Problems that did not stop loading, such as unknown keys (not a TOML key)."""

    def listen_addresses(self) -> list[tuple[str, int]]:
        """Every distinct ``(address, port)`` the node serves (all ALPNs on each)."""
        pairs = [(self.api.bind_address, self.api.port), (self.ca.bind_address, self.ca.port),
                 (self.ct.bind_address, self.ct.port),
                 (self.dns.bind_address, self.dns.quic_port)]
        return list(dict.fromkeys(pairs))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NOT_KEYS = {"source", "warnings"}


def parse_duration(value: Any, key: str) -> float:
    """Seconds in a duration value; raises :class:`ConfigError` naming ``key``."""
    if type(value) in (int, float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key}: {value!r} is not a duration (like \"30s\", \"10m\", \"24h\")")
    if seconds < 0:
        raise ConfigError(f"{key}: a duration cannot be negative")
    return seconds


def _build(cls: type[Any], table: dict[str, Any], prefix: str, warnings: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        path = f"{prefix}{key}"
        f = known.get(key)
        if f is None:
            warnings.append(f"unknown configuration key {path!r} ignored")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a table")
            values[key] = _build(hint, raw, f"{path}.", warnings)  # type: ignore[arg-type]
        elif f.metadata.get("duration"):
            values[key] = parse_duration(raw, path)
        else:
            values[key] = _value(raw, hint, path)
    return cls(**values)


def _value(raw: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise ConfigError(f"{path}: {raw!r} is not one of {', '.join(map(repr, choices))}")
        return raw
    if origin is list:
        (element,) = typing.get_args(hint)
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: expected a list")
        return [_value(v, element, f"{path}[{i}]") for i, v in enumerate(raw)]
    if hint is float and type(raw) in (int, float):
        return float(raw)
    if type(raw) is not hint:
        names = {str: "a string", int: "an integer", bool: "true or false", float: "a number"}
        raise ConfigError(f"{path}: expected {names.get(hint, hint)}, got {raw!r}")
    return raw


def _validate(cfg: Config) -> None:
    for key, address in (("ca.bind_address", cfg.ca.bind_address),
                         ("ct.bind_address", cfg.ct.bind_address),
                         ("dns.bind_address", cfg.dns.bind_address),
                         ("api.bind_address", cfg.api.bind_address)):
        check_ipv6(address, key)
    for key, port in (("ca.port", cfg.ca.port), ("ct.port", cfg.ct.port),
                      ("dns.quic_port", cfg.dns.quic_port), ("api.port", cfg.api.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: {port} is not a UDP port")
    if not cfg.network.ipv6_only:
        raise ConfigError("network.ipv6_only: TrustChain is IPv6 only; false is not supported")
    if not cfg.api.enable_tls:
        raise ConfigError("api.enable_tls: QUIC always uses TLS 1.3; false is not supported")
    positive = {
        "network.max_concurrent_connections": cfg.network.max_concurrent_connections,
        "network.max_streams_per_connection": cfg.network.max_streams_per_connection,
        "network.max_frame_size": cfg.network.max_frame_size,
        "network.connection_timeout": cfg.network.connection_timeout,
        "ct.max_entries_per_shard": cfg.ct.max_entries_per_shard,
        "ca.cert_validity_days": cfg.ca.cert_validity_days,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value}")
    if cfg.network.max_frame_size > (1 << 32) - 1:
        raise ConfigError("network.max_frame_size: at most 4294967295 (a 4-byte length)")
    if cfg.api.rate_limit_per_minute < 0:
        raise ConfigError("api.rate_limit_per_minute: must be 0 (unlimited) or more")
    if not 0 <= cfg.api.rate_limit_prefix_length <= 128:
        raise ConfigError("api.rate_limit_prefix_length: must be within 0..128")
    if not 0 <= cfg.consensus.byzantine_tolerance < 0.5:
        raise ConfigError("consensus.byzantine_tolerance: must be within [0, 0.5)")
    if cfg.consensus.minimum_work_difficulty < 0 or cfg.consensus.minimum_work_difficulty > 64:
        raise ConfigError("consensus.minimum_work_difficulty: must be within 0..64 bits")
    if cfg.logging.output.type == "file" and not cfg.logging.output.path:
        raise ConfigError("logging.output.path: required when logging.output.type = \"file\"")
    if not cfg.dns.domains.trustchain_domains:
        raise ConfigError("dns.domains.trustchain_domains: at least one domain is required")
    domains = cfg.dns.domains.trustchain_domains
    for i, domain in enumerate(domains):
        if domain != domain.lower() or not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
                                                        r"(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*",
                                                        domain):
            raise ConfigError(f"dns.domains.trustchain_domains[{i}]: {domain!r} is not a "
                              "lowercase DNS name")
    for i, address in enumerate(cfg.node.addresses):
        check_ipv6(address, f"node.addresses[{i}]")
        if ipaddress.IPv6Address(address).is_unspecified:
            raise ConfigError(f"node.addresses[{i}]: :: names no host")
    for i, name in enumerate(cfg.node.names):
        if not any(name == d or name.endswith("." + d) for d in domains):
            raise ConfigError(f"node.names[{i}]: {name!r} is not under the TrustChain domains "
                              f"({', '.join(domains)})")
    for key, value in (("ca.intermediate_lifetime", cfg.ca.intermediate_lifetime),
                       ("ca.root_lifetime", cfg.ca.root_lifetime)):
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    providers = ("software", "softhsm2", "pkcs11", "aws_cloudhsm", "yubihsm")
    if cfg.ca.hsm.provider not in providers:
        raise ConfigError(f"ca.hsm.provider: {cfg.ca.hsm.provider!r} is not one of "
                          f"{', '.join(providers)}")
    if cfg.ca.mode == "production" and cfg.ca.hsm.provider == "software":
        raise ConfigError("ca.hsm.provider: production mode needs a PKCS#11 token "
                          "(softhsm2, pkcs11, aws_cloudhsm or yubihsm), not software keys")


def check_ipv6(address: str, key: str) -> None:
    """Raise :class:`ConfigError` unless ``address`` is a (non-v4-mapped) IPv6 address."""
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        raise ConfigError(f"{key}: {address!r} is not an IPv6 address (TrustChain is IPv6 only)"
                          ) from None
    if ip.ipv4_mapped is not None:
        raise ConfigError(f"{key}: {address!r} is an IPv4-mapped address")


def loads(text: str, source: str = "<string>") -> Config:
    """Parse configuration TOML ``text``; missing keys take their defaults."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    warnings: list[str] = []
    cfg = _build(Config, table, "", warnings)
    _validate(cfg)
    net = cfg.network
    if 0 < net.connection_timeout <= net.keep_alive_interval:
        warnings.append(
            f"network.keep_alive_interval ({net.keep_alive_interval:g}s) is not shorter than "
            f"network.connection_timeout ({net.connection_timeout:g}s): keep-alives cannot "
            "keep an idle connection open")
    if cfg.api.cors_origins:
        warnings.append("api.cors_origins has no effect: TrustChain has no HTTP layer")
    result: Config = dataclasses.replace(cfg, source=source, warnings=tuple(warnings))
    return result


def load(path: str | Path | None = None) -> Config:
    """Load ``path``, or the embedded ``config/development.toml`` when None."""
    if path is None:
        return loads(_embedded.read("development.toml"), "embedded development.toml")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {p}: {exc.strerror}") from exc
    return loads(text, str(p))


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of ``cfg`` with whole sections or top-level fields replaced."""
    return dataclasses.replace(cfg, **sections)
