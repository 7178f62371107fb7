"""Client side of four-proof admission: build the proof set for ``ca.issue`` and ``ca.revoke``.

::

    prover = stoq.Prover.open(Path("trustchain-proofs"))   # requester key, plots, credentials
    await prover.ensure_stake(client)                       # development nodes have a faucet
    prover.ensure_plot(k)                                   # once: a chiapos plot bound to the key
    result = await client.request("ca.issue", {"csr": csr,
                                               "proofs": await prover.for_issue(client, csr)})

A :class:`Prover` owns one directory: ``requester.key`` (ECDSA P-256 by default,
or Ed25519: the key that holds stake and signs every binding), the plots made for it, and the epoch
credentials (space and time proofs) it has computed, one file per epoch. It
asks the node for the beacon and the parameters (``consensus.beacon``),
computes each epoch's credential once (the VDF dominates: about 12 s at the
production 1,000,000 iterations on one core here), then for every request
solves fresh proof of work on all cores and signs the binding.

The wire format is :mod:`protocol.ops.consensus`; spec/stoq.md §17 is its
reference. The node's side, which checks these proofs, is
``handlers.consensus._proofs``.

``chiapos`` and ``chiavdf`` are imported inside the three functions that call
them (:func:`space_proof`, :func:`time_proof`, :func:`vdf_speed`), not at the
top: a server (``trustchain serve``) imports ``stoq`` too, and only a client
that proves needs these native extensions. That is simpler than a lazy
``__getattr__`` in ``stoq/__init__.py``, which would need names declared
again for mypy, would load both libraries on the first ``stoq.Prover`` or
``except stoq.ProverError`` anyway, and would hide the package's contents
from a reader of its ``__init__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from protocol import decode_item, encode_deterministic, revocation_statement
from protocol.ops.consensus import (
    SPACE_CHALLENGES,
    VDF_DISCRIMINANT_BITS,
    VDF_FORM_SIZE,
    VDF_GENERATOR,
    Operation,
    ProofParams,
    ProofSet,
    SpaceProof,
    TimeProof,
    binding_statement,
    issue_digest,
    key_id,
    plot_id_for,
    revoke_digest,
    space_challenge,
    vdf_challenge,
    work_prefix,
    work_target,
)

from ._client import AsyncClient
from ._files import private_directory, write_atomic

Progress = Callable[[str, float], None]
"""``progress(message, fraction)``: what is being done and how far (0.0 to 1.0)."""

IN_PROCESS_WORK_BITS = 18
"""Difficulties up to this many bits are solved in the calling process (about 0.1 s);
harder ones on every core."""
WORK_CHUNK = 1 << 18
"""Nonces one worker tries before it reports back (about 0.1 s)."""


class ProverError(Exception):
    """The proofs cannot be built (no plot, no proof in the plot, a plotting failure).

    Not :class:`protocol.ct_merkle.ProofError`, which says a Merkle proof is wrong.
    """


# --- proof of work ------------------------------------------------------------------------


def search_work(prefix: bytes, difficulty: int, start: int, count: int) -> int | None:
    """The first nonce in ``[start, start + count)`` (8 bytes, big-endian) whose work hash
    has ``difficulty`` leading zero bits, or None. The prefix is hashed once; each try
    copies that state and adds 8 bytes (about 2.8 million tries a second per core here)."""
    target = work_target(difficulty)
    copy = hashlib.sha256(prefix).copy
    for nonce in range(start, start + count):
        attempt = copy()
        attempt.update(nonce.to_bytes(8, "big"))
        if attempt.digest() < target:
            return nonce
    return None


# A worker: plain hashlib, started with `python -c` (nothing of the parent program
# is imported again, unlike multiprocessing's spawn); prints the first nonce found.
_WORK_CODE = """
import hashlib, sys
copy = hashlib.sha256(bytes.fromhex(sys.argv[1])).copy
target, nonce = bytes.fromhex(sys.argv[2]), int(sys.argv[3])
while True:
    attempt = copy()
    attempt.update(nonce.to_bytes(8, "big"))
    if attempt.digest() < target:
        print(nonce, flush=True)
        break
    nonce += 1
