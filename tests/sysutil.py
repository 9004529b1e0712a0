"""Helpers for System-level tests: leak counters and accounting checks."""
from __future__ import annotations

import os

from multiprocessing import resource_tracker

from poolsvc.storage import LIVE

# multiprocessing.shared_memory starts a tracker process (and keeps a pipe to
# it) on first use; start it now so that its descriptor is not counted as a leak.
resource_tracker.ensure_running()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shm_leftovers(prefix: str = "poolsvc") -> list[str]:
    """poolsvc objects in /dev/shm created by this process or by a dead one.

    Objects of other live processes (a concurrent test run, a daemon) are not
    this test's to judge: each lives for microseconds between create and unlink.
    """
    found = []
    for name in os.listdir("/dev/shm"):
        if not name.startswith(prefix):
            continue
        parts = name.split("-")
        pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
        if pid is None or pid == os.getpid() or not _alive(pid):
            found.append(name)
    return sorted(found)


class LeakCheck:
    """Counters taken before a test and asserted balanced after it."""

    def __init__(self) -> None:
        self.fds = open_fds()
        self.storage = LIVE["storage"]
        self.shm = shm_leftovers()

    def assert_balanced(self) -> None:
        assert LIVE["storage"] == self.storage, f"storage objects leaked: {LIVE['storage'] - self.storage}"
        assert open_fds() == self.fds, f"file descriptors leaked: {open_fds() - self.fds}"
        assert shm_leftovers() == self.shm, f"/dev/shm objects left: {shm_leftovers()}"


def assert_accounting(system) -> None:
    """The pool invariants that must hold after every operation."""
    dyn = system.dynamic
    assert dyn.free_frames + dyn.used_frames == dyn.nframes
    if system.static is not None:
        st = system.static
        assert st.free_bytes + st.used_bytes == st.size
        assert st.used_bytes == sum(length for _, length in st.allocations())
    live = [s for ctx in system.contexts.values() for s in ctx.shms.values()]
    with_id = [s for s in live if s.id > 0]
    assert len(system.ids) == len(with_id)
    assert sorted(system.ids.ids()) == sorted(s.id for s in with_id)
    registered = {s.cookie for s in live if s.registered}
    assert set(system.tee.registered) == registered


def assert_idle(system) -> None:
    """Nothing allocated but the System's own pages (message page)."""
    stats = system.stats()
    assert stats["ids"] == 0
    assert stats["registered_cookies"] == 0
    own = 1 if system.config.dynamic_shm else 0
    assert system.dynamic.used_frames == own, system.dynamic.used_frames
    if system.static is not None:
        expected = 0 if system.config.dynamic_shm else 4096
        assert system.static.used_bytes == expected
