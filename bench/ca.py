"""Certificate issuance under load: ``python -m bench.ca [--quick] [--keystore K] [--part P]``.

For each keystore (``software``: a development node with software keys;
``softhsm2``: a production node whose CA keys are in a SoftHSM2 token made for
the run) it starts a real ``trustchain serve``, a validator alone, with the
fewest services a node has (no DNS, no real-time fingerprints) and without the
four-proof check (``bench._node --proofs parse``: each request's proof set is
parsed, not verified; ``bench.proofs`` measures what the check adds, and
``bench.consensus`` what more validators add). Every ``ca.issue`` is what a
node does: the CSR and names checked, the precertificate signed, an ``issue``
decision committed in a block (its precertificate logged in CT), the SCT, the
certificate signed and committed in a second block. It measures, on that one
server: ``node.health`` requests a second (the baseline), ``ca.issue``
requests a second with 64 requests in flight on 1 and on 4 connections, and
``ca.issue`` latency at an offered rate of half the best of those two (or
``--rate``; open loop: requests are sent on a schedule and latency counts from
the scheduled time).
Every request asks for a distinct DNS name (``h<i>.hypermesh``), so the
name-ownership check runs against the database for real; the CSRs (P-256) are
made in the load-generator process before its clock starts, each with a
synthetic proof set for the server's epoch (:func:`bench._node.synthetic_proofs`:
the size of a real one, fresh work). Loopback ``[::1]``
only; every run is bounded in time and count; every server is stopped at the
end, also on error or Ctrl-C.

``--part leaf`` (or ``all``, after the rest) times, in this process, what one
leaf certificate costs to make: the expected TBS a validator rebuilds to check a
precertificate, and ``sign_leaf``, each the way it was made before
(``CertificateBuilder``, a throwaway signature for the TBS) beside our DER
(``handlers/ca/_leaf_der.py``), per issuer key (software P-256 and Ed25519;
SoftHSM2 ones too when it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import cbor2
import uvloop

import protocol
import stoq

from ._common import (
    FINGERPRINT,
    HOST,
    LISTENING,
    STOQ_OK_PREFIX,
    Child,
    Children,
    LoadResult,
    LoadSpec,
    _describe,
    cpu_seconds,
    load_in_child,
    machine_lines,
    markdown_table,
    percentile,
)
from ._node import serve_argv, synthetic_proofs
from ._streams import close_clients, open_client

KEYSTORES = ("software", "softhsm2")
SOFTHSM2_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
"""Where Debian's softhsm2 package puts the module (store's default for ``softhsm2``)."""

IN_FLIGHT = 64
"""Requests kept in flight on each connection in the closed-loop tests."""
CONNECTIONS = (1, 4)
OFFERED_RATE = 1000.0
"""The issuances a second the latency target is stated at."""
OFFERED_SHARE = 0.5
"""Without ``--rate``, the open-loop test offers this share of the best closed-loop
``ca.issue`` rate just measured on the same server: a load it sustains (at 1,000/s
offered, above what a node with its validator chain sustains here, the latency
would only say how long the backlog grew)."""
OPEN_LOOP_CONNECTIONS = 4
"""Connections the open-loop schedule is spread over, round robin."""
POOL = 20_000
"""CSRs made for one closed-loop run (each run gets its own, with new names)."""
QUICK_POOL = 8_000
DRAIN_TIMEOUT = 10.0
"""Seconds the load generator waits for the last answers after the window."""

TARGET_RATE = 1500
TARGET_P99_MS = 35.0

DOMAIN = "hypermesh"


def name_of(index: int) -> str:
    """The DNS name of request ``index``; unique over the life of one server."""
    return f"h{index}.{DOMAIN}"


# --- the load generator (a child process) --------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class IssueSpec:
    """One ``ca.issue`` load run, passed to the load-generator process as JSON."""

    engine: str
    port: int
    pin: str
    connections: int
    in_flight: int = IN_FLIGHT
    """Closed loop: requests kept in flight on each connection (ignored when ``rate``)."""
    rate: float = 0.0
    """Open loop: requests a second sent on a fixed schedule; 0 = closed loop."""
    duration: float = 5.0
    warmup: float = 0.5
    pool: int = POOL
    """CSRs to make before the clock starts; a closed-loop run ends early if it uses them up."""
    first_name: int = 0
    """Index of the first name (:func:`name_of`); the run uses ``pool`` names from there."""
    server_pid: int = 0


@dataclass(frozen=True, kw_only=True)
class IssueResult:
    completed: int
    """Certificates received in the window (errors not included)."""
    window: float
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    server_cpu: float | None
    """Fraction of one core the server used in the window (all its threads)."""
    server_loop_cpu: float | None
    """Of which its main thread (the event loop)."""
    client_cpu: float
    prepare_s: float
    """Seconds spent making the CSRs, before the clock started."""
    exhausted: bool = False
    """The run used up its CSRs before the end of the window (the window was cut short)."""
    scheduled: int = 0
    """Open loop: requests scheduled in the window."""
    send_lag_p99_ms: float = 0.0
    """Open loop: how late the load generator sent its requests (99th percentile)."""
    first_error: str = ""


def make_frames(first: int, count: int, epoch: int) -> list[bytes]:
    """``count`` pre-encoded ``ca.issue`` requests, each with a new P-256 key and name,
    and a proof set of the real shape for ``epoch`` that only a parse-only node admits
    (:func:`bench._node.synthetic_proofs`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    frames = []
    for index in range(first, first + count):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(name_of(index))]),
                              critical=False)
               .sign(key, hashes.SHA256()))
        frames.append(protocol.encode_frame(
            {"op": "ca.issue", "args": {
                "csr": csr.public_bytes(serialization.Encoding.DER),
                "proofs": synthetic_proofs(epoch, index.to_bytes(8, "big"))}}))
    return frames


