"""Benchmark machinery: child processes, a bare QUIC echo server, a lean load generator.

Everything here runs on loopback (``[::1]``) only and is bounded in time. The
echo server and the load generator are child processes started as
``python -m bench._common echo-server ...`` and ``python -m bench._common load
...``, so that neither shares a CPU-bound event loop with the server it
measures. A :class:`Child` is always stopped by its owner (SIGTERM, then
SIGKILL) and, as a last resort, gets SIGTERM from the kernel when the
benchmark process itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import cbor2
import uvloop

import protocol
import stoq

from ._streams import (
    MAX_DATA,
    MAX_FRAME_SIZE,
    MAX_STREAM_DATA,
    close_clients,
    open_client,
    stream_protocol_class,
)

ROOT = Path(__file__).resolve().parent.parent
"""The source tree; child processes run there so that ``python -m`` finds it."""

HOST = "::1"
"""Every benchmark server listens here and every load generator sends here."""

ECHO_ALPN = "echo"
"""The echo server sends each stream's data back."""
SIZED_ECHO_ALPN = "echo-health-size"
"""On connections with this ALPN the echo server answers every stream with
:data:`HEALTH_SIZED_ANSWER` instead: the transport's cost of an answer as big
as STOQ's, without STOQ's work."""
HEALTH_SIZED_ANSWER = protocol.encode_frame({"ok": {
    "status": "ok", "checks": dict.fromkeys(("accepting", "audit", "publishing", "dns",
                                             "consensus", "ct", "fingerprints", "rotation"),
                                            True),
    "reasons": {}, "time": 1796000000.12, "uptime": 12.345}})
"""A frame shaped and sized like the STOQ answer to ``node.health`` of a node with the
default services (140 bytes: its eight health checks)."""
DOQ_SIZED_ECHO_ALPN = "echo-doq-size"
"""On connections with this ALPN the echo server answers every stream with
:data:`DOQ_SIZED_ANSWER`: what a DoQ answer padded to 468 octets costs the transport."""
DOQ_SIZED_ANSWER = (468).to_bytes(2, "big") + (b"\x00\x00\x84\x00" + bytes(464))
"""A DoQ message as big as an authoritative answer padded to one 468-octet block
(RFC 8467), with its 2-octet length: a header-only response and zeros."""
SIZED_ANSWERS = {SIZED_ECHO_ALPN: HEALTH_SIZED_ANSWER, DOQ_SIZED_ECHO_ALPN: DOQ_SIZED_ANSWER}
STREAMS_PER_CONNECTION = 100
"""Concurrent streams the echo server grants, as ``network.max_streams_per_connection``."""

BULK_PAYLOAD = MAX_FRAME_SIZE - 64
"""``node.echo`` data size: 1 MiB less the CBOR envelope, so that both the
request and the response frame fit the default 1 MiB ``max_frame_size``."""

STOQ_OK_PREFIX = b"\xa1\x62ok"
"""CBOR for the start of ``{"ok": ...}``: a map of one pair whose key is "ok"."""

LISTENING = re.compile(r"^listening on \[([0-9a-fA-F:.%]+)\]:(\d+) alpn (\S+)")
FINGERPRINT = re.compile(r"^tls certificate sha256 ([0-9a-f]{64})")


# --- child processes -------------------------------------------------------------

_PDEATHSIG_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(70)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
"""Run argv with PR_SET_PDEATHSIG = SIGTERM (kept across execve): if the
benchmark is killed outright, its children still get SIGTERM."""


