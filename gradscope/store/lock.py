"""One writer per run directory: an OS lock that dies with the process holding it.

The writer holds an exclusive ``flock`` (``msvcrt.locking`` on Windows) on ``.gradscope.lock`` in
the run directory for as long as it writes. The kernel drops the lock when the process ends, by
``close()``, a crash or SIGKILL alike, so a killed writer never leaves a stale lock behind, and
no pid file has to be trusted. Locks are per open file, so a second writer in the same process is
refused too. Readers may probe the lock (``writer_alive``) to tell a run still being written from
one whose writer is gone; the writer retries briefly so that such a probe cannot refuse it.

The lock file is left in place after the writer closes. Only a writer whose start failed removes
it (with the directory it made); a writer that locked the removed file notices (its descriptor
no longer names the file at the path) and locks the new one, so two writers never both hold it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
import time
from pathlib import Path

from gradscope.store.meta import RunError

LOCK_FILE = ".gradscope.lock"
_RETRIES = 10  # x 20 ms: long enough for a reader's probe to end, short for a refusal
_RETRY_WAIT = 0.02

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int, exclusive: bool) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int, exclusive: bool) -> bool:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class RunLockedError(RunError):
    """Another writer, in this process or another, holds the run directory."""


class RunLock:
    """The exclusive lock of one run directory, held by its one writer until ``release()``."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory, self._fd = directory, fd

    @classmethod
    def acquire(cls, directory: Path) -> RunLock:
        """Lock ``directory`` (which must exist) or raise ``RunLockedError`` naming the holder."""
        path = directory / LOCK_FILE
        for attempt in range(_RETRIES):
            fd = _open_lock_file(directory)
            if _try_lock(fd, exclusive=True):
                if _same_file(fd, path):
                    break
                # a writer whose start failed removed the file after we opened it: the lock we
                # hold is on a file no one else will open, so take the one at the path instead
                os.close(fd)
                continue
            os.close(fd)
            if attempt + 1 < _RETRIES:
                time.sleep(_RETRY_WAIT)
        else:
            raise RunLockedError(f"run {directory} is being written by {_holder(path)}; two writers would "
                                 "mix their data (choose another run= path, or wait for that one to close)")
        try:
            with contextlib.suppress(OSError):  # who holds it, for the message a second writer gets
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, fd)

    def release(self) -> None:
        """Unlock (idempotent); the file stays, see the module docstring."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                _unlock(fd)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd >= 0


def writer_alive(directory: Path) -> bool:
    """Whether a writer holds ``directory``'s lock now (False for runs written before locks)."""
    path = directory / LOCK_FILE
    try:  # without blocking, and only a regular file: a FIFO put there must not hang a reader
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        if _try_lock(fd, exclusive=False):
            _unlock(fd)
            return False
        return True
    except OSError:  # a filesystem without locks: nothing can be said, assume no writer
        return False
    finally:
        os.close(fd)


def _open_lock_file(directory: Path) -> int:
    """The lock file, created if missing (and its directory, if a failed writer removed it)."""
    try:
        return os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not unlinked or replaced since it was opened)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(path: Path) -> str:
    try:
        pid, _, host = path.read_text().strip().partition(" ")
    except OSError:
        return "another writer"
    if pid == str(os.getpid()) and host == socket.gethostname():
        return "another Recorder in this process"
    return f"process {pid} on {host}" if pid.isdigit() else "another writer"
