"""The asyncio client (poolsvc/aio.py) against a real daemon, on both transports.

Allocation, writing through ``.buf`` and reading the bytes back through the
daemon's secure world; the error types of the synchronous client; what a
cancelled task leaves (a request dropped before it ran, or one that ran and
whose Shm or context is then closed: the client stays usable and the
daemon's accounting returns to idle); a session's cancel while its invoke
waits; many tasks at once; a forked child;
and the mirror of the ``poolsvc.api`` Protocols.  ``mypy --strict`` on a
typical asyncio user script (tests/typing/aio_script.py) is in
tests/test_typing.py, with the other user scripts.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import multiprocessing
import pickle
import threading
from pathlib import Path

import pytest

from poolsvc import aio, api
from poolsvc.errors import TEE_ERROR_CANCEL, BadParameters, Closed, ItemNotFound, NotSupported, OutOfMemory, TeeError
from poolsvc.service.channel import UsedAfterFork
from poolsvc.tee.driver import RegisteredMemref, TempMemref, Value
from poolsvc.tee.ta import Sha256App, WaitApp

from svcutil import checked_daemon, idle
from test_service_cancel import LONG_WAIT_MS, StartedWait

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["socket", "shm"])
def served(request, tmp_path):
    """``(daemon, transport)``; after the test the daemon's accounting is idle again."""
    with checked_daemon(tmp_path / "d.sock") as daemon:
        yield daemon, request.param
        daemon.wait_for(idle(daemon.baseline))


def test_alloc_write_read_back_close(served):
    daemon, transport = served

    async def main() -> None:
        async with await aio.connect(daemon.path, transport=transport) as client:
            assert await client.ping(b"hi") == b"hi" and client.pool == "dynamic"
            async with await client.open_context("aio") as ctx:
                assert ctx._handle._channel.transport == transport
                shm = await ctx.alloc_user_buf(5000)
                assert len(shm) == shm.size == 8192 and shm.id > 0 and not shm.closed
                shm.buf[:5] = b"hello"
                same = await ctx.shm_from_id(shm.id)
                assert same is shm and shm.refs == 2 and shm.view() is shm.buf
                digest = await ctx.alloc_kernel_buf(32)
                async with await ctx.open_session(Sha256App.UUID) as session:
                    out = RegisteredMemref(digest, 0, 32, "out")
                    result = await session.invoke(Sha256App.DIGEST, [RegisteredMemref(shm, 0, 5, "in"), out])
                    assert result.ret == 0 and out.size == 32
                    assert bytes(digest.buf[:32]) == hashlib.sha256(b"hello").digest()
                    dst = bytearray(32)
                    await session.invoke(Sha256App.DIGEST, [TempMemref(b"x", "in"), TempMemref(dst, "out")])
                    assert bytes(dst) == hashlib.sha256(b"x").digest()
                    short = RegisteredMemref(digest, 0, 16, "out")
                    with pytest.raises(TeeError):
                        await session.invoke(Sha256App.DIGEST, [RegisteredMemref(shm, 0, 5, "in"), short])
                    assert short.size == 32  # the size the secure world asked for
                assert session.closed
                await shm.close()
                assert not shm.closed and bytes(shm.buf[:5]) == b"hello"
                await shm.close()
                assert shm.closed
                await shm.close()  # released: nothing happens
                with pytest.raises(Closed):
                    shm.view()
                async with digest:
                    pass
                assert await ctx.usage() == {"shms": 0, "bytes": 0, "sessions": 0}
                await ctx.flush()
                stats = await client.stats()
                assert stats["contexts"][ctx.name]["shms"] == 0
                assert stats["service"]["requests"]["crashes"] == 0
            assert ctx.closed
            await ctx.close()
        assert client.closed
        await client.close()

    asyncio.run(main())


