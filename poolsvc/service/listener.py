"""The daemon's listening socket and the lock that makes it one daemon's.

The socket's directory must exist, except the default runtime directory
(:func:`~.settings.default_runtime_dir`), which is made with mode 0700 and
refused if another user owns it or it is open to others.

:class:`Listener` takes ``{socket_path}.lock`` (``flock``, non-blocking: a
second daemon on the same path fails at once), removes a socket a crashed
predecessor left (only a socket: anything else at the path is refused),
binds with the configured mode and group, and on :meth:`Listener.close`
removes the socket only if it is still the one it bound, then the lock.

Concurrency: used by the daemon's loop thread (opened in ``Server.start``,
closed in ``Server.close``).
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat

from ..errors import ConfigError, PoolsvcError
from .settings import ServiceSettings, default_runtime_dir

log = logging.getLogger("poolsvc.service")


class Listener:
    """The bound, listening Unix socket of one daemon, and its lock file."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.path = settings.socket_path
        self.sock: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._lock_fd = -1

    @property
    def backlog(self) -> int:
        """The listen backlog: room for every client and monitor connecting at once."""
        return max(128, self.settings.max_clients + self.settings.max_monitors)

    def open(self) -> socket.socket:
        """Take the lock, remove a crashed predecessor's socket, bind and listen (non-blocking)."""
        self._take_lock()
        try:
            self._bind()
        except BaseException:
            self._release_lock()
            raise
        assert self.sock is not None
        return self.sock

    def close(self) -> None:
        """Close the socket, remove it if it is still ours, release the lock. Idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self._remove_socket()
        self._release_lock()

    def _take_lock(self) -> None:
        path = self.path
        self._check_directory()
        lock_path = path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PoolsvcError(f"another poolsvc daemon serves {path} (its lock {lock_path} is held)") from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def _check_directory(self) -> None:
        """The socket's directory must exist; only the default runtime directory is
        made (0700), and it must then be this user's and closed to others."""
        directory = os.path.dirname(os.path.abspath(self.path))
        if directory != default_runtime_dir():
            if not os.path.isdir(directory):
                raise ConfigError(f"socket_path: {self.path}: directory {directory} does not exist")
            return
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigError(f"socket_path: runtime directory {directory} is not a directory owned by "
                              f"uid {os.getuid()} with mode 0700 (mode {info.st_mode:#o}, uid "
                              f"{info.st_uid}); refusing to serve from it")

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            try:
                os.unlink(self.path + ".lock")
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _bind(self) -> None:
        path = self.path
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        if info is not None:
            if not stat.S_ISSOCK(info.st_mode):
                kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a regular file" \
                    if stat.S_ISREG(info.st_mode) else f"file mode {info.st_mode:#o}"
                raise ConfigError(f"socket_path: {path} is not a socket ({kind}); refusing to "
                                  "remove it")
            # We hold the lock, so no live daemon owns it: a crashed predecessor left it.
            log.warning("removing %s, left by a daemon that did not shut down", path)
            os.unlink(path)
        gid = self.settings.gid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600 from the start; widened to the configured mode below
        try:
            sock.bind(path)
            # At once: a client may connect as soon as the file exists.  The backlog
            # holds a burst of every client and monitor connecting together (the
            # kernel caps it at net.core.somaxconn).
            sock.listen(self.backlog)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        try:
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, self.settings.mode)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            os.unlink(path)
            raise
        info = os.stat(path)
        self._socket_id = (info.st_dev, info.st_ino)
        self.sock = sock

    def _remove_socket(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._socket_id:
            os.unlink(self.path)


__all__ = ["Listener"]
