"""Automatic rotation: the issuing intermediate and the node's own TLS certificate;
``ca.rotation-status``.

``Rotator.check()`` is one pass with the injected clock (tests call it
directly); ``run()`` repeats it. The node's QUIC certificate is a CA-issued
24-hour leaf, re-keyed and renewed at about 2/3 of its lifetime; the new
files replace the old ones atomically and the transport swaps them in
without dropping connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.ops import ca as ops
from store import TlsCredential

from .._router import RequestContext, Router
from ._authority import Hierarchy
from .service import IssuanceCounts

log = logging.getLogger("trustchain.ca")

RENEW_FRACTION = 2 / 3


def node_csr(key: ec.EllipticCurvePrivateKey, names: list[str], addresses: list[str]) -> bytes:
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.IPv6Address(a)) for a in addresses]
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(san), critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


class Rotator:
    """Keeps the intermediate and the node certificate fresh.

    :param issue: ``async (csr_der) -> ca.issue result``: the CA's own issuance
        path (:meth:`CertificateAuthority.issue_node_certificate`), so node
        certificates are stored and audited like any other.
    :param rotation_interval: ``ca.rotation_interval``: the node certificate is re-keyed
        and renewed this long after its ``notBefore``, or at 2/3 of its lifetime if that
        comes first (None: at 2/3).
    :param counts: the CA's counts of issued and refused requests (reported).
    :param installed: called after new TLS files are written (the transport reloads).
    :param announce: commits this validator's keys to the cluster (after a new
        intermediate, before it issues with it).
    """

    def __init__(self, *, hierarchy: Hierarchy,
                 issue: Callable[[bytes], Awaitable[dict[str, Any]]],
                 tls: TlsCredential, names: list[str], addresses: list[str],
                 rotation_interval: float | None = None,
                 counts: IssuanceCounts | None = None,
                 installed: Callable[[], None] | None = None,
                 announce: Callable[[], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.hierarchy = hierarchy
        self._issue = issue
        self.counts = counts or IssuanceCounts()
        self._announce = announce
        self.tls = tls
        self.names = names
        self.addresses = addresses
        self.rotation_interval = rotation_interval
        self._installed = installed
        self.clock = clock
        self.server_certificate: dict[str, Any] | None = None
        self.last_check: float | None = None
        self.events: list[dict[str, Any]] = []
        self.ceremony_due = False
        """The intermediate is due for renewal and only the ceremony can renew it."""
        self.failure: str | None = None
        """Why the latest rotation pass failed; None once one succeeds."""

    def _server_renew_at(self) -> float | None:
        if self.server_certificate is None:
            return None
        start, end = self.server_certificate["not_before"], self.server_certificate["not_after"]
        lifetime = (end - start) * RENEW_FRACTION
        if self.rotation_interval is not None:
            lifetime = min(lifetime, self.rotation_interval)
        return float(start + lifetime)

    def load_current(self) -> None:
        """Adopt the TLS certificate on disk if the CA issued it (after a restart) with
        a subject: one with an empty subject (the profile before GnuTLS clients were
        served) is replaced at the first check."""
        if not self.tls.exists():
            return
        chain = self.tls.read_chain()
        if not chain:
            return
        cert = chain[0]
        issuers = {x509.load_der_x509_certificate(a.der).subject
                   for a in self.hierarchy.intermediates()}
        if cert.issuer in issuers and len(cert.subject) > 0:
            self.server_certificate = {
                "serial": format(cert.serial_number, "x"),
                "not_before": int(cert.not_valid_before_utc.timestamp()),
                "not_after": int(cert.not_valid_after_utc.timestamp()),
            }

    async def check(self) -> list[dict[str, Any]]:
        """One rotation pass; returns what it did. A failure is kept (``problem``) until a
        pass succeeds."""
        try:
            done = await self._check()
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        self.failure = None
        return done

    def problem(self) -> str | None:
        """None if the latest rotation pass succeeded, else why it failed (the
        ``rotation`` health check)."""
        if self.failure is None:
            return None
        return f"the latest rotation pass failed: {self.failure}"

    async def _check(self) -> list[dict[str, Any]]:
        now = self.clock()
        self.last_check = now
        done: list[dict[str, Any]] = []
        reissue = False
        if now >= self.hierarchy.intermediate_renew_at() and not self.hierarchy.can_rotate():
            # production cluster: the root key is elsewhere; the operator runs the ceremony
            if not self.ceremony_due:
                log.warning("the issuing intermediate is due for renewal; this node does not "
                            "hold the root key: run `trustchain ceremony request` and have "
                            "the root holder sign it")
            self.ceremony_due = True
        elif now >= self.hierarchy.intermediate_renew_at():
            issuer = self.hierarchy.rotate_intermediate(reason="scheduled")
            done.append({"what": "intermediate", "name": issuer.name, "time": int(now)})
            reissue = True  # under the new intermediate
            if self._announce is not None:
                await self._announce()
        if self.hierarchy.has_admin():
            before = len(self.hierarchy.authorities.authorities("admin"))
            self.hierarchy.ensure_admin()
            if len(self.hierarchy.authorities.authorities("admin")) > before:
                done.append({"what": "admin_credential", "time": int(now)})
        renew_at = self._server_renew_at()
        if reissue or renew_at is None or now >= renew_at:
            done.append(await self.renew_server_certificate())
        self.events = (self.events + done)[-20:]
        return done

    async def renew_server_certificate(self) -> dict[str, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        result = await self._issue(node_csr(key, self.names, self.addresses))
        leaf = x509.load_der_x509_certificate(result["certificate"])
        chain = [leaf] + [x509.load_der_x509_certificate(d) for d in result["chain"][:-1]]
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.tls.install(key_pem, b"".join(c.public_bytes(serialization.Encoding.PEM)
                                           for c in chain))
        self.server_certificate = {"serial": result["serial"],
                                   "not_before": result["not_before"],
                                   "not_after": result["not_after"]}
        log.info("node TLS certificate renewed", extra={"serial": result["serial"]})
        if self._installed is not None:
            self._installed()
        return {"what": "server_certificate", "serial": result["serial"],
                "time": int(self.clock())}

    def status(self) -> dict[str, Any]:
        renew_at = self._server_renew_at()
        return {
            "server_certificate": None if self.server_certificate is None else {
                **self.server_certificate, "renew_at": int(renew_at or 0)},
            "last_check": None if self.last_check is None else int(self.last_check),
            "recent": list(self.events),
        }

    async def run(self, interval: float = 60.0) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("rotation pass failed; retrying at the next interval")
            await asyncio.sleep(interval)

    # --- ca.rotation-status -----------------------------------------------------------

    def rotation_status(self, args: ops.RotationStatusArgs,
                        ctx: RequestContext) -> dict[str, Any]:
        status: dict[str, Any] = {
            "intermediates": [
                {"name": a.name, "not_before": int(a.not_before), "not_after": int(a.not_after),
                 "active": a.active, "fingerprint": hashlib.sha256(a.der).hexdigest()}
                for a in self.hierarchy.intermediates()],
            "intermediate_renew_at": int(self.hierarchy.intermediate_renew_at()),
            "ceremony_due": self.ceremony_due,
            "issued": self.counts.issued,
            "rejected": self.counts.rejected,
        }
        status.update(self.status())
        return status

    def register(self, router: Router) -> None:
        router.add(ops.ROTATION_STATUS, self.rotation_status)
