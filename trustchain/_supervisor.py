"""Runs the node processes of a cluster in the foreground (``trustchain cluster up``).

Every node is ``python -m trustchain serve --config DIR/node-I/config.toml``
(output in ``DIR/node-I/node.log``), in its own session, and on Linux the
kernel sends it SIGTERM should the supervisor die. SIGINT and SIGTERM are
passed on to every node (a second one kills them); a node that exits by
itself stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import stoq
from protocol import TrustChainError

from ._cli_common import print_rows, quiet_client_noise
from ._cluster_layout import Cluster, Member

LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1


def child_setup() -> Callable[[], None] | None:
    """On Linux: a ``preexec_fn`` that has the kernel SIGTERM the node if we die."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return setup


def describe_exit(code: int) -> str:
    """A ``Popen.returncode`` in words: ``exit status N`` or ``killed by SIGNAME``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a node's log (from its last 16 KiB)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def package_path() -> str:
    """PYTHONPATH for the nodes: this trustchain first, so they run the same code as we do."""
    here = str(Path(__file__).resolve().parents[1])
    current = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([here, current]) if current else here


def _print_tail(path: Path) -> None:
    """The tail of a node's log on stderr, indented under the line that names it."""
    for line in log_tail(path):
        print(f"  | {line}", file=sys.stderr)


@dataclass
class NodeProcess:
    """A cluster member and the process that runs it."""

    member: Member
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    exit_reported: bool = False

    @property
    def name(self) -> str:
        return self.member.name


