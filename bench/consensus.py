"""Consensus: ``python -m bench.consensus [--quick] [--validators 1,4,7] [--part P]``.

For each cluster size N, a real cluster of N ``trustchain serve`` processes on
``[::1]`` (``trustchain cluster init --validators N --base-port 0``, one
process per node, Tendermint over STOQ), and one load-generator process that
talks to node-1 only:

1. finality: sequential ``consensus.faucet`` calls with fresh Ed25519 keys
   (each one decision, answered after its block is committed), beside
   sequential ``node.health`` on the same node;
2. decisions a second: closed-loop ``consensus.faucet`` with 64 requests in
   flight over 4 connections, beside ``node.health`` under the same load; the
   blocks committed in the window (``consensus.blocks``) give blocks a second
   and decisions a block;
3. issuance through consensus (clusters of 1 and 4): closed-loop ``ca.issue``
   with real four-proof sets (k=18 plots, the development VDF), the requester
   keys funded through ``consensus.faucet`` first, every proof set built
   before the clock starts;
4. evidence: a separate cluster of 4 whose node-4 is ``python -m
   tests.byzantine`` (it equivocates on every proposal and vote): time from
   each equivocation to the first honest node's evidence, and until the
   evidence is committed in a block.

``--part execute`` instead measures executing committed blocks of issuances and
their certificates through a real state machine, in this process
(:mod:`bench.execute`; ``--blocks``, ``--per-block``).

``--part seal`` instead measures sealing alone, in this process: 1,000 decisions
sealed and opened one signature each (the baseline) against one signature a
batch of 64 (spec/stoq.md §18.5), CPU µs a decision for the entry and a verifier.
``--part cbor`` measures decoding and opening sealed ``issue`` and ``certificate``
decisions against the code of a baseline commit, in this process (:mod:`bench._opening`).

Loopback only; every run bounded in time and count; every process stopped at
the end (also on error or Ctrl-C); the clusters' data in a temporary directory.
Markdown on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import cbor2
import uvloop
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import protocol
import stoq
from handlers.consensus import Sealer, SealOpener, seal, seal_batch
from handlers.consensus._sealed import parse_group, whole_batches
from handlers.consensus.bft import Validator, ValidatorSet

from ._common import (
    HOST,
    LISTENING,
    ROOT,
    STOQ_OK_PREFIX,
    Child,
    Children,
    _describe,
    cpu_seconds,
    loopback_sent,
    machine_lines,
    markdown_table,
    percentile,
)
from ._opening import BASELINE_COMMIT, open_report
from ._streams import close_clients, open_client
from .ca import IssueRun, IssueSpec, name_of
from .execute import BLOCKS, PER_BLOCK, execute_report

VALIDATORS = (1, 4, 7)
ISSUE_SIZES = (1, 4)
"""Cluster sizes that also measure ca.issue (when they are measured at all)."""
EVIDENCE_SIZE = 4
CONNECTIONS = 4
IN_FLIGHT = 16
"""Per connection: 64 requests in flight over the 4 connections."""
DEEP_IN_FLIGHT = 64
"""Per connection for ca.issue and the second faucet run: 256 in flight over 4 connections,
as bench.ca's and bench.proofs' "4 conns x 64" rows (64 in flight cap a run at 64 / latency)."""
SEQUENTIAL = 200
QUICK_SEQUENTIAL = 50
SEQUENTIAL_WARMUP = 3
"""Requests sent before a sequential series is timed."""
SEQUENTIAL_LIMIT, QUICK_SEQUENTIAL_LIMIT = 12.0, 4.0
"""Seconds a sequential series may take: it stops there if its count is not reached."""
DURATION, QUICK_DURATION = 4.0, 2.0
WARMUP, QUICK_WARMUP = 0.5, 0.25
ISSUE_WARMUP = 3.0
LONG_ISSUE_WARMUP = 6.0
"""With --issue-window: a latency of 1-3 s at 256 in flight needs more than one
latency to settle before the window opens."""
LONG_ISSUE_RATE = 500
"""With --issue-window: proof sets made per second of window (and warm-up)."""
"""Seconds the ca.issue loop runs before its window opens (longer than its latency)."""
FAUCET_POOL, QUICK_FAUCET_POOL = 12_000, 5_000
"""Fresh keys made for one closed-loop faucet run (the window ends early if it uses them up)."""
ISSUE_POOL, QUICK_ISSUE_POOL = 4_000, 3_000
"""Proof sets (CSR, fresh work, binding) made for one closed-loop ca.issue run."""
REQUESTERS, QUICK_REQUESTERS = 4, 2
"""Requester keys, each with its own k=18 plot, that the ca.issue requests round-robin over."""
PLOT_SIZE = 18
WORK_DIFFICULTY = 8
"""The clusters' ``minimum_work_difficulty`` (cluster init writes 16): 8 bits keep the
load generator's proof sets cheap; the node checks one SHA-256 at any difficulty."""
EVIDENCE_HEIGHTS, QUICK_EVIDENCE_HEIGHTS = 5, 3
"""Heights with recorded evidence to time (found and committed), idle and with traffic."""
EVIDENCE_TIMEOUT, QUICK_EVIDENCE_TIMEOUT = 15.0, 10.0
POLL_INTERVAL = 0.02
"""Seconds between consensus.status polls of the honest nodes (evidence test)."""
READY_TIMEOUT = 90.0
REQUEST_TIMEOUT = 35.0
"""Client timeout of one request (the nodes' finality_timeout is 30 s)."""
DRAIN_TIMEOUT = 15.0
BLOCKS_LIMIT = 64
"""Blocks asked for per consensus.blocks request (halved while an answer is too large)."""
CLIENT_MAX_FRAME = 64 << 20
"""The load generator's frame limit: a consensus.blocks answer can exceed the default 1 MiB."""

TARGET_FINALITY_P99_MS = 1000.0
TARGET_EVIDENCE_MS = 100.0
TARGET_ISSUE_RATE = 1000.0


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the load generator (a child process) ------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Job:
    """One measurement, run by the load generator against node-1."""

    name: str
    kind: str
    """``health`` (node.health), ``faucet`` (consensus.faucet) or ``issue`` (ca.issue)."""
    mode: str
    """``sequential`` (one request at a time, ``count`` of them) or ``closed`` (``in_flight``
    per connection until the window ends)."""
    count: int = 0
    connections: int = CONNECTIONS
    in_flight: int = IN_FLIGHT
    duration: float = DURATION
    warmup: float = WARMUP
    pool: int = 0
    first_name: int = 0
    requesters: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class LoadPlan:
    """What one load-generator process runs, in order, passed as JSON."""

    engine: str
    port: int
    cafile: str
    node_pids: list[int]
    jobs: list[Job]

    @classmethod
    def from_json(cls, text: str) -> LoadPlan:
        raw = json.loads(text)
        raw["jobs"] = [Job(**j) for j in raw["jobs"]]
        return cls(**raw)


@dataclass(frozen=True, kw_only=True)
class BlockStats:
    """Blocks committed with their time in the window (their proposer's stamp)."""

    blocks: int = 0
    decisions: int = 0
    max_decisions: int = 0
    late: int = 0
    """Of which committed in a round after 0 (a round change)."""


