"""Worker processes that build and sign leaf certificates beside the event loop.

Opt-in (``ca.signing_workers``). Each worker is a plain child process
(``python -c`` running :func:`worker_main`) spoken to over its pipes with
length-prefixed CBOR, like the consensus VDF workers; nothing of the parent
program is re-imported in it. A worker opens the node's keystore itself (the
same key directory, or its own login and session on the same PKCS#11 token):
the first frame on its stdin says how, PIN included (never on the command
line, never logged). Then each request carries what :func:`_x509.sign_leaf`
needs and the answer is the certificate's DER, so a certificate signed in a
worker is byte-for-byte the shape of one signed on the event loop.

A worker that dies or stops answering is replaced, and the request it was
serving gets an error instead of an answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cbor2
from cryptography import x509

from protocol import Internal

from ._authority import Issuer
from ._leaf import Extensions, LeafTemplate
from ._policy import CheckedRequest

log = logging.getLogger("trustchain.ca")

_WORKER_CODE = "from handlers.ca._signing import worker_main; worker_main()"
CALL_TIMEOUT = 30.0
"""Seconds a worker may take over one certificate before it is replaced."""
START_TIMEOUT = 60.0
"""Seconds a new worker may take to open the keystore (a PKCS#11 login)."""


class WorkerFailed(Internal):
    """The signing worker failed; the certificate was not issued."""


@dataclass(frozen=True)
class KeystoreSettings:
    """What :func:`store.open_keystore` needs; a worker opens its own keystore with it."""

    provider: str
    data_dir: str
    module_path: str = ""
    token_label: str = ""
    pin: str = ""

    def __repr__(self) -> str:  # never the PIN
        return f"KeystoreSettings(provider={self.provider!r}, data_dir={self.data_dir!r})"


def _frame(value: object) -> bytes:
    payload = cbor2.dumps(value)
    return len(payload).to_bytes(4, "big") + payload


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.worker.received(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self.worker.lost("its output closed")

    def process_exited(self) -> None:
        self.worker.lost("it exited")
        if not self.worker.exited.done():
            self.worker.exited.set_result(None)


class _Worker:
    """One worker process; requests are pipelined and answered in order."""

    def __init__(self, on_lost: Callable[[_Worker], None]) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.SubprocessTransport | None = None
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.dead: str | None = None
        self._buffer = bytearray()
        self._on_lost = on_lost

    @property
    def pid(self) -> int:
        assert self.transport is not None
        return self.transport.get_pid()

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        """The future answer to one request frame."""
        if self.dead is not None or self.transport is None:
            raise WorkerFailed(f"the signing worker failed ({self.dead})")
        stdin = cast(asyncio.WriteTransport, self.transport.get_pipe_transport(0))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        stdin.write(payload)
        return future

    def received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            end = 4 + int.from_bytes(buffer[:4], "big")
            if len(buffer) < end:
                return
            try:
                answer = cbor2.loads(bytes(buffer[4:end]))
            except cbor2.CBORDecodeError:
                self.lost("it answered something that is not CBOR")
                return
            del buffer[:end]
            if not self.pending:
                self.lost("it answered a question nobody asked")
                return
            future = self.pending.popleft()
            if not future.done():  # a caller that gave up leaves its place in the queue
                future.set_result(answer)

    def lost(self, why: str) -> None:
        """The worker is unusable: fail what it was serving and kill it."""
        if self.dead is not None:
            return
        self.dead = why
        pending, self.pending = self.pending, collections.deque()
        for future in pending:
            if not future.done():
                future.set_exception(WorkerFailed(f"the signing worker failed ({why})"))
        if self.transport is not None and self.transport.get_returncode() is None:
            with contextlib.suppress(ProcessLookupError):
                self.transport.kill()
        self._on_lost(self)

    async def stop(self) -> None:
        if self.transport is None:
            return
        if self.transport.get_returncode() is None:
            stdin = self.transport.get_pipe_transport(0)
            if stdin is not None:
                stdin.close()
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), 2)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.transport.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.exited), 2)
        self.transport.close()


def _answer(reply: Any) -> Any:
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] in ("ok", "error")):
        raise WorkerFailed("the signing worker answered nonsense")
    if reply[0] == "error":
        raise WorkerFailed(f"the signing worker could not sign: {reply[1]}")
    return reply[1]


