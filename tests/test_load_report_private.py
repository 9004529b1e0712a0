"""Daemon-private content checks in the load harness: counted and reported, never silently exempt.

A private buffer of the reserved static pool has no view for its owner by
design (it may share a carve-out page with other clients' buffers).  The
ledger counts its content checks as ``daemon_private``; the report names
them ("daemon-private: N, not client-visible by design"), so a zero
"unverified" figure means every other check was made.
"""
from __future__ import annotations

from typing import Any

import pytest

from poolsvc.errors import NotSupported
from poolsvc.load import report
from poolsvc.load.ledger import Held, Ledger


class _Owner(Ledger):
    """The ledger state a worker sets, without a daemon."""

    def __init__(self, dynamic: bool) -> None:
        self.slot, self.gen, self.dynamic = 2, 1, dynamic
        self.live, self.live_list, self.pages, self.free_regions = {}, [], {}, []
        self.violations, self.unverified = [], 0


class _Shm:
    def __init__(self, first: int, size: int, view: bool) -> None:
        self.page_run = (first, max(1, -(-size // 4096)))
        self.cookie, self.id, self.buf, self.has_view = 0x77, 1, bytearray(size), view

    def view(self) -> memoryview:
        if not self.has_view:
            raise NotSupported("a private buffer of the reserved static pool stays in the daemon")
        return memoryview(self.buf)


def test_static_private_checks_are_counted_as_daemon_private():
    owner = _Owner(dynamic=False)
    private = owner._hold(_Shm(0x42003000, 512, view=False), "p", 512, 1)
    owner._verify(private, "free")
    owner._verify(private, "free")
    assert (owner.daemon_private, owner.unverified, owner.violations) == (2, 0, [])
    blind = owner._hold(_Shm(0x42004000, 4096, view=False), "u", 4096, 2)  # a user buffer: must have one
    owner._verify(blind, "free")
    assert (owner.daemon_private, owner.unverified) == (2, 1)
    seen = owner._hold(_Shm(0x42005000, 4096, view=True), "u", 4096, 3)
    owner._verify(seen, "free")
    assert (owner.daemon_private, owner.unverified, owner.violations) == (2, 1, [])


def test_a_dynamic_private_buffer_without_a_view_is_unverified():
    owner = _Owner(dynamic=True)
    held = Held(_Shm(0x50000000, 64, view=False), "p", 64, 1)
    assert not owner.daemon_private_buffer(held)
    owner._verify(held, "free")
    assert (owner.daemon_private, owner.unverified) == (0, 1)


def _report(pool: str, **checks: Any) -> dict[str, Any]:
    return {"spec": {"replay": None, "mix": "alloc_priv=1", "clients": 1, "batch": 1, "sizes": "64"},
            "service": {"pool": pool, "backend": "compiled", "config": "64MiB", "transport": "shm"},
            "machine": {"cpus": 2}, "elapsed_s": 1.0, "ops": {}, "ops_total": 10, "ops_per_s": 10.0,
            "errors": {"by_type": {}}, "faults": {"kills": 0, "restarts": 0, "malformed_sent": 0},
            "invariants": {"snapshots_checked": 3}, "skipped_ops": 0, "unverified_checks": 0,
            "leaks": {}, "violations": {"count": 0, "quoted": []}, "ok": True, **checks}


@pytest.mark.parametrize("pool, private, shown", [
    ("static", 5, "daemon-private: 5, not client-visible by design"),
    ("static", 0, "daemon-private: 0, not client-visible by design"),
    ("dynamic", 0, None)])
def test_report_names_daemon_private_checks(pool, private, shown):
    text = report.text(_report(pool, daemon_private_checks=private))
    line = next(x for x in text.splitlines() if x.startswith("checks:"))
    assert "0 content checks impossible (no view)" in line
    if shown:
        assert line.endswith(shown)
    else:
        assert "daemon-private" not in line


def test_compare_shows_daemon_private_checks():
    text = report.compare(_report("dynamic", daemon_private_checks=0),
                          _report("static", daemon_private_checks=12), ("dyn", "static"))
    row = next(x for x in text.splitlines() if x.startswith("daemon-private checks"))
    assert row.split()[-2:] == ["0", "12"]
