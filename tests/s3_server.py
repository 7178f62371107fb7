"""A throwaway real S3 server: a one-host Ceph (one monitor, one memstore OSD) and its
RADOS Gateway, all bound to ``[::1]``, all state in one temporary directory.

No mock S3 anywhere: tests and benchmarks talk to Ceph 16's own S3 gateway (Debian
packages ``radosgw ceph-mon ceph-osd``). Settings measured on Debian 12 that matter:
without ``paxos propose interval`` each pool creation waits a second; without the
radosgw ``auth client required = none`` and ``ms mon client mode`` it waits 300 s for
cephx. ``tcp_nodelay=1`` on the beast frontend: without it every GET of a small object
(below about 64 KiB) takes 44 ms (Nagle against the client's delayed ACK), with
obstore and botocore alike. Stop order matters: radosgw, then the OSD, then the monitor.
The daemons get SIGKILL if the process that started them dies.

Standalone: ``python -m tests.s3_server`` starts one, prints the ``AWS_*`` lines and the
endpoint, and runs until Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from trustchain._cluster_layout import FIXED_PORTS_FROM, _ephemeral_start

ADDRESS = "::1"
"""Every daemon binds this loopback address only."""

RGW_NAME = "client.rgw.test"
"""The radosgw instance's Ceph name (its section in ceph.conf)."""

STOP_TIMEOUT = 10.0
"""Seconds a daemon gets after SIGTERM before SIGKILL."""

START_TIMEOUT = 60.0
"""Seconds a daemon gets to come up before the start fails."""


class S3ServerError(RuntimeError):
    """The Ceph cluster or its gateway did not start; the message has the log's tail."""


def free_tcp_ports(count: int, address: str = ADDRESS) -> list[int]:
    """``count`` distinct free TCP ports of ``address`` below the kernel's ephemeral
    range (a restarted gateway keeps its port) and above the OSD's 6800-7300."""
    high = _ephemeral_start()
    ports: list[int] = []
    for port in random.sample(range(FIXED_PORTS_FROM, high), 50 * count + 100):
        if len(ports) == count:
            break
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) < count:
        raise OSError(f"no {count} free TCP ports of [{address}]")
    return ports


def _die_with_parent() -> None:
    """In the forked child: SIGKILL when the process that started it dies (a killed
    test run leaves no daemons; the state is throwaway anyway)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _tail(path: Path, lines: int = 5) -> str:
    """The last lines of a daemon's log, joined into one line for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log at {path})"
    return " | ".join(line.strip() for line in text[-lines:]) or f"(empty log {path})"