class Child:
    """A child process in its own session, its stdout read line by line in a thread.

    Ctrl-C in the terminal reaches only the benchmark, which then stops its
    children itself, in order.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        launcher = [sys.executable, "-c", _PDEATHSIG_LAUNCHER, str(os.getpid())]
        with open(log_path, "wb") as stderr:
            self.proc = subprocess.Popen(launcher + argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=stderr,
                                         start_new_session=True, text=True, bufsize=1,
                                         cwd=ROOT)
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                        name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next stdout line, or None at end of output.

        :raises TimeoutError: nothing before ``deadline`` (``time.monotonic``).
        """
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no output in time") from None
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Read stdout until a line matches ``pattern``.

        :raises RuntimeError: the process ended, or said nothing that matched in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.next_line(deadline)
            except TimeoutError:
                raise RuntimeError(f"{self.name}: no line matching {pattern.pattern!r} "
                                   f"within {timeout:g} s{self.stderr_tail()}") from None
            if line is None:
                self.proc.wait(5)
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} "
                                   f"before printing {pattern.pattern!r}{self.stderr_tail()}")
            match = pattern.match(line)
            if match:
                return match

    def wait(self, timeout: float) -> int:
        """Wait for the process to end by itself; stop it if it does not in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"{self.name} did not finish within {timeout:g} s") from None

    def output(self, timeout: float = 5.0) -> list[str]:
        """Every stdout line, once the process has ended."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            while self.next_line(deadline) is not None:
                pass
        return self.lines

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        with contextlib.suppress(OSError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        return self.proc.returncode

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return ("\n  stderr:\n    " + "\n    ".join(text[-lines:])) if text else ""


class Children:
    """Every child process started, so that all of them are stopped at the end."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def start(self, name: str, argv: list[str], log_path: Path) -> Child:
        child = Child(name, argv, log_path)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> int | None:
        try:
            return child.stop()
        finally:
            with contextlib.suppress(ValueError):
                self._children.remove(child)

    def stop_all(self) -> None:
        """Stop the remaining children, newest first; Ctrl-C cannot interrupt this."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self._children:
                child = self._children.pop()
                with contextlib.suppress(Exception):
                    child.stop()
        finally:
            signal.signal(signal.SIGINT, previous)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux ``/proc``), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loopback_sent() -> tuple[int, int] | None:
    """Bytes and packets the loopback interface has sent (``/proc/net/dev``), or None.

    Every process of this network namespace counts: run the benchmark in one of its
    own (``unshare -rn sh -c 'ip link set lo up && python -m bench...'``) for a count
    of its traffic alone."""
    try:
        with open("/proc/net/dev", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            fields = counters.split()
            return int(fields[8]), int(fields[9])  # transmit: bytes, packets
    return None


# --- statistics and presentation -----------------------------------------------------

def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when it is empty)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def machine_lines(engines: list[str]) -> list[str]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(f"{name} {stoq.load_engine(name).version}" for name in engines)
    return [
        f"- machine: nproc {os.cpu_count()}, {model or platform.machine()}, "
        f"{platform.system()} {platform.release()}",
        f"- python {platform.python_version()} ({platform.python_implementation()}), "
        f"uvloop {_version('uvloop')}, cbor2 {_version('cbor2')}",
        f"- QUIC engines: {versions}",
    ]


