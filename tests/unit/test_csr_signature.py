"""The CSR check verifies the signature with the key it already loaded
(``handlers.ca._policy.signature_verifies``): the same verdict as cryptography's
``csr.is_signature_valid`` (which loads the key again), tried over valid, forged,
wrong-algorithm and flipped-bit CSRs of every key type the CA accepts."""

from __future__ import annotations

import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from handlers.ca import NamingPolicy, check_request
from handlers.ca._policy import _check_request, check_key, load_csr, signature_verifies
from protocol import InvalidRequest

POLICY = NamingPolicy(domains=("trust",))

# AlgorithmIdentifier DER of the signature algorithms tried (RFC 5758, 8410, 4055)
ECDSA_SHA224 = bytes.fromhex("300a06082a8648ce3d040301")
ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
ECDSA_SHA384 = bytes.fromhex("300a06082a8648ce3d040303")
ECDSA_SHA512 = bytes.fromhex("300a06082a8648ce3d040304")
ECDSA_SHA3_224 = bytes.fromhex("300b0609608648016503040309")
ECDSA_SHA3_256 = bytes.fromhex("300b060960864801650304030a")
ECDSA_SHA3_384 = bytes.fromhex("300b060960864801650304030b")
ECDSA_SHA3_512 = bytes.fromhex("300b060960864801650304030c")
ECDSA_SHA1 = bytes.fromhex("300906072a8648ce3d0401")
ED25519 = bytes.fromhex("300506032b6570")
ED448 = bytes.fromhex("300506032b6571")
RSA_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")
ED25519_WITH_NULL = bytes.fromhex("300706032b65700500")
ECDSA_SHA256_WITH_NULL = bytes.fromhex("300c06082a8648ce3d0403020500")
HASH_OF = {ECDSA_SHA224: hashes.SHA224(), ECDSA_SHA256: hashes.SHA256(),
           ECDSA_SHA384: hashes.SHA384(), ECDSA_SHA512: hashes.SHA512(),
           ECDSA_SHA3_224: hashes.SHA3_224(), ECDSA_SHA3_256: hashes.SHA3_256(),
           ECDSA_SHA3_384: hashes.SHA3_384(), ECDSA_SHA3_512: hashes.SHA3_512(),
           ECDSA_SHA256_WITH_NULL: hashes.SHA256()}

Key = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def _csr_der(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """A CertificationRequest: its info, a signature algorithm and a signature as given."""
    return _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))


def _sign(key: Key, data: bytes, hash_algorithm: hashes.HashAlgorithm | None) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    assert hash_algorithm is not None
    return key.sign(data, ec.ECDSA(hash_algorithm))


def _tbs(key: Key, name: str) -> bytes:
    """The CertificationRequestInfo of a CSR for ``name`` with ``key``'s public key."""
    hash_algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
           .sign(key, hash_algorithm))
    return csr.tbs_certrequest_bytes


def _keys() -> dict[str, Key]:
    return {"P-256": ec.generate_private_key(ec.SECP256R1()),
            "P-384": ec.generate_private_key(ec.SECP384R1()),
            "Ed25519": ed25519.Ed25519PrivateKey.generate()}


