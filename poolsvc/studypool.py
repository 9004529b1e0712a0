"""The static pool in the study: what a buffer costs and where the pool runs out,
embedded and through the daemon.

A TEE without DYNAMIC_SHM gives its clients buffers of the reserved carve-out
only.  :func:`measure_static_pool` measures that pool two ways with the same
procedure, per buffer size:

``embedded``  a System with ``dynamic_shm = false`` in this process, one context;
``daemon``    ``poolsvc serve`` with ``dynamic_shm = false`` in a subprocess
              (:class:`poolsvc.load.daemon.LoadDaemon`), one client connected
              over one transport (``shm`` or ``socket``).

For each size: ``trials`` timed ``alloc_user_buf`` + ``close`` pairs (p50 and
p99 of the pair, µs; through the daemon, a client's round trips), then one
client allocates and holds buffers until it is refused: ``client_*``, the
buffers and bytes it holds and why it was refused.  Through the daemon a
client may pin ``client_share`` of the pool (``max_bytes_per_client``,
docs/security.md), so a second daemon with no per-client bound
(``max_bytes_per_client = 0``) gives where the pool itself runs out:
``pool_*``.  Embedded there is no such bound and both figures are the same.
Through the daemon every held buffer is written and read back through its
``view()``, so the figures count buffers a client can use.

Concurrency: one thread; the daemon is a child process stopped before return.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from .config import Config
from .errors import InternalError, PoolsvcError
from .histogram import percentiles_us

@dataclass
class StaticFigure:
    """The static pool at one buffer size, embedded or through the daemon."""

    where: str  # "embedded" or "daemon"
    transport: str | None  # the daemon's transport; None embedded
    size: int
    p50_us: float | None  # alloc_user_buf + close, µs (None: every attempt refused)
    p99_us: float | None
    client_buffers: int  # buffers one client held when it was refused (default settings)
    client_bytes: int
    client_refusal: str | None
    pool_buffers: int  # buffers one client held with no per-client bound: the pool's capacity
    pool_bytes: int
    pool_refusal: str | None


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _timed_pairs(ctx: Any, size: int, trials: int) -> tuple[float | None, float | None]:
    """p50 and p99 (µs) of ``trials`` alloc_user_buf + close pairs; None if refused."""
    times: list[float] = []
    for _ in range(trials):
        t0 = time.perf_counter()
        try:
            shm = ctx.alloc_user_buf(size)
        except PoolsvcError:
            break
        shm.close()
        times.append(time.perf_counter() - t0)
    if not times:
        return None, None
    p50, p99 = percentiles_us(times, (0.50, 0.99))
    return p50, p99


def _hold_until_refused(ctx: Any, size: int, held: list[Any], check: bool) -> str | None:
    """Allocate ``size``-byte user buffers into ``held`` until refused; the refusal.

    ``check``: write each buffer's last byte through its view and read it back
    (a buffer the client cannot use raises InternalError).
    """
    while True:
        try:
            shm = ctx.alloc_user_buf(size)
        except PoolsvcError as exc:
            return _reason(exc)
        held.append(shm)
        if check:
            view = shm.view()
            mark = len(held) & 0xFF
            view[size - 1] = mark
            if view[size - 1] != mark:
                raise InternalError(f"static-pool buffer {shm.cookie:#x} does not keep its bytes")


def _fill(ctx: Any, size: int, trials: int, check: bool) -> tuple[float | None, float | None, int, str | None]:
    """Time the pairs on ``ctx``, then hold buffers until refused.

    Returns p50, p99, the buffers held when refused and the refusal.  Every
    buffer is closed before return.
    """
    held: list[Any] = []
    try:
        p50, p99 = _timed_pairs(ctx, size, trials)
        refusal = _hold_until_refused(ctx, size, held, check)
        return p50, p99, len(held), refusal
    finally:
        for shm in held:
            shm.close()


def measure_embedded(sizes: list[int], trials: int, static_size: int) -> list[StaticFigure]:
    """The procedure on an embedded System without DYNAMIC_SHM (no per-client bound:
    one client fills the pool)."""
    from .system import System

    out = []
    cfg = Config(dynamic_size=64 << 20, dynamic_shm=False, static_size=static_size, arena_step=4 << 20)
    with System(cfg) as system:
        for size in sizes:
            ctx = system.open_context("static")
            try:
                p50, p99, count, refusal = _fill(ctx, size, trials, False)
            finally:
                ctx.close()
            out.append(StaticFigure("embedded", None, size, p50, p99, count, count * size, refusal,
                                    count, count * size, refusal))
    return out


def _with_daemon(static_size: int, bound: bool, transport: str,
                 body: Callable[[Any], list[tuple[float | None, float | None, int, str | None]]]
                 ) -> list[tuple[float | None, float | None, int, str | None]]:
    """``body(ctx)`` with a context of a client of a fresh ``poolsvc serve`` without
    DYNAMIC_SHM; ``bound``: the default per-client bound, else none
    (``max_bytes_per_client = 0``).  Raises PoolsvcError when the daemon does not
    start or stops badly."""
    from .load.daemon import LoadDaemon
    from .service.client import connect

    with tempfile.TemporaryDirectory(prefix="poolsvc-study-") as workdir:
        config = os.path.join(workdir, "static.toml")
        with open(config, "w") as fh:
            fh.write(f'dynamic_size = "64MiB"\narena_step = "4MiB"\ndynamic_shm = false\n'
                     f'static_size = {static_size}\n\n[service]\nlog_level = "WARNING"\n'
                     + ("" if bound else "max_bytes_per_client = 0\n"))
        daemon = LoadDaemon(workdir, config_path=config, dynamic_size="64MiB", no_dynamic=True, clients=1)
        path = daemon.start()
        try:
            with connect(path, name="study-static", transport=transport) as client:
                if client.pool != "static":
                    raise InternalError(f"the daemon serves the {client.pool} pool, not the static one")
                ctx = client.open_context("static")
                try:
                    out = body(ctx)
                finally:
                    ctx.close()
        finally:
            _, problems = daemon.stop()
        if problems:
            raise PoolsvcError("; ".join(problems))
    return out


def measure_daemon(sizes: list[int], trials: int, static_size: int, transport: str) -> list[StaticFigure]:
    """The procedure through ``poolsvc serve`` (a subprocess) without DYNAMIC_SHM, twice:
    with the default per-client bound (the timings and one client's figures), and
    without one (where the pool itself runs out)."""
    bounded = _with_daemon(static_size, True, transport,
                           lambda ctx: [_fill(ctx, size, trials, True) for size in sizes])
    unbounded = _with_daemon(static_size, False, transport,
                             lambda ctx: [_fill(ctx, size, 0, True) for size in sizes])
    return [StaticFigure("daemon", transport, size, a[0], a[1], a[2], a[2] * size, a[3],
                         b[2], b[2] * size, b[3])
            for size, a, b in zip(sizes, bounded, unbounded)]


def measure_static_pool(sizes: list[int], trials: int, static_size: int,
                        transport: str = "shm") -> list[StaticFigure]:
    """Embedded figures, then the daemon's, for every size (see the module doc)."""
    return measure_embedded(sizes, trials, static_size) + measure_daemon(sizes, trials, static_size,
                                                                         transport)


__all__ = ["StaticFigure", "measure_daemon", "measure_embedded", "measure_static_pool"]