def _version(distribution: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- TLS for the echo server ----------------------------------------------------------

def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost and ::1, like a development node's."""
    from store import create_self_signed, credential_paths

    credential = credential_paths(directory)
    create_self_signed(credential, names=["localhost"], addresses=[HOST])
    return credential.certfile, credential.keyfile


# --- the bare QUIC echo server --------------------------------------------------------

def echo_answer(connection: Any, request: bytes) -> bytes:
    """The echo server's answer: the request itself, or on a sized ALPN its fixed answer
    (:data:`SIZED_ANSWERS`)."""
    return SIZED_ANSWERS.get(connection.alpn, request)


async def serve_echo(engine_name: str, port: int, certfile: str, keyfile: str) -> None:
    """Run the echo server on ``[::1]:port`` until SIGTERM or SIGINT."""
    engine = stoq.load_engine(engine_name)
    configuration = engine.configuration(is_client=False,
                                         alpn_protocols=[ECHO_ALPN, *SIZED_ANSWERS],
                                         idle_timeout=30.0, max_data=MAX_DATA,
                                         max_stream_data=MAX_STREAM_DATA)
    configuration.load_cert_chain(certfile, keyfile)
    protocol_class = stream_protocol_class(engine)

    def create_protocol(quic: Any, stream_handler: Any = None) -> Any:
        # The same stream credit and transport settings as stoq.Server, so the
        # transports match.
        engine.limit_streams(quic, bidi=STREAMS_PER_CONNECTION, uni=0)
        engine.tune(quic)
        return protocol_class(quic, stream_handler, answer=echo_answer)

    loop = asyncio.get_running_loop()
    sock = stoq.make_ipv6_socket(HOST, port)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: engine.QuicServer(configuration=configuration, create_protocol=create_protocol),
        sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, bound_port = sock.getsockname()[:2]
    print(f"echo server, QUIC engine {engine.name} {engine.version}, pid {os.getpid()}")
    print(f"listening on [{host}]:{bound_port} alpn {','.join([ECHO_ALPN, *SIZED_ANSWERS])}")
    print(f"tls certificate sha256 {stoq.certificate_fingerprint(certfile)}", flush=True)
    try:
        await stop.wait()
    finally:
        transport.close()


# --- the load generator ------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """One load run, passed to the load-generator process as JSON."""

    engine: str
    port: int
    alpn: str
    pin: str
    request: str
    """``health`` (node.health) or ``bulk`` (node.echo with BULK_PAYLOAD bytes)."""
    expect: str
    """``ok``: a STOQ ``{"ok": ...}`` frame; ``same``: the request bytes echoed."""
    client: str = "lean"
    """``lean`` (this module's client) or ``library`` (stoq.AsyncClient)."""
    connections: int = 1
    in_flight: int = 64
    """Requests kept in flight on each connection."""
    duration: float = 5.0
    warmup: float = 0.5
    server_pid: int = 0


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    completed: int
    window: float
    """Seconds of the measurement window (after the warm-up)."""
    rate: float
    """Requests completed a second in the window."""
    megabytes_per_s: float
    """Payload bytes a second (10^6), one way: requests x payload size."""
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu: float | None
    """Fraction of one core the server process used in the window."""
    client_cpu: float
    first_error: str = ""

    @classmethod
    def from_json(cls, text: str) -> LoadResult:
        return cls(**json.loads(text))


def request_frame(request: str, payload: bytes = b"") -> bytes:
    """The one pre-encoded frame a load run sends on every stream."""
    if request == "health":
        return protocol.encode_frame({"op": "node.health", "args": {}})
    if request == "bulk":
        return protocol.encode_frame({"op": "node.echo", "args": {"data": payload}})
    raise ValueError(f"unknown request kind {request!r}")


class _Run:
    """The shared state of one load run across its connections."""

    def __init__(self, spec: LoadSpec, frame: bytes, payload: bytes) -> None:
        self.spec = spec
        self.frame = frame
        self.payload = payload
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""
        self.measure_start = float("inf")
        self.deadline = float("inf")
        self.outstanding = 0
        self.drained = asyncio.get_running_loop().create_future()
        self.checked_first = False
        self.open_loop = False
        """True: answers send nothing; the caller sends on a schedule (and counts
        ``outstanding``). False: each answer sends the next request until the deadline."""

    def send_one(self, connection: Any) -> None:
        connection.send(self.frame, time.perf_counter())

    def answered(self, connection: Any, tag: float, data: bytes | None) -> None:
        """Check the answer to the request sent at ``tag``, time it, send the next."""
        now = time.perf_counter()
        if data is not None:
            self.check(data)
            if self.measure_start <= now < self.deadline:
                self.latencies.append(now - tag)
        if not self.open_loop and now < self.deadline and not connection.terminated:
            self.send_one(connection)
        else:
            self.finished_one()

    def error(self, message: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = message

    def check(self, data: bytes) -> None:
        """Count a malformed or unexpected response as an error (cheap checks, each one)."""
        if len(data) < 4 or int.from_bytes(data[:4], "big") != len(data) - 4:
            self.error(f"response is not one whole frame ({len(data)} bytes)")
            return
        if self.spec.expect == "same":
            if data != self.frame:
                self.error("echo differs from the request")
            return
        if data[4:8] != STOQ_OK_PREFIX:
            self.error(f"not an ok response: {_describe(data)}")
            return
        if not self.checked_first:  # decode one answer in full
            self.checked_first = True
            item = cbor2.loads(data[4:])
            if self.spec.request == "bulk" and item["ok"].get("data") != self.payload:
                self.error("node.echo returned other bytes")

    def finished_one(self) -> None:
        self.outstanding -= 1
        if self.outstanding <= 0 and not self.drained.done():
            self.drained.set_result(None)


DRAIN_TIMEOUT = 10.0
"""Seconds the load generator waits for the last answers after the deadline."""


def _describe(data: bytes) -> str:
    with contextlib.suppress(Exception):
        return repr(cbor2.loads(data[4:]))[:200]
    return data[:40].hex()


async def open_lean(spec: LoadSpec, run: _Run) -> Any:
    """One lean client connection for ``spec``: the server trusted by its pin, the
    transport set up as stoq.connect's."""
    return await open_client(stoq.load_engine(spec.engine), run, host=HOST, port=spec.port,
                             alpn=spec.alpn, pin=spec.pin)


async def _sample_cpu(spec: LoadSpec, run: _Run) -> tuple[float | None, float]:
    """Server and client CPU (fractions of a core) between measure_start and deadline."""
    loop_now = time.perf_counter
    await asyncio.sleep(max(0.0, run.measure_start - loop_now()))
    server0 = cpu_seconds(spec.server_pid) if spec.server_pid else None
    client0 = time.process_time()
    wall0 = loop_now()
    await asyncio.sleep(max(0.0, run.deadline - loop_now()))
    wall = loop_now() - wall0
    server1 = cpu_seconds(spec.server_pid) if spec.server_pid else None
    client = (time.process_time() - client0) / wall
    server = (server1 - server0) / wall if server0 is not None and server1 is not None else None
    return server, client


async def _lean_load(spec: LoadSpec, run: _Run) -> tuple[float | None, float]:
    connections = list(await asyncio.gather(
        *(open_lean(spec, run) for _ in range(spec.connections))))
    try:
        run.measure_start = time.perf_counter() + spec.warmup
        run.deadline = run.measure_start + spec.duration
        run.outstanding = spec.connections * spec.in_flight
        for proto in connections:
            for _ in range(spec.in_flight):
                run.send_one(proto)
            proto.transmit()
        cpu = await _sample_cpu(spec, run)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.drained), DRAIN_TIMEOUT)
        for proto in connections:
            proto.abandon(f"still open {DRAIN_TIMEOUT:g} s after the end")
        return cpu
    finally:
        await close_clients(connections)


