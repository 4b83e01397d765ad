"""Files out and in.

Out: every file the project writes (the CLI, head training and its caches, the default model's cache, the
benchmarks' results) goes through `atomic_path` or `write_atomic`: written under a temporary name in the target's
own folder, flushed to disk (fsync), then renamed over the target (os.replace, atomic on POSIX). Whoever reads the
target, and whenever the writer is killed, sees the old file or the new one, never a part of one (issue 35: a
SIGKILL left a 0-byte results.json beside a complete heads file).

A temporary is named `.<target name>.tmp-<pid>-<8 hex><target suffix>`: hidden, and with the target's suffix so
that writers that choose a format by it (matplotlib, numpy) write the same bytes. A killed writer leaves its
temporary behind; the next write of the same target removes every temporary of it whose process is gone (or that
this process made and no longer writes), and nothing ever reads one.

In: `check_file` names what a path that should be a file is instead (a directory, a FIFO, a device): opening a
FIFO blocks until someone writes to it and /dev/zero never ends, so neither may reach a reader; "no such file"
is kept for paths that do not exist.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import threading
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"
_mine: set[str] = set()  # temporaries this process is writing now (its own pid on a stale one is no proof of life)
_mine_lock = threading.Lock()


def temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{target.suffix}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, and not in _mine: a previous process that had our pid, or a write that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid no kernel hands out: then not a temporary of ours at all)
    return True


def stale_temporaries(target: Path) -> list[Path]:
    """The temporaries of `target` that no live writer owns."""
    target = Path(target)
    head = f".{target.name}{TMP_MARK}"
    pattern = re.compile(r"(\d+)-[0-9a-f]{8}" + re.escape(target.suffix) + r"\Z")
    try:
        names = [e.name for e in os.scandir(target.parent) if e.name.startswith(head)]
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = pattern.match(name, len(head))
        path = target.parent / name
        with _mine_lock:
            if str(path) in _mine:
                continue
        if m and not _alive(int(m.group(1))):
            out.append(path)
    return out


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot (some FUSE mounts): the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """A temporary path to write `target`'s contents to (a file, or a folder with `directory`); when the block
    ends without an exception, its contents are flushed to disk and it is renamed over `target`. On an exception
    the temporary is removed and `target` is untouched. The target's folder is created if missing.

        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp))

    A folder replaces only a missing or empty `target` (os.replace refuses a full one: OSError)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in stale_temporaries(target):
        _remove(old)
    tmp = temporary_name(target)
    with _mine_lock:
        _mine.add(str(tmp))
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if directory:
            for root, _, files in os.walk(tmp):
                for f in files:
                    _fsync(Path(root) / f)
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)  # the rename itself, on disk
    except BaseException:
        _remove(tmp)
        raise
    finally:
        with _mine_lock:
            _mine.discard(str(tmp))


def write_atomic(target: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `target` atomically (see atomic_path)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(raw)


def file_kind(path: str | os.PathLike) -> str | None:
    """None for a regular file (links followed); else what `path` is, for a message: "missing", "a directory",
    "a FIFO (named pipe)", "a character device", ..."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_file(path: str | os.PathLike, what: str) -> Path:
    """`path` if it is a regular file; FileNotFoundError "no such <what>" if it does not exist, ValueError naming
    what it is otherwise (before anything opens it)."""
    kind = file_kind(path)
    if kind == "missing":
        raise FileNotFoundError(f"{path}: no such {what}")
    if kind is not None:
        raise ValueError(f"{path}: is {kind}, not a {what}")
    if not os.access(path, os.R_OK):  # a PermissionError later would be a traceback, not a message
        raise ValueError(f"{path}: is not readable (permission denied)")
    return Path(path)
