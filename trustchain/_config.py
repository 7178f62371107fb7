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
    signing_workers: int = 0
    """Processes that build and sign issued certificates beside the event loop, each
    with its own keystore session; 0: sign on the event loop."""
    hsm: HsmConfig = field(default_factory=HsmConfig)
    policy: CaPolicyConfig = field(default_factory=CaPolicyConfig)


@dataclass(frozen=True, kw_only=True)
class CtStorageConfig:
    """Where the CT tiles and checkpoints live (static-ct-api layout)."""

    backend: Literal["filesystem", "s3"] = "filesystem"
    bucket: str = ""
    region: str = ""
    """The bucket's region; empty: ``us-east-1`` (any name for an ``endpoint``)."""
    endpoint: str = ""
    """URL of an S3-compatible store; empty: AWS S3 itself."""
    encryption: Literal["", "AES256", "aws:kms"] = ""
    """Server-side encryption requested with every object (SSE-S3 or SSE-KMS)."""
    prefix: str = ""
    """Key prefix in the bucket: shard N is under ``<prefix>/N/``."""


@dataclass(frozen=True, kw_only=True)
class AuditStorageConfig:
    """Where the signed audit segments are kept beyond the local log."""

    backend: Literal["filesystem", "s3"] = "filesystem"
    """``filesystem``: the local hash-chained log only; ``s3``: every signed
    checkpoint's segment also goes to a bucket under S3 Object Lock."""
    bucket: str = ""
    region: str = ""
    endpoint: str = ""
    retention: float = _duration(365 * 86400.0)
    """How long each segment is locked against deletion and change."""
    mode: Literal["compliance", "governance"] = "compliance"
    prefix: str = ""


@dataclass(frozen=True, kw_only=True)
class CtConfig:
    log_id: str = "trustchain-ct-development"
    """Checkpoint origin prefix of the log; shard N's origin is ``<log_id>/N``."""
    bind_address: str = "::1"
    port: int = 6962
    max_entries_per_shard: int = 10_000_000
    """Entries in a shard before a new shard (with its own key and log id) starts."""
    merkle_update_interval: float = _duration(1.0)
    """Longest time a shard's signed tree head may go unrefreshed (seconds)."""
    storage_path: str = ""
    """Directory for CT tiles; empty means ``<data_dir>/ct``."""
    enable_realtime_fingerprinting: bool = True
    """Index the fingerprints of every issued or logged certificate (``fp.*`` ops)."""
    extra_roots: list[str] = field(default_factory=list)
    """PEM files of roots accepted besides the TrustChain root."""
    subscription_buffer: int = 16_384
    """Entries held for live subscribers; one that lags more is told to resume."""
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
    """UDP port of DNS over QUIC (ALPN ``doq``); every port of the node serves it."""
    cache_ttl: float = _duration(600.0)
    """Longest time a forwarded answer (positive or negative) stays in the cache."""
    enable_cert_validation: bool = True
    """Whether ``dns.resolve`` checks a TrustChain name's TLSA record against the
    CA's current certificate for the name."""
    enabled: bool = True
    """Whether the node serves DNS (the ``doq`` ALPN and the ``dns.*`` ops)."""
    upstream_servers: list[str] = field(default_factory=list)
    """Forwarding upstreams, tried in order: ``"[ADDR]:PORT"`` (UDP, TCP when
    truncated) or ``"doq://[ADDR]:PORT"`` / ``"doq://NAME@[ADDR]:PORT"`` (DNS over
    QUIC, verified against ``upstream_cafile`` and NAME, or ADDR). IPv6 only.
    Empty (the default): names outside the TrustChain domains are REFUSED."""
    upstream_cafile: str = ""
    """CA certificates (PEM) that DoQ upstreams are verified against; empty: the
    system's."""
    upstream_timeout: float = _duration(2.0)
    """How long one upstream may take to answer before the next is tried."""
    cache_size: int = 10_000
    """Forwarded answers kept in the cache at most (least recently used go first)."""
    record_ttl: float = _duration(300.0)
    """TTL of the AAAA, TLSA and NS records of the TrustChain zones."""
    negative_ttl: float = _duration(60.0)
    """SOA minimum of the TrustChain zones: how long resolvers cache a denial."""
    nameserver_addresses: list[str] = field(default_factory=list)
    """IPv6 addresses of ``ns1.DOMAIN`` in each zone; empty: the node's addresses."""
    dnssec_algorithm: Literal["ed25519", "ecdsa-p256-sha256"] = "ed25519"
    """Algorithm of new DNSSEC keys (KSK and ZSK, in the keystore): DNSSEC
    algorithm 15 (Ed25519) or 13 (ECDSA P-256 with SHA-256)."""
    signature_validity: float = _duration(7 * 86400.0)
    """Lifetime of each RRSIG (from one hour before signing)."""
    signature_refresh: float = _duration(3 * 86400.0)
    """An RRSIG is replaced once less than this remains of its validity."""
    zsk_lifetime: float = _duration(30 * 86400.0)
    """How long a zone-signing key signs before the next one takes over."""
    zsk_prepublish: float = _duration(86400.0)
    """How long a new ZSK is published before it signs, and an old one after."""
    max_pending_queries: int = 10_000
    """Forwarded queries being resolved at once across the node; past it the
    connection that asks is closed with DOQ_EXCESSIVE_LOAD."""
    fin_timeout: float = _duration(5.0)
    """How long a complete DoQ query may wait for its FIN (then DOQ_PROTOCOL_ERROR)."""
    rate_limit_per_minute: int = 0
    """DoQ queries a minute per client /64; 0 is unlimited. Over it: REFUSED."""
    domains: DnsDomainsConfig = field(default_factory=DnsDomainsConfig)


