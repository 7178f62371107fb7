"""Opening sealed decisions: ``python -m bench.consensus --part cbor``.

Every validator opens every decision (the seal, then the body, both through the
strict CBOR decoder), so this is CPU each validator spends on each issuance. In
this process, no cluster: decisions shaped like a node's ``issue`` and
``certificate`` decisions (the byte sizes of a 4-validator cluster's chain),
sealed in batches of :data:`BATCH` as the entry seals them under load, are
decoded and opened by the code of this tree and, in the same run, by the code of
:data:`BASELINE_COMMIT` (``protocol/_cbor.py`` and ``handlers/consensus/_sealed.py``
read with ``git show`` and loaded as modules of their own), beside plain
``cbor2.loads`` (no checks at all) for scale.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import protocol
from handlers.consensus import SealOpener, seal_batch
from handlers.consensus.bft import Validator, ValidatorSet
from protocol.decisions import Issue, SignedCertificate

from ._common import ROOT, markdown_table

BASELINE_COMMIT = "af967ec"
"""The code before the faster scan and the in-place reading of seals."""
BATCH = 30
"""Decisions a batch seal covers (what a 4-validator cluster's chain shows under
``ca.issue`` load): one signature verified for 30 decisions, a path of 5 hashes."""
ROUNDS = 100
"""Batches opened a run (each with a new SealOpener: its signature verified once)."""
DECODES = 3000
"""decode_item calls a run for each item."""
RUNS = 7


def issue_body(i: int) -> dict[str, Any]:
    """An ``issue`` decision of the sizes a node makes: a 256-octet CSR, a 532-octet
    precertificate, the four proofs (k=18 space proof, the development VDF)."""
    proofs = {"time": {"proof": bytes(100), "output": bytes(100), "iterations": 10_000},
              "work": {"nonce": bytes(8)}, "epoch": 499_075,
              "space": {"k": 18, "index": 3, "proof": bytes(144), "plot_id": bytes(32)},
              "binding": bytes(72), "requester_key": bytes(91)}
    return Issue(csr=i.to_bytes(4, "big") + bytes(252), proofs=proofs,
                 precertificate=bytes(532), at_ms=1_796_671_095_935 + i).body()


def certificate_body(i: int) -> dict[str, Any]:
    """A ``certificate`` decision: the signed 662-octet certificate of an issuance."""
    return SignedCertificate(serial=f"{i:032x}", certificate=bytes(662),
                             at_ms=1_796_671_096_394 + i).body()


@dataclass(frozen=True)
class Code:
    """What is measured: one tree's decoder and opener."""
    decode_item: Callable[[bytes], Any]
    opener: Callable[[], Any]
    """A new SealOpener."""


def baseline_code(commit: str = BASELINE_COMMIT) -> Code | str:
    """The decoder and opener of ``commit``, or why they cannot be loaded."""
    modules = []
    for package, path in (("protocol", "protocol/_cbor.py"),
                          ("handlers.consensus", "handlers/consensus/_sealed.py")):
        try:
            source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"git show {commit}:{path} failed ({exc})"
        name = f"{package}._baseline_{path.rsplit('/', 1)[1][1:-3]}"
        module = types.ModuleType(name)
        module.__package__ = package
        sys.modules[name] = module  # dataclasses look their module up
        exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
        modules.append(module)
    cbor, sealed = modules
    sealed.__dict__["decode_item"] = cbor.decode_item  # the opener of then, its decoder too
    return Code(decode_item=cbor.decode_item, opener=sealed.SealOpener)


def _cpu_us(work: Callable[[], int]) -> float:
    """CPU µs an operation: ``work`` runs the operations and says how many."""
    started = time.process_time()
    count = work()
    return (time.process_time() - started) / count * 1e6


@dataclass(frozen=True)
class Row:
    label: str
    octets: int
    now_us: float
    baseline_us: float | None
    cbor2_us: float | None


def open_report() -> str:
    """The decoder and the opener of this tree against :data:`BASELINE_COMMIT`'s, on
    the same decisions, runs interleaved, the median of :data:`RUNS`."""
    key = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
    me = Validator(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    validators = ValidatorSet((me,))
    batches = {name: seal_batch([protocol.encode_deterministic(make(i)) for i in range(BATCH)],
                                me.id, key.sign)
               for name, make in (("issue", issue_body), ("certificate", certificate_body))}
    now = Code(decode_item=protocol.decode_item, opener=SealOpener)
    loaded = baseline_code()
    baseline = loaded if isinstance(loaded, Code) else None

    def decoding(decode: Callable[[bytes], Any], item: bytes) -> Callable[[], int]:
        def work() -> int:
            for _ in range(DECODES):
                decode(item)
            return DECODES
        return work

    def opening(code: Code, decisions: list[bytes]) -> Callable[[], int]:
        def work() -> int:
            for _ in range(ROUNDS):
                opener = code.opener()
                for decision in decisions:
                    opener.open(decision, validators)
            return ROUNDS * len(decisions)
        return work

    cases: list[tuple[str, int, dict[str, Callable[[], int]]]] = []
    for name, decisions in batches.items():
        decision = decisions[BATCH // 2]
        body = cbor2.loads(decision)["body"]
        for label, item in ((f"{name} decision: decode_item", decision),
                            (f"{name} body: decode_item", body)):
            works = {"now": decoding(now.decode_item, item),
                     "cbor2": decoding(cbor2.loads, item)}
            if baseline is not None:
                works["baseline"] = decoding(baseline.decode_item, item)
            cases.append((label, len(item), works))
        works = {"now": opening(now, decisions)}
        if baseline is not None:
            works["baseline"] = opening(baseline, decisions)
        cases.append((f"{name} decision: SealOpener.open, batches of {BATCH}",
                      len(decision), works))
    figures: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in cases}
    for _ in range(RUNS):
        for label, _, works in cases:
            for variant, work in works.items():
                figures[label].setdefault(variant, []).append(_cpu_us(work))
    rows = []
    for label, octets, _ in cases:
        median = {variant: statistics.median(times) for variant, times in figures[label].items()}
        rows.append(Row(label, octets, median["now"], median.get("baseline"),
                        median.get("cbor2")))
    table = markdown_table(
        ["operation", "octets", "CPU µs now", f"CPU µs at {BASELINE_COMMIT}", "ratio",
         "plain cbor2.loads µs"],
        [[r.label, f"{r.octets:,}", f"{r.now_us:.1f}",
          "?" if r.baseline_us is None else f"{r.baseline_us:.1f}",
          "?" if r.baseline_us is None else f"{r.now_us / r.baseline_us:.3f}",
          "" if r.cbor2_us is None else f"{r.cbor2_us:.1f}"] for r in rows])
    note = ("" if baseline is not None else
            f"\nNo baseline: {loaded}.\n")
    return (f"### Opening sealed decisions (median of {RUNS} runs, CPU time of this "
            f"process; baseline: the code at {BASELINE_COMMIT}, same run)\n\n{table}\n{note}\n"
            f"SealOpener.open: every decision of a batch of {BATCH} opened by a new opener "
            "(one signature verification a batch, a path of 5 hashes each); "
            "plain cbor2.loads checks nothing and is there for scale.\n")
