"""Hypothesis-generated messages never crash the secure world, never leak, never stray.

For every generated message: ``tee.call`` returns an answer (or raises a
poolsvc ProtocolError for bytes that cannot be a message); once any session
or cookie the message legitimately created is closed again, the secure
world's state and the pools' accounting equal the starting point; and the
only pages whose bytes changed are pages the message could reach (its
carve-out TMEM ranges, the pages of its page lists, the registered objects
its RMEMs name).

Page lists are judged by :func:`spec_page_list`, an independent reading of the
OP-TEE format and checks (docs/design.md sections 5 and 6) written here, never by
the page-list parser under test: a message carrying a list the spec refuses must
not succeed, and a REGISTER_SHM of a list the spec accepts must register exactly
the spec's pages.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolsvc import Config, System
from poolsvc.constants import ATTR_META, ATTR_NONCONTIG, PAGE_MASK, PAGE_SIZE, Attr, MsgCmd
from poolsvc.errors import PoolsvcError, ProtocolError
from poolsvc.tee.msg import SMC_RETURN_EBADCMD, SMC_RETURN_OK, MsgArg, MsgParam, unpack
from poolsvc.tee.ta import CopyApp, FillApp, Sha256App, StorageApp

from sysutil import LeakCheck, assert_accounting
from teeutil import SMALL, changed_pages, open_params, open_raw, raw, snapshot, storage_bytes, write_list

U64_LIMIT = 1 << 64
MAX_LIST_PAGES = 1 << 20   # the parser's default bound on num_pages (OutOfMemory above)


def spec_page_list(buf_ptr: int, size: int, read_page, nonsecure, strict: bool = False) -> list[int] | None:
    """The pages of a NONCONTIG buffer as docs/design.md sections 5 and 6 describe them,
    or None when the secure side must refuse the list.

    ``read_page(pa)``: the 4096 bytes at ``pa`` (raising PoolsvcError if unmapped);
    ``nonsecure``: the ``(base, size)`` ranges a page may lie in.  Size 0 at an
    offset is one page, as OP-TEE counts ``(size + offset - 1) / 4096 + 1``
    (docs/fidelity.md); ``strict`` (Config.strict) refuses size 0 at any offset.
    """
    def inside(pa: int) -> bool:
        return any(base <= pa and pa + PAGE_SIZE <= base + length for base, length in nonsecure)

    offset = buf_ptr % PAGE_SIZE                       # buf_ptr = list PA | offset
    if (size == 0 and (offset == 0 or strict)) or size + offset >= U64_LIMIT:
        return None
    num_pages = (size + offset - 1) // PAGE_SIZE + 1
    if num_pages > MAX_LIST_PAGES:
        return None
    pages: list[int] = []
    list_pa = buf_ptr - offset
    while True:
        if list_pa % PAGE_SIZE or not inside(list_pa):
            return None
        try:
            words = struct.unpack("<512Q", bytes(read_page(list_pa)))   # 511 entries, then next
        except PoolsvcError:
            return None
        for entry in words[:511]:
            if entry % PAGE_SIZE or not inside(entry):
                return None
            pages.append(entry)
            if len(pages) == num_pages:
                return pages
        list_pa = words[511]


#: The commands whose parameters the secure world reads as page lists (docs/tee.md).
_READS_PAGE_LISTS = (MsgCmd.OPEN_SESSION, MsgCmd.INVOKE_COMMAND, MsgCmd.REGISTER_SHM)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
U64 = (1 << 64) - 1


@pytest.fixture
def leaks():
    check = LeakCheck()
    yield check
    check.assert_balanced()


def normal(state):
    """A snapshot with session ids and RPC cookies replaced by what they stand for."""
    out = dict(state)
    out["sessions"] = sorted((u, dead, len(rpc)) for u, dead, rpc in state["sessions"].values())
    out["rpc_shms"] = len(state["rpc_shms"])
    return out


class World:
    def __init__(self, system):
        self.system = system
        cfg = system.config
        self.ctx = ctx = system.open_context("fuzz")
        self.data = ctx.alloc_user_buf(6 * PAGE_SIZE)
        self.data.view()[:] = np.random.default_rng(3).bytes(self.data.size)
        self.lists = ctx.alloc_user_buf(2 * PAGE_SIZE)
        pages = [int(p) for p in self.data.pages]
        self.list_pa = write_list(self.lists, pages[::-1])          # a valid list, reversed pages
        self.list_bad = write_list(self.lists, [pages[0] | 8, cfg.secure_base], page=1)
        self.apps = (Sha256App, CopyApp, FillApp, StorageApp)
        self.sessions = [open_raw(system, app.UUID) for app in self.apps]
        self.cookies = [self.data.cookie, self.lists.cookie] if cfg.dynamic_shm else []
        self.addresses = [0, cfg.static_base, cfg.static_base + 100, cfg.static_base + cfg.static_size - 64,
                          cfg.secure_base, pages[0], pages[2] + 17, self.list_pa, self.list_pa | 0x123,
                          self.list_bad, cfg.dynamic_base + cfg.dynamic_size - PAGE_SIZE, U64, 1 << 63]
        self.watch = [cfg_sid for cfg_sid in self._watched_sids()]

    def _watched_sids(self):
        sids = set()
        for shm in (self.data, self.lists):
            sids.add(int(self.system.memory.table.lookup(int(shm.pages[0]))[0]))
        if self.system.static is not None:
            sids.add(int(self.system.memory.table.lookup(self.system.config.static_base)[0]))
        return sorted(sids)

    def spec_pages(self, p: MsgParam) -> list[int] | None:
        """The spec's pages of a NONCONTIG TMEM parameter (None: must be refused)."""
        cfg = self.system.config
        return spec_page_list(p.a, p.b, lambda pa: self.system.memory.table.read(pa, PAGE_SIZE),
                              [(cfg.static_base, cfg.static_size), (cfg.dynamic_base, cfg.dynamic_size)],
                              self.system.tee.strict)

    def page_list_verdict(self, msg: MsgArg, reply: MsgArg, registered0: set[int], smc: int) -> str | None:
        """Where the secure world's verdict on the message's page lists differs from the
        spec's (None: it agrees).  Read before the test undoes the message's effects.
        ``smc`` is the SMC-level result: a message refused there was not served at all.
        Only the commands that read page lists are judged: UNREGISTER_SHM reads its
        parameter's cookie alone, CLOSE_SESSION and CANCEL no parameter at all."""
        if smc != SMC_RETURN_OK or msg.cmd not in _READS_PAGE_LISTS:
            return None
        lists = [(p, self.spec_pages(p)) for p in msg.params
                 if (p.attr & 0xFF) in (Attr.TMEM_INPUT, Attr.TMEM_OUTPUT, Attr.TMEM_INOUT)
                 and p.attr & ATTR_NONCONTIG and p.a]
        if reply.ret == 0 and any(pages is None for _, pages in lists):
            return f"a page list the spec refuses was accepted: {msg}"
        if msg.cmd != MsgCmd.REGISTER_SHM or len(msg.params) != 1:
            return None
        p = msg.params[0]
        if p.attr != Attr.TMEM_OUTPUT | ATTR_NONCONTIG or not self.system.config.dynamic_shm \
                or p.c in registered0 or p.c in self.system.tee.rpc_shms:
            return None
        pages = self.spec_pages(p)
        entry = self.system.tee.registered.get(p.c)
        if pages is None:
            return None if entry is None else f"REGISTER_SHM of a list the spec refuses registered: {msg}"
        if reply.ret != 0 or entry is None:
            return f"REGISTER_SHM of a list the spec accepts answered {reply.ret:#x}: {msg}"
        if [int(x) for x in entry.pages] != pages:
            return f"REGISTER_SHM registered {list(entry.pages)}, the spec's pages are {pages}: {msg}"
        return None

    def reachable(self, msg: MsgArg) -> set[tuple[int, int]]:
        """(storage id, page index) of every page the message's params may reach.

        Plus the RPC memory the apps hold: theirs to write whatever the message.
        """
        system, cfg = self.system, self.system.config
        pas: list[int] = []
        for p in msg.params:
            kind = p.attr & 0xFF
            if kind in (Attr.TMEM_INPUT, Attr.TMEM_OUTPUT, Attr.TMEM_INOUT) and p.a:
                if p.attr & ATTR_NONCONTIG:
                    pas += self.spec_pages(p) or []
                else:
                    lo = max(p.a, cfg.static_base) & ~PAGE_MASK
                    hi = min(p.a + p.b, cfg.static_base + cfg.static_size)
                    pas += list(range(lo, hi, PAGE_SIZE))
            elif kind in (Attr.RMEM_INPUT, Attr.RMEM_OUTPUT, Attr.RMEM_INOUT):
                entry = system.tee.registered.get(p.c)
                if entry is not None:
                    start = entry.offset + p.a
                    first = start // PAGE_SIZE
                    last = min((start + p.b + PAGE_MASK) // PAGE_SIZE, len(entry.pages))
                    pas += [int(x) for x in entry.pages[first:last]]
        for memory in system.tee.rpc_shms.values():  # what apps got by RPC is theirs to write
            pas += [int(x) for x in memory._pages]
        out = set()
        for pa in pas:
            if system.memory.table.is_mapped(pa):
                sid, off = system.memory.table.translate(pa)
                out.add((int(sid), int(off) // PAGE_SIZE))
        return out

    def send_and_check(self, data: bytes) -> None:
        system = self.system
        base = snapshot(system)
        entries0 = dict(system.tee.registered)
        registered0 = set(entries0)
        sessions0 = set(system.tee.sessions)
        before = storage_bytes(system, self.watch)
        try:
            msg = unpack(data)
        except ProtocolError:
            with pytest.raises(ProtocolError):
                system.tee.call(data)
            assert snapshot(system) == base
            return
        smc, answer = system.tee.call_smc(data)
        reply = unpack(answer)
        assert all(not s.dead for s in system.tee.sessions.values()), "a built-in app panicked"
        assert len(reply.params) == len(msg.params)
        if smc != SMC_RETURN_OK:  # refused at the SMC level: the message comes back as sent
            assert smc == SMC_RETURN_EBADCMD and answer == data
        verdict = self.page_list_verdict(msg, reply, registered0, smc)
        for i, sid in enumerate(self.sessions):
            if sid not in system.tee.sessions:  # a valid CLOSE_SESSION: open it again
                assert (msg.cmd, msg.params, msg.session, reply.ret) == (MsgCmd.CLOSE_SESSION, [], sid, 0)
                self.sessions[i] = open_raw(system, self.apps[i].UUID)
                sessions0.add(self.sessions[i])
        changed = changed_pages(before, storage_bytes(system, self.watch))
        assert changed <= self.reachable(msg), (changed, msg)
        # undo what a valid message may create, then nothing may be left over
        for cookie in set(system.tee.registered) - registered0:
            assert raw(system, MsgCmd.UNREGISTER_SHM, [MsgParam(Attr.RMEM_INPUT, 0, 0, cookie)]).ret == 0
        for cookie in list(system.tee.shadowed):  # a REGISTER_SHM reusing a cookie: the newer goes
            assert raw(system, MsgCmd.UNREGISTER_SHM, [MsgParam(Attr.RMEM_INPUT, 0, 0, cookie)]).ret == 0
        for cookie in registered0 - set(system.tee.registered):  # a valid UNREGISTER_SHM of ours
            system.tee.registered[cookie] = entries0[cookie]
        for sid in set(system.tee.sessions) - sessions0:
            assert raw(system, MsgCmd.CLOSE_SESSION, [], session=sid).ret == 0
        after = snapshot(system)
        assert after["temp_live"] == 0
        assert all(r[3] == 0 for r in after["registered"].values())
        assert normal(after) == normal(base)
        assert verdict is None, verdict   # after the clean-up, so that a replay starts from the same state


def params_strategy(world):
    attrs = st.one_of(
        st.sampled_from([0, 1, 2, 3, 5, 6, 7, 9, 10, 11]),
        st.sampled_from([9, 10, 11]).map(lambda t: t | ATTR_NONCONTIG),
        st.sampled_from([1, 9, 10 | ATTR_NONCONTIG]).map(lambda t: t | ATTR_META),
        st.integers(0, U64),
    )
    words = st.one_of(st.sampled_from(world.addresses), st.integers(0, 3 * PAGE_SIZE), st.integers(0, U64))
    cookies = st.one_of(st.sampled_from(world.cookies or [0]), st.integers(0, U64))
    return st.builds(MsgParam, attrs, words, words, cookies)


def message_strategy(world):
    meta = [open_params(app.UUID) for app in (Sha256App, CopyApp, FillApp, StorageApp)]
    params = params_strategy(world)
    plain = st.builds(lambda cmd, func, session, ps: MsgArg(cmd=cmd, func=func, session=session, params=ps),
                      st.one_of(st.integers(0, 7), st.integers(0, 0xFFFFFFFF)),
                      st.one_of(st.integers(0, 3), st.integers(0, 0xFFFFFFFF)),
                      st.one_of(st.integers(0, 3).map(lambda i: world.sessions[i]),
                                st.integers(0, 0xFFFFFFFF)),
                      st.lists(params, max_size=6))
    opens = st.builds(lambda m, ps: MsgArg(cmd=MsgCmd.OPEN_SESSION, params=m + ps),
                      st.sampled_from(meta), st.lists(params, max_size=5))
    cfg = world.system.config
    small = st.integers(0, 3 * PAGE_SIZE)

    def unaligned_entry(attrs, cookies):
        """A NONCONTIG param whose list's only entry read is unaligned: the spec refuses it."""
        return st.integers(0, PAGE_MASK).flatmap(lambda o: st.builds(
            MsgParam, attrs, st.just(world.list_bad | o), st.integers(1, PAGE_SIZE - o), cookies))

    fresh = st.integers(1 << 40, 1 << 41)
    registers = st.builds(lambda p: MsgArg(cmd=MsgCmd.REGISTER_SHM, params=[p]), st.one_of(
        st.builds(MsgParam, st.just(Attr.TMEM_OUTPUT | ATTR_NONCONTIG),
                  st.integers(0, PAGE_MASK).map(lambda o: world.list_pa | o), st.integers(1, 7 * PAGE_SIZE), fresh),
        unaligned_entry(st.just(Attr.TMEM_OUTPUT | ATTR_NONCONTIG), fresh)))
    plausible = st.one_of(
        st.builds(MsgParam, st.sampled_from([1, 2, 3]), st.integers(0, 5), st.integers(0, 5), st.just(0)),
        st.builds(MsgParam, st.sampled_from([9, 10, 11]), st.integers(0, cfg.static_size).map(
            lambda o: cfg.static_base + o), small, st.just(0)),
        st.builds(MsgParam, st.sampled_from([9, 10, 11]).map(lambda t: t | ATTR_NONCONTIG),
                  st.sampled_from([world.list_pa, world.list_bad]).flatmap(
                      lambda pa: st.integers(0, PAGE_MASK).map(lambda o: pa | o)), small, st.just(0)),
        unaligned_entry(st.sampled_from([9, 10, 11]).map(lambda t: t | ATTR_NONCONTIG), st.just(0)),
        st.builds(MsgParam, st.sampled_from([5, 6, 7]), small, small,
                  st.sampled_from(world.cookies or [0])),
        st.builds(MsgParam, st.sampled_from([9, 10, 11]), st.just(0), small, st.just(0)),
    )
    invokes = st.builds(lambda i, func, ps: MsgArg(cmd=MsgCmd.INVOKE_COMMAND, func=func,
                                                   session=world.sessions[i], params=ps),
                        st.integers(0, 3), st.integers(0, 3), st.lists(plausible, max_size=4))
    def memref(direction):  # 0 in, 1 out, 2 inout
        return st.one_of(
            st.builds(MsgParam, st.just(9 + direction), st.integers(0, cfg.static_size // 2).map(
                lambda o: cfg.static_base + o), small, st.just(0)),
            st.builds(MsgParam, st.just((9 + direction) | ATTR_NONCONTIG),
                      st.integers(0, PAGE_MASK).map(lambda o: world.list_pa | o),
                      st.integers(1, 5 * PAGE_SIZE), st.just(0)),
            st.builds(MsgParam, st.just(5 + direction), small, small, st.sampled_from(world.cookies or [0])),
            st.builds(MsgParam, st.just(9 + direction), st.just(0), st.integers(0, 64), st.just(0)))

    value = st.builds(MsgParam, st.just(1), st.integers(0, 2 * PAGE_SIZE), st.integers(0, 5), st.just(0))
    templates = [
        (0, 0, st.tuples(memref(0), memref(1))),
        (1, 0, st.tuples(memref(0), st.one_of(memref(1), memref(2)))),
        (2, 0, st.tuples(st.one_of(memref(1), memref(2)), value)),
        (3, 0, st.tuples(value, memref(0))),
        (3, 1, st.tuples(value, memref(1))),
    ]
    typed = st.one_of(*[st.builds(lambda ps, i=i, f=f: MsgArg(cmd=MsgCmd.INVOKE_COMMAND, func=f,
                                                             session=world.sessions[i], params=list(ps)), t)
                        for i, f, t in templates])
    return st.one_of(plain, opens, invokes, typed, registers).map(lambda m: m.pack())


@pytest.mark.parametrize("pool", ["dynamic", "static"])
def test_generated_messages(pool, leaks):
    with System(Config(**SMALL, dynamic_shm=pool == "dynamic")) as system:
        world = World(system)

        @FUZZ
        @given(data=message_strategy(world))
        def check(data):
            world.send_and_check(data)

        check()
        assert_accounting(system)


@pytest.mark.parametrize("pool", ["dynamic", "static"])
def test_random_bytes(pool, leaks):
    with System(Config(**SMALL, dynamic_shm=pool == "dynamic")) as system:
        world = World(system)

        @FUZZ
        @given(data=st.binary(max_size=300))
        def check(data):
            world.send_and_check(data)

        check()
        assert_accounting(system)
