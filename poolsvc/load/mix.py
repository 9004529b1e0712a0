"""What a load run does: the operation mix, the size distribution, the run's spec.

This module owns the plain data of a load run, parsed and validated once in
the runner and handed to every worker process as JSON:

- :class:`OpMix` - relative weights of the operations a worker chooses from
  (``alloc_user``, ``alloc_kernel``, ``alloc_priv``, ``register_user``,
  ``register_kernel``, ``free``, ``lookup``, ``invoke``);
- :class:`SizeDist` - the buffer sizes: ``fixed:4096``, ``uniform:1:65536``,
  ``log:512:1MiB`` (log-uniform) or ``choice:4096,16384,65536``;
- :class:`LoadSpec` - everything a run needs (clients, bounds, mix, sizes,
  batch size, fault rates, seed), with one :class:`~poolsvc.errors.ConfigError`
  per bad field.

Concurrency: immutable values and pure functions; safe from any thread.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

from ..config import parse_size
from ..errors import ConfigError

#: Every operation a worker knows, in report order.
OPS = ("alloc_user", "alloc_kernel", "alloc_priv", "register_user", "register_kernel", "free",
       "lookup", "invoke")
#: Operations that may travel inside a BATCH request (protocol.BATCHABLE).
BATCHABLE = frozenset({"alloc_user", "alloc_kernel", "alloc_priv", "free", "lookup"})
#: Names a latency can be reported under besides OPS: a whole batch round trip.
TIMED = OPS + ("batch",)

DEFAULT_MIX = "alloc_user=20,alloc_kernel=10,alloc_priv=5,register_user=4,register_kernel=2," \
              "free=40,lookup=12,invoke=7"
DEFAULT_SIZES = "log:64:64KiB"
#: Largest buffer a register operation uses (the size of one region of the
#: worker's own POSIX shm area).
REGION_SIZE = 64 << 10


@dataclass(frozen=True)
class OpMix:
    """Relative weights of the operations; at least one must be positive."""

    weights: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, text: str) -> "OpMix":
        """A mix from ``"alloc_user=20,free=40,..."`` (unnamed operations weigh 0).

        Raises ConfigError for an unknown name, a negative or non-numeric
        weight, or a mix where every weight is 0.
        """
        weights = dict.fromkeys(OPS, 0.0)
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in weights:
                raise ConfigError(f"--mix: {part!r} is not NAME=WEIGHT with NAME one of {', '.join(OPS)}")
            try:
                weight = float(value)
            except ValueError:
                raise ConfigError(f"--mix: weight {value!r} of {name} is not a number") from None
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"--mix: weight {value!r} of {name} must be a finite number >= 0")
            weights[name] = weight
        if not any(weights.values()):
            raise ConfigError(f"--mix: {text!r} gives every operation weight 0")
        return cls(tuple(weights.items()))

    def text(self) -> str:
        return ",".join(f"{name}={weight:g}" for name, weight in self.weights if weight)

    def chooser(self, rng: random.Random, only: frozenset[str] | None = None) -> "Chooser":
        """A fast weighted choice over the operations (restricted to ``only`` if given)."""
        pairs = [(n, w) for n, w in self.weights if w > 0 and (only is None or n in only)]
        return Chooser(rng, pairs)


class Chooser:
    """Weighted choice by bisection over cumulative weights (no allocation per call).

    ``names[i]`` is chosen for a draw in ``[cum[i-1], cum[i])`` of ``[0, total)``;
    ``_picks`` is ``names`` plus its last name again, for a draw that rounds up to
    ``total`` (so that a call needs no bounds check).
    """

    def __init__(self, rng: random.Random, pairs: list[tuple[str, float]]) -> None:
        import bisect
        import itertools

        self.rng = rng
        self.names = [n for n, _ in pairs]
        self.cum = list(itertools.accumulate(w for _, w in pairs))
        self.total = self.cum[-1] if self.cum else 0.0
        self._picks = self.names + self.names[-1:]
        self._random = rng.random
        self._bisect = bisect.bisect_right

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self) -> str:
        return self._picks[self._bisect(self.cum, self._random() * self.total)]


@dataclass(frozen=True)
class SizeDist:
    """Buffer sizes in bytes: ``kind`` is fixed, uniform, log or choice."""

    kind: str
    values: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "SizeDist":
        """``fixed:N``, ``uniform:LO:HI``, ``log:LO:HI`` or ``choice:A,B,...`` (sizes may
        carry units: ``64KiB``).  Raises ConfigError for anything else."""
        kind, _, rest = text.strip().partition(":")
        kind = kind.lower()
        try:
            if kind == "fixed":
                values: tuple[int, ...] = (parse_size(rest, "--sizes"),)
            elif kind in ("uniform", "log"):
                lo, _, hi = rest.partition(":")
                values = (parse_size(lo, "--sizes"), parse_size(hi, "--sizes"))
                if values[0] > values[1]:
                    raise ConfigError(f"--sizes: low bound {values[0]} is above high bound {values[1]}")
            elif kind == "choice":
                values = tuple(parse_size(v, "--sizes") for v in rest.split(",") if v.strip())
                if not values:
                    raise ConfigError("--sizes: choice: needs at least one size")
            else:
                raise ConfigError(f"--sizes: {text!r} is not fixed:N, uniform:LO:HI, log:LO:HI or "
                                  "choice:A,B,...")
        except ConfigError as exc:
            if str(exc).startswith("--sizes"):
                raise
            raise ConfigError(f"--sizes: {text!r}: {exc}") from None
        for v in values:
            if v < 1 or v > 1 << 30:
                raise ConfigError(f"--sizes: size {v} is outside 1..1GiB")
        return cls(kind, values)

    def text(self) -> str:
        return f"{self.kind}:{':'.join(map(str, self.values))}" if self.kind != "choice" else \
            f"choice:{','.join(map(str, self.values))}"

    def sampler(self, rng: random.Random) -> Any:
        """A zero-argument callable drawing one size."""
        v = self.values
        if self.kind == "fixed":
            return lambda: v[0]
        if self.kind == "uniform":
            return lambda: rng.randint(v[0], v[1])
        if self.kind == "choice":
            return lambda: rng.choice(v)
        lo, hi = math.log(v[0]), math.log(v[1] + 1)
        # rng.uniform(lo, hi) is lo + (hi - lo) * rng.random(): the same draws, one call less
        low, high, span, rnd, exp = v[0], v[1], hi - lo, rng.random, math.exp
        return lambda: max(low, min(high, int(exp(lo + span * rnd()))))


@dataclass(frozen=True)
class LoadSpec:
    """One load run, as validated plain data (also what the report quotes back)."""

    clients: int = 4
    #: Seconds of load (the run also ends when ``ops`` operations are done).
    duration: float = 10.0
    #: Total operations over all clients; 0 means no bound but the duration.
    ops: int = 0
    mix: str = DEFAULT_MIX
    sizes: str = DEFAULT_SIZES
    #: Operations per BATCH request (1: every operation is its own request).
    batch: int = 1
    #: Live buffers a client keeps at most (ignored with ``exhaust``).
    max_live: int = 64
    #: SIGKILLs per second over all clients (each killed client is restarted).
    kill_rate: float = 0.0
    #: Malformed requests per second, each on its own raw connection.
    malformed_rate: float = 0.0
    #: Allocate without bound until the pool refuses, then free half, repeat.
    exhaust: bool = False
    #: Seconds between two invariant checks against the daemon's STATS.
    check_interval: float = 0.5
    seed: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for the first invalid field."""
        def number(name: str, low: float, high: float, integer: bool) -> None:
            value = getattr(self, name)
            ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type or not low <= value <= high:
                span = f"{low}..{high}" if integer else f"{low:g}..{high:g}"
                raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is outside {span}")

        number("clients", 1, 1024, True)
        number("duration", 0.1, 24 * 3600, False)
        number("ops", 0, 1 << 40, True)
        number("batch", 1, 4096, True)
        number("max_live", 1, 1 << 20, True)
        number("kill_rate", 0, 100, False)
        number("malformed_rate", 0, 1000, False)
        number("check_interval", 0.05, 60, False)
        OpMix.parse(self.mix)
        SizeDist.parse(self.sizes)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "LoadSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def replace(self, **changes: Any) -> "LoadSpec":
        return dataclasses.replace(self, **changes)