class SigningWorkers:
    """``count`` signing processes; each request goes to the one with the least in hand.

    Started by :meth:`warm_up` (or the first request); one that dies is replaced in
    the background.
    """

    def __init__(self, count: int, keystore: KeystoreSettings, *,
                 call_timeout: float = CALL_TIMEOUT) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count
        self._settings = keystore
        self.call_timeout = call_timeout
        self._live: list[_Worker] = []
        self._starting = 0
        self._start_lock = asyncio.Lock()
        self._refills: set[asyncio.Task[None]] = set()
        self._closed = False
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._live]

    def _lost(self, worker: _Worker) -> None:
        if worker in self._live:
            self._live.remove(worker)
            self.restarts += 1
            log.warning("signing worker replaced", extra={"reason": worker.dead})
            self._replace()

    async def _start(self) -> _Worker:
        loop = asyncio.get_running_loop()
        worker = _Worker(self._lost)
        self._starting += 1
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _Protocol(worker), sys.executable, "-c", _WORKER_CODE,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
            worker.transport = transport
            s = self._settings
            try:
                _answer(await asyncio.wait_for(worker.send(_frame({
                    "provider": s.provider, "data_dir": s.data_dir,
                    "module_path": s.module_path, "token_label": s.token_label,
                    "pin": s.pin})), START_TIMEOUT))
            except BaseException:
                worker.lost("it did not start")
                await worker.stop()
                raise
        finally:
            self._starting -= 1
        if self._closed:
            await worker.stop()
            raise WorkerFailed("the signing workers are closed")
        self._live.append(worker)
        return worker

    async def _pick(self) -> _Worker:
        if not self._live:
            async with self._start_lock:
                if not self._live:
                    await self._start()
        if len(self._live) + self._starting < self.count:
            self._replace()
        return min(self._live, key=lambda w: len(w.pending))

    async def sign(self, *, issuer_name: str, issuer_der: bytes, request: CheckedRequest,
                   serial: int, not_before: float, not_after: float,
                   extensions: Sequence[x509.Extension[x509.ExtensionType]]) -> bytes:
        """:func:`_x509.sign_leaf` in a worker, with the key named ``issuer_name``.

        :raises WorkerFailed: the worker could not sign, or died (it is replaced).
        """
        return await self._call(_frame([
            issuer_name, issuer_der, request.spki_der, list(request.dns_names),
            [str(ip) for ip in request.ip_addresses], serial, not_before, not_after,
            [[e.oid.dotted_string, e.critical, e.value.public_bytes()] for e in extensions]]))

    async def sign_tbs(self, issuer: Issuer, tbs: bytes) -> bytes:
        """:class:`LeafSigner`: :func:`_leaf_der.signature` of ``tbs`` in a worker, with
        the key named ``issuer.name``.

        :raises WorkerFailed: the worker could not sign, or died (it is replaced).
        """
        return await self._call(_frame([issuer.name, tbs]))

    async def _call(self, payload: bytes) -> bytes:
        """The answer of the worker with the least in hand to one request frame."""
        worker = await self._pick()
        try:
            reply = await asyncio.wait_for(worker.send(payload), self.call_timeout)
        except TimeoutError as exc:
            worker.lost("it did not answer in time")
            raise WorkerFailed("the signing worker did not answer in time") from exc
        signed = _answer(reply)
        if not isinstance(signed, bytes):
            raise WorkerFailed("the signing worker answered something that is not a "
                               "certificate or a signature")
        return signed

    async def sign_leaf(self, leaf: LeafTemplate, extensions: Extensions) -> bytes:
        """:class:`LeafSigner`: :meth:`sign` for a template."""
        return await self.sign(issuer_name=leaf.issuer.name, issuer_der=leaf.issuer.der,
                               request=leaf.request, serial=leaf.serial,
                               not_before=leaf.not_before, not_after=leaf.not_after,
                               extensions=extensions)

    def _replace(self) -> None:
        """Start a worker in place of a dead one, in the background."""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._refill())
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _refill(self) -> None:
        if len(self._live) + self._starting >= self.count:
            return
        try:
            await self._start()
        except Exception as exc:  # the next request tries again (and reports why not)
            log.error("cannot start a signing worker", extra={"error": str(exc)})

    async def warm_up(self) -> None:
        """Start every worker now rather than at the first issuance."""
        while len(self._live) + self._starting < self.count:
            await self._start()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._refills):
            task.cancel()
        workers, self._live = self._live, []
        for worker in workers:
            worker.dead = worker.dead or "closed"
            await worker.stop()


