"""A leaf written directly (``_x509.leaf_tbs``, ``handlers/ca/_leaf_der.py``) is the leaf
``cryptography``'s builder makes, byte for byte: every validator compares a
precertificate's TBS with the one it writes, so one octet of difference would refuse
every issuance of a cluster whose validators run different code.

The builder is the reference: :func:`builder_tbs` is how the TBS was made before (the
builder, a throwaway signature), :func:`builder_der` how a leaf was signed.
"""

from __future__ import annotations

import datetime
import ipaddress
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from handlers.ca import _leaf_der, _x509
from handlers.ca._policy import CheckedRequest
from handlers.ca._profile import (
    ProfileError,
    assemble_certificate,
    check_precertificate,
    expected_tbs,
)
from protocol.ct_structs import (
    MAX_SCT_LIST,
    SignedCertificateTimestamp,
    StructureError,
    certificate_of,
    certificate_tbs,
    digitally_signed,
    encode_sct_list,
    leaf_index_extensions,
    parse_sct_list,
)
from store import KeyStore, open_keystore

from ..softhsm import SoftHsmToken

DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM
Extensions = Sequence[x509.Extension[x509.ExtensionType]]

NOW = int(datetime.datetime.now(datetime.UTC).timestamp())
Y1950 = int(datetime.datetime(1950, 1, 1, tzinfo=datetime.UTC).timestamp())
Y2050 = int(datetime.datetime(2050, 1, 1, tzinfo=datetime.UTC).timestamp())
"""The first second a Time is a GeneralizedTime (RFC 5280 §4.1.2.5)."""
HIERARCHY_END = int(datetime.datetime(2060, 1, 1, tzinfo=datetime.UTC).timestamp())
DOMAINS = ("trust", "hypermesh")
CASES = 160
"""Generated leaves per issuer kind."""


@dataclass(frozen=True)
class Hierarchy:
    root: x509.Certificate
    issuer: x509.Certificate
    key: Any
    """The issuer's private key (software or a token's)."""


def make_hierarchy(issuer_key: Any) -> Hierarchy:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _x509.build_root(root_key, root_key.public_key(), ca_id="leafder", domains=DOMAINS,
                            not_before=NOW - 3600, not_after=HIERARCHY_END)
    issuer = _x509.build_intermediate(root_key, root, issuer_key.public_key(), ca_id="leafder",
                                      number=1, domains=DOMAINS, not_before=NOW - 3600,
                                      not_after=HIERARCHY_END)
    return Hierarchy(root=root, issuer=issuer, key=issuer_key)


