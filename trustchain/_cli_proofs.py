"""``trustchain proofs ...``: the requester's proof material, and its use by issue/revoke.

::

    trustchain proofs plot       # once: requester key and a plot bound to it (with progress)
    trustchain proofs prepare    # once an epoch: the space and time credential (VDF progress)
    trustchain proofs status     # key id, stake, plots, credentials, epoch
    trustchain proofs faucet     # development nodes: stake for a new key

All take ``--proofs-dir DIR`` (default ``./trustchain-proofs``), which also
becomes an option of ``trustchain issue`` and ``trustchain revoke``: those
build the whole proof set by themselves (making the plot and the credential
if they are missing, and asking a development node's faucet for stake).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import TextIO

import stoq
from protocol import Unauthorized

from ._cli_common import ClientBody, Command, Subcommands, add_trust_options, run_client

DEFAULT_PROOFS_DIR = "./trustchain-proofs"


class ProgressLine:
    """``progress(message, fraction)`` on a terminal line (rewritten in place), or, when
    the stream is not a terminal, one line per new message or tenth of progress."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last: tuple[str, int] = ("", -1)
        self._shown = 0.0

    def __call__(self, message: str, fraction: float) -> None:
        stage = re.sub(r"[\d.]+ s\b", "", message)  # the same step, whatever its timings
        tenth = int(fraction * 10)
        if self.tty:
            now = time.monotonic()
            if now - self._shown < 0.1 and fraction < 1.0:
                return
            self._shown = now
            self.out.write(f"\r{message} [{fraction:4.0%}]\x1b[K")
            if fraction >= 1.0:
                self.out.write("\n")
            self.out.flush()
        elif (stage, tenth) != self._last:
            self._last = (stage, tenth)
            print(f"{message} [{fraction:.0%}]", file=self.out, flush=True)


def proofs_dir(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "proofs_dir", None) or DEFAULT_PROOFS_DIR)


def guarded(body: ClientBody) -> ClientBody:
    """``body``, with proof-building failures reported as ``error:`` and status 1."""
    async def run(client: stoq.AsyncClient) -> int:
        try:
            return await body(client)
        except stoq.ProverError as exc:
            print(f"error: cannot build the proofs: {exc}", file=sys.stderr)
            return 1
    return run


async def ready_prover(client: stoq.AsyncClient, directory: Path,
                       out: TextIO = sys.stderr) -> stoq.Prover:
    """The prover of ``directory`` with stake, a plot and this epoch's credential.

    Makes what is missing: the requester key, the plot (progress on ``out``),
    the stake from a development node's faucet, the epoch credential.

    :raises protocol.Unauthorized: the key has too little stake on a production node.
    """
    prover = stoq.Prover.open(directory)
    beacon = await prover.beacon(client)
    info = await client.request("consensus.stake", {"key": prover.spki})
    if not info["sufficient"]:
        if not beacon.development:
            raise Unauthorized(
                f"requester key {prover.key_id} holds {info['amount']} stake; this node "
                f"requires {info['minimum']}. A production node has no faucet: ask its "
                f"operator to add the key id to consensus.genesis")
        granted = await client.request("consensus.faucet", {"key": prover.spki})
        print(f"development faucet: requester key {prover.key_id[:16]}... now holds "
              f"{granted['amount']}", file=out)
    progress = ProgressLine(out)
    if prover.plot_for(beacon.params.plot_size) is None:
        print(f"making the one-time k={beacon.params.plot_size} plot for requester key "
              f"{prover.key_id[:16]}... in {directory}", file=out)
    await prover.credential(client, progress=progress)
    return prover


def _cmd_plot(args: argparse.Namespace) -> int:
    directory = proofs_dir(args)
    if args.k is not None:
        if not 18 <= args.k <= 50:
            print("error: --k must be within 18..50", file=sys.stderr)
            return 2
        try:
            prover = stoq.Prover.open(directory)
            path = prover.ensure_plot(args.k, progress=ProgressLine())
        except stoq.ProverError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"plot {path} (k={args.k}) for requester key {prover.key_id}")
        return 0

    async def body(client: stoq.AsyncClient) -> int:
        prover = stoq.Prover.open(directory)
        k = (await prover.beacon(client)).params.plot_size
        path = prover.ensure_plot(k, progress=ProgressLine())
        print(f"plot {path} (k={k}) for requester key {prover.key_id}")
        return 0
    return run_client(args, guarded(body))


