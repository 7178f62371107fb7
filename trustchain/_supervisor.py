"""Runs the node processes of a cluster in the foreground (``trustchain cluster up``).

Every node is ``python -m trustchain serve --config DIR/node-I/config.toml``
(output in ``DIR/node-I/node.log``), in its own session, and on Linux the
kernel sends it SIGTERM should the supervisor die. SIGINT and SIGTERM are
passed on to every node (a second one kills them).

A node that exits by itself is restarted as :class:`RestartPolicy` says
(exponential back-off; given up on after repeated failed starts), so that a
cluster can be watched riding out a crash. Without a policy
(``--no-restart``), such an exit stops the other nodes.
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


@dataclass(frozen=True)
class RestartPolicy:
    """When a node that exited by itself is started again.

    The delay starts at ``first_delay`` and doubles with each exit in a row, up
    to ``max_delay``; an exit after ``stable_after`` seconds up starts again at
    ``first_delay``. A node that exits ``max_failed_starts`` times in a row
    before it answers ``node.health`` is given up on: restarting it again would
    only spin.
    """

    first_delay: float = 1.0
    max_delay: float = 30.0
    stable_after: float = 60.0
    max_failed_starts: int = 5

    def delay(self, exits_in_a_row: int) -> float:
        """Seconds to wait before the restart after the ``exits_in_a_row``-th exit."""
        doublings = min(max(exits_in_a_row - 1, 0), 32)
        return float(min(self.first_delay * 2.0 ** doublings, self.max_delay))


@dataclass
class NodeProcess:
    """A cluster member, the process that runs it and its restart bookkeeping."""

    member: Member
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    exit_reported: bool = False
    started_at: float = 0.0
    """``time.monotonic()`` of the last start."""
    answered: bool = False
    """It answered ``node.health`` since its last start."""
    exits_in_a_row: int = 0
    """Exits, each within ``stable_after`` of its start: what the back-off doubles with."""
    failed_starts: int = 0
    """Exits in a row before answering ``node.health``."""
    restart_at: float | None = None
    """``time.monotonic()`` when a restart is due; None when none is."""

    @property
    def name(self) -> str:
        return self.member.name


class Supervisor:
    """The node processes of one cluster, run in the foreground."""

    def __init__(self, cluster: Cluster, *, wait: float, stop_timeout: float,
                 engine: str, restart: RestartPolicy | None = None) -> None:
        self.cluster = cluster
        self.wait = wait
        self.stop_timeout = stop_timeout
        self.engine = engine
        self.restart = restart
        """None: a node that exits by itself stops the cluster (``--no-restart``)."""
        self.nodes = [NodeProcess(member) for member in cluster.members]
        self.stopping = False
        self.stop_reason = ""
        self.failed = False
        self.stop_started = 0.0
        self.killed = False
        self.startup_failed = ""
        """The first node that exited before it answered: the others are not waited for."""
        self._wake = asyncio.Event()
        self._preexec = child_setup()
        self._health_watches: set[asyncio.Task[None]] = set()

    def running(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def pending_restarts(self) -> list[NodeProcess]:
        """Nodes waiting out their back-off."""
        return [n for n in self.nodes if n.restart_at is not None]

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
        for node in self.pending_restarts():
            print(f"{node.name}: restart cancelled", flush=True)
            node.restart_at = None
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

    def start(self, node: NodeProcess) -> None:
        """Start the node's process (its output appended to its log)."""
        member = node.member
        command = [sys.executable, "-m", "trustchain", "serve", "--config",
                   str(member.config)]
        with member.log.open("ab") as log:
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            log.write(f"--- {stamp} trustchain cluster up: {' '.join(command)}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=member.directory, start_new_session=True, preexec_fn=self._preexec,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": package_path()})
        node.started_at = time.monotonic()
        node.answered = False
        node.exit_reported = False
        node.restart_at = None

    async def health(self, node: NodeProcess, deadline: float, *,
                     initial: bool = False) -> dict[str, Any] | str:
        """``node.health``'s answer once the node's current process gives one, or why it
        did not. ``initial``: the cluster is starting, and a node that exits then makes
        the others not worth waiting for."""
        loop = asyncio.get_running_loop()
        member = node.member
        proc = node.proc
        assert proc is not None
        last = "no answer yet"
        while not self.stopping:
            if node.proc is not proc:
                return "replaced by a new process"
            code = proc.poll()
            if code is not None:
                if initial:
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
        for node in self.nodes:
            if self.stopping:
                break
            self.start(node)
        print(f"started {len(self.running())} node(s) of cluster {self.cluster.chain_id!r}; "
              f"waiting up to {self.wait:g} s for node.health", flush=True)
        deadline = loop.time() + self.wait
        started = [n for n in self.nodes if n.proc is not None]
        answers = await asyncio.gather(*(self.health(n, deadline, initial=True)
                                         for n in started))
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
            if isinstance(answer, dict):
                node.answered = True
            else:
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
        """Say which nodes exited since the last call; one that exited by itself is
        restarted, or, without a restart policy, fails the cluster and stops the others."""
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
            print(f"error: {node.name} (pid {node.proc.pid}) exited unexpectedly: "
                  f"{describe_exit(code)}; last lines of {node.member.log}:", file=sys.stderr)
            _print_tail(node.member.log)
            sys.stderr.flush()
            if self.restart is not None:
                self.plan_restart(node, self.restart)
                continue
            self.failed = True
            others = len(self.running())
            if others:
                print(f"stopping the other {others} node(s)", file=sys.stderr, flush=True)
            self.begin_stop(f"{node.name} exited")

    def plan_restart(self, node: NodeProcess, policy: RestartPolicy) -> None:
        """After an unexpected exit: when to start the node again, or give up on it."""
        now = time.monotonic()
        if now - node.started_at >= policy.stable_after:
            node.exits_in_a_row = 0
        node.exits_in_a_row += 1
        if not node.answered:
            node.failed_starts += 1
        if node.failed_starts >= policy.max_failed_starts:
            node.restart_at = None
            self.failed = True
            others = len(self.running())
            print(f"error: giving up on {node.name}: it exited {node.failed_starts} times in "
                  f"a row before answering node.health; "
                  + (f"the other {others} node(s) keep running" if others
                     else "no node is running any more"), file=sys.stderr, flush=True)
            return
        delay = policy.delay(node.exits_in_a_row)
        node.restart_at = now + delay
        attempt = (f" (failed starts in a row: {node.failed_starts} of "
                   f"{policy.max_failed_starts})" if node.failed_starts else "")
        print(f"restarting {node.name} in {delay:g} s{attempt}", flush=True)

    def restart_due(self) -> None:
        """Start the nodes whose back-off is over, and watch for their ``node.health``."""
        now = time.monotonic()
        for node in self.pending_restarts():
            assert node.restart_at is not None
            if self.stopping or node.restart_at > now:
                continue
            try:
                self.start(node)
            except OSError as exc:  # counts as a failed start
                print(f"error: cannot restart {node.name}: {exc}", file=sys.stderr,
                      flush=True)
                node.started_at, node.answered = now, False
                assert self.restart is not None
                self.plan_restart(node, self.restart)
                continue
            assert node.proc is not None
            print(f"{node.name} restarted (pid {node.proc.pid})", flush=True)
            watch = asyncio.create_task(self.watch_restarted(node))
            self._health_watches.add(watch)
            watch.add_done_callback(self._health_watches.discard)

    async def watch_restarted(self, node: NodeProcess) -> None:
        """Say when a restarted node answers ``node.health`` again (or that it does not
        within ``--wait``); from then on, its next exit is not a failed start."""
        proc = node.proc
        assert proc is not None
        answer = await self.health(node, asyncio.get_running_loop().time() + self.wait)
        if isinstance(answer, dict):
            node.answered = True
            node.failed_starts = 0
            print(f"{node.name} (pid {proc.pid}) answers node.health again: "
                  f"{answer.get('status', '?')}", flush=True)
        elif answer.startswith("no node.health answer"):
            print(f"warning: {node.name} (pid {proc.pid}) {answer}", file=sys.stderr,
                  flush=True)

    async def run(self) -> int:
        """Start the nodes, then watch them until every one has stopped; the exit status:
        0 after a requested stop, 1 when a node failed (or was given up on)."""
        loop = asyncio.get_running_loop()
        quiet_client_noise(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal, sig)
        await self.start_all()
        while True:
            self.report_exits()
            self.restart_due()
            if not self.running() and not self.pending_restarts():
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
        for watch in list(self._health_watches):
            watch.cancel()
        await asyncio.gather(*self._health_watches, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("all nodes stopped" + (" (with errors)" if self.failed else ""), flush=True)
        return 1 if self.failed else 0
