"""The certificate authority over real QUIC: issuance checked with openssl and pkilint,
bad CSRs, naming policy, validation, revocation, chain."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import stoq
from handlers.ca import revocation_statement
from protocol import InvalidRequest, NotFound, Unauthorized
from store import verify_log

from ..helpers import CddlChecker, Requester, RunningNode, running_node

ENGINE = "qh3"  # CA behaviour does not depend on the engine; the transport tests cover both


def make_csr(key: Any, names: list[str] = (), ips: list[str] = (),  # type: ignore[assignment]
             san: bool = True) -> bytes:
    general: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    general += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def sign(key: Any, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return bytes(key.sign(data, ec.ECDSA(hashes.SHA256())))


def write_pems(directory: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    def pem(der: bytes) -> bytes:
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    cert = directory / "cert.pem"
    chain = directory / "chain.pem"
    cert.write_bytes(pem(result["certificate"]))
    chain.write_bytes(b"".join(pem(d) for d in result["chain"][:-1]))
    return cert, chain


def openssl_verify(root: Path, chain: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(root),
                           "-untrusted", str(chain), str(cert)],
                          capture_output=True, text=True, timeout=30)


def pkilint(cert: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("lint_pkix_cert")
    assert tool is not None, "pkilint is a test dependency"
    return subprocess.run([tool, "lint", "-s", "WARNING", str(cert)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("key_type", ["p256", "p384", "ed25519"])
async def test_issue_verifies_with_openssl_and_pkilint(tmp_path: Path, cddl: CddlChecker,
                                                       key_type: str,
                                                       prover: stoq.Prover) -> None:
    key = {"p256": p256, "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
           "ed25519": ed25519.Ed25519PrivateKey.generate}[key_type]()
    async with running_node(tmp_path / "node", ENGINE, checker=cddl) as node, \
            await node.client(pin=None, cafile=str(tmp_path / "node" / "root.pem")) as client:
        before = time.time()
        result = await Requester(client, prover).issue(
            make_csr(key, ["www.hypermesh", "api.trust"], ["2001:db8::7"]))
        assert result["names"] == ["www.hypermesh", "api.trust", "2001:db8::7"]
        assert result["admission"] == "consensus"
        assert len(result["block_hash"]) == 32 and result["block_height"] >= 1
        assert len(result["signatures"]) == 1
        assert len(result["serial"]) == 32 and result["serial"] == result["serial"].lower()
        lifetime = result["not_after"] - result["not_before"]
        assert 86400 <= lifetime <= 86400 + 600  # 24 hours plus the back-dating
        assert result["not_before"] <= before
        assert result["renew_after"] == result["not_before"] + lifetime * 2 // 3
        cert_path, chain_path = write_pems(tmp_path, result)
        root = tmp_path / "node" / "root.pem"
        verified = openssl_verify(root, chain_path, cert_path)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        cert = x509.load_der_x509_certificate(result["certificate"])
        assert cert.serial_number == int(result["serial"], 16)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.ExtendedKeyUsageOID.SERVER_AUTH in eku
        assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        linted = pkilint(cert_path)
        assert linted.returncode == 0, linted.stdout + linted.stderr


async def test_hierarchy_passes_pkilint(tmp_path: Path) -> None:
    async with running_node(tmp_path, ENGINE) as node, \
            await node.client() as client:
        chain = await client.request("ca.chain")
        assert chain["chain"][-1] == chain["root"]
        for i, der in enumerate([chain["root"], *chain["intermediates"]]):
            path = tmp_path / f"ca{i}.pem"
            path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(
                serialization.Encoding.PEM))
            linted = pkilint(path)
            # pkilint checks dNSName syntax with `validators.domain`, which wants two
            # labels; the TrustChain domains are single-label names, valid in RFC 1034
            # and in RFC 5280 name constraints. That is its only finding.
            findings = [line for line in linted.stdout.splitlines() if "(" in line]
            assert all("pkix.invalid_domain_name_syntax (ERROR)" in f and "nameConstraints"
                       in linted.stdout for f in findings), linted.stdout
            assert linted.returncode == len(findings) == 4, linted.stdout
        root = x509.load_der_x509_certificate(chain["root"])
        constraints = root.extensions.get_extension_for_class(x509.NameConstraints)
        assert constraints.critical
        assert {g.value for g in constraints.value.permitted_subtrees
                if isinstance(g, x509.DNSName)} == {"hypermesh", "caesar", "trust", "assets"}


async def test_name_constraints_enforced_by_openssl(tmp_path: Path) -> None:
    """A leaf outside the TrustChain domains, signed by the real intermediate key
    (bypassing our policy), fails openssl's check: the constraints are in force."""
    async with running_node(tmp_path, ENGINE) as node:
        hierarchy = node.node.services.hierarchy
        assert hierarchy is not None and hierarchy.issuer is not None
        key = p256()
        now = time.time()
        import datetime
        bad = (x509.CertificateBuilder()
               .subject_name(x509.Name([]))
               .issuer_name(hierarchy.issuer.certificate.subject)
               .public_key(key.public_key()).serial_number(12345)
               .not_valid_before(datetime.datetime.fromtimestamp(now - 60, datetime.UTC))
               .not_valid_after(datetime.datetime.fromtimestamp(now + 3600, datetime.UTC))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]),
                              critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   hierarchy.issuer.signer.public_key()), critical=False)
               .sign(hierarchy.issuer.signer.private_key(), hashes.SHA256()))
        cert = tmp_path / "bad.pem"
        cert.write_bytes(bad.public_bytes(serialization.Encoding.PEM))
        chain = tmp_path / "inter.pem"
        chain.write_bytes(hierarchy.issuer.certificate.public_bytes(serialization.Encoding.PEM))
        verified = openssl_verify(tmp_path / "root.pem", chain, cert)
        assert verified.returncode != 0
        assert "permitted subtree violation" in verified.stdout + verified.stderr


