"""Helpers for the secure-world tests: raw messages, page lists by hand, state snapshots."""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

from poolsvc.constants import ATTR_META, ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd
from poolsvc.tee.msg import MsgArg, MsgParam, unpack
from poolsvc.tee.msg import uuid_to_value

MiB = 1 << 20
SMALL = dict(dynamic_size=16 * MiB, static_size=1 * MiB, arena_step=1 * MiB)
META = Attr.VALUE_INPUT | ATTR_META
NONCONTIG = ATTR_NONCONTIG


def raw(system, cmd: int, params: list[MsgParam], session: int = 0, func: int = 0) -> MsgArg:
    """Send a hand-made message through ``tee.call`` and decode the answer."""
    msg = MsgArg(cmd=cmd, func=func, session=session, params=params)
    return unpack(system.tee.call(msg.pack()))


def open_params(uuid, login: int = 0) -> list[MsgParam]:
    a, b = uuid_to_value(uuid)
    return [MsgParam(META, a, b, 0), MsgParam(META, 0, 0, login)]


def open_raw(system, uuid, extra: list[MsgParam] = ()) -> int:
    reply = raw(system, MsgCmd.OPEN_SESSION, open_params(uuid) + list(extra))
    assert reply.ret == 0, hex(reply.ret)
    return reply.session


def write_list(shm, entries: list[int], next_pa: int | None = None, page: int = 0) -> int:
    """Write a list page into page ``page`` of ``shm``; returns its PA."""
    blob = bytearray(PAGE_SIZE)
    for i, pa in enumerate(entries[:511]):
        struct.pack_into("<Q", blob, 8 * i, pa)
    if next_pa is not None:
        struct.pack_into("<Q", blob, 8 * 511, next_pa)
    view = shm.view()
    view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = blob
    return int(shm.pages[page])


def snapshot(system) -> dict[str, Any]:
    """The secure world's state plus the pools' accounting."""
    out = dict(system.tee.state())
    out["dynamic_used"] = system.dynamic.used_frames
    out["static_used"] = system.static.used_bytes if system.static is not None else None
    out["mapped"] = system.memory.table.mapped_frames
    out["ids"] = len(system.ids)
    return out


def storage_bytes(system, sids) -> dict[int, bytes]:
    return {sid: bytes(memoryview(system.memory.storages[sid]).cast("B")) for sid in sids}


def changed_pages(before: dict[int, bytes], after: dict[int, bytes]) -> set[tuple[int, int]]:
    changed = set()
    for sid, old in before.items():
        new = after[sid]
        a = np.frombuffer(old, np.uint8).reshape(-1, PAGE_SIZE)
        b = np.frombuffer(new, np.uint8).reshape(-1, PAGE_SIZE)
        for idx in np.flatnonzero((a != b).any(axis=1)):
            changed.add((sid, int(idx)))
    return changed
