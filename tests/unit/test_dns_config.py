"""The ``[dns]`` configuration keys: IPv6-only upstreams and bounds."""

from __future__ import annotations

import pytest

from trustchain import _config as config


def test_upstreams_parse() -> None:
    cfg = config.loads('[dns]\nupstream_servers = ["[2001:db8::53]:53", '
                       '"doq://dns.example@[2001:db8::54]:853", "doq://[::1]:8853"]\n')
    parsed = [config.parse_upstream(u, "k") for u in cfg.dns.upstream_servers]
    assert parsed == [("udp", "2001:db8::53", 53, ""), ("doq", "2001:db8::54", 853, "dns.example"),
                      ("doq", "::1", 8853, "")]


@pytest.mark.parametrize(("value", "message"), [
    ('"192.0.2.53:53"', "IPv4 upstreams are not supported"),
    ('"[192.0.2.53]:53"', "not an IPv6 address"),
    ('"[::ffff:192.0.2.53]:53"', "IPv4-mapped"),
    ('"doq://192.0.2.53:853"', "IPv4 upstreams are not supported"),
    ('"[::1]:0"', "not a UDP port"),
    ('"[::1]"', "is not"),
])
def test_ipv4_and_malformed_upstreams_are_config_errors(value: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=r"dns\.upstream_servers\[0\]") as info:
        config.loads(f"[dns]\nupstream_servers = [{value}]\n")
    assert message in str(info.value)


@pytest.mark.parametrize(("text", "key"), [
    ('signature_refresh = "8d"', "dns.signature_refresh"),
    ('zsk_prepublish = "31d"', "dns.zsk_prepublish"),
    ("cache_size = 0", "dns.cache_size"),
    ('nameserver_addresses = ["10.0.0.1"]', "dns.nameserver_addresses[0]"),
    ('dnssec_algorithm = "rsa"', "dns.dnssec_algorithm"),
    ("rate_limit_per_minute = -1", "dns.rate_limit_per_minute"),
])
def test_bad_dns_values(text: str, key: str) -> None:
    with pytest.raises(config.ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        config.loads(f"[dns]\n{text}\n")


def test_defaults() -> None:
    dns = config.loads("").dns
    assert dns.enabled and dns.upstream_servers == [] and dns.dnssec_algorithm == "ed25519"
    assert dns.cache_ttl == 600 and dns.signature_validity == 7 * 86400
