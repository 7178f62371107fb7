"""TrustChain application shell: CLI, configuration, wiring."""

__version__ = "0.1.0"

__all__ = ["__version__"]