@dataclass(frozen=True, kw_only=True)
class ValidatorConfig:
    """One member of the validator set (``[[consensus.validators]]``)."""

    public_key: str = ""
    """The validator's raw Ed25519 public key, 64 lowercase hex digits."""
    address: str = "::1"
    """IPv6 address of its STOQ endpoint."""
    port: int = 0
    power: int = 1
    name: str = ""
    """A label for logs and ``consensus.status``."""
    names: list[str] = field(default_factory=list)
    """DNS names the validator's own TLS certificate may carry (with ``address``); every
    validator checks a validator's node-certificate decision against them."""


@dataclass(frozen=True, kw_only=True)
class ConsensusConfig:
    provider: str = "nkrypt_four_proof"
    minimum_stake: int = 1000
    """Stake a requester key must hold in the ledger for a CA operation to be admitted."""
    minimum_work_difficulty: int = 20
    """Leading zero bits (0 to 64) of every request's proof-of-work hash."""
    byzantine_tolerance: float = 0.33
    finality_timeout: float = _duration(30.0)
    epoch_length: float = _duration(3600.0, "seconds per epoch: one signed beacon each")
    """Length of an epoch, whole seconds (default 1 hour). Epoch ``e`` starts at
    ``e * epoch_length`` (Unix time); space and time proofs are made per epoch."""
    plot_size: int = 0
    """Smallest chiapos plot size ``k`` accepted (18 to 50); 0: the mode's default,
    32 in production and 18 in development."""
    vdf_iterations: int = 0
    """Smallest VDF iteration count accepted (1 to 2^40); 0: the mode's default,
    1,000,000 in production (about 12 s to prove on one core here) and 10,000 in
    development."""
    genesis: dict[str, int] = field(default_factory=dict)
    """Initial stake: key id (lowercase hex SHA-256 of the key's DER
    SubjectPublicKeyInfo) to amount. Credited once, to keys the ledger does not
    know yet."""
    verify_workers: int = 1
    """Processes that verify new epoch credentials (the VDF) beside the event
    loop; 0: verify on the event loop."""
    chain_id: str = "trustchain-development"
    """Name of the validator cluster; every consensus signature covers it."""
    validators: list[ValidatorConfig] = field(default_factory=list)
    """The validator set; empty: this node alone (n = 1), with its own key."""
    validator_key: str = "validator"
    """Keystore name of this node's Ed25519 validator key (created if missing)."""
    timeout_propose: float = _duration(1.0)
    timeout_prevote: float = _duration(0.5)
    timeout_precommit: float = _duration(0.5)
    timeout_delta: float = _duration(0.25, "added to each timeout per round")
    block_interval: float = _duration(1.0)
    """Longest time between blocks of a cluster when nothing is pending (an empty
    block keeps heights, beacons and evidence moving); a pending decision is proposed
    at once. A validator alone (n = 1) makes blocks only for decisions."""
    max_block_decisions: int = 1000
    gossip_interval: float = _duration(0.5)
    """How often a validator re-sends its own messages of the current height."""

    def resolved_plot_size(self, mode: str) -> int:
        """``plot_size``, or the default of ``mode`` when it is 0."""
        return self.plot_size or (32 if mode == "production" else 18)

    def resolved_vdf_iterations(self, mode: str) -> int:
        """``vdf_iterations``, or the default of ``mode`` when it is 0."""
        return self.vdf_iterations or (1_000_000 if mode == "production" else 10_000)


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
    max_connections_per_address: int = 64
    max_connections_per_prefix: int = 256
    connection_prefix_length: int = 64
    max_handshakes_per_second: float = 100.0
    quic_engine: Literal["qh3", "aioquic"] = "qh3"
    max_frame_size: int = 1 << 20
    max_streams_per_connection: int = 100
    drain_timeout: float = _duration(10.0)
    request_timeout: float = _duration(10.0)


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
class AuditConfig:
    checkpoint_interval: float = _duration(1.0)
    """While records are unsigned, a signed checkpoint at most this often (and at stop)."""
    storage: AuditStorageConfig = field(default_factory=AuditStorageConfig)


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
    audit: AuditConfig = field(default_factory=AuditConfig)
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


