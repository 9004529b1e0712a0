"""Parked shm slots: the daemon polls only the slots with recent requests.

An idle slot is parked (its ``daemon_sleeping`` word set, see
``poolsvc/service/slotserve.py``); its client's next request rings the
doorbell (eventfd, or a DOORBELL frame for a client without one) and is
served.  Covered: idle slots leave the polled set while their connections
stay, requests in parked slots are served through either doorbell, and
requests published at random moments around the parking deadline are never
lost (a lost wake-up would hang the client until its timeout).
"""
from __future__ import annotations

import mmap
import random
import threading

import pytest

from poolsvc.service import protocol as P
from poolsvc.service import slot as S
from poolsvc.service.client import connect
from poolsvc.service.slotserve import PARK_AFTER, quiet_after

from svcutil import RawClient, checked_daemon, idle, requests_after_pauses, summary
from waiting import wait_until


def test_idle_slots_are_parked_and_a_request_rings_its_slot_back(tmp_path):
    with checked_daemon(tmp_path / "p.sock") as d:
        server = d.server
        clients = [connect(d.path, name=f"idle-{i}", transport="shm") for i in range(6)]
        try:
            contexts = [c.open_context() for c in clients]
            for ctx in contexts:
                ctx.alloc_user_buf(4096).close()
                ctx.flush()
            slots = [ctx._channel.slot for ctx in contexts]
            wait_until(lambda: len(server._slots) >= 6 and not server._slots.polled,
                       what="every idle slot parked")
            assert all(slot.daemon_sleeping() for slot in slots)
            # One client's request wakes its own slot only.
            assert contexts[2].alloc_user_buf(4096).size == 4096
            assert clients[2].ping(b"again") == b"again"
            assert all(slots[i].daemon_sleeping() for i in (0, 1, 3, 4, 5))  # never rung: still parked
        finally:
            for c in clients:
                c.close()
        d.wait_for(idle(d.baseline))


def test_an_idle_slot_is_parked_while_another_client_keeps_the_daemon_busy(tmp_path):
    """The daemon never sleeps here (a 0.2 s polling window, one client pinging without
    pause), so only the idleness rule can park the other client's slot."""
    with checked_daemon(tmp_path / "b.sock", shm_spin_us=200_000) as d:
        idle_client = connect(d.path, name="idle", transport="shm")
        busy_client = connect(d.path, name="busy", transport="shm")
        stop = threading.Event()
        try:
            ctx = idle_client.open_context()
            ctx.alloc_user_buf(4096).close()
            ctx.flush()
            slot = ctx._channel.slot
            busy = busy_client.open_context()

            def ping() -> None:
                while not stop.is_set():
                    busy.alloc_user_buf(4096).close()

            pinger = threading.Thread(target=ping)
            pinger.start()
            wait_until(slot.daemon_sleeping, what="the idle slot parked while the other is served")
            assert pinger.is_alive() and d.server._slots.polled  # the busy one is still polled
        finally:
            stop.set()
            if "pinger" in locals():
                pinger.join()
            idle_client.close()
            busy_client.close()
        d.wait_for(idle(d.baseline))


def test_a_client_without_an_eventfd_rings_with_a_doorbell_frame(tmp_path):
    with checked_daemon(tmp_path / "q.sock") as d:
        raw = RawClient(d.path, P.Role.CONTEXT, features=P.Feature.SHM_SLOT)
        try:
            assert raw.welcome[0] == P.MsgType.WELCOME and len(raw.fds) == 1  # a slot, no eventfd
            mm = mmap.mmap(raw.fds[0], S.SLOT_BYTES)
            words = S.words_of(mm)
            for seq in range(1, 4):
                wait_until(lambda: words[S.W_DAEMON_SLEEPING] == 1, what="the slot parked")
                ping = P.frame(P.MsgType.PING, b"p%d" % seq)
                mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(ping)] = ping
                words[S.W_REQ_LEN] = len(ping)
                words[S.W_REQ_SEQ] = seq
                S.fence()
                assert words[S.W_DAEMON_SLEEPING] == 1
                raw.send(P.DOORBELL_FRAME)
                wait_until(lambda seq=seq: words[S.W_REP_SEQ] == seq, what=f"the reply to request {seq}")
                n = words[S.W_REP_LEN]
                assert bytes(mm[S.SLOT_REP_OFF:S.SLOT_REP_OFF + n]) == P.frame(P.MsgType.OK, b"p%d" % seq)
            words.release()
            mm.close()
        finally:
            raw.close()
        d.wait_for(idle(d.baseline))


@pytest.mark.parametrize("shm_spin_us", [0, 20])
def test_requests_published_around_the_parking_deadline_are_never_lost(tmp_path, shm_spin_us):
    """With a 20 us window a slot is parked after 80 us without a request: pauses
    of 0 to 200 us put publications on both sides of the parking, many times."""
    rng = random.Random(14)
    with checked_daemon(tmp_path / "r.sock", shm_spin_us=shm_spin_us) as d:
        base = summary(d.stats())
        with connect(d.path, transport="shm", shm_spin_us=rng.choice([0, 50]), timeout=30) as client:
            requests_after_pauses(client, [rng.random() * 2e-4 for _ in range(400)])
        d.wait_for(idle(base))


@pytest.mark.parametrize("slots, period", [(8, 40e-6), (64, 500e-6), (256, 3e-3), (1024, 30e-3)])
def test_a_slot_as_busy_as_its_peers_is_not_idle(slots, period):
    """``slots`` polled slots each making a request every ``period`` seconds (a
    client waiting its turn for a CPU): none counts as idle within several of its
    own periods, however long they are; with no requests the floor applies."""
    park_after = PARK_AFTER * 200e-6
    seconds = 2 * park_after
    requests = round(slots * seconds / period)
    quiet = quiet_after(park_after, slots, requests, seconds)
    assert quiet >= park_after
    assert quiet >= 0.9 * PARK_AFTER * period  # several periods, not one polling window
    assert quiet_after(park_after, slots, 0, seconds) == park_after
