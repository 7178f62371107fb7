"""The shipped configurations: ``production.toml`` (the reference deployment) and
``development.toml`` (the embedded default of ``trustchain serve``)."""

from importlib import resources

__all__ = ["path", "read"]


def read(name: str) -> str:
    """Text of the shipped configuration file ``name``."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def path(name: str) -> str:
    """Filesystem path of the shipped configuration file ``name``."""
    return str(resources.files(__name__).joinpath(name))
