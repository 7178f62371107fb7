"""The CT log as a process: SIGKILL in the middle of a stream of add-chain calls loses
no entry whose SCT a client received, and the restarted log is consistent with every
tree head handed out before the kill."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

import stoq
from protocol import ct_merkle as merkle
from protocol import ct_structs as ct

from ..ca_fixtures import make_ca
from ..ct_load import add_chains_until_killed
from ..helpers import start_server_process


async def test_sigkill_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    ca = make_ca("Kill")
    root = tmp_path / "extra-root.pem"
    root.write_bytes(ca.root.public_bytes(serialization.Encoding.PEM))
    extra = f'[ct]\nextra_roots = ["{root}"]\n'
    leaves = [ca.leaf(f"k{i}.trust") for i in range(3500)]
    server = start_server_process(tmp_path, "qh3", extra)
    try:
        acknowledged, heads = await add_chains_until_killed(server, leaves, ca.der, 1.5)
    finally:
        server.stop()
    assert len(acknowledged) > 200, len(acknowledged)
    assert len(heads) > 5

    restarted = start_server_process(tmp_path, "qh3", extra)
    try:
        client = await stoq.connect("::1", restarted.port, pin=restarted.pin, timeout=10)
        key = (await stoq.ShardKeys.fetch(client)).keys[0]
        sth = await client.request("ct.get-sth")
        stoq.verify_sth(sth, key)
        size = sth["tree_size"]
        assert size >= len(acknowledged)
        # Every acknowledged SCT: its entry is at its leaf_index, with its timestamp.
        by_index = {sct["leaf_index"]: (der, sct) for der, sct in acknowledged}
        start = 0
        while start < size:
            got = await client.request("ct.get-entries", {"start": start,
                                                          "end": min(size, start + 999)})
            for i, entry in enumerate(got["entries"], start):
                if i in by_index:
                    der, sct = by_index.pop(i)
                    te = ct.parse_merkle_tree_leaf(entry["leaf_input"])
                    assert te.certificate == der and te.timestamp == sct["timestamp"]
                    assert te.leaf_index == i
            start += len(got["entries"])
        assert not by_index, f"{len(by_index)} acknowledged entries are missing"
        # The new tree extends every tree head handed out before the kill.
        for head in heads:
            await stoq.verify_consistency(client, 0, head, sth)
        merkle.verify_consistency(heads[-1]["tree_size"], size, heads[-1]["sha256_root_hash"],
                                  sth["sha256_root_hash"], (await client.request(
                                      "ct.get-sth-consistency",
                                      {"first": heads[-1]["tree_size"], "second": size}
                                  ))["consistency"] if heads[-1]["tree_size"] < size else [])
        # And it goes on: a new entry gets the next index.
        before = time.time()
        fresh = await client.request("ct.add-chain", {"chain": [leaves[-1], ca.der]})
        if leaves[-1] not in {der for der, _ in acknowledged}:
            assert fresh["leaf_index"] >= size and fresh["timestamp"] >= int(before * 1000) - 1
        await client.close()
    finally:
        restarted.stop()