@pytest.fixture(scope="module", params=["ecdsa-p256", "ed25519"])
def software(request: pytest.FixtureRequest) -> Hierarchy:
    """An issuing intermediate with a software key of each kind a keystore holds."""
    if request.param == "ed25519":
        return make_hierarchy(ed25519.Ed25519PrivateKey.generate())
    return make_hierarchy(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def token_store(softhsm_token: SoftHsmToken, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[KeyStore]:
    store = open_keystore(provider="softhsm2", data_dir=tmp_path_factory.mktemp("leafder"),
                          token_label=softhsm_token.token_label, pin=softhsm_token.pin)
    yield store
    store.close()


def request_of(key: Any, dns_names: Sequence[str] = (),
               ips: Sequence[ipaddress.IPv6Address] = ()) -> CheckedRequest:
    spki = key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return CheckedRequest(public_key=key.public_key(), spki_der=spki, spki_sha256="",
                          dns_names=tuple(dns_names), ip_addresses=tuple(ips))


def throwaway_key(issuer: x509.Certificate) -> Any:
    if isinstance(issuer.public_key(), ed25519.Ed25519PublicKey):
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def builder(issuer: x509.Certificate, request: CheckedRequest, serial: int,
            not_before: float, not_after: float,
            extensions: Extensions) -> x509.CertificateBuilder:
    made = _x509.leaf_builder(issuer, request, serial=serial, not_before=not_before,
                              not_after=not_after)
    for extension in extensions:
        made = made.add_extension(extension.value, critical=extension.critical)
    return made


def builder_tbs(issuer: x509.Certificate, request: CheckedRequest, serial: int,
                not_before: float, not_after: float, extensions: Extensions) -> bytes:
    """The TBS as it was made before: the builder and a throwaway signature."""
    return _x509.sign(builder(issuer, request, serial, not_before, not_after, extensions),
                      throwaway_key(issuer)).tbs_certificate_bytes


def builder_der(issuer: x509.Certificate, request: CheckedRequest, serial: int,
                not_before: float, not_after: float, extensions: Extensions,
                key: Any) -> bytes:
    """The certificate as it was signed before: ``CertificateBuilder.sign``."""
    return _x509.sign(builder(issuer, request, serial, not_before, not_after, extensions),
                      key).public_bytes(DER)


def ours_tbs(issuer: x509.Certificate, request: CheckedRequest, serial: int,
             not_before: float, not_after: float, extensions: Extensions) -> bytes:
    return _x509.leaf_tbs(issuer, request, serial=serial, not_before=not_before,
                          not_after=not_after, extensions=extensions,
                          algorithm=_x509.issuer_signature_algorithm(issuer))


def check_signed(hierarchy: Hierarchy, request: CheckedRequest, serial: int,
                 not_before: float, not_after: float, extensions: Extensions) -> bytes:
    """Sign with :func:`_x509.sign_leaf` and hold the result to the builder's."""
    der = _x509.sign_leaf(hierarchy.issuer, request, serial=serial, not_before=not_before,
                          not_after=not_after, extensions=extensions,
                          private_key=hierarchy.key)
    cert = x509.load_der_x509_certificate(der)
    assert cert.public_bytes(DER) == der
    cert.verify_directly_issued_by(hierarchy.issuer)
    assert cert.tbs_certificate_bytes == builder_tbs(hierarchy.issuer, request, serial,
                                                     not_before, not_after, extensions)
    if isinstance(hierarchy.key, ed25519.Ed25519PrivateKey):  # deterministic signatures
        assert der == builder_der(hierarchy.issuer, request, serial, not_before, not_after,
                                  extensions, hierarchy.key)
    return der


# --- generated leaves ------------------------------------------------------------------------

SUBJECT_KEYS = [ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1()),
                ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()]
SERIAL_EDGES = [1, 0x7F, 0x80, 0xFF, 0x100, 1 << 127, (1 << 128) - 1, (1 << 159) - 1]


def random_name(rng: random.Random) -> str:
    labels = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                      for _ in range(rng.randint(1, 20))) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.15:  # longer than ub-common-name: not the CN
        labels.insert(0, "x" * 63)
    if rng.random() < 0.1:
        labels.insert(0, "*")
    return ".".join([*labels, rng.choice(DOMAINS)])


def random_ip(rng: random.Random) -> ipaddress.IPv6Address:
    if rng.random() < 0.3:
        return ipaddress.IPv6Address(f"2001:db8::{rng.randint(1, 0xFFFF):x}")
    return ipaddress.IPv6Address(rng.getrandbits(128) | (1 << 125))


