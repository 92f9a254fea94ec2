"""Child processes forked from one process that imported their modules once.

A night starts three children that read the store beside it (`background`): the
snapshot's, the scope's and the evidence's. Started as ``python -m MODULE``, each
imports what it needs again, pandas and SQLAlchemy included: 0.35 + 0.85 + 0.85 s
of CPU a night at 1M records, on a two-core machine that the night keeps busy,
taken from the run while it loads, normalises and matches. Forked from the run
itself, a child would need no imports, but by then the run is a gigabyte shared
copy-on-write with the child and has threads whose locks a fork would copy held
(measured, and tried: docs/benchmarks.md, session 32).

So the night makes one more process at its start (`Zygote.start`), which does
nothing but fork children on request. Where the run's process has no thread of
its own yet (the `mdm run` command at a night's start: pyarrow's import starts
jemalloc's background thread, whose own fork handlers make it safe), that
process is a copy of the run, made while the run is small, its modules already
imported, its descriptors closed: no child imports anything. Anywhere else (a
program that runs the pipeline among threads of its own, a test worker), it is
a program of its own, as multiprocessing's forkserver is, that imports the
snapshot child's modules, then the store child's while it waits: one import for
three children. Each child runs its module as ``python -m`` would (`runpy`), on
its own standard input, output and error, and answers as such a child does
(`snapshot_child.serve`).

It reaps its children and hands each exit status back on a pipe of the child's,
and hands the run each child's pidfd, so that stopping a child can never reach
another process that took its number. Where `fork`, descriptor passing or
pidfds are missing (not Linux), or the forking process cannot be had,
children are started as programs (`subprocess`), as before.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Standard input, output and error of a child, then the pipe its exit status comes on.
_CHILD_FDS = 4
#: Bytes of a request (the module and its arguments, JSON) read at a time.
_REQUEST_BYTES = 65536


def available() -> bool:
    """Whether this platform can fork a zygote and hand descriptors and pidfds over."""
    return (
        hasattr(os, "fork")
        and hasattr(socket, "send_fds")
        and hasattr(os, "pidfd_open")
        and hasattr(signal, "pidfd_send_signal")
    )


#: What the forking process imports before it serves a request (the snapshot's child is
#: asked for at once), then while it waits for the next (the store's readers are asked
#: for once the night's extracts are loaded).
PRELOAD_FIRST = ("mdm_pipeline.golden_records.snapshot_child",)
PRELOAD_LATER = ("mdm_pipeline.golden_records.store_child",)


#: Threads a fork may copy: jemalloc's background purger, which pyarrow's import starts
#: and whose own fork handlers make it safe.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def only_thread() -> bool:
    """Whether this process runs no thread but the caller's (and `FORK_SAFE_THREADS`):
    then a fork copies no lock another thread holds (Linux's task list)."""
    me = str(threading.get_native_id())
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for task in tasks:
        if task == me:
            continue
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        if name not in FORK_SAFE_THREADS:
            return False
    return True


class Zygote:
    """The forking process (see the module): `spawn` a child, `close` when done."""

    def __init__(
        self, sock: socket.socket, pid: int, process: subprocess.Popen[bytes] | None
    ) -> None:
        self._sock = sock
        self._process = process
        self.pid = pid
        #: Whether it is a copy of this process (else a program of its own).
        self.forked = process is None

    @classmethod
    def start(cls) -> Zygote | None:
        """Start the forking process now; None where it cannot be had (logged).

        A process that runs no other thread (`only_thread`: the `mdm run` command at
        a night's start) is copied, its modules already imported: no import at all,
        the snapshot's child forked at once. Any other (a program that runs the
        pipeline among its own threads, a test worker) starts the forking program,
        which imports the children's modules once (`PRELOAD_FIRST`, `PRELOAD_LATER`).
        """
        if not available():
            return None
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            log.warning("no process to fork the store's readers from (%s)", type(exc).__name__)
            return None
        try:
            if only_thread():
                return cls(ours, _fork(ours, theirs), None)
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            log.warning("no process to fork the store's readers from (%s)", type(exc).__name__)
            return None
        finally:
            theirs.close()
        return cls(ours, process.pid, process)

    def spawn(self, module: str, argv: list[str], stdin: bool) -> ForkedChild | None:
        """A child running ``python -m MODULE ARGV``'s work, its standard input a pipe
        (`stdin`) or empty; None if the forking process cannot make one (logged),
        for the caller to start the program instead."""
        ends: list[int] = []
        try:
            child_in, parent_in = os.pipe()
            parent_out, child_out = os.pipe()
            parent_err, child_err = os.pipe()
            parent_status, child_status = os.pipe()
            ends = [child_in, parent_in, parent_out, child_out, parent_err, child_err]
            ends += [parent_status, child_status]
            request = json.dumps([module, argv]).encode()
            socket.send_fds(self._sock, [request], [child_in, child_out, child_err, child_status])
            for fd in (child_in, child_out, child_err, child_status):
                os.close(fd)
                ends.remove(fd)
            answer, fds, _, _ = socket.recv_fds(self._sock, 64, 1)
            if not answer or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise ConnectionError("the forking process ended")
        except OSError as exc:
            for fd in ends:
                with contextlib.suppress(OSError):
                    os.close(fd)
            log.warning("a store reader could not be forked (%s)", type(exc).__name__)
            return None
        if not stdin:
            os.close(parent_in)
            parent_in = -1
        return ForkedChild(int(answer), fds[0], parent_in, parent_out, parent_err, parent_status)

    def close(self) -> None:
        """End the forking process (its children run on until they answer); idempotent."""
        if self._sock.fileno() < 0:
            return
        self._sock.close()  # it ends at the end of its socket
        if self._process is None:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.pid, 0)
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self._process.wait(timeout=10)
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def _fork(ours: socket.socket, theirs: socket.socket) -> int:
    """Fork this process into the forking process (in the copy: serve, never return)."""
    # Flushed, so that nothing buffered here is written again by the copy.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with warnings.catch_warnings():
        # Python 3.12+ warns of any other thread at a fork: here only `FORK_SAFE_THREADS`.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        ours.close()
        # A copy keeps nothing of this process's but its socket: no database, no file,
        # no pipe a reader of this process's output waits to see closed.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()  # type: ignore[union-attr]
        keep = theirs.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, _max_fd())
        code = _serve(theirs, [*PRELOAD_FIRST, *PRELOAD_LATER])
    finally:
        os._exit(code)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 4096