def _cmd_prepare(args: argparse.Namespace) -> int:
    async def body(client: stoq.AsyncClient) -> int:
        prover = await ready_prover(client, proofs_dir(args))
        beacon = await prover.beacon(client)
        credential = await prover.credential(client)
        until = time.gmtime(beacon.end + beacon.params.epoch_length)
        print(f"epoch {credential.epoch} credential ready for requester key {prover.key_id}: "
              f"space k={credential.space.k} challenge {credential.space.index}, time "
              f"{credential.time.iterations:,} iterations; accepted until "
              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', until)}")
        return 0
    return run_client(args, guarded(body))


def _cmd_status(args: argparse.Namespace) -> int:
    async def body(client: stoq.AsyncClient) -> int:
        prover = stoq.Prover.open(proofs_dir(args))
        beacon = await prover.beacon(client)
        info = await client.request("consensus.stake", {"key": prover.spki})
        params = beacon.params
        print(f"requester key {prover.key_id} ({prover.directory / prover.KEY_FILE})")
        print(f"stake {info['amount']} (minimum {info['minimum']}: "
              f"{'enough' if info['sufficient'] else 'NOT enough'})")
        plots = sorted(prover.directory.glob("plot-k*.plot"))
        print("plots " + (", ".join(p.name for p in plots) if plots else "none"))
        print(f"epoch {beacon.epoch}, ends {time.strftime('%H:%M:%S UTC', time.gmtime(beacon.end))}"
              f"; node requires k >= {params.plot_size}, {params.vdf_iterations:,} VDF "
              f"iterations, {params.minimum_work_difficulty} work bits")
        credentials = sorted((prover.directory / "credentials").glob("epoch-*.cbor"))
        print("credentials " + (", ".join(c.stem for c in credentials) if credentials
                                else "none"))
        return 0
    return run_client(args, guarded(body))


def _cmd_faucet(args: argparse.Namespace) -> int:
    async def body(client: stoq.AsyncClient) -> int:
        prover = stoq.Prover.open(proofs_dir(args))
        result = await client.request("consensus.faucet", {"key": prover.spki})
        print(f"requester key {result['key_id']} holds {result['amount']} "
              f"(credited {result['credited']})")
        return 0
    return run_client(args, guarded(body))


def add_commands(sub: Subcommands) -> dict[str, Command]:
    """Add ``trustchain proofs``, and ``--proofs-dir`` to ``issue`` and ``revoke``."""
    proofs = sub.add_parser("proofs", help="requester key, plot and epoch credentials for the "
                                           "four-proof admission")
    proofs_sub = proofs.add_subparsers(dest="proofs_command", required=True)
    texts = {"plot": "make the one-time plot bound to the requester key (with progress)",
             "prepare": "compute this epoch's space and time credential (VDF, with progress)",
             "status": "show the requester key, its stake, plots and credentials",
             "faucet": "get stake for the requester key from a development node"}
    for name, text in texts.items():
        parser = proofs_sub.add_parser(name, help=text)
        parser.add_argument("--proofs-dir", default=None, metavar="DIR",
                            help=f"requester key, plots, credentials (default "
                                 f"{DEFAULT_PROOFS_DIR})")
        if name == "plot":
            parser.add_argument("--k", type=int, default=None,
                                help="plot size (default: what the node requires)")
        add_trust_options(parser)
    for existing in ("issue", "revoke"):
        client_parser = sub.choices.get(existing)
        if client_parser is not None:
            client_parser.add_argument("--proofs-dir", default=None, metavar="DIR",
                                help=f"requester key, plot and credentials for the four-proof "
                                     f"set (default {DEFAULT_PROOFS_DIR}; made if missing)")
    handlers = {"plot": _cmd_plot, "prepare": _cmd_prepare, "status": _cmd_status,
                "faucet": _cmd_faucet}

    def command(args: argparse.Namespace) -> int:
        return handlers[args.proofs_command](args)
    return {"proofs": command}
