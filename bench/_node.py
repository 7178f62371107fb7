"""The node the benchmarks run: ``trustchain serve``, or the same without the proof check.

Every node is a validator of its cluster (alone: a cluster of one), so there
is no longer a node with only some of its services: a ``ca.issue`` is always
admitted, committed in a block, signed and committed again. What a benchmark
can still take away is the four-proof *check*, to measure what it costs:

    python -m bench._node --proofs parse -- --config F --data-dir D --listen [::1]:0

runs ``trustchain serve`` with a :class:`ParseOnlyVerifier` in place of
``ProofVerifier``: a request's ``proofs`` are parsed (their shape, as
``parse_proofs`` checks it) and nothing more (no epoch, work, stake, binding,
space or time check), before the CA and again before the block is voted.
Everything else is the node as configured, including the block's execution,
which still records each request's work as used. ``--proofs check`` (the
default) is ``trustchain serve`` unchanged.

:func:`synthetic_proofs` makes a proof set that parses, for requests to such a
node that need no prover.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

from handlers.consensus import ProofVerifier
from protocol.ops.consensus import (
    MIN_PLOT_SIZE,
    VDF_FORM_SIZE,
    Operation,
    ProofSet,
    parse_proofs,
)

SYNTHETIC_KEY = b"\x30\x2a" + hashlib.sha256(b"bench synthetic requester").digest() + bytes(12)
"""A requester key of the right size for :func:`synthetic_proofs` (not a real key: a
node that checks proofs refuses it, a parse-only node does not look)."""


class ParseOnlyVerifier(ProofVerifier):
    """A verifier that parses the proof set and checks nothing else (benchmarks only)."""

    async def verify(self, op: Operation, request: bytes, raw: Any) -> ProofSet:
        proofs = parse_proofs(raw)
        self.stats.admitted += 1
        return proofs


def synthetic_proofs(epoch: int, nonce: bytes) -> dict[str, Any]:
    """A proof set of the real shape and size that a parse-only node admits.

    ``epoch`` should be the node's current one: the block's execution drops the used
    work of epochs it no longer accepts, which would otherwise cost it every block.
    """
    return {
        "epoch": epoch,
        "requester_key": SYNTHETIC_KEY,
        "space": {"plot_id": bytes(32), "k": MIN_PLOT_SIZE, "index": 0,
                  "proof": bytes(8 * MIN_PLOT_SIZE)},
        "time": {"iterations": 1000, "output": bytes(VDF_FORM_SIZE),
                 "proof": bytes(VDF_FORM_SIZE)},
        "work": {"nonce": nonce},
        "binding": bytes(64),
    }


def serve_argv(*, check_proofs: bool, serve_args: list[str]) -> list[str]:
    """The command line (after the interpreter) of a benchmark node."""
    return ["-m", "bench._node", "--proofs", "check" if check_proofs else "parse", "--",
            *serve_args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._node",
                                     description="trustchain serve for the benchmarks")
    parser.add_argument("--proofs", choices=("check", "parse"), default="check",
                        help="check the four proofs (trustchain serve as is), or only "
                             "parse them")
    parser.add_argument("serve", nargs=argparse.REMAINDER,
                        help="-- then the arguments of trustchain serve")
    args = parser.parse_args(argv)
    serve = args.serve[1:] if args.serve[:1] == ["--"] else args.serve
    if args.proofs == "parse":
        import trustchain._compose as compose

        # the composition root builds its verifier from this name
        vars(compose)["ProofVerifier"] = ParseOnlyVerifier
    from trustchain._cli import main as trustchain_main

    return trustchain_main(["serve", *serve])


if __name__ == "__main__":
    sys.exit(main())
