"""Turns: the daemon polls at most ``max_polled_slots`` shm slots at once.

A slot whose client rings while that many are polled waits (``_waiting``)
until a polled one is parked: it went idle, or its turn (``slot_turn_us``)
ended while others waited (``poolsvc/service/slotserve.py``, "Turns").
Covered: the bound holds from the first connection on, waiting clients are
served while the polled ones never pause, requests published around the end
of a turn are never lost, a disconnected waiter leaves no trace, a
client ringing in a flood only queues its own slot once, turns shorten when
a round would last over ``slot_round_us``, a slot that went quiet gives its
place up at once, and a monitor never waits for a turn (it gets no slot);
a slot whose last place was a brief visit gets a freed place before busier
ones, the extra place serves the brief lane one slot and EXTRA_TURN at a
time and only while the bound is halved, and a new slot starts parked while
others wait.  The queue itself:
``tests/test_wait_queue.py``.
"""
from __future__ import annotations

import array
import random
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from poolsvc.errors import ConfigError
from poolsvc.service import protocol as P
from poolsvc.service import render
from poolsvc.service import slot as S
from poolsvc.service.client import connect
from poolsvc.service.connection import READY, Connection
from poolsvc.service.metrics import Metrics
from poolsvc.service.settings import ServiceSettings
from poolsvc.service.slotserve import EXTRA_TURN, MIN_TURN, TURN_STRETCH, SlotServing

from svcutil import RawClient, checked_daemon, idle, requests_after_pauses, summary
from waiting import wait_until


def test_the_default_bound_is_four_slots_per_cpu_and_zero_lifts_it():
    import os

    assert ServiceSettings().polled_slots() == 4 * len(os.sched_getaffinity(0))
    assert ServiceSettings(max_polled_slots=3).polled_slots() == 3
    assert ServiceSettings(max_polled_slots=0).polled_slots() == 0
    with pytest.raises(ConfigError, match="max_polled_slots"):
        ServiceSettings(max_polled_slots=-1)
    with pytest.raises(ConfigError, match="slot_turn_us"):
        ServiceSettings(slot_turn_us=5)
    with pytest.raises(ConfigError, match="slot_turn_requests"):
        ServiceSettings(slot_turn_requests=-1)
    with pytest.raises(ConfigError, match="slot_round_us"):
        ServiceSettings(slot_round_us=-1)


def test_slots_beyond_the_bound_start_parked_and_ring_to_be_served(tmp_path):
    # After the first request the daemon polls for a 1 s window: no slot is parked
    # for idleness, nor by the daemon going to sleep, while the others connect.
    with checked_daemon(tmp_path / "a.sock", max_polled_slots=2, shm_spin_us=1_000_000) as d:
        wait_until(lambda: not d.server._slots, what="the baseline's monitor connection gone")
        clients = [connect(d.path, name="c0", transport="shm")]
        try:
            contexts = [clients[0].open_context()]
            contexts[0].alloc_user_buf(4096).close()
            contexts[0].flush()
            for i in range(1, 4):
                clients.append(connect(d.path, name=f"c{i}", transport="shm"))
                contexts.append(clients[i].open_context())
            slots = [ctx._channel.slot for ctx in contexts]
            assert len(d.server._slots.polled) <= 2
            assert sum(not slot.daemon_sleeping() for slot in slots) <= 2
            for ctx in contexts:  # every one is served, the parked ones by their rings
                assert ctx.alloc_user_buf(4096).size == 4096
                ctx.flush()
            assert len(d.server._slots.polled) <= 2
        finally:
            for c in clients:
                c.close()
        d.wait_for(idle(d.baseline))


def _run_pairs(ctx, count: int, done: list[int], index: int, stop: threading.Event) -> None:
    for _ in range(count):
        if stop.is_set():
            return
        ctx.alloc_user_buf(4096).close()
        done[index] += 1
    ctx.flush()


