"""Registered memory truncated by its owner cannot kill the embedded System (issue 13, item 2).

A POSIX shm object (or a memfd) is registered, then its owner truncates it
(to 0, and to one page) at each stage: idle, before a trusted app reads it
(also after faulthandler replaced the SIGBUS handler), while the frame table
copies from it, and at close.  The process lives, the
call that meets the truncated memory fails with a typed error, the
registration is dead, accounting returns to baseline and ``/dev/shm`` is clean.

Every scenario runs in a child interpreter (the backend selected by
``POOLSVC_PUREPYTHON`` is inherited), so a regression is a failing test, not a
dead pytest.  Also here: a SIGBUS outside every guarded range still ends the
process (the handler chains to faulthandler, then to the default action).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The child: registers 3 pages of an object, truncates it at ``stage`` to
#: ``keep`` bytes, and prints what it saw as JSON.
CHILD = textwrap.dedent('''
    import faulthandler, hashlib, json, mmap, os, sys
    faulthandler.enable()                      # as pytest does: the guard must chain past it
    import posix_ipc
    sys.path.insert(0, "tests")
    from poolsvc import Config, System
    from poolsvc.errors import NotSharedMemory, TeeError
    from poolsvc.tee.driver import RegisteredMemref, TempMemref
    from poolsvc.tee.ta import Sha256App
    from sysutil import LeakCheck, assert_accounting, assert_idle

    stage, keep, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    PAGES = 3
    leaks = LeakCheck()
    seen = {}
    with System(Config(dynamic_shm=True)) as system:
        ctx = system.open_context()
        sha = ctx.open_session(Sha256App.UUID)
        obj = posix_ipc.SharedMemory(f"/poolsvc-sigbus-{os.getpid()}", posix_ipc.O_CREX,
                                     size=PAGES * 4096)
        obj.unlink()
        mm = mmap.mmap(obj.fd, PAGES * 4096)
        mm[:] = b"\\x5a" * (PAGES * 4096)
        if how == "buffer":
            shm = ctx.register_user_buf(memoryview(mm)[100:PAGES * 4096 - 100])
        else:
            shm = ctx.register_fd(obj.fd, 100, PAGES * 4096 - 200)
        used = system.dynamic.used_frames

        def digest():
            out = bytearray(32)
            try:
                sha.invoke(Sha256App.DIGEST, [RegisteredMemref(shm, 0, None, "in"), TempMemref(out, "out")])
            except TeeError as exc:
                return f"TeeError {exc.code:#x}: {exc}"
            return out.hex()

        seen["before"] = digest() == hashlib.sha256(b"\\x5a" * (PAGES * 4096 - 200)).hexdigest()
        if stage == "idle":
            os.ftruncate(obj.fd, keep)
        elif stage in ("read", "faulthandler"):
            if stage == "faulthandler":         # SIGBUS handlers replaced since the registration
                faulthandler.disable()
                faulthandler.enable()
            os.ftruncate(obj.fd, keep)
            seen["call"] = digest()
            seen["again"] = digest()
        elif stage == "copy":                   # a copy through the frame table, mid-access
            os.ftruncate(obj.fd, keep)
            seen["copied"] = system.memory.read(int(shm.pages[2]), 16).hex()
            seen["call"] = digest()
        seen["dead"] = system.usermem.dead(shm.backing)
        seen["used_while_registered"] = system.dynamic.used_frames == used
        if stage == "close":
            os.ftruncate(obj.fd, keep)
        shm.close()
        sha.close()
        ctx.close()
        assert_accounting(system)
        assert_idle(system)
        seen["objects"] = len(system.usermem.objects)
    mm.close()
    obj.close_fd()
    leaks.assert_balanced()
    print(json.dumps(seen))
''')


def run_child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())


@pytest.mark.parametrize("how", ["buffer", "fd"])
@pytest.mark.parametrize("keep", [0, 4096])
@pytest.mark.parametrize("stage", ["idle", "read", "faulthandler", "copy", "close"])
def test_truncated_registration_fails_the_call_and_the_process_lives(stage: str, keep: int,
                                                                      how: str) -> None:
    child = run_child(stage, str(keep), how)
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen["before"] is True
    assert seen["used_while_registered"] is True      # a dead registration stays accounted
    assert seen["objects"] in (0, 1)                  # a kept ledger pins nothing (assert_idle)
    if stage in ("read", "faulthandler"):
        # the app's view of the memory was refused (NotSharedMemory): BAD_PARAMETERS from the app
        assert seen["call"].startswith("TeeError 0xffff0006") and "TRUSTED_APP" in seen["call"]
        assert seen["again"].startswith("TeeError 0xffff0006")
        assert seen["dead"] is True
    elif stage == "copy":
        assert seen["copied"] == "00" * 16            # the guard's zero pages
        assert seen["dead"] is True
        assert seen["call"].startswith("TeeError 0xffff0006")
    else:                                             # nothing touched the pages
        assert seen["dead"] is False


def test_a_fault_outside_every_guarded_range_still_ends_the_process() -> None:
    script = textwrap.dedent('''
        import faulthandler, mmap, os
        faulthandler.enable()
        from poolsvc import Config, System
        with System(Config(dynamic_shm=True)) as system:
            ctx = system.open_context()
            keep = bytearray(4096)
            ctx.register_user_buf(keep)               # installs the guard
            fd = os.memfd_create("unguarded")
            os.ftruncate(fd, 4096)
            mm = mmap.mmap(fd, 4096)
            os.ftruncate(fd, 0)
            print("touching", flush=True)
            mm[0]
    ''')
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=os.environ.copy())
    assert child.stdout.strip() == "touching"
    assert child.returncode == -signal.SIGBUS
    assert "Bus error" in child.stderr                # faulthandler ran: the guard chained to it


def test_the_guard_module_checks_its_arguments_and_its_exports() -> None:
    import ctypes
    import mmap

    from poolsvc import _sigguard as guard

    with pytest.raises(ValueError, match="page-aligned"):
        guard.add(4096, 4096 + 100)
    with pytest.raises(ValueError, match="page-aligned"):
        guard.probe(8192, 4096)
    with pytest.raises(ValueError, match="not in use"):
        guard.dead(guard.CAPACITY)
    anon = mmap.mmap(-1, 2 * 4096)
    start = ctypes.addressof(ctypes.c_char.from_buffer(anon))
    view = memoryview(anon)
    with pytest.raises(ValueError, match="not inside"):
        guard.GuardedWindow(view, start + 4096, start + 2 * 4096)
    window = guard.GuardedWindow(view, start, start + 2 * 4096)
    slot = guard.add(start, start + 2 * 4096)
    assert not guard.probe(start, start + 2 * 4096) and not guard.dead(slot) and not window.dead()
    export = memoryview(window)
    export[5] = 7
    assert anon[5] == 7 and window.exports == 1
    with pytest.raises(BufferError, match="exports"):
        window.release()
    export.release()
    guard.remove(slot)
    window.release()
    with pytest.raises(BufferError, match="released"):
        memoryview(window)
    view.release()
    anon.close()


def test_registrations_beyond_the_guard_table_are_refused(monkeypatch) -> None:
    from poolsvc import Config, System, _sigguard, usermem
    from poolsvc.errors import OutOfMemory

    monkeypatch.setattr(usermem, "sigguard", _FullGuard(_sigguard))
    with System(Config(dynamic_shm=True)) as system:
        ctx = system.open_context()
        used = system.dynamic.used_frames
        with pytest.raises(OutOfMemory, match="guarded already"):
            ctx.register_user_buf(bytearray(100))
        assert system.dynamic.used_frames == used and not ctx.shms and not system.usermem.objects
        ctx.close()


class _FullGuard:
    """The guard module with every slot taken."""

    def __init__(self, module: object) -> None:
        self._module = module

    def __getattr__(self, name: str) -> object:
        return getattr(self._module, name)

    @staticmethod
    def add(start: int, end: int) -> int:
        return -1
