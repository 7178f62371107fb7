"""Every failure a user can cause on the command line is one ``error:`` line and a
non-zero status, never a traceback: bad arguments, bad files, a node that is not
there, a data directory already in use, a reader that goes away (``| head``)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import start_server_process

NOBODY = "[::1]:1"
"""An address where no node listens."""
SOME_PIN = "0" * 64


def _cli(*args: str, cwd: Path, stdout: int | None = subprocess.PIPE,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustchain", *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=timeout)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a file that is no PEM, a broken TOML file and a directory."""
    directory = tmp_path_factory.mktemp("cli-errors")
    (directory / "garbage.pem").write_text("not a pem\n")
    (directory / "broken.toml").write_text("[node\n")
    (directory / "a-directory").mkdir()
    return directory


CASES: list[tuple[list[str], int, str]] = [
    ([], 2, "trustchain: error: the following arguments are required: command"),
    (["bogus"], 2, "invalid choice: 'bogus'"),
    (["health", "--timeout", "soon"], 2, "invalid float value: 'soon' (see trustchain "
                                         "health --help)"),
    (["serve", "--config", "missing.toml"], 2, "error: cannot read configuration "),
    (["serve", "--config", "broken.toml"], 2, "not valid TOML"),
    (["serve", "--listen", "192.0.2.1:53"], 2, "IPv6 addresses go in brackets"),
    (["serve", "--data-dir", "garbage.pem/data"], 2, "cannot create the data directory"),
    (["init", "--data-dir", "garbage.pem/data"], 2, "cannot create the data directory"),
    (["health", "--server", NOBODY, "--pin", SOME_PIN, "--timeout", "1"], 3,
     f"error: cannot reach {NOBODY}: no QUIC handshake"),
    (["health", "--server", "::1:8443", "--pin", SOME_PIN], 2, "expected [ADDR]:PORT"),
    (["health", "--server", NOBODY, "--cafile", "garbage.pem"], 2,
     "--cafile garbage.pem: not a PEM certificate file"),
    (["health", "--server", NOBODY, "--cafile", "missing.pem"], 2,
     "--cafile missing.pem: No such file or directory"),
    (["issue", "a.trust", "--key", "garbage.pem", "--out", "o", "--pin", SOME_PIN], 2,
     "garbage.pem: not an unencrypted PEM private key"),
    (["revoke", "ab", "--admin", "a-directory", "--pin", SOME_PIN], 2, "admin.key"),
    (["verify", "missing.pem", "--cafile", "garbage.pem"], 2,
     "No such file or directory: 'missing.pem'"),
    (["verify", "garbage.pem", "--cafile", "garbage.pem"], 2, "not a PEM certificate"),
    (["ct", "proof", "garbage.pem", "--pin", SOME_PIN], 2, "not a PEM certificate"),
    (["ct", "watch", "--server", NOBODY, "--pin", SOME_PIN, "--timeout", "1"], 3,
     "cannot reach"),
    (["dns", "query", "www.trust", "--doq", "--server", NOBODY, "--insecure",
      "--timeout", "1"], 3, "over DoQ: no DoQ connection within 1.0 s"),
    (["dns", "query", "www.trust", "--doq", "--server", NOBODY, "--cafile", "garbage.pem"],
     2, "--cafile garbage.pem: not a PEM certificate file"),
    (["audit", "verify", "--data-dir", "a-directory"], 2, "no audit log"),
    (["cluster", "status", "a-directory"], 2, "cluster.toml does not exist"),
]


@pytest.mark.parametrize(("argv", "status", "message"), CASES,
                         ids=[" ".join(c[0][:2]) or "none" for c in CASES])
def test_a_bad_command_line_gets_one_error_line(files: Path, argv: list[str], status: int,
                                                message: str) -> None:
    result = _cli(*argv, cwd=files)
    assert result.returncode == status, result.stderr
    assert message in _one_error_line(result)


def test_a_data_directory_in_use_and_a_reader_that_goes_away(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server_process(tmp_path, "qh3", data_dir=data)
    try:
        # a second node on the same data directory: refused before it opens anything
        keys_before = sorted(p.name for p in (data / "keys").iterdir())
        second = _cli("serve", "--data-dir", str(data), "--listen", "[::1]:0", cwd=tmp_path)
        assert second.returncode == 2
        line = _one_error_line(second)
        assert line == (f"error: data directory {data} is in use by another process (pid "
                        f"{server.proc.pid}): a running node? Stop it, or give another "
                        "--data-dir"), line
        assert second.stdout == ""
        assert sorted(p.name for p in (data / "keys").iterdir()) == keys_before
        init = _cli("init", "--data-dir", str(data), cwd=tmp_path)
        assert init.returncode == 2 and "is in use by another process" in _one_error_line(init)
        # `trustchain ct watch | head`: the reader closes the pipe; the watcher stops
        # quietly at its next line (here the first: the node's own certificate, entry 0)
        watch = subprocess.Popen(
            [sys.executable, "-m", "trustchain", "ct", "watch", "--from", "0", "--server",
             f"[::1]:{server.port}", "--data-dir", str(data)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        assert watch.stdout is not None and watch.stderr is not None
        watch.stdout.close()
        try:
            assert watch.wait(60) == 0
        finally:
            watch.kill()
        assert watch.stderr.read() == ""
        # a real pipeline to head, with more entries than head reads
        piped = subprocess.run(
            f"{sys.executable} -m trustchain ct watch --from 0 --server [::1]:{server.port} "
            f"--data-dir {data} | head -c 0; echo status ${{PIPESTATUS[0]}}",
            shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=tmp_path,
            timeout=60)
        assert piped.stdout == "status 0\n" and "Traceback" not in piped.stderr, piped.stderr
        # Ctrl-C: status 130, no traceback. (SIGINT back to its default in the child: a
        # test run started in the background of a non-interactive shell ignores SIGINT, and
        # children inherit that.)
        watch = subprocess.Popen(
            [sys.executable, "-m", "trustchain", "ct", "watch", "--from", "0", "--server",
             f"[::1]:{server.port}", "--data-dir", str(data)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert watch.stdout is not None
        try:
            assert watch.stdout.readline().startswith("0/0 ")  # it is following the log
            watch.send_signal(signal.SIGINT)
            _, err = watch.communicate(timeout=30)
        finally:
            watch.kill()
        assert watch.returncode == 130 and err.strip() == "", err
    finally:
        server.stop()
    # the directory is free again once the node has stopped
    again = start_server_process(tmp_path, "qh3", data_dir=data)
    again.stop()
