"""poolsvc: a fast userspace model of TEE shared memory.

See README.md and docs/.  The kernel implementations (compiled or pure Python)
are chosen once, at import, by ``poolsvc._backend``.
"""
from __future__ import annotations

from . import errors
from ._backend import BACKEND

__version__ = "0.1.0"
__all__ = ["BACKEND", "errors", "__version__"]
