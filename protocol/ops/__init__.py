"""Op specifications of every TrustChain service, one module per service.

Importing this package registers them all with :mod:`protocol._schema`.
"""

from . import ca, consensus, ct, dns, fp, node

__all__ = ["ca", "consensus", "ct", "dns", "fp", "node"]
