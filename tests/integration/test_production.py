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
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import stoq
from store import open_keystore

from ..cluster import running_cluster
from ..helpers import start_server_process
from ..softhsm import SoftHsmToken
from .test_ca import openssl_verify, pkilint


def _run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_production_certificate_issuance(tmp_path: Path, empty_softhsm_token: SoftHsmToken,
                                         plotted: Path) -> None:
    softhsm_token = empty_softhsm_token  # this test checks the keys it creates itself
    data = tmp_path / "data"
    # a production node has no faucet: the requester's stake is in the genesis ledger
    requester = stoq.Prover.open(plotted)
    extra = f"""
[ca]
mode = "production"
[ca.hsm]
provider = "softhsm2"
token_label = "{softhsm_token.token_label}"
[consensus.genesis]
"{requester.key_id}" = 1000
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
        proofs = ["--proofs-dir", str(plotted)]
        # a key without stake is refused, and told why
        poor = _run("issue", "poor.trust", "--key", str(tmp_path / "poor.key"), "--out",
                    str(tmp_path / "poor"), "--proofs-dir", str(tmp_path / "poor-proofs"),
                    *target, cwd=tmp_path, env=env)
        assert poor.returncode == 1 and "no faucet" in poor.stderr, poor.stderr
        faucet = _run("proofs", "faucet", "--proofs-dir", str(tmp_path / "poor-proofs"),
                      *target, cwd=tmp_path, env=env)
        assert faucet.returncode == 1 and "development-only" in faucet.stderr, faucet.stderr
        status = _run("proofs", "status", *proofs, *target, cwd=tmp_path, env=env)
        assert status.returncode == 0 and f"requester key {requester.key_id}" in status.stdout
        assert "stake 1000 (minimum 1000: enough)" in status.stdout, status.stdout
        issued = _run("issue", "www.hypermesh", "api.trust", "--ipv6", "2001:db8::1",
                      "--key", str(tmp_path / "client.key"), "--out", str(tmp_path / "out"),
                      *target, *proofs, cwd=tmp_path, env=env)
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

        # offline: the chain and the SCT against the log key the node published
        log_key = data / "ct" / "0" / "log-key.pem"
        offline = _run("verify", str(cert), "--cafile", str(root), "--log-key", str(log_key),
                       "--offline", cwd=tmp_path, env=env)
        assert offline.returncode == 0, offline.stdout + offline.stderr
        assert "OK SCT of log" in offline.stdout, offline.stdout
        # online: the same, the log keys and the status from the node
        online = _run("verify", str(cert), "--cafile", str(root), "--online", "--server",
                      f"[::1]:{server.port}", cwd=tmp_path, env=env)
        assert online.returncode == 0, online.stdout + online.stderr
        assert "OK SCT of log" in online.stdout and "says valid" in online.stdout
        assert online.stdout.splitlines()[-1] == "OK checked: chain, SCT, revocation"

        status = _run("validate", serial, *target, cwd=tmp_path, env=env)
        assert status.returncode == 0 and f"serial {serial}: valid" in status.stdout

        health = _run("health", *target, cwd=tmp_path, env=env)
        assert json.loads(health.stdout)["status"] == "ok"

        revoked = _run("revoke", serial, "--key", str(tmp_path / "client.key"), "--reason",
                       "superseded", *target, *proofs, cwd=tmp_path, env=env)
        assert revoked.returncode == 0, revoked.stderr
        status = _run("validate", serial, *target, cwd=tmp_path, env=env)
        assert status.returncode == 1 and "revoked" in status.stdout
        online = _run("verify", str(cert), "--cafile", str(root), "--online", "--server",
                      f"[::1]:{server.port}", cwd=tmp_path, env=env)
        assert online.returncode == 1 and "FAIL revocation" in online.stdout, online.stdout

        rotation = _run("rotation-status", *target, cwd=tmp_path, env=env)
        assert rotation.returncode == 0 and "* intermediate-1" in rotation.stdout
    finally:
        server.stop()

    audit = _run("audit", "verify", "--config", str(config_file), "--data-dir", str(data),
                 cwd=tmp_path, env=env)
    assert audit.returncode == 0 and audit.stdout.strip().endswith("OK"), audit.stdout
    log = (data / "audit" / "audit.log").read_text()
    for kind in ("ca.init", "key.generated", "ca.root-created", "ca.issued", "ca.revoked",
                 "consensus.beacon", "consensus.stake-changed"):
        assert f'"{kind}"' in log
    assert softhsm_token.pin not in log


def test_dns_over_quic_resolution(tmp_path: Path, softhsm_token: SoftHsmToken,
                                  plotted: Path) -> None:
    """A production node (keys, DNSSEC keys included, in SoftHSM2) answers a TrustChain
    name over DNS over QUIC, IPv6 only, to dnspython with certificate verification; the
    answer validates against the DNSKEY set anchored by the exported DS, and the TLSA
    record is the SPKI digest of the certificate the CA issued for that name."""
    import hashlib

    import dns.dnssec
    import dns.message
    import dns.name
    import dns.query
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset
    from cryptography.hazmat.primitives import serialization

    from ..helpers import config_text

    data = tmp_path / "data"
    requester = stoq.Prover.open(plotted)
    extra = f"""
