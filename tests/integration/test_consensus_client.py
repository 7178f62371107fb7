"""A client checks the consensus behind its certificate by itself (spec §18.14): the
``ca.issue`` answer carries everything the commit's precommit signatures cover,
``consensus.validators`` gives the deciding set, and ``trustchain verify --consensus``
checks the signatures (more than 2/3 of the power) offline; a changed round, a
changed signature or another validator set fails."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import stoq
from handlers.consensus.bft import CONTEXT
from protocol import NotFound, encode_deterministic
from trustchain._cli_consensus import check_commit, commit_document, write_commit

from ..helpers import CddlChecker, Requester, running_node
from .test_ca import make_csr, write_pems


async def _cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """The CLI against the node in this process: the event loop must keep running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trustchain", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=cwd)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_verify_consensus_checks_the_commit(tmp_path: Path, cddl: CddlChecker,
                                                  prover: stoq.Prover) -> None:
    data = tmp_path / "node"
    async with running_node(data, "qh3", checker=cddl) as node, \
            await node.client() as client:
        result = await Requester(client, prover).issue(
            make_csr(ec.generate_private_key(ec.SECP256R1()), ["consensus.trust"]))
        # the answer carries what the signatures cover; each signs exactly these bytes
        height, round_ = result["block_height"], result["round"]
        validators = await client.request("consensus.validators", {"height": height})
        assert validators["height"] == height and validators["chain_id"] == result["chain_id"]
        (only,) = validators["validators"]
        assert only["power"] == validators["total_power"] == 1
        assert validators["quorum_power"] == 1
        (signature,) = result["signatures"]
        assert signature["validator"] == only["id"]
        signed = encode_deterministic([CONTEXT, result["chain_id"], "precommit", height,
                                       round_, result["block_hash"], only["id"],
                                       signature["extension"]])
        ed25519.Ed25519PublicKey.from_public_bytes(only["public_key"]).verify(
            signature["signature"], signed)  # raises if the spec's bytes are not these
        current = await client.request("consensus.validators")
        assert current["height"] > height and current["validators"] == validators["validators"]
        with pytest.raises(NotFound):
            await client.request("consensus.validators", {"height": current["height"] + 5})

        out = tmp_path / "out"
        out.mkdir()
        cert, _ = write_pems(out, result)
        commit_path = write_commit(out, result)
        assert commit_path == out / "commit.json"
        (tmp_path / "validators.json").write_text(json.dumps(
            {**validators, "validators": [{**v, "public_key": v["public_key"].hex()}
                                          for v in validators["validators"]]}))
        root = ["--cafile", str(data / "root.pem")]
        target = ["--server", f"[::1]:{node.port}", "--pin", node.pin]

        # `trustchain consensus validators` prints the same set, to keep as a file
        code, printed, err = await _cli("consensus", "validators", "--height", str(height),
                                        *target, cwd=tmp_path)
        assert code == 0, err
        assert json.loads(printed)["validators"][0]["public_key"] == only["public_key"].hex()
        (tmp_path / "printed.json").write_text(printed)

        # offline, against the set given: the commit verifies; the block is not fetched
        code, out_text, err = await _cli(
            "verify", str(cert), *root, "--data-dir", str(data), "--consensus",
            "--validators", str(tmp_path / "printed.json"), "--offline", cwd=tmp_path)
        assert code == 0, out_text + err
        assert (f"OK consensus: block {height} ({result['block_hash'].hex()[:16]}...), "
                f"round {round_}: signed by 1 validators holding 1 of 1 power") in out_text
        assert "UNCHECKED block" in out_text
        assert out_text.splitlines()[-1] == (
            "OK checked: chain, SCT, consensus; NOT checked, as allowed: revocation, block")
        # without --offline the block not fetched is not OK
        code, out_text, _ = await _cli(
            "verify", str(cert), *root, "--data-dir", str(data), "--consensus",
            "--validators", str(tmp_path / "validators.json"), cwd=tmp_path)
        assert code == 1 and "NOT VERIFIED: not checked: revocation, block" in out_text
        # online: the set and the block from the node; the block holds the certificate
        code, out_text, err = await _cli("verify", str(cert), *root, "--consensus",
                                         "--online", *target, cwd=tmp_path)
        assert code == 0, out_text + err
        assert f"OK block: block {height} from" in out_text, out_text
        assert out_text.splitlines()[-1] == (
            "OK checked: chain, SCT, revocation, consensus, block")
        # --pin is how the node is authenticated when given: a wrong one is refused
        code, out_text, err = await _cli("verify", str(cert), *root, "--online", "--server",
                                         f"[::1]:{node.port}", "--pin", "0" * 64,
                                         cwd=tmp_path)
        assert code == 3 and len(err.strip().splitlines()) == 1, out_text + err
        assert f"does not match the pinned {'0' * 64}" in err

        # tampered: another round, a flipped signature bit, another validator set
        document = commit_document(result)
        assert document is not None
        check_commit(document, validators)
        for change, expected in (
                (lambda d: d.update(round=round_ + 1), "bad signature from"),
                (lambda d: d["signatures"][0].update(
                    signature=_flip(d["signatures"][0]["signature"])), "bad signature from"),
                (lambda d: d.update(block_hash=_flip(d["block_hash"])), "bad signature from"),
                (lambda d: d.update(signatures=[]), "no more than 2/3")):
            tampered = copy.deepcopy(document)
            change(tampered)
            with pytest.raises(ValueError, match=expected):
                check_commit(tampered, validators)
            commit_path.write_text(json.dumps(tampered))
            code, out_text, _ = await _cli(
                "verify", str(cert), *root, "--data-dir", str(data), "--consensus",
                "--validators", str(tmp_path / "validators.json"), "--offline", cwd=tmp_path)
            assert code == 1 and "FAIL consensus:" in out_text and expected in out_text
            assert out_text.splitlines()[-1] == "NOT OK: failed: consensus"
        commit_path.write_text(json.dumps(document))
        stranger = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)
        others: dict[str, Any] = {**validators, "validators": [
            {"public_key": stranger, "power": 1}]}
        with pytest.raises(ValueError, match="bad signature from"):
            check_commit(document, others)
        with pytest.raises(ValueError, match="decides height"):
            check_commit(document, {**validators, "height": height + 1})
        # the commit of another certificate is refused as such
        other = await Requester(client, prover).issue(
            make_csr(ec.generate_private_key(ec.SECP256R1()), ["other.trust"]))
        write_commit(out, other)
        code, _, err = await _cli("verify", str(cert), *root, "--consensus", "--validators",
                                  str(tmp_path / "validators.json"), "--offline", cwd=tmp_path)
        assert code == 2 and "is the commit of another certificate" in err


def _flip(hex_text: str) -> str:
    raw = bytearray(bytes.fromhex(hex_text))
    raw[0] ^= 1
    return raw.hex()