def random_serial(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.5:
        return rng.getrandbits(127) | (1 << 127)  # what the CA makes (_x509.new_serial)
    if roll < 0.75:
        return rng.choice(SERIAL_EDGES)
    return rng.getrandbits(rng.randint(1, 159)) | 1


def random_validity(rng: random.Random) -> tuple[int, int]:
    """Mostly around the UTCTime/GeneralizedTime switch (2049/2050) and 1950."""
    roll = rng.random()
    if roll < 0.3:
        start = NOW - 300
        return start, start + 86400
    if roll < 0.6:
        return Y2050 - rng.randint(1, 3 * 86400), Y2050 + rng.randint(-2, 2)
    if roll < 0.8:
        return Y1950 + rng.randint(0, 2), Y2050 - 1
    start = rng.randint(Y1950, HIERARCHY_END)
    return start, rng.randint(start, HIERARCHY_END)


def random_extensions(rng: random.Random) -> list[x509.Extension[x509.ExtensionType]]:
    roll = rng.random()
    if roll < 0.35:
        return [_x509.precertificate_poison()]
    if roll < 0.65:
        sct = secrets.token_bytes(rng.randint(40, 300))
        return [_x509.sct_list([sct] * rng.randint(1, 3))]
    if roll < 0.8:  # the poison as the signing worker gets it
        oid = ExtensionOID.PRECERT_POISON
        return [x509.Extension(oid, True, x509.UnrecognizedExtension(oid, b"\x05\x00"))]
    return []


def random_request(rng: random.Random) -> CheckedRequest:
    while True:
        dns = list(dict.fromkeys(random_name(rng) for _ in range(rng.choice([0, 1, 1, 2, 5]))))
        ips = list(dict.fromkeys(random_ip(rng) for _ in range(rng.choice([0, 0, 1, 3]))))
        if dns or ips:
            return request_of(rng.choice(SUBJECT_KEYS), dns, ips)


def test_generated_leaves_are_the_builders(software: Hierarchy) -> None:
    rng = random.Random(f"leaf-der-{software.issuer.signature_algorithm_oid.dotted_string}")
    subjects: set[str] = set()
    for _ in range(CASES):
        request = random_request(rng)
        serial = random_serial(rng)
        not_before, not_after = random_validity(rng)
        extensions = random_extensions(rng)
        expected = builder_tbs(software.issuer, request, serial, not_before, not_after,
                               extensions)
        assert expected_tbs(request, software.issuer, serial=serial, not_before=not_before,
                            not_after=not_after, extensions=extensions) == expected
        der = check_signed(software, request, serial, not_before, not_after, extensions)
        subjects.add(x509.load_der_x509_certificate(der).subject.rfc4514_string()[:3])
    assert subjects == {"CN=", "O=l"}  # both kinds of subject were made


@pytest.mark.parametrize("not_before, not_after", [
    (Y2050 - 1, Y2050 - 1), (Y2050 - 1, Y2050), (Y2050, Y2050 + 1), (Y1950, Y1950),
    (NOW + 0.4, NOW + 86400.9999996),  # fractions: dropped, after rounding to microseconds
    (NOW - 0.0000004, NOW + 1e-7), (float(NOW), NOW + 59.5)])
def test_validity_edges(software: Hierarchy, not_before: float, not_after: float) -> None:
    request = request_of(SUBJECT_KEYS[0], ["edge.trust"])
    poison = [_x509.precertificate_poison()]
    assert ours_tbs(software.issuer, request, 1 << 127, not_before, not_after, poison) == \
        builder_tbs(software.issuer, request, 1 << 127, not_before, not_after, poison)
    check_signed(software, request, 1 << 127, not_before, not_after, poison)


def test_many_names_need_long_lengths(software: Hierarchy) -> None:
    """100 names (the policy's limit): SAN and TBS lengths of two octets."""
    names = [f"host-{i:03d}-{'a' * 50}.hypermesh" for i in range(90)]
    ips = [ipaddress.IPv6Address(f"2001:db8::{i:x}") for i in range(1, 11)]
    request = request_of(SUBJECT_KEYS[2], names, ips)
    der = check_signed(software, request, _x509.new_serial(), NOW, NOW + 86400,
                       [_x509.precertificate_poison()])
    assert len(der) > 5000


def test_issuer_without_a_common_name_subject(software: Hierarchy) -> None:
    """A leaf of addresses only has ``O=`` its CA's organization, from the issuer."""
    request = request_of(SUBJECT_KEYS[3], ips=[ipaddress.IPv6Address("2001:db8::53")])
    der = check_signed(software, request, _x509.new_serial(), NOW, NOW + 86400, [])
    assert x509.load_der_x509_certificate(der).subject.rfc4514_string() == "O=leafder"


# --- what the builder refuses, refused alike ---------------------------------------------------

POISON = _x509.precertificate_poison()
SAN_AGAIN = x509.Extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False,
                           x509.SubjectAlternativeName([x509.DNSName("b.trust")]))


@pytest.mark.parametrize("serial, not_before, not_after, extensions", [
    (0, NOW, NOW + 1, []), (-5, NOW, NOW + 1, []), (1 << 159, NOW, NOW + 1, []),
    (1, NOW, NOW - 1, []), (1, Y1950 - 1, NOW, []), (1, Y1950 - 10, Y1950 - 1, []),
    (1, NOW, NOW + 1, [POISON, POISON]), (1, NOW, NOW + 1, [SAN_AGAIN])])
def test_refused_as_the_builder_refuses(software: Hierarchy, serial: int, not_before: int,
                                        not_after: int, extensions: Extensions) -> None:
    request = request_of(SUBJECT_KEYS[0], ["a.trust"])
    with pytest.raises(ValueError) as reference:
        builder_tbs(software.issuer, request, serial, not_before, not_after, extensions)
    with pytest.raises(ValueError) as ours:
        ours_tbs(software.issuer, request, serial, not_before, not_after, extensions)
    assert str(ours.value) == str(reference.value)
    with pytest.raises(ValueError):
        _x509.sign_leaf(software.issuer, request, serial=serial, not_before=not_before,
                        not_after=not_after, extensions=extensions, private_key=software.key)


