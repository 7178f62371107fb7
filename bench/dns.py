"""DNS over QUIC: ``python -m bench.dns [--engine E] [--quick]``.

Starts, on ``[::1]`` only, NSD (the authoritative server of Debian's ``nsd``
package) with a small zone ``example.``, a real ``trustchain serve`` that
forwards to it, and a bare QUIC echo server of the same engine; then drives
them with a lean DoQ load generator in a separate process (dnspython's own
client manages about 1,000 queries/s, so it cannot be the load generator)
and prints a Markdown table:

- authoritative answers (``ns1.trust AAAA`` with DNSSEC: the precomputed
  wire answer), 1 connection and 4 connections, 64 queries in flight each;
- cache hits (``www.example AAAA``, forwarded once, then from the cache);
- cache misses (a new name every query, each forwarded to NSD over UDP);
- the same authoritative query at a fixed 5,000 queries/s (half the
  10,000/s target; open loop) for its latency;
- beside them, in the same run: the bare QUIC echo server answering the
  same bytes, the same echo server answering 468 octets (as big as the padded
  DoQ answer: what the answer's size costs QUIC), and NSD answering the same
  kind of query over plain UDP.

Every run is bounded in time; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import uvloop

import stoq

from ._common import (
    DOQ_SIZED_ECHO_ALPN,
    ECHO_ALPN,
    FINGERPRINT,
    HOST,
    LISTENING,
    Child,
    Children,
    LoadResult,
    LoadSpec,
    _lean_load,
    _Run,
    _sample_cpu,
    machine_lines,
    make_certificate,
    markdown_table,
    open_lean,
    percentile,
)
from ._streams import close_clients

TARGET_RATE = 10_000
TARGET_P99_MS = 5.0
OPEN_LOOP_RATE = TARGET_RATE // 2

ZONE = """$ORIGIN example.
$TTL 300
@ IN SOA ns.example. host.example. 1 3600 600 86400 300
@ IN NS ns
ns IN AAAA ::1
www IN AAAA 2001:db8::80
"""

TRUSTCHAIN_CONFIG = """
[node]
names = ["ns1.trust"]
[network]
quic_engine = "{engine}"
[dns]
upstream_servers = ["[::1]:{upstream}"]
cache_size = 200000
[logging]
level = "warning"
"""

QUERIES = ("auth", "hit", "miss")


def query_wire(kind: str, number: int) -> bytes:
    """A DNS query with Message ID 0, EDNS(0) and the DO bit; ``miss`` names differ."""
    if kind == "auth":
        name = b"\x03ns1\x05trust\x00"
    elif kind == "hit":
        name = b"\x03www\x07example\x00"
    else:
        label = b"m%011d" % number
        name = bytes([len(label)]) + label + b"\x07example\x00"
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"
    return struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 1) + name + b"\x00\x1c\x00\x01" + opt


EXPECTED_RCODE = {"auth": 0, "hit": 0, "miss": 3}
ECHOES = {"echo": ECHO_ALPN, "echo-sized": DOQ_SIZED_ECHO_ALPN}
"""The echo server's ALPN for each echo transport."""


@dataclass(frozen=True, kw_only=True)
class DnsLoad:
    """One DNS load run, passed to the load-generator process as JSON."""

    transport: str
    """``doq`` (TrustChain), ``echo`` (bare QUIC echo of the query), ``echo-sized`` (bare
    QUIC echo answering 468 octets, as big as the padded DoQ answer) or ``udp`` (NSD)."""
    queries: str
    port: int
    engine: str = "qh3"
    pin: str = ""
    connections: int = 1
    in_flight: int = 64
    rate: float = 0.0
    """Above 0: send at this fixed rate (one connection) instead of keeping
    ``in_flight`` queries outstanding."""
    duration: float = 5.0
    warmup: float = 0.5
    server_pid: int = 0


