"""Trace files: a load run's operation stream, recorded to be replayed elsewhere.

A trace is a text file::

    #poolsvc-trace 1 {"spec": {...}, "service": {...}}      header (JSON)
    @ SLOT GEN END COUNT                                     one client incarnation
    a u 4096 7                                               then COUNT operation lines
    ...

One *incarnation* is one worker process: client slot ``SLOT`` (0..clients-1),
``GEN``-th process of that slot, ending with ``END`` = ``exit`` (it finished)
or ``kill`` (the runner SIGKILLed it; a replay kills itself at the same
point).  Operations name buffers by a per-incarnation handle number, never
by cookie or id, so they mean the same under any configuration:

==========================  ============================================================
``a K SIZE H``              alloc of kind K (``u`` user, ``k`` kernel, ``p`` priv) -> H
``r K SIZE OFF H``          register (K ``U``/``K``) SIZE bytes at OFF of a free region -> H
``f H``                     free (close) H
``l H``                     lookup by H's id (shm_from_id), then release that reference
``i H``                     SHA-256 of H in the secure world, compared with the pattern
``b TOK TOK ...``           one BATCH: ``a:K:SIZE:H``, ``f:H``, ``l:H``, ``x:H`` (release
                            the extra reference a previous ``l:H`` in a batch took)
==========================  ============================================================

In memory a worker holds an operation as a tuple, and writes or reads its text
only at the trace's edge (:func:`format_op`, :func:`parse_op`; one is the
inverse of the other): ``("a", K, SIZE, H)``, ``("r", K, SIZE, OFF, H)``,
``("f", H)``, ``("l", H)``, ``("i", H)``, ``("x", H)`` (batch tokens only),
and ``("b", [TOKEN_TUPLE, ...], OPS)`` with OPS the operations the batch
stands for (its tokens but ``x``).

A worker appends its lines to its own file and flushes them at every
progress tick; operations after the last flush of a killed worker are lost
(their effects died with the worker's connection anyway).  The runner joins
the files in start order.

Concurrency: a TraceWriter belongs to one worker process; reading is pure.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import BadParameters

MAGIC = "#poolsvc-trace"
VERSION = 1
#: Longest trace line a reader accepts (a batch of 4096 tokens fits).
MAX_LINE = 1 << 20


class TraceWriter:
    """Buffered operation lines of one incarnation, flushed on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[str] = []
        self.count = 0
        self._fh = open(path, "w", encoding="ascii")

    def add(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        if self.lines:
            self._fh.write("\n".join(self.lines))
            self._fh.write("\n")
            self.count += len(self.lines)
            self.lines.clear()
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()


@dataclass
class Incarnation:
    """One worker process's operations."""

    slot: int
    gen: int
    end: str
    lines: list[str] = field(default_factory=list)


@dataclass
class Trace:
    """A whole trace: the recording run's header and every incarnation, in start order."""

    header: dict[str, Any]
    incarnations: list[Incarnation]

    @property
    def clients(self) -> int:
        return 1 + max((i.slot for i in self.incarnations), default=-1)

    @property
    def ops(self) -> int:
        return sum(op_count(line) for inc in self.incarnations for line in inc.lines)

    def by_slot(self) -> dict[int, list[Incarnation]]:
        out: dict[int, list[Incarnation]] = {}
        for inc in self.incarnations:
            out.setdefault(inc.slot, []).append(inc)
        return out


def op_count(line: str) -> int:
    """Operations one trace line stands for (a batch counts each of its tokens)."""
    return len(line.split()) - 1 if line.startswith("b") else 1


def format_op(op: tuple[Any, ...]) -> str:
    """The trace line of one operation tuple (see the module doc)."""
    if op[0] == "b":
        return "b " + " ".join(":".join(map(str, tok)) for tok in op[1])
    return " ".join(map(str, op))


def parse_op(line: str) -> tuple[Any, ...]:
    """The operation tuple of one trace line; BadParameters when it is not one.

    ``parse_op(format_op(op)) == op`` for every operation a worker generates.
    """
    p = line.split()
    try:
        code = p[0]
        if code == "b":
            toks: list[tuple[Any, ...]] = []
            count = 0
            for text in p[1:]:
                t = text.split(":")
                if t[0] == "a" and len(t) == 4:
                    toks.append(("a", t[1], int(t[2]), int(t[3])))
                elif t[0] in ("f", "l", "x") and len(t) == 2:
                    toks.append((t[0], int(t[1])))
                else:
                    raise ValueError(text)
                count += t[0] != "x"
            return ("b", toks, count)
        if code == "a" and len(p) == 4:
            return ("a", p[1], int(p[2]), int(p[3]))
        if code == "r" and len(p) == 5:
            return ("r", p[1], int(p[2]), int(p[3]), int(p[4]))
        if code in ("f", "l", "i") and len(p) == 2:
            return (code, int(p[1]))
    except (ValueError, IndexError):
        pass
    raise BadParameters(f"trace: {line[:80]!r} is not an operation line")


def write(path: str, header: dict[str, Any], parts: list[tuple[int, int, str, str]]) -> int:
    """Join incarnation files into one trace at ``path``; returns the operation lines written.

    ``parts``: ``(slot, gen, end, file)`` in start order; a missing file
    (the worker died before its first flush) gives an empty incarnation.
    """
    total = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as out:
        out.write(f"{MAGIC} {VERSION} {json.dumps(header, sort_keys=True)}\n")
        for slot, gen, end, part in parts:
            try:
                with open(part, encoding="ascii") as fh:
                    lines = [line for line in fh.read().splitlines() if line]
            except FileNotFoundError:
                lines = []
            out.write(f"@ {slot} {gen} {end} {len(lines)}\n")
            if lines:
                out.write("\n".join(lines))
                out.write("\n")
            total += len(lines)
    os.replace(tmp, path)
    return total


def read(path: str) -> Trace:
    """A trace from ``path``; BadParameters (naming the line) when it is malformed."""
    try:
        fh = open(path, encoding="ascii")
    except OSError as exc:
        raise BadParameters(f"trace {path}: {exc.strerror}") from exc
    with fh:
        first = fh.readline(MAX_LINE)
        magic, _, rest = first.partition(" ")
        version, _, header_text = rest.partition(" ")
        if magic != MAGIC or version != str(VERSION):
            raise BadParameters(f"trace {path}: line 1 is not a version-{VERSION} poolsvc trace header")
        try:
            header = json.loads(header_text)
        except ValueError as exc:
            raise BadParameters(f"trace {path}: header is not JSON: {exc}") from None
        incarnations: list[Incarnation] = []
        lineno = 1
        lines = _lines(fh)
        for lineno, line in lines:
            parts = line.split()
            if len(parts) != 5 or parts[0] != "@" or parts[3] not in ("exit", "kill"):
                raise BadParameters(f"trace {path}:{lineno}: expected '@ SLOT GEN END COUNT', got {line[:80]!r}")
            try:
                slot, gen, count = int(parts[1]), int(parts[2]), int(parts[4])
            except ValueError:
                raise BadParameters(f"trace {path}:{lineno}: slot, gen and count must be integers") from None
            if not 0 <= slot < 4096 or count < 0:
                raise BadParameters(f"trace {path}:{lineno}: slot {slot} or count {count} out of range")
            inc = Incarnation(slot, gen, parts[3])
            for _ in range(count):
                try:
                    lineno, op = next(lines)
                except StopIteration:
                    raise BadParameters(f"trace {path}: incarnation {slot}.{gen} announces {count} "
                                        f"operations, the file ends after {len(inc.lines)}") from None
                if op[:1] not in ("a", "r", "f", "l", "i", "b"):
                    raise BadParameters(f"trace {path}:{lineno}: unknown operation {op[:40]!r}")
                inc.lines.append(op)
            incarnations.append(inc)
    return Trace(header, incarnations)


def _lines(fh: Any) -> Iterator[tuple[int, str]]:
    lineno = 1
    while True:
        line = fh.readline(MAX_LINE)
        if not line:
            return
        lineno += 1
        line = line.strip()
        if line:
            yield lineno, line
