"""``consensus.*`` ops: the epoch beacon, stake lookups and the development faucet."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from protocol import InvalidRequest, NotFound, Unauthorized, Unavailable
from protocol.ops import consensus as ops
from protocol.ops.consensus import ProofParams
from store import BeaconRecord

from .._router import RequestContext, Router
from .._tasks import cancel_and_wait
from ._beacon import BeaconChain
from ._stake import Faucet
from ._verifier import ProofVerifier

log = logging.getLogger("trustchain.consensus")


def _key_id_of(der: bytes, field: str = "key") -> str:
    """The ledger account of a DER public key; InvalidRequest unless it is one we verify."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise InvalidRequest(f"{field} is not a DER SubjectPublicKeyInfo", field=field) from None
    if not (isinstance(key, ed25519.Ed25519PublicKey) or (
            isinstance(key, ec.EllipticCurvePublicKey)
            and isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1))):
        raise InvalidRequest(f"{field} must be an Ed25519, P-256 or P-384 key", field=field)
    return hashlib.sha256(der).hexdigest()


class StakeBalances(Protocol):
    """Where stake is read (the replicated state)."""

    def balance(self, key_id: str) -> int: ...


class ConsensusService:
    """Answers ``consensus.beacon``, ``consensus.stake`` and ``consensus.faucet``.

    :param stake: the replicated stake (what ``consensus.stake`` reads).
    :param faucet: how a faucet credit is made; served only in development mode.
    """

    def __init__(self, *, stake: StakeBalances, beacons: BeaconChain, verifier: ProofVerifier,
                 params: ProofParams, development: bool, faucet: Faucet) -> None:
        self.balances = stake
        self.beacons = beacons
        self.verifier = verifier
        self.params = params
        self.development = development
        self.faucet_credit = faucet
        self._task: asyncio.Task[None] | None = None

    # --- ops ------------------------------------------------------------------------------

    def _beacon_result(self, record: BeaconRecord) -> dict[str, Any]:
        previous, current = self.verifier.accepted_epochs()
        return {
            "epoch": record.epoch,
            "start": record.start,
            "end": record.start + self.beacons.epoch_length,
            "beacon": record.value,
            "previous": record.previous,
            "signature": record.signature,
            "public_key": record.public_key,
            "algorithm": record.algorithm,
            "current_epoch": current,
            "accepted_epochs": [e for e in (previous, current)
                                if self.beacons.get(e) is not None],
            "params": self.params.to_wire(),
            "mode": "development" if self.development else "production",
        }

    async def beacon(self, args: ops.BeaconArgs, ctx: RequestContext) -> dict[str, Any]:
        if args.epoch is None:
            try:
                return self._beacon_result(await self.beacons.current())
            except TimeoutError:
                raise Unavailable("the validators have not committed a block in this epoch "
                                  "yet; its beacon is not known") from None
        current = self.beacons.current_epoch()
        if args.epoch > current:
            raise NotFound(f"epoch {args.epoch} has not begun (the current epoch is "
                           f"{current})", field="epoch")
        record = self.beacons.get(args.epoch)
        if record is None:
            if args.epoch == current:
                record = await self.beacons.current()
            else:
                raise NotFound(f"this node made no beacon for epoch {args.epoch}",
                               field="epoch")
        return self._beacon_result(record)

    def stake(self, args: ops.StakeArgs, ctx: RequestContext) -> dict[str, Any]:
        key_id = _key_id_of(args.key)
        amount = self.balances.balance(key_id)
        return {"key_id": key_id, "amount": amount, "minimum": self.params.minimum_stake,
                "sufficient": amount >= self.params.minimum_stake}

    async def faucet(self, args: ops.FaucetArgs, ctx: RequestContext) -> dict[str, Any]:
        if not self.development:
            raise Unauthorized("consensus.faucet is a development-only op; a production node "
                               "has no faucet (stake comes from the genesis ledger)")
        key_id = _key_id_of(args.key)
        before = self.balances.balance(key_id)
        credited = 0
        if before < self.params.minimum_stake:
            await self.faucet_credit.credit(key_id, self.params.minimum_stake)
            credited = self.balances.balance(key_id) - before
        return {"key_id": key_id, "amount": self.balances.balance(key_id), "credited": credited}

    def register(self, router: Router) -> None:
        router.add(ops.BEACON, self.beacon)
        router.add(ops.STAKE, self.stake)
        router.add(ops.FAUCET, self.faucet)

    # --- lifetime ----------------------------------------------------------------------------

    def start(self) -> None:
        """Make each epoch's beacon as it begins (a task on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.beacons.run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
