"""The daemon's STATS document as text for people and for Prometheus.

:func:`text` is what ``poolsvc stat`` prints; :func:`prometheus` is the
Prometheus text exposition format (version 0.0.4): one ``# HELP`` and
``# TYPE`` line per metric family, labels for pool, client and request type.

Concurrency: pure functions.
"""
from __future__ import annotations

from typing import Any


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def text(doc: dict[str, Any]) -> str:
    """A readable report of a STATS document."""
    d = doc["daemon"]
    versions = "/".join(map(str, d.get("protocol_versions", [d["protocol"]])))
    lines = [f"poolsvc daemon pid {d['pid']} on {d['socket']} (protocol {versions}, "
             f"{d['backend']}, pool {d['pool']}), {d['clients']} connection(s)"]
    if "connections" in d:
        counts = d["connections"]
        lines.append("  " + ", ".join(f"{n} {kind}" for kind, n in counts.items())
                     + f"; {'dumpable' if d.get('dumpable') else 'not dumpable'}")
    if "slots" in d:
        slots = d["slots"]
        lines.append(f"  shm slots: {slots['served']} served, {slots['polled']} polled, "
                     f"{slots['waiting']} waiting for a turn ({slots['waiting_brief']} after a brief visit)")
    lines += ["", "pools:"]
    for name, pool in doc["pools"].items():
        lines.append(f"  {name:8} free {_mib(pool['free_bytes']):>11}  used {_mib(pool['used_bytes']):>11}"
                     f"  largest free {_mib(pool['largest_free_bytes']):>11}"
                     f"  fragmentation {pool['fragmentation']:.3f}")
    lines.append(f"  ids {doc['ids']}, registered cookies {doc['registered_cookies']}, "
                 f"contexts {doc['contexts']}")
    lines += ["", "clients:"]
    header = (f"  {'client':32} {'pid':>7} {'uid':>6} {'gid':>6} {'shms':>6} {'ids':>5} {'frames':>8} "
              f"{'bytes':>12} {'sess':>5} {'requests':>9}  {'transport':9}  pinned / quota")
    lines.append(header)
    for c in doc["clients"]:
        label = c.get("context") or f"{c['name'] or '-'} ({c['role'].lower()})"
        quota = c.get("quota")
        pinned = "-"
        if quota is not None:
            limit = _mib(quota["max_bytes"]) if quota["max_bytes"] else "unbounded"
            pinned = (f"{_mib(quota.get('process_pinned_bytes', quota['pinned_bytes']))} / {limit}, sessions "
                      f"{quota['sessions']} / {quota['max_sessions']}")
        lines.append(f"  {label[:32]:32} {c['pid']:>7} {c['uid']:>6} {c.get('gid', -1):>6} "
                     f"{c.get('shms', 0):>6} {c.get('ids', 0):>5} "
                     f"{c.get('frames', 0):>8} {c.get('bytes', 0):>12} {c.get('sessions', 0):>5} "
                     f"{c['requests']:>9}  {c.get('transport', '-'):9}  {pinned}")
    req = doc["requests"]
    lines += ["", f"requests: uptime {req['uptime_s']:.0f} s, {req['connections']} connections, "
                  f"{req['crashes']} ended without GOODBYE, {req['refused']} refused, "
                  f"{req['protocol_errors']} protocol violations, {req['slot_turns']} slot turns ended, "
                  f"{req['slot_extra_places']} extra places"]
    lines.append(f"  {'type':14} {'count':>10} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'p99.9 us':>9} "
                 f"{'max us':>10}")
    for name, lat in req["latency"].items():
        lines.append(f"  {name:14} {req['ops'].get(name, lat['count']):>10} {lat.get('p50_us', 0):>9.1f} "
                     f"{lat.get('p90_us', 0):>9.1f} {lat.get('p99_us', 0):>9.1f} {lat.get('p999_us', 0):>9.1f} "
                     f"{lat.get('max_us', 0):>10.1f}")
    if req["errors"]:
        lines.append("  errors: " + ", ".join(f"{k} {v}" for k, v in req["errors"].items()))
    r = doc["resources"]
    lines += ["", f"resources: {r['storage_objects']} storage objects, {r['open_fds']} open fds, "
                  f"{r['registered_mappings']} mappings of registered objects"]
    return "\n".join(lines) + "\n"