# --- the worker process -------------------------------------------------------------------


def _key(keystore: Any, keys: dict[str, Any], issuer_name: str) -> Any:
    """The private key named ``issuer_name``, opened once."""
    key = keys.get(issuer_name)
    if key is None:
        signer = keystore.get(issuer_name)
        if signer is None:
            raise LookupError(f"no key {issuer_name!r} in the keystore")
        key = keys[issuer_name] = signer.private_key()
    return key


def _sign(keystore: Any, keys: dict[str, Any], issuers: dict[bytes, x509.Certificate],
          message: list[Any]) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization

    from . import _leaf_der, _x509

    if len(message) == 2:  # [issuer_name, tbs]: the signature of a final certificate's TBS
        return _leaf_der.signature(message[1], _key(keystore, keys, message[0]))
    (issuer_name, issuer_der, spki_der, dns_names, ips, serial, not_before, not_after,
     extras) = message
    key = _key(keystore, keys, issuer_name)
    issuer = issuers.get(issuer_der)
    if issuer is None:
        issuer = issuers[issuer_der] = x509.load_der_x509_certificate(issuer_der)
    public_key = serialization.load_der_public_key(spki_der)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki_der)
    request = CheckedRequest(public_key=public_key,  # type: ignore[arg-type]
                             spki_der=spki_der, spki_sha256=digest.finalize().hex(),
                             dns_names=tuple(dns_names),
                             ip_addresses=tuple(ipaddress.IPv6Address(ip) for ip in ips))
    extensions = [x509.Extension(x509.ObjectIdentifier(oid), critical,
                                 x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value))
                  for oid, critical, value in extras]
    return _x509.sign_leaf(issuer, request, serial=serial, not_before=not_before,
                           not_after=not_after, extensions=extensions, private_key=key)


def _frames(fd: int) -> Iterator[list[Any]]:
    """Batches of the request frames on ``fd``: every whole frame one read brought."""
    buffer = bytearray()
    while chunk := os.read(fd, 1 << 16):
        buffer += chunk
        batch = []
        while len(buffer) >= 4:
            end = 4 + int.from_bytes(buffer[:4], "big")
            if len(buffer) < end:
                break
            batch.append(cbor2.loads(bytes(buffer[4:end])))
            del buffer[:end]
        if batch:
            yield batch


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def worker_main() -> None:
    """Serve signing requests on stdin/stdout: a signing worker process.

    Frames are a 4-byte big-endian length and CBOR. The first request is the
    keystore settings (a map); every later one the array ``[issuer_name,
    issuer_der, spki_der, dns_names, ip_addresses, serial, not_before,
    not_after, [[oid, critical, value_der], ...]]`` (a leaf to sign: the answer is
    its DER) or ``[issuer_name, tbs]`` (the answer is the signature of ``tbs``).
    Each answer, in order, is
    ``["ok", value]`` or ``["error", reason]``; the answers to the requests one
    read brought go out in one write. Ends at end of input.
    """
    # Keep the frames to ourselves: anything else that writes to stdout goes to stderr.
    sink = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    source = sys.stdin.fileno()

    from store import open_keystore

    requests = _frames(source)
    first = next(requests, None)
    if not first:
        return
    settings, backlog = first[0], first[1:]
    try:
        keystore = open_keystore(provider=settings["provider"],
                                 data_dir=Path(settings["data_dir"]),
                                 module_path=settings["module_path"],
                                 token_label=settings["token_label"], pin=settings["pin"])
    except Exception as exc:
        _write_all(sink, _frame(["error", f"cannot open the keystore: {exc}"]))
        return
    del settings
    _write_all(sink, _frame(["ok", None]))
    keys: dict[str, Any] = {}
    issuers: dict[bytes, x509.Certificate] = {}
    try:
        for batch in itertools.chain([backlog], requests):
            answers = []
            for message in batch:
                try:
                    answers.append(_frame(["ok", _sign(keystore, keys, issuers, message)]))
                except Exception as exc:
                    answers.append(_frame(["error", f"{type(exc).__name__}: {exc}"]))
            if answers:
                _write_all(sink, b"".join(answers))
    finally:
        keystore.close()