@dataclass(frozen=True, kw_only=True)
class JobResult:
    name: str
    completed: int = 0
    window: float = 0.0
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: int = 0
    first_error: str = ""
    cluster_cpu: float | None = None
    """Cores the node processes used in the window, all of them together."""
    client_cpu: float = 0.0
    loopback: tuple[int, int] | None = None
    """Bytes and packets sent over loopback in the window (every link and the client)."""
    prepare_s: float = 0.0
    exhausted: bool = False
    limited: bool = False
    """Sequential: stopped at its time limit before its count."""
    blocks: BlockStats | None = None
    cold_ms: list[float] = field(default_factory=list)
    """ca.issue: each requester's first request (credentials checked in full)."""
    start_ms: int = 0
    end_ms: int = 0
    """The measurement window, Unix time in milliseconds (for the blocks in it)."""
    failed: str = ""
    """Why the job could not run at all."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobResult:
        if raw.get("blocks") is not None:
            raw = {**raw, "blocks": BlockStats(**raw["blocks"])}
        return cls(**raw)


def _ed25519_spki() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _csr(index: int) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec

    return stoq.build_csr(ec.generate_private_key(ec.SECP256R1()), [name_of(index)], [])


def _cluster_cpu(pids: list[int]) -> float | None:
    total = 0.0
    for pid in pids:
        value = cpu_seconds(pid)
        if value is None:
            return None
        total += value
    return total


class _Run(IssueRun):
    """:class:`bench.ca.IssueRun` with answers checked by kind: ``ca.issue`` answers as
    bench.ca checks them; others must be whole ``{"ok": ...}`` frames (the first faucet
    answer decoded: it must have credited the key)."""

    def __init__(self, spec: IssueSpec, frames: list[bytes], kind: str) -> None:
        super().__init__(spec, frames)
        self.kind = kind

    def check(self, data: bytes, index: int) -> bool:
        if self.kind == "issue":
            return super().check(data, index)
        if len(data) < 4 or int.from_bytes(data[:4], "big") != len(data) - 4:
            self.error(f"response is not one whole frame ({len(data)} bytes)")
            return False
        if data[4:8] != STOQ_OK_PREFIX:
            self.error(f"not an ok response: {_describe(data)}")
            return False
        if self.kind == "faucet" and not self.checked_first:
            self.checked_first = True
            ok = cbor2.loads(data[4:])["ok"]
            if not ok.get("credited"):
                self.error(f"the faucet credited nothing: {ok}")
                return False
        return True


def _frames(job: Job) -> list[bytes]:
    if job.kind == "health":
        return [protocol.encode_frame({"op": "node.health", "args": {}})] * job.pool
    if job.kind == "faucet":
        return [protocol.encode_frame({"op": "consensus.faucet", "args": {"key": _ed25519_spki()}})
                for _ in range(job.pool)]
    raise ValueError(f"no pre-made frames for {job.kind!r}")


async def _closed(plan: LoadPlan, job: Job, frames: list[bytes],
                  first_name: int = 0) -> JobResult:
    """Closed loop: ``in_flight`` requests per connection, each answer sends the next."""
    spec = IssueSpec(engine=plan.engine, port=plan.port, pin="", connections=job.connections,
                     in_flight=job.in_flight, duration=job.duration, warmup=job.warmup,
                     pool=len(frames), first_name=first_name)
    run = _Run(spec, frames, job.kind)
    # node-1 serves its CA-issued certificate once the cluster is up: verified
    # against the cluster's root
    engine = stoq.load_engine(plan.engine)
    connections = list(await asyncio.gather(
        *(open_client(engine, run, host=HOST, port=plan.port, cafile=plan.cafile)
          for _ in range(job.connections))))
    perf_counter = time.perf_counter
    try:
        start = perf_counter() + 0.01
        run.measure_start = start + job.warmup
        run.deadline = run.measure_start + job.duration
        for proto in connections:
            for _ in range(job.in_flight):
                if not run.send_next(proto):
                    break
            proto.transmit()
        run.stop_sending()
        await asyncio.sleep(max(0.0, run.measure_start - perf_counter()))
        cpu0, client0, wall0 = _cluster_cpu(plan.node_pids), time.process_time(), perf_counter()
        sent0 = loopback_sent()
        start_ms = int(time.time() * 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.ended.wait(), max(0.0, run.deadline - perf_counter()))
        wall = max(1e-9, perf_counter() - wall0)
        cpu1, client1 = _cluster_cpu(plan.node_pids), time.process_time()
        sent1 = loopback_sent()
        end_ms = int(time.time() * 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.drained), DRAIN_TIMEOUT)
        for proto in connections:
            proto.abandon(f"still open {DRAIN_TIMEOUT:g} s after the end")
    finally:
        await close_clients(connections)
    window = max(1e-9, run.deadline - run.measure_start)
    latencies = sorted(run.latencies)
    return JobResult(
        name=job.name, completed=len(latencies), window=window, rate=len(latencies) / window,
        p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
        max_ms=latencies[-1] * 1e3 if latencies else 0.0, errors=run.errors,
        first_error=run.first_error,
        cluster_cpu=None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / wall,
        client_cpu=(client1 - client0) / wall, exhausted=run.exhausted, start_ms=start_ms,
        end_ms=end_ms, loopback=None if sent0 is None or sent1 is None else (
            sent1[0] - sent0[0], sent1[1] - sent0[1]))


async def _sequential(plan: LoadPlan, job: Job, client: stoq.AsyncClient) -> JobResult:
    """``count`` requests one at a time (after a few untimed ones)."""
    keys = [_ed25519_spki() for _ in range(job.count + SEQUENTIAL_WARMUP)]
    latencies: list[float] = []
    errors, first_error = 0, ""
    cpu0 = client0 = wall0 = 0.0
    start_ms = 0
    started_cpu: float | None = None
    limited = False
    for i, key in enumerate(keys):
        if i == SEQUENTIAL_WARMUP:
            started_cpu = _cluster_cpu(plan.node_pids)
            client0, wall0 = time.process_time(), time.perf_counter()
            start_ms = int(time.time() * 1000)
        elif i > SEQUENTIAL_WARMUP and time.perf_counter() - wall0 >= job.duration:
            limited = True
            break
        started = time.perf_counter()
        try:
            if job.kind == "health":
                await client.request("node.health", timeout=REQUEST_TIMEOUT)
            else:
                answer = await client.request("consensus.faucet", {"key": key},
                                              timeout=REQUEST_TIMEOUT)
                if not answer.get("credited"):
                    raise ValueError(f"the faucet credited nothing: {answer}")
        except (protocol.TrustChainError, ValueError) as exc:
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            if not client.is_connected:
                break
            continue
        if i >= SEQUENTIAL_WARMUP:
            latencies.append(time.perf_counter() - started)
    wall = max(1e-9, time.perf_counter() - wall0)
    cpu1 = _cluster_cpu(plan.node_pids)
    if started_cpu is not None:
        cpu0 = started_cpu
    latencies.sort()
    return JobResult(
        name=job.name, completed=len(latencies), window=wall, rate=len(latencies) / wall,
        p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
        max_ms=latencies[-1] * 1e3 if latencies else 0.0, errors=errors,
        first_error=first_error,
        cluster_cpu=None if started_cpu is None or cpu1 is None else (cpu1 - cpu0) / wall,
        client_cpu=(time.process_time() - client0) / wall, start_ms=start_ms,
        end_ms=int(time.time() * 1000), limited=limited)


async def _issue(plan: LoadPlan, job: Job, client: stoq.AsyncClient) -> JobResult:
    """Fund the requesters through consensus, make their credentials, send each one's
    first (cold) request, build the proof sets, then run the closed loop."""
    from protocol.ops.consensus import issue_digest

    provers = [stoq.Prover.open(Path(d)) for d in job.requesters]
    started = time.perf_counter()
    for prover in provers:
        await client.request("consensus.faucet", {"key": prover.spki}, timeout=REQUEST_TIMEOUT)
    await asyncio.sleep(0.2)  # let every validator execute the faucet blocks
    beacon = stoq.Beacon.from_result(await client.request("consensus.beacon",
                                                          timeout=REQUEST_TIMEOUT))
    credentials = [p.credential_for(beacon, make_plot=False) for p in provers]
    name = job.first_name
    cold: list[float] = []
    for prover, credential in zip(provers, credentials, strict=True):
        csr = _csr(name)
        name += 1
        proofs = prover.build("issue", issue_digest(csr), beacon, credential).to_wire()
        sent = time.perf_counter()
        await client.request("ca.issue", {"csr": csr, "proofs": proofs},
                             timeout=REQUEST_TIMEOUT)
        cold.append((time.perf_counter() - sent) * 1e3)
    frames = []
    for i in range(job.pool):
        which = i % len(provers)
        csr = _csr(name + i)
        proofs = provers[which].build("issue", issue_digest(csr), beacon,
                                      credentials[which]).to_wire()
        frames.append(protocol.encode_frame({"op": "ca.issue",
                                             "args": {"csr": csr, "proofs": proofs}}))
    prepare = time.perf_counter() - started
    result = await _closed(plan, job, frames, first_name=name)
    return replace(result, prepare_s=prepare, cold_ms=cold)


async def _block_stats(client: stoq.AsyncClient, start: int, window: tuple[int, int]
                       ) -> BlockStats:
    """Blocks from height ``start`` on whose time is within ``window`` (ms)."""
    blocks = decisions = most = late = 0
    height = max(1, start)
    limit = BLOCKS_LIMIT
    while True:
        try:
            answer = await client.request("consensus.blocks", {"start": height, "limit": limit},
                                          timeout=REQUEST_TIMEOUT)
        except protocol.NotFound:
            break
        except protocol.FrameTooLarge:
            if limit == 1:
                raise
            limit //= 2
            continue
        items = answer["blocks"]
        for item in items:
            block = protocol.decode_item(item["block"])
            commit = protocol.decode_item(item["commit"])
            height = int(block["height"]) + 1
            if window[0] <= int(block["time_ms"]) < window[1]:
                count = len(block["decisions"])
                blocks += 1
                decisions += count
                most = max(most, count)
                late += int(commit["round"]) > 0
        if not items or height > int(answer.get("latest", 0)):
            break
    return BlockStats(blocks=blocks, decisions=decisions, max_decisions=most, late=late)


async def _connect(plan: LoadPlan) -> stoq.AsyncClient:
    return await stoq.connect(HOST, plan.port, cafile=plan.cafile, engine=plan.engine,
                              timeout=REQUEST_TIMEOUT, keep_alive_interval=5.0,
                              max_frame_size=CLIENT_MAX_FRAME)


async def run_plan(plan: LoadPlan) -> list[JobResult]:
    """Every job in turn; a job that fails leaves a result that says why."""
    results: list[JobResult] = []
    client = await _connect(plan)
    try:
        for job in plan.jobs:
            try:
                if not client.is_connected:  # a job before this one lost it
                    await client.close()
                    client = await _connect(plan)
                height = int((await client.request("consensus.status"))["height"])
                if job.mode == "sequential":
                    result = await _sequential(plan, job, client)
                elif job.kind == "issue":
                    result = await _issue(plan, job, client)
                else:
                    prepared = time.perf_counter()
                    frames = _frames(job)
                    prepare = time.perf_counter() - prepared
                    result = replace(await _closed(plan, job, frames), prepare_s=prepare)
                if job.kind != "health":
                    window = (result.start_ms, result.end_ms)
                    result = replace(result, blocks=await _block_stats(client, height, window))
            except (protocol.TrustChainError, OSError, ValueError, KeyError) as exc:
                result = JobResult(name=job.name, failed=f"{type(exc).__name__}: {exc}")
            results.append(result)
    finally:
        await client.close()
    return results


def load_main(plan_json: str) -> int:
    plan = LoadPlan.from_json(plan_json)

    async def main() -> list[JobResult]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        return await run_plan(plan)

    results = uvloop.run(main())
    print(json.dumps([asdict(r) for r in results]), flush=True)
    return 0


def plan_in_child(children: Children, plan: LoadPlan, log_path: Path) -> list[JobResult]:
    """Run ``plan`` in a separate load-generator process; its results, in order."""
    argv = [sys.executable, "-m", "bench.consensus", "load", json.dumps(asdict(plan))]
    child = children.start("load generator", argv, log_path)
    limit = 120.0
    for job in plan.jobs:
        limit += (job.warmup + job.duration + DRAIN_TIMEOUT + job.pool * 2e-3
                  if job.mode == "closed" else job.duration + 2 * REQUEST_TIMEOUT)
    try:
        status = child.wait(limit)
        lines = child.output()
        if status != 0 or not lines:
            raise RuntimeError(f"the load generator failed with status {status}"
                               f"{child.stderr_tail()}")
        return [JobResult.from_dict(r) for r in json.loads(lines[-1])]
    finally:
        children.stop(child)


# --- clusters --------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    config: Path
    port: int
    validator_id: str
    child: Child | None = None


@dataclass
class Cluster:
    size: int
    directory: Path
    nodes: list[Node]
    notes: list[str] = field(default_factory=list)

    @property
    def cafile(self) -> Path:
        return self.directory / "root.pem"

    @property
    def pids(self) -> list[int]:
        return [n.child.pid for n in self.nodes if n.child is not None]


CONFIG_CHANGES = (
    (re.compile(r'^level = "info"$', re.M), 'level = "warning"',
     "logging at warning (no per-decision info lines)"),
    (re.compile(r"^minimum_work_difficulty = \d+$", re.M),
     f"minimum_work_difficulty = {WORK_DIFFICULTY}",
     f"consensus.minimum_work_difficulty = {WORK_DIFFICULTY}"),
)


def make_cluster(tmp: Path, size: int, label: str, *, dns: bool = True) -> Cluster:
    """``trustchain cluster init`` of ``size`` validators in ``tmp/label``, then the
    benchmark's changes to every node's configuration (:data:`CONFIG_CHANGES`; without
    ``dns``, ``[dns] enabled = false`` too)."""
    directory = tmp / label
    argv = [sys.executable, "-m", "trustchain", "cluster", "init", "--validators", str(size),
            "--out", str(directory), "--base-port", "0"]
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180,
                              check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError("trustchain cluster init did not finish within 180 s") from None
    if done.returncode != 0:
        raise RuntimeError(f"trustchain cluster init failed with status {done.returncode}: "
                           f"{(done.stdout + done.stderr).strip()[-2000:]}")
    table = tomllib.loads((directory / "cluster.toml").read_text())
    nodes = [Node(name=str(n["name"]), config=directory / str(n["config"]), port=int(n["port"]),
                  validator_id=str(n.get("validator_id", ""))) for n in table["nodes"]]
    cluster = Cluster(size=size, directory=directory, nodes=nodes)
    changes = list(CONFIG_CHANGES)
    if not dns:
        changes.append((re.compile(r"^\[dns\]$", re.M), "[dns]\nenabled = false",
                        "dns.enabled = false"))
    for node in nodes:
        text = node.config.read_text()
        for pattern, value, what in changes:
            text, count = pattern.subn(value, text)
            if count != 1 and node is nodes[0]:
                cluster.notes.append(f"could not set {what} in the node configuration")
        node.config.write_text(text)
    return cluster


def start_cluster(children: Children, cluster: Cluster, *, byzantine: int | None = None
                  ) -> None:
    """Start every node (node ``byzantine``, 0-based, as ``tests.byzantine``), then wait
    until each serves its CA-issued certificate and sees all of its peers."""
    for i, node in enumerate(cluster.nodes):
        module = ["tests.byzantine"] if i == byzantine else ["trustchain", "serve"]
        argv = [sys.executable, "-m", *module, "--config", str(node.config)]
        node.child = children.start(f"{node.name} of {cluster.size}", argv,
                                    cluster.directory / f"{node.name}.log")
    for node in cluster.nodes:
        assert node.child is not None
        node.child.wait_for(LISTENING, 60.0)
    uvloop.run(_wait_ready(cluster))


async def _wait_ready(cluster: Cluster) -> None:
    deadline = time.monotonic() + READY_TIMEOUT

    async def ready(node: Node) -> None:
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert node.child is not None
            if node.child.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited{node.child.stderr_tail()}")
            try:
                async with await stoq.connect(HOST, node.port, cafile=str(cluster.cafile),
                                              timeout=2.0, keep_alive_interval=None) as client:
                    await client.request("node.health", timeout=2.0)
                    status = await client.request("consensus.status", timeout=2.0)
                    peers = status.get("peers", [])
                    if status.get("height", 0) >= 2 and all(p.get("connected") for p in peers):
                        return
                    last = (f"height {status.get('height')}, "
                            f"{sum(bool(p.get('connected')) for p in peers)}/{len(peers)} "
                            f"peers connected")
            except (protocol.TrustChainError, OSError) as exc:
                last = str(exc)
            await asyncio.sleep(0.25)
        raise RuntimeError(f"{node.name} was not ready within {READY_TIMEOUT:g} s ({last})")

    await asyncio.gather(*(ready(n) for n in cluster.nodes))


def stop_cluster(children: Children, cluster: Cluster) -> list[str]:
    """SIGTERM every node at once, then wait for each; what went wrong, if anything."""
    problems = []
    running = [n.child for n in cluster.nodes if n.child is not None]
    for child in running:
        with contextlib.suppress(ProcessLookupError):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
    for child in running:
        status = children.stop(child)
        if status not in (0, None, -signal.SIGTERM):
            problems.append(f"{child.name} exited with status {status}{child.stderr_tail(5)}")
    return problems


@dataclass
class NodeStatus:
    name: str
    height: int = 0
    round: int = 0
    misbehaviour: int = 0
    evidence: int = 0
    committed_evidence: int = 0
    mempool: int = 0
    peers: str = ""
    isolated: int = 0
    late_blocks: int = 0
    blocks: int = 0
    groups: str = "-"
    """Decision groups sent / received (spec §18.3; "-" from a node without them)."""
    error: str = ""


async def _statuses(cluster: Cluster, *, blocks: bool = True) -> list[NodeStatus]:
    """consensus.status of every node (and, from node-1, the rounds of every block)."""

    async def one(node: Node, count_blocks: bool) -> NodeStatus:
        row = NodeStatus(node.name)
        try:
            async with await stoq.connect(HOST, node.port, insecure=True, timeout=5.0,
                                          keep_alive_interval=None,
                                          max_frame_size=CLIENT_MAX_FRAME) as client:
                status = await client.request("consensus.status", timeout=5.0)
                peers = status.get("peers", [])
                evidence = status.get("evidence", [])
                row = NodeStatus(
                    node.name, height=int(status.get("height", 0)),
                    round=int(status.get("round", 0)),
                    misbehaviour=int(status.get("misbehaviour", 0)), evidence=len(evidence),
                    committed_evidence=sum(e.get("committed_height") is not None
                                           for e in evidence),
                    mempool=int(status.get("mempool", 0)),
                    peers=f"{sum(bool(p.get('connected')) for p in peers)}/{len(peers)}",
                    isolated=len(status.get("isolated", [])))
                groups = status.get("decision_groups")
                if isinstance(groups, dict):
                    row.groups = f"{groups.get('sent', 0)} / {groups.get('received', 0)}"
                if count_blocks:
                    stats = await _block_stats(client, 1, (0, 1 << 62))
                    row.blocks, row.late_blocks = stats.blocks, stats.late
        except (protocol.TrustChainError, OSError) as exc:
            row.error = f"{type(exc).__name__}: {exc}"
        return row

    return list(await asyncio.gather(*(one(n, blocks and i == 0)
                                       for i, n in enumerate(cluster.nodes))))


# --- one cluster size ---------------------------------------------------------------------------


@dataclass
class SizeFigures:
    size: int
    results: dict[str, JobResult] = field(default_factory=dict)
    statuses: list[NodeStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    start_s: float = 0.0


@dataclass(frozen=True)
class Settings:
    engine: str
    sequential: int
    sequential_limit: float
    duration: float
    warmup: float
    faucet_pool: int
    issue_pool: int
    requesters: list[str]
    issue_sizes: tuple[int, ...]
    deep_faucet: bool
    """Also run the faucet with 256 in flight."""
    dns: bool
    """The nodes run their DNS service (as cluster init configures them)."""
    evidence_heights: int
    evidence_timeout: float
    issue_window: float | None = None
    """The ca.issue load's window in seconds (after a 6 s warm-up); None: the default."""


