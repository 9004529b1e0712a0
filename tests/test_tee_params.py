"""The GP parameter codec (poolsvc/tee/params.py): directions, validation, register-or-bounce,
copy-back, through a recording side that writes what it is handed."""
from __future__ import annotations

import pytest

from poolsvc import Config, System
from poolsvc.errors import BadParameters, Closed
from poolsvc.tee.params import (
    IN,
    INOUT,
    OUT,
    ParamCall,
    RegisteredMemref,
    TempMemref,
    Value,
    direction,
)

from teeutil import SMALL


class Recorder(ParamCall):
    def __init__(self, ctx, can_register=True, memref_null=None):
        super().__init__(ctx, can_register, memref_null)
        self.out = []

    def emit_none(self):
        self.out.append(("none",))

    def emit_value(self, a, b, d):
        self.out.append(("value", a, b, d))

    def emit_memref(self, shm, offset, size, d):
        self.out.append(("memref", shm, offset, size, d))

    def emit_null(self, size, d):
        self.out.append(("null", size, d))


@pytest.fixture
def ctx():
    with System(Config(**SMALL)) as system:
        yield system.open_context()


def test_directions_decode_once():
    assert (direction("in"), direction("out"), direction("inout")) == (IN, OUT, INOUT)
    for bad in ("IN", None, 1, "x"):
        with pytest.raises(BadParameters, match="direction"):
            direction(bad)


def test_values_and_memrefs_are_emitted_with_their_directions(ctx):
    shm = ctx.alloc_kernel_buf(8192)
    with Recorder(ctx) as call:
        call.add_all([None, Value(1, 2, "out"), RegisteredMemref(shm, 16, 32, "in"), shm])
        assert call.out == [("none",), ("value", 1, 2, OUT), ("memref", shm, 16, 32, IN),
                            ("memref", shm, 0, None, INOUT)]


@pytest.mark.parametrize("param, message", [
    (Value(1 << 32), "value a"),
    (Value(0, -1), "value b"),
    (Value(0, 0, "sideways"), "direction"),
    ("shm?", "is not None, Value"),
    (TempMemref(object()), "buffer protocol"),
    (TempMemref(bytearray(8), size=4), "differs from the buffer's 8 bytes"),
    (TempMemref(None, size=-1), "NULL memref size"),
])
def test_bad_parameters_are_refused(ctx, param, message):
    with Recorder(ctx) as call, pytest.raises(BadParameters, match=message):
        call.add(param)


def test_memref_checks(ctx):
    shm = ctx.alloc_kernel_buf(4096)
    other = ctx.system.open_context("other").alloc_kernel_buf(4096)
    with Recorder(ctx) as call:
        with pytest.raises(BadParameters, match="does not belong"):
            call.add(RegisteredMemref(other))
        with pytest.raises(BadParameters, match="beyond"):
            call.add(RegisteredMemref(shm, 4000, 200))
        with pytest.raises(BadParameters, match="memref offset"):
            call.add(RegisteredMemref(shm, -1))
        with pytest.raises(BadParameters, match="memref size"):
            call.add(RegisteredMemref(shm, 5000))
        shm.close()
        with pytest.raises(Closed):
            call.add(RegisteredMemref(shm))


def test_null_memref_needs_the_capability_when_checked(ctx):
    with Recorder(ctx, memref_null=False) as call, pytest.raises(BadParameters, match="MEMREF_NULL"):
        call.add(TempMemref(None, size=4))
    with Recorder(ctx, memref_null=None) as call:
        call.add(TempMemref(None, size=4))
        call.add(TempMemref(bytearray()))
        assert call.out == [("null", 4, INOUT), ("null", 0, INOUT)]


def test_private_memory_is_bounced_in_and_copied_back(ctx):
    data = bytearray(b"abcdefgh")
    ref = TempMemref(data, "inout")
    call = Recorder(ctx, can_register=False)  # the embedded System registers private memory when it can
    call.add(ref)
    kind, bounce, offset, size, d = call.out[0]
    assert kind == "memref" and (offset, size, d) == (0, 8, INOUT)
    assert bytes(bounce.view()[:8]) == b"abcdefgh"                 # copied in
    bounce.view()[:3] = b"XYZ"
    result = call.finish(0, 4, [(None, 3)])
    assert (result.ret, result.sizes, ref.size) == (0, [3], 3)
    assert data == bytearray(b"XYZdefgh")                           # copied back
    call.close()
    assert bounce.closed and not ctx.shms


def test_output_buffer_is_not_copied_in_nor_back_on_failure(ctx):
    data = bytearray(b"keep")
    call = Recorder(ctx, can_register=False)
    call.add(TempMemref(data, "out"))
    bounce = call.out[0][1]
    assert bytes(bounce.view()[:4]) == bytes(4)
    bounce.view()[:4] = b"lost"
    call.finish(0xFFFF0010, 4, [(None, 8)])
    assert data == bytearray(b"keep")
    call.close()


def test_finish_updates_values(ctx):
    v = Value(1, 2, "inout")
    with Recorder(ctx) as call:
        call.add_all([v, None])
        result = call.finish(0, 4, [((7, 8), None), (None, None)])
    assert (v.a, v.b) == (7, 8) and result.values == [(7, 8), None]


def test_shared_memory_is_registered_for_the_call(ctx):
    from multiprocessing import shared_memory

    seg = shared_memory.SharedMemory(create=True, size=8192)
    try:
        window = seg.buf[100:300]
        call = Recorder(ctx)
        call.add(TempMemref(window, "in"))
        kind, shm, offset, size, d = call.out[0]
        assert shm.registered and size == 200 and shm.offset == 100
        call.close()
        assert shm.closed
        window.release()
    finally:
        seg.close()
        seg.unlink()
