"""Where a run meets the process: quiet third-party loggers, one line for a full disk, clean exits.

A full disk (or a file-size limit) surfaces from deep inside orbax and
tensorstore as pages of tracebacks; at the edge it becomes one line naming
the file that could not be written, exit code 1 (a checkpointed run then
continues with ``--resume`` once there is space). A run that stops with an
error leaves orbax's background writes unfinished; :func:`run` ends the
process without letting them print their shutdown tracebacks.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable

from experiments.harness import distributed

# Errors of a full disk, a full quota or a file-size limit (RLIMIT_FSIZE).
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# Loggers that print what a run's user cannot act on (absl: tfds's "has no
# dataset_info.json" warning before our own "not found" line, and orbax's
# error logs with tracebacks from its writer threads; asyncio: writes cut
# short). The run reports every fault itself, in one line.
QUIET = ("absl", "orbax", "asyncio", "tensorstore")
# How tensorstore names the OS error and the file in its messages.
_TS_CODE = re.compile(r"os_error_code='(\d+)'")
_TS_FILE = re.compile(r'(?:Failed writing|Error opening file|local file):? "([^"]+)"')


def quiet() -> None:
    """Silences :data:`QUIET`'s loggers but for fatal messages."""
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:  # absl comes with jax; without it there is nothing to quiet
        pass


def disk_full(err: BaseException) -> tuple[int, str | None] | None:
    """``(errno, file)`` when ``err`` (or an exception it chains) is a full disk, else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err.errno, err.filename
        text = str(err)
        code = _TS_CODE.search(text)
        if code and int(code.group(1)) in DISK_FULL:
            found = _TS_FILE.findall(text)
            return int(code.group(1)), found[-1] if found else None
        err = err.__cause__ or err.__context__
    return None


def _orbax_leftover(err: BaseException) -> bool:
    """An error of orbax's writer threads after the run already stopped.

    The event loop they report to has closed; tensorstore's callbacks print
    it through ``sys.unraisablehook`` (or ``sys.excepthook``).
    """
    return isinstance(err, RuntimeError) and str(err) == "Event loop is closed"


def _excepthook(kind, err, tb, default=sys.excepthook) -> None:
    if not _orbax_leftover(err):
        default(kind, err, tb)


def _unraisablehook(unraisable, default=sys.unraisablehook) -> None:
    if not _orbax_leftover(unraisable.exc_value):
        default(unraisable)


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps an experiment's ``main``: quiet loggers, and a full disk as one line and exit 1.

    Args:
      main: the experiment's ``main(argv=None) -> int``.

    Returns:
      ``main`` wrapped; it raises ``SystemExit(1)`` after the line for a full
      disk, and any other exception unchanged.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        quiet()
        sys.excepthook, sys.unraisablehook = _excepthook, _unraisablehook
        if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
            # A file-size limit then fails the write (EFBIG) instead of killing the process.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            return main(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - only a full disk is handled; the rest re-raised
            full = disk_full(err)
            if full is None:
                raise
            code, name = full
            where = f"could not write {name}" if name else "could not write a file"
            print(f"error: {where}: {os.strerror(code)}. Free some space (or raise the limit), "
                  "then rerun with the same flags plus --resume: it continues from the last "
                  "checkpoint", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


def run(main: Callable[[], int]) -> None:
    """Runs ``main`` as the program; a failed run exits at once, after flushing its output.

    Without this, orbax's unfinished background writes print pages of
    tracebacks while the interpreter shuts down, after the one-line error.
    """
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
    except BaseException:
        sys.stdout.flush()
        raise
    if code in (0, None):
        sys.exit(0)
    if code == 2:
        # A refusal (bad flags, --out's state) stops every process of a group alike.
        distributed.leave()
    if not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
