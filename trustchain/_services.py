"""The services a node runs besides the CA, each wired by its own module.

A wiring module has ``attach(node)``: it opens what the service needs from
``node`` (config, data directory, keystore, CA, router) and registers its ops
on ``node.router``; it may add ``node.on_stop`` callbacks. Adding a service
is one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

WIRING_MODULES: list[str] = [
    "trustchain._wiring_ct",
    "trustchain._wiring_proofs",
    "trustchain._wiring_chain",
    "trustchain._wiring_dns",
]
"""Dotted names of modules with ``attach(node)``, in start order."""

CLI_MODULES: list[str] = [
    "trustchain._cli_ct",
    "trustchain._cli_proofs",
    "trustchain._cli_dns",
    "trustchain._cli_cluster",
]
"""Dotted names of modules with ``add_commands(subparsers) -> {name: command}``."""


def attachers() -> list[Callable[[Any], Any]]:
    return [importlib.import_module(name).attach for name in WIRING_MODULES]


def cli_modules() -> list[Any]:
    return [importlib.import_module(name) for name in CLI_MODULES]
