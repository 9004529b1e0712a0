"""poolsvc: a fast userspace model of TEE shared memory.

The embedded API (docs/design.md section 9)::

    import poolsvc
    with poolsvc.System() as system:
        ctx = system.open_context()
        shm = ctx.alloc_user_buf(8192)
        shm.view()[:5] = b"hello"

The kernel implementations (compiled or pure Python) are chosen once, at
import, by ``poolsvc._backend`` (``POOLSVC_PUREPYTHON=1`` selects pure Python).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from ._backend import BACKEND
from .constants import PAGE_SIZE, ShmFlags

if TYPE_CHECKING:  # pragma: no cover
    from . import pagelist
    from .config import Config
    from .context import Context
    from .shm import Shm
    from .system import System

# Loaded on first use, so that importing a kernel module stays cheap.
_LAZY = {"Config": "config", "System": "system", "Context": "context", "Shm": "shm",
         "pagelist": None, "connect": "client"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'poolsvc' has no attribute {name!r}")
    import importlib

    module = _LAZY[name]
    if module is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{module}", __name__), name)

__version__ = "0.1.0"
__all__ = ["BACKEND", "Config", "Context", "PAGE_SIZE", "Shm", "ShmFlags", "System",
           "errors", "pagelist", "__version__"]
