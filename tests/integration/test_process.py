"""`trustchain serve` as a real process: signals, graceful shutdown, certificate
swap without restart, and the client commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import stoq
from protocol import Timeout, Unavailable
from store import create_self_signed, credential_paths

from ..helpers import CddlChecker, start_server_process
from ..softhsm import SoftHsmToken


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_graceful_shutdown(tmp_path: Path, engine: str, cddl: CddlChecker,
                                 sig: int) -> None:
    server = start_server_process(tmp_path, engine)
    try:
        client = await stoq.connect("::1", server.port, pin=server.pin, engine=engine,
                                    trace=cddl)
        events = client.subscribe("node.heartbeat", {"interval_ms": 100})
        assert (await events.__anext__()).data["seq"] == 0
        pending = [asyncio.ensure_future(client.request("node.echo", {"data": bytes(1000)}))
                   for _ in range(90)]  # under the stream limit: all sent at once
        await asyncio.sleep(0)
        server.signal(sig)
        # the subscription is ended with an "end" event, not cut off
        rest = [e async for e in events]
        assert rest and rest[-1].event == "end" and rest[-1].data == {"reason": "shutdown"}
        # every request sent before the signal is answered: ok, or unavailable if it
        # reached the server after draining began; none is lost to a dead connection
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            assert isinstance(result, dict | Unavailable), repr(result)
        assert await asyncio.get_running_loop().run_in_executor(None, server.wait) == 0
        assert "stopped" in server.read_rest()
        await client.close()
    finally:
        server.stop()


async def test_paused_server_times_out_then_recovers(tmp_path: Path, engine: str,
                                                     cddl: CddlChecker) -> None:
    server = start_server_process(tmp_path, engine)
    try:
        client = await stoq.connect("::1", server.port, pin=server.pin, engine=engine,
                                    trace=cddl)
        server.signal(signal.SIGSTOP)
        try:
            with pytest.raises(Timeout):
                await client.request("node.health", timeout=0.5)
        finally:
            server.signal(signal.SIGCONT)
        assert (await client.request("node.health"))["status"] == "ok"
        await client.close()
    finally:
        server.stop()


async def test_certificate_swapped_without_restart(tmp_path: Path, engine: str,
                                                   cddl: CddlChecker) -> None:
    server = start_server_process(tmp_path, engine)
    try:
        old = await stoq.connect("::1", server.port, pin=server.pin, engine=engine, trace=cddl)
        credential = credential_paths(tmp_path / "data")
        create_self_signed(credential, names=["localhost"], addresses=["::1"])
        new_pin = stoq.certificate_fingerprint(str(credential.certfile))
        assert new_pin != server.pin
        server.signal(signal.SIGHUP)
        for _ in range(100):
            try:
                new = await stoq.connect("::1", server.port, pin=new_pin, engine=engine,
                                         trace=cddl)
                break
            except stoq.CertificateMismatch:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the new certificate was not picked up")
        info = await new.request("node.info")
        assert info["tls_fingerprint"] == new_pin
        # the connection made before the swap is still up
        assert (await old.request("node.health"))["status"] == "ok"
        await new.close()
        await old.close()
        # a file replaced without a signal is noticed too
        create_self_signed(credential, names=["localhost"], addresses=["::1"])
        third_pin = stoq.certificate_fingerprint(str(credential.certfile))
        for _ in range(100):
            try:
                third = await stoq.connect("::1", server.port, pin=third_pin, engine=engine)
                break
            except stoq.CertificateMismatch:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the replaced certificate file was not picked up")
        await third.close()
    finally:
        server.stop()


def test_cli_health_and_info(tmp_path: Path) -> None:
    server = start_server_process(tmp_path, "qh3")
    try:
        target = f"[::1]:{server.port}"
        # without trust options, the local node's own certificate is pinned
        health = _cli("health", "--server", target, "--data-dir", str(tmp_path / "data"),
                      cwd=tmp_path)
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout)["status"] == "ok"
        info = _cli("info", "--server", target, "--pin", server.pin, cwd=tmp_path)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["tls_fingerprint"] == server.pin
        insecure = _cli("health", "--server", target, "--insecure", "--engine", "aioquic",
                        cwd=tmp_path)
        assert insecure.returncode == 0 and "not authenticated" in insecure.stderr
        wrong = _cli("health", "--server", target, "--pin", "ab" * 32, cwd=tmp_path)
        assert wrong.returncode == 3 and "does not match" in wrong.stderr
        no_trust = _cli("health", "--server", target, "--data-dir", str(tmp_path / "none"),
                        cwd=tmp_path)
        assert no_trust.returncode == 2 and "--cafile" in no_trust.stderr
    finally:
        server.stop()


def test_cli_unreachable_server(tmp_path: Path) -> None:
    result = _cli("health", "--server", "[::1]:9", "--insecure", "--timeout", "1",
                  cwd=tmp_path)
    assert result.returncode == 3 and "cannot reach" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "127.0.0.1:8443"], "IPv6"),
    (["--listen", "[::1]:99999"], "not a port"),
    (["--config", "/nonexistent.toml"], "cannot read"),
])
def test_serve_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cli("serve", "--data-dir", str(tmp_path), *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr


def test_serve_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[network]\nmax_frame_size = \"big\"\n")
    result = _cli("serve", "--config", str(cfg), "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "network.max_frame_size" in result.stderr


def test_production_mode_refuses_software_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "prod.toml"
    cfg.write_text("[ca]\nmode = \"production\"\n")
    result = _cli("serve", "--config", str(cfg), "--data-dir", str(tmp_path / "d"),
                  "--listen", "[::1]:0", cwd=tmp_path)
    assert result.returncode == 2 and "PKCS#11" in result.stderr


def test_production_mode_needs_initialised_data_dir(tmp_path: Path,
                                                    softhsm_token: SoftHsmToken) -> None:
    cfg = tmp_path / "prod.toml"
    cfg.write_text(f"""[ca]\nmode = "production"\n[ca.hsm]\nprovider = "softhsm2"
