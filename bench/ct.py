"""CT log benchmark: sequencing, add-chain, proofs at 10M entries, subscriptions.

::

    python -m bench.ct                    # 10,000,000 entries for the proof tests
    python -m bench.ct --entries 1000000  # a smaller log, quicker
    python -m bench.ct --quick            # shorter runs, 1,000,000 entries

Prints Markdown tables on stdout, progress on stderr. Everything runs on
``[::1]`` in a temporary directory; every child process is stopped at the end.

1. **Sequencer** (in this process): ``CtLog.submit`` of synthetic x509 entries,
   all at once (entries/s durably sequenced: SCTs signed, tiles staged with
   fsync, checkpoint committed with fsync) and at a steady offered rate
   (submit-to-SCT p50/p99).
2. **add-chain over QUIC**: a ``trustchain serve`` child process that accepts a
   benchmark root (``ct.extra_roots``); a load-generator child sends real
   chains (leaf + intermediate, ECDSA P-256) with 256 requests in flight.
3. **Bulk loader**: a 10,000,000-entry shard (tiles, leaf-hash index, signed
   checkpoint) built directly on the storage layer; its speed.
4. **Proofs at that size**: ``get-proof-by-hash`` and ``get-sth-consistency``
   for random indices and sizes, in process (the op's handler, p50/p99) and over
   QUIC from a client (one request at a time, p50/p99).
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from handlers import RequestContext
from handlers.ct import ChainValidator, CheckedChain, CtLog, CtService
from protocol import Peer
from protocol.ct_structs import (
    digitally_signed,
    leaf_index_extensions,
    signed_checkpoint,
    tree_head_signed_data,
)
from protocol.ops import ct as ops
from store import Appended, CheckpointRecord, CtDatabase, SoftwareKeyStore, TileDirectory

from ._common import (
    ECHO_ALPN,
    FINGERPRINT,
    LISTENING,
    Children,
    LoadSpec,
    load_in_child,
    make_certificate,
    markdown_table,
    percentile,
)

CTX = RequestContext(peer=Peer(address="::1", port=0, alpn="stoq/1"), op="bench",
                     received_at=0.0)


def progress(message: str) -> None:
    print(f"[bench.ct] {message}", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"


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


# --- 1. the sequencer ------------------------------------------------------------------------


def synthetic_chain(i: int) -> CheckedChain:
    der = b"\x30\x82\x02\x00" + i.to_bytes(8, "big") + bytes(500)
    return CheckedChain(leaf_der=der, issuers=(b"issuer" * 100,), issuer_key_hash=bytes(32),
                        tbs=b"", names=(f"s{i}.bench.trust",),
                        spki_sha256=hashlib.sha256(der).digest())


@dataclass
class SequencerFigures:
    entries: int
    rate: float
    batches: int
    steady_rate: float
    p50: float
    p99: float


async def bench_sequencer(tmp: Path, count: int, steady_rate: int,
                          steady_seconds: float) -> SequencerFigures:
    log = CtLog(tiles=TileDirectory(tmp / "seq" / "ct"),
                db=CtDatabase(tmp / "seq" / "ct" / "ct.sqlite3"),
                keystore=SoftwareKeyStore(tmp / "seq" / "keys"), origin="bench/ct")
    log.open()
    log.start()
    chains = [synthetic_chain(i) for i in range(count)]
    started = time.perf_counter()
    await asyncio.gather(*(log.submit(c, precert=False) for c in chains))
    elapsed = time.perf_counter() - started
    batches = log.batches
    # Steady load: submissions at a fixed rate; latency from submit to SCT.
    latencies: list[float] = []

    async def one(chain: CheckedChain) -> None:
        t = time.perf_counter()
        await log.submit(chain, precert=False)
        latencies.append(time.perf_counter() - t)

    tasks = []
    total = int(steady_rate * steady_seconds)
    begin = time.perf_counter()
    for i in range(total):
        due = begin + i / steady_rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(synthetic_chain(count + i))))
    await asyncio.gather(*tasks)
    achieved = total / (time.perf_counter() - begin)
    await log.stop()
    log.db.close()
    latencies.sort()
    return SequencerFigures(entries=count, rate=count / elapsed, batches=batches,
                            steady_rate=achieved, p50=percentile(latencies, 0.5),
                            p99=percentile(latencies, 0.99))


# --- 2. add-chain over QUIC ------------------------------------------------------------------


@dataclass(frozen=True)
class AddChainSpec:
    port: int
    pin: str
    engine: str
    directory: str
    count: int
    in_flight: int


async def run_add_chain(spec: AddChainSpec) -> dict[str, Any]:
    directory = Path(spec.directory)
    inter = x509.load_pem_x509_certificate((directory / "bench-issuing.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "bench-issuing.key").read_bytes(),
                                             None)
    leaves = make_leaves(key, inter, spec.count)
    inter_der = inter.public_bytes(serialization.Encoding.DER)
    client = await stoq.connect("::1", spec.port, pin=spec.pin, engine=spec.engine,
                                keep_alive_interval=None, timeout=30)
    latencies: list[float] = []
    queue = iter(leaves)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for der in queue:
            t = time.perf_counter()
            try:
                await client.request("ct.add-chain", {"chain": [der, inter_der]})
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(spec.in_flight)))
    elapsed = time.perf_counter() - started
    await client.close()
    latencies.sort()
    return {"count": len(latencies), "rate": len(latencies) / elapsed, "errors": errors,
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)}


def start_node(children: Children, tmp: Path, name: str, data_dir: Path,
               extra: str = "") -> tuple[Any, int, str]:
    config = tmp / f"{name}.toml"
    config.write_text(f"""
