"""CT tiles on disk: the Let's Encrypt Sunlight tiles reproduced byte for byte, proofs
from tiles for any size, crash recovery from staged bundles, tampering detected."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import ct_merkle as merkle
from protocol import ct_structs as ct
from store import Appended, Bundle, FilesystemObjects, TileCorrupted, TileError, TileLog

SUNLIGHT = Path(__file__).resolve().parents[1] / "vectors" / \
    "sunlight-navigli2025h2" / "tile"
ROOT_1024 = bytes.fromhex("10c7c61bce6e21d75e397b79ff075018fdc841dd02382aa82e0f50e82b0f2c90")
ROOT_778 = bytes.fromhex("f969c738c45997f2c6d7aebda1eb246dd2bd6dc3b89e4ad8d5c7d5ca49c2e765")


def sunlight_entries() -> list[Appended]:
    out = []
    for n in range(4):
        for item in ct.split_data_tile((SUNLIGHT / "data" / f"{n:03d}").read_bytes()):
            leaf = ct.TileLeaf.parse(item)
            out.append(Appended(leaf_hash=merkle.leaf_hash(leaf.entry.merkle_tree_leaf()),
                                tile_leaf=item,
                                fingerprint=hashlib.sha256(leaf.pre_certificate).digest(),
                                names=()))
    return out


def commit(log: TileLog, entries: list[Appended]) -> Bundle:
    bundle = log.append(entries)
    log.write_bundle(bundle, f"checkpoint {bundle.size}\n".encode())
    log.publish(bundle)
    log.install(bundle)
    log.installed(bundle)
    return bundle


def test_sunlight_tiles_reproduced_byte_for_byte(tmp_path: Path) -> None:
    entries = sunlight_entries()
    log = TileLog.in_directory(tmp_path)
    first = commit(log, entries[:778])
    assert first.root == ROOT_778 == log.root_at(778)
    for name in ("000", "001", "002", "003.p/10"):
        assert (tmp_path / "tile/0" / name).read_bytes() == (SUNLIGHT / "0" / name).read_bytes()
        assert (tmp_path / "tile/data" / name).read_bytes() == \
            (SUNLIGHT / "data" / name).read_bytes()
    assert len((tmp_path / "tile/1/000.p/3").read_bytes()) == 96
    second = commit(log, entries[778:])
    assert second.root == ROOT_1024 == log.root_at(1024)
    assert log.root_at(778) == ROOT_778
    assert (tmp_path / "tile/0/003").read_bytes() == (SUNLIGHT / "0" / "003").read_bytes()
    assert (tmp_path / "tile/data/003").read_bytes() == (SUNLIGHT / "data" / "003").read_bytes()
    assert not (tmp_path / "tile/0/003.p").exists()  # replaced by the full tile
    level1 = (tmp_path / "tile/1/000.p/4").read_bytes()
    assert level1 == b"".join(merkle.root_from_hashes(
        [(SUNLIGHT / "0" / f"{n:03d}").read_bytes()[i:i + 32] for i in range(0, 8192, 32)])
        for n in range(4))
    # A fresh instance recovers the same tree from the files alone.
    again = TileLog.in_directory(tmp_path)
    again.recover(1024, ROOT_1024)
    assert again.root_at(778) == ROOT_778
    assert [item for item, _ in again.entries(770, 780)] == \
        [e.tile_leaf for e in entries[770:780]]
    again.verify_all()


def synthetic(start: int, count: int) -> list[Appended]:
    out = []
    for i in range(start, start + count):
        entry = ct.TimestampedEntry(timestamp=1_700_000_000_000 + i, entry_type=ct.X509_ENTRY,
                                    certificate=i.to_bytes(8, "big") * 3,
                                    extensions=ct.leaf_index_extensions(i))
        out.append(Appended(leaf_hash=merkle.leaf_hash(entry.merkle_tree_leaf()),
                            tile_leaf=ct.TileLeaf(entry=entry).encode(),
                            fingerprint=hashlib.sha256(entry.certificate).digest(),
                            names=(f"n{i}.trust",)))
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[TileLog, list[bytes]]:
    """70,000 entries in uneven batches: full level-0 and level-1 tiles, partials above."""
    log = TileLog.in_directory(tmp_path_factory.mktemp("big"))
    hashes: list[bytes] = []
    pos = 0
    for batch in (1, 255, 256, 4000, 700, 60323, 4465):
        entries = synthetic(pos, batch)
        commit(log, entries)
        hashes += [e.leaf_hash for e in entries]
        pos += batch
    assert log.size == len(hashes) == 70_000
    return log, hashes


def test_big_tree_layout(big: tuple[TileLog, list[bytes]]) -> None:
    log, hashes = big
    d = Path(log.objects.location)
    assert len(list((d / "tile/0").glob("[0-9]*[0-9]"))) == 273   # full level-0 tiles
    assert (d / "tile/0/273.p/112").is_file()
    assert (d / "tile/1/000").is_file() and (d / "tile/1/001.p/17").is_file()
    assert (d / "tile/2/000.p/1").is_file()
    assert log.root == merkle.root_from_hashes(hashes)
    log.verify_all()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_proofs_from_tiles_verify(big: tuple[TileLog, list[bytes]], data: st.DataObject) -> None:
    log, hashes = big
    size = data.draw(st.integers(1, log.size))
    index = data.draw(st.integers(0, size - 1))
    first = data.draw(st.integers(1, size))
    root = log.root_at(size)
    merkle.verify_inclusion(index, size, hashes[index], log.inclusion_proof(index, size), root)
    merkle.verify_consistency(first, size, log.root_at(first), root,
                              log.consistency_proof(first, size))


def test_proofs_match_a_reference_tree(big: tuple[TileLog, list[bytes]]) -> None:
    log, hashes = big
    for size in (1, 2, 255, 256, 257, 65536, 65537, 69_999, 70_000):
        assert log.root_at(size) == merkle.root_from_hashes(hashes[:size])
    assert log.inclusion_proof(65535, 70_000) == merkle.inclusion_proof(
        65535, 70_000, lambda a, b: merkle.root_from_hashes(hashes[a:b]))
    with pytest.raises(TileError):
        log.mth(0, 70_001)
    with pytest.raises(TileError):
        log.entries(69_990, 70_001)


def test_uncommitted_bundle_is_discarded_and_committed_one_installed(tmp_path: Path) -> None:
    log = TileLog.in_directory(tmp_path)
    a = commit(log, synthetic(0, 300))
    # Batch b is staged and committed but the process dies before installing it.
    b = log.append(synthetic(300, 100))
    log.write_bundle(b, b"cp b\n")
    # Batch c is staged but its checkpoint never committed (a crash, or a lost CAS).
    c = log.append(synthetic(400, 50))
    log.write_bundle(c, b"cp c\n")
    assert not (tmp_path / "tile/0/001.p/144").exists()
    fresh = TileLog.in_directory(tmp_path)
    assert fresh.recover(b.size, b.root) == 1
    assert fresh.size == 400 and fresh.root == b.root
    assert (tmp_path / "checkpoint").read_bytes() == b"cp b\n"
    assert list((tmp_path / "staging").iterdir()) == []
    assert [i for i, _ in fresh.entries(299, 400)] == [e.tile_leaf for e in synthetic(299, 101)]
    # Growing from there gives the tree a never-crashed log has.
    fresh_c = commit(fresh, synthetic(400, 50))
    assert fresh_c.root == c.root
    assert a.size == 300


def test_tampering_is_detected(tmp_path: Path) -> None:
    log = TileLog.in_directory(tmp_path)
    bundle = commit(log, synthetic(0, 600))
    # An older full data tile: the root still checks out; reading it finds the damage.
    data_tile = tmp_path / "tile/data/000"
    original = data_tile.read_bytes()
    data_tile.write_bytes(original.replace(b"\x00\x00\x00\x05", b"\x00\x00\x00\x06", 1))
    assert data_tile.read_bytes() != original
    fresh = TileLog.in_directory(tmp_path)
    fresh.recover(bundle.size, bundle.root)
    with pytest.raises(TileCorrupted, match=r"the data tile .*tile/data/000 was altered"):
        fresh.entries(0, 40)
    with pytest.raises(TileCorrupted, match="tile/data/000"):
        TileLog.in_directory(tmp_path).check(bundle.size, bundle.root)
    data_tile.write_bytes(original)
    TileLog.in_directory(tmp_path).check(bundle.size, bundle.root)
    # The last full data tile (written last) is checked at start.
    last = tmp_path / "tile/data/001"
    original = last.read_bytes()
    last.write_bytes(original.replace(b"\x00\x00\x01\x01", b"\x00\x00\x01\x02", 1))
    with pytest.raises(TileCorrupted, match=r"the data tile .*tile/data/001 was altered"):
        TileLog.in_directory(tmp_path).recover(bundle.size, bundle.root)
    last.write_bytes(original)
    hash_tile = tmp_path / "tile/0/000"
    raw = bytearray(hash_tile.read_bytes())
    raw[100] ^= 1
    hash_tile.write_bytes(bytes(raw))
    fresh = TileLog.in_directory(tmp_path)
    fresh.recover(bundle.size, bundle.root)
    with pytest.raises(TileCorrupted, match=r"hash tile .*tile/0/000 does not match its hash"):
        fresh.inclusion_proof(5, 600)
    with pytest.raises(TileCorrupted, match="tile/0/000"):
        TileLog.in_directory(tmp_path).check(bundle.size, bundle.root)
    raw[100] ^= 1
    hash_tile.write_bytes(bytes(raw))
    # Damage to the right edge's hash tile is blamed on it, not on its data tile.
    partial = tmp_path / "tile/0/002.p/88"
    raw = bytearray(partial.read_bytes())
    raw[0] ^= 1
    partial.write_bytes(bytes(raw))
    with pytest.raises(TileCorrupted, match=r"hash tiles give root .* \(a hash tile under"):
        TileLog.in_directory(tmp_path).recover(bundle.size, bundle.root)
    raw[0] ^= 1
    partial.write_bytes(bytes(raw))
    edge_data = tmp_path / "tile/data/002.p/88"
    raw = bytearray(edge_data.read_bytes())
    raw[5] ^= 1  # inside the first entry's timestamp
    edge_data.write_bytes(bytes(raw))
    with pytest.raises(TileCorrupted, match=r"the data tile .*tile/data/002.p/88 was altered"):
        TileLog.in_directory(tmp_path).recover(bundle.size, bundle.root)
    raw[5] ^= 1
    edge_data.write_bytes(bytes(raw))
    TileLog.in_directory(tmp_path).recover(bundle.size, bundle.root)
    shutil.rmtree(tmp_path / "tile/0/002.p")
    with pytest.raises(TileCorrupted, match=r"partial hash tile .*tile/0/002.p/88 is missing"):
        TileLog.in_directory(tmp_path).recover(bundle.size, bundle.root)


def test_check_reads_the_committed_staged_bundle_and_writes_nothing(tmp_path: Path) -> None:
    log = TileLog.in_directory(tmp_path)
    commit(log, synthetic(0, 300))
    b = log.append(synthetic(300, 100))
    log.write_bundle(b, b"cp b\n")  # committed, not installed (a crash)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    TileLog.in_directory(tmp_path).check(b.size, b.root)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert TileLog.in_directory(tmp_path).recover(b.size, b.root) == 1


class CountingObjects(FilesystemObjects):
    """A directory store that counts its reads: a stand-in for a bucket's round trips."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gets = 0

    def get(self, key: str) -> bytes | None:
        self.gets += 1
        return super().get(key)