def _rsa_csr() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return make_csr(key, ["www.hypermesh"])


def _bad_signature_csr() -> bytes:
    der = bytearray(make_csr(p256(), ["www.hypermesh"]))
    der[-5] ^= 0x01  # inside the signature value
    return bytes(der)


BAD_CSRS: list[tuple[str, Any, str]] = [
    ("garbage bytes", lambda: b"\x30\x03\x02\x01\x00garbage", "not a DER PKCS#10"),
    ("signature does not match", _bad_signature_csr, "signature does not verify"),
    ("IPv4 address", lambda: make_csr(p256(), ["www.hypermesh"], ["192.0.2.1"]), "IPv4"),
    ("v4-mapped address", lambda: make_csr(p256(), [], ["::ffff:192.0.2.1"]), "IPv4-mapped"),
    ("outside the domains", lambda: make_csr(p256(), ["www.example.com"]), "outside"),
    ("domain suffix trick", lambda: make_csr(p256(), ["www.nottrust"]), "outside"),
    ("wildcard", lambda: make_csr(p256(), ["*.hypermesh"]), "wildcard"),
    ("bad label", lambda: make_csr(p256(), ["-x.trust"]), "not a valid DNS name"),
    ("RSA key", _rsa_csr, "RSA keys are not accepted"),
    ("P-521 key", lambda: make_csr(ec.generate_private_key(ec.SECP521R1()), ["a.trust"]),
     "curve"),
    ("no subjectAltName", lambda: make_csr(p256(), san=False), "no subjectAltName"),
    ("empty subjectAltName", lambda: make_csr(p256(), []), "empty"),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_CSRS, ids=[c[0] for c in BAD_CSRS])
async def test_bad_csr(tmp_path: Path, cddl: CddlChecker, name: str, make: Any,
                       message: str) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        assert node.node.ca.state is not None
        stored = node.node.ca.state.count()
        with pytest.raises(InvalidRequest) as info:
            await client.request("ca.issue", {"csr": make()})
        assert message in info.value.message
        assert info.value.details["field"] == "csr"
        assert node.node.ca.state.count() == stored
        assert (await client.request("node.health"))["status"] == "ok"


