"""This validator's sealer: the decisions it makes within one event-loop turn share a
signature.

Every service that makes decisions (the CA, the faucet, the CT checkpoints) awaits
:meth:`Sealer.seal`. The first body of a turn schedules a flush with
``call_soon``, so it runs after every callback already due: whatever other
decision those callbacks make joins the batch, and none waits longer than that
turn. A batch is flushed at once when it reaches :data:`BATCH_LIMIT`. A batch of
one is sealed in the plain form, so a lone decision costs what it always did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from protocol import encode_deterministic

from ._sealed import seal_batch

BATCH_LIMIT = 256
"""The most decisions one signature covers: a path of at most 8 hashes (about 270
octets a decision). Past this the signature's share of a decision (54 us / 256) is
already below the cost of hashing its path; larger batches would only lengthen
every path."""


class Sealer:
    """Seals this validator's decisions in batches (spec/stoq.md §18.5).

    :param entry: this validator's id; ``sign`` signs with its key.
    :param limit: the largest batch.
    """

    def __init__(self, *, entry: str, sign: Callable[[bytes], bytes],
                 limit: int = BATCH_LIMIT) -> None:
        self.entry = entry
        self.sign = sign
        self.limit = limit
        self._pending: dict[bytes, list[asyncio.Future[bytes]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self.batches = 0
        """Signatures made (one a batch)."""
        self.sealed = 0
        """Decisions sealed."""

    async def seal(self, body: dict[str, Any]) -> bytes:
        """``body`` sealed, alone or with the other decisions of this loop turn."""
        raw = encode_deterministic(body)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(raw, []).append(future)  # the same body: one leaf
        if len(self._pending) >= self.limit:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            sealed = seal_batch(list(pending), self.entry, self.sign)
        except Exception as exc:  # the key is unusable: every waiter hears why
            for futures in pending.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        self.batches += 1
        self.sealed += len(sealed)
        for futures, decision in zip(pending.values(), sealed, strict=True):
            for future in futures:
                if not future.done():
                    future.set_result(decision)
