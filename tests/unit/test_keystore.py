"""Key stores: software keys on disk and PKCS#11 keys in a real SoftHSM2 token."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11

from store._keystore import open_keystore
from store._pkcs11 import Pkcs11KeyStore
from store._signer import (
    Algorithm,
    KeyStore,
    KeyStoreError,
    Signer,
    spki_sha256,
    verify_signature,
)
from store._softkeys import SoftwareKeyStore

from ..softhsm import SoftHsmToken, make_token

ROOT = Path(__file__).resolve().parents[2]
ALGORITHMS: list[Algorithm] = ["ecdsa-p256-sha256", "ed25519"]
NOW = datetime.datetime.now(datetime.UTC)
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


# Move this fixture to tests/conftest.py; make_token() returns one token per process,
# so keeping both copies is harmless.
@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """This test session's SoftHSM2 token (SoftHSM2 reads its config once per process)."""
    return make_token(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="module")
def hsm(softhsm_token: SoftHsmToken, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[KeyStore]:
    store = open_keystore(provider="softhsm2", data_dir=tmp_path_factory.mktemp("unused"),
                          token_label=softhsm_token.token_label, pin=softhsm_token.pin)
    yield store
    store.close()


@pytest.fixture(params=["software", "pkcs11"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> KeyStore:
    """Each test runs against both kinds of store."""
    if request.param == "software":
        return open_keystore(provider="software", data_dir=tmp_path)
    hsm_store: KeyStore = request.getfixturevalue("hsm")
    return hsm_store


def reopen(store: KeyStore, token: SoftHsmToken | None) -> KeyStore:
    """A second, independent store on the same directory or token."""
    if isinstance(store, SoftwareKeyStore):
        return SoftwareKeyStore(store.directory)
    assert token is not None
    return Pkcs11KeyStore(token.module_path, token.token_label, token.pin)


def fresh() -> str:
    """A key name no other test uses (the token outlives each test)."""
    return f"k-{secrets.token_hex(5)}"


def self_signed(signer: Signer) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, signer.name)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(signer.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer.private_key(), hash_for(signer)))


def hash_for(signer: Signer) -> hashes.SHA256 | None:
    """What builders' sign() wants with this key: SHA-256 for ECDSA, None for Ed25519."""
    return hashes.SHA256() if signer.algorithm == "ecdsa-p256-sha256" else None


def assert_no_pin(exc: BaseException, *pins: str) -> None:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    for link in chain:
        for pin in pins:
            assert pin not in str(link) and pin not in repr(link)


def test_create_get_names(store: KeyStore) -> None:
    ec_name, ed_name = fresh(), fresh()
    assert store.get(ec_name) is None
    created = store.create(ec_name)
    assert (created.name, created.algorithm) == (ec_name, "ecdsa-p256-sha256")
    assert isinstance(created.public_key(), ec.EllipticCurvePublicKey)
    ed = store.get_or_create(ed_name, "ed25519")
    assert isinstance(ed.public_key(), ed25519.Ed25519PublicKey)
    got = store.get(ec_name)
    assert got is not None
    assert spki_sha256(got.public_key()) == spki_sha256(created.public_key())
    again = store.get_or_create(ed_name)  # existing key wins, whatever algorithm is asked
    assert again.algorithm == "ed25519"
    assert {ec_name, ed_name} <= set(store.names())
    assert store.names() == sorted(store.names())
    with pytest.raises(KeyStoreError, match="already exists"):
        store.create(ec_name)
    with pytest.raises(KeyStoreError, match="unsupported key algorithm"):
        store.create(fresh(), "rsa-2048")  # type: ignore[arg-type]


def test_second_store_sees_keys(store: KeyStore, softhsm_token: SoftHsmToken) -> None:
    names = {fresh(): algorithm for algorithm in ALGORITHMS}
    publics = {n: spki_sha256(store.create(n, a).public_key()) for n, a in names.items()}
    other = reopen(store, softhsm_token)
    try:
        assert set(names) <= set(other.names())
        for name, algorithm in names.items():
            signer = other.get(name)
            assert signer is not None and signer.algorithm == algorithm
            assert spki_sha256(signer.public_key()) == publics[name]
            assert verify_signature(signer.public_key(), signer.sign(b"x"), b"x")
    finally:
        other.close()
    # closing the second store must not log the first one out
    signer = store.get(next(iter(names)))
    assert signer is not None and verify_signature(signer.public_key(), signer.sign(b"y"), b"y")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signatures_verify(store: KeyStore, algorithm: Algorithm) -> None:
    signer = store.create(fresh(), algorithm)
    data = b"certificate transparency " * 40
    signature = signer.sign(data)
    if algorithm == "ed25519":
        assert len(signature) == 64
        public = signer.public_key()
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, data)
    else:
        public = signer.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))  # DER over SHA-256
    assert verify_signature(signer.public_key(), signature, data)
    assert not verify_signature(signer.public_key(), signature, data + b"!")
    assert not verify_signature(signer.public_key(), bytes(len(signature)), data)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_certificate_builder_signs(store: KeyStore, algorithm: Algorithm) -> None:
    issuer = store.create(fresh(), algorithm)
    root = self_signed(issuer)
    root.verify_directly_issued_by(root)
    assert verify_signature(issuer.public_key(), root.signature, root.tbs_certificate_bytes)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(root.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(hours=1))
            .sign(issuer.private_key(), hash_for(issuer)))
    leaf.verify_directly_issued_by(root)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(root.subject)
           .last_update(NOW).next_update(NOW + datetime.timedelta(hours=1))
           .sign(issuer.private_key(), hash_for(issuer)))
    assert crl.is_signature_valid(issuer.public_key())