async def _library_load(spec: LoadSpec, run: _Run) -> tuple[float | None, float]:
    op, args = (("node.health", {}) if spec.request == "health"
                else ("node.echo", {"data": run.payload}))
    perf_counter = time.perf_counter
    clients = [await stoq.connect(HOST, spec.port, pin=spec.pin, engine=spec.engine,
                                  keep_alive_interval=None, timeout=15.0)
               for _ in range(spec.connections)]

    async def worker(client: stoq.AsyncClient) -> None:
        while True:
            started = perf_counter()
            if started >= run.deadline:
                return
            try:
                result = await client.request(op, args)
            except Exception as exc:
                run.error(f"{type(exc).__name__}: {exc}")
                if not client.is_connected:
                    return
                continue
            now = perf_counter()
            if spec.request == "bulk" and result.get("data") != run.payload:
                run.error("node.echo returned other bytes")
            if run.measure_start <= now < run.deadline:
                run.latencies.append(now - started)

    try:
        run.measure_start = perf_counter() + spec.warmup
        run.deadline = run.measure_start + spec.duration
        workers = [asyncio.ensure_future(worker(client))
                   for client in clients for _ in range(spec.in_flight)]
        cpu = await _sample_cpu(spec, run)
        _, pending = await asyncio.wait(workers, timeout=10.0)
        for task in pending:
            task.cancel()
        return cpu
    finally:
        for client in clients:
            await client.close()


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run ``spec`` in this process and measure it."""
    payload = os.urandom(BULK_PAYLOAD) if spec.request == "bulk" else b""
    run = _Run(spec, request_frame(spec.request, payload), payload)
    body = _lean_load if spec.client == "lean" else _library_load
    server_cpu, client_cpu = await body(spec, run)
    latencies = sorted(run.latencies)
    window = spec.duration
    size = len(payload) if spec.request == "bulk" else len(run.frame)
    return LoadResult(
        completed=len(latencies), window=window, rate=len(latencies) / window,
        megabytes_per_s=len(latencies) * size / window / 1e6,
        p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
        errors=run.errors, server_cpu=server_cpu, client_cpu=client_cpu,
        first_error=run.first_error)


def load_in_child(children: Children, spec: LoadSpec, log_path: Path) -> LoadResult:
    """Run ``spec`` in a separate load-generator process and return what it measured."""
    argv = [sys.executable, "-m", "bench._common", "load", json.dumps(asdict(spec))]
    child = children.start(f"load generator ({spec.engine})", argv, log_path)
    try:
        status = child.wait(spec.warmup + spec.duration + 60.0)
        lines = child.output()
        if status != 0 or not lines:
            raise RuntimeError(f"the load generator failed with status {status}"
                               f"{child.stderr_tail()}")
        return LoadResult.from_json(lines[-1])
    finally:
        children.stop(child)


# --- entry points of the child processes ------------------------------------------------------

def _die_on(signals: tuple[signal.Signals, ...], handler: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._common",
                                     description="child processes of the benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo-server", help="a bare QUIC echo server on [::1]")
    echo.add_argument("--engine", choices=stoq.ENGINES, required=True)
    echo.add_argument("--port", type=int, default=0)
    echo.add_argument("--cert", required=True)
    echo.add_argument("--key", required=True)
    load = sub.add_parser("load", help="one load run; prints its result as JSON")
    load.add_argument("spec", help="a LoadSpec as JSON")
    args = parser.parse_args(argv)
    if args.command == "echo-server":
        uvloop.run(serve_echo(args.engine, args.port, args.cert, args.key))
        return 0
    spec = LoadSpec(**json.loads(args.spec))

    async def load_main() -> LoadResult:
        task = asyncio.current_task()
        assert task is not None

        def cancel() -> None:
            task.cancel()

        _die_on((signal.SIGTERM, signal.SIGINT), cancel)
        return await run_load(spec)

    result = uvloop.run(load_main())
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
