"""A typical user script; tests/test_typing.py runs ``mypy --strict`` on it.

It uses the embedded API as the README shows it: a System, a context,
allocated and registered buffers, page lists, the secure world and errors.
"""
from __future__ import annotations

from multiprocessing import shared_memory

import numpy as np
import numpy.typing as npt

import poolsvc
from poolsvc import Config, PAGE_SIZE, ShmFlags, System
from poolsvc.errors import OutOfMemory, PoolsvcError, TeeError


def describe(pages: npt.NDArray[np.uint64]) -> list[tuple[int, int]]:
    segments: list[tuple[int, int]] = poolsvc.pagelist.segments(pages)
    return segments


def main() -> int:
    config: Config = Config(dynamic_size=64 << 20)
    with System(config) as system:
        ctx = system.open_context("typing")
        shm = ctx.alloc_user_buf(3 * PAGE_SIZE)
        shm.view()[:5] = b"hello"
        size: int = shm.size
        flags: ShmFlags = shm.flags
        paddr: int | None = shm.paddr
        print(size, flags, paddr, describe(shm.pages))
        buf = shared_memory.SharedMemory(create=True, size=64 * 1024)
        try:
            assert buf.buf is not None
            reg = ctx.register_user_buf(buf.buf[123:20123])
            print(reg.offset, len(describe(reg.pages)))
            reg.close()
        finally:
            buf.close()
            buf.unlink()
        try:
            ctx.alloc_user_buf(1 << 40)
        except OutOfMemory as exc:
            print(f"refused: {exc}")
        except TeeError as exc:
            print(f"secure world: {exc.code:#x} from {exc.origin}")
        except PoolsvcError as exc:
            print(f"poolsvc: {exc}")
        shm.close()
        ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
