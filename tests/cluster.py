"""Real validator clusters for tests: `trustchain cluster init`, then one process per node.

Nodes are started one by one (not through `cluster up`) so that a test can
make some of them byzantine (``python -m tests.byzantine``), kill one with
SIGKILL and restart it. Status and blocks are read over STOQ; the links skip
certificate checks because a cluster node serves a bootstrap certificate until
its CA-issued one is committed (consensus messages are signed anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import stoq

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                     if p)}


def tune(config: Path, **consensus: str) -> None:
    """Set ``[consensus]`` keys (replacing those the file has)."""
    text = config.read_text()
    lines = text.splitlines()
    start = lines.index("[consensus]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")),
               len(lines))
    for key, value in consensus.items():
        lines[start + 1:end] = [line for line in lines[start + 1:end]
                                if not line.startswith(f"{key} =")]
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")),
                   len(lines))
        lines.insert(start + 1, f"{key} = {value}")
    config.write_text("\n".join(lines) + "\n")


class Cluster:
    """N validator processes on [::1] made by `trustchain cluster init`."""

    def __init__(self, directory: Path, size: int, *, chain_id: str = "test-cluster",
                 checker: Any = None, ceremony: bool = False, **consensus: str) -> None:
        self.directory = directory
        self.checker = checker
        """If given (a :class:`tests.helpers.CddlChecker`), every answer is checked."""
        result = subprocess.run(
            [sys.executable, "-m", "trustchain", "cluster", "init", "--validators", str(size),
             "--base-port", "0", "--out", str(directory), "--chain-id", chain_id,
             *(["--ceremony"] if ceremony else [])],
            capture_output=True, text=True, env=ENV, timeout=120, cwd=directory.parent)
        if result.returncode != 0:
            raise RuntimeError(f"cluster init failed: {result.stdout}\n{result.stderr}")
        self.nodes = tomllib.loads((directory / "cluster.toml").read_text())["nodes"]
        self.size = size
        for node in self.nodes:
            tune(directory / node["config"], **consensus)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def config(self, index: int) -> Path:
        return self.directory / self.nodes[index]["config"]

    def port(self, index: int) -> int:
        return int(self.nodes[index]["port"])

    def id(self, index: int) -> str:
        return str(self.nodes[index]["validator_id"])

    def log(self, index: int) -> Path:
        return self.directory / f"node-{index + 1}" / "test.log"

    def start(self, index: int, *, byzantine: bool = False, forger: bool = False,
              forge: str = "proof-free") -> None:
        """Start node ``index``: honest, equivocating (``byzantine``), or forging
        decisions (``forger``: proof-free issuances, or ``forge="bad-seal"``: forged
        batch seals); see tests/byzantine.py."""
        args = ["--config", str(self.config(index))]
        if byzantine or forger:
            command = [sys.executable, "-m", "tests.byzantine", *args]
            command += ["--forge", forge] if forger else []
        else:
            command = [sys.executable, "-m", "trustchain", "serve", *args]
        with self.log(index).open("ab") as out:
            self.procs[index] = subprocess.Popen(command, stdout=out, stderr=out, env=ENV,
                                                 cwd=self.directory)

    def start_all(self, byzantine: tuple[int, ...] = (), forgers: tuple[int, ...] = (),
                  forge: str = "proof-free") -> None:
        for i in range(self.size):
            self.start(i, byzantine=i in byzantine, forger=i in forgers, forge=forge)

    def kill(self, index: int) -> None:
        proc = self.procs.pop(index)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"--- node-{i + 1}\n" + self.log(i).read_text(errors="replace")[-3000:]
                         for i in range(self.size) if self.log(i).exists())

    async def client(self, index: int, timeout: float = 5.0) -> stoq.AsyncClient:
        return await stoq.connect("::1", self.port(index), insecure=True, timeout=timeout,
                                  trace=self.checker)

    async def ask(self, index: int, op: str, args: dict[str, Any] | None = None,
                  timeout: float = 5.0) -> dict[str, Any] | None:
        """``op``'s result from node ``index``, or None if it could not answer."""
        try:
            async with await self.client(index) as client:
                return await client.request(op, args or {}, timeout=timeout)
        except Exception:  # unreachable, refused, timed out: all "no answer"
            return None

    async def statuses(self, indices: list[int]) -> dict[int, dict[str, Any] | None]:
        answers = await asyncio.gather(*(self.ask(i, "consensus.status") for i in indices))
        return dict(zip(indices, answers, strict=True))

    async def wait_until(self, indices: list[int], predicate: Any, timeout: float,
                         what: str) -> dict[int, dict[str, Any]]:
        """Poll ``consensus.status`` of ``indices`` until ``predicate(status)`` holds for all."""
        deadline = time.monotonic() + timeout
        last: dict[int, dict[str, Any] | None] = {}
        while time.monotonic() < deadline:
            last = await self.statuses(indices)
            if all(s is not None and predicate(s) for s in last.values()):
                return {i: s for i, s in last.items() if s is not None}
            await asyncio.sleep(0.25)
        summary = {i: None if s is None else {k: s.get(k) for k in (
            "height", "round", "step", "isolated", "mempool", "misbehaviour")}
            for i, s in last.items()}
        raise AssertionError(f"not within {timeout} s: {what}; last {summary}\n{self.logs()}")

    async def blocks(self, index: int, start: int, limit: int = 256) -> list[dict[str, Any]]:
        answer = await self.ask(index, "consensus.blocks", {"start": start, "limit": limit})
        return [] if answer is None else list(answer["blocks"])


@contextlib.contextmanager
def running_cluster(directory: Path, size: int, *, byzantine: tuple[int, ...] = (),
                    forgers: tuple[int, ...] = (), forge: str = "proof-free",
                    checker: Any = None, ceremony: bool = False, **consensus: str) -> Any:
    cluster = Cluster(directory, size, checker=checker, ceremony=ceremony, **consensus)
    try:
        cluster.start_all(byzantine, forgers, forge)
        yield cluster
    finally:
        cluster.stop()