class DoqRun(_Run):
    """A load run whose every stream carries a DoQ query (a new one for misses)."""

    def __init__(self, spec: LoadSpec, load: DnsLoad) -> None:
        self.load = load
        self.counter = 0
        self._fixed = (b"" if load.queries == "miss" else _framed(query_wire(load.queries, 0)))
        super().__init__(spec, self._fixed, b"")
        self.open_loop = load.rate > 0

    @property
    def frame(self) -> bytes:
        if self._fixed:
            return self._fixed
        self.counter += 1
        return _framed(query_wire("miss", self.counter))

    @frame.setter
    def frame(self, value: bytes) -> None:
        pass

    def check(self, data: bytes) -> None:
        if len(data) < 14 or int.from_bytes(data[:2], "big") != len(data) - 2:
            self.error(f"answer is not one whole DoQ message ({len(data)} bytes)")
            return
        if self.load.transport in ECHOES:
            return
        rcode = data[5] & 0xF
        if rcode != EXPECTED_RCODE[self.load.queries]:
            self.error(f"rcode {rcode}, expected {EXPECTED_RCODE[self.load.queries]}")


def _framed(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def _spec(load: DnsLoad) -> LoadSpec:
    return LoadSpec(engine=load.engine, port=load.port,
                    alpn=ECHOES.get(load.transport, "doq"), pin=load.pin,
                    request="health", expect="same" if load.transport == "echo" else "ok",
                    connections=load.connections, in_flight=load.in_flight,
                    duration=load.duration, warmup=load.warmup, server_pid=load.server_pid)


async def _open_loop(spec: LoadSpec, run: DoqRun, rate: float) -> tuple[float | None, float]:
    perf_counter = time.perf_counter
    proto = await open_lean(spec, run)
    try:
        run.measure_start = perf_counter() + spec.warmup
        run.deadline = run.measure_start + spec.duration
        sampler = asyncio.ensure_future(_sample_cpu(spec, run))
        start = perf_counter()
        sent = 0
        while (now := perf_counter()) < run.deadline:
            due = int((now - start) * rate) - sent
            for _ in range(due):
                run.outstanding += 1
                run.send_one(proto)
            sent += max(due, 0)
            proto.transmit()
            await asyncio.sleep(0.001)
        cpu = await sampler
        drain_until = perf_counter() + 10.0
        while run.outstanding > 0 and perf_counter() < drain_until:
            await asyncio.sleep(0.01)
        if run.outstanding > 0:
            proto.abandon("still open 10 s after the end")
        return cpu
    finally:
        await close_clients([proto])


class _UdpClient(asyncio.DatagramProtocol):
    """Keeps ``in_flight`` UDP queries outstanding against NSD, matched by Message ID."""

    def __init__(self, load: DnsLoad, run: _UdpRun) -> None:
        self.load = load
        self.run = run
        self.started: dict[int, float] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.next_id = 0
        self.template = bytearray(query_wire("hit", 0))

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send_one(self) -> None:
        self.next_id = (self.next_id + 1) & 0xFFFF
        self.template[0:2] = self.next_id.to_bytes(2, "big")
        self.started[self.next_id] = time.perf_counter()
        assert self.transport is not None
        self.transport.sendto(bytes(self.template))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.perf_counter()
        started = self.started.pop(int.from_bytes(data[:2], "big"), None)
        if started is None:
            return
        run = self.run
        if data[3] & 0xF:
            run.errors += 1
        if run.measure_start <= now < run.deadline:
            run.latencies.append(now - started)
        if now < run.deadline:
            self.send_one()


@dataclass
class _UdpRun:
    latencies: list[float]
    errors: int = 0
    measure_start: float = float("inf")
    deadline: float = float("inf")


async def _udp_load(load: DnsLoad) -> LoadResult:
    run = _UdpRun(latencies=[])
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((HOST, load.port))
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(lambda: _UdpClient(load, run),
                                                            sock=sock)
    try:
        run.measure_start = time.perf_counter() + load.warmup
        run.deadline = run.measure_start + load.duration
        for _ in range(load.in_flight):
            client.send_one()
        spec = _spec(load)
        fake = _Run.__new__(_Run)
        fake.measure_start, fake.deadline = run.measure_start, run.deadline
        server_cpu, client_cpu = await _sample_cpu(spec, fake)
        # lost datagrams are not resent: count them and top up until the deadline
        while time.perf_counter() < run.deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        lost = len(client.started)
    finally:
        transport.close()
    latencies = sorted(run.latencies)
    return LoadResult(completed=len(latencies), window=load.duration,
                      rate=len(latencies) / load.duration, megabytes_per_s=0.0,
                      p50_ms=percentile(latencies, 0.5) * 1e3,
                      p99_ms=percentile(latencies, 0.99) * 1e3, errors=run.errors + lost,
                      server_cpu=server_cpu, client_cpu=client_cpu)


async def run_load(load: DnsLoad) -> LoadResult:
    if load.transport == "udp":
        return await _udp_load(load)
    spec = _spec(load)
    run = DoqRun(spec, load)
    if load.rate > 0:
        server_cpu, client_cpu = await _open_loop(spec, run, load.rate)
    else:
        server_cpu, client_cpu = await _lean_load(spec, run)
    latencies = sorted(run.latencies)
    return LoadResult(completed=len(latencies), window=load.duration,
                      rate=len(latencies) / load.duration, megabytes_per_s=0.0,
                      p50_ms=percentile(latencies, 0.5) * 1e3,
                      p99_ms=percentile(latencies, 0.99) * 1e3, errors=run.errors,
                      server_cpu=server_cpu, client_cpu=client_cpu, first_error=run.first_error)


# --- the servers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    child: Child
    port: int
    pin: str = ""


def start_nsd(children: Children, tmp: Path) -> Server:
    nsd = shutil.which("nsd")
    if nsd is None:
        raise RuntimeError("NSD is not installed (apt-get install nsd)")
    directory = tmp / "nsd"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "example.zone").write_text(ZONE)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port = int(s.getsockname()[1])
    (directory / "nsd.conf").write_text(f"""server:
  ip-address: {HOST}@{port}
  do-ip4: no
  username: ""
  chroot: ""
  zonesdir: "{directory}"
  database: ""
  zonelistfile: "{directory}/zone.list"
  xfrdfile: "{directory}/xfrd.state"
  xfrdir: "{directory}"
  pidfile: "{directory}/nsd.pid"
  logfile: "{directory}/nsd.log"
  server-count: 1
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: example
  zonefile: example.zone
""")
    child = children.start("nsd", [nsd, "-d", "-c", str(directory / "nsd.conf")],
                           tmp / "nsd.log")
    deadline = time.monotonic() + 15
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            s.sendto(query_wire("hit", 0), (HOST, port))
            try:
                s.recvfrom(4096)
                return Server(child, port)
            except OSError:
                continue
    raise RuntimeError(f"NSD did not answer{child.stderr_tail()}")