[node]
names = ["ns1.trust"]
[ca]
mode = "production"
[ca.hsm]
provider = "softhsm2"
token_label = "{softhsm_token.token_label}"
[consensus.genesis]
"{requester.key_id}" = 1000
"""
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_text("qh3", extra))
    env = {**os.environ, "TRUSTCHAIN_HSM_PIN": softhsm_token.pin}
    init = _run("init", "--config", str(config_file), "--data-dir", str(data), cwd=tmp_path,
                env=env)
    assert init.returncode == 0, init.stderr
    root = data / "root.pem"
    os.environ["TRUSTCHAIN_HSM_PIN"] = softhsm_token.pin
    try:
        server = start_server_process(tmp_path, "qh3", extra, data_dir=data)
    finally:
        del os.environ["TRUSTCHAIN_HSM_PIN"]
    try:
        assert any("alpn stoq/1,doq" in line for line in server.lines), server.lines
        target = ["--server", f"[::1]:{server.port}", "--cafile", str(root)]
        issued = _run("issue", "www.hypermesh", "--ipv6", "2001:db8::1", "--key",
                      str(tmp_path / "client.key"), "--out", str(tmp_path / "out"), *target,
                      "--proofs-dir", str(plotted), cwd=tmp_path, env=env)
        assert issued.returncode == 0, issued.stderr
        cert = x509.load_pem_x509_certificate((tmp_path / "out" / "cert.pem").read_bytes())
        spki = hashlib.sha256(cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()

        def doq(name: str, rdtype: str) -> dns.message.Message:
            return dns.query.quic(dns.message.make_query(name, rdtype, want_dnssec=True),
                                  "::1", port=server.port, verify=str(root),
                                  server_hostname="ns1.trust", timeout=10)

        origin = dns.name.from_text("hypermesh.")
        ds_out = _run("dns", "ds", *target, cwd=tmp_path, env=env)
        assert ds_out.returncode == 0, ds_out.stderr
        anchors = {dns.rrset.from_text(origin, 3600, "IN", "DS", line.split(" DS ", 1)[1])[0]
                   for line in ds_out.stdout.splitlines() if line.startswith("hypermesh. ")}
        keys = doq("hypermesh", "DNSKEY")
        dnskeys = keys.find_rrset(keys.answer, origin, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
        ksk = [k for k in dnskeys if dns.dnssec.make_ds(origin, k, "SHA256") in anchors]
        assert ksk, "no DNSKEY matches the exported DS"
        dns.dnssec.validate(dnskeys, keys.find_rrset(
            keys.answer, origin, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY),
            {origin: dns.rrset.from_rdata_list(origin, 3600, ksk)})

        def validated(response: dns.message.Message) -> list[str]:
            sigs = {(r.name, r.covers): r for r in response.answer
                    if r.rdtype == dns.rdatatype.RRSIG}
            out = []
            for rrset in response.answer:
                if rrset.rdtype != dns.rdatatype.RRSIG:
                    dns.dnssec.validate(rrset, sigs[(rrset.name, rrset.rdtype)],
                                        {origin: dnskeys})
                    out += [rd.to_text() for rd in rrset]
            return out

        assert validated(doq("www.hypermesh", "AAAA")) == ["2001:db8::1"]
        tlsa = doq("_443._quic.www.hypermesh", "TLSA")
        assert validated(tlsa) == [f"3 1 1 {spki.hex()}"]
        a = doq("www.hypermesh", "A")  # IPv6 only: NODATA, the SOA in authority
        assert a.answer == [] and dns.rdatatype.SOA in [r.rdtype for r in a.authority]

        query = _run("dns", "query", "www.hypermesh", "AAAA", "--doq", "--server-name",
                     "ns1.trust", *target, cwd=tmp_path, env=env)
        assert query.returncode == 0, query.stderr
        assert "2001:db8::1" in query.stdout and "dnssec secure" in query.stdout
        # a compact denial (NOERROR on the wire, NSEC with NXNAME), validated: NXDOMAIN
        missing = _run("dns", "query", "missing.hypermesh", "AAAA", "--doq", "--server-name",
                       "ns1.trust", *target, cwd=tmp_path, env=env)
        assert missing.returncode == 1, missing.stdout + missing.stderr
        assert ";; rcode NXDOMAIN" in missing.stdout and "dnssec secure" in missing.stdout
        stoq_query = _run("dns", "query", "www.hypermesh", *target, cwd=tmp_path, env=env)
        assert stoq_query.returncode == 0, stoq_query.stderr
        assert "dnssec secure" in stoq_query.stdout
        assert "tlsa _443._quic.www.hypermesh.: match" in stoq_query.stdout
    finally:
        server.stop()
    keystore = open_keystore(provider="softhsm2", data_dir=data,
                             module_path=softhsm_token.module_path,
                             token_label=softhsm_token.token_label, pin=softhsm_token.pin)
    try:
        assert {"dns-ksk", "dns-zsk-1"} <= set(keystore.names())  # DNSSEC keys in the token
    finally:
        keystore.close()
    assert not list(data.glob("**/dns-*.pem"))  # and not on disk


async def test_byzantine_fault_tolerance(tmp_path: Path) -> None:
    """7 validators, 2 of them byzantine (f = 2 of n = 7, the reference's 33 % case).

    The byzantine two run the real node with equivocation switched on
    (``tests.byzantine``): every proposal and vote they sign goes honest to half
    of their peers and conflicting to the other half. The honest five must keep
    deciding, never fork, find the duplicate votes of both, commit that evidence
    and isolate both (their voting power drops to 0; 5 active validators remain).
    """
    byzantine = (1, 4)
    honest = [i for i in range(7) if i not in byzantine]
    fast = {"block_interval": '"500ms"', "timeout_propose": '"800ms"',
            "timeout_prevote": '"400ms"', "timeout_precommit": '"400ms"'}
    with running_cluster(tmp_path / "c7", 7, byzantine=byzantine, **fast) as cluster:
        offenders = {cluster.id(i) for i in byzantine}

        def committed_offenders(status: dict[str, Any]) -> set[str]:
            return {e["offender"] for e in status["evidence"]
                    if e["committed_height"] is not None}

        # The core isolates at the decision; the store marks the evidence committed
        # when it has written the block a moment later: wait for both.
        statuses = await cluster.wait_until(
            honest, lambda s: offenders <= set(s["isolated"]) & committed_offenders(s), 180,
            "both byzantine validators isolated by every honest one")
        for status in statuses.values():
            assert offenders <= committed_offenders(status)  # isolated: evidence committed
            assert {e["offender"] for e in status["evidence"]} <= offenders  # no one else
            powers = {v["id"]: v["power"] for v in status["validators"]}
            assert all(powers[o] == 0 for o in offenders)
            assert sum(1 for p in powers.values() if p > 0) == 5
        # after the isolation the honest five keep finalizing
        top = max(s["height"] for s in statuses.values())
        statuses = await cluster.wait_until(honest, lambda s: s["height"] >= top + 3, 60,
                                            "decisions go on after the isolation")
        # and never forked: identical blocks at every height on every honest node
        upto = min(s["height"] for s in statuses.values()) - 1
        chains = [await cluster.blocks(i, 1, upto) for i in honest]
        assert all(len(c) == upto for c in chains)
        assert all([b["block"] for b in c] == [b["block"] for b in chains[0]] for c in chains)
        # a decision through the isolated-free cluster still commits (faucet credit)
        key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        credited = await cluster.ask(honest[0], "consensus.faucet", {"key": key}, timeout=30)
        assert credited is not None and credited["amount"] > 0


def test_root_key_id_selects_an_operator_made_root(tmp_path: Path,
                                                   empty_softhsm_token: SoftHsmToken) -> None:
    """ca.hsm.root_key_id: `init` makes the root certificate with a key the operator made
    in the token (by CKA_ID or label), never a key of its own; a key that is not there
    stops it with one line."""
    import pkcs11
    from pkcs11.util.ec import encode_named_curve_parameters

    token_info = empty_softhsm_token
    token = pkcs11.lib(token_info.module_path).get_token(token_label=token_info.token_label)
    with token.open(rw=True, user_pin=token_info.pin) as session:  # the operator's own tool
        session.generate_keypair(
            pkcs11.KeyType.EC, id=bytes.fromhex("1234"), label="operator-root", store=True,
            mechanism=pkcs11.Mechanism.EC_KEY_PAIR_GEN,
            public_template={pkcs11.Attribute.EC_PARAMS:
                             encode_named_curve_parameters("secp256r1"),
                             pkcs11.Attribute.TOKEN: True},
            private_template={pkcs11.Attribute.TOKEN: True, pkcs11.Attribute.SENSITIVE: True,
                              pkcs11.Attribute.EXTRACTABLE: False, pkcs11.Attribute.SIGN: True})
    env = {**os.environ, "TRUSTCHAIN_HSM_PIN": token_info.pin}
    from ..helpers import config_text

    def init(name: str, root_key_id: str) -> subprocess.CompletedProcess[str]:
        config_file = tmp_path / f"{name}.toml"
        config_file.write_text(config_text("qh3", f"""
[ca]
mode = "production"
[ca.hsm]
provider = "softhsm2"
token_label = "{token_info.token_label}"
root_key_id = "{root_key_id}"
"""))
        return _run("init", "--config", str(config_file), "--data-dir", str(tmp_path / name),
                    cwd=tmp_path, env=env)

    keystore = open_keystore(provider="softhsm2", data_dir=tmp_path,
                             module_path=token_info.module_path,
                             token_label=token_info.token_label, pin=token_info.pin)
    try:
        operator = keystore.get("operator-root")
        assert operator is not None
        for name, key_id in (("by-id", "0x1234"), ("by-label", "operator-root")):
            done = init(name, key_id)
            assert done.returncode == 0, done.stderr
            root = x509.load_pem_x509_certificate((tmp_path / name / "root.pem").read_bytes())
            assert root.public_key() == operator.public_key(), name
        assert "root" not in keystore.names()  # the CA made no root key of its own
        missing = init("missing", "0x9999")
        assert missing.returncode == 2 and "Traceback" not in missing.stderr
        assert missing.stderr.startswith("error: ca.hsm.root_key_id: '0x9999' is neither"), \
            missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1
    finally:
        keystore.close()
