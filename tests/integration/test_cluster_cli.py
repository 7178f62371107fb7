"""`trustchain cluster`: init (configs, validator keys, one root), up (real node
processes on [::1], ephemeral ports) and status.

The running cluster is shared by the tests of this module, in order: health,
status, a SIGKILLed node that is restarted, then SIGINT (which ends that
`cluster up`). Further `cluster up`s: one with --no-restart (a killed node stops
the others), one stopped with SIGTERM, and a 2-node one whose broken node is
given up on. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import stoq
from store import AuthorityStore, SoftwareKeyStore
from trustchain import _config as config

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                     if p)}
NODES = 4
UP_WAIT = 40.0
"""Seconds `cluster up` may take to see every node healthy."""


def _cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=ENV)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


class ClusterUp:
    """``trustchain cluster up DIR`` as a child process; its stdout is read by a thread."""

    def __init__(self, directory: Path, workdir: Path, *options: str,
                 nodes: int = NODES) -> None:
        self.stderr_path = workdir / f"cluster-up-{time.monotonic_ns()}.err"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trustchain", "cluster", "up", str(directory),
             "--wait", str(UP_WAIT), "--stop-timeout", "20", *options],
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=workdir, env=ENV)
        self.nodes = nodes
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.pids: dict[str, int] = {}
        """The current process of each node (the table, then restarts)."""
        self.every_pid: set[int] = set()
        """Every node process this `cluster up` said it started."""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first new stdout line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"cluster up ended early:\n{self.output()}")
            self._note(line)
            if re.search(pattern, line):
                return line
        pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.output()}")

    def _note(self, line: str) -> None:
        self.lines.append(line)
        if m := (re.match(r"(node-\d+)\s+(\d+)\s+\[", line)
                 or re.match(r"(node-\d+) restarted \(pid (\d+)\)", line)):
            self.pids[m.group(1)] = int(m.group(2))
            self.every_pid.add(int(m.group(2)))

    def wait_for_stderr(self, pattern: str, timeout: float) -> str:
        """The first stderr line matching ``pattern`` (stdout is collected meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr.splitlines():
                if re.search(pattern, line):
                    return line
            try:
                line_or_end = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line_or_end is None:
                pytest.fail(f"cluster up ended early:\n{self.output()}")
            self._note(line_or_end)
        pytest.fail(f"no stderr line matching {pattern!r} within {timeout} s:\n"
                    f"{self.output()}")

    def wait_up(self) -> None:
        self.wait_for(r"^all \d+ nodes are up", UP_WAIT + 10)
        assert sorted(self.pids) == [f"node-{i}" for i in range(1, self.nodes + 1)], \
            self.output()

    def finish(self, timeout: float = 40.0) -> int:
        """Wait for the exit; collect the rest of stdout."""
        code = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self._note(line)
        return code

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr:\n" + self.stderr

    def stop(self) -> None:
        """Teardown: whatever happened, leave no process behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in _wait_gone(sorted(self.every_pid), 1.0):
            os.kill(pid, signal.SIGKILL)
        self._stderr.close()


def _cluster_file(directory: Path) -> dict[str, Any]:
    return tomllib.loads((directory / "cluster.toml").read_text())


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster_dir(workdir: Path) -> Path:
    """A 4-validator cluster made by `cluster init --base-port 0`."""
    directory = workdir / "c4"
    result = _cli("cluster", "init", "--validators", str(NODES), "--base-port", "0",
                  "--out", str(directory), "--chain-id", "test-chain", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "private key is copied into every node" in result.stdout  # said, not hidden
    assert "cluster up" in result.stdout
    return directory


@pytest.fixture(scope="module")
def running(cluster_dir: Path, workdir: Path) -> Iterator[ClusterUp]:
    up = ClusterUp(cluster_dir, workdir)
    try:
        up.wait_up()
        yield up
    finally:
        up.stop()


# --- init ----------------------------------------------------------------------------


def test_init_writes_a_four_validator_cluster(cluster_dir: Path, workdir: Path) -> None:
    cluster = _cluster_file(cluster_dir)
    assert cluster["chain_id"] == "test-chain"
    assert [n["name"] for n in cluster["nodes"]] == [f"node-{i}" for i in range(1, NODES + 1)]
    root_pem = (cluster_dir / "root.pem").read_bytes()
    root = x509.load_pem_x509_certificate(root_pem)

    configs = [config.load(cluster_dir / n["config"]) for n in cluster["nodes"]]
    ports = []
    for cfg, node in zip(configs, cluster["nodes"], strict=True):
        # one UDP port per node for every ALPN, on ::1
        assert cfg.listen_addresses() == [("::1", node["port"])]
        assert cfg.ca.mode == "development" and cfg.ca.hsm.provider == "software"
        assert Path(cfg.node.data_dir).is_absolute()
        assert cfg.consensus.chain_id == "test-chain"
        ports.append(node["port"])
    assert len(set(ports)) == NODES

    # every config lists the same four validators: distinct keys, the nodes' ports
    listed = [[(v.public_key, v.address, v.port, v.power, v.name)
               for v in cfg.consensus.validators] for cfg in configs]
    assert all(entry == listed[0] for entry in listed)
    keys = [v[0] for v in listed[0]]
    assert len(set(keys)) == NODES
    assert [(v[2], v[4]) for v in listed[0]] == [(n["port"], n["name"])
                                                for n in cluster["nodes"]]

    intermediates = []
    for i, (cfg, node) in enumerate(zip(configs, cluster["nodes"], strict=True)):
        data = Path(cfg.node.data_dir)
        # the node's own validator key is in its keystore and in the list
        keystore = SoftwareKeyStore(data / "keys")
        try:
            signer = keystore.get(cfg.consensus.validator_key)
            assert signer is not None and signer.algorithm == "ed25519"
            raw = signer.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
        finally:
            keystore.close()
        assert raw.hex() == keys[i] == node["public_key"]
        assert node["validator_id"] == hashlib.sha256(raw).digest()[:20].hex()
        # the same root everywhere; the node's own intermediate under it
        assert (data / "root.pem").read_bytes() == root_pem
        certs = AuthorityStore(data / "ca" / "authorities.sqlite3")
        try:
            root_record = certs.active_authority("root")
            intermediate = certs.active_authority("intermediate")
        finally:
            certs.close()
        assert root_record is not None and intermediate is not None
        assert x509.load_der_x509_certificate(root_record.der) == root
        pem = workdir / f"intermediate-{node['name']}.pem"
        pem.write_bytes(x509.load_der_x509_certificate(intermediate.der)
                        .public_bytes(serialization.Encoding.PEM))
        verified = subprocess.run(["openssl", "verify", "-CAfile",
                                   str(cluster_dir / "root.pem"), str(pem)],
                                  capture_output=True, text=True, timeout=30)
        assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stderr
        intermediates.append(intermediate.der)
    assert len(set(intermediates)) == NODES


def test_init_refuses_to_overwrite_and_bad_counts(cluster_dir: Path, workdir: Path) -> None:
    before = (cluster_dir / "cluster.toml").read_bytes()
    again = _cli("cluster", "init", "--validators", "4", "--base-port", "0",
                 "--out", str(cluster_dir), cwd=workdir)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (cluster_dir / "cluster.toml").read_bytes() == before

    zero = _cli("cluster", "init", "--validators", "0", "--base-port", "0",
                "--out", str(workdir / "zero"), cwd=workdir)
    assert zero.returncode == 2 and "at least 1 validator" in zero.stderr
    assert not (workdir / "zero").exists()

    small = workdir / "small"
    two = _cli("cluster", "init", "--validators", "2", "--base-port", "0",
               "--out", str(small), cwd=workdir)
    assert two.returncode == 0, two.stderr
    assert "tolerate no byzantine validator" in two.stderr
    first_keys = [n["public_key"] for n in _cluster_file(small)["nodes"]]
    forced = _cli("cluster", "init", "--validators", "2", "--base-port", "0",
                  "--out", str(small), "--force", cwd=workdir)
    assert forced.returncode == 0, forced.stderr
    assert set(first_keys).isdisjoint(n["public_key"] for n in _cluster_file(small)["nodes"])


def test_status_of_a_stopped_cluster(workdir: Path) -> None:
    directory = workdir / "stopped"
    assert _cli("cluster", "init", "--validators", "1", "--base-port", "0",
                "--out", str(directory), cwd=workdir).returncode == 0
    result = _cli("cluster", "status", str(directory), "--timeout", "1", cwd=workdir)
    assert result.returncode == 3, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("node-1"))
    assert " NO " in line and "cannot reach" in line


# --- up and status -----------------------------------------------------------------


async def test_up_starts_every_node(running: ClusterUp, cluster_dir: Path) -> None:
    assert all(_alive(pid) for pid in running.pids.values())
    root = str(cluster_dir / "root.pem")
    for node in _cluster_file(cluster_dir)["nodes"]:
        # the node's certificate chains to the cluster root (CA-issued, not bootstrap)
        async with await stoq.connect(node["address"], node["port"], cafile=root,
                                      timeout=5) as client:
            assert (await client.request("node.health"))["status"] == "ok"


def test_status_reports_every_node(running: ClusterUp, cluster_dir: Path,
                                   workdir: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        result = _cli("cluster", "status", str(cluster_dir), "--json", cwd=workdir)
        assert result.returncode == 0, result.stderr
        nodes = json.loads(result.stdout)["nodes"]
        assert [n["name"] for n in nodes] == [f"node-{i}" for i in range(1, NODES + 1)]
        ready = all(n["reachable"] and n["status"] and n["status"]["height"] >= 1
                    for n in nodes)
        if ready or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    errors = {n["name"]: n["error"] for n in nodes if n["error"]}
    assert not errors, f"consensus.status failed: {errors}"
    assert all(n["status"]["height"] >= 1 for n in nodes), nodes
    assert {n["status"]["chain_id"] for n in nodes} == {"test-chain"}
    ids = {n["validator_id"] for n in nodes}
    assert {n["status"]["validator"] for n in nodes} == ids

    text = _cli("cluster", "status", str(cluster_dir), cwd=workdir)
    assert text.returncode == 0, text.stderr
    lines = [x for x in text.stdout.splitlines() if re.match(r"node-\d+ ", x)]
    assert len(lines) == NODES
    for line in lines:
        fields = line.split()
        assert fields[1] == "yes" and int(fields[2]) >= 1, line


def test_a_killed_node_is_restarted(running: ClusterUp, cluster_dir: Path,
                                    workdir: Path) -> None:
    killed = running.pids["node-3"]
    os.kill(killed, signal.SIGKILL)
    running.wait_for(r"^restarting node-3 in 1 s$", 10)
    line = running.wait_for(r"^node-3 restarted \(pid \d+\)$", 10)
    assert running.pids["node-3"] != killed, line
    running.wait_for(r"^node-3 \(pid \d+\) answers node\.health again: ok$", UP_WAIT)
    assert re.search(rf"node-3 \(pid {killed}\) exited unexpectedly: killed by SIGKILL",
                     running.stderr), running.output()
    assert "| " in running.stderr  # the tail of its log
    assert not _wait_gone([killed]) and _alive(running.pids["node-3"])
    assert all(_alive(pid) for pid in running.pids.values())

    node = next(n for n in _cluster_file(cluster_dir)["nodes"] if n["name"] == "node-3")
    health = _cli("health", "--server", f"[::1]:{node['port']}", "--cafile",
                  str(cluster_dir / "root.pem"), cwd=workdir)
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "ok", \
        health.stdout + health.stderr
    status = _cli("cluster", "status", str(cluster_dir), "--json", cwd=workdir)
    assert status.returncode == 0, status.stderr
    answer = next(n for n in json.loads(status.stdout)["nodes"] if n["name"] == "node-3")
    assert answer["reachable"] and answer["status"], answer


def test_sigint_stops_every_node_after_a_restart(running: ClusterUp) -> None:
    pids = sorted(running.every_pid)
    assert len(pids) == NODES + 1  # node-3 twice
    running.proc.send_signal(signal.SIGINT)
    assert running.finish() == 0, running.output()
    for name, pid in running.pids.items():
        assert f"{name} (pid {pid}) stopped: exit status 0" in running.lines, running.output()
    assert running.lines[-1] == "all nodes stopped", running.output()
    assert not _wait_gone(pids), "node processes left behind"


def test_no_restart_a_killed_node_stops_the_others(cluster_dir: Path, workdir: Path) -> None:
    up = ClusterUp(cluster_dir, workdir, "--no-restart")
    try:
        up.wait_up()
        pids = dict(up.pids)
        os.kill(pids["node-3"], signal.SIGKILL)
        code = up.finish()
        assert code == 1, up.output()
        assert re.search(r"node-3 \(pid \d+\) exited unexpectedly: killed by SIGKILL",
                         up.stderr), up.output()
        assert "| " in up.stderr  # the tail of its log
        assert "stopping the other 3 node(s)" in up.stderr, up.output()
        assert not any("restart" in line for line in up.lines), up.output()
        assert not _wait_gone(list(pids.values())), "node processes left behind"
    finally:
        up.stop()


def test_sigterm_stops_every_node(cluster_dir: Path, workdir: Path) -> None:
    up = ClusterUp(cluster_dir, workdir)
    try:
        up.wait_up()
        pids = list(up.pids.values())
        assert all(_alive(pid) for pid in pids)
        up.proc.send_signal(signal.SIGTERM)
        assert up.finish() == 0, up.output()
        for name in up.pids:
            assert any(re.match(rf"{name} \(pid \d+\) stopped: exit status 0", x)
                       for x in up.lines), up.output()
        assert not _wait_gone(pids), "node processes left behind"
    finally:
        up.stop()


def test_a_node_that_keeps_failing_to_start_is_given_up_on(workdir: Path) -> None:
    """Back-off 1, 2, 4, 8, 16 s, then no sixth start: about 35 s."""
    directory = workdir / "pair"
    made = _cli("cluster", "init", "--validators", "2", "--base-port", "0",
                "--out", str(directory), cwd=workdir)
    assert made.returncode == 0, made.stderr
    up = ClusterUp(directory, workdir, nodes=2)
    try:
        up.wait_up()
        first = dict(up.pids)
        (directory / "node-2" / "config.toml").write_text("not [ toml\n")
        os.kill(first["node-2"], signal.SIGKILL)
        up.wait_for_stderr(r"^error: giving up on node-2: it exited 5 times in a row before "
                           r"answering node\.health; the other 1 node\(s\) keep running$", 50)
        delays = [float(m.group(1)) for line in up.lines
                  if (m := re.match(r"restarting node-2 in (\S+) s", line))]
        assert delays == [1, 2, 4, 8, 16], up.output()
        assert len(up.every_pid) == 2 + 5, up.output()
        exits = re.findall(r"node-2 \(pid \d+\) exited unexpectedly", up.stderr)
        assert len(exits) == 6, up.output()  # the kill, then five failed starts
        assert _alive(first["node-1"]) and up.proc.poll() is None
        assert not _wait_gone(sorted(up.every_pid - {first["node-1"]})), up.output()

        up.proc.send_signal(signal.SIGINT)
        assert up.finish() == 1, up.output()  # a node was given up on
        assert up.lines[-1] == "all nodes stopped (with errors)", up.output()
        assert not _wait_gone(sorted(up.every_pid)), "node processes left behind"
    finally:
        up.stop()