def test_a_key_of_another_kind_is_refused(software: Hierarchy) -> None:
    request = request_of(SUBJECT_KEYS[0], ["a.trust"])
    with pytest.raises(TypeError, match="ECDSA or Ed25519 keys only"):
        _x509.sign_leaf(software.issuer, request, serial=1, not_before=NOW,
                        not_after=NOW + 1, extensions=[],
                        private_key=rsa.generate_private_key(65537, 1024))


def test_der_pieces() -> None:
    assert _leaf_der.integer(0) == b"\x02\x01\x00"
    assert _leaf_der.integer(0x80) == b"\x02\x02\x00\x80"
    assert _leaf_der.integer(0x7FFF) == b"\x02\x02\x7f\xff"
    assert _leaf_der.tlv(0x04, b"x" * 200)[:3] == b"\x04\x81\xc8"
    assert _leaf_der.tlv(0x04, b"x" * 300)[:4] == b"\x04\x82\x01\x2c"
    assert _leaf_der.object_identifier("1.3.6.1.4.1.11129.2.4.3") == \
        bytes.fromhex("060a2b06010401d679020403")
    assert _leaf_der.object_identifier("2.999.3") == bytes.fromhex("0603883703")
    with pytest.raises(ValueError):
        _leaf_der.object_identifier("1.40")
    moment = datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
    assert _leaf_der.time(moment) == b"\x17\x0d491231235959Z"
    assert _leaf_der.time(moment + datetime.timedelta(seconds=1)) == \
        b"\x18\x0f20500101000000Z"


# --- keys in a PKCS#11 token (SoftHSM2) ---------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["ecdsa-p256-sha256", "ed25519"])
def test_token_keys_sign_the_builders_leaf(token_store: KeyStore, algorithm: str) -> None:
    signer = token_store.create(f"leafder-{secrets.token_hex(4)}", algorithm)  # type: ignore[arg-type]
    hierarchy = make_hierarchy(signer.private_key())
    rng = random.Random(f"token-{algorithm}")
    for _ in range(8):
        request = random_request(rng)
        not_before, not_after = random_validity(rng)
        check_signed(hierarchy, request, random_serial(rng), not_before, not_after,
                     random_extensions(rng))


# --- openssl and pkilint read a signed leaf ----------------------------------------------------

