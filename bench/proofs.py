"""Four-proof admission: ``python -m bench.proofs [--quick] [--requesters N]``.

Part 1, in this process on one core: what the node spends to verify each proof,
cold (the first time it sees a credential: a full chiapos or chiavdf check) and
cached (a credential remembered for its epoch), and a whole request with warm
credentials, at two work difficulties (the node's cost does not depend on it):
``ProofVerifier.verify`` against the replicated state (``StateDatabase``: the
stake, the used work), then the request's used-work row committed in a block,
as the state machine does when the block executes; beside them the CA's check of
a new CSR (``check_request`` without its cache), which every validator also makes
per issuance. ``--skip-stoq`` runs part 1 alone (about 10 s with ``--quick``).

Part 2, over STOQ: a real ``trustchain serve``, a validator alone
(development mode, plots of k=18, 1,000 VDF iterations, a low work difficulty
so that the load generator can make requests fast, every requester in the
genesis stake), then the same node with its proof check reduced to parsing
(``bench._node --proofs parse``, the baseline), and a load-generator process.
Each requester has its own key and k=18 plot (made before the server starts,
about a second each). The load generator first sends every requester's first
request of the epoch (the cold path: the node verifies its space and time
credential), then closed-loop ``ca.issue`` with 64 requests in flight on 1 and
4 connections, round robin over the requesters, every request with a new
P-256 CSR for a distinct name, fresh work and its own binding signature, all
made before the clock starts; the same kind of requests then go to the
baseline. The four-proof server answers ``node.health`` in the same run too,
for comparison.

Loopback ``[::1]`` only; every run is bounded; every process is stopped at the
end. Markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import protocol
import stoq
import stoq._prover as stoq_prover
from handlers.ca import NamingPolicy
from handlers.ca._policy import _check_request
from handlers.consensus import BeaconChain, ProofVerifier
from handlers.consensus import _native as native
from protocol.ops.consensus import (
    ProofParams,
    binding_statement,
    issue_digest,
    key_id,
    leading_zero_bits,
    parse_proofs,
    plot_id_for,
    space_challenge,
    vdf_challenge,
    work_hash,
    work_prefix,
)
from store import (
    AuditLog,
    BeaconStore,
    MultisetHash,
    Row,
    StateChanges,
    StateDatabase,
    open_keystore,
    state_hash,
    verify_signature,
)

from ._common import (
    FINGERPRINT,
    LISTENING,
    Children,
    LoadResult,
    LoadSpec,
    load_in_child,
    machine_lines,
    markdown_table,
    percentile,
)
from ._node import serve_argv
from ._streams import close_clients
from .ca import (
    DRAIN_TIMEOUT,
    IN_FLIGHT,
    IssueResult,
    IssueRun,
    IssueSpec,
    _sample_cpu,
    name_of,
    open_issue_client,
)

REQUESTERS = 200
QUICK_REQUESTERS = 6
POOL = 12_000
"""Proof sets made for one closed-loop run."""
QUICK_POOL = 2_000
LOAD_DIFFICULTY = 4
"""Work bits the benchmark server requires, so that the load generator keeps up."""
PROD_DIFFICULTY = 20
WORK_BLOCK = 64
"""Requests verified, then committed in one block, at a time in part 1 (64 in flight)."""
VDF_ITERATIONS = 1000
EPOCH_LENGTH = 3600
CONNECTIONS = (1, 4)
TARGET_WARM_MS = 0.3
TARGET_RATE = 1500


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- part 1: verification costs, in this process ------------------------------------------


def _per_call(fn: Callable[[], Any], count: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the wall time per call of ``fn``, in seconds."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(count):
            fn()
        samples.append((time.perf_counter() - started) / count)
    return statistics.median(samples)


@dataclass
class MicroFigures:
    rows: list[tuple[str, str, float, float | None]]
    """(proof, what, cold seconds, cached seconds or None)."""
    warm: dict[int, tuple[float, float, int]]
    """Work difficulty -> CPU seconds per warm request: ``ProofVerifier.verify``, and
    its used-work row committed in a block (:class:`UsedWork`); the rows a block."""
    cold: float
    """CPU seconds per whole cold request (VDF checked on the event loop)."""
    worker_latency: float
    """Seconds a cold request waits for the VDF worker process."""


def _build_sets(prover: stoq.Prover, beacon: stoq.Beacon, credential: stoq.Credential,
                count: int, tag: str) -> list[tuple[bytes, dict[str, Any]]]:
    sets = []
    for i in range(count):
        request = issue_digest(f"{tag}-{i}".encode())
        sets.append((request, prover.build("issue", request, beacon, credential).to_wire()))
    return sets


class UsedWork:
    """The replicated state as the node's state machine keeps it, for the verifier's
    stake and replay lookups: the requester's genesis stake, then blocks of admitted
    requests whose used-work rows are committed as the machine executes ``issue``
    decisions (the proofs parsed, the work hash, the row added to the state's multiset
    hash, the block's one transaction with its height and state hash)."""

    def __init__(self, state: StateDatabase, stake: dict[str, int]) -> None:
        self.state = state
        genesis: list[Row] = [("stake", key, amount) for key, amount in sorted(stake.items())]
        self.rows = MultisetHash.of(genesis)
        state.write_genesis(genesis, self.rows, state_hash(0, self.rows))
        self.height = 0

    def commit(self, admitted: list[tuple[bytes, dict[str, Any]]]) -> None:
        """One block of admitted requests: (request digest, proof set) each."""
        rows = self.rows.copy()
        height = self.height + 1
        changes = StateChanges(height=height,
                               block_id=hashlib.sha256(b"bench block %d" % height).digest(),
                               rows_hash=rows, state_hash=b"")
        for request, wire in admitted:
            proofs = parse_proofs(wire)
            digest = work_hash(work_prefix("issue", request, key_id(proofs.requester_key),
                                           proofs.epoch), proofs.nonce)
            row = ("used_work", digest, proofs.epoch)
            changes.upsert(row)
            rows.add(row)
        changes.state_hash = state_hash(height, rows)
        self.state.apply(changes)
        self.rows, self.height = rows, height


async def _micro(tmp: Path, quick: bool) -> MicroFigures:
    keystore = open_keystore(provider="software", data_dir=tmp / "micro-keys")
    audit = AuditLog(tmp / "micro-audit.log", signer=keystore.get_or_create("audit"))
    ledger = StateDatabase(tmp / "micro-state" / "state.sqlite3")
    beacon_store = BeaconStore(tmp / "micro-beacons.sqlite3")
    beacons = BeaconChain(store=beacon_store, signer=keystore.get_or_create("beacon"),
                          epoch_length=EPOCH_LENGTH, audit=audit.append_async)
    prover = stoq.Prover.open(tmp / "micro-requester")
    prover.ensure_plot(18)
    used = UsedWork(ledger, {prover.key_id: 1000})
    record = await beacons.current()
    rows: list[tuple[str, str, float, float | None]] = []
    warm: dict[int, tuple[float, float, int]] = {}
    verifiers = []
    try:
        for difficulty in (8, PROD_DIFFICULTY):
            params = ProofParams(minimum_stake=1000, minimum_work_difficulty=difficulty,
                                 plot_size=18, vdf_iterations=VDF_ITERATIONS,
                                 epoch_length=EPOCH_LENGTH)
            beacon = stoq.Beacon(epoch=record.epoch, start=record.start,
                                 end=record.start + EPOCH_LENGTH, value=record.value,
                                 params=params, development=True)
            credential = prover.credential_for(beacon)
            verifier = ProofVerifier(params=params, ledger=ledger, beacons=beacons, workers=0)
            verifiers.append(verifier)
            count = (8 if quick else 200) if difficulty > 16 else (1000 if quick else 4000)
            progress(f"part 1: {count} proof sets at {difficulty} work bits")
            sets = _build_sets(prover, beacon, credential, count + 1, f"d{difficulty}")
            first = sets.pop()  # the cold one: credentials verified in full
            await verifier.verify("issue", first[0], first[1])
            verified = committed = 0.0
            for start in range(0, len(sets), WORK_BLOCK):  # a block's worth, then its block
                block = sets[start:start + WORK_BLOCK]
                cpu0 = time.process_time()
                for request, wire in block:
                    await verifier.verify("issue", request, wire)
                cpu1 = time.process_time()
                used.commit(block)
                verified += cpu1 - cpu0
                committed += time.process_time() - cpu1
            warm[difficulty] = (verified / len(sets), committed / len(sets),
                                min(WORK_BLOCK, len(sets)))
            if difficulty == 8:
                rows += _component_rows(verifier, prover, beacon, sets[0][1], sets[0][0],
                                        quick)
        # a whole cold request: forget the credentials before each
        params8 = verifiers[0].params
        beacon8 = stoq.Beacon(epoch=record.epoch, start=record.start,
                              end=record.start + EPOCH_LENGTH, value=record.value,
                              params=params8, development=True)
        credential8 = prover.credential_for(beacon8)
        colds = _build_sets(prover, beacon8, credential8, 10 if quick else 30, "cold")
        cpu0 = time.process_time()
        for request, wire in colds:
            verifiers[0]._space_ok.clear()
            verifiers[0]._time_ok.clear()
            await verifiers[0].verify("issue", request, wire)
        cold = (time.process_time() - cpu0) / len(colds)
        # the VDF check in a worker process, as the node runs it
        pooled = ProofVerifier(params=params8, ledger=ledger, beacons=beacons, workers=1)
        verifiers.append(pooled)
        await pooled.warm_up()
        latencies = []
        for request, wire in _build_sets(prover, beacon8, credential8, 5 if quick else 15,
                                         "worker"):
            pooled._time_ok.clear()
            started = time.perf_counter()
            await pooled.verify("issue", request, wire)
            latencies.append(time.perf_counter() - started)
        return MicroFigures(rows=rows, warm=warm, cold=cold,
                            worker_latency=statistics.median(latencies))
    finally:
        for verifier in verifiers:
            await verifier.close()
        ledger.close()
        beacon_store.close()
        audit.close()
        keystore.close()


def _fresh_csrs(count: int) -> list[bytes]:
    """``count`` CSRs, each for its own P-256 key and name, as ``ca.issue`` receives them."""
    csrs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"bench-{i}.example.trust"
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]),
                              critical=False)
               .sign(key, hashes.SHA256()))
        csrs.append(csr.public_bytes(serialization.Encoding.DER))
    return csrs