CONSENSUS_PROVIDERS = ("nkrypt_four_proof",)
ROTATION_CHECK_INTERVAL = 60.0
"""Seconds between two rotation checks of a running node (intermediate, TLS certificate)."""
INFORMATIONAL = ("ca.hsm.cluster_id", "ca.hsm.backup_enabled", "dns.server_id", "api.server_id",
                 "consensus.byzantine_tolerance")
"""Keys that describe the deployment and change nothing the node does: shown by
``node.info`` (``informational``) and at start, so no one mistakes them for settings."""


def informational(cfg: Config) -> dict[str, Any]:
    """The :data:`INFORMATIONAL` keys and their values in ``cfg``."""
    values: dict[str, Any] = {}
    for key in INFORMATIONAL:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        values[key] = value
    return values


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NOT_KEYS = {"source", "warnings"}


def _validate_object_storage(key: str, backend: str, bucket: str, endpoint: str,
                             prefix: str) -> None:
    """One ``[*.storage]`` table: a bucket for ``s3``, a URL endpoint, a clean prefix."""
    if backend != "s3":
        return
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"{key}.bucket: {bucket!r} is not an S3 bucket name (3-63 "
                          "lower-case letters, digits, dots and hyphens)")
    if endpoint and not re.fullmatch(r"https?://\S+", endpoint):
        raise ConfigError(f"{key}.endpoint: {endpoint!r} is not an http:// or https:// URL")
    if prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        raise ConfigError(f"{key}.prefix: {prefix!r} must not start or end with / or "
                          "hold an empty segment")


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


_REMOVED = {
    "ct.batch_interval": "CT entries are sequenced block by block (consensus.block_interval)",
    "ct.max_batch": "a block holds at most consensus.max_block_decisions decisions",
}
"""Keys that once had an effect and have none now: refused, so that none is ignored."""


