"""The pool service's settings: plain data, validated field by field.

:class:`ServiceSettings` holds what the daemon needs beyond the System's
:class:`~poolsvc.config.Config`: where the socket lives and who may open it,
and the bounds that keep one client from taking the daemon's memory.  Every
bad field gives one :class:`~poolsvc.errors.ConfigError` naming the field and
its value.

A config file for ``poolsvc serve --config FILE`` is TOML: the System's keys
(flat, or under ``[poolsvc]``) and the service's keys under ``[service]``::

    dynamic_size = "256MiB"
    arena_step = "4MiB"

    [service]
    socket_path = "/run/poolsvc/poolsvc.sock"
    socket_group = "tee"
    max_clients = 64

Concurrency: immutable values; safe to share.
"""
from __future__ import annotations

import dataclasses
import grp
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, parse_size
from ..errors import ConfigError
from .protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_FRAME, HEADER_SIZE

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def default_runtime_dir() -> str:
    """The directory ``poolsvc serve`` creates (mode 0700) for the default socket when
    neither ``$POOLSVC_SOCKET`` nor ``$XDG_RUNTIME_DIR`` names one."""
    return f"/tmp/poolsvc-{os.getuid()}"


def default_socket_path() -> str:
    """``$POOLSVC_SOCKET``, else ``$XDG_RUNTIME_DIR/poolsvc.sock``, else
    ``/tmp/poolsvc-{uid}/poolsvc.sock``."""
    env = os.environ.get("POOLSVC_SOCKET")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "poolsvc.sock")
    return os.path.join(default_runtime_dir(), "poolsvc.sock")


