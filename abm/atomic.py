"""Files that appear under their final name only once complete."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to, then put it in place.

    On success the temporary file replaces ``path`` in one rename; on an error it is
    removed and ``path`` is left as it was.

    Args:
        path: The file to write.

    Yields:
        The temporary path, in the same folder (so the rename stays on one file system).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# inside a partial folder: the machine whose run is writing it
HOST = ".host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs on this machine.

    This process counts as alive, and so does a process of another user; a number
    that names no single process (zero, negative, too large) counts as dead.
    """
    if pid == os.getpid():
        return True
    if pid <= 0:  # os.kill(0 or -n, ...) would address a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the partial folders that killed runs left behind in ``parent``.

    A run killed without a chance to clean up (SIGKILL, a power cut) leaves its hidden
    ``.NAME.partial-PID`` folder; one is removed when its PID no longer runs. Folders
    of live runs are left alone, and so are those whose ``.host`` file names another
    machine (a shared file system), as their PID means nothing here.

    Args:
        parent: The folder to clean; a missing or unreadable one is left as it is.

    Returns:
        The folders removed.
    """
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = re.fullmatch(r"\..+\.partial-(\d+)", entry.name)
        try:
            if not match or not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        try:  # a folder of a run on another machine (a shared file system) is left alone
            host = (Path(entry.path) / HOST).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            host = None
        if host is not None and host != socket.gethostname():
            continue
        if not pid_alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed
