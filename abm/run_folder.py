"""A run's output folder (``RunFolder``).

The folder is claimed at once, written under a hidden temporary name and renamed
into place when complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
from pathlib import Path

from abm.atomic import HOST, pid_alive, remove_stale_partials
from abm.errors import ScenarioError


def default_folder(name: str, root: Path = Path("outputs")) -> Path:
    """A new folder path ``<root>/<name>-<timestamp>``, with a suffix if that exists already.

    Nothing is created; the suffix counts up from ``-2``.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = root / f"{name}-{stamp}"
    n = 2
    while folder.exists():
        folder = root / f"{name}-{stamp}-{n}"
        n += 1
    return folder


RUNNING = ".running"
# what the hidden working copy adds to the folder's name: "." + ".partial-" + a PID
_PARTIAL_EXTRA = 1 + len(".partial-") + 7


def _shown(path: Path | str | bytes) -> str:
    """A path as one line of text: control characters (a newline, a NUL) escaped."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text if text.isprintable() else repr(text)


def _reason(exc: OSError) -> str:
    """What went wrong, in words, for the errors folder creation can hit."""
    reasons = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENAMETOOLONG: "a name in the path is too long",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a part of the path is a file, not a folder",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.ELOOP: "too many symbolic links",
    }
    reason = reasons.get(exc.errno, exc.strerror or type(exc).__name__)
    return f"{reason} ({_shown(exc.filename)})" if exc.filename else reason


class RunFolder:
    """A run's output folder, which appears under its final name only once complete.

    A crash or an error thus never leaves a folder that looks complete. The final
    folder is claimed at once: it is created empty (or an existing empty folder is
    taken) and holds only a ``.running`` file with the PID of the run, so a second
    run into the same folder is refused before it starts; a claim whose PID no
    longer runs (a killed run) is taken over. The tables are written to a
    hidden ``.NAME.partial-PID`` folder beside it, which replaces the claimed
    folder in one rename when complete. Hidden partial folders of dead runs in the
    same parent are removed when a run starts (those of other machines are left).

    Attributes:
        final: The folder the outputs end up in.
        path: The hidden working folder to write the outputs into.
    """

    def __init__(self, final: Path, what: str = "--out") -> None:
        """Claim ``final`` and create the hidden working folder beside it.

        Args:
            final: The output folder; missing parent folders are created.
            what: How error messages name the folder's origin (the option it came from).

        Raises:
            ScenarioError: The folder cannot be claimed or created: a NUL byte or too
                long a name, a file or symbolic link in the way, a folder that is not
                empty or that another live run holds, or a file system error (the
                message names the folder and what is allowed).
        """
        self.final = final
        self.what = what
        self.path = final.parent / f".{final.name}.partial-{os.getpid()}"
        self.marker = final / RUNNING
        self.created = False  # this run made ``final``: a discard removes it again
        self.claimed = False  # this run wrote ``.running``
        self.made_parents: list[Path] = []
        where = f"{what} {_shown(final)}"
        if "\0" in str(final):
            raise ScenarioError(
                f"{where}: the path contains a NUL byte; allowed: a folder "
                "path without NUL characters"
            )
        try:
            self._check_name_length()
            self._claim()
            remove_stale_partials(final.parent)
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir()
            # whose it is: a run on another machine sharing this folder is not ours to judge
            (self.path / HOST).write_text(socket.gethostname(), encoding="utf-8")
        except ScenarioError:
            self.discard()
            raise
        except (OSError, ValueError) as exc:
            self.discard()
            reason = _reason(exc) if isinstance(exc, OSError) else str(exc)
            raise ScenarioError(
                f"{where}: cannot create the output folder: {reason}; "
                "choose a folder you can write to, e.g. --out runs/NAME"
            ) from None

    def _check_name_length(self) -> None:
        try:
            limit = os.pathconf(
                self.final.parent if self.final.parent.is_dir() else ".", "PC_NAME_MAX"
            )
        except (OSError, ValueError):
            limit = 255
        size = len(os.fsencode(self.final.name))
        if size + _PARTIAL_EXTRA > limit:
            raise ScenarioError(
                f"{self.what} {_shown(self.final)}: the folder name is {size} bytes long; "
                f"allowed: at most {limit - _PARTIAL_EXTRA} bytes (the file system allows "
                f"{limit}, and the run first writes to a hidden '.NAME.partial-PID' folder)"
            )

    def _claim(self) -> None:
        final, where = self.final, f"{self.what} {_shown(self.final)}"
        if final.parent.exists() and not final.parent.is_dir():
            raise ScenarioError(
                f"{where}: {_shown(final.parent)} is a file, not a folder; choose a folder path"
            )
        missing = []  # the parent folders this run makes: removed again on discard
        if final.is_symlink():  # the rename at the end would replace the link, not its folder
            raise ScenarioError(
                f"{where}: is a symbolic link; give the folder it points to "
                f"({_shown(final.resolve())}) or another folder"
            )
        for folder in final.parents:
            if folder.exists():
                break
            missing.append(folder)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.made_parents = missing
        try:
            os.mkdir(final)
            self.created = True
        except FileExistsError:
            if not final.is_dir():
                raise ScenarioError(
                    f"{where}: already exists and is a file, not a folder; "
                    "remove it or choose another folder"
                ) from None
        for _ in range(3):
            others = [p.name for p in final.iterdir() if p.name != RUNNING]
            if others:
                raise ScenarioError(
                    f"{where}: already exists and is not empty; remove it or choose another folder"
                )
            try:
                fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _live_claim(self.marker)
                if owner is not None:
                    raise ScenarioError(
                        f"{where}: another run ({owner}) is writing to this folder now "
                        f"(it holds {RUNNING}); wait for it to finish or choose another "
                        "folder"
                    ) from None
                self.marker.unlink(missing_ok=True)  # a claim of a run that died: take it
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.claimed = True
            return
        raise ScenarioError(
            f"{where}: other runs are claiming this folder at the same time; choose another folder"
        )

    def commit(self) -> Path:
        """Put the finished folder in place of the claim, in one rename.

        Returns:
            The final folder.

        Raises:
            ScenarioError: The rename failed; the outputs are then kept in a
                ``NAME.finished-PID`` folder beside it where possible, and the message
                says where.
        """
        (self.path / HOST).unlink(missing_ok=True)  # bookkeeping, not an output
        try:
            self.marker.unlink(missing_ok=True)
            self.claimed = False
            try:  # rename(2) replaces an empty folder atomically
                os.replace(self.path, self.final)
            except OSError:
                if not self.final.is_dir() or any(self.final.iterdir()):
                    raise
                self.final.rmdir()
                os.replace(self.path, self.final)
        except OSError as exc:
            # the outputs are complete: keep them in sight rather than discard them
            kept = self.final.with_name(f"{self.final.name}.finished-{os.getpid()}")
            try:
                os.replace(self.path, kept)
            except OSError:
                kept = None
            where = f"; the finished outputs are in {_shown(kept)}" if kept else ""
            raise ScenarioError(
                f"{self.what} {_shown(self.final)}: cannot move the finished "
                f"outputs into place: {_reason(exc)}{where}"
            ) from None
        self.created = False
        self.made_parents = []
        return self.final

    def discard(self) -> None:
        """Remove everything this run wrote; never raises."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.claimed:
            with contextlib.suppress(OSError):
                self.marker.unlink()
            self.claimed = False
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.final)  # only while empty: never anyone else's files
            self.created = False
        for folder in self.made_parents:  # deepest first; only those still empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.made_parents = []


def _live_claim(marker: Path, grace: float = 30.0) -> str | None:
    """Who holds a ``.running`` claim ("PID 123"), or None when the claim is stale.

    A claim without a readable PID is being written, or was by a run that died at
    once: it counts as live for ``grace`` seconds. A claim from another machine
    counts as live, since its PID cannot be checked here.
    """
    try:
        text = marker.read_text(encoding="utf-8").strip()
        age = time.time() - marker.stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return None
    pid, _, host = text.partition(" ")
    if not pid.isdigit():
        return "PID not yet written" if age < grace else None
    if host and host != socket.gethostname():  # its PID means nothing here
        return f"PID {pid} on {host}"
    return f"PID {pid}" if pid_alive(int(pid)) else None
