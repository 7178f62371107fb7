"""Configuration loading: the shipped files, unknown keys, bad values, durations."""

from __future__ import annotations

import pytest

import config as shipped
from trustchain import _config as config


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