def jobs_for(size: int, settings: Settings) -> list[Job]:
    duration, warmup = settings.duration, settings.warmup
    jobs = [
        Job(name="health-seq", kind="health", mode="sequential", count=settings.sequential,
            duration=settings.sequential_limit),
        Job(name="faucet-seq", kind="faucet", mode="sequential", count=settings.sequential,
            duration=settings.sequential_limit),
        Job(name="health-load", kind="health", mode="closed", pool=200_000, duration=duration,
            warmup=warmup),
        Job(name="faucet-load", kind="faucet", mode="closed", pool=settings.faucet_pool,
            duration=duration, warmup=warmup),
    ]
    if settings.deep_faucet:
        jobs.append(Job(name="faucet-deep", kind="faucet", mode="closed",
                        in_flight=DEEP_IN_FLIGHT, pool=settings.faucet_pool,
                        duration=duration, warmup=warmup))
    if size in settings.issue_sizes and settings.requesters:
        # an issuance is two commits (the decision, then the signed certificate): the
        # loop needs longer than its latency to fill before the window opens
        pool, window, settle = issue_timing(settings)
        jobs.append(Job(name="issue-load", kind="issue", mode="closed",
                        in_flight=DEEP_IN_FLIGHT, pool=pool, requesters=settings.requesters,
                        duration=window, warmup=settle))
    return jobs


