"""Configuration loading: the shipped files, unknown keys, bad values, durations."""

from __future__ import annotations

import io
import logging
import re
import tomllib
from pathlib import Path

import pytest

import config as shipped
from trustchain import _config as config
from trustchain import _logging


def test_production_loads_as_written() -> None:
    cfg = config.load(shipped.path("production.toml"))
    assert cfg.ca.mode == "production"
    assert cfg.ca.hsm.provider == "aws_cloudhsm"
    assert cfg.network.connection_timeout == 30.0
    assert cfg.network.keep_alive_interval == 60.0
    assert cfg.dns.cache_ttl == 600.0
    assert cfg.ct.merkle_update_interval == 30.0
    assert cfg.consensus.minimum_work_difficulty == 20
    assert cfg.api.rate_limit_per_minute == 1000
    assert cfg.dns.domains.trustchain_domains == ["hypermesh", "caesar", "trust", "assets"]
    assert cfg.listen_addresses() == [("::", 8443), ("::", 6962), ("::", 8853)]
    assert not any("unknown" in w for w in cfg.warnings)
    # production's own values deserve these two warnings
    assert any("keep_alive_interval" in w for w in cfg.warnings)
    assert any("cors_origins" in w for w in cfg.warnings)


def test_development_is_the_embedded_default() -> None:
    cfg = config.load()
    assert cfg.ca.mode == "development"
    assert cfg.node.data_dir == "./trustchain-data"
    assert {h for h, _ in cfg.listen_addresses()} == {"::1"}
    assert cfg.warnings == ()


def test_unknown_keys_warn_by_name() -> None:
    cfg = config.loads("[network]\nipv6_only = true\nturbo = 1\n[nonsense]\nx = 1\n")
    assert cfg.warnings == ("unknown configuration key 'network.turbo' ignored",
                            "unknown configuration key 'nonsense' ignored")


