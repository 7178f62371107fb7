"""Four-proof admission over real QUIC on [::1]: the consensus ops, every CA operation
refused without the full set, bad proofs answered with a specific error while the
server stays up, and the node's own certificate renewed without client proofs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import stoq
from protocol import InvalidRequest, NotFound, ProofInvalid, renewal_statement
from protocol.ops.consensus import (
    beacon_statement,
    binding_statement,
    issue_digest,
    key_id,
    parse_proofs,
    work_prefix,
)
from stoq._prover import sign_binding
from store import verify_signature

from ..helpers import CddlChecker, Requester, RunningNode, running_node
from .test_ca import _revoke_args, make_csr, p256, sign

ENGINE = "qh3"  # admission does not depend on the engine; the transport tests cover both


async def _issue_args(client: stoq.AsyncClient, prover: stoq.Prover,
                      names: list[str]) -> tuple[bytes, dict[str, Any]]:
    await prover.ensure_stake(client)
    csr = make_csr(p256(), names)
    return csr, await prover.for_issue(client, csr)


def _audit(node: RunningNode) -> list[dict[str, Any]]:
    path = node.node.data_dir / "audit" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_beacon_stake_and_faucet(tmp_path: Path, cddl: CddlChecker,
                                       prover: stoq.Prover) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        beacon = await client.request("consensus.beacon")
        assert beacon["epoch"] == beacon["current_epoch"] == beacon["start"] // 3600
        assert beacon["end"] == beacon["start"] + 3600
        assert beacon["params"] == {"minimum_stake": 1000, "minimum_work_difficulty": 8,
                                    "plot_size": 18, "space_challenges": 32,
                                    "vdf_iterations": 1000, "vdf_discriminant_bits": 1024,
                                    "epoch_length": 3600}
        assert beacon["mode"] == "development" and beacon["accepted_epochs"][-1] == \
            beacon["epoch"]
        key = serialization.load_der_public_key(beacon["public_key"])
        assert verify_signature(key, beacon["signature"], beacon_statement(
            epoch=beacon["epoch"], start=beacon["start"], value=beacon["beacon"],
            previous=beacon["previous"]))
        assert await client.request("consensus.beacon", {"epoch": beacon["epoch"]}) == beacon
        with pytest.raises(NotFound, match="has not begun"):
            await client.request("consensus.beacon", {"epoch": beacon["epoch"] + 1})
        with pytest.raises(NotFound, match="no beacon"):
            await client.request("consensus.beacon", {"epoch": beacon["epoch"] - 5})

        before = await client.request("consensus.stake", {"key": prover.spki})
        assert before == {"key_id": prover.key_id, "amount": 0, "minimum": 1000,
                          "sufficient": False}
        granted = await client.request("consensus.faucet", {"key": prover.spki})
        assert granted == {"key_id": prover.key_id, "amount": 1000, "credited": 1000}
        again = await client.request("consensus.faucet", {"key": prover.spki})
        assert again["credited"] == 0 and again["amount"] == 1000
        assert (await client.request("consensus.stake", {"key": prover.spki}))["sufficient"]
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        for junk in (b"junk", rsa_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)):
            with pytest.raises(InvalidRequest) as info:
                await client.request("consensus.faucet", {"key": junk})
            assert info.value.details["field"] == "key"
    changes = [r for r in _audit(node) if r["kind"] == "consensus.stake-changed"]
    assert [(c["data"]["key"], c["data"]["after"], c["data"]["reason"]) for c in changes] == [
        (prover.key_id, 1000, "faucet")]


async def test_genesis_stake_from_config(tmp_path: Path, cddl: CddlChecker) -> None:
    holder = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    import hashlib
    key_id = hashlib.sha256(holder).hexdigest()
    extra = f'[consensus.genesis]\n"{key_id}" = 2500\n'
    async with running_node(tmp_path, ENGINE, extra, checker=cddl) as node, \
            await node.client() as client:
        stake = await client.request("consensus.stake", {"key": holder})
        assert stake["amount"] == 2500 and stake["sufficient"]
    # a restart does not credit the genesis again; the ledger is the authority
    async with running_node(tmp_path, ENGINE, extra.replace("2500", "9999"),
                            checker=cddl) as node, await node.client() as client:
        assert (await client.request("consensus.stake", {"key": holder}))["amount"] == 2500
    genesis = [r for r in _audit(node) if r["kind"] == "consensus.stake-changed"]
    assert len(genesis) == 1 and genesis[0]["data"]["reason"] == "genesis"


async def test_every_ca_operation_needs_the_full_set(tmp_path: Path, cddl: CddlChecker,
                                                     prover: stoq.Prover) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        requester = Requester(client, prover)
        owner, key = p256(), p256()
        # ca.issue: no set, and each part missing in turn
        await prover.ensure_stake(client)
        csr = make_csr(owner, ["full.trust"])
        proofs = await prover.for_issue(client, csr)
        with pytest.raises(ProofInvalid) as info:
            await client.request("ca.issue", {"csr": csr})
        assert info.value.details == {"proof": "binding", "field": "proofs"}
        owners = {"epoch": "time", "requester_key": "stake", "space": "space",
                  "time": "time", "work": "work", "binding": "binding"}
        for part, proof in owners.items():
            partial = {k: v for k, v in proofs.items() if k != part}
            with pytest.raises(ProofInvalid) as info:
                await client.request("ca.issue", {"csr": csr, "proofs": partial})
            assert info.value.details["proof"] == proof
        issued = await client.request("ca.issue", {"csr": csr, "proofs": proofs})
        assert issued["admission"] == "consensus"

        # renewal by key (renews + renewal_signature) is an issuance: the same rule
        new_csr = make_csr(key, ["full.trust"])
        renewal = {"csr": new_csr, "renews": issued["serial"], "renewal_signature": sign(
            owner, renewal_statement(issued["serial"], new_csr))}
        with pytest.raises(ProofInvalid) as info:
            await client.request("ca.issue", renewal)
        assert info.value.details["proof"] == "binding"
        renewed = await requester.issue(new_csr, renews=renewal["renews"],
                                        renewal_signature=renewal["renewal_signature"])
        assert renewed["names"] == ["full.trust"]
        # ca.revoke: holder-signed, without and with proofs
        holder = ed25519.Ed25519PrivateKey.generate()
        mine = await requester.issue(make_csr(holder, ["mine.trust"]))
        args = await _revoke_args(client, holder, mine["serial"])
        with pytest.raises(ProofInvalid) as info:
            await client.request("ca.revoke", args)
        assert info.value.details["proof"] == "binding"
        assert (await client.request("ca.validate", {"serial": mine["serial"]}))["status"] == \
            "valid"
        # proofs made for the issuance do not revoke anything
        wrong = await prover.for_issue(client, make_csr(holder, ["mine.trust"]))
        with pytest.raises(ProofInvalid) as info:
            await client.request("ca.revoke", {**args, "proofs": wrong})
        assert info.value.details["proof"] == "work"
        assert (await requester.revoke(args))["already_revoked"] is False
        # already revoked: answered from the state, proofs not looked at (spec §10.10 step 7)
        again = await client.request("ca.revoke", args)
        assert again["already_revoked"] is True and "block_height" not in again
        assert (await client.request("node.health"))["status"] == "ok"
    rejected = [r for r in _audit(node) if r["kind"] == "consensus.proofs-rejected"]
    assert {r["data"]["proof"] for r in rejected} == {"space", "stake", "work", "time",
                                                      "binding"}
    assert {r["data"]["op"] for r in rejected} == {"issue", "revoke"}
    assert all(r["data"]["reason"].startswith(r["data"]["proof"] + ": ") for r in rejected)
    issued_records = [r for r in _audit(node) if r["kind"] == "ca.issued"]
    assert {r["data"]["admission"] for r in issued_records} >= {"consensus"}


def _bad_proofs(proofs: dict[str, Any], other: dict[str, Any], prover: stoq.Prover,
                csr: bytes) -> list[tuple[str, Any, str]]:
    def at(path: str, value: Any) -> dict[str, Any]:
        changed = copy.deepcopy(proofs)
        target = changed
        parts = path.split(".")
        for part in parts[:-1]:
            target = target[part]
        target[parts[-1]] = value
        if path == "binding":
            return changed
        try:  # work and binding made again where it still parses: the bad part is judged
            parsed = parse_proofs(changed)
        except ProofInvalid:
            return changed
        if not path.startswith("work"):
            changed["work"] = {"nonce": stoq.solve_work(work_prefix(
                "issue", issue_digest(csr), key_id(parsed.requester_key), parsed.epoch), 8)}
            parsed = parse_proofs(changed)
        changed["binding"] = sign_binding(prover.key, binding_statement(
            op="issue", request=issue_digest(csr), epoch=parsed.epoch,
            space=parsed.space.digest(), time=parsed.time.digest(), nonce=parsed.nonce))
        return changed
    return [
        ("truncated space proof", at("space.proof", proofs["space"]["proof"][:100]), "space"),
        ("oversized space proof", at("space.proof", b"\0" * 200_000), "space"),
        ("k of the wrong type", at("space.k", "18"), "space"),
        ("plot id not bound to the key", at("space.plot_id", other["space"]["plot_id"]),
         "space"),
        ("VDF from another discriminant", at("time", other["time"]), "time"),
        ("VDF output of garbage", at("time.output", b"\xff" * 100), "time"),
        ("negative iterations", at("time.iterations", -1), "time"),
        ("absurd iterations", at("time.iterations", 2**64 - 1), "time"),
        ("iterations as a float", at("time.iterations", 1000.5), "time"),
        ("epoch of the wrong type", at("epoch", [1]), "time"),
        ("old epoch", at("epoch", 3), "time"),
        ("nonce as text", at("work.nonce", "00"), "work"),
        ("binding truncated", at("binding", proofs["binding"][:10]), "binding"),
        ("requester key not a key", at("requester_key", b"\x30\x00"), "stake"),
        ("proofs a list", [proofs], "binding"),
        ("proofs a string", "proofs", "binding"),
    ]


async def test_bad_proofs_get_specific_errors_and_the_server_stays_up(
        tmp_path: Path, cddl: CddlChecker, prover: stoq.Prover) -> None:
    async with running_node(tmp_path / "node", ENGINE, checker=cddl) as node, \
            await node.client() as client:
        csr, proofs = await _issue_args(client, prover, ["bad.trust"])
        other_prover = stoq.Prover.open(tmp_path / "other")  # another key, its own plot
        other_prover.ensure_plot(18)
        await other_prover.ensure_stake(client)
        other = await other_prover.for_issue(client, csr)
        for name, bad, proof in _bad_proofs(proofs, other, prover, csr):
            with pytest.raises((ProofInvalid, InvalidRequest)) as info:
                await client.request("ca.issue", {"csr": csr, "proofs": bad})
            if isinstance(info.value, InvalidRequest):  # the argument schema: not a map
                assert info.value.details["field"] == "proofs", name
                assert not isinstance(bad, dict), name
            else:
                assert info.value.details["proof"] == proof, (name, info.value.message)
                assert len(info.value.message) < 400, name
            assert (await client.request("node.health"))["status"] == "ok", name
        # another discriminant's form: named for what it is, not an internal error
        bad = dict(_bad_proofs(proofs, other, prover, csr)[4][1])
        with pytest.raises(ProofInvalid, match="not a form of this key's discriminant"):
            await client.request("ca.issue", {"csr": csr, "proofs": bad})
        # and after all of that the honest set still works, once
        assert (await client.request("ca.issue", {"csr": csr, "proofs": proofs}))["serial"]
        with pytest.raises(ProofInvalid, match="already used"):
            await client.request("ca.issue", {"csr": csr, "proofs": proofs})


async def test_replay_after_restart_is_refused(tmp_path: Path, cddl: CddlChecker,
                                               prover: stoq.Prover) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        csr, proofs = await _issue_args(client, prover, ["once.trust"])
        await client.request("ca.issue", {"csr": csr, "proofs": proofs})
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        with pytest.raises(ProofInvalid, match="already used") as info:
            await client.request("ca.issue", {"csr": csr, "proofs": proofs})
        assert info.value.details["proof"] == "work"
        # the epoch's beacon survived the restart, so the credential is still good
        fresh = await prover.for_issue(client, csr)
        assert (await client.request("ca.issue", {"csr": csr, "proofs": fresh}))["serial"]


async def test_node_certificate_needs_no_client_proofs(tmp_path: Path,
                                                       cddl: CddlChecker) -> None:
    async with running_node(tmp_path, ENGINE, checker=cddl) as node:
        assert node.node.services.rotator is not None and node.node.ca is not None
        before = node.node.ca.issued
        done = await node.node.services.rotator.renew_server_certificate()
        assert done["what"] == "server_certificate" and node.node.ca.issued == before + 1
        async with await node.client(pin=None, cafile=str(tmp_path / "root.pem")) as client:
            assert (await client.request("node.health"))["status"] == "ok"
    issued = [r["data"] for r in _audit(node) if r["kind"] == "ca.issued"]
    assert issued[-1]["serial"] == done["serial"] and issued[-1]["admission"] == "consensus"


async def test_concurrent_requesters_share_nothing_but_the_beacon(
        tmp_path: Path, cddl: CddlChecker, prover: stoq.Prover) -> None:
    """Many requests in flight from one requester: the credential is verified once."""
    import asyncio
    async with running_node(tmp_path, ENGINE, checker=cddl) as node, \
            await node.client() as client:
        requester = Requester(client, prover)
        results = await asyncio.gather(*(requester.issue(make_csr(
            ec.generate_private_key(ec.SECP256R1()), [f"c{i}.assets"])) for i in range(24)))
        assert len({r["serial"] for r in results}) == 24
        stats = node.node.services.proofs.verifier.stats
        assert stats.time_verified == 1 and stats.space_verified == 1
        assert stats.time_cached + stats.space_cached == 2 * 23


async def _cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    import asyncio
    import sys
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trustchain", *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_proofs_commands(tmp_path: Path, cddl: CddlChecker) -> None:
    directory = tmp_path / "mine"
    status, out, err = await _cli("proofs", "plot", "--k", "18", "--proofs-dir",
                                  str(directory), cwd=tmp_path)
    assert status == 0, err
    assert "plotting k=18: phase 4/4" in err and "plotting k=18: done [100%]" in err
    plot = stoq.Prover.open(directory).plot_path(18)
    assert plot.is_file() and str(plot) in out
    async with running_node(tmp_path / "node", ENGINE, checker=cddl) as node:
        target = ["--server", f"[::1]:{node.port}", "--pin", node.pin,
                  "--proofs-dir", str(directory)]
        status, out, err = await _cli("proofs", "status", *target, cwd=tmp_path)
        assert status == 0 and "stake 0 (minimum 1000: NOT enough)" in out, out + err
        status, out, err = await _cli("proofs", "prepare", *target, cwd=tmp_path)
        assert status == 0, err
        assert "development faucet" in err and "VDF 1,000 iterations: done" in err
        assert "credential ready" in out and "time 1,000 iterations" in out
        status, out, err = await _cli("proofs", "status", *target, cwd=tmp_path)
        assert "stake 1000 (minimum 1000: enough)" in out and "credentials epoch-" in out
