"""Files the client library keeps on disk (keys, certificates, proof credentials).

``stoq`` has its own small helper rather than ``store.write_atomic``: the
dependency rule is trustchain -> stoq -> protocol, so stoq cannot import store.
"""

from __future__ import annotations

import os
from pathlib import Path


def private_directory(path: Path) -> None:
    """Make ``path`` (and its missing parents) if it does not exist; the directory
    itself with mode 0700, whatever the umask, as it holds a private key. An existing
    directory is left as it is: it may be one the user chose for other files too."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return  # made meanwhile by another process: as above, left as it is
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file,
    never half of one; a new file gets ``mode`` (a private key: 0o600) from the start,
    so the secret is never readable by others, not even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as file:
        file.write(data)  # a buffered file writes all of it (os.write may stop short)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