def test_openssl_and_pkilint_read_a_signed_leaf(software: Hierarchy, tmp_path: Path) -> None:
    request = request_of(SUBJECT_KEYS[0], ["www.trust", "api.hypermesh"],
                         [ipaddress.IPv6Address("2001:db8::7")])
    paths = {}
    for name, cert_der in [
            ("root", software.root.public_bytes(DER)),
            ("issuer", software.issuer.public_bytes(DER)),
            ("precert", _x509.sign_leaf(software.issuer, request, serial=_x509.new_serial(),
                                        not_before=NOW - 300, not_after=NOW + 86400,
                                        extensions=[POISON], private_key=software.key)),
            ("leaf", _x509.sign_leaf(software.issuer, request, serial=_x509.new_serial(),
                                     not_before=NOW - 300, not_after=NOW + 86400,
                                     extensions=[], private_key=software.key))]:
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(x509.load_der_x509_certificate(cert_der).public_bytes(PEM))
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(paths["precert"])],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    algorithm = "ED25519" if isinstance(software.key, ed25519.Ed25519PrivateKey) else \
        "ecdsa-with-SHA256"
    for expected in ["Version: 3 (0x2)", f"Signature Algorithm: {algorithm}",
                     "Subject: CN = www.trust", "Subject: CN = www.trust",
                     "DNS:www.trust, DNS:api.hypermesh, IP Address:2001:DB8:0:0:0:0:0:7",
                     "CT Precertificate Poison: critical", "CA:FALSE",
                     "Digital Signature", "TLS Web Server Authentication"]:
        assert expected in text, text
    verified = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile",
                               str(paths["root"]), "-untrusted", str(paths["issuer"]),
                               str(paths["leaf"])],
                              capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    tool = shutil.which("lint_pkix_cert")
    assert tool is not None, "pkilint is a test dependency"
    linted = subprocess.run([tool, "lint", "-s", "WARNING", str(paths["leaf"])],
                            capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_signed_with_a_hash_the_builder_uses() -> None:
    """The ECDSA leaf's signature is over SHA-256, whatever the issuer's curve (what
    ``_x509.hash_for`` gives the builder)."""
    key = ec.generate_private_key(ec.SECP384R1())
    hierarchy = make_hierarchy(key)
    request = request_of(SUBJECT_KEYS[1], ["p384.trust"])
    der = check_signed(hierarchy, request, 5, NOW, NOW + 60, [])
    assert x509.load_der_x509_certificate(der).signature_hash_algorithm == hashes.SHA256()


def test_a_precertificate_from_an_intermediate_expired_at_its_decision_is_refused() -> None:
    """An old intermediate that expired before the decision (beyond the back-dating) is a
    ProfileError, as any other mismatch, so the caller tries the next intermediate."""
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    root = _x509.build_root(root_key, root_key.public_key(), ca_id="leafder", domains=DOMAINS,
                            not_before=NOW - 7200, not_after=HIERARCHY_END)
    expired = _x509.build_intermediate(root_key, root, key.public_key(), ca_id="leafder",
                                       number=1, domains=DOMAINS, not_before=NOW - 7200,
                                       not_after=NOW - 3600)
    request = request_of(ec.generate_private_key(ec.SECP256R1()), ["old.trust"])
    precert = _x509.sign_leaf(expired, request, serial=(1 << 127) | 5, not_before=NOW - 7000,
                              not_after=NOW - 3600, extensions=[_x509.precertificate_poison()],
                              private_key=key)
    with pytest.raises(ProfileError, match="had expired"):
        check_precertificate(precert, request=request, issuer=expired, at_ms=NOW * 1000,
                             lifetime=86400, backdate=300)


def test_issued_by_accepts_what_the_issuer_signed_and_nothing_else(software: Hierarchy
                                                                   ) -> None:
    """``_x509.issued_by`` (a validator's check of a leaf's signature, with the issuer's
    key kept) agrees with ``verify_directly_issued_by`` and also holds the leaf to the
    signature algorithm of a TrustChain leaf."""
    request = request_of(SUBJECT_KEYS[0], ["signed.trust"])
    der = check_signed(software, request, (1 << 127) | 7, NOW, NOW + 60, [])
    leaf = x509.load_der_x509_certificate(der)
    assert _x509.issued_by(leaf, software.issuer)
    other = make_hierarchy(ec.generate_private_key(ec.SECP256R1())
                           if isinstance(software.key, ec.EllipticCurvePrivateKey)
                           else ed25519.Ed25519PrivateKey.generate())
    forged = x509.load_der_x509_certificate(check_signed(
        other, request, (1 << 127) | 7, NOW, NOW + 60, []))
    assert not _x509.issued_by(forged, software.issuer)
    with pytest.raises(Exception):  # noqa: B017 (cryptography's own error types)
        forged.verify_directly_issued_by(software.issuer)
    # one flipped bit of the signature
    tampered = bytearray(der)
    tampered[-3] ^= 1
    assert not _x509.issued_by(x509.load_der_x509_certificate(bytes(tampered)),
                               software.issuer)
    if isinstance(software.key, ec.EllipticCurvePrivateKey):
        # the issuer's own key, but over SHA-384: a signature a TrustChain leaf never has
        sha384 = builder(software.issuer, request, (1 << 127) | 7, NOW, NOW + 60, []).sign(
            software.key, hashes.SHA384())
        sha384.verify_directly_issued_by(software.issuer)
        assert not _x509.issued_by(sha384, software.issuer)


# --- the final certificate, assembled from the precertificate ----------------------------------

def sct_list_of(rng: random.Random, count: int) -> bytes:
    """A TLS-encoded SCT list of ``count`` SCTs, well formed (the signatures are not
    checked here: only the bytes matter)."""
    scts = [SignedCertificateTimestamp(
        log_id=rng.randbytes(32), timestamp=rng.getrandbits(48),
        extensions=leaf_index_extensions(rng.getrandbits(40)),
        signature=digitally_signed(rng.randbytes(rng.randint(70, 72)))).encode()
        for _ in range(count)]
    return encode_sct_list(scts)


def test_the_assembled_certificate_is_the_one_the_ca_signed(software: Hierarchy) -> None:
    """What every validator assembles from the committed precertificate, the SCT list and
    the signature is byte for byte the certificate the CA signed before (``sign_leaf``
    with the SCT list extension), and its TBS is what the entry signs now."""
    rng = random.Random("assembly")
    for count in (1, 1, 2, 3):
        request = random_request(rng)
        serial = random_serial(rng)
        not_before, not_after = random_validity(rng)
        sct_list = sct_list_of(rng, count)
        precert = _x509.sign_leaf(software.issuer, request, serial=serial,
                                  not_before=not_before, not_after=not_after,
                                  extensions=[POISON], private_key=software.key)
        before = _x509.sign_leaf(software.issuer, request, serial=serial,
                                 not_before=not_before, not_after=not_after,
                                 extensions=[_x509.sct_list(parse_sct_list(sct_list))],
                                 private_key=software.key)
        signed = x509.load_der_x509_certificate(before)
        assert certificate_tbs(precert, sct_list) == signed.tbs_certificate_bytes
        assert certificate_of(precert, sct_list, signed.signature) == before
        assembled = assemble_certificate(precertificate=precert, sct_list=sct_list,
                                         signature=signed.signature, issuer=software.issuer)
        assert assembled == before
        # the entry's signature of the shared TBS makes a certificate that verifies
        signature = _leaf_der.signature(certificate_tbs(precert, sct_list), software.key)
        mine = certificate_of(precert, sct_list, signature)
        assert _x509.issued_by(x509.load_der_x509_certificate(mine), software.issuer)
        if isinstance(software.key, ed25519.Ed25519PrivateKey):  # deterministic
            assert mine == before


def test_an_assembled_certificate_with_a_wrong_signature_or_list_is_refused(
        software: Hierarchy) -> None:
    rng = random.Random("refused")
    request = random_request(rng)
    serial = random_serial(rng)
    precert = _x509.sign_leaf(software.issuer, request, serial=serial, not_before=NOW,
                              not_after=NOW + 60, extensions=[POISON], private_key=software.key)
    sct_list = sct_list_of(rng, 1)
    signature = _leaf_der.signature(certificate_tbs(precert, sct_list), software.key)
    assemble_certificate(precertificate=precert, sct_list=sct_list, signature=signature,
                         issuer=software.issuer)
    tampered = bytearray(sct_list)
    tampered[-1] ^= 1  # the same shape, another SCT signature: another TBS
    with pytest.raises(ProfileError, match="not the issuing intermediate's"):
        assemble_certificate(precertificate=precert, sct_list=bytes(tampered),
                             signature=signature, issuer=software.issuer)
    other = make_hierarchy(throwaway_key(software.issuer))
    with pytest.raises(ProfileError, match="not the issuing intermediate's"):
        assemble_certificate(precertificate=precert, sct_list=sct_list, signature=signature,
                             issuer=other.issuer)
    for broken in (sct_list[:-1], sct_list + b"\0", b"\0\0", bytes(MAX_SCT_LIST + 1)):
        with pytest.raises(ProfileError, match="SCT list cannot be read"):
            assemble_certificate(precertificate=precert, sct_list=broken,
                                 signature=signature, issuer=software.issuer)
    # trusting its own signature, a validator still refuses a list it cannot read
    with pytest.raises(ProfileError, match="SCT list cannot be read"):
        assemble_certificate(precertificate=precert, sct_list=b"\0\0", signature=signature,
                             issuer=software.issuer, verify=False)
    # a certificate is not a precertificate: nothing is assembled from it
    leaf = _x509.sign_leaf(software.issuer, request, serial=serial, not_before=NOW,
                           not_after=NOW + 60, extensions=[], private_key=software.key)
    with pytest.raises(StructureError, match="no poison"):
        certificate_tbs(leaf, sct_list)


def test_openssl_verifies_an_assembled_certificate(software: Hierarchy, tmp_path: Path) -> None:
    rng = random.Random("openssl")
    request = request_of(SUBJECT_KEYS[0], ["assembled.trust"])
    precert = _x509.sign_leaf(software.issuer, request, serial=random_serial(rng),
                              not_before=NOW - 300, not_after=NOW + 86400,
                              extensions=[POISON], private_key=software.key)
    sct_list = sct_list_of(rng, 1)
    der = certificate_of(precert, sct_list, _leaf_der.signature(
        certificate_tbs(precert, sct_list), software.key))
    paths = {}
    for name, cert_der in [("root", software.root.public_bytes(DER)),
                           ("issuer", software.issuer.public_bytes(DER)), ("leaf", der)]:
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(x509.load_der_x509_certificate(cert_der).public_bytes(PEM))
    verified = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile",
                               str(paths["root"]), "-untrusted", str(paths["issuer"]),
                               str(paths["leaf"])],
                              capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0, verified.stdout + verified.stderr
