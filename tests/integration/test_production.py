"""End to end, as an operator runs it: production mode with the keys in a real
SoftHSM2 token, `trustchain init`, `trustchain serve`, and the client commands;
every certificate checked with openssl and pkilint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from store import open_keystore

from ..helpers import start_server_process
from ..softhsm import SoftHsmToken
from .test_ca import openssl_verify, pkilint


def _run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_production_certificate_issuance(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    data = tmp_path / "data"
    extra = f"""
[ca]
mode = "production"
[ca.hsm]
provider = "softhsm2"
token_label = "{softhsm_token.token_label}"
"""
    config_file = tmp_path / "config.toml"
    from ..helpers import config_text
    config_file.write_text(config_text("qh3", extra))
    env = {**os.environ, "TRUSTCHAIN_HSM_PIN": softhsm_token.pin}

    # init: root and intermediate keys generated inside the token
    init = _run("init", "--config", str(config_file), "--data-dir", str(data), cwd=tmp_path,
                env=env)
    assert init.returncode == 0, init.stderr
    assert "initialised a new CA" in init.stdout and "pkcs11 keystore" in init.stdout
    again = _run("init", "--config", str(config_file), "--data-dir", str(data), cwd=tmp_path,
                 env=env)
    assert again.returncode == 0 and "already initialised" in again.stdout
    root = data / "root.pem"
    assert root.is_file()
    assert not (data / "keys").exists()  # no key material on disk in production
    keystore = open_keystore(provider="softhsm2", data_dir=data,
                             module_path=softhsm_token.module_path,
                             token_label=softhsm_token.token_label, pin=softhsm_token.pin)
    assert {"root", "intermediate-1", "audit"} <= set(keystore.names())
    keystore.close()

    os.environ["TRUSTCHAIN_HSM_PIN"] = softhsm_token.pin
    try:
        server = start_server_process(tmp_path, "qh3", extra, data_dir=data)
    finally:
        del os.environ["TRUSTCHAIN_HSM_PIN"]
    try:
        target = ["--server", f"[::1]:{server.port}", "--cafile", str(root)]
        issued = _run("issue", "www.hypermesh", "api.trust", "--ipv6", "2001:db8::1",
                      "--key", str(tmp_path / "client.key"), "--out", str(tmp_path / "out"),
                      *target, cwd=tmp_path, env=env)
        assert issued.returncode == 0, issued.stderr
        serial = re.search(r"serial ([0-9a-f]{32})", issued.stdout).group(1)  # type: ignore[union-attr]
        cert = tmp_path / "out" / "cert.pem"
        chain = tmp_path / "out" / "chain.pem"
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert 86400 <= lifetime.total_seconds() <= 86400 + 600  # 24-hour certificates
        assert len(x509.load_pem_x509_certificates(chain.read_bytes())) == 2  # + root
        verified = openssl_verify(root, chain, cert)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        linted = pkilint(cert)
        assert linted.returncode == 0, linted.stdout

        offline = _run("verify", str(cert), "--cafile", str(root), cwd=tmp_path, env=env)
        assert offline.returncode == 0 and "OK" in offline.stdout, offline.stdout

        status = _run("validate", serial, *target, cwd=tmp_path, env=env)
        assert status.returncode == 0 and f"serial {serial}: valid" in status.stdout

        health = _run("health", *target, cwd=tmp_path, env=env)
        assert json.loads(health.stdout)["status"] == "ok"

        revoked = _run("revoke", serial, "--key", str(tmp_path / "client.key"), "--reason",
                       "superseded", *target, cwd=tmp_path, env=env)
        assert revoked.returncode == 0, revoked.stderr
        status = _run("validate", serial, *target, cwd=tmp_path, env=env)
        assert status.returncode == 1 and "revoked" in status.stdout

        rotation = _run("rotation-status", *target, cwd=tmp_path, env=env)
        assert rotation.returncode == 0 and "* intermediate-1" in rotation.stdout
    finally:
        server.stop()

    audit = _run("audit", "verify", "--config", str(config_file), "--data-dir", str(data),
                 cwd=tmp_path, env=env)
    assert audit.returncode == 0 and audit.stdout.strip().endswith("OK"), audit.stdout
    log = (data / "audit" / "audit.log").read_text()
    for kind in ("ca.init", "key.generated", "ca.root-created", "ca.issued", "ca.revoked"):
        assert f'"{kind}"' in log
    assert softhsm_token.pin not in log
