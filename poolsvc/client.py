"""``poolsvc.connect``: the client of the pool service (see poolsvc/service/client.py)."""
from __future__ import annotations

from .service.client import Client, DaemonTimeout, UsedAfterFork, connect

__all__ = ["Client", "DaemonTimeout", "UsedAfterFork", "connect"]