token_label = "{softhsm_token.token_label}"\n""")
    env = {**os.environ, "TRUSTCHAIN_HSM_PIN": softhsm_token.pin}
    result = subprocess.run([sys.executable, "-m", "trustchain", "serve", "--config", str(cfg),
                             "--data-dir", str(tmp_path / "d"), "--listen", "[::1]:0"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60, env=env)
    assert result.returncode == 2 and "trustchain init" in result.stderr
    wrong = subprocess.run([sys.executable, "-m", "trustchain", "serve", "--config", str(cfg),
                            "--data-dir", str(tmp_path / "d"), "--listen", "[::1]:0"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60,
                           env={**env, "TRUSTCHAIN_HSM_PIN": "wrong-pin"})
    assert wrong.returncode == 2 and "PIN incorrect" in wrong.stderr
    assert "wrong-pin" not in wrong.stderr


def test_unknown_config_keys_are_logged(tmp_path: Path) -> None:
    server = start_server_process(tmp_path, "qh3", "[network]\nturbo = true")
    try:
        server.stop()
        assert server.proc.stderr is not None
        assert "network.turbo" in server.proc.stderr.read()
    finally:
        server.stop()


def test_port_in_use(tmp_path: Path) -> None:
    server = start_server_process(tmp_path / "a", "qh3") if (tmp_path / "a").mkdir() is None \
        else None
    assert server is not None
    try:
        result = _cli("serve", "--data-dir", str(tmp_path / "b"), "--listen",
                      f"[::1]:{server.port}", cwd=tmp_path)
        assert result.returncode == 2 and "cannot listen" in result.stderr
    finally:
        server.stop()


def test_pid_printed(tmp_path: Path) -> None:
    server = start_server_process(tmp_path, "qh3")
    try:
        assert f"pid {server.proc.pid}" in server.lines[0]
        assert os.path.exists(tmp_path / "data" / "tls" / "server.pem")
        # the keys that change nothing are named as such at start
        (line,) = [ln for ln in server.lines if ln.startswith("informational settings")]
        assert 'ca.hsm.cluster_id = ""' in line and "ca.hsm.backup_enabled = false" in line
        assert 'dns.server_id = "trustchain-dns-development"' in line
        assert 'api.server_id = "trustchain-api-development"' in line
        assert "consensus.byzantine_tolerance = 0.33" in line
    finally:
        server.stop()


def test_structured_json_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "trustchain.log"
    extra = f"[logging]\nlevel = \"info\"\nformat = \"json\"\n[logging.output]\ntype = \"file\"\n" \
            f"path = \"{log_file}\"\n[network]\nturbo = 1"
    server = start_server_process(tmp_path, "qh3", extra)
    server.stop()
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert entries, "nothing was logged"
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
    assert any(e["level"] == "warning" and "network.turbo" in e["message"] for e in entries)
    assert any(e["logger"] == "trustchain.ca" and "renewed" in e["message"] for e in entries)
