"""The garbage collector's settings for a serving node.

A node under load allocates many short-lived containers (decoded CBOR, records,
futures) and keeps a growing, long-lived state (caches, zones, the CT log's
recent entries). With CPython's default thresholds the young generation is
collected every 700 allocations and the whole heap is walked every few seconds:
measured on a validator of a 4-validator cluster under ``ca.issue`` load, 0.5 s
of each 15 s went to the collector, of which one full pass took 0.24 s. Reference
counting frees almost all of that garbage anyway; the collector is only for
cycles. So a serving node collects the young generation every
:data:`YOUNG_THRESHOLD` allocations, and freezes what start-up built (modules,
configuration, the state loaded from disk), which no full pass then walks again.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations (minus deallocations) between collections of the youngest generation
(CPython's default is 700)."""
OLDER_THRESHOLDS = (10, 10)
"""Collections of a generation between collections of the next (CPython's default)."""


def tune_for_serving() -> None:
    """Collect the young generation less often (see the module's docstring)."""
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)


def freeze_startup() -> None:
    """Move every object start-up made to the permanent generation, after collecting
    start-up's own garbage, so full collections walk only what serving made."""
    gc.collect()
    gc.freeze()
