"""Faults of the machine (a full disk, a file size limit, no permission, a read-only folder) said in one line,
and the noise that orbax's background writers print when such a fault stops them (their traceback logged, and
asyncio's "Event loop is closed"), silenced: the error itself still reaches the user, once.

`customshift --debug ...` or CUSTOMSHIFT_DEBUG=1 shows the traceback and the noise instead."""
from __future__ import annotations

import errno
import logging
import os
import re
import sys

DEBUG_ENV = "CUSTOMSHIFT_DEBUG"

_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or choose a destination on another disk) and run it again",
    errno.EDQUOT: "the disk quota is used up: free space and run it again",
    errno.EFBIG: "a file grew past the size limit of this process or file system (ulimit -f): raise it",
    errno.EROFS: "the folder is on a read-only file system: choose a writable destination",
    errno.EACCES: "permission denied: choose a folder you may write to, or fix its permissions",
    errno.EPERM: "operation not permitted: check the folder's permissions",
    errno.EIO: "an input/output error from the disk: check the device",
}
_TENSORSTORE_CODE = re.compile(r"os_error_code='?(\d+)")
_TENSORSTORE_PATH = re.compile(r'(?:file|writing:?) "([^"]+)"')


def debug_requested(argv_flag: bool = False) -> bool:
    """Whether tracebacks are wanted: the --debug flag or CUSTOMSHIFT_DEBUG set to anything but 0/empty."""
    return argv_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fault_message(e: BaseException) -> str | None:
    """One line for an OS fault (an OSError, or orbax/tensorstore's error text carrying an os_error_code); None
    for anything else."""
    code, where = None, None
    if isinstance(e, OSError) and e.errno in _ADVICE:
        code, where = e.errno, e.filename
    else:
        found = _TENSORSTORE_CODE.search(str(e))
        if found and int(found.group(1)) in _ADVICE:
            code = int(found.group(1))
            path = _TENSORSTORE_PATH.findall(str(e))
            where = path[-1] if path else None
    if code is None:
        return None
    return f"{_ADVICE[code]} ({os.strerror(code)}" + (f": {where}" if where else "") + ")."


def quiet_background_noise() -> None:
    """Drop the 'Event loop is closed' RuntimeErrors that tensorstore callbacks raise into asyncio loops orbax has
    already closed (after a failed write or an interrupt); every other unraisable exception is still printed."""
    default = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        default(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_drop_background_traces)
    logging.getLogger("asyncio").addFilter(_drop_background_traces)


def _drop_background_traces(record: logging.LogRecord) -> bool:
    """False for orbax's "<thread>.run() raised an exception" and asyncio's "Task exception was never retrieved"
    logs: tracebacks of writer tasks that the one reported error already stopped."""
    msg = str(record.msg)
    return not ("raised an exception" in msg or "exception was never retrieved" in msg)
