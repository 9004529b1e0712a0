"""Configuration: the physical layout, the TEE's capabilities and pool sizes.

``Config`` is plain data with validation; every bad field gives one
:class:`~poolsvc.errors.ConfigError` that names the field and its value.
``Config.from_toml(path)`` reads a flat TOML table (keys as the field names;
sizes may be integers or strings such as ``"16MiB"`` or ``"0x1000"``).

Default layout (docs/design.md section 2): secure RAM at PA 0x0e000000 (16 MiB),
the reserved static shm carve-out at 0x42000000 (4 MiB), dynamic non-secure
RAM at 0x50000000 (1 GiB).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import PAGE_SIZE, GenCaps, SecCaps
from .errors import ConfigError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

#: Upper bound on dynamic RAM (the frame allocator's tables scale with it).
MAX_DYNAMIC_SIZE = 64 * GiB
MAX_STATIC_SIZE = 1 * GiB
MAX_PA = 1 << 48

_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": TiB, "tb": TiB, "tib": TiB}


def parse_size(value: Any, name: str = "size") -> int:
    """An int from an int or a string such as ``"16MiB"``, ``"4k"``, ``"0x42000000"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            return int(text, 16)
        match = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", text)
        if match and match.group(2).lower() in _UNITS:
            return int(match.group(1)) * _UNITS[match.group(2).lower()]
    raise ConfigError(f"{name}: cannot read {value!r} as a size (examples: 4096, '16MiB', '0x1000'; "
                      "units B, KiB, MiB, GiB, TiB, powers of 1024)")


