"""The ``prune-repair`` command line: a thin layer over the public API.

Each command lives in its own module and registers itself on :data:`main`.
Run ``prune-repair --help`` or ``prune-repair COMMAND --help``.
"""

from . import merge_cmd, prune_cmd, repair_cmd  # noqa: F401  (each registers its command)
from .main import main

__all__ = ["main"]