def test_waiting_clients_are_served_while_the_polled_ones_never_pause(tmp_path):
    """Two clients allocate without pause and hold the two polled places; their slots
    are never idle (a 0.2 s window) and the daemon never sleeps.  Three more clients
    finish their pairs only because turns end and hand the places over."""
    with checked_daemon(tmp_path / "b.sock", max_polled_slots=2, shm_spin_us=200_000,
                        slot_turn_us=2000) as d:
        base = summary(d.stats())
        clients = [connect(d.path, name=f"c{i}", transport="shm", timeout=60) for i in range(5)]
        stop = threading.Event()
        done = [0] * 5
        threads: list[threading.Thread] = []
        try:
            contexts = [c.open_context() for c in clients]
            greedy = [threading.Thread(target=_run_pairs, args=(contexts[i], 10**9, done, i, stop))
                      for i in (0, 1)]
            for t in greedy:
                t.start()
            wait_until(lambda: min(done[:2]) > 50, what="the polled clients running")
            threads = [threading.Thread(target=_run_pairs, args=(contexts[i], 100, done, i, stop))
                       for i in (2, 3, 4)]
            for t in threads:
                t.start()
            most = 0
            deadline = time.monotonic() + 60
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                most = max(most, len(d.server._slots.polled))
                threads[0].join(0.001)
            assert done[2:] == [100, 100, 100], done
            assert most == 2  # the bound held, and was reached
            assert all(t.is_alive() for t in greedy)  # the others were served while these ran
            assert d.server.metrics.slot_turns > 0
        finally:
            stop.set()
            for t in threads + locals().get("greedy", []):
                t.join()
            for c in clients:
                c.close()
        d.wait_for(idle(base))


@pytest.mark.parametrize("seed", [1, 2])
def test_requests_published_around_the_end_of_a_turn_are_never_lost(tmp_path, seed):
    """One polled place, three clients and 10 us turns: every request is published
    close to some turn's end, on either side of the parking mark.  A request the
    daemon missed would leave its client asleep until its timeout."""
    rng = random.Random(seed)
    with checked_daemon(tmp_path / "c.sock", max_polled_slots=1, slot_turn_us=10) as d:
        base = summary(d.stats())
        clients = [connect(d.path, name=f"c{i}", transport="shm", timeout=30,
                           shm_spin_us=rng.choice([0, 50])) for i in range(3)]
        errors: list[BaseException] = []

        def run(client, pauses) -> None:
            try:
                requests_after_pauses(client, pauses)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c, [rng.random() * 1e-4 for _ in range(300)]))
                   for c in clients]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert not errors, errors
            assert d.server.metrics.slot_turns > 0
        finally:
            for c in clients:
                c.close()
        d.wait_for(idle(base))


def test_a_waiting_client_that_disconnects_leaves_no_trace(tmp_path):
    with checked_daemon(tmp_path / "d.sock", max_polled_slots=1, shm_spin_us=200_000,
                        slot_turn_us=10_000_000) as d:
        busy = connect(d.path, name="busy", transport="shm")
        stop = threading.Event()
        done = [0]
        try:
            ctx = busy.open_context()
            runner = threading.Thread(target=_run_pairs, args=(ctx, 10**9, done, 0, stop))
            runner.start()
            wait_until(lambda: done[0] > 10, what="the polled client running")
            raw = RawClient(d.path, P.Role.CONTEXT, features=P.Feature.SHM_SLOT)
            conn = max(d.server._slots.members, key=lambda c: c.serial)
            raw.send(P.DOORBELL_FRAME)
            wait_until(lambda: conn in d.server._waiting, what="the rung slot waiting for a place")
            doc = d.stats()
            assert doc["daemon"]["slots"]["waiting"] == 1
            assert doc["daemon"]["slots"]["waiting_brief"] == 0  # a new slot queues in the full lane
            assert "1 waiting for a turn (0 after a brief visit)" in render.text(doc)
            assert "poolsvc_slot_extra_places_total 0" in render.prometheus(doc)
            raw.close()
            wait_until(lambda: conn not in d.server._slots, what="the closed connection's slot dropped")
            assert conn not in d.server._waiting  # dropped with the slot, not at its turn
        finally:
            stop.set()
            if "runner" in locals():
                runner.join()
            busy.close()
        d.wait_for(idle(d.baseline))


def test_a_doorbell_flood_queues_the_slot_once_and_others_are_served(tmp_path):
    with checked_daemon(tmp_path / "e.sock", max_polled_slots=1, shm_spin_us=200_000,
                        slot_turn_us=1000) as d:
        base = summary(d.stats())
        first = connect(d.path, name="first", transport="shm")
        raw = RawClient(d.path, P.Role.CONTEXT, features=P.Feature.SHM_SLOT)
        second = connect(d.path, name="second", transport="shm", timeout=30)
        try:
            first.open_context()  # holds the one polled place, idle
            ctx = second.open_context()
            flood = P.DOORBELL_FRAME * 512
            for _ in range(20):
                raw.send(flood)
                assert len(d.server._waiting) <= 2
            for _ in range(50):  # served in turns with the ringing slot
                ctx.alloc_user_buf(4096).close()
            ctx.flush()
            assert len(d.server._waiting) <= 2
        finally:
            raw.close()
            first.close()
            second.close()
        d.wait_for(idle(base))