def _build(cls: type[Any], table: dict[str, Any], prefix: str, warnings: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        path = f"{prefix}{key}"
        f = known.get(key)
        if path in _REMOVED:
            raise ConfigError(f"{path}: no longer a setting: {_REMOVED[path]}; remove it")
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
            values[key] = _value(raw, hint, path, warnings)
    return cls(**values)


def _value(raw: Any, hint: Any, path: str, warnings: list[str]) -> Any:
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
        if dataclasses.is_dataclass(element):
            if not all(isinstance(v, dict) for v in raw):
                raise ConfigError(f"{path}: expected a list of tables")
            return [_build(element, v, f"{path}[{i}].", warnings)  # type: ignore[arg-type]
                    for i, v in enumerate(raw)]
        return [_value(v, element, f"{path}[{i}]", warnings) for i, v in enumerate(raw)]
    if origin is dict:
        _, element = typing.get_args(hint)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a table")
        return {key: _value(v, element, f"{path}.{key}", warnings) for key, v in raw.items()}
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
        "network.request_timeout": cfg.network.request_timeout,
        "ct.max_entries_per_shard": cfg.ct.max_entries_per_shard,
        "ct.subscription_buffer": cfg.ct.subscription_buffer,
        "ct.merkle_update_interval": cfg.ct.merkle_update_interval,
        "ca.cert_validity_days": cfg.ca.cert_validity_days,
        "audit.checkpoint_interval": cfg.audit.checkpoint_interval,
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
    _validate_address_limits(cfg.network)
    _validate_object_storage("ct.storage", cfg.ct.storage.backend, cfg.ct.storage.bucket,
                             cfg.ct.storage.endpoint, cfg.ct.storage.prefix)
    _validate_object_storage("audit.storage", cfg.audit.storage.backend,
                             cfg.audit.storage.bucket, cfg.audit.storage.endpoint,
                             cfg.audit.storage.prefix)
    if cfg.audit.storage.backend == "s3" and cfg.audit.storage.retention < 86400:
        raise ConfigError("audit.storage.retention: at least 1d (Object Lock retention is "
                          "kept in whole days)")
    if not 0 <= cfg.consensus.byzantine_tolerance < 1 / 3:
        raise ConfigError(
            f"consensus.byzantine_tolerance: {cfg.consensus.byzantine_tolerance:g} is more than "
            "the validators tolerate: Tendermint commits with more than two thirds of the "
            "voting power, so it tolerates faulty power below one third (f < n/3); use a "
            "value within [0, 0.333...)")
    if cfg.consensus.provider not in CONSENSUS_PROVIDERS:
        raise ConfigError(f"consensus.provider: {cfg.consensus.provider!r} is not a consensus "
                          f"this node has; the one provider is {CONSENSUS_PROVIDERS[0]!r} "
                          "(four proofs, Tendermint validators)")
    if cfg.ca.rotation_interval < ROTATION_CHECK_INTERVAL:
        raise ConfigError(f"ca.rotation_interval: at least {ROTATION_CHECK_INTERVAL:g}s (the "
                          "node checks its certificates that often)")
    if cfg.consensus.minimum_work_difficulty < 0 or cfg.consensus.minimum_work_difficulty > 64:
        raise ConfigError("consensus.minimum_work_difficulty: must be within 0..64 bits")
    _validate_consensus(cfg.consensus)
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
    _validate_dns(cfg.dns)
    for key, value in (("ca.intermediate_lifetime", cfg.ca.intermediate_lifetime),
                       ("ca.root_lifetime", cfg.ca.root_lifetime)):
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    providers = ("software", "softhsm2", "pkcs11", "aws_cloudhsm", "yubihsm")
    if cfg.ca.hsm.provider not in providers:
        raise ConfigError(f"ca.hsm.provider: {cfg.ca.hsm.provider!r} is not one of "
                          f"{', '.join(providers)}")
    if not 0 <= cfg.ca.signing_workers <= 64:
        raise ConfigError("ca.signing_workers: must be within 0..64")
    if cfg.ca.mode == "production" and cfg.ca.hsm.provider == "software":
        raise ConfigError("ca.hsm.provider: production mode needs a PKCS#11 token "
                          "(softhsm2, pkcs11, aws_cloudhsm or yubihsm), not software keys")


def _validate_address_limits(network: NetworkConfig) -> None:
    for key in ("max_connections_per_address", "max_connections_per_prefix",
                "max_handshakes_per_second"):
        if getattr(network, key) < 0:
            raise ConfigError(f"network.{key}: must be 0 (unlimited) or more")
    if not 0 <= network.connection_prefix_length <= 128:
        raise ConfigError("network.connection_prefix_length: must be within 0..128")


def _validate_consensus(consensus: ConsensusConfig) -> None:
    if consensus.minimum_stake < 0:
        raise ConfigError("consensus.minimum_stake: must be 0 or more")
    if consensus.epoch_length < 1 or consensus.epoch_length != int(consensus.epoch_length):
        raise ConfigError("consensus.epoch_length: must be a whole number of seconds, at "
                          "least 1")
    if consensus.plot_size and not 18 <= consensus.plot_size <= 50:
        raise ConfigError("consensus.plot_size: must be 0 (the mode's default) or within "
                          "18..50")
    if not 0 <= consensus.vdf_iterations <= 1 << 40:
        raise ConfigError("consensus.vdf_iterations: must be 0 (the mode's default) or within "
                          "1..1099511627776")
    if not 0 <= consensus.verify_workers <= 64:
        raise ConfigError("consensus.verify_workers: must be within 0..64")
    for key, amount in consensus.genesis.items():
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ConfigError(f"consensus.genesis.{key}: a key id is 64 lowercase hex digits "
                              "(SHA-256 of the key's DER SubjectPublicKeyInfo)")
        if amount < 0:
            raise ConfigError(f"consensus.genesis.{key}: stake cannot be negative")
    if not consensus.chain_id or len(consensus.chain_id) > 64:
        raise ConfigError("consensus.chain_id: 1 to 64 characters")
    seen: set[str] = set()
    for i, v in enumerate(consensus.validators):
        key = f"consensus.validators[{i}]"
        if not re.fullmatch(r"[0-9a-f]{64}", v.public_key):
            raise ConfigError(f"{key}.public_key: the raw Ed25519 public key, 64 lowercase hex "
                              "digits")
        if v.public_key in seen:
            raise ConfigError(f"{key}.public_key: listed twice")
        seen.add(v.public_key)
        check_ipv6(v.address, f"{key}.address")
        if not 0 < v.port <= 65535:
            raise ConfigError(f"{key}.port: {v.port} is not a UDP port")
        if v.power < 0:
            raise ConfigError(f"{key}.power: cannot be negative")
    if consensus.validators and not any(v.power > 0 for v in consensus.validators):
        raise ConfigError("consensus.validators: no validator has voting power")
    for name, value in (("timeout_propose", consensus.timeout_propose),
                        ("timeout_prevote", consensus.timeout_prevote),
                        ("timeout_precommit", consensus.timeout_precommit),
                        ("block_interval", consensus.block_interval),
                        ("gossip_interval", consensus.gossip_interval)):
        if value <= 0:
            raise ConfigError(f"consensus.{name}: must be greater than 0")
    if not 1 <= consensus.max_block_decisions <= 4096:
        raise ConfigError("consensus.max_block_decisions: must be within 1..4096")


def _validate_dns(dns: DnsConfig) -> None:
    for i, text in enumerate(dns.upstream_servers):
        parse_upstream(text, f"dns.upstream_servers[{i}]")
    for i, address in enumerate(dns.nameserver_addresses):
        check_ipv6(address, f"dns.nameserver_addresses[{i}]")
    for key, value in (("dns.cache_size", dns.cache_size),
                       ("dns.max_pending_queries", dns.max_pending_queries),
                       ("dns.upstream_timeout", dns.upstream_timeout),
                       ("dns.record_ttl", dns.record_ttl),
                       ("dns.signature_validity", dns.signature_validity),
                       ("dns.zsk_lifetime", dns.zsk_lifetime),
                       ("dns.fin_timeout", dns.fin_timeout)):
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    if not 0 < dns.signature_refresh < dns.signature_validity:
        raise ConfigError("dns.signature_refresh: must be greater than 0 and less than "
                          "dns.signature_validity")
    if not 0 < dns.zsk_prepublish < dns.zsk_lifetime:
        raise ConfigError("dns.zsk_prepublish: must be greater than 0 and less than "
                          "dns.zsk_lifetime")
    if dns.rate_limit_per_minute < 0:
        raise ConfigError("dns.rate_limit_per_minute: must be 0 (unlimited) or more")


_UPSTREAM = re.compile(r"^(?:(doq)://(?:([^@\[\]]+)@)?)?\[([^\]]+)\]:(\d+)$")


def parse_upstream(text: str, key: str) -> tuple[str, str, int, str]:
    """``(protocol, address, port, server_name)`` of a ``dns.upstream_servers`` entry.

    ``protocol`` is ``"udp"`` (with TCP fallback) or ``"doq"``.

    :raises ConfigError: not ``[ADDR]:PORT`` or ``doq://[NAME@][ADDR]:PORT``, or an
        IPv4 (or IPv4-mapped) address: TrustChain forwards over IPv6 only.
    """
    m = _UPSTREAM.match(text.strip())
    if m is None:
        raise ConfigError(f"{key}: {text!r} is not \"[ADDR]:PORT\" or \"doq://[ADDR]:PORT\" "
                          "(IPv6 addresses in brackets; IPv4 upstreams are not supported)")
    protocol, name, address, port = m.group(1) or "udp", m.group(2) or "", m.group(3), m.group(4)
    check_ipv6(address, key)
    if not 0 < int(port) <= 65535:
        raise ConfigError(f"{key}: {port} is not a UDP port")
    return protocol, address, int(port), name


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
    logging_table = table.get("logging", {})
    if not cfg.logging.structured and logging_table.get("format") == "json":
        raise ConfigError("logging.structured: false asks for plain text lines, and "
                          "logging.format = \"json\" for JSON: remove one of them")
    net = cfg.network
    if 0 < net.connection_timeout <= net.keep_alive_interval:
        warnings.append(
            f"network.keep_alive_interval ({net.keep_alive_interval:g}s) is not shorter than "
            f"network.connection_timeout ({net.connection_timeout:g}s): keep-alives cannot "
            "keep an idle connection open")
    if cfg.api.cors_origins:
        warnings.append("api.cors_origins has no effect: TrustChain has no HTTP layer")
    if cfg.ct.storage.backend == "s3" and cfg.ct.storage_path:
        warnings.append(f"ct.storage_path ({cfg.ct.storage_path}) is not used: with "
                        f"ct.storage.backend = \"s3\" nothing of the CT log is kept on "
                        "local disk")
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
