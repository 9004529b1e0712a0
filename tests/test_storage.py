"""Storage hygiene: O_EXCL objects, unlinked at birth, stale objects of dead pids removed."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import posix_ipc
import pytest

from poolsvc.errors import PoolsvcError
from poolsvc.storage import LIVE, Storage, cleanup_stale

from sysutil import shm_leftovers


def test_create_is_unlinked_and_private():
    before = shm_leftovers()
    s = Storage.create(1 << 16, "/poolsvctest")
    try:
        assert shm_leftovers() == before  # unlinked at once
        mode = os.fstat(s.fd).st_mode
        assert stat.S_IMODE(mode) == 0o600
        s.mm[:4] = b"abcd"
        assert s.mm[:4] == b"abcd"
    finally:
        assert s.close()
    assert s.closed and s.close()  # idempotent


def test_close_with_exported_view_reports_it():
    s = Storage.create(4096, "/poolsvctest")
    view = memoryview(s.mm)
    count = LIVE["storage"]
    assert s.close() is False  # mapping still exported, descriptor closed anyway
    assert LIVE["storage"] == count - 1
    view.release()


def test_bad_size():
    with pytest.raises(PoolsvcError):
        Storage.create(1000, "/poolsvctest")


def test_cleanup_stale_removes_only_dead_pids():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    name_dead = f"/poolsvcstale-{dead_pid}-{'ab' * 16}"
    name_live = f"/poolsvcstale-{os.getpid()}-{'cd' * 16}"
    for name in (name_dead, name_live):
        posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096).close_fd()
    try:
        removed = cleanup_stale("/poolsvcstale")
        assert removed == [name_dead]
        assert "poolsvcstale-%d-%s" % (os.getpid(), "cd" * 16) in os.listdir("/dev/shm")
    finally:
        for name in (name_dead, name_live):
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass
