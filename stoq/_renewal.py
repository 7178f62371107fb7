"""Keep a certificate fresh: re-key and renew before it expires.

::

    renewer = stoq.CertificateRenewer(client, names=["api.trust"], directory=Path("tls"))
    await renewer.renew()        # now
    await renewer.run()          # forever: at about 2/3 of each lifetime, with jitter

Each renewal makes a new P-256 key (the old key never signs a new CSR), asks
the CA with ``ca.issue``, and replaces ``key.pem``, ``cert.pem`` and
``chain.pem`` in ``directory`` atomically. The clock and the sleep are
injectable so the schedule is testable without waiting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from protocol import renewal_statement

from ._client import AsyncClient
from ._files import write_atomic

log = logging.getLogger("stoq.renewal")

RENEW_FRACTION = 2 / 3
JITTER_FRACTION = 0.05
"""Renewal times are spread by up to this fraction of the lifetime, earlier only."""
RETRY_DELAY = 30.0


def build_csr(key: Any, names: list[str], addresses: list[str]) -> bytes:
    """A DER CSR for ``names`` (DNS) and ``addresses`` (IPv6) signed by ``key``.

    :raises ValueError: an address is not IPv6, or there is no name at all.
    """
    if not names and not addresses:
        raise ValueError("give at least one name or address")
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if not isinstance(ip, ipaddress.IPv6Address):
            raise ValueError(f"{address}: TrustChain certificates carry IPv6 addresses only")
        san.append(x509.IPAddress(ip))
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0])] if names
                        else [])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (x509.CertificateSigningRequestBuilder().subject_name(subject)
            .add_extension(x509.SubjectAlternativeName(san), critical=not names)
            .sign(key, algorithm).public_bytes(serialization.Encoding.DER))


class CertificateRenewer:
    """Obtain and renew a certificate for ``names`` and ``addresses``.

    :param proofs: called before each request for the ``proofs`` argument
        (the four-proof set), or None.
    """

    def __init__(self, client: AsyncClient, *, names: list[str], directory: Path,
                 addresses: list[str] | None = None,
                 proofs: Callable[[bytes], Awaitable[dict[str, Any]]] | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        if not names and not addresses:
            raise ValueError("give at least one name or address")
        self.client = client
        self.names = names
        self.addresses = addresses or []
        self.directory = directory
        self._proofs = proofs
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.current: dict[str, Any] | None = None
        self._jitter = 0.0
        self.renewals = 0

    async def renew(self) -> dict[str, Any]:
        """Re-key and get a new certificate now; returns the ``ca.issue`` result."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = build_csr(key, self.names, self.addresses)
        args: dict[str, Any] = {"csr": csr}
        old_key = self.directory / "key.pem"
        if self.current is not None and old_key.exists():
            # the old key hands its names to the new one (spec: renewal statement)
            previous = serialization.load_pem_private_key(old_key.read_bytes(), None)
            if isinstance(previous, ec.EllipticCurvePrivateKey):
                args["renews"] = self.current["serial"]
                args["renewal_signature"] = previous.sign(
                    renewal_statement(self.current["serial"], csr), ec.ECDSA(hashes.SHA256()))
        if self._proofs is not None:
            args["proofs"] = await self._proofs(csr)
        result = await self.client.request("ca.issue", args)

        def pem(der: bytes) -> bytes:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)

        write_atomic(self.directory / "key.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), mode=0o600)
        write_atomic(self.directory / "cert.pem", pem(result["certificate"]))
        write_atomic(self.directory / "chain.pem", b"".join(pem(d) for d in result["chain"]))
        self.current = result
        lifetime = result["not_after"] - result["not_before"]
        self._jitter = self.rng.uniform(0, lifetime * JITTER_FRACTION)  # fixed per certificate
        self.renewals += 1
        log.info("certificate renewed", extra={"serial": result["serial"]})
        return result

    def next_renewal(self) -> float:
        """When to renew the current certificate: at 2/3 of its lifetime, a little
        earlier by jitter, and no later than the CA's ``renew_after`` hint."""
        if self.current is None:
            return self.clock()
        start, end = self.current["not_before"], self.current["not_after"]
        lifetime = end - start
        at = start + lifetime * RENEW_FRACTION - self._jitter
        return float(min(at, self.current.get("renew_after", at)))

    async def run(self, *, iterations: int | None = None) -> None:
        """Renew forever (or ``iterations`` times); failures retry after a delay."""
        done = 0
        while iterations is None or done < iterations:
            wait = self.next_renewal() - self.clock()
            if wait > 0:
                await self.sleep(wait)
            try:
                await self.renew()
                done += 1
            except Exception as exc:
                log.warning("renewal failed; retrying", extra={"error": str(exc)})
                expires = self.current["not_after"] if self.current else self.clock()
                await self.sleep(max(1.0, min(RETRY_DELAY, (expires - self.clock()) / 10)))