#: The STATS latency keys (:meth:`poolsvc.histogram.Histogram.summary_us`) and
#: the Prometheus quantile label of each.
_QUANTILES = (("p50_us", "0.5"), ("p90_us", "0.9"), ("p99_us", "0.99"), ("p999_us", "0.999"))


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(doc: dict[str, Any]) -> str:
    """The STATS document in Prometheus text format."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        out.append(f"# HELP poolsvc_{name} {help_text}")
        out.append(f"# TYPE poolsvc_{name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"poolsvc_{name}{{{label}}} {value}" if label else f"poolsvc_{name} {value}")

    pools = doc["pools"]
    family("pool_free_bytes", "gauge", "Free bytes per pool.",
           [({"pool": p}, v["free_bytes"]) for p, v in pools.items()])
    family("pool_used_bytes", "gauge", "Used bytes per pool.",
           [({"pool": p}, v["used_bytes"]) for p, v in pools.items()])
    family("pool_largest_free_bytes", "gauge", "Largest free contiguous run per pool.",
           [({"pool": p}, v["largest_free_bytes"]) for p, v in pools.items()])
    family("pool_fragmentation", "gauge", "1 - largest free run / free bytes, per pool.",
           [({"pool": p}, v["fragmentation"]) for p, v in pools.items()])
    family("ids", "gauge", "Shm ids in use.", [({}, doc["ids"])])
    family("contexts", "gauge", "Contexts open in the System.", [({}, doc["contexts"])])
    ctx_clients = [c for c in doc["clients"] if "context" in c]
    for key, help_text in (("shms", "Live shms per client."), ("bytes", "Shm bytes per client."),
                           ("frames", "Dynamic frames per client."), ("ids", "Ids per client."),
                           ("sessions", "Open sessions per client.")):
        family(f"client_{key}", "gauge", help_text,
               [({"client": c["context"], "pid": c["pid"]}, c[key]) for c in ctx_clients])
    quota_clients = [c for c in ctx_clients if "quota" in c]
    family("client_pinned_bytes", "gauge", "Bytes a client pins: allocated plus registered.",
           [({"client": c["context"], "pid": c["pid"], "uid": c["uid"]}, c["quota"]["pinned_bytes"])
            for c in quota_clients])
    family("client_quota_bytes", "gauge", "Bytes a client may pin (0: unbounded).",
           [({"client": c["context"], "pid": c["pid"], "uid": c["uid"]}, c["quota"]["max_bytes"])
            for c in quota_clients])
    req = doc["requests"]
    family("requests_total", "counter", "Requests served, per message type.",
           [({"type": t}, n) for t, n in req["ops"].items()])
    family("errors_total", "counter", "Error replies, per error code.",
           [({"code": c}, n) for c, n in req["errors"].items()])
    family("connections_total", "counter", "Connections accepted.", [({}, req["connections"])])
    family("crashes_total", "counter", "Context connections that ended without GOODBYE.",
           [({}, req["crashes"])])
    family("protocol_errors_total", "counter", "Clients disconnected for malformed traffic.",
           [({}, req["protocol_errors"])])
    if "slots" in doc["daemon"]:
        family("shm_slots", "gauge", "Shm slots served, polled and waiting for a turn.",
               [({"state": k}, v) for k, v in doc["daemon"]["slots"].items()])
    family("slot_turns_total", "counter", "Polled shm slots parked to give waiting ones their turn.",
           [({}, req["slot_turns"])])
    family("slot_extra_places_total", "counter", "Shm slots of the brief lane polled in the extra place.",
           [({}, req["slot_extra_places"])])
    samples = []
    for t, lat in req["latency"].items():
        for key, quantile in _QUANTILES:
            if key in lat:
                samples.append(({"type": t, "quantile": quantile}, lat[key] / 1e6))
    family("request_latency_seconds", "summary",
           "Daemon-side time per request by message type: quantiles over the recent window, "
           "sum and count since start.", samples)
    for t, lat in req["latency"].items():
        if "sum_us" in lat:
            out.append(f'poolsvc_request_latency_seconds_sum{{type="{_label(t)}"}} {lat["sum_us"] / 1e6}')
            out.append(f'poolsvc_request_latency_seconds_count{{type="{_label(t)}"}} {lat["count"]}')
    res = doc["resources"]
    family("storage_objects", "gauge", "Open POSIX shm storage objects in the daemon.",
           [({}, res["storage_objects"])])
    family("open_fds", "gauge", "Open file descriptors in the daemon.", [({}, res["open_fds"])])
    return "\n".join(out) + "\n"