def test_hsm_private_key_adapter_cannot_export(hsm: KeyStore) -> None:
    for algorithm in ALGORITHMS:
        key = hsm.create(fresh(), algorithm).private_key()
        with pytest.raises(KeyStoreError, match="cannot be exported"):
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    key = hsm.create(fresh()).private_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    with pytest.raises(KeyStoreError, match="cannot be exported"):
        key.private_numbers()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hsm_private_key_stays_in_token(hsm: KeyStore, softhsm_token: SoftHsmToken,
                                        algorithm: Algorithm) -> None:
    name = fresh()
    hsm.create(name, algorithm)
    # Look from outside the store: a PIN-less session sees private objects while the
    # store keeps the process logged in.
    token = pkcs11.lib(softhsm_token.module_path).get_token(token_label=softhsm_token.token_label)
    with token.open() as session:
        key = session.get_key(ObjectClass.PRIVATE_KEY, label=name)
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.TOKEN] is True and key[Attribute.PRIVATE] is True
        assert key[Attribute.ID] and key[Attribute.LOCAL] is True
        with pytest.raises(p11.AttributeSensitive):
            key[Attribute.VALUE]
        public = session.get_key(ObjectClass.PUBLIC_KEY, label=name)
        assert public[Attribute.TOKEN] is True and public[Attribute.ID] == key[Attribute.ID]


def test_software_key_files(tmp_path: Path) -> None:
    store = open_keystore(provider="software", data_dir=tmp_path)
    store.create("root")
    path = tmp_path / "keys" / "root.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    (path.parent / "notes.txt").write_text("not a key")
    (path.parent / "Bad Name.pem").write_text("not a key either")
    assert store.names() == ["root"]
    (path.parent / "broken.pem").write_text("garbage")
    with pytest.raises(KeyStoreError, match="not an unencrypted PEM private key"):
        store.get("broken")


@pytest.mark.parametrize("name", ["", "Root", "../root", "a/b", ".hidden", "-x", "a b", "é",
                                  "x" * 65, "root\n"])
def test_bad_names_refused(store: KeyStore, name: str) -> None:
    for attempt in (store.get, store.create, store.get_or_create):
        with pytest.raises(KeyStoreError, match="invalid key name"):
            attempt(name)


def test_longest_name_accepted(store: KeyStore) -> None:
    name = "a" + secrets.token_hex(8) + "." * 17 + "_-" * 15
    assert len(name) == 64
    assert store.get_or_create(name).name == name


def test_concurrent_signing(hsm: KeyStore) -> None:
    signers = [hsm.create(fresh()), hsm.create(fresh(), "ed25519")]

    def work(worker: int) -> list[tuple[Signer, bytes, bytes]]:
        out = []
        for i in range(40):
            signer = signers[i % 2]
            data = f"{worker}:{i}".encode()
            out.append((signer, data, signer.sign(data)))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = [r for batch in pool.map(work, range(4)) for r in batch]
    assert len(results) == 160
    assert all(verify_signature(s.public_key(), sig, data) for s, data, sig in results)


