"""How open recorders end with the program: at exit, and on SIGTERM.

At exit, recorders a user did not close are closed with the status the program's end implies
(``close_open_recorders``). SIGTERM (``kill``, ``docker stop``, SLURM's preemption) closes them
as ``interrupted``.

Without this, a terminated process leaves its run marked ``running`` and loses the steps since
the last flush. While any recorder is open, and only where the process still has the default
SIGTERM action (a program with its own handler decides itself how to end, and its recorders
close on that path), gradscope's handler writes every completed step, marks the runs
``interrupted``, then restores the default action and re-sends the signal: the process still ends
by SIGTERM, with the exit status a scheduler expects.

A handler runs between two bytecodes of the main thread. If that is inside gradscope's own
recording code (a hook halfway through updating the buffer, or a close already writing), closing
there could see half an update, so the handler asks again 50 ms later instead, when the main
thread is back in the user's code; a close under way finishes first and the re-sent signal then
ends the process (after a minute it closes anyway, in case the main thread is stuck).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

_OURS = ("gradscope.recording.", "gradscope.store.")  # module names: unlike paths, symlinks can't hide them
_RETRY_SECONDS = 0.05
_MAX_RETRIES = 1200

#: Open recorders, held strongly so that one a user forgets to close still writes its data at exit
#: (and so that a second watch() on the same modules can be refused).
OPEN: set[Any] = set()
_installed = False
_retries = 0


def install() -> None:
    """Route SIGTERM to ``close_open_recorders("interrupted")`` while recorders are open (main thread only)."""
    global _installed, _retries
    if _installed or not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the program handles SIGTERM itself
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed, _retries = True, 0


def uninstall() -> None:
    """The default action back, when the last recorder closed (unless someone replaced ours)."""
    global _installed
    if not _installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _installed = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _retries, _installed
    if _inside_gradscope(frame) and _retries < _MAX_RETRIES:
        _retries += 1
        timer = threading.Timer(_RETRY_SECONDS, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    try:
        close_open_recorders("interrupted")
    finally:
        signal.signal(signum, signal.SIG_DFL)
        _installed = False
        os.kill(os.getpid(), signum)


def _inside_gradscope(frame: Any) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_OURS):
            return True
        frame = frame.f_back
    return False


def status_after(exc_type: Any, exc: Any) -> str:
    """A ``with watch()`` block's end as a run status: sys.exit(0) is a normal end, Ctrl-C an interruption."""
    if exc_type is None or (issubclass(exc_type, SystemExit) and exc.code in (0, None)):
        return "finished"
    if issubclass(exc_type, KeyboardInterrupt):
        return "interrupted"
    return "failed"


def close_open_recorders(status: str | None = None) -> None:
    """Write what open recorders still hold (at exit, or on SIGTERM): no lost data.

    At exit the status follows how the program ended: an uncaught exception (``sys.last_type``,
    set before exit handlers run) fails the run, Ctrl-C interrupts it.
    """
    last = getattr(sys, "last_type", None)
    for rec in list(OPEN):
        if rec._pid != os.getpid():
            continue  # a forked child (a DataLoader worker): the run is its parent's to close
        ended = status
        if ended is None:  # at exit: an exception that reached the top since watch() fails the run
            fresh = last is not None and last is not rec._last_type_at_start
            ended = status_after(last, getattr(sys, "last_value", None)) if fresh else "finished"
        try:
            rec._close(ended)
        except Exception:  # exiting anyway; nothing better to do with the error
            pass


atexit.register(close_open_recorders)
