"""CT load for process tests: add-chain submitters and a tree-head watcher until a SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import stoq

from .helpers import ServerProcess


async def add_chains_until_killed(server: ServerProcess, leaves: list[bytes], issuer: bytes,
                                  seconds: float) -> tuple[list[tuple[bytes, dict[str, Any]]],
                                                           list[dict[str, Any]]]:
    """32 submitters and a tree-head watcher for ``seconds``, then SIGKILL."""
    acknowledged: list[tuple[bytes, dict[str, Any]]] = []
    heads: list[dict[str, Any]] = []
    client = await stoq.connect("::1", server.port, pin=server.pin, timeout=5)
    key = (await stoq.ShardKeys.fetch(client)).keys[0]
    queue = iter(leaves)

    async def submitter() -> None:
        for der in queue:
            try:
                sct = await client.request("ct.add-chain", {"chain": [der, issuer]})
            except Exception:
                return
            acknowledged.append((der, sct))

    async def watcher() -> None:
        while True:
            try:
                sth = await client.request("ct.get-sth")
            except Exception:
                return
            stoq.verify_sth(sth, key)
            heads.append(sth)
            await asyncio.sleep(0.05)

    tasks = [asyncio.ensure_future(submitter()) for _ in range(32)]
    tasks.append(asyncio.ensure_future(watcher()))
    await asyncio.sleep(seconds)
    os.kill(server.proc.pid, signal.SIGKILL)
    await asyncio.wait(tasks, timeout=20)
    await client.close()
    return acknowledged, heads
