"""A test CA outside TrustChain: a root and an intermediate that make chains and
precertificates for the CT log (``ct.add-chain`` with ``ct.extra_roots``)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DER = serialization.Encoding.DER


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


@dataclass
class CaForTests:
    """A root and an intermediate, for making chains the log accepts."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(DER)

    @property
    def der(self) -> bytes:
        return self.intermediate.public_bytes(DER)

    @property
    def signer(self) -> Any:
        ca = self

        class _Signer:
            def private_key(self) -> ec.EllipticCurvePrivateKey:
                return ca.key
        return _Signer()

    def leaf_builder(self, *names: str, not_before: float | None = None,
                     lifetime: float = 86400.0) -> x509.CertificateBuilder:
        now = not_before if not_before is not None else datetime.datetime.now(
            datetime.UTC).timestamp() - 60
        key = ec.generate_private_key(ec.SECP256R1())
        return (x509.CertificateBuilder().subject_name(_name(names[0]))
                .issuer_name(self.intermediate.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now)).not_valid_after(_utc(now + lifetime))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True))

    def leaf(self, *names: str, **kwargs: Any) -> bytes:
        return self.leaf_builder(*names, **kwargs).sign(self.key, hashes.SHA256()).public_bytes(DER)

    def precert(self, *names: str) -> tuple[bytes, x509.CertificateBuilder]:
        builder = self.leaf_builder(*names)
        pre = builder.add_extension(x509.PrecertPoison(), critical=True).sign(
            self.key, hashes.SHA256())
        return pre.public_bytes(DER), builder


def make_ca(cn: str = "Test") -> CaForTests:
    now = datetime.datetime.now(datetime.UTC).timestamp()
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(_name(f"{cn} Root"))
            .issuer_name(_name(f"{cn} Root")).public_key(root_key.public_key())
            .serial_number(1).not_valid_before(_utc(now - 3600))
            .not_valid_after(_utc(now + 86400 * 30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    inter = (x509.CertificateBuilder().subject_name(_name(f"{cn} Issuing"))
             .issuer_name(root.subject).public_key(key.public_key())
             .serial_number(2).not_valid_before(_utc(now - 3600))
             .not_valid_after(_utc(now + 86400 * 30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(root_key, hashes.SHA256()))
    return CaForTests(root_key=root_key, root=root, key=key, intermediate=inter)
