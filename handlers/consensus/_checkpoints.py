"""CT checkpoints before the validators: each committed one is cosigned by the quorum.

Every ``interval`` seconds, each CT shard whose checkpoint grew since the last
submission is put before the cluster as a ``checkpoint`` decision; once
committed, the precommits carry the validators' C2SP cosignatures of it
(``consensus.checkpoint``, spec/stoq.md §18.11).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from store import TreeHead

from .._tasks import cancel_and_wait
from ._driver import ConsensusChain
from ._sealer import Sealer

log = logging.getLogger("trustchain.consensus")

Checkpoints = Callable[[], Iterable[tuple[str, TreeHead]]]
"""``(origin, latest checkpoint)`` of every CT shard."""


class CheckpointSubmitter:
    """Submits each CT shard's new checkpoints to the chain.

    :param sealer: seals with this validator's key (the decisions' seal).
    """

    def __init__(self, *, chain: ConsensusChain, checkpoints: Checkpoints, sealer: Sealer,
                 interval: float) -> None:
        self.chain = chain
        self.checkpoints = checkpoints
        self.sealer = sealer
        self.interval = interval
        self._submitted: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for origin, checkpoint in list(self.checkpoints()):
                if checkpoint.size == 0 or self._submitted.get(origin) == checkpoint.size:
                    continue
                if await self._submit(origin, checkpoint):
                    self._submitted[origin] = checkpoint.size

    async def _submit(self, origin: str, checkpoint: TreeHead) -> bool:
        body = {"kind": "checkpoint", "origin": origin, "size": checkpoint.size,
                "root": checkpoint.root, "note": checkpoint.note,
                "at_ms": int(self.chain.clock() * 1000)}
        try:
            await self.chain.submit(await self.sealer.seal(body), checked=False,
                                    timeout=60)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("CT checkpoint not committed: %s", exc)
            return False
        return True
