"""Starting a server must not load the proof libraries: chiapos and chiavdf are
native extensions that only a proving client (``stoq.Prover``) and the node's
verifier (``handlers.consensus``, wired in when the node starts) need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROOF_LIBRARIES = ("chiapos", "chiavdf")


def _loaded_after_import(module: str) -> list[str]:
    """The proof libraries a fresh interpreter has loaded after ``import module``
    (a fresh one: this test process may have loaded them already)."""
    code = (f"import sys, {module}; "
            f"print(' '.join(m for m in {PROOF_LIBRARIES!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    return result.stdout.split()


@pytest.mark.parametrize("module", ["stoq", "trustchain._app"])
def test_import_does_not_load_proof_libraries(module: str) -> None:
    assert _loaded_after_import(module) == []


def test_prover_loads_them_when_it_proves() -> None:
    """The other side of the bargain: the libraries are still there for the prover."""
    code = ("import sys, stoq; stoq.Prover; assert 'chiavdf' not in sys.modules; "
            "from stoq._prover import vdf_speed; vdf_speed(10); "
            "assert 'chiavdf' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
