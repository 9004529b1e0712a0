"""The queue of parked shm slots waiting for a polled place (``WaitQueue``,
poolsvc/service/connection.py): a lane for slots whose last place was a brief
visit and one for the others, first come first served in each, places to the
two lanes in turn while both hold slots.

The state machine checks the queue against what it promises, not against a
copy of its code: each lane keeps its order; a slot k-th in its lane when it
queues gets a place within 2k regular pops (the other lane cannot take more than every
other place); iteration lists the slots in the order the next pops take them;
``pop_brief`` takes the head of the brief lane, outside the turn of the lanes.  Planted
bugs it catches: ``pop`` always preferring the brief lane (the bound fails for a
full-lane slot), iteration listing the brief lane first whatever the turn, and
``add`` moving a queued slot to the back.
"""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from poolsvc.service.connection import BRIEF_REQUESTS, WaitQueue


class _Slot:
    """What the queue reads of a connection."""

    def __init__(self, name: int, brief: bool) -> None:
        self.name = name
        self.brief = brief
        self.requests = self.turn_from = 0

    def __repr__(self) -> str:
        return f"slot{self.name}(brief={self.brief})"


class WaitQueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.queue = WaitQueue()
        self.lanes: dict[bool, list[_Slot]] = {True: [], False: []}  # brief lane?, in queueing order
        #: slot -> regular pops made when it queued, and its position in its lane then (1-based)
        self.queued: dict[_Slot, tuple[int, int]] = {}
        self.pops = 0
        self.made = 0

    def _new(self, brief: bool) -> _Slot:
        self.made += 1
        return _Slot(self.made, brief)

    @rule(brief=st.booleans())
    def add(self, brief: bool) -> None:
        slot = self._new(brief)
        self.queue.add(slot)  # type: ignore[arg-type]
        lane = self.lanes[brief]
        lane.append(slot)
        self.queued[slot] = (self.pops, len(lane))

    @precondition(lambda self: self.queued)
    @rule(data=st.data())
    def add_again(self, data: st.DataObject) -> None:
        """A queued slot whose client rings again keeps its position."""
        slot = data.draw(st.sampled_from(sorted(self.queued, key=lambda s: s.name)))
        self.queue.add(slot)  # type: ignore[arg-type]

    @precondition(lambda self: self.queued)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.queued, key=lambda s: s.name)))
        self.queue.discard(slot)  # type: ignore[arg-type]
        self.lanes[slot.brief].remove(slot)
        del self.queued[slot]

    @rule()
    def discard_absent(self) -> None:
        self.queue.discard(self._new(False))  # type: ignore[arg-type]

    @precondition(lambda self: self.queued)
    @rule()
    def pop(self) -> None:
        expected = list(self.queue)[0]
        slot = self.queue.pop()
        assert slot is expected
        self._took(slot, regular=True)

    @rule()
    def pop_brief(self) -> None:
        head = self.lanes[True][0] if self.lanes[True] else None
        slot = self.queue.pop_brief()
        assert slot is head
        if slot is not None:
            self._took(slot, regular=False)

    @precondition(lambda self: self.queued)
    @rule()
    def drain(self) -> None:
        """Iteration gives the order of the next pops."""
        listed = list(self.queue)
        taken = []
        while self.queued:
            slot = self.queue.pop()
            self._took(slot, regular=True)
            taken.append(slot)
        assert taken == listed

    def _took(self, slot: _Slot, regular: bool) -> None:
        """``slot`` got a place: a freed one (``regular``, counted for the bound) or the
        extra one (``pop_brief``, outside the turn of the lanes)."""
        self.pops += regular
        lane = self.lanes[slot.brief]
        assert lane and lane[0] is slot, f"{slot} taken ahead of {lane[:1]} in its lane"
        lane.pop(0)
        queued_at, position = self.queued.pop(slot)
        assert self.pops - queued_at <= 2 * position, \
            f"{slot}, {position}-th in its lane, waited {self.pops - queued_at} pops"

    @invariant()
    def sizes_and_members_agree(self) -> None:
        assert len(self.queue) == len(self.queued)
        assert bool(self.queue) == bool(self.queued)
        assert sorted(s.name for s in self.queue) == sorted(s.name for s in self.queued)  # type: ignore[attr-defined]
        for slot in self.queued:
            assert slot in self.queue
        assert list(self.queue.brief) == self.lanes[True] and list(self.queue.full) == self.lanes[False]


TestWaitQueue = WaitQueueMachine.TestCase
TestWaitQueue.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def test_a_visit_of_few_requests_counts_as_brief_and_a_busy_one_does_not():
    slot = _Slot(1, False)
    for requests, brief in ((BRIEF_REQUESTS, True), (0, True), (BRIEF_REQUESTS + 1, False), (1, True)):
        slot.turn_from = slot.requests
        slot.requests += requests
        WaitQueue.note_visit(slot)  # type: ignore[arg-type]
        assert slot.brief is brief


def test_a_new_slot_queues_in_the_full_lane():
    queue = WaitQueue()
    slot = _Slot(1, False)
    queue.add(slot)  # type: ignore[arg-type]
    assert list(queue.full) == [slot] and not queue.brief
