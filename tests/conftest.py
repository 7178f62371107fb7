"""Shared fixtures: the QUIC engine matrix, uvloop, and the CDDL checker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
import uvloop

import stoq

from .helpers import CddlChecker
from .s3_server import CephS3
from .softhsm import SoftHsmToken, make_token

ENGINES = [e for e in stoq.ENGINES
           if e in os.environ.get("TRUSTCHAIN_TEST_ENGINES", ",".join(stoq.ENGINES)).split(",")]


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Async tests run on uvloop, as the server does."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(params=ENGINES)
def engine(request: Any) -> str:
    """Each integration test runs once per QUIC engine (server and client)."""
    return str(request.param)


@pytest.fixture
def cddl() -> Iterator[CddlChecker]:
    """Every frame a test client receives must match spec/stoq.cddl."""
    checker = CddlChecker()
    yield checker
    assert not checker.failures, "\n".join(checker.failures)


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """This test session's SoftHSM2 token (SoftHSM2 reads its config once per process)."""
    return make_token(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture
def empty_softhsm_token(softhsm_token: SoftHsmToken) -> SoftHsmToken:
    """The session's token with every object destroyed, for a test that checks the keys
    it creates itself (``key.generated``): other tests may have left keys in it."""
    token = pkcs11.lib(softhsm_token.module_path).get_token(
        token_label=softhsm_token.token_label)
    with token.open(rw=True, user_pin=softhsm_token.pin) as session:
        for obj in list(session.get_objects()):
            obj.destroy()
    return softhsm_token


@pytest.fixture(scope="session")
def plotted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A requester key and its k=18 plot, made once per test session (about 1 s, 4 MB)."""
    for attempt in range(3):  # chiapos gets stuck on a few plot ids: then a new key
        directory = tmp_path_factory.mktemp("requester")
        try:
            stoq.Prover.open(directory).ensure_plot(18)
            return directory
        except stoq.ProverError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def prover(plotted: Path) -> stoq.Prover:
    """The session's requester (key and plot) with fresh in-memory state: it proves
    space and time for each node's epoch beacon once, then only solves work."""
    return stoq.Prover.open(plotted)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[CephS3]:
    """A real S3 server (Ceph's RADOS Gateway on [::1]) for this session, started by the
    first test that asks for it (about 1-2 s) and stopped at the end."""
    server = CephS3().start()
    try:
        yield server
    finally:
        server.stop()