@dataclass(frozen=True)
class ServiceSettings:
    """Socket, access and per-client bounds of ``poolsvc serve``."""

    #: Path of the listening Unix socket.
    socket_path: str = dataclasses.field(default_factory=default_socket_path)
    #: Permission bits of the socket; None gives 0600, or 0660 with a group.
    socket_mode: int | None = None
    #: Group (name or gid) given access to the socket; None keeps the daemon's.
    socket_group: str | int | None = None
    #: CONTEXT connections served at once; a HELLO beyond them is refused.
    max_clients: int = 1024
    #: MONITOR connections served at once (counted apart from clients: every
    #: ``connect()`` holds one, ``poolsvc stat`` opens one).
    max_monitors: int = 1024
    #: Connections that have not yet said HELLO; a new one beyond evicts the oldest.
    max_pending: int = 16
    #: Connections one peer uid may hold at once, in any role (0: no bound but the
    #: others).  For daemons shared by several users: one user cannot take every
    #: client or monitor place.
    max_connections_per_uid: int = 0
    #: If set, only peers whose uid is listed may connect (SO_PEERCRED).
    allowed_uids: tuple[int, ...] | None = None
    #: If set, only peers whose gid is listed may connect (SO_PEERCRED).
    allowed_gids: tuple[int, ...] | None = None
    #: Largest request body, in bytes (announced in WELCOME).
    max_frame: int = DEFAULT_MAX_FRAME
    #: Most requests in one BATCH.
    max_batch: int = DEFAULT_MAX_BATCH
    #: Unread reply bytes after which the daemon stops reading a client.
    max_output: int = 8 << 20
    #: Live shms one client may hold.
    max_shms_per_client: int = 65536
    #: Bytes one client may pin: pool memory it allocated plus the pages it
    #: registered.  None: ``client_share`` of the pool; 0: no bound but the pool's.
    max_bytes_per_client: int | None = None
    #: The share of the pool one client may pin when ``max_bytes_per_client`` is None.
    client_share: float = 0.5
    #: Sessions with trusted apps one client may hold open.
    max_sessions_per_client: int = 64
    #: Seconds a new connection has to send HELLO.
    handshake_timeout: float = 2.0
    #: The longest TEE_Wait (ms) a trusted app may make during a client's call: the
    #: app runs on the loop's thread, so a wait stalls every client.  A longer
    #: wait fails the call with TEE_ERROR_BUSY naming this limit.
    max_ta_wait_ms: int = 0
    #: Requests of a socket BATCH run before the loop serves other clients again.
    batch_slice: int = 64
    #: Microseconds a slice of a socket BATCH may run before the loop serves other
    #: clients again, whatever its count (0: the count alone bounds a slice).
    batch_slice_us: int = 500
    #: Latency samples kept per message type for percentiles.
    latency_window: int = 4096
    #: ``logging`` level name.
    log_level: str = "INFO"
    #: Microseconds the loop keeps polling (not sleeping) after traffic; 0 sleeps at once.
    #: Off by default: on the 2-core test machine polling saved nothing (a
    #: sleeping peer woke in ~10 us) and polling on both sides cost 5x.
    spin_us: int = 0
    #: Offer a shared-memory request/reply slot to clients that ask for one
    #: (protocol version 2, ``connect(..., transport="shm")``).
    shm_slots: bool = True
    #: Longest time, in microseconds, the loop polls the slots of shm clients
    #: after serving one before it sleeps in epoll (adaptive below that: it
    #: halves after a poll that found nothing and doubles after one that did).
    shm_spin_us: int = 100
    #: Shm slots the loop polls at once; a ring beyond them waits its turn
    #: (:mod:`.slotserve`, "Turns").  None: 4 per CPU the daemon may run on;
    #: 0: every slot with a request is polled.
    max_polled_slots: int | None = None
    #: Microseconds a polled slot keeps its place while other slots wait for one.
    slot_turn_us: int = 24_000
    #: Requests a polled slot may make in its turn before the turn ends at
    #: ``slot_turn_us`` (0: time alone), up to 4 times as long (:mod:`.slotserve`).
    slot_turn_requests: int = 4096
    #: Microseconds a round of turns should last (every waiting slot served once):
    #: while so many wait that it would last longer, turns are shorter, down to
    #: 1 ms (0: no bound; :mod:`.slotserve`).
    slot_round_us: int = 6_000_000

    def __post_init__(self) -> None:
        self.validate()

    @property
    def mode(self) -> int:
        """The socket's effective permission bits."""
        if self.socket_mode is not None:
            return self.socket_mode
        return 0o660 if self.socket_group is not None else 0o600

    def gid(self) -> int | None:
        """The socket group's gid, or None (ConfigError for an unknown group)."""
        group = self.socket_group
        if group is None or isinstance(group, int):
            return group
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group: no group named {group!r}") from None

    def bytes_quota(self, pool_bytes: int) -> int:
        """Bytes one client may pin in a pool of ``pool_bytes`` (0: no bound)."""
        if self.max_bytes_per_client is not None:
            return self.max_bytes_per_client
        return max(4096, int(pool_bytes * self.client_share) // 4096 * 4096)

    def polled_slots(self) -> int:
        """The most shm slots the loop polls at once (0: no bound)."""
        if self.max_polled_slots is not None:
            return self.max_polled_slots
        return 4 * len(os.sched_getaffinity(0))

    def validate(self) -> None:
        """Raise ConfigError for the first invalid field."""
        if not isinstance(self.socket_path, str) or not self.socket_path:
            raise ConfigError(f"socket_path: expected a non-empty path, got {self.socket_path!r}")
        if len(os.fsencode(self.socket_path)) > 107:
            raise ConfigError(f"socket_path: {self.socket_path!r} is longer than the 107 bytes "
                              "a Unix socket address holds")
        if self.socket_mode is not None and (isinstance(self.socket_mode, bool) or not isinstance(
                self.socket_mode, int) or not 0 <= self.socket_mode <= 0o777):
            raise ConfigError(f"socket_mode: {self.socket_mode!r} is not permission bits in 0..0o777")
        if self.socket_mode is not None and self.socket_mode & 0o007:
            raise ConfigError(f"socket_mode: {self.socket_mode:#o} gives access to every user; "
                              "use socket_group instead")
        group = self.socket_group
        if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))
                                  or (isinstance(group, int) and group < 0)):
            raise ConfigError(f"socket_group: expected a group name or gid, got {group!r}")
        for name in ("allowed_uids", "allowed_gids"):
            ids = getattr(self, name)
            if ids is not None and (not isinstance(ids, tuple) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 32 for i in ids)):
                raise ConfigError(f"{name}: expected a list of ids, got {ids!r}")
        share = self.client_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"client_share: {share!r} is not a fraction in (0, 1]")
        bounds = {
            "max_clients": (1, 65536),
            "max_monitors": (1, 65536),
            "max_pending": (1, 65536),
            "max_connections_per_uid": (0, 1 << 20),
            "max_sessions_per_client": (1, 65536),
            "batch_slice": (1, 1 << 20),
            "batch_slice_us": (0, 1_000_000),
            "max_ta_wait_ms": (0, 60_000),
            "max_frame": (HEADER_SIZE * 16, 1 << 30),
            "max_batch": (1, 1 << 20),
            "max_output": (64 << 10, 1 << 34),
            "max_shms_per_client": (1, 1 << 24),
            "max_bytes_per_client": (0, 1 << 48),
            "latency_window": (16, 1 << 20),
            "spin_us": (0, 1_000_000),
            "shm_spin_us": (0, 1_000_000),
            "max_polled_slots": (0, 1 << 20),
            "slot_turn_us": (10, 10_000_000),
            "slot_turn_requests": (0, 1 << 20),
            "slot_round_us": (0, 600_000_000),
        }
        if not isinstance(self.shm_slots, bool):
            raise ConfigError(f"shm_slots: expected true or false, got {self.shm_slots!r}")
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if value is None and name in ("max_bytes_per_client", "max_polled_slots"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{name}: {value} is outside {low}..{high}")
        timeout = self.handshake_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ConfigError(f"handshake_timeout: {timeout!r} is not a number of seconds in (0, 3600]")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ServiceSettings":
        """Settings from a mapping of field names to values (sizes may be strings)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"service.{key}: unknown setting")
            if key in ("max_frame", "max_output", "max_bytes_per_client"):
                value = parse_size(value, key)
            if key == "socket_mode" and isinstance(value, str):
                try:
                    value = int(value, 8)
                except ValueError:
                    raise ConfigError(f"socket_mode: {value!r} is not an octal mode") from None
            if key in ("allowed_uids", "allowed_gids") and isinstance(value, list):
                value = tuple(value)
            if key == "log_level" and isinstance(value, str):
                value = value.upper()
            kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "ServiceSettings":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def load(path: str | Path) -> tuple[Config, ServiceSettings]:
    """The System config and service settings of a TOML file.

    The ``[service]`` table holds the service's settings; everything else
    (flat, or one ``[poolsvc]`` table) is the System's Config.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: not valid TOML: {exc}") from exc
    service = data.pop("service", {})
    if not isinstance(service, dict):
        raise ConfigError(f"service: expected a table, got {service!r}")
    if "poolsvc" in data and isinstance(data["poolsvc"], dict):
        nested = data.pop("poolsvc")
        if data:
            raise ConfigError(f"{next(iter(data))}: keys outside [poolsvc] and [service]")
        data = nested
    return Config.from_dict(data), ServiceSettings.from_dict(service)