def _component_rows(verifier: ProofVerifier, prover: stoq.Prover, beacon: stoq.Beacon,
                    wire: dict[str, Any], request: bytes,
                    quick: bool) -> list[tuple[str, str, float, float | None]]:
    n = 300 if quick else 2000
    proofs = parse_proofs(wire)
    kid = key_id(proofs.requester_key)
    public_key = verifier._public_key(proofs.requester_key)
    space, vdf = proofs.space, proofs.time
    challenge = space_challenge(beacon.value, space.plot_id, space.index)
    seed = vdf_challenge(beacon.value, beacon.epoch, proofs.requester_key)
    space_known = verifier._space_ok[proofs.epoch]
    time_known = verifier._time_ok[proofs.epoch]
    space_key = kid + space.digest()
    time_key = kid + vdf.digest()

    def work() -> bool:  # the prefix as a new request's check makes it (not yet cached)
        digest = work_hash(work_prefix.__wrapped__("issue", request,
                                                   key_id(proofs.requester_key), proofs.epoch),
                           proofs.nonce)
        return leading_zero_bits(digest) >= 8

    def binding() -> bool:
        statement = binding_statement(op="issue", request=request, epoch=proofs.epoch,
                                      space=space.digest(), time=vdf.digest(),
                                      nonce=proofs.nonce)
        return verify_signature(public_key, proofs.binding, statement)

    def space_cold() -> bool:
        return plot_id_for(proofs.requester_key, space.k) == space.plot_id and \
            native.verify_space(space.plot_id, space.k, challenge, space.proof)

    def space_cached() -> bool:
        return (kid + space.digest()) in space_known

    def time_cached() -> bool:
        return (kid + vdf.digest()) in time_known

    assert work() and binding() and space_cold() and space_cached() and time_cached()
    assert space_key in space_known and time_key in time_known
    assert native.verify_time(seed, vdf.iterations, vdf.output, vdf.proof) is None
    # a new discriminant takes from a few to a hundred milliseconds, depending on the seed:
    # VDFs on distinct beacons, each checked once
    vdfs = []
    for i in range(6 if quick else 24):
        other = hashlib.sha256(b"bench beacon %d" % i).digest()
        made = stoq_prover.time_proof(other, beacon.epoch, proofs.requester_key, vdf.iterations)
        vdfs.append((vdf_challenge(other, beacon.epoch, proofs.requester_key), made))
    vdf_costs = []
    for other_seed, made in vdfs:
        started = time.perf_counter()
        assert native.verify_time(other_seed, made.iterations, made.output, made.proof) is None
        vdf_costs.append(time.perf_counter() - started)
    vdf_costs.sort()
    kind = (f"P-{public_key.curve.key_size}" if hasattr(public_key, "curve")
            else "Ed25519")
    csrs = itertools.cycle(_fresh_csrs(n))
    policy = NamingPolicy(domains=("trust",))
    return [
        ("csr", "the CA's CSR check of a new P-256 CSR, one name (check_request, not cached)",
         _per_call(lambda: _check_request.__wrapped__(next(csrs), policy), n), None),
        ("all", "shape of the set (parse_proofs)", _per_call(lambda: parse_proofs(wire), n),
         None),
        ("work", "SHA-256 of prefix and nonce, zero bits", _per_call(work, n), None),
        ("work", "replay check: used-work lookup in the state (SQLite)",
         _per_call(lambda: verifier.ledger.work_used(request), n), None),
        ("stake", "ledger lookup", _per_call(lambda: verifier.ledger.balance(kid.hex()), n),
         None),
        ("binding", f"digests, statement, signature verify ({kind} requester key)",
         _per_call(binding, n), None),
        ("space", "plot id, challenge, chiapos verify / cache", _per_call(space_cold, n // 4),
         _per_call(space_cached, n)),
        ("time", f"discriminant, forms, chiavdf verify / cache (median of {len(vdf_costs)} "
                 f"beacons; p90 {_us(percentile(vdf_costs, 0.9))}, max {_us(vdf_costs[-1])})",
         statistics.median(vdf_costs), _per_call(time_cached, n)),
    ]


# --- part 2: over STOQ ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ProofLoadSpec:
    """One load-generator run, passed as JSON."""

    mode: str
    """``cold``: each requester's first request; ``warm``: closed-loop ca.issue."""
    engine: str
    port: int
    pin: str
    requesters: list[str]
    """Requester directories (key, plot, credential cache)."""
    connections: int = 1
    in_flight: int = IN_FLIGHT
    duration: float = 5.0
    warmup: float = 0.5
    pool: int = POOL
    first_name: int = 0
    server_pid: int = 0
    beacon: str = ""
    """JSON of a ``consensus.beacon`` result (bytes as hex): the four-proof server's,
    for the parse-only baseline (which checks none of it); empty: ask the server."""


@dataclass(frozen=True, kw_only=True)
class ColdResult:
    requests: int
    seconds: float
    rate: float
    errors: int
    first_error: str
    server_cpu: float | None
    credentials_s: float
    """Seconds the load generator spent making the requesters' credentials."""
    beacon: str = ""
    """The beacon the credentials were made for (see :attr:`ProofLoadSpec.beacon`)."""


def _beacon_json(result: dict[str, Any]) -> str:
    return json.dumps({k: v.hex() if isinstance(v, bytes) else v for k, v in result.items()})


def _beacon_from_json(text: str) -> stoq.Beacon:
    raw = json.loads(text)
    raw["beacon"] = bytes.fromhex(raw["beacon"])
    return stoq.Beacon.from_result(raw)


async def _credentials(spec: ProofLoadSpec) -> tuple[list[stoq.Prover], stoq.Beacon,
                                                     list[stoq.Credential], float, str]:
    started = time.perf_counter()
    provers = [stoq.Prover.open(Path(d)) for d in spec.requesters]
    text = spec.beacon
    if not text:
        async with await stoq.connect("::1", spec.port, pin=spec.pin, engine=spec.engine,
                                      timeout=30) as client:
            text = _beacon_json(await client.request("consensus.beacon"))
    beacon = _beacon_from_json(text)
    credentials = [p.credential_for(beacon, make_plot=False) for p in provers]
    return provers, beacon, credentials, time.perf_counter() - started, text


def _csr(index: int) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec
    return stoq.build_csr(ec.generate_private_key(ec.SECP256R1()), [name_of(index)], [])


async def _cold(spec: ProofLoadSpec) -> ColdResult:
    from bench.ca import thread_cpu
    provers, beacon, credentials, made, text = await _credentials(spec)
    frames = []
    for i, (prover, credential) in enumerate(zip(provers, credentials, strict=True)):
        csr = _csr(spec.first_name + i)
        proofs = prover.build("issue", issue_digest(csr), beacon, credential).to_wire()
        frames.append({"csr": csr, "proofs": proofs})
    errors, first_error = 0, ""
    async with await stoq.connect("::1", spec.port, pin=spec.pin, engine=spec.engine,
                                  timeout=60) as client:
        gate = asyncio.Semaphore(spec.in_flight)

        async def one(args: dict[str, Any]) -> None:
            nonlocal errors, first_error
            async with gate:
                try:
                    await client.request("ca.issue", args)
                except protocol.TrustChainError as exc:
                    errors += 1
                    first_error = first_error or f"{exc.code.value}: {exc.message}"
        cpu0 = thread_cpu(spec.server_pid) if spec.server_pid else None
        started = time.perf_counter()
        await asyncio.gather(*(one(args) for args in frames))
        seconds = time.perf_counter() - started
        cpu1 = thread_cpu(spec.server_pid) if spec.server_pid else None
    server_cpu = None if cpu0 is None or cpu1 is None else (cpu1[0] - cpu0[0]) / seconds
    return ColdResult(requests=len(frames), seconds=seconds, rate=len(frames) / seconds,
                      errors=errors, first_error=first_error, server_cpu=server_cpu,
                      credentials_s=made, beacon=text)


async def _warm(spec: ProofLoadSpec) -> IssueResult:
    provers, beacon, credentials, _, _ = await _credentials(spec)
    started = time.perf_counter()
    frames = []
    for i in range(spec.pool):
        which = i % len(provers)
        csr = _csr(spec.first_name + i)
        proofs = provers[which].build("issue", issue_digest(csr), beacon,
                                      credentials[which]).to_wire()
        frames.append(protocol.encode_frame({"op": "ca.issue",
                                             "args": {"csr": csr, "proofs": proofs}}))
    prepare = time.perf_counter() - started
    issue = IssueSpec(engine=spec.engine, port=spec.port, pin=spec.pin,
                      connections=spec.connections, in_flight=spec.in_flight,
                      duration=spec.duration, warmup=spec.warmup, pool=spec.pool,
                      first_name=spec.first_name, server_pid=spec.server_pid)
    run = IssueRun(issue, frames)
    connections = list(await asyncio.gather(
        *(open_issue_client(issue, run) for _ in range(spec.connections))))
    try:
        start = time.perf_counter() + 0.01
        run.measure_start = start + spec.warmup
        run.deadline = run.measure_start + spec.duration
        for proto in connections:
            for _ in range(spec.in_flight):
                if not run.send_next(proto):
                    break
            proto.transmit()
        run.stop_sending()
        server_cpu, loop_cpu, client_cpu = await _sample_cpu(issue, run)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.drained), DRAIN_TIMEOUT)
        for proto in connections:
            proto.abandon(f"still open {DRAIN_TIMEOUT:g} s after the end")
    finally:
        await close_clients(connections)
    window = max(1e-9, run.deadline - run.measure_start)
    latencies = sorted(run.latencies)
    return IssueResult(
        completed=len(latencies), window=window, rate=len(latencies) / window,
        p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
        max_ms=(latencies[-1] * 1e3 if latencies else 0.0), errors=run.errors,
        server_cpu=server_cpu, server_loop_cpu=loop_cpu, client_cpu=client_cpu,
        prepare_s=prepare, exhausted=run.exhausted, first_error=run.first_error)