@dataclass(frozen=True)
class Config:
    """Layout, capabilities and pool parameters of a simulated system.

    Regions are ``(base, size)`` in physical address space, page-aligned and
    disjoint. ``dynamic_shm`` and ``reserved_shm`` are the capabilities the
    simulated TEE reports (OPTEE_SMC_SEC_CAP_DYNAMIC_SHM / HAVE_RESERVED_SHM);
    at least one must be on, as the Linux driver refuses to probe otherwise.
    """

    secure_base: int = 0x0E000000
    secure_size: int = 16 * MiB
    static_base: int = 0x42000000
    static_size: int = 4 * MiB
    dynamic_base: int = 0x50000000
    dynamic_size: int = 1 * GiB
    #: TEE capabilities.
    dynamic_shm: bool = True
    reserved_shm: bool = True
    memref_null: bool = True
    #: poolsvc's stricter checks on top of OP-TEE 4.0's and Linux's (docs/fidelity.md), off
    #: by default: a REGISTER_SHM or RPC SHM_ALLOC answer reusing a live cookie is refused
    #: (OP-TEE lets the newer registration shadow the older); UNREGISTER_SHM must carry
    #: RMEM_INPUT (OP-TEE checks only the parameter count); a NONCONTIG buffer of size 0 is
    #: refused at any offset (OP-TEE counts one page when the offset is not 0); RPC SHM_FREE
    #: of an unknown cookie or type is answered BAD_PARAMETERS (Linux answers SUCCESS
    #: without looking); REGISTER_SHM and UNREGISTER_SHM answers carry origin TEE (OP-TEE
    #: leaves ``ret_origin`` as the driver wrote it).  The compiled one-parameter entry
    #: (``core.SmcEntry``) applies exactly these rules, so ``SecureWorld.call_with_arg`` is
    #: that entry only when strict.
    strict: bool = False
    #: genalloc granule of the static pool: 1 << 9 = 512 bytes.
    min_alloc_order: int = 9
    #: fit policy of the static pool: "first-fit" (the kernel's) or "best-fit".
    static_policy: str = "first-fit"
    #: largest contiguous dynamic allocation, as a page order (MAX_ORDER).
    max_contig_order: int = 10
    #: storage arenas grow by this many bytes at a time (pre-faulted).
    arena_step: int = 16 * MiB
    #: prefix of POSIX shm object names (a random suffix follows).
    shm_prefix: str = "/poolsvc"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- capabilities --------------------------------------------------------
    @property
    def sec_caps(self) -> SecCaps:
        """The OPTEE_SMC_SEC_CAP_* bits the simulated TEE reports."""
        caps = SecCaps(0)
        if self.reserved_shm:
            caps |= SecCaps.HAVE_RESERVED_SHM
        if self.dynamic_shm:
            caps |= SecCaps.DYNAMIC_SHM
        if self.memref_null:
            caps |= SecCaps.MEMREF_NULL
        return caps | SecCaps.RPC_ARG  # as OP-TEE 4.0 reports it: always

    @functools.cached_property
    def gen_caps(self) -> GenCaps:
        """The TEE_GEN_CAP_* bits the driver offers (REG_MEM only with DYNAMIC_SHM).

        Computed once (the config is frozen): every registration checks it."""
        caps = GenCaps.GP
        if self.dynamic_shm:
            caps |= GenCaps.REG_MEM
        if self.memref_null:
            caps |= GenCaps.MEMREF_NULL
        return caps

    def regions(self) -> dict[str, tuple[int, int]]:
        """``{"secure": (base, size), "static": ..., "dynamic": ...}``."""
        return {
            "secure": (self.secure_base, self.secure_size),
            "static": (self.static_base, self.static_size),
            "dynamic": (self.dynamic_base, self.dynamic_size),
        }

    # -- validation ----------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for the first invalid field."""
        for name in ("secure_base", "secure_size", "static_base", "static_size",
                     "dynamic_base", "dynamic_size", "min_alloc_order",
                     "max_contig_order", "arena_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
        for name in ("dynamic_shm", "reserved_shm", "memref_null", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for region, (base, size) in self.regions().items():
            if base < 0 or base % PAGE_SIZE:
                raise ConfigError(f"{region}_base: {base:#x} is not a page-aligned address")
            if size <= 0 or size % PAGE_SIZE:
                raise ConfigError(f"{region}_size: {size:#x} is not a positive multiple of 4096")
            if base + size > MAX_PA:
                raise ConfigError(f"{region}_base: region {base:#x}+{size:#x} ends beyond 2**48")
        if self.dynamic_size > MAX_DYNAMIC_SIZE:
            raise ConfigError(f"dynamic_size: {self.dynamic_size:#x} exceeds the limit {MAX_DYNAMIC_SIZE:#x}")
        if self.static_size > MAX_STATIC_SIZE:
            raise ConfigError(f"static_size: {self.static_size:#x} exceeds the limit {MAX_STATIC_SIZE:#x}")
        items = sorted(self.regions().items(), key=lambda kv: kv[1][0])
        for (name_a, (base_a, size_a)), (name_b, (base_b, _)) in zip(items, items[1:]):
            if base_a + size_a > base_b:
                raise ConfigError(
                    f"{name_b}_base: region {name_b} at {base_b:#x} overlaps region "
                    f"{name_a} [{base_a:#x}, {base_a + size_a:#x})")
        if not (0 <= self.min_alloc_order <= 12):
            raise ConfigError(f"min_alloc_order: {self.min_alloc_order} is outside 0..12")
        if not (0 <= self.max_contig_order <= 20):
            raise ConfigError(f"max_contig_order: {self.max_contig_order} is outside 0..20")
        if self.static_policy not in ("first-fit", "best-fit"):
            raise ConfigError(f"static_policy: {self.static_policy!r} is not 'first-fit' or 'best-fit'")
        if self.arena_step < PAGE_SIZE or self.arena_step % PAGE_SIZE or self.arena_step > 4 * GiB:
            raise ConfigError(f"arena_step: {self.arena_step:#x} must be a multiple of 4096 in [4 KiB, 4 GiB]")
        if not (self.dynamic_shm or self.reserved_shm):
            raise ConfigError(
                "dynamic_shm/reserved_shm: both off; the TEE would offer no shared memory "
                "(the Linux driver refuses to probe such a TEE)")
        if not isinstance(self.shm_prefix, str) or not re.fullmatch(r"/[A-Za-z0-9_.-]{1,32}", self.shm_prefix):
            raise ConfigError(f"shm_prefix: {self.shm_prefix!r} must be '/' then 1-32 of [A-Za-z0-9_.-]")
        if self.extra:
            raise ConfigError(f"{next(iter(self.extra))}: unknown configuration key")

    # -- loading ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """A Config from a mapping of field names to values (sizes may be strings)."""
        known = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                extra[key] = value
                continue
            if key.endswith(("_base", "_size", "_step")):
                value = parse_size(value, key)
            kwargs[key] = value
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Config":
        """Read a Config from a TOML file (a flat table, or one ``[poolsvc]`` table)."""
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r}: not valid TOML: {exc}") from exc
        if set(data) == {"poolsvc"} and isinstance(data["poolsvc"], dict):
            data = data["poolsvc"]
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