def start_trustchain(children: Children, engine: str, upstream: int, tmp: Path) -> Server:
    data_dir = tmp / f"data-{engine}"
    config = tmp / f"trustchain-{engine}.toml"
    config.write_text(TRUSTCHAIN_CONFIG.format(engine=engine, upstream=upstream))
    argv = [sys.executable, "-m", "trustchain", "serve", "--config", str(config),
            "--data-dir", str(data_dir), "--listen", "[::1]:0"]
    child = children.start(f"trustchain serve ({engine})", argv, tmp / f"trustchain-{engine}.log")
    listening = child.wait_for(LISTENING, 60.0)
    fingerprint = child.wait_for(FINGERPRINT, 10.0)
    if "doq" not in listening.group(3).split(","):
        raise RuntimeError(f"trustchain does not offer doq: {listening.group(0)}")
    return Server(child, int(listening.group(2)), fingerprint.group(1))


def start_echo(children: Children, engine: str, tmp: Path) -> Server:
    certfile, keyfile = make_certificate(tmp / f"echo-{engine}")
    argv = [sys.executable, "-m", "bench._common", "echo-server", "--engine", engine,
            "--cert", str(certfile), "--key", str(keyfile)]
    child = children.start(f"echo server ({engine})", argv, tmp / f"echo-{engine}.log")
    listening = child.wait_for(LISTENING, 30.0)
    fingerprint = child.wait_for(FINGERPRINT, 10.0)
    return Server(child, int(listening.group(2)), fingerprint.group(1))


def load_in_child(children: Children, load: DnsLoad, log_path: Path) -> LoadResult:
    argv = [sys.executable, "-m", "bench.dns", "load", json.dumps(asdict(load))]
    child = children.start(f"load generator ({load.transport})", argv, log_path)
    try:
        status = child.wait(load.warmup + load.duration + 60.0)
        lines = child.output()
        if status != 0 or not lines:
            raise RuntimeError(f"the load generator failed with status {status}"
                               f"{child.stderr_tail()}")
        return LoadResult.from_json(lines[-1])
    finally:
        children.stop(child)


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    queries: str
    connections: int = 1
    rate: float = 0.0
    echo: bool = False
    udp: bool = False


