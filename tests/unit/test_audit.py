"""The hash-chained audit log: appends, recovery, group commit, checkpoints, verification."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from protocol import encode_deterministic
from store import _audit as audit
from store._audit import (
    CHECKPOINT_CONTEXT,
    GENESIS,
    AuditError,
    AuditLog,
    verify_log,
)

from ..audit_records import rehash


class KeySigner:
    """The shape of a keystore signer, over an in-memory key."""

    def __init__(self, name: str, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        self.name = name
        self.algorithm = ("ed25519" if isinstance(key, ed25519.Ed25519PrivateKey)
                          else "ecdsa-p256-sha256")
        self._key = key

    def public_key(self) -> Any:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


def make_signer(algorithm: str, name: str = "audit") -> KeySigner:
    if algorithm == "ed25519":
        return KeySigner(name, ed25519.Ed25519PrivateKey.generate())
    return KeySigner(name, ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(params=["ecdsa-p256-sha256", "ed25519"])
def signer(request: Any) -> KeySigner:
    return make_signer(request.param)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.log"


def ticking_clock(start: float = 1_700_000_000.0) -> Callable[[], float]:
    now = [start]

    def clock() -> float:
        now[0] += 0.25
        return now[0]
    return clock


def fill(path: Path, count: int, **kwargs: Any) -> list[Any]:
    with AuditLog(path, clock=ticking_clock(), **kwargs) as log:
        return [log.append("ca.issued", {"serial": f"{i:04x}", "n": i}) for i in range(count)]


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, objs: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objs))


# --- appending and the format --------------------------------------------------------

def test_chain_verifies_and_bytes_round_trip(path: Path) -> None:
    data = {"serial": "01ab", "der": b"\x00\x01\xff", "names": ["a.example", "b.example"],
            "nested": {"blob": [b"x", {"deep": b""}], "ok": True, "none": None},
            "ratio": 0.5, "count": -3, "big": 2**64 - 1}
    with AuditLog(path, clock=lambda: 1_700_000_000.123456) as log:
        first = log.append("config.load", {"source": "/etc/trustchain.toml"})
        second = log.append("ca.issued", data)
        assert log.head == (2, second.hash)
    assert first.seq == 1 and first.prev == GENESIS
    assert second.prev == first.hash and second.data == data
    assert first.time == pytest.approx(1_700_000_000.123456)

    stored = lines(path)
    assert [r["seq"] for r in stored] == [1, 2]
    assert stored[0]["time"] == 1_700_000_000_123456
    assert stored[1]["data"]["der"] == {"hex": "0001ff"}
    assert stored[1]["hash"] == second.hash.hex()
    report = verify_log(path)
    assert report.ok, report.problems
    assert (report.records, report.unsigned_tail, report.last_checkpoint_seq) == (2, 2, None)


def test_hash_is_sha256_of_the_deterministic_cbor(path: Path) -> None:
    with AuditLog(path, clock=lambda: 12.5) as log:
        record = log.append("ca.revoked", {"serial": "02", "raw": b"\x07", "f": 1.5})
    expected = hashlib.sha256(encode_deterministic({
        "seq": 1, "time": 12_500_000, "kind": "ca.revoked",
        "data": {"serial": "02", "raw": b"\x07", "f": 1.5}, "prev": bytes(32)})).digest()
    assert record.hash == expected


@pytest.mark.parametrize("data", [
    {"s": {1, 2}}, {"f": float("nan")}, {"f": float("inf")}, {1: "int key"},
    {"x": {"hex": "00"}}, {"big": 2**64}, {"obj": object()},
])
def test_refuses_data_it_cannot_encode(path: Path, data: dict[Any, Any]) -> None:
    with AuditLog(path) as log:
        with pytest.raises(AuditError):
            log.append("ca.issued", data)
        assert log.head == (0, GENESIS)
        log.append("ca.issued", {"still": "works"})
    assert verify_log(path).ok


@pytest.mark.parametrize("kind", ["checkpoint", "", "Has Space", "x" * 65])
def test_refuses_reserved_or_odd_kinds(path: Path, kind: str) -> None:
    with AuditLog(path) as log, pytest.raises(AuditError):
        log.append(kind, {})


def test_records_are_private_copies(path: Path) -> None:
    data: dict[str, Any] = {"names": ["a"]}
    with AuditLog(path) as log:
        record = log.append("ca.issued", data)
    data["names"].append("b")
    assert record.data == {"names": ["a"]}


def test_reopen_continues_the_chain(path: Path) -> None:
    first = fill(path, 3)
    with AuditLog(path) as log:
        assert log.head == (3, first[-1].hash)
        record = log.append("node.started", {})
    assert (record.seq, record.prev) == (4, first[-1].hash)
    assert verify_log(path).ok


def test_one_writer_per_file(path: Path) -> None:
    with AuditLog(path), pytest.raises(AuditError, match="another process"):
        AuditLog(path)


def test_empty_and_missing_logs(path: Path, tmp_path: Path) -> None:
    AuditLog(path).close()
    report = verify_log(path)
    assert report.ok and report.records == 0
    with pytest.raises(AuditError, match="no audit log"):
        verify_log(tmp_path / "nothing.log")


# --- crashes and failures ------------------------------------------------------------

def test_torn_last_line_is_dropped_at_open(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = fill(path, 3)
    intact = path.stat().st_size
    with path.open("ab") as f:
        f.write(b'{"seq":4,"time":17000000')
    report = verify_log(path)
    assert report.ok and report.records == 3 and "incomplete" in report.warnings[0]

    with caplog.at_level(logging.WARNING, logger="trustchain.audit"), AuditLog(path) as log:
        assert path.stat().st_size == intact
        assert log.head == (3, records[-1].hash)
        assert log.append("node.started", {}).seq == 4
    assert "incomplete" in caplog.text
    assert verify_log(path).ok


def test_a_torn_first_line_leaves_an_empty_log(path: Path) -> None:
    path.parent.mkdir()
    path.write_bytes(b'{"seq":1,"ti')
    with AuditLog(path) as log:
        assert log.head == (0, GENESIS)
        log.append("node.started", {})
    assert verify_log(path).ok


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 16])
def test_the_tail_is_found_across_read_chunks(path: Path, chunk: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_TAIL_CHUNK", chunk)
    records = fill(path, 3)
    with path.open("ab") as f:
        f.write(b'{"seq":4,"data":{"long":"' + b"x" * 300)
    with AuditLog(path) as log:
        assert log.head == (3, records[-1].hash)


def test_a_damaged_last_record_refuses_to_open(path: Path) -> None:
    fill(path, 2)
    objs = lines(path)
    objs[-1]["data"]["n"] = 99
    write_lines(path, objs)
    with pytest.raises(AuditError, match="damaged"):
        AuditLog(path)


def test_a_failed_flush_stops_the_log(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(path)
    log.append("ca.issued", {"n": 1})

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")
    with monkeypatch.context() as m:
        m.setattr(os, "fdatasync", broken)
        with pytest.raises(AuditError, match="write failed"):
            log.append("ca.issued", {"n": 2})
    with pytest.raises(AuditError, match="failed earlier"):
        log.append("ca.issued", {"n": 3})
    log.close()
    with AuditLog(path) as reopened:  # the restart re-reads whatever reached the file
        assert reopened.head[0] == 2
    assert verify_log(path).ok


# --- tampering -----------------------------------------------------------------------

EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "seq": (lambda r: r.update(seq=30), "record 30: hash mismatch"),
    "time": (lambda r: r.update(time=r["time"] + 1), "record 3: hash mismatch"),
    "kind": (lambda r: r.update(kind="ca.revoked"), "record 3: hash mismatch"),
    "data": (lambda r: r["data"].update(serial="ffff"), "record 3: hash mismatch"),
    "prev": (lambda r: r.update(prev="11" * 32), "record 3: hash mismatch"),
    "hash": (lambda r: r.update(hash="22" * 32), "record 3: hash mismatch"),
}


@pytest.mark.parametrize("field", list(EDITS))
def test_editing_any_field_is_detected(path: Path, field: str) -> None:
    fill(path, 5)
    objs = lines(path)
    edit, expected = EDITS[field]
    edit(objs[2])
    write_lines(path, objs)
    report = verify_log(path)
    assert not report.ok
    assert any(p.startswith(expected) for p in report.problems), report.problems


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(path: Path) -> None:
    fill(path, 5)
    objs = lines(path)
    objs[2]["data"]["serial"] = "ffff"
    rehash(objs[2])
    write_lines(path, objs)
    assert verify_log(path).problems == [
        "record 4: prev does not match record 3's hash (that record edited, or records removed)"]


def test_deleting_a_record_is_detected(path: Path) -> None:
    fill(path, 5)
    objs = lines(path)
    del objs[2]
    write_lines(path, objs)
    assert verify_log(path).problems == [
        "record 4: sequence 4 follows 2 (records removed or reordered)"]


def test_deleting_the_first_record_is_detected(path: Path) -> None:
    fill(path, 3)
    write_lines(path, lines(path)[1:])
    assert verify_log(path).problems == [
        "record 2: the log starts at 2, not 1 (records removed from the start)"]


def test_swapping_two_records_is_detected(path: Path) -> None:
    fill(path, 5)
    objs = lines(path)
    objs[2], objs[3] = objs[3], objs[2]
    write_lines(path, objs)
    problems = verify_log(path).problems
    assert "record 4: sequence 4 follows 2 (records removed or reordered)" in problems
    assert "record 3: sequence 3 follows 4 (records removed or reordered)" in problems


def test_a_line_that_is_not_a_record_is_reported_by_line(path: Path) -> None:
    fill(path, 3)
    text = path.read_text().splitlines(keepends=True)
    text[1] = '{"seq": 2, "oops": true}\n'
    path.write_text("".join(text))
    problems = verify_log(path).problems
    assert len(problems) == 1 and problems[0].startswith("line 2: not a valid record")


def test_duplicate_json_keys_are_refused(path: Path) -> None:
    fill(path, 1)
    line = path.read_text()
    path.write_text(line.replace('"kind":', '"kind":"ca.revoked","kind":', 1))
    assert "duplicate key" in verify_log(path).problems[0]


# --- checkpoints ---------------------------------------------------------------------

def kinds(path: Path) -> list[tuple[int, str]]:
    return [(r["seq"], r["kind"]) for r in lines(path)]


def test_checkpoint_every_n(path: Path, signer: KeySigner) -> None:
    log = AuditLog(path, signer=signer, checkpoint_every=5)
    for i in range(12):
        log.append("ca.issued", {"n": i})
    checkpoints = [seq for seq, kind in kinds(path) if kind == "checkpoint"]
    assert checkpoints == [6, 11]  # after records 5 and 10, in the same write
    cp = lines(path)[5]["data"]
    assert cp["covers_seq"] == 5 and cp["key"] == "audit" and cp["algorithm"] == signer.algorithm

    report = verify_log(path, public_keys=[signer.public_key()])
    assert report.ok, report.problems
    assert (report.records, report.last_checkpoint_seq, report.unsigned_tail) == (14, 11, 3)

    log.close()  # signs the unsigned tail
    report = verify_log(path, public_keys=[signer.public_key()])
    assert report.ok and report.last_checkpoint_seq == 15 and report.unsigned_tail == 0
    with AuditLog(path, signer=signer) as reopened:  # nothing new: no extra checkpoint
        assert reopened.head[0] == 15
    assert len(lines(path)) == 15


def test_checkpoint_signs_the_documented_message(path: Path, signer: KeySigner) -> None:
    with AuditLog(path, signer=signer, checkpoint_every=0) as log:
        last = log.append("ca.issued", {})
        cp = log.checkpoint()
    assert cp.kind == "checkpoint" and cp.data["covers_hash"] == last.hash
    message = encode_deterministic({"ctx": CHECKPOINT_CONTEXT, "seq": 1, "hash": last.hash})
    public = signer.public_key()
    if signer.algorithm == "ed25519":
        public.verify(cp.data["signature"], message)
    else:
        public.verify(cp.data["signature"], message, ec.ECDSA(hashes.SHA256()))


def test_checkpoint_needs_a_signer(path: Path) -> None:
    with AuditLog(path) as log, pytest.raises(AuditError, match="no signer"):
        log.checkpoint()


def test_a_forged_checkpoint_signature_is_detected(path: Path, signer: KeySigner) -> None:
    with AuditLog(path, signer=signer) as log:
        log.append("ca.issued", {})
    objs = lines(path)
    assert objs[-1]["kind"] == "checkpoint"
    sig = bytearray.fromhex(objs[-1]["data"]["signature"]["hex"])
    sig[-1] ^= 1
    objs[-1]["data"]["signature"]["hex"] = sig.hex()
    rehash(objs[-1])  # so that only the signature is wrong
    write_lines(path, objs)
    report = verify_log(path)
    assert report.problems == ["checkpoint at 2: bad signature"]
    assert report.last_checkpoint_seq is None and report.unsigned_tail == 2


def test_a_checkpoint_by_another_key_is_not_trusted(path: Path, signer: KeySigner) -> None:
    fill(path, 3, signer=signer)
    other = make_signer(signer.algorithm)
    report = verify_log(path, public_keys=[other.public_key()])
    assert not report.ok
    assert report.problems == ["checkpoint at 4: key 'audit' not trusted"]
    assert report.last_checkpoint_seq is None
    assert verify_log(path, public_keys=[other.public_key(), signer.public_key()]).ok


def test_a_signer_whose_key_does_not_match_is_refused(path: Path) -> None:
    liar = make_signer("ed25519")
    liar.algorithm = "ecdsa-p256-sha256"
    with pytest.raises(AuditError, match="does not match"):
        AuditLog(path, signer=liar)


# --- group commit --------------------------------------------------------------------

@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count fsync and fdatasync calls (the group commit's whole point)."""
    calls: list[int] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counting(fd: int, real: Callable[[int], None] = real) -> None:
            calls.append(fd)
            real(fd)
        monkeypatch.setattr(os, name, counting)
    yield calls


