"""Worker processes that verify new VDFs beside the event loop.

chiavdf holds the GIL while it makes a discriminant and checks a proof (about
15-40 ms together), so a thread would stall the loop as much as an inline call.
Each worker is a plain child process (``python -c`` running
:func:`_native.worker_main`) spoken to over its pipes; nothing of the parent
program is re-imported in it, unlike ``multiprocessing``'s spawn and
forkserver. A worker that dies (whatever the input did to it) is replaced,
and the request it was serving gets an error instead of an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import cbor2

log = logging.getLogger("trustchain.consensus")

_WORKER_CODE = "from handlers.consensus._native import worker_main; worker_main()"


class WorkerFailed(Exception):
    """A worker process died or answered nonsense."""


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def call(self, payload: bytes) -> object:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(len(payload).to_bytes(4, "big") + payload)
            await stdin.drain()
            header = await stdout.readexactly(4)
            return cbor2.loads(await stdout.readexactly(int.from_bytes(header, "big")))
        except (asyncio.IncompleteReadError, ConnectionError, RuntimeError,
                cbor2.CBORDecodeError) as exc:  # uvloop: RuntimeError on a closed pipe
            raise WorkerFailed(f"the VDF worker failed ({type(exc).__name__})") from exc

    async def stop(self) -> None:
        if self.process.returncode is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 2)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()


class VdfWorkers:
    """At most ``count`` worker processes, started on first use, one request each at a time."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._slots = asyncio.Semaphore(count)
        self.restarts = 0

    async def _start(self) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WORKER_CODE, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        worker = _Worker(process)
        self._all.add(worker)
        return worker

    async def verify_time(self, seed: bytes, iterations: int, output: bytes,
                          proof: bytes) -> str | None:
        """:func:`_native.verify_time` in a worker.

        :raises WorkerFailed: the worker died on this input (it is replaced).
        """
        payload = cbor2.dumps([seed, iterations, output, proof])
        async with self._slots:
            worker = self._idle.pop() if self._idle else await self._start()
            try:
                answer = await worker.call(payload)
            except BaseException:
                self._all.discard(worker)
                self.restarts += 1
                await worker.stop()
                raise
            self._idle.append(worker)
        if answer is not None and not isinstance(answer, str):
            raise WorkerFailed("the VDF worker answered something that is not a verdict")
        return answer

    async def warm_up(self) -> None:
        """Start every worker now rather than at the first new VDF."""
        while len(self._all) < self.count:
            self._idle.append(await self._start())

    async def close(self) -> None:
        workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            await worker.stop()
