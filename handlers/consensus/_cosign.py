"""CT checkpoints agreed by the validators, published as C2SP cosignatures.

A node puts its CT log's latest checkpoint in a ``checkpoint`` decision. When a
validator precommits a block holding such decisions, the precommit's extension
carries, for each, an Ed25519 cosignature in the c2sp.org/tlog-cosignature
``cosignature/v1`` form (the signed message is ``cosignature/v1``, ``time T``
and the checkpoint body; T is the block's time in seconds). The block's commit
therefore holds one cosignature per precommitting validator, and a checkpoint
is valid (:func:`validate_ct_log_consensus`) only with cosignatures from more
than two thirds of the voting power. Any signed-note tool can check the lines.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol import decode_item, encode_deterministic

from .bft import BadMessage, Block, Commit, ValidatorSet

COSIGNATURE_V1 = 0x04
"""The signed-note signature type of an Ed25519 cosignature/v1."""


def cosigned_message(body: str, timestamp: int) -> bytes:
    """What a cosigner signs: header line, time line, then the checkpoint body."""
    return f"cosignature/v1\ntime {timestamp}\n{body}".encode()


def cosigner_key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([COSIGNATURE_V1])
                          + public_key).digest()[:4]


def cosignature_line(name: str, public_key: bytes, timestamp: int, signature: bytes) -> str:
    blob = cosigner_key_id(name, public_key) + struct.pack(">Q", timestamp) + signature
    return f"\u2014 {name} {base64.b64encode(blob).decode()}\n"


def cosigner_name(chain_id: str, validator: str) -> str:
    """The note key name of a validator: ``<chain id>/validator/<id>``."""
    return f"{chain_id}/validator/{validator}"


def checkpoint_body(note: str) -> str:
    """The body of a signed checkpoint note (its lines before the blank line)."""
    if "\n\n" not in note:
        raise ValueError("not a signed note: no blank line before the signatures")
    return note[:note.index("\n\n") + 1]


_CHECKPOINT_KIND = b"\x6acheckpoint"
"""The CBOR text string ``"checkpoint"``: every checkpoint body holds it as its kind."""


def checkpoint_decisions(block: Block) -> list[tuple[int, dict[str, Any]]]:
    """``(index, body)`` of every checkpoint decision in ``block``."""
    found = []
    for index, decision in enumerate(block.decisions):
        if _CHECKPOINT_KIND not in decision:  # the body's bytes sit verbatim in the decision
            continue
        try:
            body = decode_item(decode_item(decision)["body"])
        except Exception:
            continue
        if isinstance(body, dict) and body.get("kind") == "checkpoint":
            found.append((index, body))
    return found


def precommit_extension(block: Block, sign: Callable[[bytes], bytes]) -> bytes:
    """This validator's cosignatures of the block's checkpoints, as a precommit extension."""
    timestamp = block.time_ms // 1000
    signatures = [[index, sign(cosigned_message(checkpoint_body(body["note"]), timestamp))]
                  for index, body in checkpoint_decisions(block)]
    return encode_deterministic(signatures) if signatures else b""


@dataclass(frozen=True)
class CosignedCheckpoint:
    note: str
    """The log's signed checkpoint followed by one cosignature line per validator."""
    origin: str
    size: int
    root: bytes
    block_height: int
    cosigners: tuple[str, ...]


def validate_ct_log_consensus(block: Block, commit: Commit, index: int, *, chain_id: str,
                              validators: ValidatorSet) -> CosignedCheckpoint:
    """The checkpoint of decision ``index``, valid only with a quorum of cosignatures.

    :raises BadMessage: the commit does not verify, the decision is not a
        checkpoint, or the valid cosignatures hold no more than 2/3 of the power.
    """
    commit.verify(chain_id, validators)
    if commit.block_id != block.id:
        raise BadMessage("the commit is for another block")
    bodies = dict(checkpoint_decisions(block))
    body = bodies.get(index)
    if body is None:
        raise BadMessage(f"decision {index} of block {block.height} is not a checkpoint")
    note = str(body["note"])
    message = cosigned_message(checkpoint_body(note), block.time_ms // 1000)
    lines: list[str] = []
    signers: list[str] = []
    for vote in commit.precommits:
        validator = validators.by_id.get(vote.validator)
        if validator is None or not vote.extension:
            continue
        try:
            pairs = decode_item(vote.extension)
            signature = next(s for i, s in pairs if i == index)
        except Exception:
            continue
        if isinstance(signature, bytes) and validator.verify(signature, message):
            lines.append(cosignature_line(cosigner_name(chain_id, validator.id),
                                          validator.public_key, block.time_ms // 1000,
                                          signature))
            signers.append(validator.id)
    if not validators.has_quorum(validators.power_of(signers)):
        raise BadMessage(f"the checkpoint has cosignatures from {len(signers)} validators, "
                         "not more than 2/3 of the voting power")
    return CosignedCheckpoint(note=note + "".join(lines), origin=str(body["origin"]),
                              size=int(body["size"]), root=bytes(body["root"]),
                              block_height=block.height, cosigners=tuple(signers))
