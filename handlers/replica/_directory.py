"""Who signs what in the cluster: each validator's announced keys, as the state holds them.

A validator announces its issuing intermediates (signed by the cluster root),
its CT log key per shard, its DNSSEC keys and its administrator certificates
with a ``keys`` decision; every validator keeps the committed announcements
(replicated state) and reads them here, parsed: which validator an
intermediate belongs to, the log key an SCT must verify with, the DNSKEY set
of the cluster's zones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.decisions import ValidatorKeys


@dataclass(frozen=True)
class Intermediate:
    """An issuing intermediate of a validator."""

    validator: str
    der: bytes
    certificate: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.der).hexdigest()


@dataclass(frozen=True)
class Announced:
    """One validator's announced keys, parsed."""

    validator: str
    keys: ValidatorKeys
    intermediates: tuple[Intermediate, ...]
    log_keys: dict[int, bytes]
    """shard -> DER SubjectPublicKeyInfo of the validator's CT log key."""

    @property
    def active(self) -> Intermediate:
        """The intermediate it issues with now (the last one it announced)."""
        return self.intermediates[-1]


def parse_announced(validator: str, keys: ValidatorKeys) -> Announced:
    """The parsed form of ``keys``.

    :raises ValueError: a certificate or key does not parse.
    """
    intermediates = tuple(Intermediate(validator, der, x509.load_der_x509_certificate(der))
                          for der in keys.intermediates)
    for _, spki in keys.ct_logs:
        serialization.load_der_public_key(spki)
    return Announced(validator=validator, keys=keys, intermediates=intermediates,
                     log_keys=dict(keys.ct_logs))


class ValidatorDirectory:
    """Every validator's announced keys, by validator and by intermediate fingerprint."""

    def __init__(self, announced: Iterable[Announced] = ()) -> None:
        self._by_validator: dict[str, Announced] = {}
        self._by_fingerprint: dict[str, Intermediate] = {}
        self._by_log_id: dict[bytes, tuple[str, int, bytes]] = {}
        """RFC 6962 log ID (SHA-256 of the SPKI) -> (validator, shard, SPKI): every SCT
        a validator checks looks its log up, and keys change only when announced."""
        for entry in announced:
            self.update(entry)

    def update(self, announced: Announced) -> None:
        """Replace what ``announced.validator`` announced before."""
        old = self._by_validator.get(announced.validator)
        if old is not None:
            for intermediate in old.intermediates:
                self._by_fingerprint.pop(intermediate.fingerprint, None)
        self._by_validator[announced.validator] = announced
        for intermediate in announced.intermediates:
            self._by_fingerprint[intermediate.fingerprint] = intermediate
        self._by_log_id = {}
        for entry in self._by_validator.values():  # the first validator to announce a key
            for shard, spki in entry.log_keys.items():
                self._by_log_id.setdefault(hashlib.sha256(spki).digest(),
                                           (entry.validator, shard, spki))

    def of(self, validator: str) -> Announced | None:
        return self._by_validator.get(validator)

    def intermediate(self, fingerprint: str) -> Intermediate | None:
        """The intermediate whose DER has SHA-256 ``fingerprint`` (hex), any validator's."""
        return self._by_fingerprint.get(fingerprint)

    def intermediates(self) -> list[Intermediate]:
        return list(self._by_fingerprint.values())

    def issuer_of(self, certificate: x509.Certificate) -> Intermediate | None:
        """The validator intermediate that signed ``certificate``, if one did."""
        for intermediate in self._by_fingerprint.values():
            if intermediate.certificate.subject != certificate.issuer:
                continue
            try:
                certificate.verify_directly_issued_by(intermediate.certificate)
            except Exception:
                continue
            return intermediate
        return None

    def log_key(self, log_id: bytes) -> tuple[str, int, bytes] | None:
        """(validator, shard, SPKI) of the CT log with this log ID."""
        return self._by_log_id.get(log_id)

    def dnskeys(self) -> list[bytes]:
        """Every validator's DNSKEY rdatas (wire form), sorted: the zones' DNSKEY set."""
        return sorted({k for a in self._by_validator.values() for k in a.keys.dnskeys})

    def admins(self) -> dict[str, str]:
        """SHA-256 (hex) of every announced administrator certificate -> its validator."""
        return {hashlib.sha256(der).hexdigest(): a.validator
                for a in self._by_validator.values() for der in a.keys.admins}

    def validators(self) -> list[str]:
        return sorted(self._by_validator)
