"""Real stores for the CT log on the replicated state, without a socket.

- :class:`CtNode`: one validator's :class:`CtLog` on its own :class:`StateDatabase`,
  tiles and software keys in a directory, fed blocks of entries in the order
  ``handlers.replica.CaStateMachine.execute`` uses: ``append`` (rows into the
  block's :class:`StateChanges`), ``stage`` (tiles durable), ``StateDatabase.apply``
  (the block's one transaction), ``published``. :meth:`CtNode.begin` and
  :meth:`CtNode.commit` expose the steps, so a test can stop between them (a crash).
- :class:`LoneValidator`: a cluster of one validator with every piece real:
  ``CtService`` -> ``DecisionLog`` -> ``ConsensusChain`` -> ``CaRules`` ->
  ``CaStateMachine`` -> ``CtLog``, for ``ct.add-chain`` through committed blocks.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import stoq
from handlers.ca import NamingPolicy, Publishers, _x509
from handlers.consensus import BeaconChain, ConsensusChain, ProofVerifier, Sealer, SealOpener
from handlers.consensus.bft import Validator, ValidatorSet
from handlers.consensus.bft._core import Timeouts
from handlers.ct import ChainValidator, CtBatch, CtLog, CtService, Entry
from handlers.replica import CaRules, CaStateMachine, DecisionLog
from protocol.ops.consensus import ProofParams
from store import (
    AuditLog,
    BeaconStore,
    ChainStore,
    MultisetHash,
    SoftwareKeyStore,
    StateChanges,
    StateDatabase,
    TileDirectory,
    state_hash,
)
from trustchain._peers import StoqPeerLinks

from .ca_fixtures import CaForTests

ORIGIN = "test.trust/ct"
EPOCH_LENGTH = 600
PARAMS = ProofParams(minimum_stake=1000, minimum_work_difficulty=8, plot_size=18,
                     vdf_iterations=1000, epoch_length=EPOCH_LENGTH)
POLICY = NamingPolicy(domains=("trust", "hypermesh"))
LIFETIME = 86400.0
BACKDATE = 60.0


def now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


def now_ms() -> int:
    return int(now() * 1000)


def cluster_ca(at: float | None = None) -> CaForTests:
    """A root and issuing intermediate made by the CA's own profile (``handlers.ca._x509``:
    key identifiers, name constraints), as a validator announces them; valid from an hour
    before ``at`` (default: now) for 30 days."""
    t = now() if at is None else at
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _x509.build_root(root_key, root_key.public_key(), ca_id="unit", domains=POLICY.domains,
                            not_before=t - 3600, not_after=t + 86400 * 30)
    key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _x509.build_intermediate(root_key, root, key.public_key(), ca_id="unit",
                                            number=1, domains=POLICY.domains,
                                            not_before=t - 3600, not_after=t + 86400 * 30)
    return CaForTests(root_key=root_key, root=root, key=key, intermediate=intermediate)


class CtNode:
    """One validator's CT log, its replicated state and its keys, under ``directory``.

    ``rows`` and ``height`` follow the state as the state machine keeps them: the
    multiset hash of every replicated row, and the last block applied.
    """

    def __init__(self, directory: Path, roots: Sequence[bytes], **log_options: Any) -> None:
        self.directory = directory
        self.keystore = SoftwareKeyStore(directory / "keys")
        self.state = StateDatabase(directory / "state" / "state.sqlite3")
        self.tiles = TileDirectory.in_directory(directory / "ct")
        self.log = CtLog(tiles=self.tiles, state=self.state, keystore=self.keystore,
                         origin=ORIGIN, **log_options)
        self.chains = ChainValidator(roots, clock=now)
        self.rows = MultisetHash.of(self.state.rows())
        self.height = self.state.height()

    @classmethod
    def open(cls, directory: Path, roots: Sequence[bytes], **log_options: Any) -> CtNode:
        """A node whose log is opened (shards loaded, staged tiles recovered); if the
        log cannot open, its state file is closed before the error propagates."""
        node = cls(directory, roots, **log_options)
        try:
            node.log.open()
        except BaseException:
            node.state.close()
            raise
        return node

    def entry(self, chain: Sequence[bytes], *, precert: bool = False) -> Entry:
        """A chain checked as a block's ``log`` decision checks it."""
        return Entry(chain=self.chains.check(chain, precert=precert), precert=precert)

    def begin(self, entries: Sequence[Entry], time_ms: int | None = None
              ) -> tuple[CtBatch, StateChanges]:
        """Append a block's entries in memory: its batch and its state transaction."""
        rows = self.rows.copy()
        height = self.height + 1
        changes = StateChanges(height=height, block_id=hashlib.sha256(b"%d" % height).digest(),
                               rows_hash=rows, state_hash=b"")
        batch = self.log.append(entries, now_ms() if time_ms is None else time_ms, changes,
                                rows)
        changes.state_hash = state_hash(height, rows)
        return batch, changes

    def commit(self, changes: StateChanges) -> None:
        """The block's one transaction (``StateDatabase.apply``)."""
        self.state.apply(changes)
        self.rows, self.height = changes.rows_hash, changes.height

    async def block(self, entries: Sequence[Entry], time_ms: int | None = None) -> CtBatch:
        """One block executed the way the state machine does: append, stage, apply,
        published."""
        batch, changes = self.begin(entries, time_ms)
        await self.log.stage(batch)
        await asyncio.get_running_loop().run_in_executor(None, self.commit, changes)
        self.log.published(batch)
        return batch

    async def installed(self) -> None:
        """Wait until the published tiles are written in place (off the critical path)."""
        while self.log._installing:
            await asyncio.gather(*list(self.log._installing), return_exceptions=True)

    async def close(self) -> None:
        await self.log.stop()
        await self.state.drain()
        self.state.close()
        self.keystore.close()


KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"lone validator").digest())
ME = Validator(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


class LoneValidator:
    """A cluster of one validator: every ``ct.add-chain`` is a ``log`` decision that a
    block commits and the state machine executes into the CT log."""

    def __init__(self, directory: Path, ca: CaForTests, **log_options: Any) -> None:
        self.directory = directory
        self.ca = ca
        self.node = CtNode.open(directory, [ca.root_der], **log_options)
        self.audit = AuditLog(directory / "audit" / "audit.log")
        self.beacon_store = BeaconStore(directory / "consensus" / "beacons.sqlite3")
        beacons = BeaconChain(store=self.beacon_store,
                              signer=self.node.keystore.get_or_create("beacon"),
                              epoch_length=EPOCH_LENGTH, audit=self.audit.append_async,
                              clock=now)
        self.verifier = ProofVerifier(params=PARAMS, ledger=self.node.state, beacons=beacons,
                                      workers=0, audit=self.audit.append_async, clock=now)
        self.machine = CaStateMachine(
            state=self.node.state, ct=self.node.log, chains=self.node.chains, policy=POLICY,
            root_der=ca.root_der, node_names={}, publishers=Publishers(),
            audit=self.audit.append_all_async, epoch_length=EPOCH_LENGTH, lifetime=LIFETIME,
            backdate=BACKDATE, minimum_stake=PARAMS.minimum_stake, development=True)
        rules = CaRules(machine=self.machine, policy=POLICY, verify_proofs=self.verifier.verify,
                        chains=self.node.chains, root=ca.root, node_names={},
                        lifetime=LIFETIME, backdate=BACKDATE, development=True,
                        minimum_stake=PARAMS.minimum_stake, seals=SealOpener(),
                        cosign=KEY.sign, clock=now)
        self.links = StoqPeerLinks(chain_id="ct-unit", me=ME.id, sign=KEY.sign,
                                   validators=ValidatorSet((ME,)), endpoints={},
                                   engine=stoq.ENGINES[0])
        self.chain = ConsensusChain(
            chain_id="ct-unit", validators=ValidatorSet((ME,)),
            store=ChainStore(directory / "consensus" / "chain.sqlite3"), transport=self.links,
            rules=rules, me=ME.id, sign=KEY.sign, timeouts=Timeouts(), block_interval=0.05,
            gossip_interval=0.05, clock=now)
        self.decisions = DecisionLog(chain=self.chain, machine=self.machine,
                                     sealer=Sealer(entry=ME.id, sign=KEY.sign), timeout=20.0,
                                     clock=now)
        self.service = CtService(self.node.log, self.node.chains, decisions=self.decisions,
                                 clock=now)

    @classmethod
    async def start(cls, directory: Path, ca: CaForTests, *,
                    genesis: dict[str, int] | None = None, **log_options: Any
                    ) -> LoneValidator:
        """Open the stores, the state (``genesis``: key id -> stake, for a new state) and
        start the chain (which first executes any committed block the state lacks)."""
        validator = cls(directory, ca, **log_options)
        await validator.machine.open(genesis)
        await validator.chain.start()
        return validator

    @property
    def log(self) -> CtLog:
        return self.node.log

    @property
    def blocks(self) -> int:
        """The height of the last committed block."""
        latest = self.chain.store.latest()
        return 0 if latest is None else latest.height

    async def stop(self) -> None:
        await self.chain.stop()
        await self.links.close()
        await self.verifier.close()
        await self.node.close()
        self.chain.store.close()
        self.beacon_store.close()
        self.audit.close()
