"""The DNS service: signed TrustChain zones (AAAA + TLSA per certificate), answers for
DNS over QUIC, the IPv6-only forwarding resolver, and the ``dns.*`` ops.

:class:`TrustChainZones` keeps the zones, :class:`DnsAnswers` answers
queries, :class:`DnsService` serves the ops.
"""

from ._answers import DnsAnswers
from ._keys import DNSSEC_ALGORITHMS, KeyRing, ZoneKey
from ._rendered import RenderedAnswers
from ._resolver import AnswerCache, Forwarder, Resolution, Upstream, UpstreamStatus, ipv6_only
from ._zone import SignatureCache, Zone, ZoneSettings, build_zone
from ._zones import TLSA_PREFIX, DnsSettings, Registration, TrustChainZones
from .service import DnsService, check_ksk

__all__ = [
    "DNSSEC_ALGORITHMS",
    "TLSA_PREFIX",
    "AnswerCache",
    "DnsAnswers",
    "DnsService",
    "DnsSettings",
    "Forwarder",
    "KeyRing",
    "Registration",
    "RenderedAnswers",
    "Resolution",
    "SignatureCache",
    "TrustChainZones",
    "Upstream",
    "UpstreamStatus",
    "Zone",
    "ZoneKey",
    "ZoneSettings",
    "build_zone",
    "check_ksk",
    "ipv6_only",
]
