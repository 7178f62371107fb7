"""`cluster up`'s restart decisions, without processes: back-off, its reset, giving up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trustchain._cluster_layout import Cluster, Member
from trustchain._supervisor import NodeProcess, RestartPolicy, Supervisor


def _supervisor(tmp_path: Path, nodes: int = 2) -> Supervisor:
    members = [Member(name=f"node-{i}", config=tmp_path / f"node-{i}" / "config.toml",
                      address="::1", port=7700 + i, validator_id="")
               for i in range(1, nodes + 1)]
    cluster = Cluster(directory=tmp_path, chain_id="test", root=tmp_path / "root.pem",
                      members=members)
    return Supervisor(cluster, wait=1, stop_timeout=1, engine="qh3",
                      restart=RestartPolicy())


def test_delay_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.delay(10_000) == 30


def test_back_off_grows_then_resets_after_a_stable_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    supervisor = _supervisor(tmp_path)
    policy = RestartPolicy()
    node = supervisor.nodes[0]
    delays = []
    for _ in range(3):  # answered node.health each time, then crashed within 60 s
        node.started_at, node.answered = time.monotonic() - 5, True
        supervisor.plan_restart(node, policy)
        assert node.restart_at is not None
        delays.append(round(node.restart_at - time.monotonic()))
    assert delays == [1, 2, 4]
    assert node.failed_starts == 0 and not supervisor.failed

    node.started_at = time.monotonic() - policy.stable_after - 1  # up long enough
    supervisor.plan_restart(node, policy)
    assert node.restart_at is not None and round(node.restart_at - time.monotonic()) == 1
    assert "restarting node-1 in 1 s" in capsys.readouterr().out


def test_gives_up_after_repeated_failed_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    supervisor = _supervisor(tmp_path)
    policy = RestartPolicy()
    node: NodeProcess = supervisor.nodes[1]
    for attempt in range(1, policy.max_failed_starts):
        node.started_at, node.answered = time.monotonic(), False
        supervisor.plan_restart(node, policy)
        assert node.restart_at is not None and node.failed_starts == attempt
    node.started_at, node.answered = time.monotonic(), False
    supervisor.plan_restart(node, policy)
    assert node.restart_at is None and supervisor.failed
    assert supervisor.pending_restarts() == []
    assert "giving up on node-2: it exited 5 times in a row" in capsys.readouterr().err
