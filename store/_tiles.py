"""One CT log shard as static-ct-api tiles (c2sp.org/static-ct-api, tlog-tiles), in an
object store: a local directory or an S3 bucket.

Layout under the shard's prefix::

    tile/<L>/<N>[.p/<W>]      hash tiles: 256 (or W) hashes of 32 bytes
    tile/data/<N>[.p/<W>]     data tiles: the TileLeaf of each entry
    tile/names/<N>[.p/<W>]    TrustChain's own: CBOR [[sha256, [names...]], ...] per entry
    checkpoint                the latest signed checkpoint (note text)
    staging/<size>-<root>     bundles: every file a batch changes, written before
                              the checkpoint is committed (local directory only)

Only the right edge of the tree (at most 255 hashes per level and 255 data
entries) is kept in memory; every proof is computed from tiles, read on
demand through a small cache of immutable full tiles.

Durability: :meth:`TileLog.append` extends the in-memory edge and returns a
:class:`Bundle`; :meth:`write_bundle` makes the bundle durable (one file,
fsync); the caller then commits the checkpoint by compare-and-swap in the
database, and only then calls :meth:`publish` (readers see the new size) and,
off the critical path, :meth:`install` (tile files written and fsync'd, the
bundle removed). :meth:`recover` re-installs the bundles of committed
checkpoints after a crash and discards the others, so tiles are only ever
written for a committed tree, and a writer that lost the compare-and-swap
never touches them.

Remote stores (S3) have no staging: :meth:`write_bundle` writes the tiles to
the store itself before the checkpoint is committed, and :meth:`install` writes
only the checkpoint. That is safe because every tile's content is a function of
the log's entries alone: a block whose state was not committed is executed
again with the same entries after a restart and writes the same tiles, and no
checkpoint object ever names a tree whose tiles are not all in the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from protocol.ct_merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    perfect_levels,
    root_from_hashes,
    subtree_hash,
)
from protocol.ct_structs import (
    split_data_tile,
    tile_path,
    timestamped_entry_of_tile_leaf,
)

from ._errors import ObjectStoreError, ObjectStoreUnavailable, TileCorrupted, TileError
from ._files import fsync_directory, write_file
from ._objects import FilesystemObjects, ObjectStore


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Object store errors as :class:`TileError` saying ``what`` failed; an unreachable
    store stays :class:`ObjectStoreUnavailable`, for the caller to retry."""
    try:
        yield
    except ObjectStoreUnavailable:
        raise
    except ObjectStoreError as exc:
        raise TileError(f"{what}: {exc}") from exc


WIDTH = 256
HASH_SIZE = 32
TILE_BITS = 8
MAX_LEVEL = 5
"""Hash tiles exist at levels 0 to 5 (2**48 leaves)."""


@dataclass(slots=True)
class Bundle:
    """Every file one batch changes, keyed by path relative to the shard directory."""

    old_size: int
    old_root: bytes
    size: int
    root: bytes
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.size:012d}-{self.root.hex()}"

    def encode(self) -> bytes:
        out = bytearray(b"TCB1")
        out += self.old_size.to_bytes(8, "big") + self.old_root
        out += self.size.to_bytes(8, "big") + self.root
        for path, data in self.files.items():
            raw = path.encode()
            out += len(raw).to_bytes(2, "big") + raw + len(data).to_bytes(4, "big") + data
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Bundle:
        if data[:4] != b"TCB1" or len(data) < 84:
            raise TileCorrupted("not a tile bundle")
        bundle = cls(old_size=int.from_bytes(data[4:12], "big"), old_root=data[12:44],
                     size=int.from_bytes(data[44:52], "big"), root=data[52:84])
        pos = 84
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 2], "big")
            path = data[pos + 2:pos + 2 + n].decode()
            pos += 2 + n
            m = int.from_bytes(data[pos:pos + 4], "big")
            bundle.files[path] = data[pos + 4:pos + 4 + m]
            if len(bundle.files[path]) != m:
                raise TileCorrupted("truncated tile bundle")
            pos += 4 + m
        return bundle


