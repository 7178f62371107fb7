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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from store import AdminCredential, AuthorityRecord, AuthorityStore, DurableFile, KeyStoreError

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
    root_key: str = ROOT_KEY
    """The keystore name (PKCS#11 label) of the root key."""
    root_key_given: bool = False
    """The root key was named by the operator (``ca.hsm.root_key_id``): it must exist
    already; the CA never makes it."""


@dataclass
class Issuer:
    """The active issuing intermediate: its key and certificate."""

    name: str
    signer: Any
    certificate: x509.Certificate
    der: bytes


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki_sha256(public_key: Any) -> str:
    return hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


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
            signer = self._root_signer() or self._new_key(self.config.root_key)
            now = self.clock()
            root = _x509.build_root(signer.private_key(), signer.public_key(),
                                    ca_id=self.config.ca_id, domains=self.config.domains,
                                    not_before=now - 300, not_after=now + self.config.root_lifetime)
            der = root.public_bytes(serialization.Encoding.DER)
            self.authorities.add_authority(AuthorityRecord(
                name=self.config.root_key, role="root", der=der, not_before=now - 300,
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

    def _root_signer(self) -> Any:
        """The root key's signer; None if the keystore does not hold it.

        :raises KeyStoreError: ``ca.hsm.root_key_id`` names a key the keystore lacks.
        """
        signer = self.keystore.get(self.config.root_key)
        if signer is None and self.config.root_key_given:
            raise KeyStoreError(f"ca.hsm.root_key_id: no private key {self.config.root_key!r} "
                                f"in the {self.keystore.kind} keystore (the root key must "
                                "exist already)")
        if signer is not None and signer.algorithm != "ecdsa-p256-sha256":
            raise KeyStoreError(f"the root key {self.config.root_key!r} is "
                                f"{signer.algorithm}; the root must be ECDSA P-256")
        return signer

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
        root_signer = self._root_signer()
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

    # --- the production ceremony: the root holder signs each validator's intermediate --

    def can_rotate(self) -> bool:
        """Whether this keystore holds the root key (else a new intermediate needs the
        ceremony: :meth:`request_intermediate`, :meth:`sign_intermediate`,
        :meth:`install_intermediate`)."""
        return self.keystore.get(self.config.root_key) is not None

    def _next_number(self) -> int:
        taken = [int(n.rsplit("-", 1)[1]) for n in self.keystore.names()
                 if n.startswith("intermediate-") and n.rsplit("-", 1)[1].isdigit()]
        taken += [int(a.name.rsplit("-", 1)[1]) for a in self.authorities.authorities(
            "intermediate")]
        return max(taken, default=0) + 1

    def request_intermediate(self, holder: str) -> tuple[str, bytes]:
        """A new intermediate key made in this keystore (it never leaves) and the PEM
        certificate request the root holder signs; returns (key name, CSR)."""
        number = self._next_number()
        name = f"intermediate-{number}"
        signer = self._new_key(name)
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(_x509.intermediate_name(self.config.ca_id, number, holder))
               .sign(signer.private_key(), _x509.hash_for(signer.private_key())))
        self._audit("ca.intermediate-requested", {
            "name": name, "holder": holder,
            "public_key_sha256": _spki_sha256(signer.public_key())})
        return name, csr.public_bytes(serialization.Encoding.PEM)

    def sign_intermediate(self, csr_pem: bytes) -> x509.Certificate:
        """The root holder's step: an issuing intermediate for a validator's request.

        :raises ValueError: the request is malformed or its signature does not verify,
            or this keystore does not hold the root key.
        """
        root_signer = self._root_signer()
        if root_signer is None or self.root is None:
            raise ValueError("this CA's keystore does not hold the root key: sign where "
                             "the root is (made by `trustchain init`)")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise ValueError("not a PEM certificate request") from None
        if not csr.is_signature_valid:
            raise ValueError("the request's signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("an intermediate key must be ECDSA P-256")
        now = self.clock()
        not_after = min(now + self.config.intermediate_lifetime,
                        self.root.not_valid_after_utc.timestamp())
        cert = _x509.build_intermediate(
            root_signer.private_key(), self.root, public_key, ca_id=self.config.ca_id,
            number=0, domains=self.config.domains, not_before=now - 300, not_after=not_after,
            subject=csr.subject)
        der = cert.public_bytes(serialization.Encoding.DER)
        self._audit("ca.intermediate-signed", {
            "subject": csr.subject.rfc4514_string(),
            "fingerprint": hashlib.sha256(der).hexdigest(), "not_after": int(not_after)})
        return cert

    def install_intermediate(self, cert_pem: bytes, root_pem: bytes) -> Issuer:
        """The validator's last step: make the root-signed intermediate whose key this
        keystore holds the active issuer (and adopt the root, whose key stays away).

        :raises ValueError: not issued by that root, not a CA, no key for it here, or a
            different root than this CA already has.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            root = x509.load_pem_x509_certificate(root_pem)
        except ValueError:
            raise ValueError("the certificate and the root must be PEM certificates") from None
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError("the intermediate is not signed by that root") from None
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ValueError("the certificate is not a CA certificate")
        name = next((n for n in self.keystore.names() if n.startswith("intermediate-")
                     and (s := self.keystore.get(n)) is not None
                     and s.public_key() == cert.public_key()), None)
        if name is None:
            raise ValueError("no intermediate key in this keystore matches the certificate "
                             "(`trustchain ceremony request` makes it)")
        root_der = root.public_bytes(serialization.Encoding.DER)
        record = self.authorities.active_authority("root")
        if record is not None and record.der != root_der:
            raise ValueError("this CA already has another root")
        if record is None:
            self.authorities.add_authority(AuthorityRecord(
                name=self.config.root_key, role="root", der=root_der,
                not_before=root.not_valid_before_utc.timestamp(),
                not_after=root.not_valid_after_utc.timestamp(), created_at=self.clock(),
                active=True), make_active=True)
        der = cert.public_bytes(serialization.Encoding.DER)
        self.authorities.add_authority(AuthorityRecord(
            name=name, role="intermediate", der=der,
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(), created_at=self.clock(),
            active=True), make_active=True)
        self.root, self.root_der = root, root_der
        if self.root_file.read() != _pem(root):
            self.root_file.write(_pem(root))
        self._audit("ca.intermediate-installed", {
            "name": name, "fingerprint": hashlib.sha256(der).hexdigest()})
        active = self.authorities.active_authority("intermediate")
        assert active is not None
        self._load_issuer(active)
        assert self.issuer is not None
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
