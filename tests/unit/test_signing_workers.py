"""A leaf signed in a signing worker has the same TBS, byte for byte, as one signed here."""

from __future__ import annotations

import hashlib
import ipaddress
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from handlers.ca import CheckedRequest, Issuer, KeystoreSettings, SigningWorkers, _x509
from handlers.ca._signing import WorkerFailed
from protocol import ct_structs as ct
from store import Signer, SoftwareKeyStore


def _request(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> CheckedRequest:
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return CheckedRequest(public_key=key.public_key(), spki_der=spki,
                          spki_sha256=hashlib.sha256(spki).hexdigest(),
                          dns_names=("www.hypermesh", "api.trust"),
                          ip_addresses=(ipaddress.IPv6Address("2001:db8::7"),))


def _issuer(tmp_path: Path) -> tuple[SoftwareKeyStore, Signer, x509.Certificate, bytes]:
    """A software keystore holding ``intermediate-1``, its self-signed certificate and DER."""
    keystore = SoftwareKeyStore(tmp_path / "keys")
    signer = keystore.create("intermediate-1", "ecdsa-p256-sha256")
    now = time.time()
    issuer = _x509.build_root(signer.private_key(), signer.public_key(), ca_id="t",
                              domains=("trust", "hypermesh"), not_before=now - 60,
                              not_after=now + 86400)
    return keystore, signer, issuer, issuer.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("subject_key", ["p256", "ed25519"])
async def test_worker_certificate_matches_the_event_loop_one(tmp_path: Path,
                                                             subject_key: str) -> None:
    keystore, signer, issuer, issuer_der = _issuer(tmp_path)
    now = time.time()
    key = ec.generate_private_key(ec.SECP256R1()) if subject_key == "p256" \
        else ed25519.Ed25519PrivateKey.generate()
    request = _request(key)
    serial = _x509.new_serial()
    sct_list = x509.UnrecognizedExtension(ct.SCT_LIST_OID,
                                          ct.sct_list_extension_value([b"\x00" * 40]))
    extension_sets: list[list[x509.Extension[x509.ExtensionType]]] = [
        [], [x509.Extension(ct.POISON_OID, True, x509.PrecertPoison())],
        [x509.Extension(ct.SCT_LIST_OID, False, sct_list)]]
    workers = SigningWorkers(2, KeystoreSettings(provider="software", data_dir=str(tmp_path)))
    try:
        for extensions in extension_sets:
            here = x509.load_der_x509_certificate(_x509.sign_leaf(
                issuer, request, serial=serial, not_before=now - 300, not_after=now + 3600,
                extensions=extensions, private_key=signer.private_key()))
            there = x509.load_der_x509_certificate(await workers.sign(
                issuer_name="intermediate-1", issuer_der=issuer_der, request=request,
                serial=serial, not_before=now - 300, not_after=now + 3600,
                extensions=extensions))
            assert there.tbs_certificate_bytes == here.tbs_certificate_bytes
            signer.public_key().verify(  # type: ignore[call-arg, union-attr]
                there.signature, there.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(WorkerFailed, match="no key 'intermediate-9'"):
            await workers.sign(issuer_name="intermediate-9", issuer_der=issuer_der,
                               request=request, serial=serial, not_before=now,
                               not_after=now + 60, extensions=[])
        assert workers.restarts == 0  # an error answer does not cost the worker
    finally:
        await workers.close()
        keystore.close()


async def test_a_worker_that_cannot_open_the_keystore_says_why(tmp_path: Path) -> None:
    workers = SigningWorkers(1, KeystoreSettings(provider="nonsense", data_dir=str(tmp_path)))
    try:
        with pytest.raises(WorkerFailed, match="unknown key provider"):
            await workers.warm_up()
    finally:
        await workers.close()


async def test_a_worker_signs_the_tbs_of_a_final_certificate(tmp_path: Path) -> None:
    """The entry signs the TBS every validator assembles (``ct.certificate_tbs``); a
    worker's signature of it makes the certificate ``ct.certificate_of`` assembles."""
    keystore, signer, issuer, issuer_der = _issuer(tmp_path)
    now = time.time()
    request = _request(ec.generate_private_key(ec.SECP256R1()))
    workers = SigningWorkers(1, KeystoreSettings(provider="software", data_dir=str(tmp_path)))
    try:
        precert = await workers.sign(
            issuer_name="intermediate-1", issuer_der=issuer_der, request=request,
            serial=_x509.new_serial(), not_before=now - 300, not_after=now + 3600,
            extensions=[x509.Extension(ct.POISON_OID, True, x509.PrecertPoison())])
        sct = ct.SignedCertificateTimestamp(log_id=bytes(32), timestamp=1, extensions=b"",
                                            signature=ct.digitally_signed(bytes(70)))
        sct_list = ct.encode_sct_list([sct.encode()])
        tbs = ct.certificate_tbs(precert, sct_list)
        issuer_key = Issuer(name="intermediate-1", signer=signer, certificate=issuer,
                            der=issuer_der)
        signature = await workers.sign_tbs(issuer_key, tbs)
        certificate = x509.load_der_x509_certificate(ct.certificate_of(precert, sct_list,
                                                                       signature))
        assert certificate.tbs_certificate_bytes == tbs
        assert _x509.issued_by(certificate, issuer)
        missing = Issuer(name="intermediate-9", signer=signer, certificate=issuer,
                         der=issuer_der)
        with pytest.raises(WorkerFailed, match="no key 'intermediate-9'"):
            await workers.sign_tbs(missing, tbs)
    finally:
        await workers.close()
        keystore.close()