@dataclass(frozen=True, slots=True)
class Appended:
    """One entry to append: its leaf hash, its TileLeaf and its names-tile record."""

    leaf_hash: bytes
    tile_leaf: bytes
    fingerprint: bytes
    names: tuple[str, ...]


class TileLog:
    """The Merkle tree and entries of one shard, stored as tiles in ``objects``.

    :param name: the shard's name in messages (its number).
    :param staging: the local directory for bundles staged before their checkpoint
        is committed; None for a remote store, which takes the tiles themselves
        before the commit (see the module's docstring).
    """

    def __init__(self, objects: ObjectStore, *, name: str, staging: Path | None,
                 cache_tiles: int = 1024, cache_data_tiles: int = 64) -> None:
        self.objects = objects
        self.name = name
        self.staging = staging
        self.size = 0
        """Committed size: readers see entries below it."""
        self.root = EMPTY_ROOT
        self._next_size = 0
        self._next_root = EMPTY_ROOT
        self._edge: list[list[bytes]] = [[] for _ in range(MAX_LEVEL + 1)]
        self._edge_data: list[bytes] = []
        self._edge_names: list[list[Any]] = []
        self._pending: dict[str, bytes] = {}
        self._fetched: dict[str, bytes | None] = {}
        """Tiles read ahead from a remote store for the computation under way
        (:meth:`reading`)."""
        self._cache: collections.OrderedDict[tuple[int, int], list[list[bytes]]] = \
            collections.OrderedDict()
        self._data_cache: collections.OrderedDict[int, tuple[list[bytes], list[Any]]] = \
            collections.OrderedDict()
        self._cache_tiles = cache_tiles
        self._cache_data_tiles = cache_data_tiles
        self._lock = threading.Lock()  # the caches, for readers on other threads

    @classmethod
    def in_directory(cls, directory: str | Path) -> TileLog:
        """The shard whose tiles (and staged bundles) are files under ``directory``."""
        path = Path(directory)
        return cls(FilesystemObjects(path), name=path.name, staging=path / "staging")

    def _where(self, path: str) -> str:
        """Where the object ``path`` is, for messages."""
        return f"{self.objects.location}/{path}"

    @property
    def appended(self) -> int:
        """Entries appended so far, committed or not."""
        return self._next_size

    # --- reading ----------------------------------------------------------------------

    def _read(self, path: str) -> bytes | None:
        pending = self._pending.get(path)
        if pending is not None:
            return pending
        if path in self._fetched:
            return self._fetched[path]
        try:
            return self.objects.get(path)
        except ObjectStoreError as exc:
            raise TileError(f"cannot read {self._where(path)}: {exc}") from exc

    def _full_tile_levels(self, level: int, index: int) -> list[list[bytes]]:
        key = (level, index)
        with self._lock:
            levels = self._cache.get(key)
            if levels is not None:
                self._cache.move_to_end(key)
                return levels
        data = self._read(tile_path(level, index))
        if data is None or len(data) != WIDTH * HASH_SIZE:
            raise TileCorrupted(f"shard {self.name}: hash tile "
                                f"{self._where(tile_path(level, index))} is missing or not "
                                "8192 bytes")
        levels = perfect_levels([data[i:i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)])
        # Authenticate the tile by its hash one level up (itself authenticated the same
        # way, up to the in-memory right edge that the committed root was checked against).
        if level < MAX_LEVEL and self.block(TILE_BITS * (level + 1), index) != levels[-1][0]:
            raise TileCorrupted(f"shard {self.name}: hash tile "
                                f"{self._where(tile_path(level, index))} does not match its "
                                "hash in the tile above (altered)")
        with self._lock:
            self._cache[key] = levels
            if len(self._cache) > self._cache_tiles:
                self._cache.popitem(last=False)
        return levels

    def block(self, height: int, index: int) -> bytes:
        """The hash of the perfect subtree of ``2**height`` leaves at ``index * 2**height``.

        The subtree must lie inside the tree as appended so far.
        """
        level, sub = divmod(height, TILE_BITS)
        first = index << sub                      # first node of the tile level
        tile, offset = divmod(first, WIDTH)
        if level > MAX_LEVEL:
            raise TileError(f"height {height} is beyond the tiles")
        if tile == self._next_size >> (TILE_BITS * (level + 1)):
            edge = self._edge[level]
            if offset + (1 << sub) > len(edge):
                raise TileError(f"subtree ({height}, {index}) is beyond the tree")
            if sub == 0:
                return edge[offset]
            return root_from_hashes(edge[offset:offset + (1 << sub)])
        return self._full_tile_levels(level, tile)[sub][offset >> sub]

    def mth(self, start: int, end: int) -> bytes:
        """``MTH(D[start:end])`` for a proof range within the committed tree."""
        if end > self.size:
            raise TileError(f"range [{start}, {end}) is beyond the tree size {self.size}")
        return subtree_hash(start, end, self.block)

    def root_at(self, size: int) -> bytes:
        """The Merkle Tree Hash of the first ``size`` entries (any committed size)."""
        if size == 0:
            return EMPTY_ROOT
        return self.mth(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return inclusion_proof(index, size, self.mth)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        return consistency_proof(first, second, self.mth)

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """Level-0 hashes of entries ``[start, end)``."""
        out: list[bytes] = []
        pos = start
        while pos < end:
            tile, offset = divmod(pos, WIDTH)
            stop = min(end, (tile + 1) * WIDTH)
            if tile == self._next_size >> TILE_BITS:
                out += self._edge[0][offset:offset + stop - pos]
            else:
                out += self._full_tile_levels(0, tile)[0][offset:offset + stop - pos]
            pos = stop
        return out

    def _data_tile(self, tile: int) -> tuple[list[bytes], list[Any]]:
        """The TileLeaf items and name records of a full data tile, checked against the
        level-0 hash tile (a tampered data tile raises :class:`TileCorrupted`)."""
        with self._lock:
            cached = self._data_cache.get(tile)
            if cached is not None:
                self._data_cache.move_to_end(tile)
                return cached
        data_path, names_path = tile_path("data", tile), tile_path("names", tile)
        data = self._read(data_path)
        names_raw = self._read(names_path)
        if data is None or names_raw is None:
            missing = data_path if data is None else names_path
            raise TileCorrupted(f"shard {self.name}: data tile {self._where(missing)} "
                                "is missing")
        try:
            items = split_data_tile(data)
            names = cbor2.loads(names_raw)
        except Exception as exc:
            raise TileCorrupted(f"shard {self.name}: data tile {self._where(data_path)} "
                                f"does not parse: {exc}") from exc
        hashes = self._full_tile_levels(0, tile)[0]
        self._check(tile * WIDTH, items, names, hashes, data_path)
        self._cache_data_tile(tile, items, names)
        return items, names

    def _cache_data_tile(self, tile: int, items: list[bytes], names: list[Any]) -> None:
        """Keep a full data tile's entries (read and checked, or just appended: a
        remote store is not asked again for what this log wrote)."""
        with self._lock:
            self._data_cache[tile] = (items, names)
            if len(self._data_cache) > self._cache_data_tiles:
                self._data_cache.popitem(last=False)

    def _check(self, start: int, items: Sequence[bytes], names: Sequence[Any],
               hashes: Sequence[bytes], path: str) -> None:
        """The data tile at ``path`` against its (already authenticated) leaf hashes."""
        if len(items) != len(hashes) or len(names) != len(hashes):
            raise TileCorrupted(f"shard {self.name}: data tile {self._where(path)} holds "
                                f"{len(items)} entries and {len(names)} name records, its "
                                f"hash tile {len(hashes)}")
        for i, item in enumerate(items):
            if leaf_hash(b"\x00\x00" + timestamped_entry_of_tile_leaf(item)) != hashes[i]:
                raise TileCorrupted(f"shard {self.name}: entry {start + i} does not match "
                                    f"its leaf hash (the data tile {self._where(path)} was "
                                    "altered)")

    def entries(self, start: int, end: int) -> list[tuple[bytes, Any]]:
        """``(TileLeaf, [sha256, names])`` of committed entries ``[start, end)``, each
        checked against its leaf hash."""
        if not 0 <= start <= end <= self.size:
            raise TileError(f"entries [{start}, {end}) are not within the tree size {self.size}")
        out: list[tuple[bytes, Any]] = []
        pos = start
        while pos < end:
            tile, offset = divmod(pos, WIDTH)
            stop = min(end, (tile + 1) * WIDTH)
            if tile == self._next_size >> TILE_BITS:
                items = self._edge_data[offset:offset + stop - pos]
                names: Sequence[Any] = self._edge_names[offset:offset + stop - pos]
            else:
                all_items, all_names = self._data_tile(tile)
                items = all_items[offset:offset + stop - pos]
                names = all_names[offset:offset + stop - pos]
            out += zip(items, names, strict=True)
            pos = stop
        return out

    # --- reading ahead from a remote store --------------------------------------------------
    #
    # Reads are synchronous and run on the event loop, which is right for local files
    # (the page cache) but not for a bucket. So a caller first asks which tiles a
    # computation will read (the proof's shape depends on its sizes, not on the hashes),
    # fetches the ones not in memory on a worker thread, then computes on the loop with
    # those bytes at hand; they are authenticated as they are used, as any read is.

    @property
    def remote(self) -> bool:
        """Whether the tiles are in a remote store (worth reading ahead off the loop)."""
        return self.staging is None

    def _tiles_of_block(self, height: int, index: int, out: set[tuple[int, int]]) -> None:
        """The full hash tiles :meth:`block` reads for ``(height, index)`` (the tile and
        the tiles above it that authenticate it, up to the in-memory edge)."""
        level, sub = divmod(height, TILE_BITS)
        tile = (index << sub) // WIDTH
        if level > MAX_LEVEL or tile == self._next_size >> (TILE_BITS * (level + 1)):
            return
        out.add((level, tile))
        if level < MAX_LEVEL:
            self._tiles_of_block(TILE_BITS * (level + 1), tile, out)

    def _hash_tile_paths(self, tiles: set[tuple[int, int]]) -> list[str]:
        with self._lock:
            return [tile_path(level, tile) for level, tile in sorted(tiles)
                    if (level, tile) not in self._cache]

    def paths_for_proof(self, kind: str, first: int, second: int) -> list[str]:
        """The uncached tiles an ``"inclusion"`` proof of leaf ``first`` in the tree of
        ``second`` leaves, or a ``"consistency"`` proof from ``first`` to ``second``,
        will read."""
        tiles: set[tuple[int, int]] = set()

        def block(height: int, index: int) -> bytes:
            self._tiles_of_block(height, index, tiles)
            return bytes(HASH_SIZE)

        def mth(start: int, end: int) -> bytes:
            return subtree_hash(start, end, block)

        if kind == "inclusion":
            inclusion_proof(first, second, mth)
        else:
            consistency_proof(first, second, mth)
        return self._hash_tile_paths(tiles)

    def paths_for_entries(self, start: int, end: int) -> list[str]:
        """The uncached tiles :meth:`entries` of ``[start, end)`` will read."""
        tiles: set[tuple[int, int]] = set()
        paths: list[str] = []
        edge = self._next_size >> TILE_BITS
        for tile in range(start // WIDTH, (end - 1) // WIDTH + 1 if end > start else 0):
            with self._lock:
                cached = tile in self._data_cache
            if tile == edge or cached:
                continue
            paths += [tile_path("data", tile), tile_path("names", tile)]
            tiles.add((0, tile))  # its leaf hashes, authenticated by the tiles above
            self._tiles_of_block(TILE_BITS, tile, tiles)
        return paths + self._hash_tile_paths(tiles)

    async def fetch(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        """The objects ``paths`` names that are not being written, read on a worker
        thread; nothing for a local directory (its reads are cheap where they are).

        :raises TileError: the store cannot be read.
        """
        wanted = [p for p in paths if p not in self._pending]
        if not self.remote or not wanted:
            return {}
        loop = asyncio.get_running_loop()

        def read() -> dict[str, bytes | None]:
            with _translated("cannot read tiles"):
                return {path: self.objects.get(path) for path in wanted}

        return await loop.run_in_executor(None, read)

    @contextlib.contextmanager
    def reading(self, fetched: dict[str, bytes | None]) -> Iterator[None]:
        """Compute with ``fetched`` (from :meth:`fetch`) at hand. Use it without awaiting
        inside, so that no other computation sees these bytes."""
        self._fetched = fetched
        try:
            yield
        finally:
            self._fetched = {}

    # --- appending ----------------------------------------------------------------------

    def append(self, entries: Sequence[Appended]) -> Bundle:
        """Extend the in-memory tree by ``entries``; return the files to make durable.

        Nothing is visible to readers until :meth:`publish`.
        """
        bundle = Bundle(old_size=self._next_size, old_root=self._next_root, size=0, root=b"")
        files = bundle.files
        for entry in entries:
            self._edge_data.append(entry.tile_leaf)
            self._edge_names.append([entry.fingerprint, list(entry.names)])
            self._push(0, entry.leaf_hash, files)
            self._next_size += 1
            if len(self._edge_data) == WIDTH:
                tile = (self._next_size >> TILE_BITS) - 1
                files[tile_path("data", tile)] = b"".join(self._edge_data)
                files[tile_path("names", tile)] = cbor2.dumps(self._edge_names)
                self._cache_data_tile(tile, self._edge_data, self._edge_names)
                self._edge_data = []
                self._edge_names = []
        size = self._next_size
        for level in range(MAX_LEVEL + 1):
            width = len(self._edge[level])
            if width:
                files[tile_path(level, size >> (TILE_BITS * (level + 1)), width)] = \
                    b"".join(self._edge[level])
        if self._edge_data:
            tile = size >> TILE_BITS
            files[tile_path("data", tile, len(self._edge_data))] = b"".join(self._edge_data)
            files[tile_path("names", tile, len(self._edge_data))] = cbor2.dumps(self._edge_names)
        self._pending.update(files)
        self._next_root = subtree_hash(0, size, self.block) if size else EMPTY_ROOT
        bundle.size = size
        bundle.root = self._next_root
        return bundle

    def _push(self, level: int, value: bytes, files: dict[str, bytes]) -> None:
        edge = self._edge[level]
        edge.append(value)
        if len(edge) == WIDTH:
            tile = (self._next_size + 1 >> (TILE_BITS * (level + 1))) - 1
            data = b"".join(edge)
            files[tile_path(level, tile)] = data
            levels = perfect_levels(edge)
            with self._lock:
                self._cache[(level, tile)] = levels
                if len(self._cache) > self._cache_tiles:
                    self._cache.popitem(last=False)
            self._edge[level] = []
            if level < MAX_LEVEL:
                self._push(level + 1, levels[-1][0], files)

    def write_bundle(self, bundle: Bundle, checkpoint_note: bytes) -> None:
        """Make ``bundle`` durable before its checkpoint is committed: staged locally
        (one file, fsync), or for a remote store its tiles written to the store.
        Blocking: call from a worker thread.

        :raises ObjectStoreUnavailable: the remote store cannot be reached (retry).
        """
        if self.staging is None:
            with _translated("cannot write the tiles"):
                self.objects.put_many(bundle.files)
            bundle.files["checkpoint"] = checkpoint_note
            return
        bundle.files["checkpoint"] = checkpoint_note
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            write_file(self.staging / bundle.name, bundle.encode())
            fsync_directory(self.staging)
        except OSError as exc:
            raise TileError(f"cannot write the tile bundle: {exc}") from exc

    def publish(self, bundle: Bundle) -> None:
        """The bundle's checkpoint is committed: readers may see its entries."""
        self.size = bundle.size
        self.root = bundle.root

    def install(self, bundle: Bundle) -> None:
        """Write the bundle's files in place (durably; for a remote store, which has the
        tiles already, only the checkpoint), then drop the bundle and the partial
        tiles that full tiles replace. Blocking: call from a worker thread.

        :raises ObjectStoreUnavailable: the remote store cannot be reached (retry).
        """
        with _translated("cannot install tiles"):
            if self.staging is None:
                self.objects.put("checkpoint", bundle.files["checkpoint"])
            else:
                self.objects.put_many(bundle.files)
            for path in bundle.files:
                if path.startswith("tile/") and ".p/" not in path:
                    for stale in self.objects.list(f"{path}.p/"):
                        self.objects.delete(stale)
        if self.staging is not None:
            try:
                (self.staging / bundle.name).unlink(missing_ok=True)
            except OSError as exc:
                raise TileError(f"cannot remove the installed bundle: {exc}") from exc

    def installed(self, bundle: Bundle) -> None:
        """After :meth:`install`: read the bundle's tiles from the store from now on.
        (Call on the thread that appends.)"""
        for path, data in bundle.files.items():
            if self._pending.get(path) is data:
                del self._pending[path]

    # --- the shard's other files ---------------------------------------------------------

    def stage_issuer(self, bundle: Bundle, fingerprint: bytes, der: bytes) -> None:
        """Add an issuer certificate (``issuer/<sha256 hex>``) to ``bundle``'s files."""
        bundle.files[f"issuer/{fingerprint.hex()}"] = der

    def issuers(self) -> dict[bytes, bytes]:
        """SHA-256 -> DER of every issuer certificate stored with the shard."""
        found: dict[bytes, bytes] = {}
        with _translated(f"cannot read the issuers in {self._where('issuer')}"):
            for key in self.objects.list("issuer/"):
                der = self.objects.get(key)
                try:
                    fingerprint = bytes.fromhex(key.rsplit("/", 1)[-1])
                except ValueError:
                    continue  # not ours
                if der is not None:
                    found[fingerprint] = der
        return found

    def write_checkpoint(self, note: bytes) -> None:
        """Replace the ``checkpoint`` object (static-ct-api) with ``note``, durably.
        Blocking: call from a worker thread when the store is remote."""
        with _translated(f"cannot write {self._where('checkpoint')}"):
            self.objects.put("checkpoint", note)

    def write_public_key(self, pem: bytes) -> None:
        """``log-key.pem``: the shard's public key, for readers of the tiles alone."""
        with _translated(f"cannot write {self._where('log-key.pem')}"):
            if self.objects.get("log-key.pem") != pem:
                self.objects.put("log-key.pem", pem)

    # --- recovery -------------------------------------------------------------------------

    def recover(self, size: int, root: bytes) -> int:
        """Load the committed tree (``size``, ``root``) from disk after a start or a crash.

        Re-installs the staged bundles that lead to the committed checkpoint,
        discards the others (never committed), rebuilds the right edge, checks
        that the tiles give ``root``, and checks the tiles written last (the
        full tiles the re-installed bundles touched, else the last full tile)
        against it. Returns the number of bundles re-installed.

        :raises TileCorrupted: a tile is missing or does not agree with the committed
            root (the message names the file).
        """
        chain, stale = self._committed_chain(size, root)
        for bundle in stale:  # not on the committed chain: never committed
            if self.staging is not None:
                (self.staging / bundle.name).unlink(missing_ok=True)
        self._pending.clear()
        for bundle in reversed(chain):
            self.install(bundle)
        self._load(size, root)
        first = min((b.old_size for b in chain), default=max(0, size - WIDTH))
        self._check_full_tiles(first, size)
        return len(chain)

    def check(self, size: int, root: bytes) -> None:
        """Verify the committed tree (``size``, ``root``) and every tile below it,
        writing nothing (``trustchain ct check``; the node may be running).

        Staged bundles of the committed chain are read in place, as :meth:`recover`
        would install them.

        :raises TileCorrupted: at the first damaged tile (the message names the file).
        """
        chain, _ = self._committed_chain(size, root, discard_cut=False)
        self._pending.clear()
        for bundle in reversed(chain):
            self._pending.update(bundle.files)
        self._load(size, root)
        self.verify_all()

    def _committed_chain(self, size: int, root: bytes, *, discard_cut: bool = True
                         ) -> tuple[list[Bundle], list[Bundle]]:
        """The staged bundles leading to (``size``, ``root``), newest first, and the
        staged bundles off that chain. A bundle cut short by a crash (never committed)
        is deleted unless ``discard_cut`` is false."""
        staging = self.staging
        bundles: dict[tuple[int, bytes], Bundle] = {}
        if staging is not None and staging.is_dir():
            for path in sorted(staging.iterdir()):
                if path.name.startswith("."):
                    if discard_cut:
                        path.unlink(missing_ok=True)
                    continue
                try:
                    bundle = Bundle.decode(path.read_bytes())
                except (TileCorrupted, UnicodeDecodeError):
                    if discard_cut:
                        path.unlink()
                    continue
                bundles[(bundle.size, bundle.root)] = bundle
        chain: list[Bundle] = []
        key = (size, root)
        while key in bundles:
            bundle = bundles.pop(key)
            chain.append(bundle)
            key = (bundle.old_size, bundle.old_root)
        return chain, list(bundles.values())

    def _load(self, size: int, root: bytes) -> None:
        """Take (``size``, ``root``) as the committed tree: the right edge's hash tiles
        are checked against ``root`` before its data tile is checked against them, so
        that damage is blamed on the file that has it."""
        self._load_edge_hashes(size)
        self.size = self._next_size = size
        computed = self.root_at(size) if size else EMPTY_ROOT
        if computed != root:
            raise TileCorrupted(f"shard {self.name}: the hash tiles give root "
                                f"{computed.hex()} for size {size}, the committed checkpoint "
                                f"{root.hex()} (a hash tile under {self._where('tile')} was "
                                "altered)")
        self.root = self._next_root = root
        self._load_edge_data(size)

    def _check_full_tiles(self, start: int, end: int) -> None:
        """Check the full data tiles holding entries ``[start, end)`` against their hash
        tiles (each authenticated up to the committed root)."""
        for tile in range(start // WIDTH, end // WIDTH):
            self._data_tile(tile)

    def _load_edge_hashes(self, size: int) -> None:
        self._edge = [[] for _ in range(MAX_LEVEL + 1)]
        for level in range(MAX_LEVEL + 1):
            width = (size >> (TILE_BITS * level)) % WIDTH
            if not width:
                continue
            index = size >> (TILE_BITS * (level + 1))
            path = tile_path(level, index, width)
            data = self._read(path)
            if data is None or len(data) != width * HASH_SIZE:
                raise TileCorrupted(f"shard {self.name}: partial hash tile "
                                    f"{self._where(path)} is missing or not "
                                    f"{width * HASH_SIZE} bytes")
            self._edge[level] = [data[i:i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]

    def _load_edge_data(self, size: int) -> None:
        width = size % WIDTH
        self._edge_data, self._edge_names = [], []
        if width:
            index = size >> TILE_BITS
            data_path, names_path = tile_path("data", index, width), tile_path("names", index,
                                                                               width)
            data = self._read(data_path)
            names = self._read(names_path)
            if data is None or names is None:
                missing = data_path if data is None else names_path
                raise TileCorrupted(f"shard {self.name}: partial data tile "
                                    f"{self._where(missing)} is missing")
            try:
                self._edge_data = split_data_tile(data)
                self._edge_names = cbor2.loads(names)
            except Exception as exc:
                raise TileCorrupted(f"shard {self.name}: partial data tile "
                                    f"{self._where(data_path)} does not parse: {exc}") from exc
            self._check(index * WIDTH, self._edge_data, self._edge_names, self._edge[0],
                        data_path)

    def verify_all(self) -> None:
        """Recompute the whole tree from the data tiles and compare every hash tile and
        the root (slow: an audit of the shard).

        :raises TileCorrupted: at the first disagreement.
        """
        size = self.size
        leaf_hashes: list[bytes] = []
        for start in range(0, size, WIDTH):
            end = min(size, start + WIDTH)
            for item, _ in self.entries(start, end):
                leaf_hashes.append(leaf_hash(b"\x00\x00" + timestamped_entry_of_tile_leaf(item)))
        level_hashes = leaf_hashes
        for level in range(MAX_LEVEL + 1):
            for tile in range(len(level_hashes) // WIDTH):
                expected = b"".join(level_hashes[tile * WIDTH:(tile + 1) * WIDTH])
                if self._read(tile_path(level, tile)) != expected:
                    raise TileCorrupted(f"shard {self.name}: hash tile "
                                        f"{self._where(tile_path(level, tile))} does not match "
                                        "the entries")
            level_hashes = [root_from_hashes(level_hashes[i:i + WIDTH])
                            for i in range(0, len(level_hashes) - WIDTH + 1, WIDTH)]
            if not level_hashes:
                break
        if root_from_hashes(leaf_hashes) != self.root:
            raise TileCorrupted(f"shard {self.name}: the entries do not give the root")

