"""Conformance of poolsvc.teec to the GlobalPlatform TEE Client API and libteec's behaviour.

Each test states an assertion of the specification (GP TEE Client API v1.0,
sections 4.5 and 4.6) or of libteec, and runs against every backend: the
embedded System and a daemon over each transport, with and without
``TEE_GEN_CAP_REG_MEM`` (without it, registered memory is a shadow buffer).
Expected digests and patterns come from hashlib and plain Python, never from
poolsvc.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import uuid
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Iterator

import pytest

from poolsvc import Config
from poolsvc import teec as T
from poolsvc.tee.ta import (
    CopyApp,
    FillApp,
    HelloWorldApp,
    ParamType,
    Sha256App,
    StorageApp,
    TrustedApp,
    WaitApp,
)

from svcutil import SMALL, DaemonThread
from test_service_cancel import StartedWait

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

#: "-noreg": a TEE without dynamic shared memory, whose buffers come from the static carve-out.
BACKENDS = ["embedded", "embedded-noreg", "socket", "shm", "socket-noreg", "shm-noreg"]


class FourParams(TrustedApp):
    """A test app taking all four parameters: a + len(input) into an output value, input reversed."""

    UUID = uuid.UUID("5f8c7a2e-64a1-4cf4-9a0a-3c2b1d0e9f11")
    NAME = "four"

    def invoke(self, func: int, params: Any) -> None:
        types = [p.type for p in params]
        assert types == [ParamType.VALUE_INPUT, ParamType.MEMREF_INPUT, ParamType.MEMREF_OUTPUT,
                         ParamType.VALUE_OUTPUT], types
        data = bytes(params[1].read())
        params[2].require(len(data))
        params[2].write(data[::-1])
        params[2].size = len(data)
        params[3].a = (params[0].a + len(data)) & 0xFFFFFFFF
        params[3].b = func


class Tee:
    """One backend: how to name it to TEEC_InitializeContext, and what it offers."""

    def __init__(self, name: str | None, reg_mem: bool, system_of: Any) -> None:
        self.name = name
        self.reg_mem = reg_mem
        self._system_of = system_of

    def context(self) -> T.TEEC_Context:
        ctx = T.TEEC_Context()
        assert T.TEEC_InitializeContext(self.name, ctx) == T.TEEC_SUCCESS
        return ctx

    def install(self, ctx: T.TEEC_Context, app: type[TrustedApp]) -> None:
        self._system_of(ctx).tee.install(app)


@pytest.fixture(params=BACKENDS)
def tee(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tee]:
    kind = request.param
    reg_mem = not kind.endswith("noreg")
    config = Config(**SMALL) if reg_mem else Config(**SMALL, dynamic_shm=False)
    monkeypatch.delenv("POOLSVC_SOCKET", raising=False)
    if kind.startswith("embedded"):
        T.configure_embedded(config)
        yield Tee(None, reg_mem, lambda ctx: ctx.context.system)
        assert T._Embedded.system is None, "a context of the embedded System was left open"
        T.configure_embedded(None)
        return
    monkeypatch.setenv("POOLSVC_TRANSPORT", kind.split("-")[0])
    # max_ta_wait_ms: an app may wait long enough for the cancellation test to cancel it
    daemon = DaemonThread(tmp_path / "d.sock", config, max_ta_wait_ms=30_000)
    try:
        yield Tee(daemon.path, reg_mem, lambda ctx: daemon.server.system)
    finally:
        daemon.stop()


@pytest.fixture
def ctx(tee: Tee) -> Iterator[T.TEEC_Context]:
    context = tee.context()
    yield context
    T.TEEC_FinalizeContext(context)


def open_session(ctx: T.TEEC_Context, app: Any) -> T.TEEC_Session:
    session = T.TEEC_Session()
    assert T.TEEC_OpenSession(ctx, session, app.UUID, T.TEEC_LOGIN_PUBLIC, None, None) == (
        T.TEEC_SUCCESS, T.TEEC_ORIGIN_TRUSTED_APP)
    return session


def op(*params: tuple[int, Any]) -> T.TEEC_Operation:
    """An operation from (type, setter) pairs; the setter fills the TEEC_Parameter."""
    operation = T.TEEC_Operation()
    types = [t for t, _ in params] + [T.TEEC_NONE] * (4 - len(params))
    operation.paramTypes = T.TEEC_PARAM_TYPES(*types)
    for i, (_, fill) in enumerate(params):
        fill(operation.params[i])
    return operation


def tmp(buffer: Any, size: int | None = None) -> Any:
    def fill(p: T.TEEC_Parameter) -> None:
        p.tmpref.buffer = buffer
        p.tmpref.size = len(buffer) if size is None else size
    return fill


def mem(parent: T.TEEC_SharedMemory, offset: int = 0, size: int = 0) -> Any:
    def fill(p: T.TEEC_Parameter) -> None:
        p.memref.parent, p.memref.offset, p.memref.size = parent, offset, size
    return fill


def val(a: int = 0, b: int = 0) -> Any:
    def fill(p: T.TEEC_Parameter) -> None:
        p.value.a, p.value.b = a, b
    return fill


def pattern(n: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


@pytest.fixture
def posix_buffer() -> Iterator[memoryview]:
    """Memory the TEE can register zero-copy: a POSIX shared memory object."""
    sm = shared_memory.SharedMemory(create=True, size=64 * 1024)
    try:
        yield sm.buf
    finally:
        sm.close()
        sm.unlink()


# -- constants and encoding -------------------------------------------------------------------

def test_constants_have_the_specification_values() -> None:
    spec = {
        "TEEC_SUCCESS": 0, "TEEC_ERROR_GENERIC": 0xFFFF0000, "TEEC_ERROR_ACCESS_DENIED": 0xFFFF0001,
        "TEEC_ERROR_CANCEL": 0xFFFF0002, "TEEC_ERROR_ACCESS_CONFLICT": 0xFFFF0003,
        "TEEC_ERROR_EXCESS_DATA": 0xFFFF0004, "TEEC_ERROR_BAD_FORMAT": 0xFFFF0005,
        "TEEC_ERROR_BAD_PARAMETERS": 0xFFFF0006, "TEEC_ERROR_BAD_STATE": 0xFFFF0007,
        "TEEC_ERROR_ITEM_NOT_FOUND": 0xFFFF0008, "TEEC_ERROR_NOT_IMPLEMENTED": 0xFFFF0009,
        "TEEC_ERROR_NOT_SUPPORTED": 0xFFFF000A, "TEEC_ERROR_NO_DATA": 0xFFFF000B,
        "TEEC_ERROR_OUT_OF_MEMORY": 0xFFFF000C, "TEEC_ERROR_BUSY": 0xFFFF000D,
        "TEEC_ERROR_COMMUNICATION": 0xFFFF000E, "TEEC_ERROR_SECURITY": 0xFFFF000F,
        "TEEC_ERROR_SHORT_BUFFER": 0xFFFF0010, "TEEC_ERROR_EXTERNAL_CANCEL": 0xFFFF0011,
        "TEEC_ERROR_TARGET_DEAD": 0xFFFF3024,
        "TEEC_ORIGIN_API": 1, "TEEC_ORIGIN_COMMS": 2, "TEEC_ORIGIN_TEE": 3, "TEEC_ORIGIN_TRUSTED_APP": 4,
        "TEEC_MEM_INPUT": 1, "TEEC_MEM_OUTPUT": 2,
        "TEEC_NONE": 0, "TEEC_VALUE_INPUT": 1, "TEEC_VALUE_OUTPUT": 2, "TEEC_VALUE_INOUT": 3,
        "TEEC_MEMREF_TEMP_INPUT": 5, "TEEC_MEMREF_TEMP_OUTPUT": 6, "TEEC_MEMREF_TEMP_INOUT": 7,
        "TEEC_MEMREF_WHOLE": 0xC, "TEEC_MEMREF_PARTIAL_INPUT": 0xD, "TEEC_MEMREF_PARTIAL_OUTPUT": 0xE,
        "TEEC_MEMREF_PARTIAL_INOUT": 0xF,
        "TEEC_LOGIN_PUBLIC": 0, "TEEC_LOGIN_USER": 1, "TEEC_LOGIN_GROUP": 2, "TEEC_LOGIN_APPLICATION": 4,
        "TEEC_LOGIN_USER_APPLICATION": 5, "TEEC_LOGIN_GROUP_APPLICATION": 6,
        "TEEC_CONFIG_PAYLOAD_REF_COUNT": 4,
    }
    assert {name: getattr(T, name) for name in spec} == spec
    assert T.TEEC_PARAM_TYPES(1, 5, 0xC, 0xF) == 0xFC51
    assert [T.TEEC_PARAM_TYPE_GET(0xFC51, i) for i in range(4)] == [1, 5, 0xC, 0xF]
    assert T.result_name(0xFFFF0010) == "TEEC_ERROR_SHORT_BUFFER"
    assert T.origin_name(3) == "TEEC_ORIGIN_TEE"
    u = uuid.UUID("8aaaf200-2450-11e4-abe2-0002a5d5c51b")
    c = T.TEEC_UUID.from_uuid(u)
    assert (c.timeLow, c.timeMid, c.timeHiAndVersion) == (0x8AAAF200, 0x2450, 0x11E4)
    assert c.clockSeqAndNode == bytes([0xAB, 0xE2, 0x00, 0x02, 0xA5, 0xD5, 0xC5, 0x1B]) and c.uuid == u


# -- shared memory ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [T.TEEC_MEM_INPUT, T.TEEC_MEM_OUTPUT, T.TEEC_MEM_INPUT | T.TEEC_MEM_OUTPUT])
def test_allocated_memory_carries_data_in_its_direction(ctx: T.TEEC_Context, flags: int) -> None:
    shm = T.TEEC_SharedMemory(size=5000, flags=flags)
    assert T.TEEC_AllocateSharedMemory(ctx, shm) == T.TEEC_SUCCESS
    assert shm.kind == "allocated" and len(shm.buffer) == 5000
    if flags & T.TEEC_MEM_INPUT:
        shm.buffer[:] = pattern(5000)
        s = open_session(ctx, Sha256App)
        digest = bytearray(32)
        source = (T.TEEC_MEMREF_WHOLE, mem(shm)) if flags == T.TEEC_MEM_INPUT else \
            (T.TEEC_MEMREF_PARTIAL_INPUT, mem(shm, 0, 5000))  # WHOLE of INOUT memory is MEMREF_INOUT
        assert T.TEEC_InvokeCommand(s, Sha256App.DIGEST, op(source, (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))) == (
            T.TEEC_SUCCESS, T.TEEC_ORIGIN_TRUSTED_APP)
        assert digest == hashlib.sha256(pattern(5000)).digest()
        T.TEEC_CloseSession(s)
    if flags & T.TEEC_MEM_OUTPUT:
        s = open_session(ctx, FillApp)
        operation = op((T.TEEC_MEMREF_WHOLE, mem(shm)), (T.TEEC_VALUE_INPUT, val(0x44332211, 4)))
        if flags == T.TEEC_MEM_OUTPUT:
            assert T.TEEC_InvokeCommand(s, FillApp.FILL, operation)[0] == T.TEEC_SUCCESS
            assert bytes(shm.buffer) == (b"\x11\x22\x33\x44" * 1250)
            assert operation.params[0].memref.size == 5000
        else:  # INOUT: the app sees MEMREF_INOUT, which fill accepts too
            assert T.TEEC_InvokeCommand(s, FillApp.FILL, operation)[0] == T.TEEC_SUCCESS
            assert bytes(shm.buffer) == (b"\x11\x22\x33\x44" * 1250)
        T.TEEC_CloseSession(s)
    T.TEEC_ReleaseSharedMemory(shm)
    assert shm.buffer is None and shm.kind is None


@pytest.mark.parametrize("memory", ["bytearray", "posix"])
@pytest.mark.parametrize("flags", [T.TEEC_MEM_INPUT, T.TEEC_MEM_OUTPUT, T.TEEC_MEM_INPUT | T.TEEC_MEM_OUTPUT])
def test_registered_memory_carries_data_in_its_direction(tee: Tee, ctx: T.TEEC_Context, posix_buffer: memoryview,
                                                         memory: str, flags: int) -> None:
    backing: Any = bytearray(9000) if memory == "bytearray" else posix_buffer
    backing[:9000] = pattern(9000)
    shm = T.TEEC_SharedMemory(buffer=backing, size=9000, flags=flags)
    assert T.TEEC_RegisterSharedMemory(ctx, shm) == T.TEEC_SUCCESS
    zero_copy = tee.reg_mem and (memory == "posix" or tee.name is None)  # the embedded System reaches private memory
    assert shm.kind == ("registered" if zero_copy else "shadow")
    if flags & T.TEEC_MEM_INPUT:
        s = open_session(ctx, Sha256App)
        digest = bytearray(32)
        source = (T.TEEC_MEMREF_WHOLE, mem(shm)) if flags == T.TEEC_MEM_INPUT else \
            (T.TEEC_MEMREF_PARTIAL_INPUT, mem(shm, 0, 9000))
        assert T.TEEC_InvokeCommand(s, Sha256App.DIGEST, op(source, (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest))))[0] == 0
        assert digest == hashlib.sha256(pattern(9000)).digest()
        T.TEEC_CloseSession(s)
    if flags & T.TEEC_MEM_OUTPUT:
        s = open_session(ctx, FillApp)
        operation = op((T.TEEC_MEMREF_WHOLE, mem(shm)), (T.TEEC_VALUE_INPUT, val(0xAB, 1)))
        assert T.TEEC_InvokeCommand(s, FillApp.FILL, operation)[0] == T.TEEC_SUCCESS
        assert bytes(backing[:9000]) == b"\xab" * 9000  # the caller's own memory, zero-copy or copied back
        T.TEEC_CloseSession(s)
    T.TEEC_ReleaseSharedMemory(shm)
    assert shm.buffer is backing  # a registration leaves the caller's buffer alone


def test_a_shadow_buffer_is_not_copied_back_for_input_memory(ctx: T.TEEC_Context) -> None:
    backing = bytearray(pattern(4096))
    # a read-only view cannot be registered zero-copy anywhere: it gets a shadow
    shm = T.TEEC_SharedMemory(buffer=memoryview(backing).toreadonly(), size=4096, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_RegisterSharedMemory(ctx, shm) == T.TEEC_SUCCESS
    assert shm.kind == "shadow"
    s = open_session(ctx, Sha256App)
    digest = bytearray(32)
    for _ in range(2):  # the copy-in happens before every call
        assert T.TEEC_InvokeCommand(s, 0, op((T.TEEC_MEMREF_WHOLE, mem(shm)),
                                             (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest))))[0] == 0
        assert digest == hashlib.sha256(bytes(backing)).digest()
        backing[:4] = b"next"
    T.TEEC_CloseSession(s)
    T.TEEC_ReleaseSharedMemory(shm)


def test_zero_length_memory_is_usable(ctx: T.TEEC_Context) -> None:
    allocated = T.TEEC_SharedMemory(size=0, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_AllocateSharedMemory(ctx, allocated) == T.TEEC_SUCCESS
    assert allocated.buffer is not None and len(allocated.buffer) == 0
    registered = T.TEEC_SharedMemory(buffer=bytearray(), size=0, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_RegisterSharedMemory(ctx, registered) == T.TEEC_SUCCESS
    s = open_session(ctx, Sha256App)
    for shm in (allocated, registered):
        digest = bytearray(32)
        assert T.TEEC_InvokeCommand(s, 0, op((T.TEEC_MEMREF_WHOLE, mem(shm)),
                                             (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))) == (0, 4)
        assert digest == hashlib.sha256(b"").digest()
    T.TEEC_CloseSession(s)
    T.TEEC_ReleaseSharedMemory(allocated)
    T.TEEC_ReleaseSharedMemory(registered)


def test_allocation_beyond_the_pool_is_out_of_memory(ctx: T.TEEC_Context) -> None:
    shm = T.TEEC_SharedMemory(size=1 << 40, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_AllocateSharedMemory(ctx, shm) == T.TEEC_ERROR_OUT_OF_MEMORY
    assert shm.buffer is None and shm.kind is None


def test_bad_shared_memory_requests_are_bad_parameters(ctx: T.TEEC_Context) -> None:
    for flags in (0, 4, T.TEEC_MEM_INPUT | 8):
        assert T.TEEC_AllocateSharedMemory(ctx, T.TEEC_SharedMemory(size=16, flags=flags)) == \
            T.TEEC_ERROR_BAD_PARAMETERS
    assert T.TEEC_AllocateSharedMemory(ctx, T.TEEC_SharedMemory(size=-1, flags=1)) == T.TEEC_ERROR_BAD_PARAMETERS
    assert T.TEEC_RegisterSharedMemory(ctx, T.TEEC_SharedMemory(size=16, flags=1)) == T.TEEC_ERROR_BAD_PARAMETERS
    assert T.TEEC_RegisterSharedMemory(ctx, T.TEEC_SharedMemory(bytearray(8), size=16, flags=1)) == \
        T.TEEC_ERROR_BAD_PARAMETERS
    assert T.TEEC_RegisterSharedMemory(ctx, T.TEEC_SharedMemory(object(), size=1, flags=1)) == \
        T.TEEC_ERROR_BAD_PARAMETERS


def test_releasing_finalizing_or_closing_none_does_nothing(ctx: T.TEEC_Context) -> None:
    T.TEEC_ReleaseSharedMemory(None)
    T.TEEC_CloseSession(None)
    T.TEEC_FinalizeContext(None)
    T.TEEC_RequestCancellation(None)
    shm = T.TEEC_SharedMemory(size=64, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_AllocateSharedMemory(ctx, shm) == T.TEEC_SUCCESS
    T.TEEC_ReleaseSharedMemory(shm)
    T.TEEC_ReleaseSharedMemory(shm)  # twice: nothing more to release
    s = open_session(ctx, HelloWorldApp)
    T.TEEC_CloseSession(s)
    T.TEEC_CloseSession(s)


def test_finalize_releases_what_the_context_holds(tee: Tee) -> None:
    ctx = tee.context()
    shm = T.TEEC_SharedMemory(size=3 * 4096, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_AllocateSharedMemory(ctx, shm) == T.TEEC_SUCCESS
    open_session(ctx, HelloWorldApp)
    usage = ctx.context.usage()
    assert usage["shms"] >= 1, usage
    T.TEEC_FinalizeContext(ctx)
    T.TEEC_ReleaseSharedMemory(shm)  # after its context: nothing left to do, no error
    T.TEEC_FinalizeContext(ctx)


# -- sessions -------------------------------------------------------------------------------------

def test_open_session_errors_carry_their_origin(ctx: T.TEEC_Context) -> None:
    s = T.TEEC_Session()
    assert T.TEEC_OpenSession(ctx, s, uuid.uuid4(), T.TEEC_LOGIN_PUBLIC, None, None) == (
        T.TEEC_ERROR_ITEM_NOT_FOUND, T.TEEC_ORIGIN_TEE)
    for method in (T.TEEC_LOGIN_APPLICATION, T.TEEC_LOGIN_USER_APPLICATION, T.TEEC_LOGIN_GROUP_APPLICATION, 3):
        assert T.TEEC_OpenSession(ctx, s, HelloWorldApp.UUID, method, None, None) == (
            T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_COMMS), method
    foreign_gid = max([0, *__import__("os").getgroups()]) + 12345
    assert T.TEEC_OpenSession(ctx, s, HelloWorldApp.UUID, T.TEEC_LOGIN_GROUP, foreign_gid, None) == (
        T.TEEC_ERROR_GENERIC, T.TEEC_ORIGIN_COMMS)
    assert T.TEEC_OpenSession(ctx, s, "not-a-uuid", T.TEEC_LOGIN_PUBLIC, None, None) == (
        T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)
    too_big = op((T.TEEC_VALUE_INPUT, val(64 * MiB)))
    assert T.TEEC_OpenSession(ctx, s, StorageApp.UUID, T.TEEC_LOGIN_PUBLIC, None, too_big) == (
        T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_TRUSTED_APP)
    bad_type = T.TEEC_Operation(paramTypes=T.TEEC_PARAM_TYPES(4, 0, 0, 0))
    assert T.TEEC_OpenSession(ctx, s, HelloWorldApp.UUID, T.TEEC_LOGIN_PUBLIC, None, bad_type) == (
        T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)
    own = T.TEEC_Session()
    assert T.TEEC_OpenSession(ctx, own, T.TEEC_UUID.from_uuid(HelloWorldApp.UUID), T.TEEC_LOGIN_GROUP,
                              __import__("os").getegid(), None) == (T.TEEC_SUCCESS, T.TEEC_ORIGIN_TRUSTED_APP)
    T.TEEC_CloseSession(own)


def test_invoke_errors_carry_their_origin(ctx: T.TEEC_Context) -> None:
    s = open_session(ctx, Sha256App)
    assert T.TEEC_InvokeCommand(s, 99, None) == (T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_TRUSTED_APP)
    assert T.TEEC_InvokeCommand(s, -1, None) == (T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)
    T.TEEC_CloseSession(s)
    assert T.TEEC_InvokeCommand(s, 0, None) == (T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)


# -- memory references ---------------------------------------------------------------------------

@pytest.mark.parametrize("memory", ["allocated", "bytearray", "posix"])
def test_partial_memrefs_stay_inside_and_agree_with_the_flags(ctx: T.TEEC_Context, posix_buffer: memoryview,
                                                              memory: str) -> None:
    size = 3 * 4096
    if memory == "allocated":
        shm = T.TEEC_SharedMemory(size=size, flags=T.TEEC_MEM_INPUT | T.TEEC_MEM_OUTPUT)
        assert T.TEEC_AllocateSharedMemory(ctx, shm) == T.TEEC_SUCCESS
        backing = shm.buffer
    else:
        backing = bytearray(size) if memory == "bytearray" else posix_buffer
        shm = T.TEEC_SharedMemory(buffer=backing, size=size, flags=T.TEEC_MEM_INPUT | T.TEEC_MEM_OUTPUT)
        assert T.TEEC_RegisterSharedMemory(ctx, shm) == T.TEEC_SUCCESS
    backing[:size] = pattern(size)
    s = open_session(ctx, Sha256App)
    digest = bytearray(32)
    part = op((T.TEEC_MEMREF_PARTIAL_INPUT, mem(shm, 100, 5000)), (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))
    assert T.TEEC_InvokeCommand(s, 0, part) == (0, 4)
    assert digest == hashlib.sha256(pattern(size)[100:5100]).digest()
    # past the end, or an overflowing offset: refused before the TEE sees it
    for offset, length in ((size - 10, 11), (1 << 64, 1), (0, size + 1)):
        beyond = op((T.TEEC_MEMREF_PARTIAL_INPUT, mem(shm, offset, length)),
                    (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))
        assert T.TEEC_InvokeCommand(s, 0, beyond) == (T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)
    T.TEEC_CloseSession(s)
    fill = open_session(ctx, FillApp)
    window = op((T.TEEC_MEMREF_PARTIAL_OUTPUT, mem(shm, 4000, 300)), (T.TEEC_VALUE_INPUT, val(0x5A, 1)))
    assert T.TEEC_InvokeCommand(fill, 0, window) == (0, 4)
    expected = bytearray(pattern(size))
    expected[4000:4300] = b"\x5a" * 300
    assert bytes(backing[:size]) == bytes(expected)
    assert window.params[0].memref.size == 300
    T.TEEC_CloseSession(fill)
    T.TEEC_ReleaseSharedMemory(shm)
    # a direction the memory's flags do not allow
    input_only = T.TEEC_SharedMemory(size=4096, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_AllocateSharedMemory(ctx, input_only) == T.TEEC_SUCCESS
    fill = open_session(ctx, FillApp)
    for ptype in (T.TEEC_MEMREF_PARTIAL_OUTPUT, T.TEEC_MEMREF_PARTIAL_INOUT):
        wrong = op((ptype, mem(input_only, 0, 16)), (T.TEEC_VALUE_INPUT, val(1, 1)))
        assert T.TEEC_InvokeCommand(fill, 0, wrong) == (T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)
    T.TEEC_CloseSession(fill)
    T.TEEC_ReleaseSharedMemory(input_only)


def test_memrefs_of_another_context_are_refused(tee: Tee, ctx: T.TEEC_Context) -> None:
    other = tee.context()
    foreign = T.TEEC_SharedMemory(size=64, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_AllocateSharedMemory(other, foreign) == T.TEEC_SUCCESS
    s = open_session(ctx, Sha256App)
    digest = bytearray(32)
    assert T.TEEC_InvokeCommand(s, 0, op((T.TEEC_MEMREF_WHOLE, mem(foreign)),
                                         (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))) == (
        T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)
    T.TEEC_CloseSession(s)
    T.TEEC_ReleaseSharedMemory(foreign)
    T.TEEC_FinalizeContext(other)


def test_temporary_memrefs(ctx: T.TEEC_Context, posix_buffer: memoryview) -> None:
    s = open_session(ctx, Sha256App)
    for source in (bytearray(pattern(10_000)), bytes(pattern(10_000)), posix_buffer):
        digest = bytearray(32)
        assert T.TEEC_InvokeCommand(s, 0, op((T.TEEC_MEMREF_TEMP_INPUT, tmp(source, 7777)),
                                             (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))) == (0, 4)
        assert digest == hashlib.sha256(bytes(source[:7777])).digest()
    digest = bytearray(32)
    assert T.TEEC_InvokeCommand(s, 0, op((T.TEEC_MEMREF_TEMP_INPUT, tmp(None, 0)),
                                         (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))) == (0, 4)
    assert digest == hashlib.sha256(b"").digest()
    assert T.TEEC_InvokeCommand(s, 0, op((T.TEEC_MEMREF_TEMP_INPUT, tmp(None, 16)),
                                         (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))) == (
        T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)
    assert T.TEEC_InvokeCommand(s, 0, op((T.TEEC_MEMREF_TEMP_INPUT, tmp(bytearray(4), 5)),
                                         (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(digest)))) == (
        T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_API)
    T.TEEC_CloseSession(s)
    copy = open_session(ctx, CopyApp)
    out = bytearray(6000)
    operation = op((T.TEEC_MEMREF_TEMP_INPUT, tmp(pattern(5000))), (T.TEEC_MEMREF_TEMP_INOUT, tmp(out)))
    assert T.TEEC_InvokeCommand(copy, 0, operation) == (0, 4)
    assert out[:5000] == pattern(5000) and operation.params[1].tmpref.size == 5000
    T.TEEC_CloseSession(copy)


def test_short_buffer_reports_the_size_needed(ctx: T.TEEC_Context) -> None:
    s = open_session(ctx, Sha256App)
    small = bytearray(16)
    temp = op((T.TEEC_MEMREF_TEMP_INPUT, tmp(b"abc")), (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(small)))
    assert T.TEEC_InvokeCommand(s, 0, temp) == (T.TEEC_ERROR_SHORT_BUFFER, T.TEEC_ORIGIN_TRUSTED_APP)
    assert temp.params[1].tmpref.size == 32
    out = T.TEEC_SharedMemory(size=64, flags=T.TEEC_MEM_OUTPUT)
    assert T.TEEC_AllocateSharedMemory(ctx, out) == T.TEEC_SUCCESS
    partial = op((T.TEEC_MEMREF_TEMP_INPUT, tmp(b"abc")), (T.TEEC_MEMREF_PARTIAL_OUTPUT, mem(out, 8, 20)))
    assert T.TEEC_InvokeCommand(s, 0, partial) == (T.TEEC_ERROR_SHORT_BUFFER, T.TEEC_ORIGIN_TRUSTED_APP)
    assert partial.params[1].memref.size == 32
    partial.params[1].memref.size = 32  # retry with the size the TEE asked for
    assert T.TEEC_InvokeCommand(s, 0, partial) == (0, 4)
    assert bytes(out.buffer[8:40]) == hashlib.sha256(b"abc").digest()
    T.TEEC_CloseSession(s)
    T.TEEC_ReleaseSharedMemory(out)


# -- values, four parameters, threads, cancellation --------------------------------------------

def test_values_go_in_and_come_back(ctx: T.TEEC_Context) -> None:
    s = open_session(ctx, HelloWorldApp)
    operation = op((T.TEEC_VALUE_INOUT, val(41, 7)))
    assert T.TEEC_InvokeCommand(s, HelloWorldApp.INC_VALUE, operation) == (0, 4)
    assert (operation.params[0].value.a, operation.params[0].value.b) == (42, 7)
    operation.params[0].value.a = 0
    assert T.TEEC_InvokeCommand(s, HelloWorldApp.DEC_VALUE, operation) == (0, 4)
    assert operation.params[0].value.a == 0xFFFFFFFF
    assert T.TEEC_InvokeCommand(s, 0, op((T.TEEC_VALUE_INPUT, val(1)))) == (
        T.TEEC_ERROR_BAD_PARAMETERS, T.TEEC_ORIGIN_TRUSTED_APP)
    T.TEEC_CloseSession(s)


def test_four_parameters(tee: Tee, ctx: T.TEEC_Context) -> None:
    tee.install(ctx, FourParams)
    s = open_session(ctx, FourParams)
    src = T.TEEC_SharedMemory(size=300, flags=T.TEEC_MEM_INPUT)
    assert T.TEEC_AllocateSharedMemory(ctx, src) == T.TEEC_SUCCESS
    src.buffer[:] = pattern(300)
    out = bytearray(300)
    operation = op((T.TEEC_VALUE_INPUT, val(1000)), (T.TEEC_MEMREF_WHOLE, mem(src)),
                   (T.TEEC_MEMREF_TEMP_OUTPUT, tmp(out)), (T.TEEC_VALUE_OUTPUT, val()))
    assert T.TEEC_InvokeCommand(s, 9, operation) == (0, 4)
    assert out == pattern(300)[::-1]
    assert (operation.params[3].value.a, operation.params[3].value.b) == (1300, 9)
    assert operation.started == 1
    T.TEEC_CloseSession(s)
    T.TEEC_ReleaseSharedMemory(src)


def test_concurrent_contexts_in_threads(tee: Tee) -> None:
    failures: list[str] = []

    def client(start: int) -> None:
        ctx = tee.context()
        try:
            s = open_session(ctx, HelloWorldApp)
            operation = op((T.TEEC_VALUE_INOUT, val(start)))
            for _ in range(40):
                res = T.TEEC_InvokeCommand(s, HelloWorldApp.INC_VALUE, operation)
                if res != (0, 4):
                    failures.append(f"{start}: {res}")
            if operation.params[0].value.a != start + 40:
                failures.append(f"{start}: ended at {operation.params[0].value.a}")
            T.TEEC_CloseSession(s)
        finally:
            T.TEEC_FinalizeContext(ctx)

    threads = [threading.Thread(target=client, args=(i * 1000,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_cancellation_before_start_cancels_the_operation(ctx: T.TEEC_Context) -> None:
    s = open_session(ctx, HelloWorldApp)
    operation = op((T.TEEC_VALUE_INOUT, val(5)))
    T.TEEC_RequestCancellation(operation)
    assert T.TEEC_InvokeCommand(s, HelloWorldApp.INC_VALUE, operation) == (
        T.TEEC_ERROR_CANCEL, T.TEEC_ORIGIN_API)
    assert operation.params[0].value.a == 5  # never reached the TEE
    assert T.TEEC_InvokeCommand(s, HelloWorldApp.INC_VALUE, operation) == (0, 4)
    T.TEEC_RequestCancellation(operation)  # started: a CANCEL its session's app never checks
    assert T.TEEC_InvokeCommand(s, HelloWorldApp.INC_VALUE, operation) == (0, 4)
    assert operation.params[0].value.a == 7
    T.TEEC_CloseSession(s)


def test_cancellation_of_a_running_invoke(tee: Tee, ctx: T.TEEC_Context) -> None:
    tee.install(ctx, StartedWait)
    StartedWait.started.clear()
    s = open_session(ctx, StartedWait)
    # wait until cancelled: forever embedded; a daemon bounds an app's wait (max_ta_wait_ms)
    operation = op((T.TEEC_VALUE_INPUT, val(0xFFFFFFFF if tee.name is None else 20_000)))
    results: list[tuple[int, int]] = []
    thread = threading.Thread(target=lambda: results.append(T.TEEC_InvokeCommand(s, WaitApp.WAIT, operation)))
    thread.start()
    assert StartedWait.started.wait(60), "the app never started waiting"
    assert operation.started == 1
    T.TEEC_RequestCancellation(operation)  # from this thread, while the invoke runs
    thread.join(60)
    assert not thread.is_alive()
    assert results == [(T.TEEC_ERROR_CANCEL, T.TEEC_ORIGIN_TRUSTED_APP)]
    T.TEEC_CloseSession(s)
    T.TEEC_RequestCancellation(operation)  # its session is closed: nothing to cancel, no error


def test_initialize_without_a_tee_is_item_not_found(tmp_path: Path) -> None:
    assert T.TEEC_InitializeContext(str(tmp_path / "nothing.sock"), T.TEEC_Context()) == T.TEEC_ERROR_ITEM_NOT_FOUND
    assert T.TEEC_InitializeContext(None, object()) == T.TEEC_ERROR_BAD_PARAMETERS  # type: ignore[arg-type]


# -- the example ---------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["embedded", "daemon"])
def test_hello_world_example_runs_unchanged(tmp_path: Path, where: str) -> None:
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
    env.pop("POOLSVC_SOCKET", None)
    daemon = None
    if where == "daemon":
        daemon = DaemonThread(tmp_path / "d.sock")
        env["POOLSVC_SOCKET"] = daemon.path
    try:
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "hello_world.py")], env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        if daemon is not None:
            daemon.stop()
    assert out.returncode == 0, out.stderr
    assert "TA incremented value to 43" in out.stdout
