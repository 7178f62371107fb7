"""CT log benchmark: blocks of entries, SCTs, add-chain, proofs at 10M entries, subscriptions.

::

    python -m bench.ct                    # 10,000,000 entries for the proof tests
    python -m bench.ct --entries 1000000  # a smaller log, quicker
    python -m bench.ct --quick            # shorter runs, 250,000 entries

Prints one Markdown table on stdout (each figure beside a baseline measured in
the same run, and their ratio), progress on stderr. Everything runs on
``[::1]`` in a temporary directory; every child process is stopped at the end.

The log is block-driven: a node appends a committed block's entries
(``CtLog.append``: tiles in memory, the replicated rows into the block's
state transaction), stages the tiles (``CtLog.stage``, fsync), commits the
block's state (``StateDatabase.apply``, fsync), then publishes the entries
(``CtLog.published``); each SCT is signed afterwards, on demand
(``CtLog.sct``).

1. **Sequencer** (in this process, the block path without consensus):
   synthetic x509 entries in blocks of 1,000 (``consensus.max_block_decisions``),
   entries/s, beside the tiles alone (the same entries appended, staged with
   fsync and installed, no state); SCTs signed on demand for every entry,
   beside the bare ECDSA signature of the same leaves; then a steady offered
   rate, half of what those two together sustain (open loop, blocks back to
   back, each taking what arrived meanwhile): submission-to-SCT p50/p99 beside
   one entry alone on an idle log.
   The same again with the tiles in S3 (a throwaway one-host Ceph RADOS
   Gateway on ``[::1]``, ``tests.s3_server``; ``--no-s3`` skips it), at the
   filesystem run's steady rate: entries/s and submission-to-SCT p50/p99 beside
   the filesystem's.
2. **add-chain over QUIC**: a ``trustchain serve`` child (a validator alone:
   every chain a ``log`` decision committed in a block) that accepts a
   benchmark root (``ct.extra_roots``); a load-generator child sends real
   chains (leaf + intermediate, ECDSA P-256) with 256 requests in flight,
   beside ``node.health`` from the same client at the same concurrency.
3. **Bulk loader**: a log of ``--entries`` entries (tiles, the leaf-hash index
   in the replicated state with its hash, a signed tree head) written straight
   to storage, beside the sequencer's block path; then the start of a node on
   it, beside the start of a node with an empty log.
4. **Proofs at that size**: ``get-proof-by-hash`` and ``get-sth-consistency``
   for random leaves and sizes, in process (the op's handler beside the tiles'
   proof alone) and over QUIC from a client (one request at a time, beside
   ``node.health`` round trips on the same connection).
5. **Subscriptions**: ``ct.subscribe`` from index 0 of that log, for 1 and 10
   subscribers (in a child process), entries/s and MB/s, beside the bare QUIC
   one-stream bulk throughput of the same engine (``bench._common`` echo
   server) in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from handlers import RequestContext
from handlers.ct import ChainValidator, CheckedChain, CtBatch, CtLog, CtService, Entry, Logged
from protocol import Peer
from protocol.ct_structs import (
    TileLeaf,
    digitally_signed,
    leaf_index_extensions,
    signed_checkpoint,
    tree_head_signed_data,
)
from protocol.ops import ct as ops
from store import (
    Appended,
    AwsCredentials,
    FilesystemObjects,
    MultisetHash,
    Row,
    S3Location,
    S3Objects,
    SoftwareKeyStore,
    StateChanges,
    StateDatabase,
    TileDirectory,
    TreeHead,
    state_hash,
)

from ._common import (
    ECHO_ALPN,
    FINGERPRINT,
    LISTENING,
    Child,
    Children,
    LoadSpec,
    load_in_child,
    make_certificate,
    markdown_table,
    percentile,
)

CTX = RequestContext(peer=Peer(address="::1", port=0, alpn="stoq/1"), op="bench",
                     received_at=0.0)
ORIGIN = "trustchain-ct-development"
"""``ct.log_id`` of the development configuration: the origin a node gives its log."""
BLOCK = 1000
"""Entries a block carries in the sequencer tests (``consensus.max_block_decisions``)."""
IN_FLIGHT = 256
LIMIT = 120.0
"""Seconds any one measured loop may run; it stops there whatever its count."""


def progress(message: str) -> None:
    print(f"[bench.ct] {message}", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}" if baseline else "-"


# --- certificates ---------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path) -> tuple[Any, x509.Certificate, Any, x509.Certificate]:
    """A root and an intermediate for the benchmark's chains; the root's PEM is written."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(_name("Bench Root"))
            .issuer_name(_name("Bench Root")).public_key(root_key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    inter = (x509.CertificateBuilder().subject_name(_name("Bench Issuing"))
             .issuer_name(root.subject).public_key(key.public_key())
             .serial_number(2).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(root_key, hashes.SHA256()))
    (directory / "bench-root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (directory / "bench-issuing.pem").write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    (directory / "bench-issuing.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return root_key, root, key, inter


def make_leaves(key: Any, inter: x509.Certificate, count: int) -> list[bytes]:
    now = datetime.datetime.now(datetime.UTC)
    subject_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    out = []
    for i in range(count):
        cert = (x509.CertificateBuilder().subject_name(_name(f"h{i}.bench.trust"))
                .issuer_name(inter.subject).public_key(subject_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(f"h{i}.bench.trust")]), critical=False)
                .sign(key, hashes.SHA256()))
        out.append(cert.public_bytes(serialization.Encoding.DER))
    return out


