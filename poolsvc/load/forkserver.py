"""The fork server of a load run: worker processes forked from one that imported poolsvc already.

A worker started as a fresh interpreter imports poolsvc (and numpy, and its
compiled core) itself: with hundreds of clients, and every restart after a
SIGKILL, the run's start-up is then mostly imports.  :class:`ForkServer`
starts one process (``python -m poolsvc.load.forkserver FD``) that imports
everything a worker needs, opens no connection and starts no thread, and
then forks each worker on request.  A forked worker is a fresh client
process as far as the client library is concerned: the server never
connected, so there is nothing to inherit (the fork checks of the client
library never come into play).

Protocol over the control socket (a ``socketpair``): the runner sends one
message per worker, the worker's spec as JSON, with four descriptors
(``SCM_RIGHTS``): its stdin, stdout, stderr, and the write end of a status
pipe.  The server forks; the child puts the first three on 0, 1, 2, closes
every other descriptor and runs :func:`poolsvc.load.worker.main`.  The server
answers the child's pid (decimal, newline-terminated), reaps it when it
ends, and writes its exit status (``subprocess`` convention: ``-N`` for
signal N) to the status pipe, then closes it.  EOF on the control socket
ends the server once every child it forked has been reaped.

:class:`Forked` is the runner's handle on one worker, with the part of
``subprocess.Popen``'s interface the runner uses (``pid``, ``stdin``,
``stdout``, ``poll``, ``wait``, ``send_signal``, ``kill``, ``returncode``).
A signal is only sent while the status pipe says the worker was not reaped,
so a recycled pid is never signalled; the status pipe (``status_fd``) may be
watched with a selector, like stdout.

Concurrency: the server is single-threaded (its children must be forked from
a process without threads); the runner's handles are used by its one thread.
"""
from __future__ import annotations

import gc
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import IO

#: Bytes of one request's JSON at most (a worker's spec is far smaller).
MAX_REQUEST = 1 << 16


class Forked:
    """A worker forked by the :class:`ForkServer`: a ``subprocess.Popen`` look-alike."""

    def __init__(self, pid: int, stdin: IO[bytes] | None, stdout: IO[bytes], status_fd: int) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        #: The read end of the status pipe (readable once the worker was reaped).
        self.status_fd = status_fd
        self._status = b""

    def _collect(self, timeout: float | None) -> None:
        if self.returncode is not None or self.status_fd < 0:
            return
        waiter = select.poll()  # (select.select stops at descriptor 1023)
        waiter.register(self.status_fd, select.POLLIN)
        if not waiter.poll(None if timeout is None else 1000 * timeout):
            return
        data = os.read(self.status_fd, 64)
        self._status += data
        if data:
            if not self._status.endswith(b"\n"):
                return
            self.returncode = int(self._status)
        else:  # the server ended without a status: it was killed, and so is this worker
            self.returncode = -signal.SIGKILL

    def poll(self) -> int | None:
        """The exit status once the worker ended and was reaped, else None."""
        self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker's end; its exit status (``subprocess.TimeoutExpired`` past ``timeout``)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if self.status_fd < 0:
                raise OSError(f"worker {self.pid}: its status pipe is closed, its end unknown")
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            self._collect(left)
        return self.returncode

    def close(self) -> None:
        """Close the runner's ends of the worker's pipes (stdin, stdout, status)."""
        self.stdout.close()
        if self.stdin is not None and not self.stdin.closed:
            self.stdin.close()
        if self.status_fd >= 0:
            os.close(self.status_fd)
            self.status_fd = -1

    def send_signal(self, sig: int) -> None:
        """Signal the worker unless it was reaped already."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the worker unless it was reaped already."""
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The runner's side: start the server, fork workers through it, stop it.

    The server's environment (and so the workers') is ours, with one OpenBLAS
    thread unless the caller set a number: a worker does no linear algebra,
    numpy's import would otherwise start an OpenBLAS thread per CPU, and the
    server must have no thread when it forks.
    """

    def __init__(self) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poolsvc.load.forkserver", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                close_fds=True, env=env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours
        self.replies = ours.makefile("rb")

    def spawn(self, argv_json: str, *, stdin_pipe: bool, stderr: IO) -> Forked:
        """Fork a worker that runs ``worker.main([argv_json])``; its handle.  ``stdin_pipe``:
        the handle's ``stdin`` is a pipe to it (else its stdin is /dev/null)."""
        out_r, out_w = os.pipe()
        status_r, status_w = os.pipe()
        if stdin_pipe:
            in_r, in_w = os.pipe()
        else:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY), -1
        try:
            socket.send_fds(self.control, [argv_json.encode() + b"\n"],
                            [in_r, out_w, stderr.fileno(), status_w])
            reply = self.replies.readline()
        except BaseException:
            for fd in (out_r, status_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, status_w):
                os.close(fd)
        if not reply.strip().isdigit():
            for fd in (out_r, status_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise OSError(f"the load fork server did not fork a worker (answer {reply!r})")
        return Forked(int(reply), os.fdopen(in_w, "wb") if in_w >= 0 else None,
                      os.fdopen(out_r, "rb", buffering=0), status_r)

    def close(self) -> None:
        """Stop the server (it exits once it reaped every child) and wait for it."""
        self.replies.close()
        self.control.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the server process --------------------------------------------------------------------------
def _child(spec_json: str, fds: list[int]) -> None:
    """In the forked child: the worker's stdio on 0, 1, 2, nothing else open; run it; exit."""
    code = 1
    try:
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the other children's status pipes too
        from . import worker

        code = worker.main([spec_json])
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(code)


def _reap(status: dict[int, int]) -> None:
    """Reap every child that ended and write its exit status to its status pipe."""
    while status:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status.pop(pid, -1)
        if fd < 0:
            continue
        try:
            os.write(fd, b"%d\n" % os.waitstatus_to_exitcode(wstatus))
        except OSError:  # the runner closed its end: nobody asks any more
            pass
        os.close(fd)


def serve(control_fd: int) -> int:
    """The server's loop: fork a worker per request, report each one's end; returns at EOF
    on the control socket once every child was reaped."""
    import poolsvc  # noqa: F401  # every import a worker needs, made once here
    import posix_ipc  # noqa: F401

    from ..tee import ta  # noqa: F401
    from . import worker  # noqa: F401

    gc.freeze()  # the imported objects stay out of the children's collections: fewer copied pages
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()  # SIGCHLD wakes the select below (no polling)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    waiter = select.poll()
    waiter.register(wake_r, select.POLLIN)
    waiter.register(control, select.POLLIN)
    status: dict[int, int] = {}  # pid -> the write end of its status pipe
    open_ = True
    while open_ or status:
        _reap(status)
        if not open_ and not status:
            break
        ready = {fd for fd, _ in waiter.poll(1000)}
        if wake_r in ready:
            os.read(wake_r, 4096)
        if control.fileno() not in ready:
            continue
        data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 4)
        while data and not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            more = control.recv(MAX_REQUEST)  # the rest of a request cut by the stream
            data += more
            if not more:
                break
        if not data:
            open_ = False
            waiter.unregister(control)
            for fd in fds:
                os.close(fd)
            continue
        if len(fds) != 4 or not data.endswith(b"\n"):
            for fd in fds:
                os.close(fd)
            control.sendall(b"bad request\n")
            continue
        spec_json = data.decode()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            control.close()
            _child(spec_json.strip(), fds)
        for fd in fds[:3]:
            os.close(fd)
        status[pid] = fds[3]
        control.sendall(b"%d\n" % pid)
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
