"""Both implementations of the API satisfy the contract in ``poolsvc/api.py``.

The embedded System (``poolsvc.system``, ``poolsvc.context``, ``poolsvc.shm``,
``poolsvc.tee.session``) and
the pool-service client (``poolsvc.service.client``) must each be usable
where an ``api.System`` / ``api.Context`` / ``api.Shm`` / ``api.Session`` is
expected.  mypy checks it statically on a small typed module (the same mypy
and configuration as ``tests/test_sourcecode.py``), and the runtime-checkable
protocols check it on live objects of the embedded System.
"""
from __future__ import annotations

import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from poolsvc import Config, System, api
from poolsvc.errors import BadParameters, NotSharedMemory, OutOfMemory

from poolsvc.service.client import connect
from poolsvc.tee.ta import CopyApp

from svcutil import DaemonThread
from teeutil import SMALL

ROOT = Path(__file__).resolve().parent.parent

CONTRACT = '''
from poolsvc import api
from poolsvc.context import Context
from poolsvc.service import client
from poolsvc.shm import Shm
from poolsvc.system import System
from poolsvc.tee.session import Session


def embedded_system(x: System) -> api.System:
    return x


def embedded_context(x: Context) -> api.Context:
    return x


def embedded_shm(x: Shm) -> api.Shm:
    return x


def embedded_session(x: Session) -> api.Session:
    return x


def service_system(x: client.Client) -> api.System:
    return x


def service_context(x: client.Context) -> api.Context:
    return x


def service_shm(x: client.Shm) -> api.Shm:
    return x


def service_session(x: client.Session) -> api.Session:
    return x
'''

# A class that lacks part of the contract: mypy must reject it (the check can fail).
BROKEN = '''
from poolsvc import Config, System, api


class HalfShm:
    id = 1

    def close(self) -> None:
        pass


def broken(x: HalfShm) -> api.Shm:
    return x
'''


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    module = tmp_path / "contract_check.py"
    module.write_text(source)
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(module)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_both_implementations_satisfy_the_protocols(tmp_path):
    out = _mypy(tmp_path, CONTRACT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_rejects_an_incomplete_implementation(tmp_path):
    out = _mypy(tmp_path, BROKEN)
    assert out.returncode != 0 and "HalfShm" in out.stdout, out.stdout + out.stderr


def _check_instances(system):
    assert isinstance(system, api.System)
    ctx = system.open_context()
    assert isinstance(ctx, api.Context)
    shm = ctx.alloc_user_buf(100)
    assert isinstance(shm, api.Shm)
    with ctx.open_session(CopyApp.UUID) as session:
        assert isinstance(session, api.Session)
    shm.close()
    ctx.close()


def test_embedded_objects_are_instances_of_the_protocols():
    with System(Config(**SMALL)) as system:
        _check_instances(system)
    assert not isinstance(object(), api.Shm)


def test_service_objects_are_instances_of_the_protocols(tmp_path):
    daemon = DaemonThread(tmp_path / "d.sock")
    try:
        with connect(str(tmp_path / "d.sock")) as client:
            _check_instances(client)
    finally:
        daemon.stop()


@pytest.mark.parametrize("size", [-1, True, 1.0, "8", 1 << 63])
def test_check_size_refuses(size):
    with pytest.raises(BadParameters):
        api.check_size(size)


def test_check_size_0_is_out_of_memory():
    """The kernel's pools refuse size 0 and TEE_IOC_SHM_ALLOC fails with ENOMEM."""
    with pytest.raises(OutOfMemory, match="ENOMEM"):
        api.check_size(0)


def _register_without_reg_mem(system, private_reachable: bool):
    """REGISTER of POSIX shared memory where the TEE has no DYNAMIC_SHM: the kernel
    sends REGISTER_SHM, the secure world refuses it, the ioctl is -EINVAL.  Private
    memory is sent (and refused) only by a System that can reach it (embedded)."""
    ctx = system.open_context()
    seg = shared_memory.SharedMemory(create=True, size=2 * 4096)
    try:
        with pytest.raises(BadParameters, match="EINVAL"):
            ctx.register_user_buf(seg.buf)
        with pytest.raises(BadParameters if private_reachable else NotSharedMemory):
            ctx.register_user_buf(bytearray(4096))
    finally:
        seg.close()
        seg.unlink()
    ctx.close()


def test_register_without_reg_mem_embedded():
    with System(Config(**SMALL, dynamic_shm=False)) as system:
        _register_without_reg_mem(system, private_reachable=True)


def test_register_without_reg_mem_daemon(tmp_path):
    daemon = DaemonThread(tmp_path / "d.sock", config=Config(**SMALL, dynamic_shm=False))
    try:
        with connect(str(tmp_path / "d.sock")) as client:
            _register_without_reg_mem(client, private_reachable=False)
    finally:
        daemon.stop()


def test_checks_accept_and_refuse():
    api.check_size((1 << 63) - 1)
    api.check_shm_id(-(1 << 63))
    for bad in (True, "1", 1 << 63, -(1 << 63) - 1):
        with pytest.raises(BadParameters):
            api.check_shm_id(bad)
    assert api.check_u32(0xFFFFFFFF, "x") == 0xFFFFFFFF
    with pytest.raises(BadParameters, match="login -1 is not a u32"):
        api.check_u32(-1, "login")
    with pytest.raises(BadParameters, match="at most 4"):
        api.check_param_count([None] * 5)
    with pytest.raises(BadParameters, match="is not a UUID"):
        api.parse_uuid("nope")
    with pytest.raises(NotSharedMemory, match="read-only mapping"):
        api.check_writable(memoryview(bytearray(1)), 0x1000, False)
    with pytest.raises(NotSharedMemory, match="object is read-only"):
        api.check_writable(memoryview(b"x"), 0x1000, True)


def test_embedded_refuses_a_size_beyond_64_bits():
    with System(Config(**SMALL)) as system:
        ctx = system.open_context()
        with pytest.raises(BadParameters, match="64-bit"):
            ctx.alloc_user_buf(1 << 63)
        with pytest.raises(BadParameters, match="64-bit"):
            ctx.shm_from_id(1 << 63)
