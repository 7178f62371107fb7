"""Everything durable or secret: files, keys, certificates, databases."""

from ._files import fsync_directory, write_atomic
from ._tls import TlsCredential, create_self_signed, credential_paths

__all__ = ["TlsCredential", "create_self_signed", "credential_paths", "fsync_directory",
           "write_atomic"]
