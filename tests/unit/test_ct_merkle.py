"""Merkle tree algorithms (RFC 9162 §2.1): every transparency-dev vector, the RFC 6962
test tree, and property tests of generated proofs against the verifier."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import ct_merkle as merkle
from protocol.ct_merkle import ProofError

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / \
    "transparency-dev-merkle" / "testdata"

# The RFC 6962 test tree behind the vectors, and its roots for sizes 1..8.
LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
                                      "5051525354555657",
                                      "606162636465666768696a6b6c6d6e6f")]
ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]


def _b64(value: Any) -> bytes:
    return base64.b64decode(value) if value else b""


def _proof(value: Any) -> list[bytes]:
    return [base64.b64decode(p) for p in (value or [])]


def _files(kind: str) -> list[Path]:
    return sorted((VECTORS / kind).rglob("*.json"))


def test_vector_counts() -> None:
    """The vectors are there (a test over an empty directory would pass vacuously)."""
    assert len(_files("inclusion")) == 98
    assert len(_files("consistency")) == 98


@pytest.mark.parametrize("path", _files("inclusion"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inclusion_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    args = (v["leafIdx"], v["treeSize"], _b64(v["leafHash"]), _proof(v["proof"]),
            _b64(v["root"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(*args)
    else:
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize("path", _files("consistency"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_consistency_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    args = (v["size1"], v["size2"], _b64(v["root1"]), _b64(v["root2"]), _proof(v["proof"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


def _mth_over(hashes: list[bytes]) -> merkle.Mth:
    def mth(start: int, end: int) -> bytes:
        return merkle.root_from_hashes(hashes[start:end])
    return mth


def test_rfc6962_tree_roots_and_generated_proofs_match_vectors() -> None:
    hashes = [merkle.leaf_hash(leaf) for leaf in LEAVES]
    for size in range(1, 9):
        assert merkle.root_from_hashes(hashes[:size]) == ROOTS[size - 1]
    assert merkle.root_from_hashes([]) == merkle.EMPTY_ROOT
    mth = _mth_over(hashes)
    # Generated proofs equal the upstream happy-path proofs.
    for path in _files("inclusion"):
        v = json.loads(path.read_text())
        if path.stem == "happy-path" and v["treeSize"] <= 8 and v["leafHash"]:
            assert merkle.inclusion_proof(v["leafIdx"], v["treeSize"], mth) == \
                _proof(v["proof"]), path
    checked = 0
    for path in _files("consistency"):
        v = json.loads(path.read_text())
        if path.stem == "happy-path" and 0 < v["size1"] <= v["size2"] <= 8:
            assert merkle.consistency_proof(v["size1"], v["size2"], mth) == \
                _proof(v["proof"]), path
            checked += 1
    assert checked == 5


def _tree(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_generated_proofs_verify(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 300))
    hashes = _tree(size)
    mth = _mth_over(hashes)
    root = merkle.root_from_hashes(hashes)
    index = data.draw(st.integers(0, size - 1))
    proof = merkle.inclusion_proof(index, size, mth)
    merkle.verify_inclusion(index, size, hashes[index], proof, root)
    first = data.draw(st.integers(1, size))
    old_root = merkle.root_from_hashes(hashes[:first])
    cproof = merkle.consistency_proof(first, size, mth)
    merkle.verify_consistency(first, size, old_root, root, cproof)
    # A different leaf, a flipped bit anywhere in the proof, or the wrong index fails.
    with pytest.raises(ProofError):
        merkle.verify_inclusion(index, size, merkle.leaf_hash(b"other"), proof, root)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        with pytest.raises(ProofError):
            merkle.verify_inclusion(index, size, hashes[index], bad, root)
    if size > 1:
        other = (index + 1) % size
        with pytest.raises(ProofError):
            merkle.verify_inclusion(other, size, hashes[index], proof, root)
    if cproof:
        i = data.draw(st.integers(0, len(cproof) - 1))
        bad = list(cproof)
        bad[i] = bytes([bad[i][0] ^ 0x80]) + bad[i][1:]
        with pytest.raises(ProofError):
            merkle.verify_consistency(first, size, old_root, root, bad)
    if first < size:
        # A tree whose first `first` leaves were changed is not consistent.
        forged = list(hashes)
        forged[data.draw(st.integers(0, first - 1))] = merkle.leaf_hash(b"forged")
        with pytest.raises(ProofError):
            merkle.verify_consistency(first, size, merkle.root_from_hashes(forged[:first]),
                                      root, cproof)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000), st.data())
def test_subtree_hash_from_blocks(size: int, data: st.DataObject) -> None:
    """MTH of every proof range, folded from aligned blocks, equals the direct MTH."""
    hashes = _tree(size)

    def block(level: int, index: int) -> bytes:
        return merkle.root_from_hashes(hashes[index << level:(index + 1) << level])

    mth = _mth_over(hashes)
    index = data.draw(st.integers(0, size - 1))
    first = data.draw(st.integers(1, size))
    calls: list[tuple[int, int]] = []

    def recording(start: int, end: int) -> bytes:
        calls.append((start, end))
        return mth(start, end)

    merkle.inclusion_proof(index, size, recording)
    merkle.consistency_proof(first, size, recording)
    calls.append((0, size))
    for start, end in calls:
        assert merkle.subtree_hash(start, end, block) == mth(start, end)


def test_perfect_levels() -> None:
    hashes = _tree(16)
    levels = merkle.perfect_levels(hashes)
    assert len(levels) == 5
    assert levels[-1] == [merkle.root_from_hashes(hashes)]
    assert levels[2][3] == merkle.root_from_hashes(hashes[12:16])


def test_bad_arguments() -> None:
    mth = _mth_over(_tree(4))
    with pytest.raises(ValueError):
        merkle.inclusion_proof(4, 4, mth)
    with pytest.raises(ValueError):
        merkle.consistency_proof(0, 4, mth)
    with pytest.raises(ValueError):
        merkle.consistency_proof(5, 4, mth)
    with pytest.raises(ProofError):
        merkle.verify_consistency(2, 1, ROOTS[1], ROOTS[0], [ROOTS[0]])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 700))
def test_compact_range_root(size: int) -> None:
    hashes = _tree(size)
    compact = merkle.CompactRange()
    for i, h in enumerate(hashes):
        compact.append(h)
        if i % 37 == 0:
            assert compact.root() == merkle.root_from_hashes(hashes[:i + 1])
    assert compact.size == size and compact.root() == merkle.root_from_hashes(hashes)