def _errors(path: Path, lines: int = 3) -> str:
    """The last error lines of a Ceph daemon's log (level -1), joined into one line;
    empty if it has none."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join([line.strip() for line in text if " -1 " in line][-lines:])


class CephS3:
    """One single-host Ceph with an S3 gateway at :attr:`endpoint`, and one S3 user.

    ``start()`` brings it up (about 2 s); ``stop()`` tears it down and removes its
    directory. ``stop_gateway()``/``start_gateway()`` stop and restart only radosgw on
    the same port, for "S3 unreachable, then back" tests.
    """

    def __init__(self, directory: str | Path | None = None, *,
                 memory_bytes: int = 1 << 30) -> None:
        self._own_directory = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="ceph-s3-"))
        self.mon_port, self.rgw_port = free_tcp_ports(2)
        self.endpoint = f"http://[{ADDRESS}]:{self.rgw_port}"
        """The S3 endpoint URL (path-style, SigV4, any region)."""
        self.access_key = "TC" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.region = "default"
        self._memory_bytes = memory_bytes
        self._conf = self.dir / "ceph.conf"
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> CephS3:
        """Create and start the monitor, the OSD, the S3 user and the gateway."""
        try:
            self._write_conf()
            self._start_mon()
            self._start_osd()
            self._ceph_tool("radosgw-admin", "user", "create", "--uid=trustchain-test",
                            "--display-name=TrustChain tests",
                            f"--access-key={self.access_key}",
                            f"--secret={self.secret_key}")
            self.start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop radosgw, then the OSD, then the monitor (killing what hangs); remove
        the state directory if this object made it."""
        for name in ("rgw", "osd", "mon"):
            self._stop(name)
        if self._own_directory:
            shutil.rmtree(self.dir, ignore_errors=True)

    def stop_gateway(self) -> None:
        """Stop only radosgw: the endpoint refuses connections until start_gateway()."""
        self._stop("rgw")

    def start_gateway(self) -> None:
        """Start radosgw on the same port and wait until it answers HTTP."""
        if "rgw" in self._processes:
            return
        self._spawn("rgw", "radosgw", "-f", "-n", RGW_NAME)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive("rgw")
            try:
                with urllib.request.urlopen(self.endpoint, timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer (403 for an anonymous request) means it serves
            except OSError:
                time.sleep(0.05)
        raise S3ServerError(f"radosgw did not answer on {self.endpoint} within "
                            f"{START_TIMEOUT:.0f} s: {_tail(self._log('rgw'))}")

    def __enter__(self) -> CephS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- buckets ----------------------------------------------------------------

    def client(self, *, secret_key: str | None = None) -> Any:
        """A botocore S3 client for this server (for tests' own set-up and checks);
        ``secret_key`` overrides the user's (to test a wrong one)."""
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        return session.create_client(
            "s3", region_name=self.region, endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def create_bucket(self, name: str | None = None, *, object_lock: bool = False) -> str:
        """Create a bucket (a fresh name unless given), with Object Lock enabled if
        asked (which also turns on versioning); return its name."""
        bucket = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=object_lock)
        return bucket

    def environment(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region,
                "AWS_ENDPOINT_URL": self.endpoint}

    # -- daemons ----------------------------------------------------------------

    def _write_conf(self) -> None:
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        self._fsid = str(uuid.uuid4())
        self._conf.write_text(f"""\
[global]
fsid = {self._fsid}
mon host = [v2:[{ADDRESS}]:{self.mon_port}]
public addr = {ADDRESS}
cluster addr = {ADDRESS}
ms bind ipv6 = true
ms bind ipv4 = false
auth cluster required = none
auth service required = none
auth client required = none
paxos propose interval = 0.05
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {self._memory_bytes}
client mount timeout = 30
run dir = {self.dir}/run
admin socket = {self.dir}/run/$name.asok
log file = {self.dir}/$name.log
mon data = {self.dir}/mon
osd data = {self.dir}/osd
keyring = {self.dir}/keyring
rgw data = {self.dir}/rgw

[{RGW_NAME}]
rgw frontends = beast endpoint=[{ADDRESS}]:{self.rgw_port} tcp_nodelay=1
auth client required = none
ms mon client mode = crc secure
rgw thread pool size = 64
""")

    def _start_mon(self) -> None:
        monmap = self.dir / "monmap"
        self._ceph_tool("monmaptool", "--create", "--fsid", self._fsid, "--addv", "a",
                        f"[v2:[{ADDRESS}]:{self.mon_port}]", str(monmap), conf=False)
        self._ceph_tool("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._spawn("mon", "ceph-mon", "-f", "-i", "a")

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph_tool("ceph", "osd", "new", osd_uuid).strip()
        (self.dir / "osd").mkdir(exist_ok=True)
        self._ceph_tool("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._spawn("osd", "ceph-osd", "-f", "-i", osd_id)

    def _log(self, name: str) -> Path:
        return self.dir / {"mon": "mon.a.log", "osd": "osd.0.log",
                           "rgw": f"{RGW_NAME}.log"}[name]

    def _spawn(self, name: str, *argv: str) -> None:
        with open(self.dir / f"{name}.out", "ab") as out:
            self._processes[name] = subprocess.Popen(
                [*argv, "-c", str(self._conf)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)

    def _check_alive(self, name: str) -> None:
        process = self._processes[name]
        if process.poll() is not None:
            del self._processes[name]
            log = self._log(name) if self._log(name).exists() else self.dir / f"{name}.out"
            # its error lines, not merely its last ones (other threads keep logging after
            # "failed to bind"); from stderr if the log has none (a daemon that exits at
            # once may leave its log unflushed: both seen in CI)
            why = (_errors(log) or _errors(self.dir / f"{name}.out") or _tail(log, 3))
            raise S3ServerError(f"{name} exited with {process.returncode}: {why}")

    def _ceph_tool(self, *argv: str, conf: bool = True) -> str:
        """Run a Ceph command-line tool; one clear error with its output on failure."""
        command = [*argv, "-c", str(self._conf)] if conf else list(argv)
        try:
            done = subprocess.run(command, capture_output=True, timeout=START_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise S3ServerError(f"{argv[0]} {argv[1]} timed out after {START_TIMEOUT:.0f} s; "
                                f"mon log: {_tail(self._log('mon'))}") from exc
        if done.returncode != 0:
            output = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise S3ServerError(f"{' '.join(argv[:3])} failed ({done.returncode}): "
                                f"{' | '.join(output.splitlines()[-5:])}")
        return done.stdout.decode()

    def _stop(self, name: str) -> None:
        process = self._processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main() -> None:
    """Run one server until Ctrl-C, printing how to reach it."""
    server = CephS3()
    try:
        started = time.monotonic()
        server.start()
        for key, value in server.environment().items():
            print(f"export {key}={value}")
        print(f"# S3 endpoint {server.endpoint} (up in {time.monotonic() - started:.1f} s, "
              f"state in {server.dir}); Ctrl-C stops it", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except S3ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        server.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
