"""What ``poolsvc stat`` shows of a client's holdings against its quota.

The limits themselves (bytes, shms, sessions, refusals naming the setting)
are attacked in ``tests/test_service_hostile.py`` and ``tests/test_service.py``;
this file holds the RPC memory a trusted app obtains during a client's calls:
shown per client and in total, and counted against the client's byte quota
(docs/security.md, "Limits").
"""
from __future__ import annotations

import pytest

from poolsvc.errors import TEE_ERROR_OUT_OF_MEMORY, OutOfMemory, TeeError
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


def test_rpc_memory_counts_against_the_byte_quota(tmp_path):
    d = DaemonThread(tmp_path / "q.sock", max_bytes_per_client=4 * MiB)
    try:
        with connect(d.path) as client:
            ctx = client.open_context("greedy")
            store = ctx.open_session(StorageApp.UUID, [Value(3 * MiB)])
            assert _quota(d, "greedy")["rpc_bytes"] == 3 * MiB
            assert _quota(d, "greedy")["process_pinned_bytes"] == 3 * MiB
            with pytest.raises(OutOfMemory, match=r"3145728 RPC.*max_bytes_per_client"):
                ctx.alloc_user_buf(2 * MiB)
            with pytest.raises(TeeError) as refused:  # the app's RPC SHM_ALLOC is refused
                ctx.open_session(StorageApp.UUID, [Value(2 * MiB)])
            assert refused.value.code == TEE_ERROR_OUT_OF_MEMORY
            assert d.stats()["resources"]["rpc_bytes"] == 3 * MiB
            shm = ctx.alloc_user_buf(MiB)  # what is left of the quota
            assert _quota(d, "greedy")["process_pinned_bytes"] == 4 * MiB
            store.close()
            again = ctx.open_session(StorageApp.UUID, [Value(2 * MiB)])
            assert _quota(d, "greedy")["rpc_bytes"] == 2 * MiB
            again.close()
            shm.close()
    finally:
        d.stop()