async def current_epoch(spec: IssueSpec) -> int:
    """The server's current proof epoch (``consensus.beacon``)."""
    async with await stoq.connect(HOST, spec.port, pin=spec.pin, engine=spec.engine,
                                  timeout=30) as client:
        beacon = await client.request("consensus.beacon")
    return int(beacon["epoch"])


def thread_cpu(pid: int) -> tuple[float, float] | None:
    """CPU seconds of process ``pid``: (all threads and its live child processes, such
    as signing workers; main thread), or None."""
    total = cpu_seconds(pid)
    main = cpu_seconds_of_task(pid, pid)
    if total is None or main is None:
        return None
    return total + sum(cpu_seconds(child) or 0.0 for child in child_pids(pid)), main


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc/PID/task/TID/children``)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                children += [int(c) for c in f.read().split()]
    return children


def cpu_seconds_of_task(pid: int, tid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class IssueRun:
    """The shared state of one ``ca.issue`` run across its connections."""

    def __init__(self, spec: IssueSpec, frames: list[bytes]) -> None:
        self.spec = spec
        self.frames = frames
        self.next = 0
        self.open_loop = spec.rate > 0
        self.latencies: list[float] = []
        self.send_lags: list[float] = []
        self.errors = 0
        self.first_error = ""
        self.measure_start = math.inf
        self.deadline = math.inf
        self.outstanding = 0
        self.sending_done = False
        loop = asyncio.get_running_loop()
        self.drained: asyncio.Future[None] = loop.create_future()
        self.ended = asyncio.Event()
        """Set when the window ends early (closed loop: the CSRs ran out)."""
        self.exhausted = False
        self.checked_first = False

    def take(self) -> tuple[bytes, int] | None:
        """The next request and its index, or None when the pool is used up."""
        if self.next >= len(self.frames):
            if not self.exhausted:
                self.exhausted = True
                now = time.perf_counter()
                if now < self.deadline:  # cut the window short: the rate stays honest
                    self.deadline = now
                    self.ended.set()
            return None
        index = self.next
        self.next += 1
        return self.frames[index], index

    def error(self, message: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = message

    def counts(self, started: float, now: float) -> bool:
        """Whether an answer belongs to the window: by its scheduled time in an open
        loop (every scheduled request is waited for), by its arrival in a closed one."""
        if self.open_loop:
            return self.measure_start <= started < self.deadline
        return self.measure_start <= now < self.deadline

    def check(self, data: bytes, index: int) -> bool:
        """Whether ``data`` is an issued certificate (the first one is decoded in full)."""
        if len(data) < 4 or int.from_bytes(data[:4], "big") != len(data) - 4:
            self.error(f"response is not one whole frame ({len(data)} bytes)")
            return False
        if data[4:8] != STOQ_OK_PREFIX:
            self.error(f"not an ok response: {_describe(data)}")
            return False
        if not self.checked_first:  # decode one answer in full
            self.checked_first = True
            expected = name_of(self.spec.first_name + index)
            try:
                got = _certificate_names(data)
            except Exception as exc:
                self.error(f"the first answer is not a certificate: {type(exc).__name__}: {exc}")
                return False
            if got != [expected]:
                self.error(f"asked for {expected}, got a certificate for {got}")
                return False
        return True

    def send(self, connection: Any, frame: bytes, index: int, started: float) -> None:
        """Send request ``index`` on ``connection``; ``started`` is when it was sent (or
        scheduled)."""
        self.outstanding += 1
        connection.send(frame, (started, index))

    def send_next(self, connection: Any) -> bool:
        """Closed loop: send the next request of the pool; False if none is left."""
        taken = self.take()
        if taken is None:
            return False
        self.send(connection, taken[0], taken[1], time.perf_counter())
        return True

    def answered(self, connection: Any, tag: tuple[float, int], data: bytes | None) -> None:
        """Check and time the answer to request ``tag`` (when it started, its index); in a
        closed loop, send the next."""
        now = time.perf_counter()
        started, index = tag
        if data is not None and self.check(data, index) and self.counts(started, now):
            self.latencies.append(now - started)
        self.finished_one()
        if not self.open_loop and now < self.deadline and not connection.terminated:
            self.send_next(connection)

    def finished_one(self) -> None:
        self.outstanding -= 1
        if self.sending_done and self.outstanding <= 0 and not self.drained.done():
            self.drained.set_result(None)

    def stop_sending(self) -> None:
        self.sending_done = True
        if self.outstanding <= 0 and not self.drained.done():
            self.drained.set_result(None)


def _certificate_names(data: bytes) -> list[str]:
    """The DNS names of the certificate in a ``ca.issue`` answer frame, if they agree with
    the answer's ``names``."""
    from cryptography import x509

    ok = cbor2.loads(data[4:])["ok"]
    cert = x509.load_der_x509_certificate(ok["certificate"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = list(san.get_values_for_type(x509.DNSName))
    if names != ok.get("names"):
        raise ValueError(f"the certificate is for {names}, the answer says {ok.get('names')}")
    return names


async def open_issue_client(spec: IssueSpec, run: IssueRun) -> Any:
    """One client connection to the server, which must present the pinned certificate.

    Without stoq.connect's pacer (``tune=False``), as this benchmark has always run.
    """
    return await open_client(stoq.load_engine(spec.engine), run, host=HOST, port=spec.port,
                             pin=spec.pin, tune=False)


async def _sample_cpu(spec: IssueSpec, run: IssueRun
                      ) -> tuple[float | None, float | None, float]:
    """Server CPU (all threads, main thread) and client CPU in the window, as fractions."""
    await asyncio.sleep(max(0.0, run.measure_start - time.perf_counter()))
    server0 = thread_cpu(spec.server_pid) if spec.server_pid else None
    client0 = time.process_time()
    wall0 = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.ended.wait(), max(0.0, run.deadline - time.perf_counter()))
    wall = max(1e-9, time.perf_counter() - wall0)
    server1 = thread_cpu(spec.server_pid) if spec.server_pid else None
    client = (time.process_time() - client0) / wall
    if server0 is None or server1 is None:
        return None, None, client
    return (server1[0] - server0[0]) / wall, (server1[1] - server0[1]) / wall, client


async def _schedule(run: IssueRun, connections: list[Any], start: float) -> None:
    """Open loop: request k goes out at ``start + k / rate``, round robin, until the end."""
    rate = run.spec.rate
    perf_counter = time.perf_counter
    k = 0
    total = len(run.frames)
    try:
        while k < total:
            now = perf_counter()
            touched: set[Any] = set()
            while k < total:
                due = start + k / rate
                if due > now or due >= run.deadline:
                    break
                proto = connections[k % len(connections)]
                run.send(proto, run.frames[k], k, due)
                if run.measure_start <= due:
                    run.send_lags.append(now - due)
                touched.add(proto)
                k += 1
            for proto in touched:
                proto.transmit()
            due = start + k / rate
            if due >= run.deadline:
                break
            await asyncio.sleep(max(0.0, due - perf_counter()))
    finally:
        run.stop_sending()


async def run_issue(spec: IssueSpec) -> IssueResult:
    """Make the CSRs, then run ``spec`` in this process and measure it."""
    epoch = await current_epoch(spec)
    started = time.perf_counter()
    frames = make_frames(spec.first_name, spec.pool, epoch)
    prepare = time.perf_counter() - started
    run = IssueRun(spec, frames)
    connections = list(await asyncio.gather(
        *(open_issue_client(spec, run) for _ in range(spec.connections))))
    try:
        start = time.perf_counter() + 0.01
        run.measure_start = start + spec.warmup
        run.deadline = run.measure_start + spec.duration
        if run.open_loop:
            scheduler = asyncio.ensure_future(_schedule(run, connections, start))
        else:
            for proto in connections:
                for _ in range(spec.in_flight):
                    if not run.send_next(proto):
                        break
                proto.transmit()
            run.stop_sending()  # from here on, answers send the next requests themselves
        server_cpu, loop_cpu, client_cpu = await _sample_cpu(spec, run)
        if run.open_loop:
            await scheduler
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.drained), DRAIN_TIMEOUT)
        for proto in connections:
            proto.abandon(f"still open {DRAIN_TIMEOUT:g} s after the end")
    finally:
        await close_clients(connections)
    window = max(1e-9, run.deadline - run.measure_start)
    latencies = sorted(run.latencies)
    lags = sorted(run.send_lags)
    scheduled = sum(1 for k in range(len(frames))
                    if run.measure_start <= start + k / spec.rate < run.deadline
                    ) if run.open_loop else 0
    return IssueResult(
        completed=len(latencies), window=window, rate=len(latencies) / window,
        p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
        max_ms=(latencies[-1] * 1e3 if latencies else 0.0), errors=run.errors,
        server_cpu=server_cpu, server_loop_cpu=loop_cpu, client_cpu=client_cpu,
        prepare_s=prepare, exhausted=run.exhausted and not run.open_loop, scheduled=scheduled,
        send_lag_p99_ms=percentile(lags, 0.99) * 1e3, first_error=run.first_error)


def issue_in_child(children: Children, spec: IssueSpec, log_path: Path) -> IssueResult:
    """Run ``spec`` in a separate load-generator process and return what it measured."""
    argv = [sys.executable, "-m", "bench.ca", "load", json.dumps(asdict(spec))]
    child = children.start("load generator (ca.issue)", argv, log_path)
    try:
        # CSRs take about 60 µs each to make; allow ten times that.
        status = child.wait(spec.warmup + spec.duration + DRAIN_TIMEOUT + 60.0
                            + spec.pool * 600e-6)
        lines = child.output()
        if status != 0 or not lines:
            raise RuntimeError(f"the load generator failed with status {status}"
                               f"{child.stderr_tail()}")
        return IssueResult(**json.loads(lines[-1]))
    finally:
        children.stop(child)


def load_main(spec_json: str) -> int:
    spec = IssueSpec(**json.loads(spec_json))

    async def main() -> IssueResult:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        return await run_issue(spec)

    result = uvloop.run(main())
    print(json.dumps(asdict(result)), flush=True)
    return 0


# --- the server under test ------------------------------------------------------------------

CONFIG = """\
# Written by bench/ca.py for one benchmark run.
[node]
data_dir = "{data_dir}"

[ca]
mode = "{mode}"
signing_workers = {signing_workers}
{hsm}
[api]
rate_limit_per_minute = 0

[network]
quic_engine = "{engine}"

[ct]
enable_realtime_fingerprinting = false

[dns]
enabled = false

[logging]
level = "warning"
format = "text"

[logging.output]
type = "stderr"
"""

HSM_TABLE = """
[ca.hsm]
provider = "softhsm2"
module_path = "{module}"
token_label = "{label}"
"""


@dataclass
class Server:
    """A running ``trustchain serve``."""

    child: Child
    port: int
    pin: str
    keystore: str
    names_used: int = 0
    """Names handed out to load runs so far; each name is asked for once."""

    def names(self, count: int) -> int:
        """Reserve ``count`` names; the index of the first."""
        first = self.names_used
        self.names_used += count
        return first


@contextlib.contextmanager
def environment(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in ``os.environ`` while a child process is started (it inherits them)."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_softhsm_token(directory: Path) -> tuple[dict[str, str], str]:
    """A fresh SoftHSM2 token under ``directory``: (the server's environment, its label).

    SoftHSM2 reads ``SOFTHSM2_CONF`` once per process, so the server gets it in
    its environment from the start, with the PIN in ``TRUSTCHAIN_HSM_PIN``.
    """
    if shutil.which("softhsm2-util") is None or not os.path.exists(SOFTHSM2_MODULE):
        raise RuntimeError("SoftHSM2 is not installed (Debian package softhsm2)")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    label = f"trustchain-bench-{secrets.token_hex(3)}"
    pin = secrets.token_hex(8)
    env = {"SOFTHSM2_CONF": str(conf), "TRUSTCHAIN_HSM_PIN": pin}
    done = subprocess_run(["softhsm2-util", "--init-token", "--free", "--label", label,
                           "--pin", pin, "--so-pin", secrets.token_hex(8)], env)
    if done[0] != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed: {done[1].strip()}")
    return env, label


def subprocess_run(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a short command with ``env`` added; (status, its output). Killed after 120 s."""
    try:
        done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} did not finish within 120 s"
    return done.returncode, done.stdout + done.stderr




def start_server(children: Children, keystore: str, engine: str, tmp: Path,
                 signing_workers: int = 0) -> Server:
    """``trustchain serve`` on ``[::1]:0`` with ``keystore``'s configuration.

    ``softhsm2``: production mode, the CA made by ``trustchain init`` first.
    """
    data_dir = tmp / f"data-{keystore}"
    config = tmp / f"trustchain-{keystore}.toml"
    env: dict[str, str] = {}
    if keystore == "softhsm2":
        env, label = make_softhsm_token(tmp / "softhsm2")
        hsm = HSM_TABLE.format(module=SOFTHSM2_MODULE, label=label)
        config.write_text(CONFIG.format(data_dir=data_dir, mode="production", hsm=hsm,
                                        engine=engine, signing_workers=signing_workers))
        status, output = subprocess_run(
            [sys.executable, "-m", "trustchain", "init", "--config", str(config),
             "--data-dir", str(data_dir)], env)
        if status != 0:
            raise RuntimeError(f"trustchain init failed with status {status}: "
                               f"{output.strip()[-2000:]}")
    else:
        config.write_text(CONFIG.format(data_dir=data_dir, mode="development", hsm="",
                                        engine=engine, signing_workers=signing_workers))
    argv = [sys.executable, *serve_argv(check_proofs=False, serve_args=[
        "--config", str(config), "--data-dir", str(data_dir), "--listen", "[::1]:0"])]
    with environment(env):
        child = children.start(f"trustchain serve ({keystore})", argv,
                               tmp / f"trustchain-{keystore}.log")
    listening = child.wait_for(LISTENING, 60.0)
    fingerprint = child.wait_for(FINGERPRINT, 10.0)
    if protocol.ALPN not in listening.group(3).split(","):
        raise RuntimeError(f"trustchain does not offer {protocol.ALPN}: {listening.group(0)}")
    return Server(child, int(listening.group(2)), fingerprint.group(1), keystore)


# --- one keystore's tests ---------------------------------------------------------------------

@dataclass
class Figures:
    """What one keystore's server measured; a missing figure says why in ``problems``."""

    keystore: str
    health: dict[int, LoadResult] = field(default_factory=dict)
    issue: dict[int, IssueResult] = field(default_factory=dict)
    open_loop: IssueResult | None = None
    offered_rate: float = OFFERED_RATE
    problems: list[str] = field(default_factory=list)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_keystore(children: Children, keystore: str, engine: str, tmp: Path, *,
                 duration: float, warmup: float, pool: int, offered_rate: float | None,
                 signing_workers: int = 0) -> Figures:
    figures = Figures(keystore, offered_rate=offered_rate or 0.0)
    try:
        server = start_server(children, keystore, engine, tmp, signing_workers)
    except (RuntimeError, OSError) as exc:
        figures.problems.append(f"the server did not start: {exc}")
        progress(f"{keystore}: {figures.problems[-1]}")
        return figures
    progress(f"{keystore}: trustchain serve pid {server.child.pid} on [::1]:{server.port}")
    try:
        for n in CONNECTIONS:
            health = LoadSpec(engine=engine, port=server.port, alpn=protocol.ALPN,
                              pin=server.pin, request="health", expect="ok", connections=n,
                              in_flight=IN_FLIGHT, duration=duration, warmup=warmup,
                              server_pid=server.child.pid)
            label = f"{n} conn{'s' if n > 1 else ''} x {IN_FLIGHT}"
            try:
                figures.health[n] = load_in_child(children, health,
                                                  tmp / f"load-{keystore}-health-{n}.log")
                progress(f"{keystore}: node.health, {label}: "
                         f"{describe_health(figures.health[n])}")
            except (RuntimeError, OSError, ValueError) as exc:
                figures.problems.append(f"node.health, {label}: {exc}")
                progress(f"{keystore}: {figures.problems[-1]}")
            issue = IssueSpec(engine=engine, port=server.port, pin=server.pin, connections=n,
                              duration=duration, warmup=warmup, pool=pool,
                              first_name=server.names(pool), server_pid=server.child.pid)
            try:
                figures.issue[n] = issue_in_child(children, issue,
                                                  tmp / f"load-{keystore}-issue-{n}.log")
                progress(f"{keystore}: ca.issue, {label}: {describe_issue(figures.issue[n])}")
            except (RuntimeError, OSError, ValueError) as exc:
                figures.problems.append(f"ca.issue, {label}: {exc}")
                progress(f"{keystore}: {figures.problems[-1]}")
            if not alive(server, figures):
                return figures
        if offered_rate is None:
            best = max((r.rate for r in figures.issue.values()), default=0.0)
            offered_rate = figures.offered_rate = max(10.0, round(best * OFFERED_SHARE))
        count = math.ceil(offered_rate * (warmup + duration)) + 1
        offered = IssueSpec(engine=engine, port=server.port, pin=server.pin,
                            connections=OPEN_LOOP_CONNECTIONS, rate=offered_rate,
                            duration=duration, warmup=warmup, pool=count,
                            first_name=server.names(count), server_pid=server.child.pid)
        try:
            figures.open_loop = issue_in_child(children, offered,
                                               tmp / f"load-{keystore}-open.log")
            progress(f"{keystore}: ca.issue, {offered_rate:,.0f}/s offered: "
                     f"{describe_issue(figures.open_loop)}")
        except (RuntimeError, OSError, ValueError) as exc:
            figures.problems.append(f"ca.issue at {offered_rate:,.0f}/s offered: {exc}")
            progress(f"{keystore}: {figures.problems[-1]}")
        alive(server, figures)
    finally:
        status = children.stop(server.child)
        if status not in (0, None):
            figures.problems.append(f"{server.child.name} exited with status {status}"
                                    f"{server.child.stderr_tail()}")
    return figures


def alive(server: Server, figures: Figures) -> bool:
    """Whether the server still runs; if not, a problem says so."""
    if server.child.proc.poll() is None:
        return True
    figures.problems.append(f"{server.child.name} died{server.child.stderr_tail()}")
    progress(f"{figures.keystore}: {figures.problems[-1]}")
    return False


# --- presentation ---------------------------------------------------------------------------

def describe_health(result: LoadResult) -> str:
    text = f"{result.rate:,.0f}/s, p50/p99 {result.p50_ms:.2f} / {result.p99_ms:.2f} ms"
    if result.errors:
        text += f", {result.errors} errors (first: {result.first_error})"
    return text


def describe_issue(result: IssueResult) -> str:
    text = (f"{result.rate:,.0f}/s, p50/p99/max {result.p50_ms:.1f} / {result.p99_ms:.1f} / "
            f"{result.max_ms:.1f} ms, server CPU {cpu(result.server_cpu)}, CSRs made in "
            f"{result.prepare_s:.1f} s")
    if result.exhausted:
        text += ", ran out of CSRs (window cut short)"
    if result.errors:
        text += f", {result.errors} errors (first: {result.first_error})"
    return text


def cpu(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f} %"


def per_request(fraction: float | None, rate: float) -> str:
    if fraction is None or not rate:
        return "-"
    return f"{fraction / rate * 1e6:,.0f} µs"


def latency(p50: float, p99: float) -> str:
    return f"{p50:.2f} / {p99:.2f} ms"


def keystore_report(figures: Figures) -> str:
    rows: list[list[str]] = []
    cpu_rows: list[list[str]] = []
    notes = [f"- {p}" for p in figures.problems]
    for n in CONNECTIONS:
        label = f"{n} conn{'s' if n > 1 else ''} x {IN_FLIGHT} in flight"
        issue, health = figures.issue.get(n), figures.health.get(n)
        ratio = f"{issue.rate / health.rate:.3f}" if issue and health and health.rate else "-"
        rows.append([
            label,
            f"{issue.rate:,.0f}" if issue else "failed",
            f"{health.rate:,.0f}" if health else "failed",
            ratio,
            latency(issue.p50_ms, issue.p99_ms) if issue else "-",
            latency(health.p50_ms, health.p99_ms) if health else "-",
            per_request(issue.server_cpu, issue.rate) if issue else "-",
            per_request(health.server_cpu, health.rate) if health else "-",
        ])
        if issue:
            cpu_rows.append([f"ca.issue, {label}", cpu(issue.server_cpu),
                             cpu(issue.server_loop_cpu), cpu(issue.client_cpu)])
            if issue.exhausted:
                notes.append(f"- ca.issue, {label}: used up its {issue.completed:,} CSRs "
                             f"after {issue.window:.2f} s; the rate is over that window")
            if issue.errors:
                notes.append(f"- ca.issue, {label}: {issue.errors} errors "
                             f"(first: {issue.first_error})")
        if health:
            cpu_rows.append([f"node.health, {label}", cpu(health.server_cpu), "",
                             cpu(health.client_cpu)])
            if health.errors:
                notes.append(f"- node.health, {label}: {health.errors} errors "
                             f"(first: {health.first_error})")
    parts = [
        f"### keystore `{figures.keystore}`",
        "",
        markdown_table(["load", "ca.issue/s", "node.health/s", "issue/health",
                        "ca.issue p50 / p99", "node.health p50 / p99",
                        "server CPU per issuance", "per node.health"], rows),
    ]
    result = figures.open_loop
    if result is not None:
        lost = result.scheduled - result.completed
        parts += [
            "",
            f"Open loop, {OPEN_LOOP_CONNECTIONS} connections, latency from the scheduled "
            "send time:",
            "",
            markdown_table(
                ["offered", "scheduled in window", "answered", "achieved", "p50", "p99",
                 "max", "errors", "server CPU", "per issuance", "send lag p99"],
                [[f"{figures.offered_rate:,.0f}/s", f"{result.scheduled:,}",
                  f"{result.completed:,}",
                  f"{result.rate:,.0f}/s", f"{result.p50_ms:.1f} ms", f"{result.p99_ms:.1f} ms",
                  f"{result.max_ms:.1f} ms", f"{result.errors}", cpu(result.server_cpu),
                  per_request(result.server_cpu, result.rate),
                  f"{result.send_lag_p99_ms:.1f} ms"]]),
        ]
        cpu_rows.append([f"ca.issue, {figures.offered_rate:,.0f}/s offered",
                         cpu(result.server_cpu),
                         cpu(result.server_loop_cpu), cpu(result.client_cpu)])
        if lost > 0 and not result.errors:
            notes.append(f"- open loop: {lost} scheduled requests got no certificate")
        if result.errors:
            notes.append(f"- open loop: {result.errors} errors (first: {result.first_error})")
    else:
        parts += ["", "Open loop: failed."]
    parts += [
        "",
        "CPU in the measurement window (100 % = one core; the server's main thread runs "
        "the event loop, the others write SQLite and the audit log; \"server\" includes "
        "its signing-worker processes, if any):",
        "",
        markdown_table(["test", "server", "of which main thread", "load gen."], cpu_rows),
    ]
    if notes:
        parts += ["", "Problems:", *notes]
    return "\n".join(parts)


def summary(all_figures: list[Figures]) -> str:
    rows = []
    for figures in all_figures:
        four = figures.issue.get(CONNECTIONS[-1])
        one = figures.issue.get(CONNECTIONS[0])
        opened = figures.open_loop
        rows.append([
            figures.keystore,
            f"{one.rate:,.0f}" if one else "-",
            f"{four.rate:,.0f}" if four else "-",
            f"{opened.p99_ms:.1f} ms at {figures.offered_rate:,.0f}/s" if opened else "-",
            per_request(four.server_cpu, four.rate) if four else "-",
        ])
    return markdown_table(["keystore", "ca.issue/s, 1 conn", f"ca.issue/s, {CONNECTIONS[-1]} conns",
                           "open-loop p99 (offered)",
                           f"server CPU per issuance ({CONNECTIONS[-1]} conns)"], rows)


# --- main ---------------------------------------------------------------------------------

# --- part leaf: a leaf's TBS and signature, builder against our DER (in this process) ------

LEAF_ROUNDS = 7
LEAF_CALLS = 300
"""Interleaved rounds (the median is reported) and leaves a round, per row."""


@dataclass(frozen=True)
class LeafIssuer:
    """An issuing intermediate whose key is in a keystore, for the leaf part."""

    label: str
    certificate: Any
    key: Any
    """The key's ``private_key()``: software, or a token's object that signs in it."""


def leaf_issuers(tmp: Path) -> list[LeafIssuer]:
    """Software P-256 and Ed25519 issuers; SoftHSM2 ones too when it is installed."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from handlers.ca import _x509
    from store import SoftwareKeyStore, open_keystore
    root_key = ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    root = _x509.build_root(root_key, root_key.public_key(), ca_id="bench", domains=(DOMAIN,),
                            not_before=now - 300, not_after=now + 10 * 365 * 86400)

    def issuer(label: str, signer: Any) -> LeafIssuer:
        cert = _x509.build_intermediate(root_key, root, signer.public_key(), ca_id="bench",
                                        number=1, domains=(DOMAIN,), not_before=now - 300,
                                        not_after=now + 5 * 365 * 86400)
        return LeafIssuer(label=label, certificate=cert, key=signer.private_key())

    software = SoftwareKeyStore(tmp / "leaf-keys")
    found = [issuer("software P-256", software.get_or_create("p256", "ecdsa-p256-sha256")),
             issuer("software Ed25519", software.get_or_create("ed25519", "ed25519"))]
    try:
        env, label = make_softhsm_token(tmp / "leaf-softhsm2")
    except RuntimeError as exc:
        progress(f"SoftHSM2 rows skipped: {exc}")
        return found
    os.environ.update(env)  # before this process first loads the module
    token = open_keystore(provider="softhsm2", data_dir=tmp, token_label=label,
                          pin=env["TRUSTCHAIN_HSM_PIN"])
    found += [issuer("SoftHSM2 P-256", token.get_or_create("p256", "ecdsa-p256-sha256")),
              issuer("SoftHSM2 Ed25519", token.get_or_create("ed25519", "ed25519"))]
    return found


def leaf_inputs(first: int, count: int) -> list[dict[str, Any]]:
    """``count`` leaves as ``ca.issue`` makes them: a P-256 key, a name and an address, a
    serial and a precertificate poison each, and a validity of its own (leaf ``first + i``
    starts ``first + i`` seconds ago, so no leaf reuses another's encoded validity)."""
    import hashlib
    import ipaddress

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from handlers.ca import CheckedRequest, _x509
    inputs = []
    start = int(time.time())
    for i in range(first, first + count):
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        spki = key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
        request = CheckedRequest(public_key=key, spki_der=spki,
                                 spki_sha256=hashlib.sha256(spki).hexdigest(),
                                 dns_names=(name_of(i),),
                                 ip_addresses=(ipaddress.IPv6Address(f"2001:db8::{i + 1:x}"),))
        inputs.append({"request": request, "serial": _x509.new_serial(),
                       "not_before": start - i, "not_after": start - i + 86400,
                       "extensions": [_x509.precertificate_poison()]})
    return inputs


def _builder(issuer: Any, leaf: dict[str, Any]) -> Any:
    """The leaf's ``CertificateBuilder``, its extensions added: how leaves were made before."""
    from handlers.ca import _x509
    builder = _x509.leaf_builder(issuer, leaf["request"], serial=leaf["serial"],
                                 not_before=leaf["not_before"], not_after=leaf["not_after"])
    for extension in leaf["extensions"]:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder


def builder_tbs(issuer: Any, leaf: dict[str, Any], throwaway: Any) -> bytes:
    """The baseline: how the TBS was made before (the builder and a throwaway signature)."""
    from handlers.ca import _x509
    tbs: bytes = _x509.sign(_builder(issuer, leaf), throwaway).tbs_certificate_bytes
    return tbs


def builder_leaf(issuer: Any, leaf: dict[str, Any], key: Any) -> bytes:
    """The baseline: how a leaf was signed before (``CertificateBuilder.sign``)."""
    from cryptography.hazmat.primitives import serialization

    from handlers.ca import _x509
    der: bytes = _x509.sign(_builder(issuer, leaf), key).public_bytes(
        serialization.Encoding.DER)
    return der


def _leaf_cpu(work: Any, leaves: list[dict[str, Any]]) -> float:
    """CPU seconds per leaf of ``work(leaf)`` over ``leaves``."""
    started = time.process_time()
    for leaf in leaves:
        work(leaf)
    return (time.process_time() - started) / len(leaves)


def leaf_part(tmp: Path, rounds: int, calls: int) -> None:
    """Print the leaf table: per issuer key, the expected TBS and ``sign_leaf``, each
    beside the builder's way, medians of interleaved rounds."""
    import statistics

    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from handlers.ca import _x509
    from handlers.ca._profile import expected_tbs
    print(f"### A leaf's TBS and signature: builder (baseline) against our DER, CPU time a "
          f"leaf, median of {rounds} interleaved rounds of {calls}\n")
    print("| issuer key | step | builder (baseline) | ours | ratio |")
    print("|---|---|---|---|---|")
    leaf_numbers = itertools.count(0, calls)
    for issuer in leaf_issuers(tmp):
        cert = issuer.certificate
        throwaway = (ed25519.Ed25519PrivateKey.generate()
                     if isinstance(issuer.key, ed25519.Ed25519PrivateKey)
                     else ec.generate_private_key(ec.SECP256R1()))
        rows: list[tuple[str, Any, Any]] = [
            ("sign_leaf (the issuer, twice an issuance)",
             lambda leaf, c=cert, k=issuer.key: builder_leaf(c, leaf, k),
             lambda leaf, c=cert, k=issuer.key: _x509.sign_leaf(
                 c, leaf["request"], serial=leaf["serial"], not_before=leaf["not_before"],
                 not_after=leaf["not_after"], extensions=leaf["extensions"], private_key=k))]
        if issuer.label.startswith("software"):  # the TBS does not depend on where the key is
            rows.insert(0, (
                "expected TBS (every validator's precertificate check)",
                lambda leaf, c=cert, t=throwaway: builder_tbs(c, leaf, t),
                lambda leaf, c=cert: expected_tbs(
                    leaf["request"], c, serial=leaf["serial"], not_before=leaf["not_before"],
                    not_after=leaf["not_after"], extensions=leaf["extensions"])))
        for step, base, ours in rows:
            for leaf in leaf_inputs(next(leaf_numbers), 1):  # warm caches; the same bytes
                if step.startswith("expected"):
                    assert base(leaf) == ours(leaf), "the two TBSs differ"
                else:
                    base(leaf), ours(leaf)
            base_times, our_times = [], []
            for _ in range(rounds):  # fresh leaves for each: no cached validity is reused
                base_times.append(_leaf_cpu(base, leaf_inputs(next(leaf_numbers), calls)))
                our_times.append(_leaf_cpu(ours, leaf_inputs(next(leaf_numbers), calls)))
            base_cpu, our_cpu = statistics.median(base_times), statistics.median(our_times)
            print(f"| {issuer.label} | {step} | {base_cpu * 1e6:,.0f} µs | "
                  f"{our_cpu * 1e6:,.0f} µs | {our_cpu / base_cpu:.2f} |", flush=True)
    print()


def leaf_sizes(quick: bool) -> tuple[int, int]:
    """(rounds, leaves a round) of the leaf part."""
    return (5, 100) if quick else (LEAF_ROUNDS, LEAF_CALLS)


def leaf_main(*, quick: bool) -> int:
    """``--part leaf`` alone: no server."""
    started = time.monotonic()
    print("## A leaf certificate's TBS and signature (no server)\n")
    import cryptography
    print("\n".join([*machine_lines([])[:2], f"- cryptography {cryptography.__version__}"])
          + "\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="trustchain-bench-leaf-") as tmp_name:
        leaf_part(Path(tmp_name), *leaf_sizes(quick))
    print(f"total time {time.monotonic() - started:.0f} s", flush=True)
    return 0


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["load"] and len(args_list) == 2:
        return load_main(args_list[1])
    parser = argparse.ArgumentParser(prog="python -m bench.ca", description=__doc__.split(
        "\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help=f"short runs (2 s each instead of 5 s, {QUICK_POOL:,} CSRs a "
                             f"closed-loop run instead of {POOL:,})")
    parser.add_argument("--keystore", choices=(*KEYSTORES, "both"), default="both",
                        help="the CA keys' store (default both)")
    parser.add_argument("--engine", choices=stoq.ENGINES, default=stoq.DEFAULT_ENGINE,
                        help=f"QUIC engine of the server and client (default "
                             f"{stoq.DEFAULT_ENGINE})")
    parser.add_argument("--duration", type=float,
                        help="seconds measured per test (default 5, or 2 with --quick)")
    parser.add_argument("--rate", type=float,
                        help=f"issuances a second offered in the open-loop test (default: "
                             f"{OFFERED_SHARE * 100:.0f}%% of the best closed-loop rate measured "
                             f"before on the same server)")
    parser.add_argument("--signing-workers", type=int, default=0, metavar="N",
                        help="the server's ca.signing_workers: N processes sign the "
                             "certificates (default 0: on the event loop)")
    parser.add_argument("--part", choices=("issue", "leaf", "all"), default="issue",
                        help="issue: ca.issue on a server (default); leaf: a leaf's TBS and "
                             "signature in this process, builder against our DER; all: both")
    args = parser.parse_args(args_list)
    if args.part == "leaf":
        return leaf_main(quick=args.quick)
    if not 0 <= args.signing_workers <= 64:
        parser.error("--signing-workers: between 0 and 64")
    keystores = list(KEYSTORES) if args.keystore == "both" else [args.keystore]
    duration = args.duration or (2.0 if args.quick else 5.0)
    if not 0 < duration <= 60:
        parser.error("--duration: between 0 and 60 seconds")
    if args.rate is not None and not 0 < args.rate <= 10_000:
        parser.error("--rate: between 0 and 10,000 a second")
    warmup = 0.25 if args.quick else 0.5
    pool = QUICK_POOL if args.quick else POOL
    default_window = 2.25 if args.quick else 5.5  # warm-up + duration by default
    pool = max(pool, math.ceil(pool * (duration + warmup) / default_window))

    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    children = Children()
    print("## Certificate issuance (ca.issue), loopback [::1]\n")
    print("\n".join(machine_lines([args.engine])))
    print(f"- {duration:g} s measured per test after {warmup:g} s warm-up; one server per "
          f"keystore, every test on it in turn; each ca.issue asks for a new P-256 key and a "
          f"distinct name h<i>.{DOMAIN} (name ownership checked, `name_conflict = \"reject\"`); "
          f"CSRs are made by the load generator before its clock starts ({pool:,} a "
          f"closed-loop run, which ends early if it uses them up)")
    print(f"- targets (information only): >= {TARGET_RATE:,} issuances/s with SoftHSM2; "
          f"p99 < {TARGET_P99_MS:g} ms at {OFFERED_RATE:,.0f}/s offered"
          + (f" (this run offers {args.rate:,.0f}/s)" if args.rate is not None else
             f" (this run offers {OFFERED_SHARE:.0%} of the best closed-loop ca.issue rate "
             f"of each server)")
          + f"\n- `ca.signing_workers = {args.signing_workers}`"
          + (" (certificates signed on the event loop)" if not args.signing_workers else
             " (certificates signed in worker processes)")
          + "\n", flush=True)
    all_figures: list[Figures] = []
    try:
        with tempfile.TemporaryDirectory(prefix="trustchain-bench-ca-") as tmp_name:
            tmp = Path(tmp_name)
            try:
                for keystore in keystores:
                    figures = run_keystore(children, keystore, args.engine, tmp,
                                           duration=duration, warmup=warmup, pool=pool,
                                           offered_rate=args.rate,
                                           signing_workers=args.signing_workers)
                    all_figures.append(figures)
                    print(keystore_report(figures) + "\n", flush=True)
            finally:
                children.stop_all()
    except KeyboardInterrupt:
        progress("interrupted; every server was stopped")
        return 130
    if len(all_figures) > 1:
        print("### summary\n")
        print(summary(all_figures) + "\n")
    if args.part == "all":
        with tempfile.TemporaryDirectory(prefix="trustchain-bench-leaf-") as tmp_name:
            leaf_part(Path(tmp_name), *leaf_sizes(args.quick))
    print(f"total time {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
