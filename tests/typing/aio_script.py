"""A typical asyncio user script; tests/test_aio.py runs ``mypy --strict`` on it.

It uses ``poolsvc.aio`` as docs/aio.md shows it: connect, a context,
buffers written through ``.buf``, a session, many tasks, errors.
"""
from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt

from poolsvc import ShmFlags, aio
from poolsvc.errors import OutOfMemory, PoolsvcError
from poolsvc.tee.driver import RegisteredMemref
from poolsvc.tee.ta import Sha256App


async def fill(ctx: aio.AsyncContext, size: int) -> int:
    shm: aio.AsyncShm = await ctx.alloc_user_buf(size)
    async with shm:
        shm.buf[:4] = b"data"
        pages: npt.NDArray[np.uint64] = shm.pages
        flags: ShmFlags = shm.flags
        paddr: int | None = shm.paddr
        print(len(shm), len(pages), flags, paddr)
        return shm.id


async def main(path: str) -> int:
    async with await aio.connect(path, transport="socket", timeout=5.0) as client:
        async with await client.open_context("typing") as ctx:
            ids: list[int] = await asyncio.gather(*(fill(ctx, 4096 * n) for n in range(1, 5)))
            digest = await ctx.alloc_kernel_buf(32)
            data = await ctx.alloc_user_buf(5)
            data.buf[:5] = b"hello"
            session: aio.AsyncSession = await ctx.open_session(Sha256App.UUID)
            await session.invoke(Sha256App.DIGEST, [RegisteredMemref(data, 0, 5, "in"),
                                                    RegisteredMemref(digest, 0, 32, "out")])
            await session.close()
            usage: dict[str, int] = await ctx.usage()
            print(ids, bytes(digest.buf[:32]).hex(), usage)
            try:
                await ctx.alloc_user_buf(1 << 40)
            except OutOfMemory as exc:
                print(f"refused: {exc}")
            except PoolsvcError as exc:
                print(f"poolsvc: {exc}")
        stats = await client.stats()
        print(stats["service"]["requests"]["ops"])
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main("/run/poolsvc/poolsvc.sock")))