def load_main(spec_json: str) -> int:
    spec = ProofLoadSpec(**json.loads(spec_json))

    async def main() -> Any:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        return await (_cold(spec) if spec.mode == "cold" else _warm(spec))

    result = uvloop.run(main())
    print(json.dumps(asdict(result)), flush=True)
    return 0


def _in_child(children: Children, spec: ProofLoadSpec, log: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.proofs", "load", json.dumps(asdict(spec))]
    child = children.start(f"load generator ({spec.mode})", argv, log)
    try:
        # credentials (about 40 ms a requester), proof sets (about 0.3 ms each)
        status = child.wait(120 + spec.warmup + spec.duration + len(spec.requesters) * 0.2
                            + spec.pool * 2e-3)
        lines = child.output()
        if status != 0 or not lines:
            raise RuntimeError(f"the load generator failed with status {status}"
                               f"{child.stderr_tail()}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    finally:
        children.stop(child)


SERVERS = ("four-proof", "local")
"""Part 2's servers, each a validator alone (every decision committed in a block, as a
default node does): ``trustchain serve`` with its four-proof check, and the same node
with the proofs only parsed (``bench._node --proofs parse``: the baseline), both sent
the same kind of requests."""

CONFIG = """\
# Written by bench/proofs.py for one benchmark run.
[node]
data_dir = "{data_dir}"
[ca]
mode = "development"
signing_workers = {signing_workers}
[api]
rate_limit_per_minute = 0
[network]
quic_engine = "{engine}"
[logging]
level = "warning"
format = "text"
[dns]
enabled = {dns}
[ct]
enable_realtime_fingerprinting = {dns}
[consensus]
plot_size = 18
vdf_iterations = {iterations}
minimum_work_difficulty = {difficulty}
epoch_length = "{epoch_length}s"
verify_workers = 1
[consensus.genesis]
{genesis}
"""


def make_requesters(directory: Path, count: int) -> list[Path]:
    """``count`` requester directories, each a key and its k=18 plot (kept if present)."""
    paths = []
    started = time.monotonic()
    for i in range(count):
        path = directory / f"requester-{i:05d}"
        stoq.Prover.open(path).ensure_plot(18)
        paths.append(path)
        if (i + 1) % 20 == 0 or i + 1 == count:
            progress(f"part 2: {i + 1}/{count} requesters with plots "
                     f"({time.monotonic() - started:.0f} s)")
    return paths


@dataclass
class StoqFigures:
    requesters: int
    services: str
    cold: dict[str, Any] | None = None
    health: dict[int, LoadResult] = field(default_factory=dict)
    warm: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    """Server (``four-proof``, ``local``) -> connections -> result."""
    problems: list[str] = field(default_factory=list)


def _start(children: Children, name: str, argv: list[str], log: Path) -> tuple[Any, int, str]:
    server = children.start(name, argv, log)
    listening = server.wait_for(LISTENING, 60.0)
    return server, int(listening.group(2)), server.wait_for(FINGERPRINT, 10.0).group(1)


def run_stoq(children: Children, engine: str, tmp: Path, plots: Path, count: int, *,
             duration: float, warmup: float, pool: int, services: str,
             signing_workers: int = 0) -> StoqFigures:
    requesters = make_requesters(plots, count)
    figures = StoqFigures(requesters=count, services=services)
    genesis = "\n".join(f'"{stoq.Prover.open(p).key_id}" = 1000' for p in requesters)
    dirs = [str(p) for p in requesters]
    beacon = ""
    names = 0
    for label in SERVERS:
        config = tmp / f"trustchain-{label}.toml"
        data_dir = tmp / f"data-{label}"
        config.write_text(CONFIG.format(data_dir=data_dir, engine=engine, genesis=genesis,
                                        iterations=VDF_ITERATIONS,
                                        difficulty=LOAD_DIFFICULTY, epoch_length=EPOCH_LENGTH,
                                        dns="true" if services == "all" else "false",
                                        signing_workers=signing_workers))
        argv = [sys.executable, *serve_argv(check_proofs=label == "four-proof", serve_args=[
            "--config", str(config), "--data-dir", str(data_dir), "--listen", "[::1]:0"])]
        server, port, pin = _start(children, f"trustchain serve ({label})", argv,
                                   tmp / f"trustchain-{label}.log")
        progress(f"part 2: trustchain serve ({label}) pid {server.pid} on [::1]:{port}")
        figures.warm[label] = {}
        try:
            if label == "four-proof":  # its epoch beacon; the local baseline takes it too
                cold = ProofLoadSpec(mode="cold", engine=engine, port=port, pin=pin,
                                     requesters=dirs, first_name=names, server_pid=server.pid)
                names += len(dirs)
                try:
                    result = _in_child(children, cold, tmp / f"load-cold-{label}.log")
                    figures.cold = result
                    beacon = result["beacon"]
                    progress(f"part 2: cold path ({label}): {result['requests']} first "
                             f"requests in {result['seconds']:.2f} s "
                             f"({result['rate']:.0f}/s), {result['errors']} "
                             f"errors {result['first_error']}")
                except (RuntimeError, OSError, ValueError) as exc:
                    figures.problems.append(f"cold path: {exc}")
                    progress(figures.problems[-1])
                    return figures
            for n in CONNECTIONS:
                if label == "four-proof":
                    health = LoadSpec(engine=engine, port=port, alpn=protocol.ALPN, pin=pin,
                                      request="health", expect="ok", connections=n,
                                      in_flight=IN_FLIGHT, duration=duration, warmup=warmup,
                                      server_pid=server.pid)
                    try:
                        figures.health[n] = load_in_child(children, health,
                                                          tmp / f"health-{n}.log")
                        progress(f"part 2: node.health, {n} conn: "
                                 f"{figures.health[n].rate:,.0f}/s")
                    except (RuntimeError, OSError, ValueError) as exc:
                        figures.problems.append(f"node.health, {n} conn: {exc}")
                        progress(figures.problems[-1])
                warm = ProofLoadSpec(mode="warm", engine=engine, port=port, pin=pin,
                                     requesters=dirs, connections=n, duration=duration,
                                     warmup=warmup, pool=pool, first_name=names,
                                     server_pid=server.pid, beacon=beacon)
                names += pool
                try:
                    result = _in_child(children, warm, tmp / f"load-{label}-{n}.log")
                    figures.warm[label][n] = result
                    progress(f"part 2: ca.issue ({label}), {n} conn: {result['rate']:,.0f}/s,"
                             f" p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                             f"{result['errors']} errors {result['first_error']}")
                except (RuntimeError, OSError, ValueError) as exc:
                    figures.problems.append(f"ca.issue ({label}), {n} conn: {exc}")
                    progress(figures.problems[-1])
                if server.proc.poll() is not None:
                    figures.problems.append(f"the server ({label}) died{server.stderr_tail()}")
                    break
        finally:
            status = children.stop(server)
            if status not in (0, None):
                figures.problems.append(f"trustchain serve ({label}) exited with status "
                                        f"{status}{server.stderr_tail()}")
    return figures


# --- report ------------------------------------------------------------------------------------


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e6:,.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:,.2f} ms"


def _cpu(fraction: float | None) -> str:
    return "—" if fraction is None else f"{fraction * 100:.0f} %"


def report_micro(micro: MicroFigures) -> str:
    rows = [[proof, what, _us(cold), _us(cached),
             f"{cold / cached:,.0f}" if cached else "—"]
            for proof, what, cold, cached in micro.rows]
    parts = ["### Verification cost per proof (one core, in process)\n",
             markdown_table(["proof", "what the node does", "cold (first sight)",
                             "cached (rest of the epoch)", "cold / cached"], rows), ""]
    whole = [[f"{difficulty} bits", _us(verify), f"{_us(work)} ({rows} a block)",
              _us(verify + work), "yes" if verify + work <= TARGET_WARM_MS / 1e3 else "no"]
             for difficulty, (verify, work, rows) in sorted(micro.warm.items())]
    warm8 = sum(micro.warm[min(micro.warm)][:2])
    parts += ["Whole warm request, CPU per request of this process (all threads): "
              "`ProofVerifier.verify` (parse, epoch, work, replay check against the state's "
              "used work, stake from the state, binding, cached space and time), then what "
              "the state machine does with the request's work when its block executes "
              f"(the used-work row added to the state hash and committed in a block of up to "
              f"{WORK_BLOCK} rows, `StateDatabase.apply`: fewer rows a block, more cost a "
              "row):\n",
              markdown_table(["work difficulty", "verify", "used-work row", "whole request",
                              f"<= {TARGET_WARM_MS} ms"], whole), "",
              f"Cold request (credentials verified in full, VDF on the event loop): "
              f"{_us(micro.cold)} CPU, {micro.cold / warm8:,.0f} times a warm one "
              f"({_us(warm8)}, {min(micro.warm)} bits); with the VDF in the worker process, as "
              f"the node runs it, a cold request waits {_us(micro.worker_latency)} (the event "
              f"loop is free meanwhile).", ""]
    return "\n".join(parts)


def report_stoq(figures: StoqFigures, pool: int) -> str:
    parts = [f"### Issuance over STOQ with full four-proof validation, {figures.requesters} "
             f"requesters\n"]
    cold = figures.cold
    if cold:
        parts.append(f"Cold path (each requester's first request of the epoch: its space and "
                     f"time credential verified in full, VDF in one worker process): "
                     f"{cold['requests']} requests in {cold['seconds']:.2f} s = "
                     f"**{cold['rate']:,.0f}/s**, server CPU {_cpu(cold['server_cpu'])} "
                     f"(errors: {cold['errors']}).\n")
    rows = []
    local = figures.warm.get("local", {})
    for label, title in (("four-proof", "four-proof admission (the default node)"),
                         ("local", "proofs parsed, not checked (baseline), same requests")):
        for n in CONNECTIONS:
            warm = figures.warm.get(label, {}).get(n)
            if warm is None:
                continue
            rate = warm["rate"]
            per = (warm["server_cpu"] / rate * 1e3) if warm["server_cpu"] and rate else None
            health = figures.health.get(n) if label == "four-proof" else None
            baseline = local.get(n) if label == "four-proof" else None
            rows.append([title, f"{n} conn x {IN_FLIGHT}", f"{rate:,.0f}/s",
                         f"{warm['p50_ms']:.1f} / {warm['p99_ms']:.1f} ms",
                         _cpu(warm["server_cpu"]), "—" if per is None else f"{per:.2f} ms",
                         _cpu(warm["client_cpu"]),
                         f"{rate / baseline['rate']:.2f}" if baseline and baseline["rate"]
                         else "",
                         f"{health.rate:,.0f}/s ({rate / health.rate:.3f})"
                         if health and health.rate else "",
                         str(warm["errors"]) + (" (pool used up)" if warm["exhausted"]
                                                else "")])
    parts.append(markdown_table(["server", "load", "ca.issue/s", "p50 / p99", "server CPU",
                                 "server CPU per issuance", "load generator CPU",
                                 "/ baseline", "node.health/s, same server (ratio)",
                                 "errors"], rows))
    parts.append(f"\nTarget (information only): >= {TARGET_RATE:,} issuances/s with warm "
                 f"proofs. Each closed-loop run has {pool:,} requests (CSR, fresh work, "
                 f"binding) made before its clock starts, round robin over the requesters; "
                 f"the same kind of requests go to a second server, the same node whose "
                 f"proof check only parses the proof set, so that the ratio of the two rows "
                 f"is what four-proof validation costs over STOQ. Both are validators alone: "
                 f"every issuance is two decisions, each committed in a block. Server: "
                 + ("every service of a node" if figures.services == "all" else
                    "no DNS and no real-time fingerprints (the fewest services a node has)")
                 + ".")
    for problem in figures.problems:
        parts.append(f"\nproblem: {problem}")
    return "\n".join(parts) + "\n"


def report_extrapolation(micro: MicroFigures, figures: StoqFigures) -> str:
    cold = figures.cold
    cold_rate = cold["rate"] if cold else None
    lines = ["### 10,000 requesters\n",
             "Plotting 10,000 k=18 plots would take about 3 hours and 40 GB here, so the run "
             f"above has {figures.requesters}. What grows with the number of requesters, and "
             "what does not:\n",
             "- a warm request costs the same with 10 or 10,000 requesters: the state's stake "
             "and used-work lookups are primary-key lookups, the credential caches and the "
             "key cache are hash lookups;",
             "- the node remembers two credentials a requester per accepted epoch (a 64-byte "
             "key, in a set: about 200 bytes with Python's overhead) and one parsed public "
             "key: about 2 MB for 10,000 requesters, 4 MB over the two accepted epochs;",
             f"- the cold path is bounded by the VDF check, about "
             f"{_us(micro.cold)} of CPU per requester and epoch: 10,000 requesters cost the "
             f"node about {10_000 * micro.cold:.0f} s of worker CPU an epoch"
             + (f" (at the measured {cold_rate:,.0f} first requests a second, "
                f"{10_000 / cold_rate:.0f} s of wall time at the start of each epoch, "
                f"spread over the epoch in practice)" if cold_rate else "")
             + "; `consensus.verify_workers` adds processes;",
             "- the replicated used-work table grows by one row per admitted request; the "
             "first block of an epoch drops the rows of epochs no longer accepted (every "
             "validator, in the same block)."]
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["load"] and len(args_list) == 2:
        return load_main(args_list[1])
    parser = argparse.ArgumentParser(prog="python -m bench.proofs",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REQUESTERS} requesters, 2 s runs, fewer samples")
    parser.add_argument("--requesters", type=int,
                        help=f"requesters with their own plot (default {REQUESTERS}, "
                             f"{QUICK_REQUESTERS} with --quick)")
    parser.add_argument("--plots", type=Path,
                        help="keep the requesters' keys and plots in this directory (and reuse "
                             "them next time); default: a temporary directory")
    parser.add_argument("--engine", choices=stoq.ENGINES, default=stoq.DEFAULT_ENGINE)
    parser.add_argument("--skip-micro", action="store_true", help="only part 2")
    parser.add_argument("--skip-stoq", action="store_true", help="only part 1")
    parser.add_argument("--services", choices=("proofs", "all"), default="proofs",
                        help="part 2's nodes: without DNS and real-time fingerprints "
                             "(default), or with every service of a node")
    parser.add_argument("--signing-workers", type=int, default=0, metavar="N",
                        help="ca.signing_workers of part 2's nodes (default 0: sign on the "
                             "event loop)")
    args = parser.parse_args(args_list)
    if args.skip_micro and args.skip_stoq:
        parser.error("--skip-micro and --skip-stoq: nothing would be left to run")
    if not 0 <= args.signing_workers <= 8:
        parser.error("--signing-workers: 0 to 8")
    count = args.requesters or (QUICK_REQUESTERS if args.quick else REQUESTERS)
    if not 1 <= count <= 10_000:
        parser.error("--requesters: 1 to 10,000")
    duration, warmup = (2.0, 0.25) if args.quick else (5.0, 0.5)
    pool = QUICK_POOL if args.quick else POOL
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    children = Children()
    print("## Four-proof admission, loopback [::1]\n")
    print("\n".join(machine_lines([args.engine])))
    print(f"- plots k=18, VDF {VDF_ITERATIONS:,} iterations (the node's check costs the same "
          f"at any count), work {LOAD_DIFFICULTY} bits over STOQ (so that one load-generator "
          f"process can make the requests; the node's cost is one SHA-256 at any difficulty, "
          f"see part 1), epoch {EPOCH_LENGTH} s; part 2's node runs "
          + ("every service of a node" if args.services == "all" else
             "the fewest services a node has (no DNS, no real-time fingerprints; "
             "`--services all` for the whole node)")
          + ", a validator alone (each decision committed in a block)"
          + (f"; certificates signed by {args.signing_workers} worker processes "
             "(ca.signing_workers)" if args.signing_workers else "") + "\n",
          flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="trustchain-bench-proofs-") as tmp_name:
            tmp = Path(tmp_name)
            try:
                micro = None
                if not args.skip_micro:
                    micro = uvloop.run(_micro(tmp, args.quick))
                    print(report_micro(micro), flush=True)
                if args.skip_stoq:
                    return 0
                plots = args.plots or tmp / "requesters"
                figures = run_stoq(children, args.engine, tmp, plots, count, duration=duration,
                                   warmup=warmup, pool=pool, services=args.services,
                                   signing_workers=args.signing_workers)
                print(report_stoq(figures, pool), flush=True)
                if micro is not None:
                    print(report_extrapolation(micro, figures), flush=True)
            finally:
                children.stop_all()
    except KeyboardInterrupt:
        progress("interrupted; every process was stopped")
        return 130
    print(f"total time {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

