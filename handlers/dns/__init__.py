"""The DNS service: signed TrustChain zones (AAAA + TLSA per certificate), the
IPv6-only forwarding resolver, answers for DNS over QUIC, and the ``dns.*`` ops."""

from ._keys import DNSSEC_ALGORITHMS, KeyRing, ZoneKey
from ._resolver import AnswerCache, Forwarder, Resolution, Upstream, UpstreamStatus, ipv6_only
from ._zone import SignatureCache, Zone, ZoneSettings, build_zone
from .service import TLSA_PREFIX, DnsService, DnsSettings, Registration, check_ksk

__all__ = [
    "DNSSEC_ALGORITHMS",
    "TLSA_PREFIX",
    "AnswerCache",
    "DnsService",
    "DnsSettings",
    "Forwarder",
    "KeyRing",
    "Registration",
    "Resolution",
    "SignatureCache",
    "Upstream",
    "UpstreamStatus",
    "Zone",
    "ZoneKey",
    "ZoneSettings",
    "build_zone",
    "check_ksk",
    "ipv6_only",
]
