"""The server's own QUIC/TLS credential in the data directory.

Development mode creates a self-signed ECDSA P-256 certificate at first
start; the certificate authority later replaces these files with a CA-issued
one, and the server picks up the change without a restart.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import write_atomic

SELF_SIGNED_LIFETIME = datetime.timedelta(days=30)


@dataclass(frozen=True)
class TlsCredential:
    certfile: Path
    keyfile: Path

    def exists(self) -> bool:
        return self.certfile.is_file() and self.keyfile.is_file()

    def read_chain(self) -> list[x509.Certificate]:
        """The certificate chain on disk (leaf first); empty if missing or unreadable."""
        try:
            return x509.load_pem_x509_certificates(self.certfile.read_bytes())
        except (OSError, ValueError):
            return []

    def install(self, key_pem: bytes, chain_pem: bytes) -> None:
        """Replace the credential: the new key (0600) first, then the chain that uses it.

        A reader that sees the new chain finds its key already in place.
        """
        write_atomic(self.keyfile, key_pem, mode=0o600)
        write_atomic(self.certfile, chain_pem)


def credential_paths(data_dir: str | Path) -> TlsCredential:
    """Where the server certificate and key live inside ``data_dir``."""
    tls = Path(data_dir) / "tls"
    return TlsCredential(certfile=tls / "server.pem", keyfile=tls / "server.key")


def create_self_signed(credential: TlsCredential, *, names: list[str],
                       addresses: list[str], now: datetime.datetime | None = None) -> None:
    """Write a new self-signed P-256 certificate for ``names`` and ``addresses``."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names
                                            else "trustchain-node")])
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.IPv6Address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SELF_SIGNED_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(credential.keyfile, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    write_atomic(credential.certfile, cert.public_bytes(serialization.Encoding.PEM))
