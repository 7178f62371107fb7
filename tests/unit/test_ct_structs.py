"""CT structures against real data: the Google SCT vectors (x509 and precert SCTs,
the invalid embedded SCT) and the Let's Encrypt Sunlight data tiles."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol import ct_structs as ct
from protocol.ct_merkle import leaf_hash

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SCT_DIR = VECTORS / "google-certificate-transparency-sct"
SUNLIGHT = VECTORS / "sunlight-navigli2025h2" / "tile"


def _cert(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((SCT_DIR / name).read_bytes())


def _log_key() -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key((SCT_DIR / "ct-server-key-public.pem").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


def test_x509_sct_vector_verifies_and_reserializes() -> None:
    raw = (SCT_DIR / "test-cert.proof").read_bytes()
    sct = ct.SignedCertificateTimestamp.parse(raw)
    assert len(raw) == 118 and sct.encode() == raw
    assert sct.log_id == ct.log_id_of(_log_key())
    der = _cert("test-cert.pem").public_bytes(serialization.Encoding.DER)
    entry = ct.TimestampedEntry(timestamp=sct.timestamp, entry_type=ct.X509_ENTRY,
                                certificate=der)
    ct.verify_sct(sct, _log_key(), ct.X509_ENTRY, entry.signed_entry())
    # Another certificate, another timestamp, or another log key: rejected.
    other = _cert("test-intermediate-cert.pem").public_bytes(serialization.Encoding.DER)
    with pytest.raises(ct.SignatureError):
        ct.verify_sct(sct, _log_key(), ct.X509_ENTRY, ct.TimestampedEntry(
            timestamp=0, entry_type=ct.X509_ENTRY, certificate=other).signed_entry())
    shifted = ct.SignedCertificateTimestamp(log_id=sct.log_id, timestamp=sct.timestamp + 1,
                                            extensions=sct.extensions, signature=sct.signature)
    with pytest.raises(ct.SignatureError):
        ct.verify_sct(shifted, _log_key(), ct.X509_ENTRY, entry.signed_entry())
    with pytest.raises(ct.SignatureError, match="another log"):
        ct.verify_sct(sct, ec.generate_private_key(ec.SECP256R1()).public_key(),
                      ct.X509_ENTRY, entry.signed_entry())


@pytest.mark.parametrize("name, issuer", [
    ("test-embedded", "ca-cert.pem"),
    ("test-embedded-with-preca", "ca-cert.pem"),
    ("test-embedded-with-intermediate", "intermediate-cert.pem"),
    ("test-embedded-with-intermediate-preca", "intermediate-cert.pem"),
])
def test_precert_sct_vectors(name: str, issuer: str) -> None:
    sct = ct.SignedCertificateTimestamp.parse((SCT_DIR / f"{name}-pre-cert.proof").read_bytes())
    final = _cert(f"{name}-cert.pem")
    entry = ct.verify_embedded_sct(final, _cert(issuer), sct, _log_key())
    assert entry.timestamp == sct.timestamp
    # The SCT embedded in the final certificate is the one in the .proof file.
    assert [s.encode() for s in ct.embedded_scts(final)] == [sct.encode()]
    # The wrong issuer changes issuer_key_hash: rejected.
    with pytest.raises(ct.SignatureError):
        ct.verify_embedded_sct(final, _cert("test-cert.pem"), sct, _log_key())


def test_invalid_embedded_sct_is_rejected() -> None:
    cert = _cert("test-invalid-embedded-cert.pem")
    scts = ct.embedded_scts(cert)
    assert len(scts) == 1
    with pytest.raises(ct.SignatureError):
        ct.verify_embedded_sct(cert, _cert("ca-cert.pem"), scts[0], _log_key())


def test_precert_tbs_is_the_final_certificates_tbs_without_scts() -> None:
    """Removing the poison from the precertificate gives the TBS the SCT signs."""
    for name in ("test-embedded", "test-embedded-with-intermediate"):
        pre = (SCT_DIR / f"{name}-pre-cert.pem").read_bytes()
        pre_der = x509.load_pem_x509_certificate(pre).public_bytes(serialization.Encoding.DER)
        assert ct.precert_tbs(pre_der) == _cert(f"{name}-cert.pem").tbs_precertificate_bytes
    plain = _cert("test-cert.pem").public_bytes(serialization.Encoding.DER)
    with pytest.raises(ct.StructureError, match="no poison"):
        ct.precert_tbs(plain)
    with pytest.raises(ct.StructureError):
        ct.precert_tbs(b"\x30\x03\x02\x01")


def test_a_damaged_precertificate_is_a_structure_error() -> None:
    """Cut short, or with a length that runs past its element, anywhere: refused as a
    structure error, never read past its element (the TBS is walked by positions)."""
    pre = x509.load_pem_x509_certificate((SCT_DIR / "test-embedded-pre-cert.pem").read_bytes())
    der = pre.public_bytes(serialization.Encoding.DER)
    for cut in range(0, len(der) - 1, 5):
        with pytest.raises(ct.StructureError):
            ct.precert_tbs(der[:cut])
    tbs = pre.tbs_certificate_bytes
    start = der.index(tbs)
    for offset in range(0, len(tbs) - 1):
        if tbs[offset] != 0x30 or tbs[offset + 1] >= 0x80:
            continue  # a short-form SEQUENCE header inside the TBS: make it overrun
        damaged = bytearray(der)
        damaged[start + offset + 1] = 0x7F
        try:
            tbs_of_damaged = ct.precert_tbs(bytes(damaged))
        except ct.StructureError:
            continue
        assert tbs_of_damaged != ct.precert_tbs(der)


def test_sct_list_round_trip_and_extension_value() -> None:
    raw = (SCT_DIR / "test-cert.proof").read_bytes()
    encoded = ct.encode_sct_list([raw, raw])
    assert ct.parse_sct_list(encoded) == [raw, raw]
    with pytest.raises(ct.StructureError):
        ct.parse_sct_list(encoded + b"\x00")
    with pytest.raises(ct.StructureError):
        ct.encode_sct_list([])
    final = _cert("test-embedded-cert.pem")
    ext = final.extensions.get_extension_for_oid(ct.SCT_LIST_OID)
    assert ext.value.public_bytes() == ct.sct_list_extension_value(
        [s.encode() for s in ct.embedded_scts(final)])


def _sunlight_items() -> list[bytes]:
    items: list[bytes] = []
    for n in range(4):
        items += ct.split_data_tile((SUNLIGHT / "data" / f"{n:03d}").read_bytes())
    return items


def test_sunlight_data_tiles_parse_and_hash_to_level0() -> None:
    items = _sunlight_items()
    assert len(items) == 1024
    hashes = b"".join((SUNLIGHT / "0" / f"{n:03d}").read_bytes() for n in range(4))
    for i, item in enumerate(items):
        tile_leaf = ct.TileLeaf.parse(item)
        assert tile_leaf.encode() == item  # re-encoding is byte-exact
        entry = tile_leaf.entry
        assert entry.leaf_index == i
        assert ct.leaf_index_extensions(i) == entry.extensions
        assert leaf_hash(entry.merkle_tree_leaf()) == hashes[32 * i:32 * i + 32]
        assert ct.parse_merkle_tree_leaf(entry.merkle_tree_leaf()) == entry
        assert ct.timestamped_entry_of_tile_leaf(item) == entry.encode()
        if entry.entry_type == ct.PRECERT_ENTRY:
            assert ct.precert_tbs(tile_leaf.pre_certificate) == entry.tbs_certificate
            pre = x509.load_der_x509_certificate(tile_leaf.pre_certificate)
            assert pre.extensions.get_extension_for_oid(ct.POISON_OID).critical
    # Let's Encrypt logs precertificates only: precert_tbs reproduced all 1024 TBSs.
    kinds = {ct.TileLeaf.parse(i).entry.entry_type for i in items}
    assert kinds == {ct.PRECERT_ENTRY}
    partial = ct.split_data_tile((SUNLIGHT / "data" / "003.p" / "10").read_bytes())
    assert partial == items[768:778]


def test_tile_paths() -> None:
    assert ct.tile_path(0, 3, 10) == "tile/0/003.p/10"
    assert ct.tile_path("data", 1234067) == "tile/data/x001/x234/067"
    assert ct.tile_path(2, 0) == "tile/2/000"
    assert ct.tile_path(1, 1000) == "tile/1/x001/000"
    with pytest.raises(ValueError):
        ct.tile_path(0, 0, 0)


def test_leaf_index_extension() -> None:
    ext = ct.leaf_index_extensions(0x0102030405)
    assert ext == bytes.fromhex("0000050102030405")[:1] + bytes.fromhex("00050102030405")
    assert len(ext) == 8 and ct.leaf_index_of(ext) == 0x0102030405
    with pytest.raises(ct.StructureError):
        ct.leaf_index_extensions(1 << 40)
    with pytest.raises(ct.StructureError, match="twice"):
        ct.parse_extensions(ext + ext)
    with pytest.raises(ct.StructureError, match="no leaf_index"):
        ct.leaf_index_of(b"")


def test_checkpoint_sign_and_verify() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import hashes
    root = hashlib.sha256(b"x").digest()
    signed = ct.tree_head_signed_data(1700000000000, 42, root)
    sig = ct.digitally_signed(key.sign(signed, ec.ECDSA(hashes.SHA256())))
    log_id = ct.log_id_of(key.public_key())
    note = ct.signed_checkpoint("ct.trust/0", 42, root, 1700000000000, sig, log_id)
    assert note.startswith("ct.trust/0\n42\n")
    cp = ct.verify_checkpoint(note, "ct.trust/0", key.public_key())
    assert (cp.tree_size, cp.root, cp.timestamp) == (42, root, 1700000000000)
    # Another log's signature line is ignored; a tampered size fails.
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(ct.SignatureError, match="no signature"):
        ct.verify_checkpoint(note, "ct.trust/0", other)
    with pytest.raises(ct.SignatureError):
        ct.verify_checkpoint(note.replace("\n42\n", "\n43\n"), "ct.trust/0", key.public_key())
    ct.verify_tree_head(key.public_key(), 1700000000000, 42, root, sig)
    with pytest.raises(ct.SignatureError):
        ct.verify_tree_head(key.public_key(), 1700000000000, 41, root, sig)


def test_check_sct_list_accepts_what_the_parser_reads_and_nothing_else() -> None:
    """The positional check before the vote agrees with reading every SCT, on valid lists
    and on random damage to them (truncated, extended, flipped lengths and versions)."""
    rng = random.Random("sct lists")

    def readable(data: bytes) -> bool:
        try:
            scts = ct.parse_sct_list(data)
            for sct in scts:
                ct.SignedCertificateTimestamp.parse(sct)
        except ct.StructureError:
            return False
        return bool(scts)

    def checked(data: bytes) -> bool:
        try:
            ct.check_sct_list(data)
        except ct.StructureError:
            return False
        return True
    accepted = 0
    for _ in range(3000):
        scts = [ct.SignedCertificateTimestamp(
            log_id=rng.randbytes(32), timestamp=rng.getrandbits(64),
            extensions=rng.randbytes(rng.choice([0, 8, 3])),
            signature=ct.digitally_signed(rng.randbytes(rng.randint(0, 80)))).encode()
            for _ in range(rng.randint(1, 3))]
        data = bytearray(ct.encode_sct_list(scts))
        for _ in range(rng.choice([0, 0, 1, 2])):
            what = rng.randrange(3)
            if what == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif what == 1:
                del data[rng.randrange(len(data) + 1):]
            else:
                data += rng.randbytes(rng.randint(1, 4))
        assert checked(bytes(data)) == readable(bytes(data)), data.hex()
        accepted += readable(bytes(data))
        if readable(bytes(data)):
            assert ct.check_sct_list(bytes(data)) == len(ct.parse_sct_list(bytes(data)))
    assert 1000 < accepted < 2900  # both kinds were tried
    for empty in (b"", b"\x00", b"\x00\x00"):
        assert not checked(empty)
