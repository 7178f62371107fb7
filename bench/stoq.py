"""STOQ against bare QUIC: ``python -m bench.stoq [--engine E] [--quick]``.

For each QUIC engine it starts a bare QUIC echo server (``bench._common``) and
a real ``trustchain serve``, drives both with the same lean load generator in a
separate process, and prints a Markdown table: requests a second and latency
for ``node.health`` (1 and 8 connections, 64 requests in flight on each), the
same through the ``stoq.AsyncClient`` library, and one-stream bulk throughput
with 1 MiB ``node.echo`` requests. Loopback ``[::1]`` only; every run is
bounded in time; every server is stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

import protocol
import stoq

from ._common import (
    ECHO_ALPN,
    FINGERPRINT,
    LISTENING,
    SIZED_ECHO_ALPN,
    Child,
    Children,
    LoadResult,
    LoadSpec,
    load_in_child,
    machine_lines,
    make_certificate,
    markdown_table,
)

TARGET_RATIO = 0.75
TARGET_QH3_HEALTH_RATE = 10_000


@dataclass(frozen=True)
class Test:
    key: str
    label: str
    request: str
    connections: int
    in_flight: int
    client: str = "lean"
    on_echo: bool = True
    on_stoq: bool = True
    echo_alpn: str = ECHO_ALPN
    stoq_row: str = ""
    """For a row measured on the echo server only: the STOQ test it is compared with."""
    echo_row: str = ""
    """For a row measured on STOQ only: the echo test it is compared with."""


HEALTH_1 = Test("health-1", "node.health, 1 conn x 64 in flight", "health", 1, 64)
HEALTH_8 = Test("health-8", "node.health, 8 conns x 64 in flight", "health", 8, 64)
SIZED_1 = Test("sized-1", "same, 1 conn; echo answers 140 B like STOQ", "health", 1, 64,
               on_stoq=False, echo_alpn=SIZED_ECHO_ALPN, stoq_row=HEALTH_1.key)
SIZED_8 = Test("sized-8", "same, 8 conns; echo answers 140 B like STOQ", "health", 8, 64,
               on_stoq=False, echo_alpn=SIZED_ECHO_ALPN, stoq_row=HEALTH_8.key)
LIBRARY_1 = Test("library-1", "node.health, 1 conn x 64, stoq.AsyncClient (echo: lean client)",
                 "health", 1, 64, client="library", on_echo=False, echo_row=HEALTH_1.key)
BULK = Test("bulk", "bulk: node.echo 1 MiB, 1 stream, sequential", "bulk", 1, 1)
TESTS = (HEALTH_1, HEALTH_8, SIZED_1, SIZED_8, LIBRARY_1, BULK)


@dataclass(frozen=True)
class Target:
    """A running server under test."""

    child: Child
    port: int
    pin: str
    alpn: str


@dataclass
class Outcome:
    result: LoadResult | None = None
    failure: str = ""


TRUSTCHAIN_CONFIG = """\
# Written by bench/stoq.py for one benchmark run.
[node]
data_dir = "{data_dir}"

[ca]
mode = "development"

[api]
rate_limit_per_minute = 0

[network]
quic_engine = "{engine}"

[logging]
level = "warning"
format = "text"