# --- one validator's CT log, without consensus -----------------------------------------------


class LogNode:
    """One validator's CT log on its replicated state, under ``directory``, executing
    blocks of entries as ``handlers.replica.CaStateMachine.execute`` does: append (rows
    into the block's state transaction), stage (tiles durable), ``StateDatabase.apply``
    (the block's one transaction), published."""

    def __init__(self, directory: Path, tiles: TileDirectory | None = None) -> None:
        self.keystore = SoftwareKeyStore(directory / "keys")
        self.state = StateDatabase(directory / "state" / "state.sqlite3")
        self.log = CtLog(tiles=tiles or TileDirectory.in_directory(directory / "ct"),
                         state=self.state, keystore=self.keystore, origin=ORIGIN)
        self.log.open()
        self.rows = MultisetHash.of(self.state.rows())
        self.height = self.state.height()

    async def block(self, entries: list[Entry], time_ms: int) -> CtBatch:
        rows = self.rows.copy()
        height = self.height + 1
        changes = StateChanges(height=height,
                               block_id=hashlib.sha256(b"bench block %d" % height).digest(),
                               rows_hash=rows, state_hash=b"")
        batch = self.log.append(entries, time_ms, changes, rows)
        changes.state_hash = state_hash(height, rows)
        await self.log.stage(batch)
        await asyncio.get_running_loop().run_in_executor(None, self.state.apply, changes)
        self.rows, self.height = rows, height
        self.log.published(batch)
        return batch

    async def close(self) -> None:
        await self.log.stop()
        await self.state.drain()
        self.state.close()
        self.keystore.close()


# --- 1. the sequencer ------------------------------------------------------------------------


def synthetic_chain(i: int) -> CheckedChain:
    der = b"\x30\x82\x02\x00" + i.to_bytes(8, "big") + bytes(500)
    return CheckedChain(leaf_der=der, issuers=(b"issuer" * 100,), issuer_key_hash=bytes(32),
                        tbs=b"", names=(f"s{i}.bench.trust",),
                        spki_sha256=hashlib.sha256(der).digest())


def tile_entry(index: int, der: bytes, head: bytes, tail: bytes, name: str) -> Appended:
    """One x509 entry as the tiles hold it (what ``CtLog.append`` makes of a chain):
    ``head`` is the timestamp and entry type, ``tail`` the chain's fingerprints."""
    sha256 = hashlib.sha256
    te = head + len(der).to_bytes(3, "big") + der + b"\x00\x08" + leaf_index_extensions(index)
    return Appended(sha256(b"\x00\x00\x00" + te).digest(), te + tail, sha256(der).digest(),
                    (name,))


@dataclass
class SequencerFigures:
    entries: int
    blocks: int
    rate: float
    tiles_rate: float
    sct_rate: float
    sign_rate: float
    steady_offered: float
    steady_achieved: float
    steady_blocks: int
    p50: float
    p99: float
    idle_p50: float
    idle_p99: float


async def bench_sequencer(tmp: Path, count: int, load: float, steady_seconds: float,
                          idle_count: int, *, tiles: TileDirectory | None = None,
                          steady_rate: int | None = None, name: str = "seq"
                          ) -> SequencerFigures:
    """``load``: the steady test's offered rate, as a fraction of the capacity measured
    first (blocks and SCTs together), unless ``steady_rate`` gives it. ``tiles``: where
    the log's tiles go (default: files under ``tmp``)."""
    node = LogNode(tmp / name, tiles)
    try:
        return await _sequencer(node, tmp, count, load, steady_seconds, idle_count,
                                steady_rate)
    finally:
        await node.close()


