"""A shm-slot client run as a process of its own: ``python tests/slotspinner.py SOCKET``.

It publishes its next PING as soon as it sees the reply to the last one (and
rings with a DOORBELL frame when the slot is parked), so that the daemon
finds a request in its slot at almost any instant and its slot stays polled.
It prints ``ready`` once its first reply came, then reads one command line on
stdin:

- ``stop``: it prints how many replies it had and exits with status 0, or 3
  if its last request was still unanswered after 10 s (a request the daemon
  lost);
- ``pause N US``: it makes N more requests, each after a pause of US
  microseconds (busy, not asleep), prints how many of them found the slot
  parked before publishing, and exits as for ``stop``.
"""
from __future__ import annotations

import mmap
import os
import select
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from poolsvc.service import protocol as P  # noqa: E402
from poolsvc.service import slot as S  # noqa: E402

from svcutil import RawClient  # noqa: E402

LOST = 3


class Spinner:
    def __init__(self, path: str) -> None:
        self.raw = RawClient(path, P.Role.CONTEXT, features=P.Feature.SHM_SLOT)
        self.mm = mmap.mmap(self.raw.fds[0], S.SLOT_BYTES)
        self.words = S.words_of(self.mm)
        ping = P.frame(P.MsgType.PING, b"spin")
        self.mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(ping)] = ping
        self.words[S.W_REQ_LEN] = len(ping)
        self.seq = 0

    def request(self, deadline: float | None = None) -> bool:
        """Publish the next request (ring if parked) and poll for its reply; False if
        ``deadline`` (monotonic) passed first, or, without one, a command came."""
        words = self.words
        self.seq += 1
        words[S.W_REQ_SEQ] = self.seq
        S.fence()
        if words[S.W_DAEMON_SLEEPING]:
            self.raw.send(P.DOORBELL_FRAME)
        polls = 0
        while words[S.W_REP_SEQ] != self.seq:
            polls += 1
            if polls & 4095 == 0 and deadline is not None and time.monotonic() > deadline:
                return False
        return True


def _command_waiting() -> bool:
    return bool(select.select([sys.stdin], [], [], 0)[0])


def main(path: str) -> int:
    spinner = Spinner(path)
    spinner.request(time.monotonic() + 10)
    print("ready", flush=True)
    while spinner.seq & 255 or not _command_waiting():
        if not spinner.request(time.monotonic() + 10):
            print(spinner.seq - 1, flush=True)
            return LOST
    command = sys.stdin.readline().split()
    if command[0] == "pause":
        count, pause = int(command[1]), float(command[2]) * 1e-6
        parked = 0
        for _ in range(count):
            end = time.perf_counter() + pause
            while time.perf_counter() < end:
                pass
            parked += spinner.words[S.W_DAEMON_SLEEPING] != 0
            if not spinner.request(time.monotonic() + 10):
                print(parked, flush=True)
                return LOST
        print(parked, flush=True)
        return 0
    print(spinner.seq, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
