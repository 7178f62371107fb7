"""Stored state is checked at start: a damaged CT tile or an edited audit log stops the
node with one line naming the file and what to do (never a traceback), and
`trustchain ct check` verifies every tile of a data directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..audit_records import rehash
from ..helpers import start_server_process


def serve_once(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``trustchain serve`` on the test's data directory, expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "trustchain", "serve", "--config", str(tmp / "config.toml"),
         "--data-dir", str(tmp / "data"), "--listen", "[::1]:0", *extra],
        capture_output=True, text=True, timeout=60, cwd=tmp, check=False)


def ct_check(tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustchain", "ct", "check", "--config",
         str(tmp / "config.toml"), "--data-dir", str(tmp / "data")],
        capture_output=True, text=True, timeout=60, cwd=tmp, check=False)


def assert_one_line(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))


def test_a_damaged_ct_tile_stops_the_node_with_one_line(tmp_path: Path) -> None:
    start_server_process(tmp_path, "qh3").stop()
    checked = ct_check(tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("OK shard 0: 1 entries"), checked.stdout
    shard = tmp_path / "data" / "ct" / "0"
    hash_tile = next((shard / "tile" / "0").rglob("*.p/*"))
    flip(hash_tile, 3)
    refused = serve_once(tmp_path)
    assert refused.returncode == 2
    assert_one_line(refused.stderr, "the CT log is damaged", str(shard / "tile"),
                    "trustchain ct check", "restore")
    checked = ct_check(tmp_path)
    assert checked.returncode == 1
    assert checked.stdout.startswith("FAIL shard 0"), checked.stdout
    assert "what to do" in checked.stdout
    flip(hash_tile, 3)
    data_tile = next((shard / "tile" / "data").rglob("*.p/*"))
    flip(data_tile, 5)  # inside the entry's timestamp: blamed on the data tile itself
    refused = serve_once(tmp_path)
    assert refused.returncode == 2
    assert_one_line(refused.stderr, f"the data tile {data_tile} was altered")
    flip(data_tile, 5)
    assert ct_check(tmp_path).returncode == 0
    start_server_process(tmp_path, "qh3").stop()  # repaired: it starts again


def edit_record(log: Path, index: int) -> bytes:
    """Edit record ``index`` (re-hashed); returns the original file."""
    original = log.read_bytes()
    records = [json.loads(line) for line in original.decode().splitlines()]
    records[index]["time"] += 1
    rehash(records[index])
    log.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return original


def test_an_edited_audit_log_stops_the_node_with_one_line(tmp_path: Path) -> None:
    start_server_process(tmp_path, "qh3").stop()
    start_server_process(tmp_path, "qh3").stop()  # two runs: two closing checkpoints
    log = tmp_path / "data" / "audit" / "audit.log"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    checkpoints = [i for i, r in enumerate(records) if r["kind"] == "checkpoint"]
    assert len(checkpoints) >= 2 and checkpoints[-1] == len(records) - 1
    # Since the last checkpoint (here: the record it covers): found at every start.
    original = edit_record(log, checkpoints[-1] - 1)
    refused = serve_once(tmp_path)
    assert refused.returncode == 2
    assert_one_line(refused.stderr, f"audit log {log} was altered",
                    "trustchain audit verify")
    assert log.read_bytes() != original  # nothing appended to it
    # Before it: found when asked to check the whole chain.
    log.write_bytes(original)
    first = checkpoints[0] - 1
    edit_record(log, first)
    refused = serve_once(tmp_path, "--check-audit-log")
    assert refused.returncode == 2
    assert_one_line(refused.stderr, "was altered", f"record {records[first + 1]['seq']}")
    log.write_bytes(original)
    start_server_process(tmp_path, "qh3", extra="").stop()