@pytest.mark.parametrize(("text", "key"), [
    ("[network]\nmax_concurrent_connections = \"many\"", "network.max_concurrent_connections"),
    ("[network]\nmax_concurrent_connections = 0", "network.max_concurrent_connections"),
    ("[network]\nconnection_timeout = \"soon\"", "network.connection_timeout"),
    ("[network]\nipv6_only = false", "network.ipv6_only"),
    ("[network]\nquic_engine = \"quiche\"", "network.quic_engine"),
    ("[ca]\nbind_address = \"0.0.0.0\"", "ca.bind_address"),
    ("[ca]\nbind_address = \"::ffff:127.0.0.1\"", "ca.bind_address"),
    ("[ca]\nport = 70000", "ca.port"),
    ("[ca]\nmode = \"staging\"", "ca.mode"),
    ("[api]\nenable_tls = false", "api.enable_tls"),
    ("[api]\nrate_limit_per_minute = -5", "api.rate_limit_per_minute"),
    ("[dns.domains]\ntrustchain_domains = [1]", "dns.domains.trustchain_domains[0]"),
    ("[logging.output]\ntype = \"file\"", "logging.output.path"),
    ("[ca]\nhsm = 3", "ca.hsm"),
    ("[ct]\nbatch_interval = \"5ms\"", "ct.batch_interval"),  # removed: refused, not ignored
    ("[ct]\nmax_batch = 10", "ct.max_batch"),
])
def test_bad_values_name_the_key(text: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(text)
    assert str(info.value).startswith(key)


def test_invalid_toml() -> None:
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.loads("[network\n")


def test_missing_file() -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load("/nonexistent/trustchain.toml")


@pytest.mark.parametrize(("value", "seconds"), [
    ("250ms", 0.25), ("30s", 30.0), ("10m", 600.0), ("24h", 86400.0), ("1d", 86400.0),
    ("1.5s", 1.5), (5, 5.0), (0.5, 0.5), ("7", 7.0),
])
def test_durations(value: object, seconds: float) -> None:
    assert config.parse_duration(value, "k") == seconds


@pytest.mark.parametrize("value", ["-1s", "1w", "", True, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(config.ConfigError):
        config.parse_duration(value, "k")


# --- no reference setting silently ignored ------------------------------------------------

SPEC = (Path(__file__).resolve().parents[2] / "spec" / "config.md").read_text()


def spec_statuses() -> dict[str, str]:
    """Every key of spec/config.md §6 and its status, by dotted name."""
    statuses: dict[str, str] = {}
    section = ""
    for line in SPEC.splitlines():
        if m := re.match(r"### 6\.\d+ `\[(.+)\]`", line):
            section = m.group(1)
        elif section and (m := re.match(r"\| `([a-z0-9_]+)` \|[^|]*\|[^|]*\| ([^|]+) \|", line)):
            statuses[f"{section}.{m.group(1)}"] = m.group(2).split(" (")[0]  # fixed (`true`)
    return statuses


def toml_keys(table: dict[str, object], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in table.items():
        if isinstance(value, dict):
            keys += toml_keys(value, f"{prefix}{key}.")  # type: ignore[arg-type]
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_production_setting_is_in_effect_informational_or_refused() -> None:
    """Each key production.toml sets: in effect, informational (named as such by
    node.info and at start), fixed (any other value refused), or documented as not in
    effect yet with a warning (cors_origins: at load)."""
    path = shipped.path("production.toml")
    keys = toml_keys(tomllib.loads(Path(path).read_text()))
    statuses = spec_statuses()
    assert set(keys) <= set(statuses), set(keys) - set(statuses)
    by_status: dict[str, set[str]] = {}
    for key in keys:
        by_status.setdefault(statuses[key], set()).add(key)
    assert set(by_status) <= {"in effect", "informational", "fixed", "no effect"}
    assert by_status["informational"] == {
        "ca.hsm.cluster_id", "ca.hsm.backup_enabled", "dns.server_id", "api.server_id",
        "consensus.byzantine_tolerance"}
    assert by_status["fixed"] == {"consensus.provider", "api.enable_tls", "network.ipv6_only"}
    assert by_status["no effect"] == {"api.cors_origins"}
    for key in ("ca.rotation_interval", "ca.hsm.root_key_id", "logging.structured",
                "audit.checkpoint_interval", "ct.storage.backend", "ct.storage.bucket",
                "ct.storage.region", "ct.storage.encryption"):
        assert key in by_status["in effect"], key

    cfg = config.load(path)
    assert config.informational(cfg) == {
        "ca.hsm.cluster_id": "cluster-12345678", "ca.hsm.backup_enabled": True,
        "dns.server_id": "trustchain-dns-production",
        "api.server_id": "trustchain-api-production", "consensus.byzantine_tolerance": 0.33}
    assert set(config.INFORMATIONAL) == by_status["informational"]
    assert cfg.ca.rotation_interval == 86400.0 and cfg.ca.hsm.root_key_id == "0x1234"
    assert cfg.logging.structured and cfg.audit.checkpoint_interval == 1.0
    assert (cfg.ct.storage.backend, cfg.ct.storage.bucket, cfg.ct.storage.region,
            cfg.ct.storage.encryption) == ("s3", "trustchain-ct-logs-prod", "us-west-2",
                                           "aws:kms")
    assert any("cors_origins" in w for w in cfg.warnings)  # no effect: said at load
    assert any(w.startswith("ct.storage_path (/var/lib/trustchain/ct) is not used")
               for w in cfg.warnings)  # the tiles are in the bucket: said at load


@pytest.mark.parametrize(("change", "key", "message"), [
    (("provider = \"nkrypt_four_proof\"", "provider = \"raft\""), "consensus.provider",
     "not a consensus this node has"),
    (("byzantine_tolerance = 0.33", "byzantine_tolerance = 0.34"),
     "consensus.byzantine_tolerance", "f < n/3"),
    (("byzantine_tolerance = 0.33", "byzantine_tolerance = 0.5"),
     "consensus.byzantine_tolerance", "more than the validators tolerate"),
    (("rotation_interval = \"24h\"", "rotation_interval = \"30s\""), "ca.rotation_interval",
     "at least 60s"),
    (("structured = true", "structured = false"), "logging.structured", "remove one"),
    (("checkpoint_interval = \"1s\"", "checkpoint_interval = 0"),
     "audit.checkpoint_interval", "greater than 0"),
])
def test_production_with_a_value_the_node_cannot_honour_is_refused(
        change: tuple[str, str], key: str, message: str) -> None:
    text = Path(shipped.path("production.toml")).read_text()
    assert change[0] in text
    with pytest.raises(config.ConfigError) as info:
        config.loads(text.replace(change[0], change[1], 1))
    assert str(info.value).startswith(key) and message in str(info.value), str(info.value)


def test_structured_false_writes_plain_text() -> None:
    cfg = config.loads("[logging]\nstructured = false\n")
    assert cfg.logging.format == "json"  # the default, overridden by structured = false
    stream = io.StringIO()
    _logging.configure(cfg.logging, stream)
    try:
        logging.getLogger("trustchain.test").warning("plain %s", "words",
                                                     extra={"serial": "ab12"})
    finally:
        _logging.configure(config.loads("").logging)
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING trustchain.test: plain words", line), line
    structured = io.StringIO()
    _logging.configure(config.loads("[logging]\nformat = \"text\"\n").logging, structured)
    try:
        logging.getLogger("trustchain.test").warning("plain", extra={"serial": "ab12"})
    finally:
        _logging.configure(config.loads("").logging)
    assert structured.getvalue().rstrip().endswith("[serial=ab12]")


@pytest.mark.parametrize(("table", "extra", "message"), [
    ("ct.storage", 'backend = "s3"', "ct.storage.bucket: '' is not an S3 bucket name"),
    ("ct.storage", 'backend = "s3"\nbucket = "Bad_Bucket"', "is not an S3 bucket name"),
    ("ct.storage", 'backend = "s3"\nbucket = "tiles"\nendpoint = "[::1]:7480"',
     "ct.storage.endpoint: '[::1]:7480' is not an http:// or https:// URL"),
    ("ct.storage", 'backend = "s3"\nbucket = "tiles"\nprefix = "/a/"',
     "ct.storage.prefix: '/a/' must not start or end with /"),
    ("ct.storage", 'encryption = "des"', "ct.storage.encryption: 'des' is not one of"),
    ("audit.storage", 'backend = "s3"\nbucket = "audit"\nretention = "12h"',
     "audit.storage.retention: at least 1d"),
    ("audit.storage", 'mode = "legal-hold"', "audit.storage.mode: 'legal-hold' is not one of"),
])
def test_object_storage_settings_are_checked(table: str, extra: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(f"[{table}]\n{extra}\n")
    assert str(info.value).startswith(table) and message in str(info.value), str(info.value)


def test_object_storage_settings_load() -> None:
    cfg = config.loads('[ct.storage]\nbackend = "s3"\nbucket = "tiles"\nprefix = "v1/ct"\n'
                       'endpoint = "http://[::1]:7480"\nencryption = "AES256"\n'
                       '[audit.storage]\nbackend = "s3"\nbucket = "audit"\n'
                       'retention = "30d"\nmode = "governance"\n')
    assert cfg.ct.storage.prefix == "v1/ct" and cfg.ct.storage.encryption == "AES256"
    assert cfg.audit.storage.retention == 30 * 86400 and cfg.audit.storage.mode == "governance"
