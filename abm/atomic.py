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
    """Yield a temporary path beside ``path`` to write to; on success it replaces
    ``path`` in one rename, on an error it is removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# inside a partial folder: the machine whose run is writing it
HOST = ".host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (on this machine). This process counts as
    alive; a process of another user counts as alive; a bad number counts as dead."""
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
    """Remove the hidden ``.NAME.partial-PID`` folders in ``parent`` that a run killed
    without a chance to clean up (SIGKILL, a power cut) left behind: those whose PID
    no longer runs. Folders of live runs are left alone. Returns what was removed."""
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