async def test_oversized_csr(tmp_path: Path, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        with pytest.raises(InvalidRequest) as info:
            await client.request("ca.issue", {"csr": b"\x30" * 20_000})
        assert info.value.details["field"] == "csr"


async def test_name_held_by_another_key(tmp_path: Path, cddl: CddlChecker,
                                        prover: stoq.Prover) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        requester = Requester(client, prover)
        owner = p256()
        first = await requester.issue(make_csr(owner, ["svc.caesar"]))
        with pytest.raises(Unauthorized) as info:
            await client.request("ca.issue", {"csr": make_csr(p256(), ["svc.caesar"])})
        assert info.value.details["serial"] == first["serial"]
        # the holder renews freely
        renewed = await requester.issue(make_csr(owner, ["svc.caesar"]))
        assert renewed["serial"] != first["serial"]
        # concurrent requests by two keys for a fresh name: exactly one wins
        results = await asyncio.gather(
            *(requester.issue(make_csr(p256(), ["race.assets"])) for _ in range(6)),
            return_exceptions=True)
        assert sum(isinstance(r, dict) for r in results) == 1
        assert all(isinstance(r, Unauthorized) for r in results if not isinstance(r, dict))


async def _revoke_args(client: Any, key: Any, serial: str, reason: str = "key_compromise",
                       at: int | None = None) -> dict[str, Any]:
    at = int(time.time()) if at is None else at
    return {"serial": serial, "reason": reason, "time": at,
            "signature": sign(key, revocation_statement(serial, reason, at))}


async def test_validate_and_revoke(tmp_path: Path, cddl: CddlChecker,
                                   prover: stoq.Prover) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        requester = Requester(client, prover)
        key = ed25519.Ed25519PrivateKey.generate()
        issued = await requester.issue(make_csr(key, ["db.trust"]))
        serial = issued["serial"]
        valid = await client.request("ca.validate", {"serial": serial.upper()})
        assert valid["status"] == "valid" and valid["fingerprint"] == issued["fingerprint"]
        assert valid["names"] == ["db.trust"]
        assert (await client.request("ca.validate", {"serial": "abc"}))["status"] == "unknown"
        with pytest.raises(InvalidRequest):
            await client.request("ca.validate", {"serial": "not-hex"})

        # someone without the key cannot revoke
        with pytest.raises(Unauthorized):
            await client.request("ca.revoke", await _revoke_args(client, p256(), serial))
        # a stale statement is refused even with the right key
        with pytest.raises(Unauthorized, match="time"):
            await client.request("ca.revoke", await _revoke_args(
                client, key, serial, at=int(time.time()) - 3600))
        # a statement for another reason does not verify
        args = await _revoke_args(client, key, serial)
        args["reason"] = "superseded"
        with pytest.raises(Unauthorized):
            await client.request("ca.revoke", args)
        assert (await client.request("ca.validate", {"serial": serial}))["status"] == "valid"
        with pytest.raises(NotFound):
            await client.request("ca.revoke", await _revoke_args(client, key, "1234"))

        revoked = await requester.revoke(await _revoke_args(client, key, serial))
        assert revoked["already_revoked"] is False and revoked["reason"] == "key_compromise"
        status = await client.request("ca.validate", {"serial": serial})
        assert status["status"] == "revoked" and status["reason"] == "key_compromise"
        again = await requester.revoke(await _revoke_args(client, key, serial))
        assert again["already_revoked"] is True
        # revocation frees the name for another key
        await requester.issue(make_csr(p256(), ["db.trust"]))


async def test_admin_revocation(tmp_path: Path, cddl: CddlChecker,
                                prover: stoq.Prover) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        requester = Requester(client, prover)
        hierarchy = node.node.services.hierarchy
        assert hierarchy is not None
        admin_dir = hierarchy.ensure_admin().directory
        admin_key = serialization.load_pem_private_key(
            (admin_dir / "admin.key").read_bytes(), None)
        admin_cert = x509.load_pem_x509_certificate((admin_dir / "admin.pem").read_bytes())
        issued = await requester.issue(make_csr(p256(), ["x.assets"]))
        args = await _revoke_args(client, admin_key, issued["serial"], "privilege_withdrawn")
        # the admin certificate must accompany an admin signature
        with pytest.raises(Unauthorized):
            await client.request("ca.revoke", args)
        args["admin_certificate"] = admin_cert.public_bytes(serialization.Encoding.DER)
        assert (await requester.revoke(args))["already_revoked"] is False
        # a certificate that is not an admin's is refused as admin_certificate
        other = await requester.issue(make_csr(p256(), ["y.assets"]))
        forged = await _revoke_args(client, admin_key, other["serial"])
        forged["admin_certificate"] = other["certificate"]
        with pytest.raises(Unauthorized, match="administrator"):
            await client.request("ca.revoke", forged)


async def test_node_certificate_is_ca_issued(tmp_path: Path, cddl: CddlChecker) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node:
        # clients can verify the node against root.pem, by its IPv6 address
        async with await node.client(pin=None, cafile=str(tmp_path / "root.pem")) as client:
            status = await client.request("ca.rotation-status")
            assert status["server_certificate"]["serial"]
            assert [i["active"] for i in status["intermediates"]] == [True]
    # its subject is not empty (GnuTLS clients refuse that): with no DNS name, O= the CA
    leaf = x509.load_pem_x509_certificates((tmp_path / "tls" / "server.pem").read_bytes())[0]
    assert leaf.subject.rfc4514_string() == "O=trustchain-ca-development"
    assert format(leaf.serial_number, "x") == status["server_certificate"]["serial"]
    path = tmp_path / "node.pem"
    path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    linted = pkilint(path)
    assert linted.returncode == 0, linted.stdout + linted.stderr


async def test_every_operation_is_audited(tmp_path: Path, cddl: CddlChecker,
                                          prover: stoq.Prover) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        await Requester(client, prover).issue(make_csr(p256(), ["a.hypermesh"]))
        with pytest.raises(InvalidRequest):
            await client.request("ca.issue", {"csr": b"junk"})
    log = (tmp_path / "audit" / "audit.log").read_text()
    for kind in ("node.started", "key.generated", "ca.root-created", "ca.intermediate-rotated",
                 "ca.issued", "ca.issue-rejected", "node.stopped"):
        assert f'"{kind}"' in log, kind


async def test_the_audit_tail_is_signed_within_a_second_and_at_stop(tmp_path: Path) -> None:
    """audit.checkpoint_interval (1 s by default): a running node signs the records of its
    operations within about a second; a stopped one leaves no unsigned record."""
    log = tmp_path / "audit" / "audit.log"
    async with running_node(tmp_path, ENGINE) as node, await node.client() as client:
        for _ in range(2):
            for _ in range(5):  # five refused requests: five records
                with pytest.raises(InvalidRequest):
                    await client.request("ca.issue", {"csr": b"junk"})
            written = time.monotonic()
            before = verify_log(log)
            assert before.unsigned_tail >= 5 and before.ok
            while True:
                report = verify_log(log)
                if report.unsigned_tail == 0 or time.monotonic() - written > 5:
                    break
                await asyncio.sleep(0.05)
            waited = time.monotonic() - written
            assert report.unsigned_tail == 0 and report.ok, (waited, report)
            assert waited < 2.0, waited  # the interval is 1 s
            assert report.last_checkpoint_seq is not None
            assert report.last_checkpoint_seq > (before.last_seq or 0)
    stopped = verify_log(log)
    assert stopped.ok and stopped.unsigned_tail == 0 and stopped.unsigned_range() is None
    assert '"node.stopped"' in log.read_text()
    assert log.read_text().splitlines()[-1].find('"kind":"checkpoint"') > 0


def _node_of(running: RunningNode) -> Any:
    return running.node


async def test_rekeyed_renewal_moves_the_names(tmp_path: Path, cddl: CddlChecker,
                                               prover: stoq.Prover) -> None:
    from protocol import renewal_statement
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client, await node.client() as watcher:
        requester = Requester(client, prover)
        watch = watcher.subscribe("fp.watch", {"names": ["moving.trust"],
                                               "heartbeat_ms": 200})
        assert (await watch.__anext__()).event == "watching"
        old_key = p256()
        old = await requester.issue(make_csr(old_key, ["moving.trust"]))
        assert await _issuance_change(watch) == ("issued", old["fingerprint"], None)
        new_key = p256()
        csr = make_csr(new_key, ["moving.trust"])
        with pytest.raises(Unauthorized):  # a new key alone may not take the name
            await client.request("ca.issue", {"csr": csr})
        forged = {"csr": csr, "renews": old["serial"],
                  "renewal_signature": sign(p256(), renewal_statement(old["serial"], csr))}
        with pytest.raises(Unauthorized, match="renewal_signature"):
            await client.request("ca.issue", forged)
        other_csr = make_csr(new_key, ["moving.trust", "extra.trust"])
        replay = {"csr": other_csr, "renews": old["serial"],  # signature for another CSR
                  "renewal_signature": sign(old_key, renewal_statement(old["serial"], csr))}
        with pytest.raises(Unauthorized):
            await client.request("ca.issue", replay)
        renewed = await requester.issue(
            csr, renews=old["serial"],
            renewal_signature=sign(old_key, renewal_statement(old["serial"], csr)))
        assert renewed["names"] == ["moving.trust"]
        # fp.watch: the new key's certificate replaces the old key's
        assert await _issuance_change(watch) == ("rotated", renewed["fingerprint"],
                                                 old["fingerprint"])
        await watch.aclose()
        with pytest.raises(InvalidRequest):
            await client.request("ca.issue", {"csr": csr, "renews": old["serial"]})


async def _issuance_change(watch: Any) -> tuple[str, str, str | None]:
    """The next issued/rotated change of an fp.watch stream: (change, fingerprint,
    previous)."""
    while True:
        event = await asyncio.wait_for(watch.__anext__(), 10)
        if event.event == "change" and event.data["change"] in ("issued", "rotated"):
            return (event.data["change"], event.data["fingerprint"],
                    event.data.get("previous"))


async def test_client_auto_renewal_with_injected_clock(tmp_path: Path, cddl: CddlChecker,
                                                       prover: stoq.Prover) -> None:
    import random

    async with running_node(tmp_path / "node", ENGINE, checker=cddl) as node, \
            await node.client() as client:
        await prover.ensure_stake(client)
        now = [time.time()]
        slept: list[float] = []

        async def sleep(seconds: float) -> None:  # time passes only when we say so
            slept.append(seconds)
            now[0] += seconds

        renewer = stoq.CertificateRenewer(client, names=["auto.caesar"],
                                          addresses=["2001:db8::42"],
                                          directory=tmp_path / "creds", clock=lambda: now[0],
                                          sleep=sleep, rng=random.Random(7),
                                          proofs=lambda csr: prover.for_issue(client, csr))
        first = await renewer.renew()
        due = renewer.next_renewal()
        lifetime = first["not_after"] - first["not_before"]
        assert first["not_before"] + lifetime * (2 / 3 - 0.05) <= due
        assert due <= first["renew_after"]
        key_before = (tmp_path / "creds" / "key.pem").read_bytes()
        started = now[0]
        await renewer.run(iterations=1)
        assert slept == [pytest.approx(due - started)]
        assert renewer.renewals == 2
        assert renewer.current is not None and renewer.current["serial"] != first["serial"]
        assert (tmp_path / "creds" / "key.pem").read_bytes() != key_before  # re-keyed
        verified = openssl_verify(tmp_path / "node" / "root.pem", tmp_path / "creds" / "chain.pem",
                                  tmp_path / "creds" / "cert.pem")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # the CA's hint wins when it is earlier than 2/3 of the lifetime
        renewer.current = {**renewer.current, "renew_after": renewer.current["not_before"] + 10}
        assert renewer.next_renewal() == renewer.current["not_before"] + 10
