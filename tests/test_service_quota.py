"""What ``poolsvc stat`` shows of a client's holdings against its quota.

The limits themselves (bytes, shms, sessions, refusals naming the setting)
are attacked in ``tests/test_service_hostile.py`` and ``tests/test_service.py``;
this file holds the figures that have no limit of their own: the RPC memory a
trusted app obtains during a client's calls (docs/security.md, "Limits").
"""
from __future__ import annotations

from poolsvc.service.client import connect
from poolsvc.tee.driver import Value
from poolsvc.tee.ta import StorageApp

from svcutil import DaemonThread

MiB = 1 << 20


def _quota(d: DaemonThread, name: str) -> dict:
    [entry] = [c for c in d.stats()["clients"] if c["name"] == name]
    return entry["quota"]


def test_rpc_memory_of_a_clients_sessions_is_shown_per_client_and_in_total(tmp_path):
    d = DaemonThread(tmp_path / "r.sock")
    try:
        with connect(d.path) as first, connect(d.path) as second:
            a = first.open_context("a")
            b = second.open_context("b")
            stores = [a.open_session(StorageApp.UUID, [Value(size * MiB)]) for size in (1, 2)]
            other = b.open_session(StorageApp.UUID, [Value(3 * MiB)])
            plain = b.open_session(StorageApp.UUID, [Value(4096)])
            assert _quota(d, "a")["rpc_bytes"] == 3 * MiB
            assert _quota(d, "b")["rpc_bytes"] == 3 * MiB + 4096
            assert d.stats()["resources"]["rpc_bytes"] == 6 * MiB + 4096
            stores[0].close()
            plain.close()
            assert _quota(d, "a")["rpc_bytes"] == 2 * MiB
            assert _quota(d, "b")["rpc_bytes"] == 3 * MiB
            other.close()
            stores[1].close()
            assert _quota(d, "a")["rpc_bytes"] == _quota(d, "b")["rpc_bytes"] == 0
            assert d.stats()["resources"]["rpc_bytes"] == 0
    finally:
        d.stop()


def test_rpc_memory_of_a_client_that_hangs_up_is_released(tmp_path):
    d = DaemonThread(tmp_path / "h.sock")
    try:
        client = connect(d.path)
        ctx = client.open_context("leaver")
        ctx.open_session(StorageApp.UUID, [Value(2 * MiB)])
        assert d.stats()["resources"]["rpc_bytes"] == 2 * MiB
        client.close()  # its sessions close with its context
        d.wait_for(lambda s: s["resources"]["rpc_bytes"] == 0
                   and not any(c["role"] == "CONTEXT" for c in s["clients"]))
    finally:
        d.stop()
