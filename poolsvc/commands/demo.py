"""``poolsvc demo``: a short tour of the embedded System, printed as a report."""
from __future__ import annotations

import argparse
import json
from multiprocessing import shared_memory

from .. import pagelist
from ..config import Config
from ..system import System


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="allocate, register and inspect shared memory on an embedded System",
                       description="Runs an embedded System (no daemon), allocates contiguous "
                                   "memory, registers a POSIX shared-memory buffer at an odd "
                                   "offset, and reports pages, segments and pool statistics.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-dynamic", action="store_true",
                   help="simulate a TEE without DYNAMIC_SHM (reserved static pool only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = Config(dynamic_shm=not args.no_dynamic)
    report: dict = {}
    with System(config) as system:
        ctx = system.open_context("demo")
        shm = ctx.alloc_user_buf(3 * 4096 + 100)
        shm.view()[:5] = b"hello"
        report["alloc_user_buf"] = {"id": shm.id, "size": shm.size, "flags": shm.flags.name,
                                    "paddr": hex(shm.paddr) if shm.paddr is not None else None,
                                    "pages": len(shm.pages)}
        if config.dynamic_shm:
            buf = shared_memory.SharedMemory(create=True, size=64 * 1024)
            try:
                assert buf.buf is not None
                reg = ctx.register_user_buf(buf.buf[123:123 + 20000])
                report["register_user_buf"] = {
                    "id": reg.id, "size": reg.size, "offset": reg.offset, "flags": reg.flags.name,
                    "pages": [hex(int(p)) for p in reg.pages],
                    "segments": [(hex(pa), n) for pa, n in pagelist.segments(reg.pages)],
                }
                reg.close()
            finally:
                buf.close()
                buf.unlink()
        stats = system.stats()
        report["stats"] = {"pool": stats["pool"], "dynamic_used_frames": stats["dynamic"]["used_frames"],
                           "static": stats["static"], "ids": stats["ids"],
                           "registered_cookies": stats["registered_cookies"]}
        shm.close()
        ctx.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
    return 0
