"""`trustchain demo` runs the whole CA against a throwaway node and says what it checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_every_step(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "trustchain", "demo"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stdout.splitlines()
    steps = [re.sub(r"^\[\s*[\d.]+ s\s+\+\s*[\d.]+\] ", "", line) for line in lines[:-1]]
    assert len(steps) == len(lines) - 1 == 8, run.stdout
    started, proofs, issued, logged, resolved, revoked, validated, stopped = steps
    assert started.startswith("node started on [::1]:")
    assert proofs.startswith("proofs ready: requester key ") and "k=18 plot" in proofs
    serial = re.match(r"issued ([0-9a-f]+) for demo.hypermesh 2001:db8::d with the four "
                      r"proofs; block \d+ signed by 1 of 1 validator\(s\), 1/1 power "
                      r"\(verified\)$", issued)
    assert serial, issued
    assert re.match(r"CT: SCT verified; entry 0/\d+ included in the signed tree head of "
                    r"size \d+ \(inclusion proof verified\)$", logged), logged
    assert resolved.endswith("demo.hypermesh AAAA 2001:db8::d; DNSSEC secure; TLSA "
                             "_443._quic matches the certificate's key"), resolved
    assert revoked.startswith(f"revoked {serial.group(1)} (superseded)")
    assert validated == f"ca.validate {serial.group(1)}: revoked"
    assert stopped == "node stopped; the temporary directory is removed"
    assert lines[-1] == "OK every step checked out"
    workspace = re.search(r"keys in (\S+)\)", started)
    assert workspace and not Path(workspace.group(1)).exists()  # nothing left behind