def test_errors_are_the_clients(served):
    daemon, transport = served

    async def main() -> None:
        client = await aio.connect(daemon.path, transport=transport)
        ctx = await client.open_context()
        with pytest.raises(OutOfMemory):  # the pools refuse size 0, as the kernel's do
            await ctx.alloc_user_buf(0)
        with pytest.raises(BadParameters):
            await ctx.alloc_user_buf("4096")  # type: ignore[arg-type]
        with pytest.raises(OutOfMemory):
            await ctx.alloc_user_buf(1 << 40)
        with pytest.raises(ItemNotFound):
            await ctx.shm_from_id(99999)
        await ctx.close()
        with pytest.raises(Closed):
            await ctx.alloc_user_buf(10)
        await client.close()
        with pytest.raises(Closed):
            await client.ping()
        with pytest.raises(Closed):
            await client.open_context()
        with pytest.raises(NotSupported):
            pickle.dumps(client)

    asyncio.run(main())
    with pytest.raises(Closed):
        asyncio.run(aio.connect(str(Path(daemon.path).with_name("nothing.sock")), transport=transport))
    with pytest.raises(BadParameters):
        asyncio.run(aio.connect(daemon.path, timeout=-1))


def test_cancelling_a_queued_request_drops_it(served):
    daemon, transport = served

    async def main() -> None:
        async with await aio.connect(daemon.path, transport=transport) as client:
            ctx = await client.open_context()
            gate = threading.Event()
            client._worker.submit(gate.wait)  # the worker is busy: the next request waits in its queue
            task = asyncio.create_task(ctx.alloc_user_buf(4096))
            await asyncio.sleep(0)  # the task runs up to its await: the request is queued
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task  # at once: it does not wait for the worker
            gate.set()
            assert await ctx.usage() == {"shms": 0, "bytes": 0, "sessions": 0}
            shm = await ctx.alloc_user_buf(4096)  # still usable
            await shm.close()
            await ctx.flush()
            assert (await client.stats())["service"]["requests"]["ops"].get("ALLOC") == 1

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_session_cancel_ends_a_waiting_invoke(tmp_path, transport):
    """``AsyncSession.cancel`` runs beside the worker, which is inside the invoke it cancels."""
    with checked_daemon(tmp_path / "w.sock", max_ta_wait_ms=30_000) as daemon:
        daemon.server.system.tee.install(StartedWait)

        async def main() -> None:
            async with await aio.connect(daemon.path, transport=transport) as client:
                ctx = await client.open_context()
                session = await ctx.open_session(StartedWait.UUID)
                StartedWait.started.clear()
                task = asyncio.create_task(session.invoke(WaitApp.WAIT, [Value(LONG_WAIT_MS, 0)]))
                assert await asyncio.to_thread(StartedWait.started.wait, 60), "the app never started"
                await session.cancel()
                with pytest.raises(TeeError) as cancelled:
                    await task
                assert cancelled.value.code == TEE_ERROR_CANCEL
                await session.close()
                await ctx.close()

        asyncio.run(main())
        daemon.wait_for(idle(daemon.baseline))


def test_cancelling_after_the_request_ran_closes_what_it_made(served):
    daemon, transport = served

    async def main() -> None:
        async with await aio.connect(daemon.path, transport=transport) as client:
            ctx = await client.open_context("kept")
            for request in (lambda: ctx.alloc_user_buf(4096), lambda: client.open_context("dropped")):
                task = asyncio.create_task(request())
                await asyncio.sleep(0)  # the request is queued
                client._worker.submit(lambda: None).result()  # blocks this loop until it ran
                task.cancel()  # the task has not seen the result yet
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert await ctx.usage() == {"shms": 0, "bytes": 0, "sessions": 0}
            await ctx.flush()
            stats = await client.stats()
            assert stats["contexts"][ctx.name]["shms"] == 0 and len(stats["contexts"]) == 1
            assert (await ctx.alloc_user_buf(10)).size == 4096  # still usable

    asyncio.run(main())


def test_cancelling_close_does_not_stop_it(served):
    daemon, transport = served

    async def main() -> None:
        client = await aio.connect(daemon.path, transport=transport)
        ctx = await client.open_context()
        await ctx.alloc_user_buf(100)
        task = asyncio.create_task(client.close())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.closed
        await client.close()  # waits for the close the cancelled task queued
        assert ctx.closed

    asyncio.run(main())


