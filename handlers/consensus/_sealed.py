"""Sealed decisions: an application record signed by the validator that made it.

A decision travels as deterministic CBOR in one of two forms (spec/stoq.md §18.5):

- plain: ``{"body": bstr, "entry": validator-id, "signature": Ed25519 over body}``;
- batch: the same three keys and ``"batch": {"index", "size", "path"}``: the entry
  sealed ``size`` bodies at once, and ``signature`` is over
  :data:`BATCH_LABEL` || ``size`` (8 octets, big-endian) || the RFC 9162 Merkle
  Tree Hash of the bodies, of which this one is leaf ``index`` and ``path`` its
  inclusion proof. One signature serves the whole batch; each decision still
  travels alone and proves itself.

Consensus treats the body as opaque; the seal says which validator answers for
it, so a decision can be refused (or its maker held to account) by whoever
checks it. :class:`SealOpener` checks either form and verifies each batch
signature once.

Between validators a whole batch travels as one *decision group* (§18.3):
the entry, the signature and the bodies in leaf order. The paths are random
hashes that do not compress, and the receiver computes them from the bodies
(:meth:`SealOpener.open_group`), so they never cross a link.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol import decode_item, encode_deterministic, encode_head
from protocol.ct_merkle import (
    ProofError,
    largest_power_of_two_below,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
)

from .bft import Validator, ValidatorSet

BATCH_LABEL = b"trustchain seal batch v1\0"
"""The start of what a batch seal signs. A plain seal signs a body, which is a CBOR
map (its first octet 0xa0-0xbf); this label's first octet (0x74) is a CBOR text
string's, so no message is both."""

MAX_BATCH_SIZE = 4096
"""The largest batch a verifier accepts (a path of at most 12 hashes); the sealer
makes batches of at most :data:`handlers.consensus._sealer.BATCH_LIMIT`."""

REBUILT_KEPT = 65536
"""Decisions rebuilt from groups that a :class:`SealOpener` remembers until opened
(the consensus mempool holds at most 50,000)."""

Batch = tuple[int, int, list[bytes]]
"""A batch seal's ``index``, ``size`` and ``path``."""


class SealError(ValueError):
    """Not a sealed decision, or not sealed by an active validator."""


@dataclass(frozen=True)
class SealedDecision:
    body: dict[str, Any]
    entry: str
    raw_body: bytes

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))


def seal(body: dict[str, Any], entry: str, sign: Callable[[bytes], bytes]) -> bytes:
    """``body`` sealed alone (the plain form) by the entry validator ``entry``."""
    raw = encode_deterministic(body)
    return encode_sealed(raw, entry, sign(raw))


def encode_sealed(raw_body: bytes, entry: str, signature: bytes,
                  batch: Batch | None = None) -> bytes:
    """The deterministic CBOR of a sealed decision (what :func:`encode_deterministic`
    gives for the map, its keys in their deterministic order: body, batch, entry,
    signature; in a batch: path, size, index), without walking a generic map."""
    entry_octets = entry.encode()
    parts = [b"\xa3" if batch is None else b"\xa4", b"\x64body", encode_head(2, len(raw_body)),
             raw_body]
    if batch is not None:
        index, size, path = batch
        parts += [b"\x65batch\xa3\x64path", encode_head(4, len(path))]
        for node in path:
            parts += [encode_head(2, len(node)), node]
        parts += [b"\x64size", encode_head(0, size), b"\x65index", encode_head(0, index)]
    parts += [b"\x65entry", encode_head(3, len(entry_octets)), entry_octets,
              b"\x69signature", encode_head(2, len(signature)), signature]
    return b"".join(parts)


def batch_message(size: int, root: bytes) -> bytes:
    """What the entry signs for a batch of ``size`` bodies whose Merkle Tree Hash is
    ``root``."""
    return BATCH_LABEL + size.to_bytes(8, "big") + root


def seal_batch(raw_bodies: Sequence[bytes], entry: str,
               sign: Callable[[bytes], bytes]) -> list[bytes]:
    """Each of ``raw_bodies`` (deterministic CBOR maps, all different) sealed by
    ``entry`` with one signature; a single body gets the plain form."""
    size = len(raw_bodies)
    if size == 1:
        raw = raw_bodies[0]
        return [encode_sealed(raw, entry, sign(raw))]
    if not 1 < size <= MAX_BATCH_SIZE:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_SIZE} bodies, not {size}")
    root, paths = _tree(raw_bodies)
    signature = sign(batch_message(size, root))
    return _sealed_batch(raw_bodies, entry, signature, paths)


