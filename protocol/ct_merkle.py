"""Merkle trees of Certificate Transparency (RFC 9162 §2.1), without I/O.

Leaf hash ``SHA-256(0x00 || leaf)``, node hash ``SHA-256(0x01 || left || right)``.
Proofs are *generated* from a caller-supplied ``mth(start, end)`` that returns
the Merkle Tree Hash of ``D[start:end]`` (the log answers it from its tiles),
and *verified* from hashes alone, so a client needs nothing but this module.

Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 with the rules that the
transparency-dev vectors expect: every hash is 32 bytes, consistency from an
empty tree is an error, equal sizes need an empty proof and equal roots.
Failures raise :class:`ProofError`, whose message says which check failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The Merkle Tree Hash of the empty tree."""

Mth = Callable[[int, int], bytes]
"""``mth(start, end)``: the Merkle Tree Hash of the leaves ``D[start:end]``."""

_sha256 = hashlib.sha256


class ProofError(ValueError):
    """A Merkle proof does not verify, or its inputs are not well-formed."""


def leaf_hash(leaf: bytes) -> bytes:
    """``SHA-256(0x00 || leaf)``."""
    return _sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


def largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n`` >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_hashes(hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of a list of leaf hashes (RFC 9162 §2.1.1).

    Iterative, O(n) hashes; for tests, tiles and small trees.
    """
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def perfect_levels(hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of a perfect tree over ``hashes`` (a power-of-two count).

    ``levels[0]`` is ``hashes``; ``levels[k][i]`` is the hash of the subtree of
    ``2**k`` hashes starting at ``i * 2**k``; the last level holds the root.
    """
    levels = [list(hashes)]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([_sha256(b"\x01" + prev[i] + prev[i + 1]).digest()
                       for i in range(0, len(prev), 2)])
    return levels


# --- proof generation --------------------------------------------------------------


def inclusion_proof(index: int, size: int, mth: Mth) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 §2.1.3.1).

    :raises ValueError: ``index`` is not below ``size``.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, end, m = 0, size, index
    while end - start > 1:
        k = largest_power_of_two_below(end - start)
        if m < k:
            path.append(mth(start + k, end))
            end = start + k
        else:
            path.append(mth(start, start + k))
            start += k
            m -= k
    path.reverse()
    return path


def consistency_proof(first: int, second: int, mth: Mth) -> list[bytes]:
    """The consistency proof between tree sizes ``first`` and ``second`` (RFC 9162 §2.1.4.1).

    :raises ValueError: not ``0 < first <= second``.
    """
    if not 0 < first <= second:
        raise ValueError(f"no consistency proof from size {first} to {second}")
    proof: list[bytes] = []
    start, end, m, complete = 0, second, first, True
    while True:
        n = end - start
        if m == n:
            if not complete:
                proof.append(mth(start, end))
            break
        k = largest_power_of_two_below(n)
        if m <= k:
            proof.append(mth(start + k, end))
            end = start + k
        else:
            proof.append(mth(start, start + k))
            start += k
            m -= k
            complete = False
    proof.reverse()
    return proof


# --- verification --------------------------------------------------------------------


def _check_hash(value: bytes, what: str) -> None:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        raise ProofError(f"{what} is not a {HASH_SIZE}-byte hash")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes,
                              proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` implies for leaf hash ``leaf`` at ``index`` of ``size``.

    :raises ProofError: bad sizes, a malformed hash, or a proof of the wrong length.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is beyond the tree size {size}")
    _check_hash(leaf, "the leaf hash")
    for i, p in enumerate(proof):
        if type(p) is not bytes or len(p) != HASH_SIZE:  # the message made only if needed
            _check_hash(p, f"proof element {i}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the proof is shorter than the path to the root")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes],
                     root: bytes) -> None:
    """Check that leaf hash ``leaf`` is at ``index`` in the tree of ``size`` with ``root``
    (RFC 9162 §2.1.3.2).

    :raises ProofError: it is not.
    """
    _check_hash(root, "the root")
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError("the inclusion proof leads to a different root")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Check that the tree of ``second`` leaves with ``second_root`` extends the tree of
    ``first`` leaves with ``first_root`` (RFC 9162 §2.1.4.2).

    :raises ProofError: it does not, or the inputs are not well-formed.
    """
    if first < 0 or second < 0:
        raise ProofError("tree sizes cannot be negative")
    if second < first:
        raise ProofError(f"size {second} is smaller than size {first}")
    if first == 0:
        raise ProofError("consistency with an empty tree proves nothing")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof element {i}")
    if first == second:
        # As upstream transparency-dev: plain equality of the roots, whatever their form.
        if proof:
            raise ProofError("equal tree sizes need an empty proof")
        if first_root != second_root:
            raise ProofError("equal tree sizes with different roots")
        return
    _check_hash(first_root, "the first root")
    _check_hash(second_root, "the second root")
    if not proof:
        raise ProofError("the consistency proof is empty")
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the old root is a node
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is too short")
    if fr != first_root:
        raise ProofError("the consistency proof does not lead to the first root")
    if sr != second_root:
        raise ProofError("the consistency proof does not lead to the second root")


def subtree_hash(start: int, end: int, block: Callable[[int, int], bytes]) -> bytes:
    """``MTH(D[start:end])`` from aligned perfect subtrees.

    ``block(level, index)`` returns the hash of the perfect subtree of
    ``2**level`` leaves starting at ``index * 2**level``. ``[start, end)`` must
    be a range the RFC 9162 tree has as a node or as the right edge of one:
    ``start`` a multiple of the largest power of two not above ``end - start``
    (every range :func:`inclusion_proof` and :func:`consistency_proof` ask for).
    The range is cut into maximal aligned blocks from the left and folded from
    the right, which is the tree's own shape.
    """
    if not 0 <= start < end:
        raise ValueError(f"empty or negative range [{start}, {end})")
    blocks: list[bytes] = []
    pos = start
    while pos < end:
        size = end - pos
        level = size.bit_length() - 1
        # An aligned block of 2**level leaves at pos.
        while pos & ((1 << level) - 1):
            level -= 1
        blocks.append(block(level, pos >> level))
        pos += 1 << level
    result = blocks[-1]
    for h in reversed(blocks[:-1]):
        result = node_hash(h, result)
    return result


class CompactRange:
    """The right edge of a growing tree: its perfect subtrees, largest first.

    A follower that sees every leaf from index 0 appends each leaf hash and
    computes the root of any size it reaches, with O(log n) memory, to compare
    with the log's signed tree heads.
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []

    def append(self, leaf: bytes) -> None:
        h, n = leaf, self.size
        while n & 1:
            h = node_hash(self._stack.pop(), h)
            n >>= 1
        self._stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        r = self._stack[-1]
        for h in reversed(self._stack[:-1]):
            r = node_hash(h, r)
        return r