async def _sequencer(node: LogNode, tmp: Path, count: int, load: float,
                     steady_seconds: float, idle_count: int,
                     steady_rate: int | None) -> SequencerFigures:
    log = node.log
    loop = asyncio.get_running_loop()
    entries = [Entry(chain=synthetic_chain(i), precert=False) for i in range(count)]
    # blocks back to back, each durable and published before the next (as a node runs them)
    logged: list[Logged] = []
    blocks = 0
    started = time.perf_counter()
    for start in range(0, count, BLOCK):
        batch = await node.block(entries[start:start + BLOCK], int(time.time() * 1000))
        logged += batch.logged
        blocks += 1
        if time.perf_counter() - started > LIMIT:
            break
    elapsed = time.perf_counter() - started
    sequenced = len(logged)
    # SCTs on demand, each once (signed, kept in the state's own rows)
    started = time.perf_counter()
    for item in logged:
        log.sct(item)
    await node.state.drain()
    sct_elapsed = time.perf_counter() - started
    # baselines: the bare ECDSA signature of the same leaves; the tiles alone
    shard = log.active
    leaves = [TileLeaf.parse(item).entry.merkle_tree_leaf()
              for item, _ in shard.tiles.entries(0, min(sequenced, 5000))]
    signer = shard.signer
    started = time.perf_counter()
    for leaf in leaves:
        signer.sign(leaf)
    sign_rate = len(leaves) / (time.perf_counter() - started)
    tiles = TileDirectory.in_directory(Path(tempfile.mkdtemp(dir=tmp, prefix="tiles-"))
                                       ).shard(0)
    issuer = b"issuer" * 100
    tail = b"\x00\x20" + hashlib.sha256(issuer).digest()
    started = time.perf_counter()
    for start in range(0, sequenced, BLOCK):
        head = struct.pack(">QH", int(time.time() * 1000), 0)
        bundle = tiles.append([tile_entry(i, e.chain.leaf_der, head, tail, e.chain.names[0])
                               for i, e in enumerate(entries[start:start + BLOCK], start)])
        if start == 0:
            tiles.stage_issuer(bundle, hashlib.sha256(issuer).digest(), issuer)
        await loop.run_in_executor(None, tiles.write_bundle, bundle, b"checkpoint")
        tiles.publish(bundle)
        await loop.run_in_executor(None, tiles.install, bundle)
        tiles.installed(bundle)
    tiles_rate = sequenced / (time.perf_counter() - started)
    # one entry alone on an idle log: submission to SCT
    idle: list[float] = []
    for i in range(idle_count):
        await asyncio.sleep(0.005)
        t = time.perf_counter()
        batch = await node.block([Entry(chain=synthetic_chain(count + i), precert=False)],
                                 int(time.time() * 1000))
        log.sct(batch.logged[0])
        idle.append(time.perf_counter() - t)
    # half of what the block path and the SCTs together can do: a steady load, not a
    # backlog (whose latency would only say how long the queue got)
    capacity = 1 / (elapsed / sequenced + sct_elapsed / sequenced)
    steady_rate = steady_rate or max(100, round(capacity * load / 100) * 100)
    steady = await _steady(node, count + idle_count, steady_rate, steady_seconds)
    idle.sort()
    return SequencerFigures(
        entries=sequenced, blocks=blocks, rate=sequenced / elapsed, tiles_rate=tiles_rate,
        sct_rate=sequenced / sct_elapsed, sign_rate=sign_rate,
        steady_offered=steady_rate, steady_achieved=steady[0], steady_blocks=steady[1],
        p50=percentile(steady[2], 0.5), p99=percentile(steady[2], 0.99),
        idle_p50=percentile(idle, 0.5), idle_p99=percentile(idle, 0.99))


async def _steady(node: LogNode, first: int, rate: int, seconds: float
                  ) -> tuple[float, int, list[float]]:
    """Submissions at ``rate`` a second for ``seconds`` (open loop); blocks run back to
    back, each taking up to :data:`BLOCK` of what arrived meanwhile. Returns the rate
    achieved, the blocks and the sorted submission-to-SCT latencies."""
    loop = asyncio.get_running_loop()
    pending: list[tuple[Entry, float, asyncio.Future[float]]] = []
    wake = asyncio.Event()
    stopping = False
    blocks = 0

    async def executor() -> None:
        nonlocal blocks
        while True:
            if not pending:
                if stopping:
                    return
                wake.clear()
                await wake.wait()
                continue
            taken, pending[:BLOCK] = pending[:BLOCK], []
            batch = await node.block([e for e, _, _ in taken], int(time.time() * 1000))
            blocks += 1
            for (_, submitted, done), logged in zip(taken, batch.logged, strict=True):
                node.log.sct(logged)
                done.set_result(time.perf_counter() - submitted)

    task = asyncio.ensure_future(executor())
    futures: list[asyncio.Future[float]] = []
    total = int(rate * seconds)
    begin = time.perf_counter()
    try:
        for i in range(total):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            done: asyncio.Future[float] = loop.create_future()
            pending.append((Entry(chain=synthetic_chain(first + i), precert=False),
                            time.perf_counter(), done))
            futures.append(done)
            wake.set()
        stopping = True
        wake.set()
        await asyncio.wait_for(task, LIMIT)
    finally:
        if not task.done():
            task.cancel()
    achieved = total / (time.perf_counter() - begin)
    return achieved, blocks, sorted(f.result() for f in futures)