def test_remote_reads_are_planned_and_fetched_ahead(
        big: tuple[TileLog, list[bytes]]) -> None:
    """With the tiles in a remote store, what a proof or a range of entries will read is
    known beforehand and fetched off the loop (``fetch``); computing it then reads
    nothing more from the store, and the answers are the same."""
    local, hashes = big
    objects = CountingObjects(Path(local.objects.location))
    rng = random.Random(5)
    for _ in range(30):
        size = rng.randint(2, local.size)
        index, first = rng.randrange(size), rng.randint(1, size - 1)
        start = rng.randrange(local.size)
        end = min(local.size, start + rng.randint(1, 600))
        for kind in ("inclusion", "consistency", "entries"):
            remote = TileLog(objects, name="0", staging=None)  # fresh: nothing cached
            remote.recover(local.size, local.root)
            assert remote.remote and not local.remote
            if kind == "entries":
                paths = remote.paths_for_entries(start, end)
                expected: object = [item for item, _ in local.entries(start, end)]
            else:
                paths = remote.paths_for_proof(kind, index if kind == "inclusion" else first,
                                               size)
                expected = (local.inclusion_proof(index, size) if kind == "inclusion"
                            else local.consistency_proof(first, size))
            fetched = asyncio.run(remote.fetch(paths))
            assert set(fetched) == set(paths)
            objects.gets = 0
            with remote.reading(fetched):
                got: object = ([item for item, _ in remote.entries(start, end)]
                               if kind == "entries" else
                               remote.inclusion_proof(index, size) if kind == "inclusion"
                               else remote.consistency_proof(first, size))
            assert got == expected
            assert objects.gets == 0, (kind, paths, objects.gets)
    # a local store is read where it is: nothing to fetch ahead
    assert asyncio.run(local.fetch(["tile/0/000"])) == {}
    merkle.verify_inclusion(7, local.size, hashes[7], local.inclusion_proof(7, local.size),
                            local.root)
