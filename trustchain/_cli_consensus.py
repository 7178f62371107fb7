"""The consensus behind a certificate, checked by a client (spec/stoq.md §18.14).

``trustchain issue`` keeps what the commit signatures cover beside the certificate
(``commit.json``: chain id, height, round, block hash, decision index, each
precommit's validator, signature and extension); ``trustchain consensus validators
[--height H]`` prints the validator set that decides a height (``consensus.validators``),
to keep as a file; ``trustchain verify --consensus`` checks, with them, that validators
holding more than 2/3 of the power signed that block, offline.

::

    trustchain consensus validators --height 12 > validators.json
    trustchain verify creds/cert.pem --consensus --validators validators.json --offline
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

import stoq
from handlers.consensus import SealError, unseal
from handlers.consensus.bft import BadMessage, Commit, Validator, ValidatorSet, Vote, VoteType
from protocol import decode_item
from protocol.ct_structs import sct_list_extension
from protocol.decisions import CompactCertificate, DecisionError, parse

from ._cli_common import (
    ClientBody,
    Command,
    Subcommands,
    add_trust_options,
    client_command,
    print_json,
)

COMMIT_FILE = "commit.json"
"""Beside ``cert.pem``: the commit of the block that committed the certificate."""


def add_commands(sub: Subcommands) -> dict[str, Command]:
    parser = sub.add_parser("consensus", help="the validators behind the certificates")
    commands = parser.add_subparsers(dest="consensus_command", required=True)
    validators = commands.add_parser("validators", help="the validator set (keys, powers) "
                                                        "that decides a height, as JSON")
    validators.add_argument("--height", type=int, default=None,
                            help="the height (default: the one being decided now)")
    add_trust_options(validators)
    return {"consensus": client_command(_validators)}


def _validators(args: argparse.Namespace) -> ClientBody:
    if args.height is not None and args.height < 1:
        raise ValueError("--height: heights start at 1")

    async def body(client: stoq.AsyncClient) -> int:
        print_json(await client.request("consensus.validators", {"height": args.height}))
        return 0
    return body


def commit_document(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """What ``commit.json`` keeps of a ``ca.issue`` answer (bytes as hex); None if the
    answer carries no commit."""
    if result.get("signatures") is None or result.get("round") is None:
        return None
    return {
        "chain_id": result["chain_id"], "block_height": result["block_height"],
        "round": result["round"], "block_hash": result["block_hash"].hex(),
        "index": result["index"], "fingerprint": result["fingerprint"],
        "signatures": [{"validator": s["validator"], "signature": s["signature"].hex(),
                        "extension": s["extension"].hex()} for s in result["signatures"]],
    }


def write_commit(directory: Path, result: Mapping[str, Any]) -> Path | None:
    document = commit_document(result)
    if document is None:
        return None
    path = directory / COMMIT_FILE
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def _bytes(value: Any, what: str) -> bytes:
    """Bytes from a JSON document (hex) or a CBOR answer (bytes)."""
    if isinstance(value, bytes):
        return value
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: not hex") from None


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path}: not a JSON {what}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a JSON {what}")
    return document


def validator_set(document: Mapping[str, Any]) -> ValidatorSet:
    """The set of a ``consensus.validators`` answer (or its JSON as printed).

    :raises ValueError: malformed, or an ``id`` that is not its key's.
    """
    try:
        validators = []
        for item in document["validators"]:
            validator = Validator(public_key=_bytes(item["public_key"], "public_key"),
                                  power=int(item["power"]))
            if item.get("id", validator.id) != validator.id:
                raise ValueError(f"validator {item['id']}: the id is not its key's")
            validators.append(validator)
        return ValidatorSet(tuple(validators))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a validator set: missing or wrong {exc}") from None


@dataclass(frozen=True)
class CheckedCommit:
    """A commit whose signatures verified: who signed, with how much power."""

    height: int
    round: int
    block_hash: bytes
    signers: int
    power: int
    total_power: int


def check_commit(commit: Mapping[str, Any], validators: Mapping[str, Any]) -> CheckedCommit:
    """Check that validators holding more than 2/3 of the power of ``validators`` (the set
    of the commit's height) signed ``commit``: the same check a validator makes.

    :raises ValueError: they did not, or a document is malformed (the message says why).
    """
    try:
        height, round_ = int(commit["block_height"]), int(commit["round"])
        block_hash = _bytes(commit["block_hash"], "block_hash")
        chain_id = str(commit["chain_id"])
        votes = tuple(Vote(type=VoteType.PRECOMMIT, height=height, round=round_,
                           block_id=block_hash, validator=str(s["validator"]),
                           signature=_bytes(s["signature"], "signature"),
                           extension=_bytes(s.get("extension", ""), "extension"))
                      for s in commit["signatures"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a commit: missing or wrong {exc}") from None
    if validators.get("chain_id", chain_id) != chain_id:
        raise ValueError(f"the validator set is of chain {validators['chain_id']!r}, the "
                         f"commit of {chain_id!r}")
    if validators.get("height", height) != height:
        raise ValueError(f"the validator set decides height {validators['height']}, the "
                         f"commit is at height {height}")
    deciding = validator_set(validators)
    try:
        Commit(height, round_, block_hash, votes).verify(chain_id, deciding)
    except BadMessage as exc:
        raise ValueError(str(exc)) from None
    signers = {v.validator for v in votes}
    return CheckedCommit(height=height, round=round_, block_hash=block_hash,
                         signers=len(signers), power=deciding.power_of(signers),
                         total_power=deciding.total_power)


def block_holds(block_bytes: bytes, block_hash: bytes, index: int, der: bytes) -> str | None:
    """Why the encoded block ``block_bytes`` is not the block ``block_hash`` whose decision
    ``index`` carries the certificate ``der``; None when it is."""
    if hashlib.sha256(block_bytes).digest() != block_hash:
        return "the node's block at that height is not the committed block"
    decisions = decode_item(block_bytes).get("decisions", [])
    if not 0 <= index < len(decisions):
        return f"the block has no decision {index}"
    if not _carries(decisions[index], der):
        return f"decision {index} of the block does not carry this certificate"
    return None


def _carries(sealed: bytes, der: bytes) -> bool:
    """Whether the sealed decision ``sealed`` carries the certificate ``der``: whole (the
    full form), or as its serial, SCT list and signature (the compact form, §18.6). A
    signature is over one TBS only: the one validators assembled is ``der``'s."""
    if der in sealed:
        return True
    try:
        decision = parse(unseal(sealed).body)
        cert = x509.load_der_x509_certificate(der)
    except (SealError, DecisionError, ValueError):
        return False
    return (isinstance(decision, CompactCertificate)
            and decision.serial == format(cert.serial_number, "x")
            and decision.signature == cert.signature
            and sct_list_extension(decision.sct_list) in cert.tbs_certificate_bytes)
