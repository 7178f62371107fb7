"""``dns.*``: resolution, health and record registration of the DNS service."""

from __future__ import annotations

from dataclasses import dataclass

from .._cbor import encode_deterministic
from .._schema import OpSpec, arg, register


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolveArgs:
    name: str = arg(max_length=1024, doc="domain name, absolute or not (a final dot is implied)")
    type: str = arg("AAAA", max_length=16, doc="record type mnemonic (AAAA, TLSA, ...) or TYPEnnn")
    dnssec: bool = arg(True, doc="include RRSIG/NSEC records and validate them")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthArgs:
    """No arguments."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterArgs:
    serial: str = arg(max_length=40, doc="the certificate whose key signs")
    name: str = arg(max_length=253, doc="a DNS name of that certificate")
    addresses: list[str] = arg([], doc="IPv6 addresses to publish as AAAA; [] removes them")
    time: int = arg(minimum=0, doc="signer's clock, seconds since 1970; within 5 minutes")
    signature: bytes = arg(max_length=512, doc="over the registration statement (spec)")


def registration_statement(serial: str, name: str, addresses: list[str], at: int) -> bytes:
    """What the key of certificate ``serial`` signs to publish ``addresses`` at ``name``.

    ``serial`` is normalised (lowercase, no leading zeros), ``name`` lowercase
    without a trailing dot, and ``addresses`` compressed (RFC 5952) in the
    order of the request.
    """
    return encode_deterministic({"ctx": "trustchain-dns-register-v1", "serial": serial,
                                 "name": name, "addresses": list(addresses), "time": at})


RESOLVE = register(OpSpec(name="dns.resolve", args=ResolveArgs,
                          summary="resolve a name: answer, rcode, DNSSEC and TLSA status"))
HEALTH = register(OpSpec(name="dns.health", args=HealthArgs,
                         summary="upstreams, cache, zone serials, signatures, DS records"))
REGISTER = register(OpSpec(name="dns.register", args=RegisterArgs,
                           summary="publish AAAA records for a name of one's certificate"))