async def test_concurrent_appends_share_flushes(path: Path, signer: KeySigner,
                                                flushes: list[int]) -> None:
    log = AuditLog(path, signer=signer, checkpoint_every=400)
    log.append("node.started", {})
    flushes.clear()
    records = await asyncio.gather(*(log.append_async("ca.issued", {"i": i})
                                     for i in range(1000)))
    assert len(flushes) <= 5, len(flushes)  # one per loop turn, here all in one
    assert [r.data["i"] for r in records] == list(range(1000))
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == 1000
    # Each caller's record is the one on disk at its seq (checkpoints interleave).
    by_seq = {r["seq"]: r for r in lines(path)}
    assert all(by_seq[r.seq]["hash"] == r.hash.hex() and by_seq[r.seq]["data"]["i"] == i
               for i, r in enumerate(records))
    # The batch passed 400 and 800: one checkpoint, after its last record.
    assert log.head[0] == 1002 and lines(path)[-1]["kind"] == "checkpoint"
    log.close()
    report = verify_log(path, public_keys=[signer.public_key()])
    assert report.ok and report.records == 1002 and report.unsigned_tail == 0, report.problems


async def test_appends_during_a_flush_form_the_next_batch(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fdatasync

    def slow(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.05)
        real(fd)
    monkeypatch.setattr(os, "fdatasync", slow)
    log = AuditLog(path)
    first = [asyncio.ensure_future(log.append_async("ca.issued", {"i": i})) for i in range(10)]
    await asyncio.sleep(0.01)  # the first batch is now in its flush
    second = []
    for i in range(10, 20):  # ten separate loop turns, all during that flush
        second.append(asyncio.ensure_future(log.append_async("ca.issued", {"i": i})))
        await asyncio.sleep(0)
    records = await asyncio.gather(*first, *second)
    assert [r.data["i"] for r in records] == [r.seq - 1 for r in records] == list(range(20))
    assert len(calls) == 2
    log.close()
    assert verify_log(path).ok


async def test_sync_and_async_appends_mix(path: Path) -> None:
    log = AuditLog(path)
    pending = [asyncio.ensure_future(log.append_async("ca.issued", {"i": i})) for i in range(5)]
    await asyncio.sleep(0)
    mixed = log.append("node.note", {"sync": True})  # takes the lock in its turn
    records = await asyncio.gather(*pending)
    assert len({r.seq for r in records} | {mixed.seq}) == 6
    log.close()
    assert verify_log(path).ok


async def test_a_block_of_records_is_one_write_and_one_flush(
        path: Path, signer: KeySigner, flushes: list[int]) -> None:
    log = AuditLog(path, signer=signer, checkpoint_every=10)
    log.append("node.started", {})
    flushes.clear()
    records = await log.append_all_async(
        [("ca.issued", {"serial": f"{i:04x}", "names": [f"n{i}.trust"], "i": i})
         for i in range(50)])
    assert len(flushes) == 1
    assert [r.seq for r in records] == list(range(2, 52))
    assert all(r.prev == p.hash for p, r in itertools.pairwise(records))
    # one write: passing 10, 20, ... 50 gets one checkpoint, after its last record
    stored = lines(path)
    assert [r["kind"] for r in stored[1:]] == ["ca.issued"] * 50 + ["checkpoint"]
    assert [r["data"]["i"] for r in stored[1:51]] == list(range(50))
    assert await log.append_all_async([]) == []
    log.close()
    report = verify_log(path, public_keys=[signer.public_key()])
    assert report.ok and report.records == 52 and report.unsigned_tail == 0, report.problems


async def test_a_bad_record_in_a_block_refuses_the_block(path: Path) -> None:
    log = AuditLog(path)
    with pytest.raises(AuditError):
        await log.append_all_async([("ca.issued", {"i": 1}), ("ca.issued", {"bad": {1}})])
    assert log.head == (0, GENESIS)
    (record,) = await log.append_all_async([("ca.issued", {"i": 2})])
    assert record.seq == 1
    log.close()
    assert verify_log(path).ok


class Reason(enum.StrEnum):
    KEY_COMPROMISE = "key_compromise"


class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize("data", [
    {"zz": 1, "a": 2, "bb": 3, "é": 4, "ü" * 12: 5, "x" * 24: 6, "y" * 23: 7},
    {"nested": {"b": [b"\x00", {"ä": None, "a": True}], "aa": -(2**64)}, "k": 2**64 - 1},
    {"float": 0.5, "inner": {"f": [1.0, 1e300], "z": "x"}},
    {"reason": Reason.KEY_COMPROMISE, "level": Level.HIGH, "t": (1, "two")},
])
def test_data_is_hashed_as_its_deterministic_cbor_and_shown_in_the_callers_order(
        path: Path, data: dict[str, Any]) -> None:
    with AuditLog(path, clock=lambda: 12.5) as log:
        record = log.append("ca.issued", data)
    expected = hashlib.sha256(encode_deterministic({
        "seq": 1, "time": 12_500_000, "kind": "ca.issued",
        "data": _plain(data), "prev": bytes(32)})).digest()
    assert record.hash == expected
    (stored,) = lines(path)
    assert list(stored["data"]) == list(data)
    assert verify_log(path).ok


def _plain(value: Any) -> Any:
    """``value`` with enum members as their values and tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


async def test_a_bad_async_append_fails_alone(path: Path) -> None:
    log = AuditLog(path)
    good = asyncio.ensure_future(log.append_async("ca.issued", {"ok": 1}))
    with pytest.raises(AuditError):
        await log.append_async("ca.issued", {"bad": {1, 2}})
    assert (await good).seq == 1
    log.close()
    with pytest.raises(AuditError, match="closed"):
        await log.append_async("ca.issued", {})


async def test_async_write_failure_reaches_every_waiter(path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(path)

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fdatasync", broken)
    results = await asyncio.gather(*(log.append_async("ca.issued", {"i": i}) for i in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, AuditError) and "No space" in str(r) for r in results)
    monkeypatch.undo()
    log.close()


# --- the check at open ---------------------------------------------------------------

def signed_log(path: Path, signer: KeySigner, count: int) -> None:
    """``count`` records with a checkpoint after every 5 and an unsigned tail of 2."""
    with AuditLog(path, signer=signer, checkpoint_every=5, clock=ticking_clock()) as log:
        for i in range(count):
            log.append("ca.issued", {"serial": f"{i:04x}", "n": i})
    objs = lines(path)
    assert objs[-1]["kind"] == "checkpoint"  # close() signed the tail: drop that checkpoint
    write_lines(path, objs[:-1])


@pytest.mark.parametrize("where", ["after the last checkpoint", "the covered record",
                                   "the last checkpoint"])
def test_opening_refuses_a_log_edited_since_its_last_checkpoint(
        path: Path, signer: KeySigner, where: str) -> None:
    signed_log(path, signer, 12)
    objs = lines(path)
    last = max(i for i, o in enumerate(objs) if o["kind"] == "checkpoint")
    assert last < len(objs) - 1
    index = {"after the last checkpoint": last + 1, "the covered record": last - 1,
             "the last checkpoint": last}[where]
    if where == "the last checkpoint":
        objs[index]["data"]["covers_seq"] -= 1
    else:
        objs[index]["data"]["serial"] = "ffff"
    rehash(objs[index])  # a careful forger: only the chain or the signature gives it away
    write_lines(path, objs)
    with pytest.raises(AuditError, match=r"was altered: (record|checkpoint at) \d+"):
        AuditLog(path, signer=signer)
    assert not verify_log(path, public_keys=[signer.public_key()]).ok


def test_opening_checks_from_the_last_checkpoint_unless_told_to_check_all(
        path: Path, signer: KeySigner) -> None:
    signed_log(path, signer, 12)
    objs = lines(path)
    objs[2]["data"]["serial"] = "ffff"  # before the last checkpoint
    rehash(objs[2])
    write_lines(path, objs)
    with AuditLog(path, signer=signer):
        pass  # the tail is intact: opening stays cheap on a long log
    with pytest.raises(AuditError, match="record 4: prev does not match record 3"):
        AuditLog(path, signer=signer, check_all=True)


def test_opening_checks_a_log_without_checkpoints_whole(path: Path) -> None:
    fill(path, 6)
    objs = lines(path)
    objs[1]["data"]["serial"] = "ffff"
    write_lines(path, objs)
    with pytest.raises(AuditError, match="record 2: hash mismatch"):
        AuditLog(path)


@pytest.mark.parametrize("chunk", [64, 300, 1 << 16])
def test_the_last_checkpoint_is_found_across_read_chunks(
        path: Path, signer: KeySigner, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    signed_log(path, signer, 12)
    monkeypatch.setattr(audit, "_TAIL_CHUNK", chunk)
    raw = path.read_bytes()
    last = max(o["seq"] for o in lines(path) if o["kind"] == "checkpoint")
    covered = raw.index(b'{"seq":%d,' % (last - 1))
    with open(path, "rb") as handle:
        assert audit._tail_start(handle.fileno(), len(raw)) == covered
# --- the unsigned tail: signed at an interval ---------------------------------------------


def test_sign_tail_signs_only_unsigned_records(path: Path, signer: KeySigner) -> None:
    with AuditLog(path, signer=signer, checkpoint_every=0) as log:
        assert log.sign_tail() is None  # an empty log: nothing to sign
        log.append("ca.issued", {"n": 1})
        log.append("ca.issued", {"n": 2})
        assert log.unsigned
        report = verify_log(path)
        assert (report.unsigned_tail, report.last_seq, report.unsigned_range()) == (2, 2, (1, 2))
        checkpoint = log.sign_tail()
        assert checkpoint is not None and checkpoint.data["covers_seq"] == 2
        assert not log.unsigned and log.sign_tail() is None  # nothing new: no second one
        report = verify_log(path, public_keys=[signer.public_key()])
        assert report.ok and report.unsigned_tail == 0 and report.unsigned_range() is None
        log.append("ca.issued", {"n": 3})
        assert verify_log(path).unsigned_range() == (4, 4)
    with AuditLog(path) as unsigned_log:  # no signer: never a checkpoint
        unsigned_log.append("ca.issued", {"n": 4})
        assert unsigned_log.sign_tail() is None


async def test_a_running_log_signs_its_tail_within_the_interval(path: Path,
                                                                signer: KeySigner) -> None:
    log = AuditLog(path, signer=signer, checkpoint_every=0)
    task = asyncio.get_running_loop().create_task(log.sign_tail_every(0.2))
    try:
        for burst in range(3):
            written = await asyncio.gather(*(log.append_async("ca.issued", {"b": burst, "i": i})
                                             for i in range(5)))
            appended = time.monotonic()
            while log.unsigned and time.monotonic() - appended < 5:
                await asyncio.sleep(0.01)
            waited = time.monotonic() - appended
            assert waited < 1.0, waited  # 0.2 s and one flush, with room for a busy machine
            report = verify_log(path, public_keys=[signer.public_key()])
            assert report.ok and report.unsigned_tail == 0
            assert report.last_checkpoint_seq == written[-1].seq + 1
        # idle: no records, no checkpoints
        size = path.stat().st_size
        await asyncio.sleep(0.7)
        assert path.stat().st_size == size
        assert [kind for _, kind in kinds(path)].count("checkpoint") == 3
        assert log.checkpoint_failure is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.close()
