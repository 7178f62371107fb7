"""``fp.*``: certificate fingerprints, computed when a certificate is issued or logged."""

from __future__ import annotations

from dataclasses import dataclass

from .._schema import OpSpec, arg, register


@dataclass(frozen=True, slots=True, kw_only=True)
class GetArgs:
    fingerprint: str | None = arg(None, max_length=64,
                                  doc="SHA-256 of the certificate's DER, hex")
    spki_sha256: str | None = arg(None, max_length=64,
                                  doc="SHA-256 of the SubjectPublicKeyInfo, hex")
    name: str | None = arg(None, max_length=253, doc="a DNS name or IPv6 address")


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyArgs:
    fingerprint: str = arg(max_length=64, doc="SHA-256 of the certificate's DER, hex")


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchArgs:
    names: list[str] = arg([], max_length=100, doc="DNS names or IPv6 addresses to watch")
    spki_sha256: list[str] = arg([], max_length=100, doc="keys to watch (hex)")
    heartbeat_ms: int = arg(5000, minimum=100, maximum=60_000)


GET = register(OpSpec(name="fp.get", args=GetArgs,
                      summary="fingerprint records by certificate, key or name"))
VERIFY = register(OpSpec(name="fp.verify", args=VerifyArgs,
                         summary="recompute a fingerprint and check its log inclusion"))
WATCH = register(OpSpec(name="fp.watch", args=WatchArgs, streaming=True,
                        summary="events when the certificate of a name or key changes"))