def test_a_client_that_always_has_a_request_pending_still_takes_turns(tmp_path):
    """A client in a process of its own publishes its next request as soon as its
    reply is out, so the end of its turn finds a request in its slot: it keeps its
    place once, then, a whole turn late, waits in the queue.  Another client
    sharing the one polled place is served meanwhile, and no request of the
    spinner is lost (it stops only once its last request is answered)."""
    with checked_daemon(tmp_path / "f.sock", max_polled_slots=1, slot_turn_us=200) as d:
        base = summary(d.stats())
        spinner = subprocess.Popen([sys.executable, str(Path(__file__).with_name("slotspinner.py")), d.path],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert spinner.stdout.readline().strip() == "ready"
            with connect(d.path, name="other", transport="shm", timeout=30) as other:
                ctx = other.open_context()
                for _ in range(50):
                    ctx.alloc_user_buf(4096).close()
                ctx.flush()
            assert spinner.poll() is None  # served while the spinner kept publishing
            spinner.stdin.write("stop\n")
            spinner.stdin.flush()
            assert spinner.wait(timeout=60) == 0, "the spinner's last request was never answered"
            assert int(spinner.stdout.readline()) > 100
        finally:
            if spinner.poll() is None:
                spinner.kill()
                spinner.wait()
        d.wait_for(idle(base))


def test_a_monitor_is_answered_at_once_while_slots_wait_for_their_turn(tmp_path):
    """The spinner holds the one polled place for a 10 s turn and a context slot
    waits for it.  A monitor connection (``poolsvc stat``, a context's CANCEL) gets
    no slot: its STATS is answered on the socket while the slot still waits."""
    with checked_daemon(tmp_path / "h.sock", max_polled_slots=1, slot_turn_us=10_000_000) as d:
        spinner = subprocess.Popen([sys.executable, str(Path(__file__).with_name("slotspinner.py")), d.path],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        raw = None
        try:
            assert spinner.stdout.readline().strip() == "ready"
            raw = RawClient(d.path, P.Role.CONTEXT, features=P.Feature.SHM_SLOT)
            waiter = max(d.server._slots.members, key=lambda c: c.serial)
            # the spinner holds the place (a new slot finds it free if the spinner was parked
            # at that instant; it then gives it up once quiet, as the spinner waits)
            wait_until(lambda: d.server._slots.polled and waiter not in d.server._slots.polled,
                       what="the spinner polled, the new slot parked")
            raw.send(P.DOORBELL_FRAME)
            wait_until(lambda: waiter in d.server._waiting, what="the rung slot waiting for the place")
            with connect(d.path, name="monitor", transport="shm", timeout=30) as monitor:
                stats = monitor.service_stats()
                assert monitor._monitor is not None and monitor._monitor.slot is None
            assert stats["daemon"]["limits"]["slot_round_us"] == 6_000_000
            assert waiter in d.server._waiting  # answered within the spinner's turn
            spinner.stdin.write("stop\n")
            spinner.stdin.flush()
            assert spinner.wait(timeout=60) == 0
        finally:
            if raw is not None:
                raw.close()
            if spinner.poll() is None:
                spinner.kill()
                spinner.wait()


class _Turns(SlotServing):
    """The turn-taking part of the daemon alone, on slots without clients."""

    def __init__(self, cap: int, turn_us: int, round_us: int = 0) -> None:
        self.settings = ServiceSettings(max_polled_slots=cap, slot_turn_us=turn_us, slot_turn_requests=128,
                                        slot_round_us=round_us)
        self.metrics = Metrics()
        self._max_output = 1 << 20
        self._init_slots()

    def slot(self, pending: bool) -> Connection:
        conn = Connection(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), 0)
        conn.sock.close()
        conn.state, conn.seq = READY, 5
        conn.words = array.array("Q", bytes(8 * S.SLOT_WORDS))
        conn.words[S.W_REQ_SEQ] = 6 if pending else 5
        self._slots.append(conn, len(self._waiting))  # as the daemon does at HELLO
        return conn


@pytest.mark.parametrize("pending, late, requests, last_ms, outcome", [
    (False, 1.1, 128, 0.05, "parked"),  # no request: parked, its client's next one rings
    (True, 1.1, 128, 0.05, "kept"),     # a request after the mark: keeps its place for a later try
    (True, 2.1, 128, 0.05, "queued"),   # still so a whole turn late: waits behind the others
    (False, 1.1, 127, 0.05, "kept"),    # too few requests in its turn: a longer turn
    (False, 1.1, 127, 0.2, "kept"),     # ... while its last request is within a TURN_STRETCH-th of a turn
    (False, 1.1, 127, 0.3, "parked"),   # but a client that went quiet does not hold the place
    (False, 1.1, 0, 1.1, "parked"),     # (nothing at all since it got the place)
    (False, 0.8, 10, 0.3, "parked"),    # even before its turn would end
    (False, 0.8, 10, 0.2, "kept"),
    (False, TURN_STRETCH + 0.1, 1, 0.05, "parked"),  # and no longer than TURN_STRETCH turns
])
def test_a_turn_ends_by_parking_keeping_or_queueing_the_slot(pending, late, requests, last_ms, outcome):
    turns = _Turns(cap=1, turn_us=1000)  # and 128 requests; quiet after 1000 / TURN_STRETCH us
    first = turns.slot(pending)
    second = turns.slot(False)
    assert list(turns._slots.polled) == [first] and second.words[S.W_DAEMON_SLEEPING] == 1
    turns._admit(second)  # its client rang
    assert list(turns._waiting) == [second]
    first.requests += requests  # served in its turn
    first.served_at = first.polled_at + 0.45e-3
    # not yet; looked at again when it would count as quiet (0.25 ms after that request)
    assert turns._take_turns(first.polled_at + 0.5e-3) == pytest.approx(first.polled_at + 0.7e-3)
    assert list(turns._slots.polled) == [first]
    first.served_at = first.polled_at + (late - last_ms) * 1e-3  # its last request
    look = turns._take_turns(first.polled_at + late * 1e-3)
    polled, waiting = list(turns._slots.polled), list(turns._waiting)
    if outcome == "kept":
        assert polled == [first] and waiting == [second] and first.words[S.W_DAEMON_SLEEPING] == 0
        # looked at again by the time it would count as quiet (or a 16th of a turn on)
        assert look <= max(first.served_at + 0.25e-3, first.polled_at + (late + 1 / 16) * 1e-3) + 1e-9
    else:
        assert polled == [second] and second.words[S.W_DAEMON_SLEEPING] == 0
        assert first.words[S.W_DAEMON_SLEEPING] == 1
        assert waiting == ([first] if outcome == "queued" else [])
        assert turns.metrics.slot_turns == 1


@pytest.mark.parametrize("round_us, ends_ms", [
    (0, 8 * TURN_STRETCH),  # no bound: 8 ms, stretched to TURN_STRETCH turns (too few requests)
    (16_000, 2),            # 8 waiting for 1 place, a round within 16 ms: 2 ms turns
    (1_000, MIN_TURN * 1e3),  # a round within 1 ms would take 0.125 ms turns: MIN_TURN
])
def test_turns_shorten_while_so_many_wait_that_a_round_would_pass_slot_round_us(round_us, ends_ms):
    turns = _Turns(cap=1, turn_us=8000, round_us=round_us)
    first = turns.slot(False)
    others = [turns.slot(False) for _ in range(8)]
    for conn in others:
        turns._admit(conn)  # each client rang
    assert list(turns._waiting) == others
    ends = first.polled_at + ends_ms * 1e-3
    first.served_at = ends - 0.2e-3  # its client is busy (requests in the last quarter turn)
    turns._take_turns(ends - 0.1e-3)  # not yet
    assert list(turns._slots.polled) == [first]
    turns._take_turns(ends + 0.1e-3)
    assert list(turns._slots.polled) == [others[0]] and list(turns._waiting) == others[1:]


def test_a_slot_counts_as_quiet_after_a_quarter_of_slot_turn_us_even_while_turns_are_shorter():
    """Turns shortened by the round bound do not shorten the quiet span: a client
    woken for its turn has a quarter of ``slot_turn_us`` for its next request."""
    turns = _Turns(cap=1, turn_us=8000, round_us=1_000)  # 8 waiting for 1 place: MIN_TURN turns
    first = turns.slot(False)
    for conn in [turns.slot(False) for _ in range(8)]:
        turns._admit(conn)
    first.served_at = first.polled_at + 0.1e-3
    turns._take_turns(first.polled_at + 0.9e-3)  # 0.8 ms without a request, within 2 ms
    assert list(turns._slots.polled) == [first]
    turns._take_turns(first.polled_at + 2.2e-3)  # 2.1 ms: quiet (and its 1 ms turn is over)
    assert first not in turns._slots.polled


def test_a_polled_client_that_pauses_keeps_its_place_until_its_turn_ends(tmp_path):
    """The spinner holds the one polled place and a slot waits; then the spinner
    pauses 300 us before each request, longer than the daemon's 20 us polling
    window and the idleness rule's 80 us.  With a slot waiting neither parks it
    (a client descheduled for a while is not idle): only the end of its turn
    (10 s here) would."""
    with checked_daemon(tmp_path / "g.sock", max_polled_slots=1, shm_spin_us=20,
                        slot_turn_us=10_000_000) as d:
        spinner = subprocess.Popen([sys.executable, str(Path(__file__).with_name("slotspinner.py")), d.path],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        raw = None
        try:
            assert spinner.stdout.readline().strip() == "ready"
            # A slot that joins while the spinner's is parked (the daemon parks it when
            # its 20 us window passes) takes the place; then it goes again and retries.
            for _ in range(100):
                raw = RawClient(d.path, P.Role.CONTEXT, features=P.Feature.SHM_SLOT)
                conn = max(d.server._slots.members, key=lambda c: c.serial)
                raw.send(P.DOORBELL_FRAME)
                try:
                    wait_until(lambda conn=conn: conn in d.server._waiting, timeout=0.5)
                    break
                except AssertionError:
                    raw.close()
                    raw = None
            assert raw is not None, "the rung slot never waited for a place"
            spinner.stdin.write("pause 50 300\n")
            spinner.stdin.flush()
            assert spinner.wait(timeout=60) == 0
            assert int(spinner.stdout.readline()) == 0  # never found its slot parked
        finally:
            if spinner.poll() is None:
                spinner.kill()
                spinner.wait()
            if raw is not None:
                raw.close()
        d.wait_for(idle(d.baseline))


def test_a_slot_whose_last_place_was_a_brief_visit_gets_a_freed_place_before_busier_ones():
    turns = _Turns(cap=1, turn_us=1000)  # one place: no extra one
    first = turns.slot(False)
    busy = [turns.slot(False) for _ in range(3)]
    brief = turns.slot(False)
    brief.brief = True  # its last place served a request or two
    for conn in busy + [brief]:
        turns._admit(conn)
    assert list(turns._waiting) == [brief, *busy]
    first.requests += 128  # a busy turn, over
    first.served_at = first.polled_at + 0.9e-3
    turns._take_turns(first.polled_at + 1.1e-3)
    assert list(turns._slots.polled) == [brief] and not first.brief
    assert list(turns._waiting) == busy  # (the busy one had no request: parked, not queued)
    brief.requests += 2
    turns._take_turns(brief.polled_at + 0.3e-3)  # quiet: 0.3 ms without a request
    assert list(turns._slots.polled) == [busy[0]] and brief.brief
    assert turns.metrics.slot_extra_places == 0


def _halved(turns: _Turns) -> list[Connection]:
    """Four slots polled at cap 4, ten waiting; their turns end (no request pending):
    two places under the halved bound.  The slots polled then."""
    polled = [turns.slot(False) for _ in range(4)]
    for conn in [turns.slot(False) for _ in range(10)]:
        turns._admit(conn)
    for conn in polled:
        conn.requests += 128
        conn.served_at = conn.polled_at + 0.9e-3
    turns._take_turns(polled[0].polled_at + 1.1e-3)
    assert len(turns._slots.polled) == 2 and len(turns._waiting) == 8
    return list(turns._slots.polled)


def test_the_extra_place_serves_the_brief_lane_one_slot_and_extra_turn_at_a_time():
    """Cap 4, halved to 2 while more than 4 wait: a brief slot that rings takes a third
    place at once, for EXTRA_TURN; a second one waits for that place, not for a turn."""
    turns = _Turns(cap=4, turn_us=1000)
    regular = _halved(turns)
    first, second = turns.slot(False), turns.slot(False)
    first.brief = second.brief = True
    turns._turn_at = first.polled_at + 1.0  # the loop's next look, a turn away
    turns._admit(first)
    assert first in turns._slots.polled and turns._guest is first and turns.metrics.slot_extra_places == 1
    assert turns._turn_at <= first.polled_at + EXTRA_TURN  # the loop looks again by the end of it
    turns._admit(second)
    assert second in turns._waiting and len(turns._slots.polled) == 3  # the extra place is taken
    first.requests += 2  # its request, and the close riding with the next
    now = first.polled_at + 0.5e-3
    first.served_at = now - 0.1e-3  # (within the quiet span of a 1 ms slot_turn_us: 0.25 ms)
    for conn in regular:
        conn.served_at = now - 0.05e-3  # busy, within their turns
    assert turns._take_turns(now) <= first.polled_at + EXTRA_TURN + 1e-9  # not yet; looked at by its end
    assert first in turns._slots.polled
    now = first.polled_at + EXTRA_TURN + 0.1e-3
    for conn in regular:
        conn.served_at = now - 0.05e-3
    turns._take_turns(now)  # the extra place's turn is over
    assert first not in turns._slots.polled and first.brief
    assert turns._guest is second and second in turns._slots.polled and len(turns._slots.polled) == 3
    assert turns.metrics.slot_extra_places == 2
    assert all(conn in turns._slots.polled for conn in regular)  # the regular places are untouched


def test_a_busy_client_in_the_extra_place_counts_as_busy_again_after_extra_turn():
    turns = _Turns(cap=4, turn_us=1000)
    regular = _halved(turns)
    slot = turns.slot(False)
    slot.brief = True  # it made a brief visit once (its client was slow to start its turn)
    turns._admit(slot)
    assert turns._guest is slot
    slot.requests += 40  # busy in the extra place
    now = slot.polled_at + EXTRA_TURN + 0.1e-3
    slot.served_at = now - 0.01e-3
    for conn in regular:
        conn.served_at = now - 0.05e-3
    turns._take_turns(now)
    assert slot not in turns._slots.polled and not slot.brief and turns._guest is None


def test_there_is_no_extra_place_while_the_bound_is_not_halved():
    turns = _Turns(cap=2, turn_us=1000)
    [turns.slot(False) for _ in range(2)]
    brief = turns.slot(False)
    brief.brief = True
    turns._admit(brief)
    assert brief in turns._waiting and len(turns._slots.polled) == 2
    assert turns.metrics.slot_extra_places == 0 and turns._guest is None


def test_a_place_freed_beside_the_extra_one_goes_to_a_waiting_slot():
    turns = _Turns(cap=4, turn_us=1000)
    regular = _halved(turns)
    guest = turns.slot(False)
    guest.brief = True
    turns._admit(guest)
    now = regular[0].polled_at + 5e-3  # the regular slots went quiet; the guest's request is recent
    guest.served_at = now - 0.05e-3
    guest.polled_at = now - 0.5e-3
    turns._take_turns(now)
    assert guest in turns._slots.polled and turns._guest is guest
    assert len(turns._slots.polled) == 3  # two regular places refilled beside it


def test_a_slot_dropped_in_the_extra_place_frees_it_for_the_next_brief_one():
    """The client in the extra place dies: the place goes to the next slot of the
    brief lane at the loop's next look."""
    turns = _Turns(cap=4, turn_us=1000)
    _halved(turns)
    guest, other = turns.slot(False), turns.slot(False)
    guest.brief = other.brief = True
    turns._admit(guest)
    turns._admit(other)
    assert turns._guest is guest and other in turns._waiting
    guest.slot = types.SimpleNamespace(close=lambda: None)  # what _drop_slot releases
    guest.words = memoryview(guest.words)
    turns._drop_slot(guest)
    assert turns._guest is None and guest not in turns._slots.polled
    turns._take_turns(guest.polled_at + 0.1e-3)
    assert turns._guest is other and other in turns._slots.polled


def test_a_new_slot_starts_parked_while_others_wait_even_with_a_place_free():
    """Reconnecting buys no place: a new slot queues behind the waiting ones."""
    turns = _Turns(cap=4, turn_us=1000)
    _halved(turns)  # 2 polled, 2 below the cap
    newcomer = turns.slot(False)
    assert newcomer not in turns._slots.polled and newcomer.words[S.W_DAEMON_SLEEPING] == 1
    turns._admit(newcomer)  # its client's first request rings
    assert list(turns._waiting)[-1] is newcomer
