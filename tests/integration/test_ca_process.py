"""The CA as a process: nothing acknowledged is lost on SIGKILL; the CLI flow in
development mode; `trustchain audit verify` catches tampering."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from store import AuditLog

from ..helpers import Requester, start_server_process
from .test_ca import make_csr


async def test_sigkill_loses_no_acknowledged_certificate(tmp_path: Path,
                                                         prover: stoq.Prover) -> None:
    server = start_server_process(tmp_path, "qh3")
    received: dict[str, str] = {}  # serial -> fingerprint, for every answer we got
    try:
        client = await stoq.connect("::1", server.port, pin=server.pin, timeout=5)
        requester = Requester(client, prover)
        await requester.issue(make_csr(ec.generate_private_key(ec.SECP256R1()), ["w.assets"]))
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(16)]
        stop = time.monotonic() + 1.5
        counter = 0

        async def worker(w: int) -> None:
            nonlocal counter
            while time.monotonic() < stop + 10:
                counter += 1
                csr = make_csr(keys[w], [f"w{w}-{counter}.assets"])
                try:
                    result = await requester.issue(csr)
                except (stoq.ConnectionFailed, Exception):
                    return
                received[result["serial"]] = result["fingerprint"]

        workers = [asyncio.ensure_future(worker(w)) for w in range(16)]
        await asyncio.sleep(1.5)
        os.kill(server.proc.pid, signal.SIGKILL)  # mid-stream, no warning
        await asyncio.wait(workers, timeout=15)
        await client.close()
    finally:
        server.stop()
    assert len(received) > 50, len(received)

    restarted = start_server_process(tmp_path, "qh3")
    try:
        client = await stoq.connect("::1", restarted.port, pin=restarted.pin, timeout=10)
        for serial, fingerprint in received.items():
            status = await client.request("ca.validate", {"serial": serial})
            assert status["status"] == "valid", (serial, status)
            assert status["fingerprint"] == fingerprint
        # serials never repeat: new ones are distinct from everything before
        requester = Requester(client, prover)
        fresh = {(await requester.issue(make_csr(
            ec.generate_private_key(ec.SECP256R1()), [f"after{i}.assets"])))["serial"]
            for i in range(20)}
        assert len(fresh) == 20 and not fresh & set(received)
        await client.close()
    finally:
        restarted.stop()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


def test_development_cli_flow_and_audit_tampering(tmp_path: Path) -> None:
    server = start_server_process(tmp_path, "qh3")
    data = tmp_path / "data"
    try:
        target = ["--server", f"[::1]:{server.port}", "--data-dir", str(data)]
        issued = _cli("issue", "svc.trust", "--key", str(tmp_path / "k.pem"), "--key-type",
                      "ed25519", "--out", str(tmp_path / "out"), *target, cwd=tmp_path)
        assert issued.returncode == 0, issued.stderr
        assert "created a new ed25519 key" in issued.stderr
        # out of the box: a requester key, its plot and faucet stake are made on the way
        assert "development faucet" in issued.stderr and "k=18 plot" in issued.stderr
        assert list((tmp_path / "trustchain-proofs").glob("plot-k18-*.plot"))
        # the private keys it made are the user's alone
        assert stat.S_IMODE((tmp_path / "trustchain-proofs").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "trustchain-proofs" / "requester.key").stat().st_mode
                            ) == 0o600
        assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
        serial = issued.stdout.split()[1]
        cert = str(tmp_path / "out" / "cert.pem")
        ok = _cli("verify", cert, "--online", *target, cwd=tmp_path)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "OK SCT of log" in ok.stdout and "says valid (ca.validate)" in ok.stdout
        assert ok.stdout.splitlines()[-1] == "OK checked: chain, SCT, revocation", ok.stdout
        # offline, revocation is not checked: not OK unless the user accepts that by name
        offline = _cli("verify", cert, "--data-dir", str(data), cwd=tmp_path)
        assert offline.returncode == 1, offline.stdout
        assert "UNCHECKED revocation" in offline.stdout
        assert "NOT VERIFIED: not checked: revocation" in offline.stdout
        accepted = _cli("verify", cert, "--data-dir", str(data), "--offline", cwd=tmp_path)
        assert accepted.returncode == 0, accepted.stdout
        assert accepted.stdout.splitlines()[-1] == (
            "OK checked: chain, SCT; NOT checked, as allowed: revocation")
        # without a CT log key the SCT is not checked: exit 1 unless accepted by name
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        root = ["--cafile", str(data / "root.pem")]
        no_key = _cli("verify", cert, *root, "--offline", cwd=elsewhere)
        assert no_key.returncode == 1 and "UNCHECKED SCT: no CT log key" in no_key.stdout
        assert "--allow-unchecked-sct accepts SCT unchecked" in no_key.stdout, no_key.stdout
        allowed = _cli("verify", cert, *root, "--offline", "--allow-unchecked-sct",
                       cwd=elsewhere)
        assert allowed.returncode == 0, allowed.stdout
        assert "NOT checked, as allowed: SCT, revocation" in allowed.stdout
        bad_name = _cli("issue", "svc.example.com", "--key", str(tmp_path / "k.pem"), "--out",
                        str(tmp_path / "o2"), *target, cwd=tmp_path)
        assert bad_name.returncode == 1 and "invalid_request" in bad_name.stderr
        ipv4 = _cli("issue", "x.trust", "--ipv6", "192.0.2.1", "--key", str(tmp_path / "k.pem"),
                    "--out", str(tmp_path / "o3"), *target, cwd=tmp_path)
        assert ipv4.returncode == 2 and "IPv6" in ipv4.stderr
        # one writer per data directory: init refuses while the node runs
        busy = _cli("init", "--data-dir", str(data), cwd=tmp_path)
        assert busy.returncode == 2 and "another process" in busy.stderr, busy.stderr
        assert (data / "admin" / "admin.pem").is_file()  # development mode made one
        revoked = _cli("revoke", serial, "--admin", str(data / "admin"), *target, cwd=tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        status = _cli("validate", serial, *target, cwd=tmp_path)
        assert "revoked" in status.stdout
        # a revoked certificate is not OK, whatever its chain and SCT
        after = _cli("verify", cert, "--online", *target, cwd=tmp_path)
        assert after.returncode == 1 and "FAIL revocation:" in after.stdout, after.stdout
        assert "says revoked at" in after.stdout and "NOT OK" in after.stdout
        # a node that cannot be reached: one line, status 3
        gone = _cli("verify", cert, "--online", "--server", "[::1]:1", "--data-dir",
                    str(data), "--timeout", "2", cwd=tmp_path)
        assert gone.returncode == 3 and gone.stderr.startswith("error: cannot reach")
    finally:
        server.stop()

    good = _cli("audit", "verify", "--data-dir", str(data), cwd=tmp_path)
    assert good.returncode == 0 and "OK" in good.stdout, good.stdout
    assert "unsigned tail: none" in good.stdout, good.stdout  # signed at the stop
    log = data / "audit" / "audit.log"
    with AuditLog(log) as unsigned:  # a record written without the audit key
        seq = unsigned.append("test.unsigned", {}).seq
    tail = _cli("audit", "verify", "--data-dir", str(data), cwd=tmp_path)
    assert tail.returncode == 0 and f"last signed checkpoint: record {seq - 1}" in tail.stdout
    assert f"unsigned tail: 1 (no checkpoint covers record {seq} yet" in tail.stdout, tail.stdout
    lines = log.read_text().splitlines(keepends=True)
    issued_line = next(i for i, line in enumerate(lines)
                       if '"ca.issued"' in line and "svc.trust" in line)
    lines[issued_line] = lines[issued_line].replace("svc.trust", "evil.trust")
    log.write_text("".join(lines))
    tampered = _cli("audit", "verify", "--data-dir", str(data), cwd=tmp_path)
    assert tampered.returncode == 1 and "TAMPERED" in tampered.stdout
    assert "hash mismatch" in tampered.stdout
