"""Submitted chains: parsed, checked and tied to an accepted root before logging.

Every refusal is a :class:`protocol.InvalidRequest` with ``field = "chain"``
and a stable ``reason`` detail (spec/stoq.md, "ct.add-chain"), so a client
can tell a garbage chain from an unknown root or an expired certificate.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from protocol import InvalidRequest
from protocol.ct_structs import POISON_OID, StructureError, issuer_key_hash, precert_tbs

MAX_CHAIN = 10
CACHE = 256
"""Issuer certificates kept parsed, and verified issuer links remembered."""
PRECERT_SIGNING_EKU = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.4")


def refuse(reason: str, message: str, index: int | None = None) -> InvalidRequest:
    details: dict[str, object] = {"field": "chain", "reason": reason}
    if index is not None:
        details["index"] = index
    return InvalidRequest(message, **details)


@dataclass(frozen=True, slots=True)
class CheckedChain:
    """A chain that passed every check."""

    leaf_der: bytes
    """The end-entity certificate (or precertificate) as submitted."""
    issuers: tuple[bytes, ...]
    """DER of the submitted issuers, then the accepted root if it was not submitted."""
    issuer_key_hash: bytes
    """SHA-256 of the direct issuer's SubjectPublicKeyInfo (precert entries)."""
    tbs: bytes
    """Precertificates: the TBSCertificate without the poison extension."""
    names: tuple[str, ...]
    """DNS names and IP addresses of the leaf (its subjectAltName, else its CN)."""
    spki_sha256: bytes


def leaf_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS names then IP addresses of the subjectAltName; the CN if there is none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return tuple(str(a.value).lower() for a in cns)
    except ValueError:
        return ()
    names: list[str] = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(dict.fromkeys(names))


def _is_poisoned(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_oid(POISON_OID)
    except x509.ExtensionNotFound:
        return False
    return True


class ChainValidator:
    """Checks chains against the accepted roots at the injected clock's time."""

    def __init__(self, roots: Sequence[bytes], clock: Callable[[], float]) -> None:
        self._clock = clock
        self.roots: list[bytes] = list(dict.fromkeys(roots))
        self._root_certs = [x509.load_der_x509_certificate(r) for r in self.roots]
        # Issuers repeat from one submission to the next: keep them parsed, and remember
        # which issuer-to-issuer links (not leaves) already verified.
        self._parsed: collections.OrderedDict[bytes, x509.Certificate] = \
            collections.OrderedDict()
        self._links: collections.OrderedDict[tuple[bytes, bytes], None] = \
            collections.OrderedDict()
        self._root_index: dict[bytes, int] = {}

    def _parse(self, der: bytes, i: int) -> x509.Certificate:
        if i == 0:
            return x509.load_der_x509_certificate(der)
        cert = self._parsed.get(der)
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
            self._parsed[der] = cert
            if len(self._parsed) > CACHE:
                self._parsed.popitem(last=False)
        return cert

    def check(self, chain: Sequence[bytes], *, precert: bool,
              at: float | None = None) -> CheckedChain:
        """Check ``chain`` (leaf first) for ``add-chain`` or, with ``precert``,
        ``add-pre-chain``, valid at time ``at`` (default: the clock's now; a block's
        time when a validator executes it, so every validator decides alike).

        :raises InvalidRequest: ``field = "chain"`` and a ``reason``.
        """
        if not chain:
            raise refuse("empty_chain", "chain is empty: it needs at least the certificate")
        if len(chain) > MAX_CHAIN:
            raise refuse("chain_too_long", f"chain has {len(chain)} certificates; at most "
                                           f"{MAX_CHAIN}")
        certs: list[x509.Certificate] = []
        for i, der in enumerate(chain):
            try:
                certs.append(self._parse(der, i))
            except ValueError as exc:
                raise refuse("bad_certificate", f"chain[{i}] is not a DER X.509 certificate: "
                                                f"{exc}", i) from None
        leaf = certs[0]
        poisoned = _is_poisoned(leaf)
        if precert and not poisoned:
            raise refuse("not_precertificate", "chain[0] has no poison extension: submit "
                                               "certificates with ct.add-chain", 0)
        if not precert and poisoned:
            raise refuse("precertificate", "chain[0] is a precertificate (poison extension): "
                                           "submit it with ct.add-pre-chain", 0)
        now = datetime.datetime.fromtimestamp(self._clock() if at is None else at,
                                              datetime.UTC)
        for i, cert in enumerate(certs):
            if cert.not_valid_after_utc < now:
                raise refuse("expired", f"chain[{i}] expired at "
                                        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}", i)
            if cert.not_valid_before_utc > now:
                raise refuse("not_yet_valid", f"chain[{i}] is not valid before "
                                              f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
                             i)
        for i in range(len(certs) - 1):
            link = (chain[i], chain[i + 1])
            if i and link in self._links:
                continue
            self._check_issued(certs[i], certs[i + 1], i)
            if i:
                self._links[link] = None
                if len(self._links) > CACHE:
                    self._links.popitem(last=False)
        if precert and len(certs) > 1:
            try:
                eku = certs[1].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
                if PRECERT_SIGNING_EKU in eku:
                    raise refuse("precert_signing_certificate",
                                 "precertificates issued by a Precertificate Signing "
                                 "Certificate are not accepted; sign with the final issuer", 1)
            except x509.ExtensionNotFound:
                pass
        issuers = list(chain[1:])
        last = certs[-1]
        if chain[-1] in self.roots:
            root = self._root_certs[self.roots.index(chain[-1])]
        else:
            found = self._root_of(last, cache=len(certs) > 1)
            if found is None:
                raise refuse("unknown_root", f"chain[{len(certs) - 1}] is not an accepted "
                                             "root and is not issued by one (see ct.get-roots)",
                             len(certs) - 1)
            issuers.append(self.roots[found])
            root = self._root_certs[found]
        # The leaf's direct issuer: the next certificate, else the root (which may be
        # the leaf itself).
        issuer = certs[1] if len(certs) > 1 else root
        tbs = b""
        if precert:
            try:
                tbs = precert_tbs(chain[0])
            except StructureError as exc:
                raise refuse("bad_certificate", f"chain[0]: {exc}", 0) from None
        spki = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        return CheckedChain(leaf_der=chain[0], issuers=tuple(issuers),
                            issuer_key_hash=issuer_key_hash(issuer), tbs=tbs,
                            names=leaf_names(leaf), spki_sha256=hashlib.sha256(spki).digest())

    def _check_issued(self, cert: x509.Certificate, issuer: x509.Certificate, i: int) -> None:
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = constraints.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise refuse("chain_broken", f"chain[{i + 1}] is not a CA certificate", i + 1)
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise refuse("chain_broken", f"chain[{i}] is not signed by chain[{i + 1}]",
                         i) from None

    def _root_of(self, cert: x509.Certificate, *, cache: bool = False) -> int | None:
        key = cert.tbs_certificate_bytes + cert.signature if cache else b""
        if cache and key in self._root_index:
            return self._root_index[key]
        for i, root in enumerate(self._root_certs):
            try:
                cert.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if cache:
                self._root_index[key] = i
                if len(self._root_index) > CACHE:
                    self._root_index.pop(next(iter(self._root_index)))
            return i
        return None