ROWS = (
    Row("authoritative (precomputed), 1 conn x 64", "auth", echo=True, udp=True),
    Row("authoritative, 4 conns x 64", "auth", connections=4, echo=True),
    Row("cache hit (forwarded, cached), 1 conn x 64", "hit"),
    Row("cache miss (forwarded to NSD over UDP), 1 conn x 64", "miss"),
    Row(f"authoritative at {OPEN_LOOP_RATE:,}/s (open loop), 1 conn", "auth",
        rate=OPEN_LOOP_RATE),
)


def _fmt(result: LoadResult | None, *, latency: bool = True) -> str:
    if result is None:
        return "failed"
    text = f"{result.rate:,.0f}/s"
    if latency:
        text += f" (p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms)"
    if result.errors:
        text += f", {result.errors} errors"
    return text


def _ratio(ours: LoadResult | None, base: LoadResult | None) -> str:
    return f"{ours.rate / base.rate:.2f}" if ours and base and base.rate else ""


def _cpu(result: LoadResult | None) -> str:
    if result is None or result.server_cpu is None or not result.rate:
        return "?"
    return f"{result.server_cpu * 1e6 / result.rate:.0f} µs"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(engine: str, tmp: Path, duration: float, warmup: float) -> str:
    children = Children()
    try:
        nsd = start_nsd(children, tmp)
        node = start_trustchain(children, engine, nsd.port, tmp)
        echo = start_echo(children, engine, tmp)
        table: list[list[str]] = []
        for number, row in enumerate(ROWS):
            base = dict(queries=row.queries, engine=engine, connections=row.connections,
                        duration=duration, warmup=warmup, rate=row.rate)
            results: dict[str, LoadResult | None] = {}
            targets = [("doq", node)] + ([("echo", echo), ("echo-sized", echo)]
                                         if row.echo else []) + \
                ([("udp", nsd)] if row.udp else [])
            for transport, server in targets:
                load = DnsLoad(transport=transport, port=server.port, pin=server.pin,
                               server_pid=server.child.pid, **base)  # type: ignore[arg-type]
                try:
                    results[transport] = load_in_child(
                        children, load, tmp / f"load-{number}-{transport}.log")
                except (RuntimeError, OSError) as exc:
                    progress(f"{row.label} ({transport}): {exc}")
                    results[transport] = None
                progress(f"{engine}: {row.label}, {transport}: {_fmt(results[transport])}")
            doq, udp = results.get("doq"), results.get("udp")
            bare, sized = results.get("echo"), results.get("echo-sized")
            table.append([row.label, _fmt(doq), _cpu(doq),
                          _fmt(bare, latency=False) if row.echo else "", _ratio(doq, bare),
                          _fmt(sized, latency=False) if row.echo else "",
                          _ratio(doq, sized), _fmt(udp) if row.udp else ""])
        header = ["test", f"DoQ ({engine})", "server CPU / query", "bare QUIC echo", "ratio",
                  "echo answering 468 B", "ratio", "NSD over UDP"]
        return markdown_table(header, table)
    finally:
        children.stop_all()


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dns", description=__doc__.split(
        "\n\n")[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command")
    load = sub.add_parser("load", help="(internal) one load run; prints its result as JSON")
    load.add_argument("spec")
    parser.add_argument("--engine", choices=stoq.ENGINES, default="qh3")
    parser.add_argument("--quick", action="store_true", help="2 s per run instead of 5 s")
    args = parser.parse_args(argv)
    if args.command == "load":
        spec = DnsLoad(**json.loads(args.spec))
        result = uvloop.run(run_load(spec))
        print(json.dumps(asdict(result)), flush=True)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    duration = 2.0 if args.quick else 5.0
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        table = run(args.engine, Path(tmp), duration, 0.5)
    print("\n".join(machine_lines([args.engine])))
    print()
    print(table)
    print(f"\ntargets: at least {TARGET_RATE:,} authoritative DoQ queries/s; p99 at most "
          f"{TARGET_P99_MS:g} ms at {OPEN_LOOP_RATE:,}/s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
