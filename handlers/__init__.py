"""TrustChain services: each answers ops with typed arguments, without I/O of its own.

Handlers never import ``stoq``; the application wires a :class:`Router` into
the transport.
"""

from ._router import Handler, RequestContext, Router
from ._tasks import cancel_and_wait
from .node import NodeService

__all__ = ["Handler", "NodeService", "RequestContext", "Router", "cancel_and_wait"]