# --- 2. add-chain over QUIC ------------------------------------------------------------------


@dataclass(frozen=True)
class AddChainSpec:
    port: int
    pin: str
    engine: str
    directory: str
    count: int
    in_flight: int
    seconds: float
    """Longest time each of the two loops may run."""


async def closed_loop(client: stoq.AsyncClient, requests: list[tuple[str, dict[str, Any]]],
                      in_flight: int, seconds: float) -> dict[str, Any]:
    """``requests`` with ``in_flight`` of them outstanding at any time, for at most
    ``seconds``: the rate and p50/p99 of those answered."""
    queue = iter(requests)
    latencies: list[float] = []
    errors = 0
    first_error = ""
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors, first_error
        for op, args in queue:
            if time.perf_counter() >= deadline:
                return
            t = time.perf_counter()
            try:
                await client.request(op, args)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                continue
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"count": len(latencies), "rate": len(latencies) / elapsed, "errors": errors,
            "first_error": first_error, "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99)}


async def run_add_chain(spec: AddChainSpec) -> dict[str, Any]:
    directory = Path(spec.directory)
    inter = x509.load_pem_x509_certificate((directory / "bench-issuing.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "bench-issuing.key").read_bytes(),
                                             None)
    leaves = make_leaves(key, inter, spec.count)
    inter_der = inter.public_bytes(serialization.Encoding.DER)
    client = await stoq.connect("::1", spec.port, pin=spec.pin, engine=spec.engine,
                                keep_alive_interval=None, timeout=30)
    try:
        health = await closed_loop(client, [("node.health", {})] * (spec.count * 4),
                                   spec.in_flight, min(spec.seconds, 3.0))
        add = await closed_loop(client, [("ct.add-chain", {"chain": [der, inter_der]})
                                         for der in leaves], spec.in_flight, spec.seconds)
    finally:
        await client.close()
    return {"health": health, "add": add}


CONFIG = """
[network]
quic_engine = "qh3"
[logging]
level = "warning"
[ct]
extra_roots = ["{root}"]
"""


def start_node(children: Children, tmp: Path, name: str, data_dir: Path,
               timeout: float = 120.0) -> tuple[Child, int, str, float]:
    """``trustchain serve`` on ``data_dir``: the child, its port and pin, and the seconds
    from its start to its listening line."""
    config = tmp / f"{name}.toml"
    config.write_text(CONFIG.format(root=tmp / "bench-root.pem"))
    argv = [sys.executable, "-m", "trustchain", "serve", "--config", str(config), "--data-dir",
            str(data_dir), "--listen", "[::1]:0"]
    started = time.perf_counter()
    child = children.start(name, argv, tmp / f"{name}.log")
    port = int(child.wait_for(LISTENING, timeout).group(2))
    took = time.perf_counter() - started
    pin = child.wait_for(FINGERPRINT, 30.0).group(1)
    return child, port, pin, took


def run_child(children: Children, tmp: Path, name: str, argv: list[str],
              timeout: float) -> dict[str, Any]:
    child = children.start(name, [sys.executable, "-m", "bench.ct", *argv], tmp / f"{name}.log")
    try:
        status = child.wait(timeout)
        lines = child.output()
        if status != 0 or not lines:
            raise RuntimeError(f"{name} failed with status {status}{child.stderr_tail()}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    finally:
        children.stop(child)


# --- 3. the bulk loader ----------------------------------------------------------------------


def bulk_load(data_dir: Path, count: int, chunk: int = 65_536,
              limit: float = 900.0) -> tuple[float, int]:
    """A log of ``count`` synthetic x509 entries written straight to storage, as a node
    opens it: the tiles (installed without fsync, the file system synced once), the
    leaf-hash index (``ct_leaves`` rows) and the shard's size and root (``ct_shards``)
    in the replicated state, written as its genesis (height 0) with the rows' hash the
    node checks at start, then one signed tree head. Returns entries/s and the entries
    loaded: ``count``, or fewer if ``limit`` seconds went by first. The node finds the
    log's key (``ct-log-0``) in the development keystore of ``data_dir``."""
    keystore = SoftwareKeyStore(data_dir / "keys")
    state = StateDatabase(data_dir / "state" / "state.sqlite3")
    bulk = TileDirectory(FilesystemObjects(data_dir / "ct", durable=False),
                         staging=data_dir / "ct")
    log = CtLog(tiles=bulk, state=state, keystore=keystore, origin=ORIGIN)
    log.open()
    shard = log.active
    tiles = shard.tiles
    issuer = b"bulk issuer certificate" * 20
    chain_fp = hashlib.sha256(issuer).digest()
    tail = b"\x00\x20" + chain_fp
    timestamp = int(time.time() * 1000)
    head = struct.pack(">QH", timestamp, 0)
    rows = MultisetHash()
    started = time.perf_counter()
    done = 0
    while done < count:
        n = min(chunk, count - done)
        appended = [tile_entry(i, b"\x30\x82\x01\xf8" + i.to_bytes(8, "big") + bytes(492),
                               head, tail, f"b{i}.bulk.trust") for i in range(done, done + n)]
        bundle = tiles.append(appended)
        if done == 0:
            tiles.stage_issuer(bundle, chain_fp, issuer)
        tiles.install(bundle)
        tiles.installed(bundle)
        tiles.publish(bundle)
        leaves: list[Row] = sorted(("ct_leaves", a.leaf_hash, 0, i)
                                   for i, a in enumerate(appended, done))
        done += n
        if done < count and time.perf_counter() - started > limit:
            progress(f"bulk load: stopped at {done:,} entries after {limit:g} s")
            count = done
        if done == count:
            leaves.append(("ct_shards", 0, count, tiles.root))
        for row in leaves:
            rows.add(row)
        state.write_genesis(leaves, rows, state_hash(0, rows))
        if done % (chunk * 16) == 0 or done == count:
            rate = done / (time.perf_counter() - started)
            progress(f"bulk load: {done:,} entries, {rate:,.0f}/s")
    os.sync()  # every tile durable before the tree head that covers them is saved
    signature = digitally_signed(shard.signer.sign(tree_head_signed_data(
        timestamp, count, tiles.root)))
    note = signed_checkpoint(shard.origin, count, tiles.root, timestamp, signature,
                             shard.log_id)
    state.save_own(heads=[TreeHead(shard=0, size=count, root=tiles.root, timestamp=timestamp,
                                   signature=signature, note=note)])
    tiles.write_checkpoint(note.encode())
    elapsed = time.perf_counter() - started
    state.close()
    keystore.close()
    return count / elapsed, count


# --- 4. proofs ------------------------------------------------------------------------------


@dataclass
class ProofFigures:
    size: int
    samples: int
    by_hash: tuple[float, float]
    by_hash_tiles: tuple[float, float]
    consistency: tuple[float, float]
    consistency_tiles: tuple[float, float]


def _p(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return percentile(samples, 0.5), percentile(samples, 0.99)


def _timed(into: list[float], fn: Callable[..., Any], *args: Any) -> Any:
    t = time.perf_counter()
    result = fn(*args)
    into.append(time.perf_counter() - t)
    return result


def bench_proofs_in_process(data_dir: Path, samples: int) -> ProofFigures:
    """The ops' handlers (SQLite leaf lookup, argument checks, the proof from the tiles)
    beside the tiles' proof alone, for other random leaves and sizes in turn."""
    keystore = SoftwareKeyStore(data_dir / "keys")
    state = StateDatabase(data_dir / "state" / "state.sqlite3")
    try:
        log = CtLog(tiles=TileDirectory.in_directory(data_dir / "ct"), state=state,
                    keystore=keystore, origin=ORIGIN)
        log.open()
        service = CtService(log, ChainValidator([], clock=time.time))
        shard = log.shard(0)
        tiles = shard.tiles
        size = shard.size
        rng = random.Random(7)
        by_hash: list[float] = []
        by_hash_tiles: list[float] = []
        consistency: list[float] = []
        consistency_tiles: list[float] = []
        deadline = time.perf_counter() + LIMIT
        for _ in range(samples):
            index = rng.randrange(size)
            (leaf,) = tiles.leaf_hashes(index, index + 1)
            result = _timed(by_hash, service.get_proof_by_hash,
                            ops.GetProofByHashArgs(hash=leaf, tree_size=size, shard=0), CTX)
            assert result["leaf_index"] == index
            _timed(by_hash_tiles, tiles.inclusion_proof, rng.randrange(size), size)
            _timed(consistency, service.get_sth_consistency,
                   ops.GetSthConsistencyArgs(first=rng.randrange(1, size), second=size,
                                             shard=0), CTX)
            _timed(consistency_tiles, tiles.consistency_proof, rng.randrange(1, size), size)
            if time.perf_counter() > deadline:
                break
    finally:
        state.close()
        keystore.close()
    return ProofFigures(size=size, samples=len(by_hash), by_hash=_p(by_hash),
                        by_hash_tiles=_p(by_hash_tiles), consistency=_p(consistency),
                        consistency_tiles=_p(consistency_tiles))


async def run_proofs_over_quic(port: int, pin: str, samples: int) -> dict[str, Any]:
    client = await stoq.connect("::1", port, pin=pin, keep_alive_interval=None, timeout=30)
    try:
        keys = await stoq.ShardKeys.fetch(client)
        sth = await client.request("ct.get-sth", {"shard": 0})
        stoq.verify_sth(sth, keys.keys[0])
        size = sth["tree_size"]
        rng = random.Random(11)
        by_hash: list[float] = []
        consistency: list[float] = []
        health: list[float] = []
        deadline = time.perf_counter() + LIMIT
        for _ in range(samples):
            index = rng.randrange(size)
            got = await client.request("ct.get-entries", {"start": index, "end": index,
                                                          "shard": 0})
            leaf = hashlib.sha256(b"\x00" + got["entries"][0]["leaf_input"]).digest()
            t = time.perf_counter()
            await client.request("node.health")
            health.append(time.perf_counter() - t)
            t = time.perf_counter()
            await client.request("ct.get-proof-by-hash", {"hash": leaf, "tree_size": size,
                                                          "shard": 0})
            by_hash.append(time.perf_counter() - t)
            first = rng.randrange(1, size)
            t = time.perf_counter()
            await client.request("ct.get-sth-consistency", {"first": first, "second": size,
                                                            "shard": 0})
            consistency.append(time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
    finally:
        await client.close()
    return {"by_hash": _p(by_hash), "consistency": _p(consistency), "health": _p(health)}


# --- 5. subscriptions -----------------------------------------------------------------------


async def run_subscribers(port: int, pin: str, subscribers: int, seconds: float,
                          include_leaf: bool) -> dict[str, Any]:
    """``subscribers`` connections, each following ``ct.subscribe`` from index 0 for
    ``seconds``; a subscriber that reaches the end of the log counts up to its last
    entries."""
    clients = [await stoq.connect("::1", port, pin=pin, keep_alive_interval=None, timeout=30)
               for _ in range(subscribers)]
    counts = [0] * subscribers
    sizes = [0] * subscribers
    last = [0.0] * subscribers
    started = time.perf_counter()

    async def follow(i: int) -> None:
        expected = 0
        async for event in clients[i].subscribe("ct.subscribe", {
                "shard": 0, "start": 0, "include_leaf": include_leaf}):
            if event.event == "entries":
                entries = event.data["entries"]
                if entries[0]["index"] != expected:
                    raise RuntimeError(f"gap: {entries[0]['index']} after {expected}")
                expected = entries[-1]["index"] + 1
                counts[i] += len(entries)
                sizes[i] += sum(len(e.get("leaf_input", b"")) + 100 for e in entries)
                last[i] = time.perf_counter() - started

    tasks = [asyncio.ensure_future(follow(i)) for i in range(subscribers)]
    try:
        done, _ = await asyncio.wait(tasks, timeout=seconds)
        for task in done:
            task.result()  # a gap or a failed stream is an error of the run
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
    elapsed = max(max(last), 1e-9)
    return {"subscribers": subscribers, "total_rate": sum(counts) / elapsed,
            "per_subscriber": [c / max(t, 1e-9) for c, t in zip(counts, last, strict=True)],
            "megabytes_per_s": sum(sizes) / elapsed / 1e6, "entries": counts}


# --- the run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ct", description=(
        __doc__ or "").split("\n\n")[0])
    parser.add_argument("--entries", type=int,
                        help="size of the bulk-loaded log for proofs and subscriptions "
                             "(default 10,000,000; 250,000 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="shorter runs, fewer samples, 250,000 entries")
    parser.add_argument("--no-s3", action="store_true",
                        help="skip the sequencer with its tiles in S3 (which needs Debian's "
                             "radosgw, ceph-mon and ceph-osd)")
    sub = parser.add_subparsers(dest="child")
    child_add = sub.add_parser("add-chain")
    child_add.add_argument("spec")
    child_proofs = sub.add_parser("proofs")
    child_proofs.add_argument("port", type=int)
    child_proofs.add_argument("pin")
    child_proofs.add_argument("samples", type=int)
    child_subs = sub.add_parser("subscribe")
    child_subs.add_argument("port", type=int)
    child_subs.add_argument("pin")
    child_subs.add_argument("subscribers", type=int)
    child_subs.add_argument("seconds", type=float)
    child_subs.add_argument("--no-leaf", action="store_true")
    args = parser.parse_args(argv)
    if args.child == "add-chain":
        spec = AddChainSpec(**json.loads(args.spec))
        print(json.dumps(uvloop.run(run_add_chain(spec))), flush=True)
        return 0
    if args.child == "proofs":
        print(json.dumps(uvloop.run(run_proofs_over_quic(args.port, args.pin, args.samples))),
              flush=True)
        return 0
    if args.child == "subscribe":
        print(json.dumps(uvloop.run(run_subscribers(args.port, args.pin, args.subscribers,
                                                    args.seconds, not args.no_leaf))),
              flush=True)
        return 0
    entries = args.entries or (250_000 if args.quick else 10_000_000)
    if not 1_000 <= entries <= 10_000_000:
        parser.error("--entries: 1,000 to 10,000,000 (one shard)")
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ct-"))
    started = time.monotonic()
    try:
        _run(children, tmp, entries, args.quick, not args.no_s3)
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntotal time {time.monotonic() - started:.0f} s", flush=True)
    return 0


def sequencer_on_s3(tmp: Path, count: int, steady_seconds: float, idle_count: int,
                    steady_rate: int) -> SequencerFigures:
    """The sequencer test with the log's tiles in a bucket of a throwaway Ceph RADOS
    Gateway (``tests.s3_server``), at the filesystem run's steady rate."""
    from tests.s3_server import CephS3

    with CephS3() as ceph:
        bucket = ceph.create_bucket("bench-ct")
        objects = S3Objects(S3Location(bucket, ceph.region, ceph.endpoint, "bench"),
                            credentials=AwsCredentials(ceph.access_key, ceph.secret_key,
                                                       None, "bench"))
        return uvloop.run(bench_sequencer(tmp, count, 0.5, steady_seconds, idle_count,
                                          tiles=TileDirectory(objects, staging=None),
                                          steady_rate=steady_rate, name="seq-s3"))


def _run(children: Children, tmp: Path, entries: int, quick: bool, s3_tiles: bool) -> None:
    seconds = 2.0 if quick else 6.0
    make_ca(tmp)
    progress("1/5 sequencer (in process)")
    seq = uvloop.run(bench_sequencer(tmp, 20_000 if quick else 50_000, 0.5,
                                     1.5 if quick else 3.0, 20 if quick else 100))
    s3 = None
    if s3_tiles:
        progress("1/5 the same sequencer with the tiles in S3 (a one-host Ceph on [::1])")
        s3 = sequencer_on_s3(tmp, 20_000 if quick else 50_000, 1.5 if quick else 3.0,
                             20 if quick else 100, int(seq.steady_offered))
    progress("2/5 add-chain over QUIC")
    node, port, pin, empty_start = start_node(children, tmp, "node-add", tmp / "data-add")
    add = run_child(children, tmp, "add-chain", ["add-chain", json.dumps(asdict(AddChainSpec(
        port=port, pin=pin, engine="qh3", directory=str(tmp), count=3_000 if quick else 20_000,
        in_flight=IN_FLIGHT, seconds=15.0 if quick else 60.0)))], 300.0)
    children.stop(node)
    progress(f"3/5 bulk loader: {entries:,} entries")
    big = tmp / "data-big"
    bulk_rate, entries = bulk_load(big, entries)
    progress("4/5 proofs")
    proofs = bench_proofs_in_process(big, 2_000 if quick else 10_000)
    # the node checks the hash of every row of its state at start: about 8 µs a row
    node, port, pin, big_start = start_node(children, tmp, "node-big", big,
                                            timeout=120.0 + entries * 50e-6)
    quic = run_child(children, tmp, "proofs", ["proofs", str(port), pin,
                                               "500" if quick else "2000"], 300.0)
    progress("5/5 subscriptions and bare QUIC bulk")
    subs = {}
    for n, leaf in ((1, False), (1, True), (10, False)):
        subs[(n, leaf)] = run_child(children, tmp, f"subscribe-{n}-{leaf}", [
            "subscribe", str(port), pin, str(n), str(seconds)] + ([] if leaf else ["--no-leaf"]),
            seconds + 120.0)
    children.stop(node)
    certfile, keyfile = make_certificate(tmp / "echo")
    echo = children.start("echo server", [sys.executable, "-m", "bench._common",
                                          "echo-server", "--engine", "qh3", "--cert",
                                          str(certfile), "--key", str(keyfile)],
                          tmp / "echo.log")
    echo_port = int(echo.wait_for(LISTENING, 30.0).group(2))
    echo_pin = echo.wait_for(FINGERPRINT, 10.0).group(1)
    bulk = load_in_child(children, LoadSpec(
        engine="qh3", port=echo_port, alpn=ECHO_ALPN, pin=echo_pin, request="bulk",
        expect="same", connections=1, in_flight=1, duration=seconds, warmup=0.5,
        server_pid=echo.pid), tmp / "echo-load.log")
    children.stop(echo)
    print(report(seq, s3, add, entries, bulk_rate, (empty_start, big_start), proofs, quic,
                 subs, bulk.megabytes_per_s), flush=True)


def _pp(pair: tuple[float, float] | list[float]) -> str:
    return f"p50 {ms(pair[0])}, p99 {ms(pair[1])}"


def report(seq: SequencerFigures, s3: SequencerFigures | None, add: dict[str, Any],
           entries: int, bulk_rate: float,
           starts: tuple[float, float], proofs: ProofFigures, quic: dict[str, Any],
           subs: dict[tuple[int, bool], Any], bare_mb: float) -> str:
    chains, health = add["add"], add["health"]
    size = f"{proofs.size:,}"
    rows = [
        [f"sequencer, in process: blocks of {BLOCK:,} (append, stage with fsync, state "
         f"committed, published)",
         f"{seq.rate:,.0f} entries/s ({seq.entries:,} entries, {seq.blocks} blocks)",
         f"tiles alone (append, staged with fsync, installed): {seq.tiles_rate:,.0f}/s",
         ratio(seq.rate, seq.tiles_rate)],
        ["SCTs on demand (CtLog.sct, each entry once)", f"{seq.sct_rate:,.0f}/s",
         f"bare ECDSA P-256 signature of the leaf: {seq.sign_rate:,.0f}/s",
         ratio(seq.sct_rate, seq.sign_rate)],
        [f"submission to SCT at {seq.steady_offered:,.0f} entries/s offered (half the "
         f"capacity of the two rows above; {seq.steady_achieved:,.0f}/s achieved, "
         f"{seq.steady_blocks} blocks)",
         _pp((seq.p50, seq.p99)),
         f"one entry alone, idle log: {_pp((seq.idle_p50, seq.idle_p99))}",
         ratio(seq.p50, seq.idle_p50)],
        *([] if s3 is None else [
            ["sequencer with the tiles in S3 (Ceph RADOS Gateway on [::1]; written "
             "before each block's state is committed)",
             f"{s3.rate:,.0f} entries/s ({s3.entries:,} entries, {s3.blocks} blocks)",
             f"tiles on local disk (first row): {seq.rate:,.0f}/s",
             ratio(s3.rate, seq.rate)],
            [f"submission to SCT, tiles in S3, at {s3.steady_offered:,.0f} entries/s "
             f"offered ({s3.steady_achieved:,.0f}/s achieved)", _pp((s3.p50, s3.p99)),
             f"tiles on local disk, same rate: {_pp((seq.p50, seq.p99))}",
             ratio(s3.p99, seq.p99)],
            ["one entry alone on an idle log, tiles in S3",
             _pp((s3.idle_p50, s3.idle_p99)),
             f"tiles on local disk: {_pp((seq.idle_p50, seq.idle_p99))}",
             ratio(s3.idle_p50, seq.idle_p50)]]),
        [f"ct.add-chain over QUIC, {IN_FLIGHT} in flight (real chains, verified; each a "
         f"decision committed in a block)",
         f"{chains['rate']:,.0f}/s, {_pp((chains['p50'], chains['p99']))}"
         + (f", {chains['errors']} errors ({chains['first_error']})" if chains["errors"]
            else ""),
         f"node.health, same client and server: {health['rate']:,.0f}/s",
         ratio(chains["rate"], health["rate"])],
        [f"bulk loader ({entries:,} entries: tiles, leaf index and its state hash)",
         f"{bulk_rate:,.0f} entries/s", f"sequencer's block path: {seq.rate:,.0f}/s",
         ratio(bulk_rate, seq.rate)],
        [f"trustchain serve, start to listening, {entries:,} entries",
         f"{starts[1]:.1f} s", f"empty data directory: {starts[0]:.1f} s",
         ratio(starts[1], starts[0])],
        [f"get-proof-by-hash at {size} entries, handler", _pp(proofs.by_hash),
         f"inclusion proof from the tiles alone: {_pp(proofs.by_hash_tiles)}",
         ratio(proofs.by_hash[0], proofs.by_hash_tiles[0])],
        [f"get-sth-consistency at {size} entries, handler", _pp(proofs.consistency),
         f"consistency proof from the tiles alone: {_pp(proofs.consistency_tiles)}",
         ratio(proofs.consistency[0], proofs.consistency_tiles[0])],
        [f"get-proof-by-hash at {size} entries, over QUIC (one at a time)",
         _pp(quic["by_hash"]), f"node.health round trip: {_pp(quic['health'])}",
         ratio(quic["by_hash"][0], quic["health"][0])],
        [f"get-sth-consistency at {size} entries, over QUIC (one at a time)",
         _pp(quic["consistency"]), f"node.health round trip: {_pp(quic['health'])}",
         ratio(quic["consistency"][0], quic["health"][0])],
    ]
    for (n, leaf), result in subs.items():
        what = "with leaf_input" if leaf else "without leaf_input"
        ended = " (reached the end of the log)" if entries in result["entries"] else ""
        rows.append([f"ct.subscribe from 0, {n} subscriber{'s' if n > 1 else ''}, {what}",
                     f"{result['total_rate']:,.0f} entries/s in all, "
                     f"{min(result['per_subscriber']):,.0f}/s the slowest, "
                     f"{result['megabytes_per_s']:.1f} MB/s{ended}",
                     f"bare QUIC, one stream: {bare_mb:.1f} MB/s",
                     ratio(result["megabytes_per_s"], bare_mb)])
    return markdown_table(["test", "result", "baseline (same run)", "ratio"], rows)


if __name__ == "__main__":
    sys.exit(main())