class Supervisor:
    """The node processes of one cluster, run in the foreground."""

    def __init__(self, cluster: Cluster, *, wait: float, stop_timeout: float,
                 engine: str) -> None:
        self.cluster = cluster
        self.wait = wait
        self.stop_timeout = stop_timeout
        self.engine = engine
        self.nodes = [NodeProcess(member) for member in cluster.members]
        self.stopping = False
        self.stop_reason = ""
        self.failed = False
        self.stop_started = 0.0
        self.killed = False
        self.startup_failed = ""
        """The first node that exited before it answered: the others are not waited for."""
        self._wake = asyncio.Event()

    def running(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    # --- signals and stopping -------------------------------------------------

    def on_signal(self, sig: signal.Signals) -> None:
        if self.stopping:
            if not self.killed:
                print(f"{sig.name} again: killing the nodes", file=sys.stderr, flush=True)
                self.failed = True  # not a clean stop
                self.kill_all()
            return
        print(f"{sig.name}: stopping {len(self.running())} node(s)", file=sys.stderr,
              flush=True)
        self.begin_stop(sig.name, sig)

    def begin_stop(self, reason: str, sig: int = signal.SIGTERM) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        self.stop_started = time.monotonic()
        for node in self.running():
            assert node.proc is not None
            with contextlib.suppress(ProcessLookupError):
                node.proc.send_signal(sig)
        self._wake.set()

    def kill_all(self) -> None:
        self.killed = True
        for node in self.running():
            assert node.proc is not None
            with contextlib.suppress(ProcessLookupError):
                node.proc.kill()

    # --- starting -------------------------------------------------------------

    def start(self, node: NodeProcess, preexec: Callable[[], None] | None) -> None:
        member = node.member
        command = [sys.executable, "-m", "trustchain", "serve", "--config",
                   str(member.config)]
        with member.log.open("ab") as log:
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            log.write(f"--- {stamp} trustchain cluster up: {' '.join(command)}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=member.directory, start_new_session=True, preexec_fn=preexec,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": package_path()})

    async def health(self, node: NodeProcess, deadline: float) -> dict[str, Any] | str:
        """``node.health``'s answer once the node gives one, or why it did not."""
        loop = asyncio.get_running_loop()
        member = node.member
        last = "no answer yet"
        while not self.stopping:
            assert node.proc is not None
            code = node.proc.poll()
            if code is not None:
                self.startup_failed = self.startup_failed or member.name
                return f"exited during start-up ({describe_exit(code)})"
            if self.startup_failed:
                return f"not waited for: {self.startup_failed} failed to start"
            remaining = deadline - loop.time()
            if remaining <= 0:
                return f"no node.health answer within {self.wait:g} s (last: {last})"
            try:
                client = await stoq.connect(member.address, member.port,
                                            cafile=str(self.cluster.root), engine=self.engine,
                                            timeout=min(2.0, remaining),
                                            keep_alive_interval=None)
                async with client:
                    return await client.request("node.health", timeout=min(2.0, remaining))
            except TrustChainError as exc:
                last = exc.message
                if "certificate" in last:
                    last += (" (a cluster node serves a bootstrap certificate until a quorum "
                             "of validators is up and its CA has issued the real one)")
            except OSError as exc:
                last = str(exc)
            await asyncio.sleep(0.2)
        return "stopped before it answered"

    async def start_all(self) -> None:
        """Start every node and wait for each ``node.health``; print the table, or say
        which failed and stop the cluster."""
        loop = asyncio.get_running_loop()
        preexec = child_setup()
        for node in self.nodes:
            if self.stopping:
                break
            self.start(node, preexec)
        print(f"started {len(self.running())} node(s) of cluster {self.cluster.chain_id!r}; "
              f"waiting up to {self.wait:g} s for node.health", flush=True)
        deadline = loop.time() + self.wait
        started = [n for n in self.nodes if n.proc is not None]
        answers = await asyncio.gather(*(self.health(n, deadline) for n in started))
        if self.stopping:
            return
        rows = [("NAME", "PID", "ENDPOINT", "HEALTH", "LOG")]
        bad = []
        for node, answer in zip(started, answers, strict=True):
            assert node.proc is not None
            health = (str(answer.get("status", "?")) if isinstance(answer, dict)
                      else "-" if answer.startswith("not waited for") else "FAILED")
            rows.append((node.name, str(node.proc.pid), node.member.endpoint,
                         str(health), str(node.member.log)))
            if not isinstance(answer, dict):
                bad.append((node, answer))
        print_rows(rows)
        sys.stdout.flush()
        if not bad:
            print(f"all {len(started)} nodes are up (chain {self.cluster.chain_id!r}); "
                  "Ctrl-C or SIGTERM stops them", flush=True)
            return
        self.failed = True
        for node, why in bad:
            if why.startswith("not waited for"):
                continue
            print(f"error: {node.name} {why}; last lines of {node.member.log}:",
                  file=sys.stderr)
            _print_tail(node.member.log)
        for node, _ in bad:  # already reported
            if node.proc is not None and node.proc.poll() is not None:
                node.exit_reported = True
        print("stopping the cluster", file=sys.stderr, flush=True)
        self.begin_stop("start-up failed")

    # --- the foreground loop --------------------------------------------------

    def report_exits(self) -> None:
        """Say which nodes exited since the last call; a node that exits by itself fails
        the cluster and stops the others."""
        for node in self.nodes:
            if node.proc is None or node.exit_reported:
                continue
            code = node.proc.poll()
            if code is None:
                continue
            node.exit_reported = True
            if self.stopping:
                print(f"{node.name} (pid {node.proc.pid}) stopped: {describe_exit(code)}",
                      flush=True)
                if code != 0 and not self.killed:
                    self.failed = True
                continue
            self.failed = True
            print(f"error: {node.name} (pid {node.proc.pid}) exited unexpectedly: "
                  f"{describe_exit(code)}; last lines of {node.member.log}:", file=sys.stderr)
            _print_tail(node.member.log)
            sys.stderr.flush()
            others = len(self.running())
            if others:
                print(f"stopping the other {others} node(s)", file=sys.stderr, flush=True)
            self.begin_stop(f"{node.name} exited")

    async def run(self) -> int:
        """Start the nodes, then watch them until every one has stopped; the exit status:
        0 after a requested stop, 1 when a node failed."""
        loop = asyncio.get_running_loop()
        quiet_client_noise(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal, sig)
        await self.start_all()
        while True:
            self.report_exits()
            if not self.running():
                break
            if (self.stopping and not self.killed
                    and time.monotonic() - self.stop_started > self.stop_timeout):
                names = ", ".join(n.name for n in self.running())
                print(f"error: {names} did not stop within {self.stop_timeout:g} s: killing",
                      file=sys.stderr, flush=True)
                self.failed = True
                self.kill_all()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
        self.report_exits()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("all nodes stopped" + (" (with errors)" if self.failed else ""), flush=True)
        return 1 if self.failed else 0