[network]
quic_engine = "qh3"
[logging]
level = "warning"
[ct]
extra_roots = ["{tmp / 'bench-root.pem'}"]
{extra}
""")
    argv = [sys.executable, "-m", "trustchain", "serve", "--config", str(config), "--data-dir",
            str(data_dir), "--listen", "[::1]:0"]
    child = children.start(name, argv, tmp / f"{name}.log")
    port = int(child.wait_for(LISTENING, 120.0).group(2))
    pin = child.wait_for(FINGERPRINT, 30.0).group(1)
    return child, port, pin


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


def bulk_load(data_dir: Path, count: int, chunk: int = 65_536) -> float:
    """A shard of ``count`` synthetic x509 entries written straight to storage: tiles
    (installed with fsync), the leaf-hash index, then one signed checkpoint. Returns
    entries/s. The node opens it like any log (its key is ``ct-log-0`` in the
    development keystore of ``data_dir``)."""
    keystore = SoftwareKeyStore(data_dir / "keys")
    db = CtDatabase(data_dir / "ct" / "ct.sqlite3")
    log = CtLog(tiles=TileDirectory(data_dir / "ct"), db=db, keystore=keystore,
                origin="trustchain-ct-development")
    log.open()
    shard = log.active
    tiles = shard.tiles
    issuer = b"bulk issuer certificate" * 20
    chain_fp = hashlib.sha256(issuer).digest()
    tail = b"\x00\x20" + chain_fp
    timestamp = int(time.time() * 1000)
    head = struct.pack(">QH", timestamp, 0)
    sha256 = hashlib.sha256
    db.set_cache_size(1000)
    started = time.perf_counter()
    done = 0
    while done < count:
        n = min(chunk, count - done)
        appended = []
        leaves = []
        for i in range(done, done + n):
            der = b"\x30\x82\x01\xf8" + i.to_bytes(8, "big") + bytes(492)
            te = head + len(der).to_bytes(3, "big") + der + b"\x00\x08" + \
                leaf_index_extensions(i)
            hashed = sha256(b"\x00\x00\x00" + te).digest()
            appended.append(Appended(hashed, te + tail, sha256(der).digest(),
                                     (f"b{i}.bulk.trust",)))
            leaves.append((hashed, 0, i))
        bundle = tiles.append(appended)
        bundle.files[f"issuer/{chain_fp.hex()}"] = issuer
        tiles.install(bundle, sync=False)
        tiles.installed(bundle)
        tiles.publish(bundle)
        leaves.sort()
        db.bulk_load(0, ((h, i) for h, _, i in leaves), ())
        done += n
        if done % (chunk * 16) == 0 or done == count:
            rate = done / (time.perf_counter() - started)
            progress(f"bulk load: {done:,} entries, {rate:,.0f}/s")
    os.sync()  # every tile durable before the checkpoint that covers them is committed
    signature = digitally_signed(shard.signer.sign(tree_head_signed_data(
        timestamp, count, tiles.root)))
    note = signed_checkpoint(shard.origin, count, tiles.root, timestamp, signature,
                             shard.log_id)
    new = CheckpointRecord(0, count, tiles.root, timestamp, signature, note)
    db.commit_batch(shard.checkpoint, new, [], [], [], [])
    tiles.write_checkpoint(note.encode())
    elapsed = time.perf_counter() - started
    db.close()
    keystore.close()
    return count / elapsed


# --- 4. proofs ------------------------------------------------------------------------------


@dataclass
class ProofFigures:
    size: int
    by_hash_p50: float
    by_hash_p99: float
    consistency_p50: float
    consistency_p99: float
    samples: int


def bench_proofs_in_process(data_dir: Path, samples: int) -> ProofFigures:
    db = CtDatabase(data_dir / "ct" / "ct.sqlite3")
    keystore = SoftwareKeyStore(data_dir / "keys")
    log = CtLog(tiles=TileDirectory(data_dir / "ct"), db=db, keystore=keystore,
                origin="trustchain-ct-development")
    log.open()
    service = CtService(log, ChainValidator([], clock=time.time))
    shard = log.shard(0)  # a full shard: the node has started shard 1 beside it
    size = shard.size
    rng = random.Random(7)
    by_hash: list[float] = []
    consistency: list[float] = []
    for _ in range(samples):
        index = rng.randrange(size)
        (leaf,) = shard.tiles.leaf_hashes(index, index + 1)
        t = time.perf_counter()
        result = service.get_proof_by_hash(ops.GetProofByHashArgs(hash=leaf, tree_size=size,
                                                                   shard=0), CTX)
        by_hash.append(time.perf_counter() - t)
        assert result["leaf_index"] == index
        first = rng.randrange(1, size)
        t = time.perf_counter()
        service.get_sth_consistency(ops.GetSthConsistencyArgs(first=first, second=size,
                                                              shard=0), CTX)
        consistency.append(time.perf_counter() - t)
    db.close()
    keystore.close()
    by_hash.sort()
    consistency.sort()
    return ProofFigures(size=size, by_hash_p50=percentile(by_hash, 0.5),
                        by_hash_p99=percentile(by_hash, 0.99),
                        consistency_p50=percentile(consistency, 0.5),
                        consistency_p99=percentile(consistency, 0.99), samples=samples)


async def run_proofs_over_quic(port: int, pin: str, samples: int) -> dict[str, Any]:
    client = await stoq.connect("::1", port, pin=pin, keep_alive_interval=None, timeout=30)
    keys = await stoq.ShardKeys.fetch(client)
    sth = await client.request("ct.get-sth", {"shard": 0})
    stoq.verify_sth(sth, keys.keys[0])
    size = sth["tree_size"]
    rng = random.Random(11)
    by_hash: list[float] = []
    consistency: list[float] = []
    for _ in range(samples):
        index = rng.randrange(size)
        got = await client.request("ct.get-entries", {"start": index, "end": index,
                                                      "shard": 0})
        leaf = hashlib.sha256(b"\x00" + got["entries"][0]["leaf_input"]).digest()
        t = time.perf_counter()
        await client.request("ct.get-proof-by-hash", {"hash": leaf, "tree_size": size,
                                                      "shard": 0})
        by_hash.append(time.perf_counter() - t)
        first = rng.randrange(1, size)
        t = time.perf_counter()
        await client.request("ct.get-sth-consistency", {"first": first, "second": size,
                                                        "shard": 0})
        consistency.append(time.perf_counter() - t)
    await client.close()
    by_hash.sort()
    consistency.sort()
    return {"by_hash_p50": percentile(by_hash, 0.5), "by_hash_p99": percentile(by_hash, 0.99),
            "consistency_p50": percentile(consistency, 0.5),
            "consistency_p99": percentile(consistency, 0.99)}


# --- 5. subscriptions -----------------------------------------------------------------------


async def run_subscribers(port: int, pin: str, subscribers: int, seconds: float,
                          include_leaf: bool) -> dict[str, Any]:
    clients = [await stoq.connect("::1", port, pin=pin, keep_alive_interval=None, timeout=30)
               for _ in range(subscribers)]
    counts = [0] * subscribers
    sizes = [0] * subscribers
    deadline = time.perf_counter() + seconds

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
            if time.perf_counter() >= deadline:
                return

    started = time.perf_counter()
    await asyncio.gather(*(follow(i) for i in range(subscribers)))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.close()
    return {"subscribers": subscribers, "total_rate": sum(counts) / elapsed,
            "per_subscriber": [c / elapsed for c in counts],
            "megabytes_per_s": sum(sizes) / elapsed / 1e6}


# --- the run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ct", description=__doc__)
    parser.add_argument("--entries", type=int, default=10_000_000,
                        help="size of the bulk-loaded log for proofs and subscriptions")
    parser.add_argument("--quick", action="store_true", help="shorter runs, 1M entries")
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
    entries = 1_000_000 if args.quick and args.entries == 10_000_000 else args.entries
    seconds = 3.0 if args.quick else 6.0
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ct-"))
    try:
        return _run(children, tmp, entries, seconds, args.quick)
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(children: Children, tmp: Path, entries: int, seconds: float, quick: bool) -> int:
    make_ca(tmp)
    progress("1/5 sequencer (in process)")
    seq = uvloop.run(bench_sequencer(tmp, 20_000 if quick else 50_000, 5_000, seconds / 2))
    progress("2/5 add-chain over QUIC")
    node, port, pin = start_node(children, tmp, "node-add", tmp / "data-add")
    add = run_child(children, tmp, "add-chain", ["add-chain", json.dumps(asdict(AddChainSpec(
        port=port, pin=pin, engine="qh3", directory=str(tmp), count=5_000 if quick else 20_000,
        in_flight=256)))], 600.0)
    children.stop(node)
    progress(f"3/5 bulk loader: {entries:,} entries")
    big = tmp / "data-big"
    bulk_rate = bulk_load(big, entries)
    progress("4/5 proofs")
    proofs = bench_proofs_in_process(big, 2_000 if quick else 10_000)
    node, port, pin = start_node(children, tmp, "node-big", big)
    quic_proofs = run_child(children, tmp, "proofs", ["proofs", str(port), pin,
                                                      "500" if quick else "2000"], 600.0)
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
    report(seq, add, entries, bulk_rate, proofs, quic_proofs, subs, bulk.megabytes_per_s)
    return 0


def report(seq: SequencerFigures, add: dict[str, Any], entries: int, bulk_rate: float,
           proofs: ProofFigures, quic: dict[str, Any], subs: dict[tuple[int, bool], Any],
           bare_mb: float) -> None:
    rows = [
        ["sequencer, in process (durable batches)",
         f"{seq.rate:,.0f} entries/s ({seq.entries:,} entries, {seq.batches} batches)", ""],
        [f"submit-to-SCT at {seq.steady_rate:,.0f} entries/s offered",
         f"p50 {ms(seq.p50)}, p99 {ms(seq.p99)}", ""],
        ["ct.add-chain over QUIC, 256 in flight (real chains, verified)",
         f"{add['rate']:,.0f} entries/s", f"p50 {ms(add['p50'])}, p99 {ms(add['p99'])}"],
        [f"bulk loader ({entries:,} entries, tiles + leaf index)",
         f"{bulk_rate:,.0f} entries/s", ""],
        [f"get-proof-by-hash at {proofs.size:,} entries, handler",
         f"p50 {ms(proofs.by_hash_p50)}, p99 {ms(proofs.by_hash_p99)}",
         f"over QUIC: p50 {ms(quic['by_hash_p50'])}, p99 {ms(quic['by_hash_p99'])}"],
        [f"get-sth-consistency at {proofs.size:,} entries, handler",
         f"p50 {ms(proofs.consistency_p50)}, p99 {ms(proofs.consistency_p99)}",
         f"over QUIC: p50 {ms(quic['consistency_p50'])}, p99 {ms(quic['consistency_p99'])}"],
    ]
    for (n, leaf), result in subs.items():
        what = "with leaf_input" if leaf else "without leaf_input"
        rows.append([f"ct.subscribe from 0, {n} subscriber{'s' if n > 1 else ''}, {what}",
                     f"{result['total_rate']:,.0f} entries/s in all, "
                     f"{min(result['per_subscriber']):,.0f}/s the slowest",
                     f"{result['megabytes_per_s']:.1f} MB/s; bare QUIC one stream "
                     f"{bare_mb:.1f} MB/s"])
    print(markdown_table(["test", "result", "beside"], rows))


if __name__ == "__main__":
    sys.exit(main())