def test_concurrent_tasks(served):
    daemon, transport = served

    async def one(ctx: aio.AsyncContext, i: int) -> bytes:
        shm = await ctx.alloc_user_buf(100 + 37 * i)
        shm.buf[:8] = i.to_bytes(8, "little")
        await asyncio.sleep(0)
        again = await ctx.shm_from_id(shm.id)
        data = bytes(again.buf[:8])
        await again.close()
        await shm.close()
        return data

    async def main() -> None:
        async with await aio.connect(daemon.path, transport=transport) as client:
            contexts = [await client.open_context(f"c{k}") for k in range(3)]
            got = await asyncio.gather(*(one(contexts[i % 3], i) for i in range(90)))
            assert got == [i.to_bytes(8, "little") for i in range(90)]
            for ctx in contexts:
                assert (await ctx.usage())["shms"] == 0

    asyncio.run(main())


def _child(client: aio.AsyncClient, ctx: aio.AsyncContext, shm: aio.AsyncShm, out: multiprocessing.Queue) -> None:
    async def main() -> str:
        for request in (lambda: ctx.alloc_user_buf(10), shm.close, client.ping):
            try:
                await request()
            except UsedAfterFork:
                continue
            return f"{request} served in the child"
        await client.close()  # drops the child's copies; nothing reaches the parent's connection
        return "ok"

    try:
        out.put(asyncio.run(main()))
    except BaseException as exc:
        out.put(repr(exc))


def test_forked_child_leaves_the_parent_alone(served):
    daemon, transport = served

    async def main() -> None:
        async with await aio.connect(daemon.path, transport=transport) as client:
            ctx = await client.open_context()
            shm = await ctx.alloc_user_buf(4096)
            shm.buf[:3] = b"abc"
            fork = multiprocessing.get_context("fork")
            out = fork.Queue()
            child = fork.Process(target=_child, args=(client, ctx, shm, out))
            child.start()
            assert out.get(timeout=60) == "ok"
            child.join(60)
            assert child.exitcode == 0
            assert bytes(shm.buf[:3]) == b"abc" and not shm.closed
            assert await client.ping(b"p") == b"p"
            await shm.close()

    asyncio.run(main())


# -- the contract --------------------------------------------------------------------------------
#: api Protocol -> its async mirror, and the members that stay plain (no I/O, no shared state).
MIRRORS = [(api.System, aio.AsyncClient, set()), (api.Context, aio.AsyncContext, set()),
           (api.Shm, aio.AsyncShm, {"view", "__len__"}), (api.Session, aio.AsyncSession, set())]


@pytest.mark.parametrize("protocol, mirror, plain", MIRRORS, ids=lambda x: getattr(x, "__name__", ""))
def test_the_async_classes_mirror_the_api(protocol, mirror, plain):
    for name, member in vars(protocol).items():
        if name.startswith("_") and name not in ("__len__", "__enter__", "__exit__"):
            continue
        if isinstance(member, property):
            assert isinstance(inspect.getattr_static(mirror, name), property), name
            continue
        if name in ("__enter__", "__exit__"):
            assert inspect.iscoroutinefunction(getattr(mirror, name.replace("__", "__a", 1)))
            continue
        mine = getattr(mirror, name)
        assert inspect.iscoroutinefunction(mine) == (name not in plain), name
        want = list(inspect.signature(member).parameters.values())
        have = list(inspect.signature(mine).parameters.values())
        assert [(p.name, p.kind, p.default) for p in have[:len(want)]] == \
               [(p.name, p.kind, p.default) for p in want], name
        assert all(p.default is not inspect.Parameter.empty for p in have[len(want):]), name


def test_the_docs_example_runs(served):
    daemon, transport = served
    text = (ROOT / "docs" / "aio.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"/run/poolsvc/poolsvc.sock"' in code
    code = code.replace('"/run/poolsvc/poolsvc.sock"', repr(daemon.path))
    code = code.replace("aio.connect(path)", f"aio.connect(path, transport={transport!r})")
    exec(compile(code, "docs/aio.md", "exec"), {"__name__": "docs_example"})