def issue_timing(settings: Settings) -> tuple[int, float, float]:
    """The ca.issue load's proof sets, window and warm-up (seconds)."""
    window = settings.issue_window
    if window is None:
        return (settings.issue_pool, max(settings.duration, DURATION),
                max(settings.warmup, ISSUE_WARMUP))
    return (max(settings.issue_pool, int((window + LONG_ISSUE_WARMUP) * LONG_ISSUE_RATE)),
            window, LONG_ISSUE_WARMUP)


def run_size(children: Children, tmp: Path, size: int, settings: Settings) -> SizeFigures:
    figures = SizeFigures(size)
    started = time.monotonic()
    try:
        cluster = make_cluster(tmp, size, f"cluster-{size}", dns=settings.dns)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        figures.problems.append(f"cluster init: {exc}")
        return figures
    figures.problems += cluster.notes
    try:
        try:
            start_cluster(children, cluster)
        except (RuntimeError, OSError) as exc:
            figures.problems.append(f"the cluster did not start: {exc}")
            return figures
        figures.start_s = time.monotonic() - started
        progress(f"{size} validator{'s' if size > 1 else ''}: up in {figures.start_s:.1f} s "
                 f"(pids {', '.join(map(str, cluster.pids))}); load on node-1 "
                 f"[::1]:{cluster.nodes[0].port}")
        plan = LoadPlan(engine=settings.engine, port=cluster.nodes[0].port,
                        cafile=str(cluster.cafile), node_pids=cluster.pids,
                        jobs=jobs_for(size, settings))
        try:
            for result in plan_in_child(children, plan, tmp / f"load-{size}.log"):
                figures.results[result.name] = result
                progress(f"  N = {size}, {result.name}: {describe(result)}")
        except (RuntimeError, OSError, ValueError) as exc:
            figures.problems.append(f"load generator: {exc}")
        figures.statuses = uvloop.run(_statuses(cluster))
        for node in cluster.nodes:
            if node.child is not None and node.child.proc.poll() is not None:
                figures.problems.append(f"{node.name} died{node.child.stderr_tail(10)}")
    finally:
        figures.problems += stop_cluster(children, cluster)
    return figures


# --- evidence ------------------------------------------------------------------------------------


@dataclass
class EvidencePhase:
    label: str
    traffic: bool
    heights: list[dict[str, Any]] = field(default_factory=list)
    """Per timed height: at_ms, found_ms, found_by, committed_ms (seen by polling)."""
    equivocations: int = 0
    """Equivocations the byzantine node printed while it was watched."""
    vote_heights: int = 0
    unrecorded: int = 0
    """Heights with an equivocating vote and no evidence at any honest node."""
    faucets: int = 0
    """Sequential faucet calls answered meanwhile (the traffic phase)."""
    first_height: int = 0
    last_height: int = 0
    last_round: int = 0
    """node-1's height at the first and last poll, and its round at the last."""
    watched_s: float = 0.0
    error: str = ""


