"""Planted-mutation check: does the test suite notice when a kernel is broken?

Owns the list of planted mutations (:data:`MUTATIONS`) on the allocators, the page
list, the id table, the arena, the pools' zeroing and the service's ownership
checks, and the loop that tries each: copy the repository to a temporary
directory, replace one text by another in one or more files, rebuild the compiled
core when ``ext/`` changed, run the tests named for that mutation under the CI
hypothesis profile (``CI=true``; its ``mutation`` variant, which skips shrinking)
against the named backend, and report the mutant
*killed* (a test failed), *survived* (every test passed), *timeout* (the tests did
not finish) or *invalid* (the text to replace is not in the file, the build failed,
or pytest could not run).

Run from the repository root (not collected by pytest: the file is not named test_*)::

    python tests/mutation/run.py                 # every mutation
    python tests/mutation/run.py --list          # names, backends, tests
    python tests/mutation/run.py idtable-highest-free-pure arena-free-no-zero-compiled
    python tests/mutation/run.py --baseline ...  # also run each test set unmutated first

Exit status: 0 when every mutant was killed, 1 when one survived, 2 when one was
invalid or timed out.  Survivors and their explanations are listed in docs/testing.md.

Concurrency: mutants run one after another, each in its own copy; the working tree
is never modified.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPY_IGNORE = shutil.ignore_patterns(".git", ".hypothesis", "build", ".ci-venv", ".venv", "__pycache__",
                                     "*.egg-info", "results", ".benchmarks", ".pytest_cache")


@dataclass(frozen=True)
class Mutation:
    """One planted bug: ``edits`` are ``(file, old text, new text)``; ``old`` must occur once."""

    name: str
    edits: tuple[tuple[str, str, str], ...]
    backend: str            # "compiled" or "pure": the backend the tests run against
    tests: tuple[str, ...]  # pytest arguments (files or node ids) expected to kill it
    what: str               # the bug, in words


def _m(name: str, backend: str, what: str, tests: tuple[str, ...], *edits: tuple[str, str, str]) -> Mutation:
    return Mutation(name, tuple(edits), backend, tests, what)


# Property tests only, for the bugs each must catch on its own (issue: not only hand-written ones).
_ID_PROPS = ("tests/test_core_tables.py::test_id_table_hands_out_the_lowest_free_id",)
_ARENA_PROPS = ("tests/test_core_arena.py::test_arena_against_the_model",)
_SYSTEM_PROPS = ("tests/test_system_props.py",)
_FUZZ_PROPS = ("tests/test_tee_fuzz.py",)
_OWNER_PROPS = ("tests/test_service_ownership_props.py",)

MUTATIONS: list[Mutation] = [
    # -- the six bugs of the issue: each must be killed by a property test --------------------
    _m("idtable-highest-free-compiled", "compiled", "the id table hands out the highest free id, not the lowest",
       _ID_PROPS,
       ("ext/tables.pyx", "if child + 1 < n and self.heap[child + 1] < self.heap[child]:",
        "if child + 1 < n and self.heap[child + 1] > self.heap[child]:"),
       ("ext/tables.pyx", "if self.heap[child] >= moved:", "if self.heap[child] <= moved:"),
       ("ext/tables.pyx", "if self.heap[parent] <= value:", "if self.heap[parent] >= value:")),
    _m("idtable-highest-free-pure", "pure", "the id table hands out the highest free id, not the lowest",
       _ID_PROPS,
       ("poolsvc/_pure/tables.py", "i = heapq.heappop(self._free)",
        "i = max(self._free)\n            self._free.remove(i)\n            heapq.heapify(self._free)")),
    _m("arena-free-no-zero-compiled", "compiled", "ArenaPages.free does not zero the pages it frees",
       _ARENA_PROPS,
       ("ext/arena.pyx", "        memset(data, 0, <size_t>(n * PSV_PAGE_SIZE))\n        return self._freed(s, i, n)",
        "        return self._freed(s, i, n)")),
    _m("static-pool-no-zero", "compiled", "static-pool memory is not zeroed when freed",
       _SYSTEM_PROPS,
       ("poolsvc/pools.py", "self._carveout_bytes[backing.start:backing.start + backing.length] = 0", "pass")),
    _m("pagelist-entry-alignment-pure", "pure", "the pure page-list parser accepts unaligned entries",
       _FUZZ_PROPS,
       ("poolsvc/_pure/pagelist.py",
        "            if pa & PAGE_MASK:\n                raise AlignmentError(f\"page-list entry {i} is {pa:#x}, "
        "not 4 KiB-aligned\")\n            if ranges",
        "            if ranges")),
    _m("service-close-foreign-cookie", "compiled", "SHM_CLOSE closes a cookie of another client's context",
       _OWNER_PROPS,
       ("poolsvc/service/server.py", "shm = conn.context.shms.get(cookie)",
        "shm = next((c.shms[cookie] for c in self.system.contexts.values() if cookie in c.shms), None)")),
    _m("system-refuses-everything", "pure", "every allocation and registration is refused",
       _SYSTEM_PROPS,
       ("poolsvc/context.py", "        ids = self.system.ids\n        shm_id = ids.alloc(None) if with_id else -1",
        "        raise OutOfMemory('planted: refuse everything')\n        ids = self.system.ids\n"
        "        shm_id = ids.alloc(None) if with_id else -1"),
       ("poolsvc/context.py", "from .errors import Closed, ItemNotFound\n",
        "from .errors import Closed, ItemNotFound, OutOfMemory\n")),

    # -- more mutants of the same kernels, under their whole test files -----------------------
    _m("rangealloc-best-fit-takes-largest", "pure", "best-fit picks the largest free run",
       ("tests/test_core_alloc.py",),
       ("poolsvc/_pure/alloc.py", "(best_len is None or end - start < best_len)",
        "(best_len is None or end - start > best_len)")),
    _m("rangealloc-free-size-unchecked", "pure", "RangeAllocator.free ignores a size that does not match",
       ("tests/test_core_alloc.py",),
       ("poolsvc/_pure/alloc.py", "if sz is not None and -(-sz // self._chunk)",
        "if False and -(-sz // self._chunk)")),
    _m("frames-max-order-doubled", "pure", "alloc_contig accepts runs up to twice 1 << max_order",
       ("tests/test_core_alloc.py",),
       ("poolsvc/_pure/alloc.py", "if n > 1 << self._max_order:", "if n > 2 << self._max_order:")),
    _m("frames-free-contig-no-double-free", "pure", "free_contig frees frames that are not in use",
       ("tests/test_core_alloc.py",),
       ("poolsvc/_pure/alloc.py",
        "        if q >= 0:\n            raise DoubleFree(f\"frame {self._base_pa + q * PAGE_SIZE:#x} is not in",
        "        if False:\n            raise DoubleFree(f\"frame {self._base_pa + q * PAGE_SIZE:#x} is not in")),
    _m("frames-free-pages-repeats", "pure", "free_pages accepts a page listed twice",
       ("tests/test_core_alloc.py",),
       ("poolsvc/_pure/alloc.py", "            if value in seen:\n", "            if False:\n")),
    _m("frames-scattered-from-top", "pure", "alloc_scattered takes the highest free frames",
       ("tests/test_core_alloc.py",),
       ("poolsvc/_pure/alloc.py", "            i = self._used.find(b\"\\x00\", pos)\n",
        "            i = self._used.rfind(b\"\\x00\", 0, len(self._used) - pos)\n")),
    _m("pagelist-next-alignment-pure", "pure", "the parser follows an unaligned next pointer",
       ("tests/test_core_pagelist.py", "tests/test_core_pagelist_frames.py", "tests/test_tee_fuzz.py"),
       ("poolsvc/_pure/pagelist.py", "            if next_pa & PAGE_MASK:\n", "            if False:\n")),
    _m("pagelist-entry-nonsecure-pure", "pure", "the parser accepts entries outside non-secure memory",
       ("tests/test_core_pagelist.py", "tests/test_core_pagelist_frames.py", "tests/test_tee_fuzz.py"),
       ("poolsvc/_pure/pagelist.py", "            if ranges is not None and not _inside(ranges, pa):",
        "            if False:")),
    _m("pagelist-one-page-too-many-pure", "pure", "num_pages counts one page too many at a page end",
       ("tests/test_core_pagelist.py", "tests/test_core_pagelist_frames.py", "tests/test_tee_fuzz.py"),
       ("poolsvc/_pure/pagelist.py", "num_pages = (size + offset - 1) // PAGE_SIZE + 1",
        "num_pages = (size + offset) // PAGE_SIZE + 1")),
    _m("pagelist-build-next-self-pure", "pure", "a full list page's next points at itself",
       ("tests/test_core_pagelist.py", "tests/test_core_pagelist_frames.py"),
       ("poolsvc/_pure/pagelist.py", "(own_pa + PAGE_SIZE).to_bytes(8, \"little\")",
        "(own_pa).to_bytes(8, \"little\")")),
    _m("pagelist-entry-alignment-compiled", "compiled", "the compiled parser accepts unaligned entries",
       ("tests/test_core_pagelist.py", "tests/test_core_pagelist_frames.py", "tests/test_tee_fuzz.py"),
       ("ext/pagelist.pyx", "if (psv_or_min_max(entries + done, chunk, &lo, &hi) & PSV_PAGE_MASK",
        "if (psv_or_min_max(entries + done, chunk, &lo, &hi) & 0"),
       ("ext/pagelist.pyx", "                if v & PSV_PAGE_MASK:\n", "                if False:\n")),
    _m("idtable-max-id-plus-one-pure", "pure", "the id table hands out max_id + 1",
       ("tests/test_core_tables.py",),
       ("poolsvc/_pure/tables.py", "elif self._hwm <= self._max_id:", "elif self._hwm <= self._max_id + 1:")),
    _m("arena-give-no-zero-pure", "pure", "ArenaPages.give does not zero the pages",
       ("tests/test_core_arena.py",),
       ("poolsvc/_pure/arena.py", "        self._zero(s, index, n)\n        table.unmap_range(pa, n)",
        "        table.unmap_range(pa, n)")),
    _m("arena-last-fit-pure", "pure", "the arena searches its segments last to first",
       ("tests/test_core_arena.py",),
       ("poolsvc/_pure/arena.py", "        for s in self._segs:\n            p = s.used.find(want)",
        "        for s in reversed(self._segs):\n            p = s.used.find(want)")),
    _m("arena-free-no-double-free-pure", "pure", "ArenaPages.free frees pages not in use",
       ("tests/test_core_arena.py",),
       ("poolsvc/_pure/arena.py",
        "        q = s.used.find(b\"\\x00\", i, i + n)\n        if q >= 0:",
        "        q = s.used.find(b\"\\x00\", i, i + n)\n        if False:")),
    _m("system-foreign-id-found", "pure", "shm_from_id finds another context's id",
       ("tests/test_system_props.py", "tests/test_system.py"),
       ("poolsvc/context.py", "if shm is None or shm.context is not self or shm.closed:",
        "if shm is None or shm.closed:")),
    _m("service-foreign-memref", "compiled", "INVOKE accepts a memref on another client's cookie",
       _OWNER_PROPS + ("tests/test_service.py",),
       ("poolsvc/service/server.py", "        shms = conn.context.shms\n",
        "        shms = {k: v for c in self.system.contexts.values() for k, v in c.shms.items()}\n")),
]


def apply(mutation: Mutation, tree: Path) -> str | None:
    """Apply the edits in ``tree``; None, or why the mutation cannot be applied."""
    for rel, old, new in mutation.edits:
        path = tree / rel
        if not path.exists():
            return f"{rel} does not exist"
        text = path.read_text()
        if text.count(old) != 1:
            return f"{rel}: the text to replace occurs {text.count(old)} times, not once: {old[:60]!r}"
        path.write_text(text.replace(old, new))
    return None


def run_tests(mutation: Mutation, tree: Path, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, CI="true", HYPOTHESIS_PROFILE="mutation")   # the CI profile, no shrinking
    if mutation.backend == "pure":
        env["POOLSVC_PUREPYTHON"] = "1"
    else:
        env.pop("POOLSVC_PUREPYTHON", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rf", *mutation.tests]
    try:
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return out.returncode, out.stdout + out.stderr


def failed_tests(output: str) -> list[str]:
    return [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines() if line.startswith("FAILED ")]


def try_mutation(mutation: Mutation, baseline: bool, timeout: float, keep: bool) -> tuple[str, str]:
    """``(status, detail)`` with status killed / survived / timeout / invalid."""
    tmp = Path(tempfile.mkdtemp(prefix=f"poolsvc-mut-{mutation.name}-"))
    tree = tmp / "repo"
    try:
        shutil.copytree(ROOT, tree, ignore=COPY_IGNORE, symlinks=True)
        if baseline:
            rc, out = run_tests(mutation, tree, timeout)
            if rc != 0:
                return "invalid", "the tests fail without the mutation:\n" + out[-2000:]
        why = apply(mutation, tree)
        if why is not None:
            return "invalid", why
        if any(rel.startswith("ext/") for rel, _, _ in mutation.edits):
            for generated in (tree / "ext").glob("*.c"):
                generated.unlink()      # force a fresh cythonize of the whole extension
            build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree,
                                   capture_output=True, text=True, timeout=timeout)
            if build.returncode != 0:
                return "invalid", "the mutant does not build:\n" + build.stderr[-2000:]
        rc, out = run_tests(mutation, tree, timeout)
        if rc == 0:
            return "survived", ""
        if rc == 1:
            return "killed", ", ".join(failed_tests(out)) or out[-500:]
        if rc == -1:
            return "timeout", f"the tests ran longer than {timeout} s"
        return "invalid", f"pytest exit status {rc}:\n{out[-2000:]}"
    finally:
        if keep:
            print(f"  kept {tree}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to try (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--baseline", action="store_true", help="run each test set unmutated first")
    parser.add_argument("--keep", action="store_true", help="keep the mutated copies (paths printed)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per build or test run")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)}")
    chosen = [by_name[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.backend:9} {m.what}\n{'':50} tests: {' '.join(m.tests)}")
        return 0
    results = []
    for m in chosen:
        start = time.monotonic()
        status, detail = try_mutation(m, args.baseline, args.timeout, args.keep)
        results.append((m, status))
        first_line = detail.splitlines()[0] if detail else ""
        print(f"{status:9} {m.name:40} {m.backend:9} {time.monotonic() - start:6.1f} s  {first_line}", flush=True)
        if status == "invalid":
            print(detail)
    counts = {s: sum(1 for _, st in results if st == s) for s in ("killed", "survived", "timeout", "invalid")}
    print(f"\n{counts['killed']} killed, {counts['survived']} survived, {counts['timeout']} timed out, "
          f"{counts['invalid']} invalid of {len(results)}")
    for m, status in results:
        if status != "killed":
            print(f"  {status}: {m.name} ({m.what})")
    if counts["invalid"] or counts["timeout"]:
        return 2
    return 1 if counts["survived"] else 0


if __name__ == "__main__":
    sys.exit(main())