def _serve(sock: socket.socket, later: list[str]) -> int:
    """The forking process's loop: a child per request, until the run closes the socket;
    the `later` modules imported while no request waits. Each child's exit status
    is written to its status pipe once it is reaped."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    status_of: dict[int, int] = {}
    while True:
        ready: list[Any] = []
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([sock, wake_read], [], [], 0 if later else None)
        if wake_read in ready:
            os.read(wake_read, 4096)
            _reap(status_of)
        if sock not in ready:
            if later and not ready:
                importlib.import_module(later.pop(0))
            continue
        request, fds, _, _ = socket.recv_fds(sock, _REQUEST_BYTES, _CHILD_FDS)
        if not request:
            return 0
        module, argv = json.loads(request)
        pid = os.fork()
        if pid == 0:
            os.close(wake_read)
            os.close(wake_write)
            # The other children's status pipes: a child holding one would keep its
            # reader from the end of it (the run waiting for a child's exit status
            # would wait for this child's end too).
            for fd in status_of.values():
                os.close(fd)
            _run_child(sock, module, argv, fds)
        for fd in fds[:3]:
            os.close(fd)
        status_of[pid] = fds[3]
        pidfd = os.pidfd_open(pid)
        socket.send_fds(sock, [str(pid).encode()], [pidfd])
        os.close(pidfd)
        _reap(status_of)


def _reap(status_of: dict[int, int]) -> None:
    while status_of:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status_of.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, str(os.waitstatus_to_exitcode(status)).encode())
            os.close(fd)


def _run_child(sock: socket.socket, module: str, argv: list[str], fds: list[int]) -> None:
    """In a forked child: become ``python -m MODULE ARGV`` on the given pipes, then exit."""
    code = 1
    try:
        sock.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd, target in zip(fds[:3], (0, 1, 2), strict=True):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False))
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # as an interpreter would end: the error's class
            sys.stderr.write(exc.__class__.__name__ + "\n")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    finally:
        os._exit(code)


class ForkedChild:
    """A forked child, seen as `subprocess.Popen(..., text=True)` sees a program: the
    parts of it the store's readers use (`snapshot_child.ChildProcess`)."""

    def __init__(
        self, pid: int, pidfd: int, stdin: int, stdout: int, stderr: int, status: int
    ) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._status = status
        self.returncode: int | None = None
        self.stdin: Any = open(stdin, "w") if stdin >= 0 else None  # noqa: SIM115
        self.stdout: Any = open(stdout)  # noqa: SIM115
        self.stderr: Any = open(stderr)  # noqa: SIM115

    def poll(self) -> int | None:
        """Its exit status if it has ended, else None."""
        if self.returncode is None:
            ready, _, _ = select.select([self._status], [], [], 0)
            if ready:
                self._read_status()
        return self.returncode

    def wait(self) -> int:
        """Its exit status, once it has ended."""
        if self.returncode is None:
            self._read_status()
        assert self.returncode is not None
        return self.returncode

    def _read_status(self) -> None:
        data = b""
        while chunk := os.read(self._status, 16):
            data += chunk
        # No status: the forking process ended first, without reaping it.
        self.returncode = int(data) if data else -signal.SIGKILL
        self._close_fds()

    def kill(self) -> None:
        """SIGKILL, through its pidfd: never another process that took its number."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def communicate(self) -> tuple[str, str]:
        """Close its input, read its output and error to their end, wait for it. Read
        one after the other: a reader of the store writes one line to its output and at
        most a few to its error, far below what a pipe holds."""
        if self.stdin is not None:
            with contextlib.suppress(OSError):
                self.stdin.close()
            self.stdin = None
        out = "" if self.stdout.closed else self.stdout.read()
        err = "" if self.stderr.closed else self.stderr.read()
        self.wait()
        for stream in (self.stdout, self.stderr):
            stream.close()
        return out, err

    def _close_fds(self) -> None:
        for fd in (self._pidfd, self._status):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pidfd = self._status = -1

    def __del__(self) -> None:
        if self._status >= 0:
            self._close_fds()


def main(argv: list[str]) -> int:
    """The forking process: its socket's descriptor is its argument."""
    sock = socket.socket(fileno=int(argv[0]))
    for module in PRELOAD_FIRST:
        importlib.import_module(module)
    return _serve(sock, list(PRELOAD_LATER))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