@dataclass
class EvidenceFigures:
    phases: list[EvidencePhase] = field(default_factory=list)
    statuses: list[NodeStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _equivocations(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """JSON equivocation lines appended to ``path`` since ``offset``; the new offset."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    found = []
    for line in data[:end].splitlines():
        if line.startswith(b'{"equivocated"'):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found, offset + end


async def _faucet_traffic(client: stoq.AsyncClient, phase: EvidencePhase) -> None:
    """Sequential consensus.faucet calls until cancelled: a block every few tens of ms."""
    while True:
        try:
            await client.request("consensus.faucet", {"key": _ed25519_spki()},
                                 timeout=REQUEST_TIMEOUT)
            phase.faucets += 1
        except protocol.TrustChainError as exc:
            phase.error = phase.error or f"faucet: {exc}"
            await asyncio.sleep(0.1)


async def _watch_evidence(cluster: Cluster, byzantine: Node, phase: EvidencePhase,
                          offset: int, wanted: int, timeout: float) -> int:
    """Time the first ``wanted`` heights with recorded evidence, from the byzantine log
    after ``offset``; the log offset reached."""
    honest = [n for n in cluster.nodes if n is not byzantine]
    assert byzantine.child is not None
    log_path = byzantine.child.log_path
    clients = [await stoq.connect(HOST, n.port, cafile=str(cluster.cafile), timeout=10.0,
                                  keep_alive_interval=None) for n in honest]
    traffic = (asyncio.ensure_future(_faucet_traffic(clients[0], phase)) if phase.traffic
               else None)
    vote_at: dict[int, int] = {}
    found: dict[int, tuple[int, str]] = {}
    committed: dict[int, int] = {}
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout:
            lines, offset = _equivocations(log_path, offset)
            phase.equivocations += len(lines)
            for line in lines:
                if line.get("equivocated") == "vote":
                    height = int(line["height"])
                    vote_at[height] = min(vote_at.get(height, 1 << 62), int(line["at_ms"]))
            answers = await asyncio.gather(*(c.request("consensus.status", timeout=5.0)
                                             for c in clients))
            seen_ms = int(time.time() * 1000)
            phase.first_height = phase.first_height or int(answers[0].get("height", 0))
            phase.last_height = int(answers[0].get("height", 0))
            phase.last_round = int(answers[0].get("round", 0))
            for node, status in zip(honest, answers, strict=True):
                for entry in status.get("evidence", []):
                    height = int(entry["height"])
                    if entry.get("offender") != byzantine.validator_id or height not in vote_at:
                        continue
                    if height not in found or entry["found_ms"] < found[height][0]:
                        found[height] = (int(entry["found_ms"]), node.name)
                    if entry.get("committed_height") is not None and height not in committed:
                        committed[height] = seen_ms
            if sum(1 for h in found if h in committed) >= wanted:
                break
            await asyncio.sleep(POLL_INTERVAL)
    finally:
        if traffic is not None:
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
        for client in clients:
            await client.close()
    phase.watched_s = time.monotonic() - started
    phase.vote_heights = len(vote_at)
    last = max(vote_at) if vote_at else 0
    # the last height may still be in progress: not counted
    phase.unrecorded = sum(1 for h in vote_at if h not in found and h < last)
    for height in [h for h in sorted(vote_at) if h in found][:wanted]:
        phase.heights.append({"height": height, "at_ms": vote_at[height],
                              "found_ms": found[height][0], "found_by": found[height][1],
                              "committed_ms": committed.get(height)})
    return offset


def run_evidence(children: Children, tmp: Path, settings: Settings) -> EvidenceFigures:
    figures = EvidenceFigures()
    try:
        cluster = make_cluster(tmp, EVIDENCE_SIZE, "evidence", dns=settings.dns)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        figures.problems.append(f"cluster init: {exc}")
        return figures
    byzantine = cluster.nodes[-1]
    figures.problems += cluster.notes
    try:
        try:
            start_cluster(children, cluster, byzantine=len(cluster.nodes) - 1)
        except (RuntimeError, OSError) as exc:
            figures.problems.append(f"the cluster did not start: {exc}")
            return figures
        progress(f"evidence: {EVIDENCE_SIZE} validators up, {byzantine.name} is "
                 f"tests.byzantine (pids {', '.join(map(str, cluster.pids))})")
        assert byzantine.child is not None
        _, offset = _equivocations(byzantine.child.log_path, 0)  # before the cluster was up
        for label, traffic in (("idle cluster", False),
                               ("sequential consensus.faucet traffic", True)):
            phase = EvidencePhase(label, traffic)
            figures.phases.append(phase)
            try:
                offset = uvloop.run(_watch_evidence(cluster, byzantine, phase, offset,
                                                    settings.evidence_heights,
                                                    settings.evidence_timeout))
            except (protocol.TrustChainError, OSError) as exc:
                phase.error = f"watching the honest nodes: {exc}"
            progress(f"evidence, {label}: {describe_phase(phase)}")
        figures.statuses = uvloop.run(_statuses(cluster))
        if byzantine.child.proc.poll() is not None:
            figures.problems.append(f"{byzantine.name} died{byzantine.child.stderr_tail(10)}")
    finally:
        figures.problems += stop_cluster(children, cluster)
    return figures


def _offsets(phase: EvidencePhase) -> tuple[list[float], list[float]]:
    detect = sorted(float(h["found_ms"] - h["at_ms"]) for h in phase.heights)
    commit = sorted(float(h["committed_ms"] - h["at_ms"]) for h in phase.heights
                    if h["committed_ms"] is not None)
    return detect, commit


def describe_phase(phase: EvidencePhase) -> str:
    detect, commit = _offsets(phase)
    text = (f"{len(detect)} heights timed in {phase.watched_s:.1f} s (node-1 from height "
            f"{phase.first_height} to {phase.last_height}, round {phase.last_round}); "
            f"evidence after "
            f"{', '.join(f'{d:.0f}' for d in detect) or '-'} ms, committed after "
            f"{', '.join(f'{c:.0f}' for c in commit) or '-'} ms")
    if phase.traffic:
        text += f"; {phase.faucets} faucet calls meanwhile"
    if phase.error:
        text += f"; {phase.error}"
    return text


# --- presentation ------------------------------------------------------------------------------


def describe(result: JobResult) -> str:
    if result.failed:
        return f"failed: {result.failed}"
    text = (f"{result.completed:,} in {result.window:.2f} s = {result.rate:,.0f}/s, p50/p99/max "
            f"{result.p50_ms:.1f} / {result.p99_ms:.1f} / {result.max_ms:.1f} ms, cluster CPU "
            f"{_cores(result.cluster_cpu)}, load generator {_cores(result.client_cpu)}")
    if result.prepare_s:
        text += f" (prepared in {result.prepare_s:.1f} s)"
    if result.blocks is not None:
        b = result.blocks
        text += (f"; {b.blocks} blocks, {b.decisions} decisions (max {b.max_decisions} a "
                 f"block), {b.late} after round 0")
    if result.cold_ms:
        text += f"; cold first requests {', '.join(f'{c:.0f}' for c in result.cold_ms)} ms"
    if result.exhausted:
        text += "; used up its pool (window cut short)"
    if result.limited:
        text += "; stopped at its time limit"
    if result.errors:
        text += f"; {result.errors} errors (first: {result.first_error})"
    return text


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} cores"


def _ms(value: float) -> str:
    return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


def _rate(value: float) -> str:
    return f"{value:,.0f}/s" if value >= 10 else f"{value:,.1f}/s"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.3f}" if a / b < 10 else f"{a / b:,.1f}"


def _get(figures: SizeFigures, name: str) -> JobResult | None:
    result = figures.results.get(name)
    return None if result is None or result.failed else result


def size_table(all_figures: list[SizeFigures]) -> str:
    """One column per cluster size, the ratio to the first size, and the baselines."""
    sizes = [f.size for f in all_figures]

    def value(figures: SizeFigures, job: str, read: Any) -> float | None:
        result = _get(figures, job)
        if result is None:
            return None
        got = read(result)
        return None if got is None else float(got)

    def blocks_per_s(r: JobResult) -> float | None:
        return None if r.blocks is None or not r.window else r.blocks.blocks / r.window

    def decisions_per_block(r: JobResult) -> float | None:
        return None if r.blocks is None or not r.blocks.blocks else (
            r.blocks.decisions / r.blocks.blocks)

    def committed_per_s(r: JobResult) -> float | None:
        return None if r.blocks is None or not r.window else r.blocks.decisions / r.window

    def cores(r: JobResult) -> float | None:
        return r.cluster_cpu

    def cpu_per_request(r: JobResult) -> float | None:
        return None if r.cluster_cpu is None or not r.rate else r.cluster_cpu / r.rate * 1e3

    def loopback_per_request(part: int) -> Any:
        def read(r: JobResult) -> float | None:
            if r.loopback is None or not r.rate or not r.window:
                return None
            return r.loopback[part] / (r.rate * r.window)
        return read

    rows: list[tuple[str, str, Any, str, str]] = [
        ("finality p50: sequential consensus.faucet", "faucet-seq", lambda r: r.p50_ms, "ms", ""),
        ("finality p99", "faucet-seq", lambda r: r.p99_ms, "ms",
         f"<= {TARGET_FINALITY_P99_MS:,.0f} ms at 4"),
        ("finality max", "faucet-seq", lambda r: r.max_ms, "ms", ""),
        ("baseline: sequential node.health p50", "health-seq", lambda r: r.p50_ms, "ms", ""),
        ("baseline: sequential node.health p99", "health-seq", lambda r: r.p99_ms, "ms", ""),
        ("faucet decisions/s answered, 64 in flight", "faucet-load", lambda r: r.rate, "rate",
         ""),
        ("decisions/s committed (blocks in the window)", "faucet-load", committed_per_s, "rate",
         ""),
        ("blocks/s", "faucet-load", blocks_per_s, "rate", ""),
        ("decisions per block (mean)", "faucet-load", decisions_per_block, "num", ""),
        ("decisions per block (max)", "faucet-load",
         lambda r: None if r.blocks is None else r.blocks.max_decisions, "num", ""),
        ("faucet p50 / p99 under load", "faucet-load", None, "lat", ""),
        ("faucet decisions/s answered, 256 in flight", "faucet-deep", lambda r: r.rate, "rate",
         ""),
        ("decisions/s committed, 256 in flight", "faucet-deep", committed_per_s, "rate", ""),
        ("blocks/s, 256 in flight", "faucet-deep", blocks_per_s, "rate", ""),
        ("decisions per block (mean), 256 in flight", "faucet-deep", decisions_per_block, "num",
         ""),
        ("faucet p50 / p99, 256 in flight", "faucet-deep", None, "lat", ""),
        ("baseline: node.health/s, 64 in flight", "health-load", lambda r: r.rate, "rate", ""),
        ("baseline: node.health p50 / p99 under load", "health-load", None, "lat", ""),
        ("ca.issue/s with four proofs, 256 in flight", "issue-load", lambda r: r.rate, "rate",
         f">= {TARGET_ISSUE_RATE:,.0f}/s at 4"),
        ("ca.issue p50 / p99", "issue-load", None, "lat", ""),
        ("ca.issue, blocks/s", "issue-load", blocks_per_s, "rate", ""),
        ("ca.issue, decisions per block (mean)", "issue-load", decisions_per_block, "num", ""),
        ("cluster CPU (cores), faucet load, 64 in flight", "faucet-load", cores, "cores", ""),
        ("cluster CPU (cores), ca.issue load", "issue-load", cores, "cores", ""),
        ("cluster CPU (cores), node.health load", "health-load", cores, "cores", ""),
        ("cluster CPU per faucet decision, 256 in flight", "faucet-deep", cpu_per_request, "ms",
         ""),
        ("cluster CPU per issuance", "issue-load", cpu_per_request, "ms", ""),
        ("loopback bytes per issuance (every link and the client)", "issue-load",
         loopback_per_request(0), "num", ""),
        ("loopback datagrams per issuance", "issue-load", loopback_per_request(1), "num", ""),
    ]
    header = ["figure", *(f"N = {s}" for s in sizes),
              *(f"N = {s} / N = {sizes[0]}" for s in sizes[1:]), "target"]
    out: list[list[str]] = []
    for label, job, read, unit, target in rows:
        cells: list[str] = []
        values: list[float | None] = []
        for figures in all_figures:
            result = _get(figures, job)
            if unit == "lat":
                cells.append("-" if result is None else
                             f"{_ms(result.p50_ms)} / {_ms(result.p99_ms)}")
                values.append(None if result is None else result.p99_ms)
                continue
            got = value(figures, job, read)
            values.append(got)
            if got is None:
                cells.append("-")
            elif unit == "ms":
                cells.append(_ms(got))
            elif unit == "rate":
                cells.append(_rate(got))
            elif unit == "cores":
                cells.append(f"{got:.2f}")
            else:
                cells.append(f"{got:,.1f}")
        if all(v is None for v in values):
            continue  # not measured in this run (--quick, or no cluster of that size)
        ratios = [_ratio(v, values[0]) for v in values[1:]]
        if target and "at 4" in target and 4 in sizes:
            got = values[sizes.index(4)]
            if got is not None:
                met = got <= TARGET_FINALITY_P99_MS if unit == "ms" else got >= TARGET_ISSUE_RATE
                target += " (met)" if met else " (not met)"
        out.append([label, *cells, *ratios, target])
    return markdown_table(header, out)


def status_table(title: str, statuses: list[NodeStatus]) -> str:
    rows = []
    for s in statuses:
        if s.error:
            rows.append([s.name, "-", "-", "-", "-", "-", "-", "-", "-", s.error])
            continue
        rows.append([s.name, str(s.height), str(s.round), str(s.misbehaviour),
                     f"{s.evidence} ({s.committed_evidence} committed)", str(s.mempool),
                     s.peers, str(s.isolated), s.groups,
                     f"{s.late_blocks} of {s.blocks} blocks after round 0" if s.blocks else ""])
    return f"{title}\n\n" + markdown_table(
        ["node", "height", "round", "misbehaviour", "evidence", "mempool", "peers connected",
         "isolated", "decision groups sent / received", "rounds"], rows)


def evidence_report(figures: EvidenceFigures) -> str:
    parts = [f"### Evidence: {EVIDENCE_SIZE} validators, node-{EVIDENCE_SIZE} equivocating "
             "(`python -m tests.byzantine`)\n"]
    rows = []
    for phase in figures.phases:
        detect, commit = _offsets(phase)
        if not detect:
            rows.append([phase.label, "0 heights", "-", "-", "-", "-", phase.error or "-"])
            continue
        p50 = percentile(detect, 0.5)
        met = (f"{'met' if p50 <= TARGET_EVIDENCE_MS else 'not met'} at p50, "
               f"{'met' if detect[-1] <= TARGET_EVIDENCE_MS else 'not met'} at max")
        rows.append([phase.label, f"{len(detect)} heights", _ms(p50), _ms(detect[-1]),
                     _ms(percentile(commit, 0.5)) if commit else "-",
                     _ms(commit[-1]) if commit else "-",
                     f"<= {TARGET_EVIDENCE_MS:g} ms: {met}"])
    parts.append(markdown_table(
        ["cluster", "sample", "evidence p50", "evidence max", "committed p50",
         "committed max", "target (evidence)"], rows))
    parts.append("\nFrom the byzantine node's first equivocating vote of a height (its "
                 "`at_ms`, stamped once both versions are queued for its peers) to the "
                 "first honest node's `found_ms` for that height (the same machine's clock), "
                 "and to the first `consensus.status` poll (every "
                 f"{POLL_INTERVAL * 1000:.0f} ms) that shows the evidence committed.\n")
    for phase in figures.phases:
        parts.append(f"{phase.label}: node-1 went from height {phase.first_height} to "
                     f"{phase.last_height} (round {phase.last_round} at the end) in "
                     f"{phase.watched_s:.1f} s; the byzantine node printed "
                     f"{phase.equivocations} equivocations (each proposal and vote it sends, "
                     f"re-sends included) at {phase.vote_heights} heights; "
                     f"{phase.unrecorded} heights with an "
                     "equivocating vote got no evidence record (a validator keeps one "
                     "pending evidence per offender until a block commits it)"
                     + (f"; {phase.faucets} faucet calls answered meanwhile"
                        if phase.traffic else "") + ".\n")
        if phase.heights:
            parts.append(markdown_table(
                ["height", "first equivocating vote (ms)", "evidence found", "by",
                 "committed"],
                [[str(h["height"]), str(h["at_ms"]), f"+{h['found_ms'] - h['at_ms']} ms",
                  h["found_by"],
                  "-" if h["committed_ms"] is None else f"+{h['committed_ms'] - h['at_ms']} ms"]
                 for h in phase.heights]) + "\n")
    if figures.statuses:
        parts.append(status_table("consensus.status at the end:", figures.statuses))
    for problem in figures.problems:
        parts.append(f"\nproblem: {problem}")
    return "\n".join(parts) + "\n"


def report(all_figures: list[SizeFigures], evidence: EvidenceFigures | None,
           settings: Settings) -> str:
    parts = ["### Finality, throughput and issuance by cluster size\n"]
    if all_figures:
        parts.append(size_table(all_figures))
    details = []
    for figures in all_figures:
        for name in ("faucet-seq", "faucet-load", "faucet-deep", "issue-load"):
            result = figures.results.get(name)
            if result is not None and (result.failed or result.errors or result.exhausted
                                       or result.cold_ms):
                details.append(f"- N = {figures.size}, {name}: {describe(result)}")
        for problem in figures.problems:
            details.append(f"- N = {figures.size}: problem: {problem}")
    if details:
        parts += ["", *details]
    for figures in all_figures:
        if figures.statuses:
            parts += ["", status_table(f"N = {figures.size}: consensus.status after the load "
                                       f"(cluster up in {figures.start_s:.1f} s):",
                                       figures.statuses)]
    parts.append("")
    if evidence is not None:
        parts.append(evidence_report(evidence))
    return "\n".join(parts)


# --- main ------------------------------------------------------------------------------------


def make_requesters(directory: Path, count: int) -> list[str]:
    """``count`` requester directories, each a P-256 key and its k=18 plot."""
    paths = []
    for i in range(count):
        path = directory / f"requester-{i}"
        stoq.Prover.open(path).ensure_plot(PLOT_SIZE)
        paths.append(str(path))
    return paths


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def parse_sizes(text: str) -> list[int]:
    if text == "none":
        return []
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of sizes") from None
    if not sizes or any(not 1 <= s <= 10 for s in sizes):
        raise argparse.ArgumentTypeError("cluster sizes from 1 to 10")
    return sorted(set(sizes))


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["load"] and len(args_list) == 2:
        return load_main(args_list[1])
    parser = argparse.ArgumentParser(prog="python -m bench.consensus",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SEQUENTIAL} sequential calls instead of {SEQUENTIAL}, "
                             f"{QUICK_DURATION:g} s windows instead of {DURATION:g} s, "
                             f"{QUICK_REQUESTERS} requesters, {QUICK_EVIDENCE_HEIGHTS} "
                             f"heights with evidence timed")
    parser.add_argument("--validators", type=parse_sizes, default=list(VALIDATORS),
                        metavar="N,N,...",
                        help="cluster sizes (default 1,4,7; none: only the evidence test); "
                             "ca.issue is measured at 1 and 4")
    parser.add_argument("--no-evidence", action="store_true",
                        help="skip the byzantine cluster")
    parser.add_argument("--no-dns", action="store_true",
                        help="nodes without their DNS service ([dns] enabled = false), which "
                             "publishes every certificate's AAAA and TLSA records")
    parser.add_argument("--engine", choices=stoq.ENGINES, default=stoq.DEFAULT_ENGINE,
                        help="QUIC engine of the load generator")
    parser.add_argument("--part", choices=("clusters", "seal", "cbor", "execute"),
                        default="clusters",
                        help="clusters: the cluster figures (default); seal: only the seal "
                             "micro-benchmark (batch against plain seals, in this process); "
                             "cbor: only decoding and opening sealed decisions, against the "
                             f"code at {BASELINE_COMMIT} (in this process); "
                             "execute: only executing committed blocks of issuances "
                             "(bench.execute, in this process)")
    parser.add_argument("--blocks", type=int, default=BLOCKS,
                        help=f"--part execute: blocks timed (default {BLOCKS})")
    parser.add_argument("--per-block", type=int, default=PER_BLOCK,
                        help=f"--part execute: issuances a block (default {PER_BLOCK})")
    parser.add_argument("--issue-window", type=float, metavar="SECONDS",
                        help="measure ca.issue over this window after a 6 s warm-up "
                             "(default: the 4 s window, 3 s warm-up); at 1-3 s of latency "
                             "the default window sees few blocks, so compare cluster CPU "
                             "per issuance over 15 s or more")
    parser.add_argument("--workdir", type=Path,
                        help="keep the clusters, their logs and the load generators' output "
                             "in this new directory (default: a temporary directory, deleted)")
    args = parser.parse_args(args_list)
    if args.part == "seal":
        print(seal_report(), flush=True)
        return 0
    if args.part == "cbor":
        print(open_report(), flush=True)
        return 0
    if args.part == "execute":
        if args.blocks < 1 or args.per_block < 1:
            parser.error("--blocks and --per-block must be 1 or more")
        print(execute_report(args.blocks, args.per_block), flush=True)
        return 0
    if args.workdir is not None and args.workdir.exists():
        parser.error(f"--workdir {args.workdir} exists already")
    quick = args.quick
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    children = Children()
    sizes: list[int] = args.validators
    print("## Consensus (Tendermint over STOQ), loopback [::1]\n")
    print("\n".join(machine_lines([args.engine])))
    print(f"- load average before the run: {load_average()}")
    try:
        with contextlib.ExitStack() as stack:
            if args.workdir is not None:
                tmp = args.workdir.resolve()
                tmp.mkdir(parents=True)
            else:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="trustchain-bench-consensus-")))
            try:
                issue_sizes = tuple(s for s in ISSUE_SIZES if s in sizes)
                requesters: list[str] = []
                if issue_sizes:
                    count = QUICK_REQUESTERS if quick else REQUESTERS
                    progress(f"making {count} requester keys with k={PLOT_SIZE} plots")
                    requesters = make_requesters(tmp / "requesters", count)
                settings = Settings(
                    engine=args.engine,
                    sequential=QUICK_SEQUENTIAL if quick else SEQUENTIAL,
                    sequential_limit=QUICK_SEQUENTIAL_LIMIT if quick else SEQUENTIAL_LIMIT,
                    duration=QUICK_DURATION if quick else DURATION,
                    warmup=QUICK_WARMUP if quick else WARMUP,
                    faucet_pool=QUICK_FAUCET_POOL if quick else FAUCET_POOL,
                    issue_pool=QUICK_ISSUE_POOL if quick else ISSUE_POOL,
                    requesters=requesters, issue_sizes=issue_sizes, deep_faucet=not quick,
                    dns=not args.no_dns,
                    evidence_heights=QUICK_EVIDENCE_HEIGHTS if quick else EVIDENCE_HEIGHTS,
                    evidence_timeout=QUICK_EVIDENCE_TIMEOUT if quick else EVIDENCE_TIMEOUT,
                    issue_window=args.issue_window)
                print(settings_lines(settings, sizes), flush=True)
                all_figures = [run_size(children, tmp, size, settings) for size in sizes]
                evidence = None if args.no_evidence else run_evidence(children, tmp, settings)
                print(report(all_figures, evidence, settings), flush=True)
            finally:
                children.stop_all()
    except KeyboardInterrupt:
        progress("interrupted; every process was stopped")
        return 130
    print(f"load average after the run: {load_average()}; total time "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return 0


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine skews every figure)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def settings_lines(settings: Settings, sizes: list[int]) -> str:
    pool, window, settle = issue_timing(settings)
    issue = (f"ca.issue at N = {', '.join(map(str, settings.issue_sizes))}: "
             f"{len(settings.requesters)} requesters (P-256 keys, k={PLOT_SIZE} plots, the "
             f"development VDF of 10,000 iterations), funded through consensus.faucet first; "
             f"{pool:,} proof sets (new P-256 CSR and name each, fresh work, "
             f"binding) built before the clock starts; "
             f"{settle:g} s warm-up then a {window:g} s window (an issuance is two commits)"
             if settings.issue_sizes else "no ca.issue run (needs N = 1 or 4)")
    return "\n".join([
        f"- clusters of {', '.join(map(str, sizes))} validators, each made by `trustchain "
        f"cluster init --base-port 0` (development mode, one process per node, "
        + ("every service of the node" if settings.dns else
           "every service of the node but DNS (`[dns] enabled = false`)")
        + f"), with logging at warning and minimum_work_difficulty = "
        f"{WORK_DIFFICULTY}; every request goes to node-1 (the entry node), which answers "
        f"consensus.faucet once a block has committed the decision and ca.issue once the "
        f"signed certificate is committed too",
        f"- sequential: {settings.sequential} requests one at a time after "
        f"{SEQUENTIAL_WARMUP} untimed (or as many as {settings.sequential_limit:g} s allow); "
        f"under load: {CONNECTIONS} connections x {IN_FLIGHT} in flight (64) for node.health "
        f"and the faucet; {CONNECTIONS} x {DEEP_IN_FLIGHT} (256) for ca.issue"
        + (" and a second faucet run" if settings.deep_faucet else "")
        + f"; {settings.warmup:g} s warm-up then a {settings.duration:g} s window (ends "
        f"early if a run uses up its pool: {settings.faucet_pool:,} fresh Ed25519 keys for "
        f"the faucet)",
        f"- {issue}",
        f"- evidence: a separate cluster of {EVIDENCE_SIZE}, node-{EVIDENCE_SIZE} run by "
        f"`python -m tests.byzantine`; the first {settings.evidence_heights} heights with "
        f"recorded evidence after the cluster is up are timed (at most "
        f"{settings.evidence_timeout:g} s), on the idle cluster, then under sequential "
        f"consensus.faucet traffic on node-1",
        f"- targets (information only): finality p99 <= {TARGET_FINALITY_P99_MS:,.0f} ms at 4 "
        f"validators; evidence <= {TARGET_EVIDENCE_MS:g} ms; >= {TARGET_ISSUE_RATE:,.0f} "
        f"issuances/s through consensus at 4 validators",
        "",
    ])



# --- seals (micro-benchmark, in this process): python -m bench.consensus --part seal ---------

SEAL_DECISIONS = 1000
SEAL_BATCH = 64
SEAL_RUNS = 5
SEAL_BODY_BYTES = 1500
"""About an ``issue`` decision's body: a CSR, a precertificate and the four proofs."""


@dataclass(frozen=True)
class SealFigures:
    label: str
    seal_us: float
    """CPU µs a decision for the entry (median of :data:`SEAL_RUNS`)."""
    open_us: float
    """CPU µs a decision for a verifier, every seal checked (median)."""
    signatures: int
    octets: float
    """Mean size of a sealed decision."""


def _seal_bodies(count: int) -> list[dict[str, Any]]:
    return [{"kind": "stake", "key_id": f"{i:064x}", "amount": i, "reason": "faucet",
             "at_ms": 1_700_000_000_000 + i, "padding": bytes([i % 256]) * SEAL_BODY_BYTES}
            for i in range(count)]


def _measure_seals(label: str, make: Any, grouped: bool = False) -> SealFigures:
    """CPU time to seal every body with ``make(bodies, entry, sign)``, then to open each
    (``grouped``: the entry also makes the decision groups, spec §18.3, and the verifier
    rebuilds the decisions from them before it opens each; the size is a group's share)."""
    key = Ed25519PrivateKey.generate()
    me = Validator(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    validators = ValidatorSet((me,))
    bodies = _seal_bodies(SEAL_DECISIONS)
    seal_times, open_times = [], []
    sealed: list[bytes] = []
    signatures = 0
    for _ in range(SEAL_RUNS):
        count = [0]

        def sign(message: bytes, count: list[int] = count) -> bytes:
            count[0] += 1
            return key.sign(message)
        started = time.process_time()
        sealed = make(bodies, me.id, sign)
        groups = [g.message() for g in whole_batches(sealed, me.id, 1 << 24)[0]] \
            if grouped else []
        seal_times.append(time.process_time() - started)
        signatures = count[0]
        opener = SealOpener()
        started = time.process_time()
        if grouped:
            sealed = [decision for message in groups for decision in opener.open_group(
                parse_group(protocol.decode_item(message)), validators)]
        for decision in sealed:
            opener.open(decision, validators)
        open_times.append(time.process_time() - started)
    wire = groups if grouped else sealed
    return SealFigures(label=label, seal_us=statistics.median(seal_times) / SEAL_DECISIONS * 1e6,
                       open_us=statistics.median(open_times) / SEAL_DECISIONS * 1e6,
                       signatures=signatures,
                       octets=sum(map(len, wire)) / len(sealed))


def _one_by_one(bodies: list[dict[str, Any]], entry: str, sign: Any) -> list[bytes]:
    return [seal(body, entry, sign) for body in bodies]


def _in_batches(bodies: list[dict[str, Any]], entry: str, sign: Any) -> list[bytes]:
    raw = [protocol.encode_deterministic(body) for body in bodies]
    return [decision for start in range(0, len(raw), SEAL_BATCH)
            for decision in seal_batch(raw[start:start + SEAL_BATCH], entry, sign)]


def _through_the_sealer(bodies: list[dict[str, Any]], entry: str, sign: Any) -> list[bytes]:

    async def run() -> list[bytes]:
        sealer = Sealer(entry=entry, sign=sign, limit=SEAL_BATCH)
        return list(await asyncio.gather(*(sealer.seal(body) for body in bodies)))
    return asyncio.run(run())


def seal_report() -> str:
    """Sealing and opening :data:`SEAL_DECISIONS` decisions: one signature each (the
    baseline, measured in the same run) against one a batch of :data:`SEAL_BATCH`."""
    progress(f"sealing and opening {SEAL_DECISIONS} decisions, {SEAL_RUNS} runs each")
    baseline = _measure_seals("one by one (plain seals)", _one_by_one)
    rows = [baseline,
            _measure_seals(f"seal_batch, batches of {SEAL_BATCH}", _in_batches),
            _measure_seals(f"Sealer (async), {SEAL_BATCH} a loop turn", _through_the_sealer),
            _measure_seals(f"seal_batch of {SEAL_BATCH}, sent and opened as decision groups",
                           _in_batches, grouped=True)]
    table = markdown_table(
        ["sealing", "signatures", "entry CPU µs/decision", "ratio", "verifier CPU µs/decision",
         "ratio", "octets/decision"],
        [[r.label, f"{r.signatures:,}", f"{r.seal_us:.1f}", _ratio(r.seal_us, baseline.seal_us),
          f"{r.open_us:.1f}", _ratio(r.open_us, baseline.open_us), f"{r.octets:.0f}"]
         for r in rows])
    return (f"### Seals: {SEAL_DECISIONS:,} decisions of a {SEAL_BODY_BYTES:,}-octet body "
            f"(median of {SEAL_RUNS} runs, CPU time of this process)\n\n{table}\n\n"
            "The verifier opens every decision with one SealOpener (each batch signature "
            "verified once, then the path only); the entry's figure includes encoding. "
            "Decision groups: the entry's figure includes making the groups, the "
            "verifier's rebuilding the decisions (one tree a group) before opening them "
            "(no path walked again), the octets are what crosses a link.\n")


if __name__ == "__main__":
    sys.exit(main())