"""


def solve_work(prefix: bytes, difficulty: int, *, workers: int | None = None) -> bytes:
    """An 8-byte nonce whose work hash reaches ``difficulty`` (blocking).

    Easy targets (up to ``IN_PROCESS_WORK_BITS``) are solved in this process;
    harder ones by ``workers`` child processes (default: every core), each
    searching its own range, the first answer winning.
    """
    if difficulty <= IN_PROCESS_WORK_BITS:
        # a random start: the same request asked twice (an Ed25519 CSR is deterministic)
        # must not find the same nonce, which the node would refuse as a replay
        start = int.from_bytes(os.urandom(6), "big") << 16
        while True:
            found = search_work(prefix, difficulty, start, WORK_CHUNK)
            if found is not None:
                return found.to_bytes(8, "big")
            start += WORK_CHUNK
    count = workers or os.cpu_count() or 1
    base = int.from_bytes(os.urandom(2), "big") << 40
    children = [subprocess.Popen(
        [sys.executable, "-c", _WORK_CODE, prefix.hex(), work_target(difficulty).hex(),
         str(base + (i << 36))], stdout=subprocess.PIPE, text=True) for i in range(count)]
    try:
        with selectors.DefaultSelector() as selector:
            for child in children:
                assert child.stdout is not None
                selector.register(child.stdout, selectors.EVENT_READ)
            while True:
                for ready, _ in selector.select():
                    line = ready.fileobj.readline()  # type: ignore[union-attr]
                    if line.strip():
                        return int(line).to_bytes(8, "big")
                    selector.unregister(ready.fileobj)
                    if not selector.get_map():
                        raise ProverError("every proof-of-work process ended without a nonce")
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()


# --- proof of space ---------------------------------------------------------------------


def plot_settings(k: int) -> tuple[int, int, int]:
    """``(buffer MiB, buckets, stripe)`` for chiapos at plot size ``k``.

    At k=18 a stripe of 1024 fails for about a quarter of plot ids ("Matches do
    not match with number of write entries"), always for the same ids, and 8192
    fails; 2048 and 4096 made every one of 80 plots here.
    """
    if k < 22:
        return 300, 16, 2048
    if k < 28:
        return 1000, 32, 8192
    return 3389, 128, 65536


_PHASE = re.compile(r"Starting phase (\d)/4")
_STEP = re.compile(r"^(?:Computing table|Backpropagating on table|Compressing tables) \d")
# Where each phase starts in the whole, and how many steps it prints: forward
# propagation (7 tables) takes about 45 % of a plot, backpropagation (6) 20 %,
# compression (6) 30 %, the checkpoint tables the rest.
_PHASE_START = {1: 0.0, 2: 0.45, 3: 0.65, 4: 0.95}
_PHASE_STEPS = {1: 7, 2: 6, 3: 6, 4: 1}


def create_plot(directory: Path, spki: bytes, k: int, *,
                progress: Progress | None = None) -> Path:
    """Make the chiapos plot of size ``k`` bound to key ``spki`` in ``directory``.

    Runs the plotter in a child process (it holds the GIL and prints a lot);
    its output drives ``progress``. A plot of k=18 takes about a second and
    4 MB; k=32 takes hours and about 101 GiB. Returns the plot's path.

    :raises ProverError: the plotter failed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    plot_id = plot_id_for(spki, k)
    final = directory / plot_filename(spki, k)
    if final.exists():
        return final
    tmp = directory / f".plotting-{plot_id.hex()[:16]}"
    tmp.mkdir(exist_ok=True)
    buffer, buckets, stripe = plot_settings(k)
    threads = max(1, os.cpu_count() or 1)
    code = ("import sys, chiapos; a = sys.argv[1:]; chiapos.DiskPlotter().create_plot_disk("
            "a[0], a[0], a[1], a[2], int(a[3]), b'', bytes.fromhex(a[4]), int(a[5]), int(a[6]),"
            " int(a[7]), int(a[8]), False)")
    status, tail = 0, list[str]()
    for attempt_stripe in (stripe, stripe * 2):  # a stripe that fails for an id always does
        argv = [sys.executable, "-c", code, str(tmp), str(directory), final.name, str(k),
                plot_id.hex(), str(buffer), str(buckets), str(attempt_stripe), str(threads)]
        status, tail = _run_plotter(argv, k, progress)
        if status == 0 and final.exists():
            break
    with contextlib.suppress(OSError):
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    if status != 0 or not final.exists():
        raise ProverError(f"chiapos could not make a k={k} plot (exit status {status}): "
                         + " / ".join(tail[-3:]))
    if progress is not None:
        progress(f"plotting k={k}: done", 1.0)
    return final


PLOTTER_STALL = 60.0
"""Seconds without a line of plotter output before the plotter is taken as stuck (chiapos
loops forever for a few plot ids with some settings; it prints often while it works)."""


def _run_plotter(argv: list[str], k: int, progress: Progress | None) -> tuple[int, list[str]]:
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as child:
        assert child.stdout is not None
        last_line = [time.monotonic()]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                if time.monotonic() - last_line[0] > PLOTTER_STALL:
                    child.kill()
                    return

        watchdog = threading.Thread(target=watch, name="plotter-watchdog", daemon=True)
        watchdog.start()
        try:
            status, tail = _read_plotter(child, k, progress, last_line)
        finally:
            done.set()
            watchdog.join()
        if status < 0:
            tail = [*tail, f"the plotter printed nothing for {PLOTTER_STALL:g} s and was "
                           "stopped"]
        return status, tail


def _read_plotter(child: subprocess.Popen[str], k: int, progress: Progress | None,
                  last_line: list[float]) -> tuple[int, list[str]]:
    """Follow the plotter's output (progress, the last lines) until it exits."""
    phase, steps = 1, 0
    tail: list[str] = []
    assert child.stdout is not None
    for line in child.stdout:
        last_line[0] = time.monotonic()
        tail = [*tail, line.rstrip()][-20:]
        if m := _PHASE.search(line):
            phase, steps = int(m.group(1)), 0
        elif _STEP.search(line):
            steps = min(steps + 1, _PHASE_STEPS[phase])
        else:
            continue
        if progress is not None:
            weight = _PHASE_START.get(phase + 1, 1.0) - _PHASE_START[phase]
            progress(f"plotting k={k}: phase {phase}/4",
                     _PHASE_START[phase] + weight * steps / _PHASE_STEPS[phase])
    return child.wait(), tail


def plot_filename(spki: bytes, k: int) -> str:
    return f"plot-k{k}-{plot_id_for(spki, k).hex()[:16]}.plot"


def space_proof(plot: Path, spki: bytes, k: int, beacon: bytes) -> SpaceProof:
    """The first of the epoch's challenges that the plot answers.

    :raises ProverError: the plot is not ``spki``'s, or answers none of them.
    """
    import chiapos  # only a proving client needs it (see the module docstring)

    plot_id = plot_id_for(spki, k)
    prover = chiapos.DiskProver(str(plot))
    if bytes(prover.get_id()) != plot_id or prover.get_size() != k:
        raise ProverError(f"{plot} is not the k={k} plot of this requester key")
    for index in range(SPACE_CHALLENGES):
        challenge = space_challenge(beacon, plot_id, index)
        if prover.get_qualities_for_challenge(challenge):
            proof = bytes(prover.get_full_proof(challenge, 0))
            return SpaceProof(plot_id=plot_id, k=k, index=index, proof=proof)
    raise ProverError(f"{plot} answers none of the {SPACE_CHALLENGES} challenges of this "
                     "epoch (improbable: is the plot damaged?)")


# --- proof of time -------------------------------------------------------------------------


def time_proof(beacon: bytes, epoch: int, spki: bytes, iterations: int) -> TimeProof:
    """The VDF of the epoch for key ``spki``: ``iterations`` sequential squarings
    (chiavdf releases the GIL while it works, so a thread may run it)."""
    import chiavdf  # only a proving client needs it (see the module docstring)

    seed = vdf_challenge(beacon, epoch, spki)
    result = bytes(chiavdf.prove(seed, VDF_GENERATOR, VDF_DISCRIMINANT_BITS, iterations, ""))
    return TimeProof(iterations=iterations, output=result[:VDF_FORM_SIZE],
                     proof=result[VDF_FORM_SIZE:2 * VDF_FORM_SIZE])


def vdf_speed(sample: int = 2000) -> float:
    """VDF iterations a second on this machine (a short measurement)."""
    import chiavdf  # only a proving client needs it (see the module docstring)

    started = time.perf_counter()
    chiavdf.prove(hashlib.sha256(b"speed").digest(), VDF_GENERATOR, VDF_DISCRIMINANT_BITS,
                  sample, "")
    return sample / max(time.perf_counter() - started, 1e-6)


# --- the prover -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Beacon:
    """What ``consensus.beacon`` said: the epoch, its beacon and the node's parameters."""

    epoch: int
    start: int
    end: int
    value: bytes
    params: ProofParams
    development: bool

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> Beacon:
        return cls(epoch=result["epoch"], start=result["start"], end=result["end"],
                   value=result["beacon"], params=ProofParams.from_wire(result["params"]),
                   development=result.get("mode") == "development")


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """One epoch's space and time proofs for one key: made once, used for every request."""

    epoch: int
    beacon: bytes
    space: SpaceProof
    time: TimeProof

    def to_bytes(self) -> bytes:
        return encode_deterministic({"epoch": self.epoch, "beacon": self.beacon,
                                     "space": self.space.to_wire(),
                                     "time": self.time.to_wire()})

    @classmethod
    def from_bytes(cls, data: bytes) -> Credential:
        raw = decode_item(data)
        return cls(epoch=raw["epoch"], beacon=raw["beacon"], space=SpaceProof(**raw["space"]),
                   time=TimeProof(**raw["time"]))


RequesterKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def load_or_create_requester_key(path: Path) -> RequesterKey:
    """The requester key in ``path`` (PEM, PKCS#8): P-256, P-384 or Ed25519; a new P-256
    key (mode 0600) if the file is absent. P-256 is the default; since validators check
    Ed25519 with libsodium (``protocol.ed25519``), an Ed25519 key is checked faster
    (about 56 µs here, against about 80 µs for P-256)."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ed25519.Ed25519PrivateKey) or (
                isinstance(key, ec.EllipticCurvePrivateKey)
                and isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1)):
            return key
        raise ProverError(f"{path}: the requester key must be a P-256, P-384 or Ed25519 key")
    key = ec.generate_private_key(ec.SECP256R1())
    write_atomic(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)
    return key


def sign_binding(key: RequesterKey, statement: bytes) -> bytes:
    """The binding signature (spec §10.6.6 formats): Ed25519, or ECDSA with SHA-256 (P-256)
    or SHA-384 (P-384), DER."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(statement)
    digest = hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()
    return bytes(key.sign(statement, ec.ECDSA(digest)))


class Prover:
    """A requester's proof material in one directory, and the proof sets built from it.

    :param workers: processes for proof of work above ``IN_PROCESS_WORK_BITS``
        (default: every core).
    """

    KEY_FILE = "requester.key"

    def __init__(self, directory: Path, key: RequesterKey, *,
                 workers: int | None = None, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.key = key
        self.workers = workers
        self.clock = clock
        self.spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.key_id = key_id(self.spki).hex()
        self._beacon: Beacon | None = None
        self._credentials: dict[tuple[int, bytes], Credential] = {}
        self._preparing: dict[tuple[int, bytes], asyncio.Future[Credential]] = {}

    @classmethod
    def open(cls, directory: Path, **kwargs: Any) -> Prover:
        """The prover of ``directory``; makes the directory (mode 0700) and its requester
        key (mode 0600) the first time."""
        private_directory(directory)
        return cls(directory, load_or_create_requester_key(directory / cls.KEY_FILE), **kwargs)

    # --- the node's view -------------------------------------------------------------

    async def beacon(self, client: AsyncClient, *, refresh: bool = False) -> Beacon:
        """The current epoch's beacon, asked again once the epoch it knows has ended."""
        known = self._beacon
        if refresh or known is None or self.clock() >= known.end:
            known = self._beacon = Beacon.from_result(await client.request("consensus.beacon"))
        return known

    async def stake(self, client: AsyncClient) -> int:
        return int((await client.request("consensus.stake", {"key": self.spki}))["amount"])

    async def ensure_stake(self, client: AsyncClient) -> int:
        """Top the key's stake up from the node's faucet if it is below the minimum.

        Only development nodes have a faucet; on a production node the key must
        be in the ledger already (its ``key_id`` in ``consensus.genesis``).
        :returns: the stake the key holds.
        :raises protocol.Unauthorized: below the minimum on a production node.
        """
        info = await client.request("consensus.stake", {"key": self.spki})
        if info["sufficient"]:
            return int(info["amount"])
        return int((await client.request("consensus.faucet", {"key": self.spki}))["amount"])

    # --- plots --------------------------------------------------------------------------

    def plot_path(self, k: int) -> Path:
        return self.directory / plot_filename(self.spki, k)

    def plot_for(self, minimum_k: int) -> tuple[Path, int] | None:
        """The smallest plot of this key with ``k >= minimum_k``, if there is one."""
        for k in range(minimum_k, 51):
            path = self.plot_path(k)
            if path.exists():
                return path, k
        return None

    def ensure_plot(self, k: int, *, progress: Progress | None = None) -> Path:
        """This key's plot of size ``k`` (at least), made now if there is none."""
        found = self.plot_for(k)
        if found is not None:
            return found[0]
        return create_plot(self.directory, self.spki, k, progress=progress)

    # --- epoch credentials --------------------------------------------------------------

    def _credential_file(self, epoch: int, beacon: bytes) -> Path:
        return (self.directory / "credentials"
                / f"epoch-{epoch}-{beacon[:8].hex()}-{self.key_id[:16]}.cbor")

    def credential_for(self, beacon: Beacon, *, progress: Progress | None = None,
                       make_plot: bool = True) -> Credential:
        """The space and time proofs of ``beacon``'s epoch (computed, or from disk).

        Blocking: the VDF runs for ``vdf_iterations`` squarings; use
        :meth:`credential` on an event loop.
        """
        cache = (beacon.epoch, beacon.value)
        known = self._credentials.get(cache)
        params = beacon.params
        if known is not None and known.time.iterations >= params.vdf_iterations \
                and known.space.k >= params.plot_size:
            return known
        path = self._credential_file(beacon.epoch, beacon.value)
        if path.exists():
            with contextlib.suppress(Exception):
                stored = Credential.from_bytes(path.read_bytes())
                if stored.beacon == beacon.value and stored.epoch == beacon.epoch \
                        and stored.space.plot_id == plot_id_for(self.spki, stored.space.k) \
                        and stored.time.iterations >= params.vdf_iterations \
                        and stored.space.k >= params.plot_size:
                    self._credentials[cache] = stored
                    return stored
        found = self.plot_for(params.plot_size)
        if found is None:
            if not make_plot:
                raise ProverError(f"no plot of size k >= {params.plot_size} in "
                                 f"{self.directory}: run `trustchain proofs plot`")
            plot, k = self.ensure_plot(params.plot_size, progress=progress), params.plot_size
        else:
            plot, k = found
        space = space_proof(plot, self.spki, k, beacon.value)
        vdf = self._time_with_progress(beacon, params.vdf_iterations, progress)
        credential = Credential(epoch=beacon.epoch, beacon=beacon.value, space=space, time=vdf)
        write_atomic(path, credential.to_bytes())
        for old in path.parent.glob("epoch-*.cbor"):  # older epochs are no longer accepted
            with contextlib.suppress(ValueError, OSError):
                if int(old.name.split("-")[1]) < beacon.epoch - 1:
                    old.unlink()
        self._credentials[cache] = credential
        return credential

    def _time_with_progress(self, beacon: Beacon, iterations: int,
                            progress: Progress | None) -> TimeProof:
        if progress is None:
            return time_proof(beacon.value, beacon.epoch, self.spki, iterations)
        estimate = iterations / vdf_speed()
        box: list[TimeProof | BaseException] = []

        def run() -> None:
            try:
                box.append(time_proof(beacon.value, beacon.epoch, self.spki, iterations))
            except BaseException as exc:  # handed to the caller
                box.append(exc)

        worker = threading.Thread(target=run, name="vdf", daemon=True)
        started = time.monotonic()
        worker.start()
        while worker.is_alive():
            elapsed = time.monotonic() - started
            progress(f"VDF {iterations:,} iterations: {elapsed:.1f} s of about {estimate:.1f} s",
                     min(0.99, elapsed / max(estimate, 1e-3)))
            worker.join(0.5)
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        progress(f"VDF {iterations:,} iterations: done in {time.monotonic() - started:.1f} s",
                 1.0)
        return result

    async def credential(self, client: AsyncClient, *,
                         progress: Progress | None = None) -> Credential:
        """The current epoch's credential; computed once (in a thread), then remembered."""
        beacon = await self.beacon(client)
        cache = (beacon.epoch, beacon.value)
        known = self._credentials.get(cache)
        if known is not None:
            return known
        pending = self._preparing.get(cache)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(
                self.credential_for, beacon, progress=progress))
            self._preparing[cache] = pending
            pending.add_done_callback(lambda _: self._preparing.pop(cache, None))
        return await asyncio.shield(pending)

    # --- proof sets ---------------------------------------------------------------------

    def build(self, op: Operation, request: bytes, beacon: Beacon,
              credential: Credential) -> ProofSet:
        """The proof set for one request: fresh work on the credential, signed (blocking)."""
        prefix = work_prefix(op, request, key_id(self.spki), credential.epoch)
        nonce = solve_work(prefix, beacon.params.minimum_work_difficulty,
                           workers=self.workers)
        statement = binding_statement(op=op, request=request, epoch=credential.epoch,
                                      space=credential.space.digest(),
                                      time=credential.time.digest(), nonce=nonce)
        return ProofSet(epoch=credential.epoch, requester_key=self.spki,
                        space=credential.space, time=credential.time, nonce=nonce,
                        binding=sign_binding(self.key, statement))

    async def proofs(self, client: AsyncClient, op: Operation,
                     request: bytes) -> dict[str, Any]:
        """The ``proofs`` argument for operation ``op`` on request digest ``request``.

        The beacon is asked for once per epoch; a node that lost its ledger (a new
        data directory) has a new beacon for the same epoch: after ``proof_invalid``
        for ``space`` or ``time``, call :meth:`beacon` with ``refresh=True``.
        """
        credential = await self.credential(client)
        beacon = await self.beacon(client)
        if beacon.params.minimum_work_difficulty <= IN_PROCESS_WORK_BITS - 4:
            proof_set = self.build(op, request, beacon, credential)
        else:
            proof_set = await asyncio.to_thread(self.build, op, request, beacon, credential)
        return proof_set.to_wire()

    async def for_issue(self, client: AsyncClient, csr: bytes) -> dict[str, Any]:
        """``proofs`` for ``ca.issue`` of ``csr`` (DER); fits ``CertificateRenewer(proofs=)``
        as ``lambda csr: prover.for_issue(client, csr)``."""
        return await self.proofs(client, "issue", issue_digest(csr))

    async def for_revoke(self, client: AsyncClient, serial: str, reason: str,
                         at: int) -> dict[str, Any]:
        """``proofs`` for ``ca.revoke`` of ``serial`` (normalised) with ``reason`` at ``at``."""
        return await self.proofs(client, "revoke",
                                 revoke_digest(revocation_statement(serial, reason, at)))
