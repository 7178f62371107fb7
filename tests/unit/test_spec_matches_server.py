"""spec/stoq.md and spec/stoq.cddl against the server's code, mechanically: the error
codes they name are the server's, the ops they name are served, and every op served
is specified. (Two clients written from the spec alone found names that did not exist.)"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import protocol.ops
from protocol import ErrorCode, registered
from protocol._errors import _BY_CODE, RateLimited

ROOT = Path(__file__).resolve().parents[2]
SPEC = (ROOT / "spec" / "stoq.md").read_text()
CDDL = (ROOT / "spec" / "stoq.cddl").read_text()
CONFIG = (ROOT / "spec" / "config.md").read_text()
SERVER_PACKAGES = ("handlers", "protocol", "stoq", "store", "trustchain")
NAMESPACES = r"(?:ca|ct|fp|dns|node|consensus)"


def _server_source() -> str:
    """Every server module but the one that defines the codes."""
    errors = ROOT / "protocol" / "_errors.py"
    return "\n".join(path.read_text() for package in SERVER_PACKAGES
                     for path in sorted((ROOT / package).rglob("*.py")) if path != errors)


def _served_ops() -> set[str]:
    for module in pkgutil.iter_modules(protocol.ops.__path__):
        importlib.import_module(f"protocol.ops.{module.name}")
    return set(registered())


def _section(heading: str) -> str:
    start = SPEC.index(f"\n{heading}\n")
    end = SPEC.index("\n### ", start + 1)
    return SPEC[start:end]


def _tables(text: str) -> list[list[list[str]]]:
    """The markdown tables of ``text``: rows of cells, header first, separator dropped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


CODES = {code.value for code in ErrorCode}


def test_the_error_code_table_is_the_servers() -> None:
    (table, *_) = _tables(_section("### 8.2 Error codes"))
    assert table[0][0] == "Code"
    documented = [re.fullmatch(r"`([a-z_]+)`", row[0]) for row in table[1:]]
    assert all(documented), table
    assert {m.group(1) for m in documented if m} == CODES
    cddl = re.search(r"^error-code = (.*?)\n\n", CDDL, re.M | re.S)
    assert cddl is not None
    assert set(re.findall(r'"([a-z_]+)"', cddl.group(1))) == CODES


def test_every_error_table_names_real_codes() -> None:
    """Every cell under a ``Code`` heading, in every table of the spec."""
    checked = 0
    for table in _tables(SPEC):
        header = table[0]
        if "Code" not in header:
            continue
        column = header.index("Code")
        if any(row[column].startswith("`0x") for row in table[1:]):
            continue  # QUIC error codes (§3.4, §15.3), not STOQ's
        for row in table[1:]:
            if row[column] == "(none)":
                continue
            named = re.findall(r"`([a-z_]+)`", row[column])
            assert named, f"no code in {row}"
            assert set(named) <= CODES, f"{row}: not an error code of the server"
            checked += len(named)
    assert checked > 60


def test_the_server_produces_every_code() -> None:
    """Each code is raised (its exception class) or sent (its text) somewhere."""
    source = _server_source()
    classes = {code.value: cls.__name__ for code, cls in _BY_CODE.items()}
    classes["rate_limited"] = RateLimited.__name__
    for code in CODES:
        used = (re.search(rf"\b{classes[code]}\(", source)
                or f"ErrorCode.{code.upper()}" in source or f'"{code}"' in source)
        assert used, f"{code}: documented, never produced by the server"


def test_every_served_op_is_specified() -> None:
    served = _served_ops()
    frames = set(re.findall(rf"^({NAMESPACES}\.[a-z-]+)\.frame\s*=", CDDL, re.M))
    args = set(re.findall(rf"^({NAMESPACES}\.[a-z-]+)\.args\s*=", CDDL, re.M))
    assert frames == served, (frames ^ served)
    assert args <= served, args - served
    op = rf"{NAMESPACES}\.[a-z]+(?:-[a-z]+)*"
    named = set(re.findall(rf"`({op})`", SPEC))
    named |= set(re.findall(rf"^#+ [0-9.]+ ({op})\b", SPEC, re.M))  # "### 16.11 ct.get-..."
    assert served <= named, served - named


def _config_keys() -> set[str]:
    """``section.key`` for every key of spec/config.md's tables, and the sections."""
    keys: set[str] = set()
    for match in re.finditer(r"^### 6\.\d+ `\[([a-z_.]+)\]`\n(.*?)(?=^### |^## )",
                             CONFIG, re.M | re.S):
        section = match.group(1)
        keys.add(section)
        keys |= {f"{section}.{k}" for k in re.findall(r"^\| `([a-z_]+)` \|", match.group(2),
                                                       re.M)}
    return keys


def test_every_op_like_name_in_the_spec_exists() -> None:
    """A backquoted ``ns.name`` of the spec is a served op, a name the server's code
    uses (an audit record kind), or a configuration key: ``ct.get-consistency`` was none."""
    source = _server_source()
    known = _served_ops() | _config_keys()
    named = set(re.findall(rf"`({NAMESPACES}\.[a-z]+(?:[-_][a-z]+)*)`", SPEC))
    unknown = {n for n in named - known if f'"{n}"' not in source}
    assert not unknown, f"the spec names what the server does not have: {sorted(unknown)}"
