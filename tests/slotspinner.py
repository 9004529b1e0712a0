"""A shm-slot client that never pauses, run as a process of its own:
``python tests/slotspinner.py SOCKET``.

It publishes its next PING as soon as it sees the reply to the last one (and
rings with a DOORBELL frame when the slot is parked), so that the daemon
finds a request in its slot at almost any instant.  It prints ``ready`` once
its first reply came, and stops when a line arrives on stdin: it prints how
many replies it had, and exits with status 0, or 3 if its last request was
still unanswered after 10 s (a request the daemon lost).
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


def main(path: str) -> int:
    raw = RawClient(path, P.Role.CONTEXT, features=P.Feature.SHM_SLOT)
    mm = mmap.mmap(raw.fds[0], S.SLOT_BYTES)
    words = S.words_of(mm)
    ping = P.frame(P.MsgType.PING, b"spin")
    mm[S.SLOT_REQ_OFF:S.SLOT_REQ_OFF + len(ping)] = ping
    words[S.W_REQ_LEN] = len(ping)
    stdin = sys.stdin.fileno()
    seq = 0
    stop_at = None
    while True:
        seq += 1
        words[S.W_REQ_SEQ] = seq
        S.fence()
        if words[S.W_DAEMON_SLEEPING]:
            raw.send(P.DOORBELL_FRAME)
        polls = 0
        while words[S.W_REP_SEQ] != seq:
            polls += 1
            if polls & 4095 == 0:
                if stop_at is None and select.select([stdin], [], [], 0)[0]:
                    stop_at = time.monotonic() + 10
                if stop_at is not None and time.monotonic() > stop_at:
                    print(seq - 1, flush=True)
                    return 3
        if seq == 1:
            print("ready", flush=True)
        if stop_at is None and seq & 255 == 0 and select.select([stdin], [], [], 0)[0]:
            print(seq, flush=True)
            return 0
        if stop_at is not None:
            print(seq, flush=True)
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