[logging.output]
type = "stderr"
"""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_trustchain(children: Children, engine: str, tmp: Path) -> Target:
    """``trustchain serve`` on ``[::1]:0`` with ``network.quic_engine = engine``."""
    data_dir = tmp / f"data-{engine}"
    config = tmp / f"trustchain-{engine}.toml"
    config.write_text(TRUSTCHAIN_CONFIG.format(data_dir=data_dir, engine=engine))
    argv = [sys.executable, "-m", "trustchain", "serve", "--config", str(config),
            "--data-dir", str(data_dir), "--listen", "[::1]:0"]
    child = children.start(f"trustchain serve ({engine})", argv, tmp / f"trustchain-{engine}.log")
    listening = child.wait_for(LISTENING, 60.0)
    fingerprint = child.wait_for(FINGERPRINT, 10.0)
    if protocol.ALPN not in listening.group(3).split(","):
        raise RuntimeError(f"trustchain does not offer {protocol.ALPN}: {listening.group(0)}")
    return Target(child, int(listening.group(2)), fingerprint.group(1), protocol.ALPN)


def start_echo(children: Children, engine: str, tmp: Path) -> Target:
    """The bare QUIC echo server of ``engine`` on ``[::1]:0``."""
    certfile, keyfile = make_certificate(tmp / f"echo-{engine}")
    argv = [sys.executable, "-m", "bench._common", "echo-server", "--engine", engine,
            "--cert", str(certfile), "--key", str(keyfile)]
    child = children.start(f"echo server ({engine})", argv, tmp / f"echo-{engine}.log")
    listening = child.wait_for(LISTENING, 30.0)
    fingerprint = child.wait_for(FINGERPRINT, 10.0)
    return Target(child, int(listening.group(2)), fingerprint.group(1), ECHO_ALPN)


def measure(children: Children, engine: str, target: Target, test: Test, *, kind: str,
            duration: float, warmup: float, log_path: Path) -> Outcome:
    alpn = target.alpn if kind == "stoq" else test.echo_alpn
    expect = "same" if alpn == ECHO_ALPN else "ok"
    spec = LoadSpec(engine=engine, port=target.port, alpn=alpn, pin=target.pin,
                    request=test.request, expect=expect, client=test.client,
                    connections=test.connections, in_flight=test.in_flight,
                    duration=duration, warmup=warmup, server_pid=target.child.pid)
    try:
        result = load_in_child(children, spec, log_path)
    except (RuntimeError, OSError, ValueError) as exc:
        return Outcome(failure=str(exc))
    if target.child.proc.poll() is not None:
        return Outcome(result, failure=f"{target.child.name} died{target.child.stderr_tail()}")
    return Outcome(result)


def start_target(children: Children, engine: str, kind: str, tmp: Path) -> Target | str:
    """The server of ``kind`` (``stoq`` or ``echo``), or why it did not start."""
    try:
        return (start_trustchain if kind == "stoq" else start_echo)(children, engine, tmp)
    except (RuntimeError, OSError) as exc:
        return f"server did not start: {exc}"


def best(outcomes: list[Outcome]) -> Outcome:
    """The median run by its figure (a failed run counts as the lowest)."""
    ordered = sorted(outcomes, key=lambda o: -1.0 if o.result is None else o.result.rate)
    return ordered[(len(ordered) - 1) // 2] if ordered else Outcome(failure="not run")


def run_engine(children: Children, engine: str, tmp: Path, *, duration: float, warmup: float,
               repeat: int) -> tuple[dict[str, Outcome], dict[str, Outcome]]:
    """Every test on both servers of ``engine``; returns (STOQ, echo) outcomes.

    Both servers run side by side (the idle one costs nothing) and each test is
    run on the echo server and then on STOQ, so that the two figures of a row
    are measured as close together as possible on a shared machine.
    """
    targets = {kind: start_target(children, engine, kind, tmp) for kind in ("echo", "stoq")}
    runs: dict[str, dict[str, list[Outcome]]] = {"echo": {}, "stoq": {}}
    try:
        for round_ in range(repeat):
            for test in TESTS:
                for kind in ("echo", "stoq"):
                    if not (test.on_echo if kind == "echo" else test.on_stoq):
                        continue
                    target = targets[kind]
                    if isinstance(target, str):
                        outcome = Outcome(failure=target)
                    else:
                        outcome = measure(
                            children, engine, target, test, kind=kind, duration=duration,
                            warmup=warmup,
                            log_path=tmp / f"load-{engine}-{kind}-{test.key}-{round_}.log")
                    runs[kind].setdefault(test.key, []).append(outcome)
                    name = "STOQ" if kind == "stoq" else "bare echo"
                    progress(f"{engine}: {name:9} {test.label}: {describe(test, outcome)}")
    finally:
        for target in targets.values():
            if isinstance(target, Target):
                status = children.stop(target.child)
                if status not in (0, None):
                    progress(f"{engine}: {target.child.name} exited with status {status}"
                             f"{target.child.stderr_tail()}")
    return ({key: best(value) for key, value in runs["stoq"].items()},
            {key: best(value) for key, value in runs["echo"].items()})


# --- presentation -------------------------------------------------------------------------

def figure(test: Test, result: LoadResult | None) -> str:
    if result is None:
        return "failed"
    if test.request == "bulk":
        return f"{result.megabytes_per_s:,.1f} MB/s"
    return f"{result.rate:,.0f} req/s"


def value(test: Test, result: LoadResult | None) -> float | None:
    if result is None:
        return None
    return result.megabytes_per_s if test.request == "bulk" else result.rate


def latency(result: LoadResult | None) -> str:
    if result is None:
        return "-"
    return f"{result.p50_ms:.2f} / {result.p99_ms:.2f} ms"


def describe(test: Test, outcome: Outcome) -> str:
    text = f"{figure(test, outcome.result)}, p50/p99 {latency(outcome.result)}"
    if outcome.result is not None and outcome.result.errors:
        text += (f", {outcome.result.errors} errors (first: {outcome.result.first_error})")
    if outcome.failure:
        text += f" [{outcome.failure}]"
    return text


def cpu(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f} %"


def cpu_per_request(result: LoadResult | None) -> str:
    if result is None or result.server_cpu is None or not result.rate:
        return "-"
    micros = result.server_cpu / result.rate * 1e6
    return f"{micros / 1e3:,.0f} ms" if micros >= 10_000 else f"{micros:,.0f} µs"


def engine_report(engine: str, stoq_out: dict[str, Outcome], echo_out: dict[str, Outcome]
                  ) -> str:
    rows: list[list[str]] = []
    cpu_rows: list[list[str]] = []
    notes: list[str] = []
    missing = Outcome(failure="not run")
    for test in TESTS:
        ours = stoq_out.get(test.stoq_row or test.key, missing).result
        base = echo_out.get(test.echo_row or test.key, missing).result
        a, b = value(test, ours), value(test, base)
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        rows.append([test.label, figure(test, ours), figure(test, base), ratio,
                     latency(ours), latency(base)])
        cpu_row = [test.label]
        for measured, result in ((test.on_stoq, ours), (test.on_echo, base)):
            cpu_row += ([cpu(result.server_cpu if result else None), cpu_per_request(result),
                         cpu(result.client_cpu if result else None)] if measured
                        else ["", "", ""])
        cpu_rows.append(cpu_row)
        for label, measured, outcome in (("STOQ", test.on_stoq, stoq_out.get(test.key)),
                                         ("echo", test.on_echo, echo_out.get(test.key))):
            if not measured or outcome is None:
                continue
            if outcome.failure:
                notes.append(f"- {test.label}, {label}: {outcome.failure}")
            if outcome.result is not None and outcome.result.errors:
                notes.append(f"- {test.label}, {label}: {outcome.result.errors} bad responses "
                             f"(first: {outcome.result.first_error})")
    parts = [
        f"### {engine} {stoq.load_engine(engine).version}",
        "",
        markdown_table(["test", "STOQ", "bare echo", "STOQ/echo", "STOQ p50 / p99",
                        "echo p50 / p99"], rows),
        "",
        "CPU in the measurement window (100 % = one core; per request = server CPU / rate; "
        "blank = the figure above is reused from another row):",
        "",
        markdown_table(["test", "STOQ server", "per request", "load gen.", "echo server",
                        "per request", "load gen."], cpu_rows),
    ]
    if notes:
        parts += ["", "Problems:", *notes]
    return "\n".join(parts)


# --- main ---------------------------------------------------------------------------------

def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stoq", description=__doc__.split(
        "\n\n")[0] if __doc__ else None)
    parser.add_argument("--engine", choices=stoq.ENGINES, help="only this QUIC engine")
    parser.add_argument("--quick", action="store_true",
                        help="short runs (2 s each instead of 5 s)")
    parser.add_argument("--duration", type=float,
                        help="seconds measured per test (default 5, or 2 with --quick)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every test this many times and report the median run "
                             "(default 1)")
    args = parser.parse_args(argv)
    engines = [args.engine] if args.engine else list(stoq.ENGINES)
    duration = args.duration or (2.0 if args.quick else 5.0)
    if not 0 < duration <= 120:
        parser.error("--duration: between 0 and 120 seconds")
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat: between 1 and 10")
    warmup = 0.25 if args.quick else 0.5

    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    children = Children()
    print("## STOQ against bare QUIC echo, loopback [::1]\n")
    print("\n".join(machine_lines(engines)))
    print(f"- {duration:g} s measured per test after {warmup:g} s warm-up"
          + (f", median of {args.repeat} runs" if args.repeat > 1 else "")
          + "; echo and STOQ run side by side, each test on one then the other; the "
          "node.health frame is pre-encoded; bulk = node.echo of 1 MiB less 64 B, one "
          "request at a time; MB = 10^6 bytes of data, one way")
    print(f"- targets (information only): STOQ/echo >= {TARGET_RATIO}, "
          f">= {TARGET_QH3_HEALTH_RATE:,} node.health/s with qh3\n", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="trustchain-bench-") as tmp_name:
            tmp = Path(tmp_name)
            try:
                for engine in engines:
                    stoq_out, echo_out = run_engine(children, engine, tmp, duration=duration,
                                                    warmup=warmup, repeat=args.repeat)
                    print(engine_report(engine, stoq_out, echo_out) + "\n", flush=True)
            finally:
                children.stop_all()
    except KeyboardInterrupt:
        progress("interrupted; every server was stopped")
        return 130
    print(f"total time {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