def _cases() -> list[tuple[str, bytes]]:
    """(what, CSR DER): valid, forged and wrong-algorithm CSRs of each accepted key type."""
    keys = _keys()
    others = _keys()
    cases: list[tuple[str, bytes]] = []
    for kind, key in keys.items():
        tbs = _tbs(key, f"{kind.lower()}.example.trust")
        other = others[kind]
        if isinstance(key, ed25519.Ed25519PrivateKey):
            good = _sign(key, tbs, None)
            cases += [
                ("valid", _csr_der(tbs, ED25519, good)),
                ("forged: another key's signature",
                 _csr_der(tbs, ED25519, _sign(other, tbs, None))),
                ("forged: signature over other bytes",
                 _csr_der(tbs, ED25519, _sign(key, tbs + b"\x00", None))),
                ("forged: zero signature", _csr_der(tbs, ED25519, bytes(64))),
                ("forged: short signature", _csr_der(tbs, ED25519, good[:63])),
                ("wrong algorithm: ECDSA", _csr_der(tbs, ECDSA_SHA256, good)),
                ("wrong algorithm: Ed448", _csr_der(tbs, ED448, good)),
                ("wrong algorithm: RSA", _csr_der(tbs, RSA_SHA256, good)),
                ("wrong algorithm: Ed25519 with parameters",
                 _csr_der(tbs, ED25519_WITH_NULL, good)),
            ]
            continue
        for algorithm, hash_algorithm in HASH_OF.items():
            good = _sign(key, tbs, hash_algorithm)
            cases += [
                (f"valid ({hash_algorithm.name})", _csr_der(tbs, algorithm, good)),
                (f"forged: another key ({hash_algorithm.name})",
                 _csr_der(tbs, algorithm, _sign(other, tbs, hash_algorithm))),
            ]
        good = _sign(key, tbs, hashes.SHA256())
        cases += [
            ("forged: signature over other bytes",
             _csr_der(tbs, ECDSA_SHA256, _sign(key, tbs + b"\x00", hashes.SHA256()))),
            ("forged: not a DER signature", _csr_der(tbs, ECDSA_SHA256, b"\x30\x00")),
            ("forged: empty signature", _csr_der(tbs, ECDSA_SHA256, b"")),
            ("wrong algorithm: the hash differs from the signer's",
             _csr_der(tbs, ECDSA_SHA384, good)),
            ("wrong algorithm: ecdsa-with-SHA1, which cryptography does not verify",
             _csr_der(tbs, ECDSA_SHA1, _sign(key, tbs, hashes.SHA1()))),
            ("wrong algorithm: Ed25519", _csr_der(tbs, ED25519, good)),
            ("wrong algorithm: Ed448", _csr_der(tbs, ED448, good)),
            ("wrong algorithm: RSA", _csr_der(tbs, RSA_SHA256, good)),
        ]
    return cases


def _verdicts(der: bytes) -> tuple[bool, bool] | None:
    """(new, old) verdicts on the signature of ``der``; None if the CSR or its key is
    refused before the signature is looked at (both paths share that part)."""
    try:
        csr = load_csr(der)
        key = check_key(csr)
    except InvalidRequest:
        return None
    return signature_verifies(csr, key), csr.is_signature_valid


def test_same_verdicts_as_is_signature_valid() -> None:
    cases = _cases()
    compared: set[str] = set()
    for what, der in cases:
        verdicts = _verdicts(der)
        if verdicts is None:  # cryptography refuses to read it: so do both paths
            continue
        new, old = verdicts
        assert new == old, f"{what}: signature_verifies says {new}, is_signature_valid {old}"
        assert new == what.startswith("valid"), what
        compared.add(what.split(":")[0].split(" (")[0])
    assert compared == {"valid", "forged", "wrong algorithm"}


def test_same_verdicts_on_flipped_bits() -> None:
    rng = random.Random(20261207)
    compared = accepted = 0
    for what, der in _cases():
        if not what.startswith("valid"):
            continue
        for _ in range(60):
            bit = rng.randrange(len(der) * 8)
            flipped = bytearray(der)
            flipped[bit // 8] ^= 1 << (bit % 8)
            verdicts = _verdicts(bytes(flipped))
            if verdicts is None:
                continue
            new, old = verdicts
            assert new == old, f"{what}, bit {bit} flipped: {new} against {old}"
            compared += 1
            accepted += new
    assert compared > 200  # most flips leave a readable CSR
    assert accepted < compared  # and the flips refused are many


@pytest.mark.parametrize("kind", ["P-256", "P-384", "Ed25519"])
def test_check_request_accepts_valid_and_refuses_forged(kind: str) -> None:
    key = _keys()[kind]
    other = _keys()[kind]
    name = f"forged-{kind.lower()}.example.trust"
    tbs = _tbs(key, name)
    algorithm, hash_algorithm = ((ED25519, None) if isinstance(key, ed25519.Ed25519PrivateKey)
                                 else (ECDSA_SHA256, hashes.SHA256()))
    checked = _check_request.__wrapped__(_csr_der(tbs, algorithm, _sign(key, tbs, hash_algorithm)),
                                        POLICY)
    assert checked.dns_names == (name,)
    assert checked.spki_der == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    forged = _csr_der(tbs, algorithm, _sign(other, tbs, hash_algorithm))
    with pytest.raises(InvalidRequest, match="signature does not verify with its own key"):
        check_request(forged, POLICY)
