"""The serving node's garbage-collector settings (trustchain/_collector.py)."""

from __future__ import annotations

import gc

from trustchain._collector import (
    OLDER_THRESHOLDS,
    YOUNG_THRESHOLD,
    freeze_startup,
    tune_for_serving,
)


def test_tune_for_serving_collects_the_young_generation_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_for_serving()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
        assert before[0] < YOUNG_THRESHOLD
    finally:
        gc.set_threshold(*before)


def test_freeze_startup_moves_what_exists_to_the_permanent_generation() -> None:
    kept = [[i] for i in range(1000)]  # containers start-up made
    try:
        freeze_startup()
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
