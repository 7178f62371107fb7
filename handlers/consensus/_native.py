"""The two native verifiers, behind plain functions that never raise on bad input.

chiapos and chiavdf are C++ under pybind11: chiapos answers ``None`` for a
proof that does not verify, chiavdf raises ``RuntimeError`` for bytes that are
not a form of the discriminant ("Deserializing compressed form failed",
"Invalid form. Positive a", ...). Both are mapped to a reason string here, so
a foreign or corrupted proof is an answer, never a crash of the caller.
:func:`verify_time` is also what the verifier's worker processes run.

The libraries load at the first verification, not when the server is imported:
a node that never sees a proof (a CT-only bench, ``trustchain init``) never
loads them.
"""

from __future__ import annotations

import functools
from typing import Any

from protocol.ops.consensus import VDF_DISCRIMINANT_BITS, VDF_GENERATOR


@functools.cache
def _space_verifier() -> Any:
    import chiapos

    return chiapos.Verifier()


def verify_space(plot_id: bytes, k: int, challenge: bytes, proof: bytes) -> bool:
    """Whether ``proof`` is a chiapos proof of space for ``challenge`` in plot ``plot_id``."""
    try:
        quality = _space_verifier().validate_proof(plot_id, k, challenge, proof)
    except (RuntimeError, ValueError, TypeError):
        return False
    return bool(quality)


def verify_time(seed: bytes, iterations: int, output: bytes, proof: bytes) -> str | None:
    """Check a Wesolowski VDF on the discriminant made from ``seed``.

    :returns: None if ``output`` is ``g^(2^iterations)`` with a valid proof,
        else why not.
    """
    import chiavdf

    try:
        discriminant = chiavdf.create_discriminant(seed, VDF_DISCRIMINANT_BITS)
    except (RuntimeError, ValueError) as exc:  # pragma: no cover - seed is always 32 bytes
        return f"cannot make the discriminant ({exc})"
    for name, form in (("output", output), ("proof", proof)):
        try:
            # strict: the canonical encoding only, so no bit can flip unnoticed
            chiavdf.bqfc_deserialize(discriminant, form, True)
        except (RuntimeError, ValueError) as exc:
            return (f"{name} is not a form of this key's discriminant for this epoch "
                    f"(a form of another discriminant, or corrupted: {exc})")
    try:
        ok = chiavdf.verify_wesolowski(discriminant, VDF_GENERATOR, output, proof, iterations)
    except (RuntimeError, ValueError, TypeError) as exc:
        return f"the VDF cannot be checked ({exc})"
    if not ok:
        return f"the VDF does not verify: output is not the generator squared {iterations} " \
               "times, or the proof is wrong"
    return None


def worker_main() -> None:
    """Serve :func:`verify_time` on stdin/stdout: the verifier's worker process.

    Each request is a 4-byte big-endian length and the CBOR array
    ``[seed, iterations, output, proof]``; each answer the same framing around
    ``null`` (valid) or the reason text. Ends at end of input.
    """
    import sys

    import cbor2

    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = source.read(4)
        if len(header) < 4:
            return
        seed, iterations, output, proof = cbor2.loads(source.read(int.from_bytes(header, "big")))
        answer = cbor2.dumps(verify_time(seed, iterations, output, proof))
        sink.write(len(answer).to_bytes(4, "big") + answer)
        sink.flush()