def _tree(raw_bodies: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The RFC 9162 Merkle Tree Hash of ``raw_bodies`` and every leaf's inclusion proof,
    in one walk: each node hashed once (size - 1 node hashes), each sibling appended
    to the paths below it, the lowest first as RFC 9162 §2.1.3.1 orders them."""
    leaves = [leaf_hash(raw) for raw in raw_bodies]
    paths: list[list[bytes]] = [[] for _ in leaves]

    def walk(start: int, end: int) -> bytes:
        if end - start == 1:
            return leaves[start]
        k = largest_power_of_two_below(end - start)
        left, right = walk(start, start + k), walk(start + k, end)
        for index in range(start, start + k):
            paths[index].append(right)
        for index in range(start + k, end):
            paths[index].append(left)
        return node_hash(left, right)

    return walk(0, len(leaves)), paths


def _sealed_batch(raw_bodies: Sequence[bytes], entry: str, signature: bytes,
                  paths: list[list[bytes]]) -> list[bytes]:
    size = len(raw_bodies)
    return [encode_sealed(raw, entry, signature, (index, size, path))
            for index, (raw, path) in enumerate(zip(raw_bodies, paths, strict=True))]


GROUP_KIND = "decision-group"
GROUP_KEYS = frozenset({"kind", "entry", "signature", "size", "bodies"})


@dataclass(frozen=True)
class Group:
    """One seal batch whole: what :func:`seal_batch` signed, without the paths."""

    entry: str
    signature: bytes
    bodies: tuple[bytes, ...]
    """The batch's bodies in leaf order."""

    def message(self) -> bytes:
        """The ``decision-group`` gossip message (deterministic CBOR)."""
        return encode_deterministic({"kind": GROUP_KIND, "entry": self.entry,
                                     "signature": self.signature, "size": len(self.bodies),
                                     "bodies": list(self.bodies)})


def parse_group(item: Any) -> Group:
    """A decoded ``decision-group`` message as a :class:`Group`, its shape checked
    (nothing verified yet).

    :raises SealError: other keys, a size not 2 to :data:`MAX_BATCH_SIZE`, not that
        many bodies, or a body twice.
    """
    if not isinstance(item, dict) or item.keys() != GROUP_KEYS:
        raise SealError("a decision group is exactly {kind, entry, signature, size, bodies}")
    entry, signature, size, bodies = (item["entry"], item["signature"], item["size"],
                                      item["bodies"])
    if not isinstance(entry, str):
        raise SealError("a decision group's entry is not a validator id")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise SealError("a decision group's signature is not 64 octets")
    if type(size) is not int or not 2 <= size <= MAX_BATCH_SIZE:
        raise SealError(f"a decision group's size is not 2 to {MAX_BATCH_SIZE}")
    if not isinstance(bodies, list) or not all(type(body) is bytes for body in bodies):
        raise SealError("a decision group's bodies are not byte strings")
    if len(bodies) != size:
        raise SealError(f"a decision group of size {size} carries {len(bodies)} bodies")
    if len(set(bodies)) != size:
        raise SealError("a decision group carries a body twice")
    return Group(entry=entry, signature=signature, bodies=tuple(bodies))


def whole_batches(decisions: Sequence[bytes], entry: str,
                  max_bytes: int) -> tuple[list[Group], list[bytes]]:
    """``decisions`` as the groups of the batches that ``entry`` sealed and that are all
    there, and the rest (plain seals, other entries, part of a batch, a batch whose
    group message would exceed ``max_bytes``) as they came."""
    parts: dict[tuple[bytes, int], dict[int, tuple[bytes, bytes]]] = {}
    rest: list[bytes] = []
    for decision in decisions:
        fields = _fields(decision)
        batch = fields[3] if fields is not None else None
        if fields is None or batch is None or fields[1] != entry:
            rest.append(decision)
            continue
        raw, _, signature, _ = fields
        index, size, _ = batch
        parts.setdefault((signature, size), {})[index] = (decision, raw)
    groups: list[Group] = []
    for (signature, size), members in parts.items():
        bodies = tuple(members[index][1] for index in range(size) if index in members)
        if len(bodies) == len(members) == size \
                and sum(len(raw) + 5 for raw in bodies) + len(entry) + 128 <= max_bytes:
            groups.append(Group(entry=entry, signature=signature, bodies=bodies))
        else:
            rest += (decision for decision, _ in members.values())
    return groups, rest


def unseal(decision: bytes) -> SealedDecision:
    """The body and entry of a decision, without checking the seal (for decisions a
    quorum already committed, whose seals were checked before the vote).

    :raises SealError: not a sealed decision.
    """
    fields = _fields(decision)
    if fields is None:
        return _unsealed(_decoded(decision))
    raw, entry, _, _ = fields
    return SealedDecision(body=_body(raw), entry=entry, raw_body=raw)


_SHORTEST = (24, 0x100, 0x10000, 0x100000000)
"""The least argument of a head with additional information 24, 25, 26, 27 in
preferred serialization (a smaller one has a shorter head)."""


def _head(data: bytes, pos: int, major: int) -> tuple[int, int]:
    """The argument of the shortest head of major type ``major`` at ``pos``, and the
    position after it; ValueError or IndexError if there is no such head."""
    info = data[pos] - (major << 5)
    if 0 <= info < 24:
        return info, pos + 1
    if not 24 <= info <= 27:
        raise ValueError
    end = pos + 1 + (1 << (info - 24))
    value = int.from_bytes(data[pos + 1:end], "big")
    if end > len(data) or value < _SHORTEST[info - 24]:
        raise ValueError
    return value, end


def _fields(decision: bytes) -> tuple[bytes, str, bytes, Batch | None] | None:
    """The body, entry, signature (64 octets) and batch of ``decision`` if it is exactly
    :func:`encode_sealed` of them, else None.

    A sealed decision has one encoding, so it is read in place, each key and head
    where that encoding puts it, instead of being decoded as a map and then encoded
    again to compare. Whatever this accepts, the generic path (decode, check the
    types, encode again) accepts with the same fields, and the other way round.
    """
    try:
        first = decision[0]
        if first not in (0xA3, 0xA4) or decision[1:6] != b"\x64body":
            return None
        length, pos = _head(decision, 6, 2)
        raw = decision[pos:pos + length]
        pos += length
        batch: Batch | None = None
        if first == 0xA4:
            if decision[pos:pos + 12] != b"\x65batch\xa3\x64path":
                return None
            count, pos = _head(decision, pos + 12, 4)
            path = []
            for _ in range(count):
                if decision[pos:pos + 2] == b"\x58\x20":  # a SHA-256 hash, as every node is
                    path.append(decision[pos + 2:pos + 34])
                    pos += 34
                else:
                    length, pos = _head(decision, pos, 2)
                    path.append(decision[pos:pos + length])
                    pos += length
            if decision[pos:pos + 5] != b"\x64size":
                return None
            size, pos = _head(decision, pos + 5, 0)
            if decision[pos:pos + 6] != b"\x65index":
                return None
            index, pos = _head(decision, pos + 6, 0)
            batch = (index, size, path)
        if decision[pos:pos + 6] != b"\x65entry":
            return None
        length, pos = _head(decision, pos + 6, 3)
        entry = decision[pos:pos + length].decode()
        pos += length
        if decision[pos:pos + 12] != b"\x69signature\x58\x40" or pos + 76 != len(decision):
            return None
        return raw, entry, decision[pos + 12:], batch
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def _body(raw: bytes) -> dict[Any, Any]:
    try:
        body = decode_item(raw)
    except Exception:
        raise SealError("not a sealed decision") from None
    if not isinstance(body, dict):
        raise SealError("not a sealed decision")
    return body


def _decoded(decision: bytes) -> dict[Any, Any]:
    try:
        item = decode_item(decision)
    except Exception:
        raise SealError("not a sealed decision") from None
    if not isinstance(item, dict):
        raise SealError("not a sealed decision")
    return item


def _unsealed(item: dict[Any, Any]) -> SealedDecision:
    raw, entry = item.get("body"), item.get("entry")
    if not (isinstance(raw, bytes) and isinstance(entry, str)):
        raise SealError("not a sealed decision")
    return SealedDecision(body=_body(raw), entry=entry, raw_body=raw)


class SealOpener:
    """Opens sealed decisions, verifying each batch signature once.

    Verified batch signatures are kept, most recently used last, up to
    ``capacity``: a hit is exactly a (key, message, signature) that verified
    before, so eviction only costs a verification again.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._verified: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
        self._rebuilt: OrderedDict[bytes, tuple[bytes, str]] = OrderedDict()
        """Decisions :meth:`open_group` made from a verified group -> their body and
        entry: each opened once without being read or its path walked again (up to
        :data:`REBUILT_KEPT`)."""
        self.verifications = 0
        """Signatures verified (a batch's first decision, or a plain seal)."""
        self.reused = 0
        """Batch decisions whose signature was verified before."""

    def open(self, decision: bytes, validators: ValidatorSet) -> SealedDecision:
        """The decision's body if an active validator sealed it; :class:`SealError` if
        not (the message says which check failed)."""
        rebuilt = self._rebuilt.pop(decision, None)
        if rebuilt is not None:  # these very bytes were made from a verified group
            raw, entry = rebuilt
            sealed = SealedDecision(body=_body(raw), entry=entry, raw_body=raw)
            self._active(entry, validators)
            self.reused += 1
            return sealed
        fields = _fields(decision)
        if fields is None:
            sealed, signature, batch = _checked(decision)
        else:
            raw, entry, signature, batch = fields
            sealed = SealedDecision(body=_body(raw), entry=entry, raw_body=raw)
        validator = self._active(sealed.entry, validators)
        if batch is None:
            self.verifications += 1
            if not validator.verify(signature, sealed.raw_body):
                raise SealError("the entry validator's signature does not verify")
            return sealed
        self._check_batch(validator, sealed.raw_body, batch, signature)
        return sealed

    def open_group(self, group: Group, validators: ValidatorSet) -> list[bytes]:
        """The sealed decisions of ``group``, byte for byte those :func:`seal_batch`
        made, if an active validator signed its bodies as one batch (the signature
        verified once and remembered, so opening each decision reuses it).

        :raises SealError: not an active validator, or the signature does not verify.
        """
        validator = self._active(group.entry, validators)
        size = len(group.bodies)
        if not 2 <= size <= MAX_BATCH_SIZE:
            raise SealError(f"a decision group's size is not 2 to {MAX_BATCH_SIZE}")
        root, paths = _tree(group.bodies)
        self._verify_batch(validator, batch_message(size, root), group.signature)
        decisions = _sealed_batch(group.bodies, group.entry, group.signature, paths)
        if self.capacity:
            self._rebuilt.update((decision, (raw, group.entry))
                                 for decision, raw in zip(decisions, group.bodies, strict=True))
            while len(self._rebuilt) > REBUILT_KEPT:
                self._rebuilt.popitem(last=False)
        return decisions

    @staticmethod
    def _active(entry: str, validators: ValidatorSet) -> Validator:
        validator = validators.by_id.get(entry)
        if validator is None or validator.power == 0:
            raise SealError(f"{entry!r} is not an active validator")
        return validator

    def _check_batch(self, validator: Validator, raw_body: bytes, batch: Batch,
                     signature: bytes) -> None:
        index, size, path = batch
        if not 2 <= size <= MAX_BATCH_SIZE:
            raise SealError(f"the seal's batch size {size} is not 2 to {MAX_BATCH_SIZE}")
        try:
            root = root_from_inclusion_proof(index, size, leaf_hash(raw_body), path)
        except ProofError as exc:
            raise SealError(f"the seal's batch path does not hold: {exc}") from None
        self._verify_batch(validator, batch_message(size, root), signature)

    def _verify_batch(self, validator: Validator, message: bytes, signature: bytes) -> None:
        key = (validator.public_key, message, signature)
        if key in self._verified:
            self._verified.move_to_end(key)
            self.reused += 1
            return
        self.verifications += 1
        if not validator.verify(signature, message):
            raise SealError("the entry validator's signature of the batch root does not "
                            "verify")
        self._verified[key] = None
        if len(self._verified) > self.capacity:
            self._verified.popitem(last=False)


def _checked(decision: bytes) -> tuple[SealedDecision, bytes, Batch | None]:
    """The generic reading of a decision that :func:`_fields` refuses: decoded as a
    map, checked, and encoded again to compare. It refuses every such decision, with
    the check that fails."""
    item = _decoded(decision)
    sealed = _unsealed(item)
    signature = item.get("signature")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise SealError("the seal's signature is not 64 octets")
    batch = _batch(item.get("batch")) if "batch" in item else None
    if encode_sealed(sealed.raw_body, sealed.entry, signature, batch) != decision:
        # other keys, or another encoding of these: one decision has one digest
        raise SealError("a sealed decision is the deterministic CBOR of exactly body, "
                        "entry, signature (and batch)")
    return sealed, signature, batch


def _batch(batch: Any) -> Batch:
    """A seal's ``batch`` map as (index, size, path), or :class:`SealError`."""
    if not isinstance(batch, dict) or batch.keys() != {"index", "size", "path"}:
        raise SealError("the seal's batch is not {index, size, path}")
    index, size, path = batch["index"], batch["size"], batch["path"]
    if not (type(index) is int and type(size) is int and index >= 0 and size >= 0
            and isinstance(path, list) and all(type(node) is bytes for node in path)):
        raise SealError("the seal's batch is not {index, size, path}")
    return index, size, path


def open_sealed(decision: bytes, validators: ValidatorSet) -> SealedDecision:
    """The decision's body if an active validator sealed it; :class:`SealError` if not
    (one decision on its own: nothing is remembered)."""
    return SealOpener(capacity=0).open(decision, validators)