def test_closed_store_refuses(softhsm_token: SoftHsmToken, hsm: KeyStore) -> None:
    other = reopen(hsm, softhsm_token)
    signer = other.create(fresh())
    other.close()
    other.close()  # idempotent
    with pytest.raises(KeyStoreError, match="closed"):
        signer.sign(b"x")
    with pytest.raises(KeyStoreError, match="closed"):
        other.names()
    assert hsm.names()  # the shared login survived


def test_wrong_pin(softhsm_token: SoftHsmToken, hsm: KeyStore) -> None:
    wrong = f"wrong-{secrets.token_hex(6)}"
    with pytest.raises(KeyStoreError, match="PIN incorrect") as info:
        open_keystore(provider="softhsm2", data_dir=Path("."),
                      token_label=softhsm_token.token_label, pin=wrong)
    assert_no_pin(info.value, wrong, softhsm_token.pin)
    assert hsm.names()


def test_unknown_token_and_missing_module(softhsm_token: SoftHsmToken) -> None:
    pin = softhsm_token.pin
    with pytest.raises(KeyStoreError, match=r"no token labelled 'nope'.*trustchain-test") as info:
        open_keystore(provider="pkcs11", data_dir=Path("."), module_path=SOFTHSM_MODULE,
                      token_label="nope", pin=pin)
    assert_no_pin(info.value, pin)
    with pytest.raises(KeyStoreError, match=r"/nonexistent/libp11\.so not found") as info:
        open_keystore(provider="yubihsm", data_dir=Path("."), module_path="/nonexistent/libp11.so",
                      token_label="x", pin=pin)
    assert_no_pin(info.value, pin)
    with pytest.raises(KeyStoreError, match="cannot load PKCS#11 module") as info:
        open_keystore(provider="pkcs11", data_dir=Path("."), module_path="/etc/hostname",
                      token_label="x", pin=pin)
    assert isinstance(info.value.__cause__, p11.PKCS11Error)
    assert_no_pin(info.value, pin)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"provider": "aws_cloudhsm", "token_label": "t", "pin": "p"}, "needs module_path"),
    ({"provider": "pkcs11", "token_label": "t", "pin": "p"}, "needs module_path"),
    ({"provider": "softhsm2", "pin": "p"}, "needs token_label"),
    ({"provider": "softhsm2", "token_label": "t"}, "needs the token's PIN"),
    ({"provider": "vault"}, "unknown key provider 'vault': use one of software, softhsm2, "
                            "pkcs11, aws_cloudhsm, yubihsm"),
])
def test_open_keystore_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(KeyStoreError, match=message):
        open_keystore(data_dir=Path("."), **kwargs)


RESTART = """
import json, os, sys
from pathlib import Path
from store._keystore import open_keystore
from store._signer import KeyStoreError
env = json.loads(sys.argv[1])
out = {}
try:
    open_keystore(provider="softhsm2", data_dir=Path("."), token_label=env["label"],
                  pin=env["wrong"])
except KeyStoreError as exc:
    out["wrong"] = str(exc)
store = open_keystore(provider="softhsm2", data_dir=Path("."), token_label=env["label"],
                      pin=env["pin"])
out["names"] = store.names()
out["signature"] = store.get(env["name"]).sign(b"after restart").hex()
store.close()
print(json.dumps(out))
"""


def test_token_keys_survive_restart(hsm: KeyStore, softhsm_token: SoftHsmToken) -> None:
    """A new process (a restart) logs in for real and finds the keys by label."""
    name = fresh()
    signer = hsm.create(name)
    wrong = f"wrong-{secrets.token_hex(6)}"
    args = {"label": softhsm_token.token_label, "pin": softhsm_token.pin, "wrong": wrong,
            "name": name}
    done = subprocess.run([sys.executable, "-c", RESTART, json.dumps(args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SOFTHSM2_CONF": str(softhsm_token.conf_path)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "PIN incorrect" in out["wrong"]
    assert wrong not in out["wrong"] and softhsm_token.pin not in out["wrong"]
    assert name in out["names"]
    assert verify_signature(signer.public_key(), bytes.fromhex(out["signature"]),
                            b"after restart")
