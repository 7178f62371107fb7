"""The CA hierarchy: a root and rotating issuing intermediates, keys in the keystore.

``Hierarchy.ensure`` is idempotent: it creates what is missing (root key and
certificate, first intermediate) and otherwise loads what exists. Keys never
leave the keystore; their certificates live in the authority database and, for
the root, in the published root file (``root.pem``) clients trust.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from store import AdminCredential, AuthorityRecord, AuthorityStore, DurableFile

from . import _x509
from ._policy import CheckedRequest

log = logging.getLogger("trustchain.ca")

ROOT_KEY = "root"
ADMIN_RENEW_BEFORE = 7 * 86400.0
"""Seconds before its expiry that the administrator credential is replaced."""


@dataclass(frozen=True, kw_only=True)
class HierarchyConfig:
    ca_id: str
    domains: tuple[str, ...]
    root_lifetime: float = 10 * 365 * 86400.0
    """Seconds the root certificate is valid."""
    intermediate_lifetime: float = 90 * 86400.0
    """Seconds an issuing intermediate is valid."""
    intermediate_renew_fraction: float = 2 / 3
    """Rotate an intermediate once this fraction of its lifetime has passed."""


@dataclass
class Issuer:
    """The active issuing intermediate: its key and certificate."""

    name: str
    signer: Any
    certificate: x509.Certificate
    der: bytes


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Hierarchy:
    """Root and intermediates of one CA.

    :param root_file: where the root certificate is published for clients (PEM).
    :param admin: where the administrator credential is written.
    """

    def __init__(self, *, keystore: Any, authorities: AuthorityStore, root_file: DurableFile,
                 admin: AdminCredential, config: HierarchyConfig, clock: Callable[[], float],
                 audit: Callable[[str, dict[str, Any]], Any]) -> None:
        self.keystore = keystore
        self.authorities = authorities
        self.root_file = root_file
        self.admin = admin
        self.config = config
        self.clock = clock
        self._audit = audit
        self.root: x509.Certificate | None = None
        self.root_der = b""
        self.issuer: Issuer | None = None

    def ensure(self) -> bool:
        """Create or load the hierarchy; True if anything was created."""
        created = False
        record = self.authorities.active_authority("root")
        if record is None:
            signer = self.keystore.get(ROOT_KEY) or self._new_key(ROOT_KEY)
            now = self.clock()
            root = _x509.build_root(signer.private_key(), signer.public_key(),
                                    ca_id=self.config.ca_id, domains=self.config.domains,
                                    not_before=now - 300, not_after=now + self.config.root_lifetime)
            der = root.public_bytes(serialization.Encoding.DER)
            self.authorities.add_authority(AuthorityRecord(
                name=ROOT_KEY, role="root", der=der, not_before=now - 300,
                not_after=now + self.config.root_lifetime, created_at=now, active=True),
                make_active=True)
            self._audit("ca.root-created", {"fingerprint": hashlib.sha256(der).hexdigest(),
                                            "domains": list(self.config.domains)})
            created = True
            record = self.authorities.active_authority("root")
        assert record is not None
        self.root_der = record.der
        self.root = x509.load_der_x509_certificate(record.der)
        if self.root_file.read() != _pem(self.root):
            self.root_file.write(_pem(self.root))
        active = self.authorities.active_authority("intermediate")
        if active is None:
            self.rotate_intermediate(reason="initial")
            created = True
        else:
            self._load_issuer(active)
        return created

    def _new_key(self, name: str) -> Any:
        signer = self.keystore.create(name, "ecdsa-p256-sha256")
        self._audit("key.generated", {"name": name, "algorithm": signer.algorithm,
                                      "keystore": self.keystore.kind})
        return signer

    def _load_issuer(self, record: AuthorityRecord) -> None:
        signer = self.keystore.get(record.name)
        if signer is None:
            raise RuntimeError(f"the key {record.name!r} of the active intermediate is missing "
                               "from the keystore")
        self.issuer = Issuer(name=record.name, signer=signer,
                             certificate=x509.load_der_x509_certificate(record.der),
                             der=record.der)

    def rotate_intermediate(self, reason: str) -> Issuer:
        """Create a new intermediate (new key in the keystore) and make it active.

        The previous intermediate stays valid, so certificates it issued keep
        verifying until they expire.
        """
        assert self.root is not None
        numbers = [int(a.name.rsplit("-", 1)[1])
                   for a in self.authorities.authorities("intermediate")]
        number = max(numbers, default=0) + 1
        name = f"intermediate-{number}"
        signer = self.keystore.get(name) or self._new_key(name)
        root_signer = self.keystore.get(ROOT_KEY)
        if root_signer is None:
            raise RuntimeError("the root key is missing from the keystore")
        now = self.clock()
        not_after = min(now + self.config.intermediate_lifetime,
                        self.root.not_valid_after_utc.timestamp())
        cert = _x509.build_intermediate(root_signer.private_key(), self.root,
                                        signer.public_key(), ca_id=self.config.ca_id,
                                        number=number, domains=self.config.domains,
                                        not_before=now - 300, not_after=not_after)
        der = cert.public_bytes(serialization.Encoding.DER)
        self.authorities.add_authority(AuthorityRecord(
            name=name, role="intermediate", der=der, not_before=now - 300, not_after=not_after,
            created_at=now, active=True), make_active=True)
        self._audit("ca.intermediate-rotated", {
            "name": name, "reason": reason, "fingerprint": hashlib.sha256(der).hexdigest(),
            "not_after": int(not_after)})
        self.issuer = Issuer(name=name, signer=signer, certificate=cert, der=der)
        log.info("issuing intermediate rotated", extra={"intermediate": name, "reason": reason})
        return self.issuer

    def intermediate_renew_at(self) -> float:
        assert self.issuer is not None
        cert = self.issuer.certificate
        start = cert.not_valid_before_utc.timestamp()
        end = cert.not_valid_after_utc.timestamp()
        return start + (end - start) * self.config.intermediate_renew_fraction

    def ensure_admin(self, renew_before: float = ADMIN_RENEW_BEFORE) -> AdminCredential:
        """The administrator credential (key and certificate), made if missing.

        Made once, and made again when the current one expires within
        ``renew_before`` seconds (it lives as long as its intermediate). The
        certificate is recorded as an authority with role ``admin``: its
        signature can revoke any certificate (``ca.revoke`` with
        ``admin_certificate``). The key is a file: it belongs to an operator,
        not to the CA, and can be moved off the machine.
        """
        newest = max((a.not_after for a in self.authorities.authorities("admin")), default=0.0)
        if self.admin.exists() and newest > self.clock() + renew_before:
            return self.admin
        assert self.issuer is not None
        key = ec.generate_private_key(ec.SECP256R1())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        request = CheckedRequest(public_key=key.public_key(), spki_der=spki,
                                 spki_sha256=hashlib.sha256(spki).hexdigest(),
                                 dns_names=(f"admin.{self.config.domains[0]}",),
                                 ip_addresses=())
        now = self.clock()
        cert = _x509.sign(_x509.leaf_builder(self.issuer.certificate, request,
                                             serial=_x509.new_serial(), not_before=now - 300,
                                             not_after=self.issuer.certificate
                                             .not_valid_after_utc.timestamp()),
                          self.issuer.signer.private_key())
        der = cert.public_bytes(serialization.Encoding.DER)
        self.admin.install(key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), _pem(cert))
        self.authorities.add_authority(AuthorityRecord(
            name=f"admin-{hashlib.sha256(der).hexdigest()[:16]}", role="admin", der=der,
            not_before=now - 300, not_after=cert.not_valid_after_utc.timestamp(),
            created_at=now, active=True), make_active=False)
        self._audit("ca.admin-created", {"fingerprint": hashlib.sha256(der).hexdigest()})
        return self.admin

    def has_admin(self) -> bool:
        return bool(self.authorities.authorities("admin"))

    def chain_der(self) -> list[bytes]:
        """The active intermediate followed by the root."""
        assert self.issuer is not None
        return [self.issuer.der, self.root_der]

    def intermediates(self) -> list[AuthorityRecord]:
        return self.authorities.authorities("intermediate")
