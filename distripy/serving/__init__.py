"""distripy as a backend: ``Engine`` (N rank processes driven from one process; ``engine``) and
the rank processes' side of it (``worker``)."""

from distripy.serving.engine import Engine

__all__ = ["Engine"]
