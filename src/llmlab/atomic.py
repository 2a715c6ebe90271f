"""Atomic writes: a file or folder either appears whole under its final name or not at all.

Files: write to a temporary sibling, fsync, rename. Folders: build `.name.tmp-PID-XXXX`, fsync every file,
then swap it with the target in one `renameat2(RENAME_EXCHANGE)` (Linux) and delete the old one. Where
the kernel or filesystem cannot exchange, the old folder is renamed to `.name.old-PID` first and the new
one renamed in; a crash between those two renames leaves the old folder under `.name.old-PID`, which
`recover_dir` (run before every write, and by checkpoint readers) puts back. A reader never sees a
half-written checkpoint under its real name; a crash leaves only a `.tmp-` folder, which loaders ignore
and the next write of the same target removes.

Permissions are those of a plain `open()` / `mkdir()` under the process umask (0644 / 0755 with the usual
022), not `tempfile`'s (or safetensors') private 0600 / 0700, so a checkpoint can be read by whoever may
read its parent folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    """The process umask. os.umask only reads it by setting it, so this runs once, at import, before a run
    starts threads that could create files in between."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike, field: str) -> Path:
    """`mkdir -p path`, or a one-line ConfigError naming the setting (`field`) when it cannot be made (a
    read-only or missing mount, a file in the way) instead of an OSError traceback."""
    from llmlab.errors import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise ConfigError(f"{field}: cannot create {path} ({why}); pick a folder you can write to") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from a run's other readers
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _public_modes(root: Path) -> None:
    """Give `root` and everything in it a plain mkdir's / open()'s mode under the umask: mkdtemp makes 0700,
    and writers such as safetensors' save_file make 0600 files."""
    root.chmod(0o777 & ~_UMASK)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~_UMASK)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~_UMASK)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_exchange_unsupported = False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not supported."""
    global _exchange_unsupported
    if _exchange_unsupported or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        _exchange_unsupported = True
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        if err == errno.ENOSYS:
            _exchange_unsupported = True
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _owner_pid(name: str, marker: str) -> int | None:
    """The pid in `.name.tmp-PID-XXXX` / `.name.old-PID`, or None."""
    rest = name.split(marker, 1)[1]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def leftovers(target: str | os.PathLike, marker: str) -> list[Path]:
    """Siblings `.name{marker}*` of `target` (marker ".tmp-" or ".old-"), oldest first."""
    target = Path(target)
    prefix = f".{target.name}{marker}"
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover_dir(target: str | os.PathLike) -> Path | None:
    """After a crash: put a `.name.old-PID` folder back under `target` when `target` is missing, and remove
    `.name.tmp-PID-*` folders whose writing process is gone. Returns the restored path, if any."""
    target = Path(target)
    restored = None
    if not target.exists():
        for old in reversed(leftovers(target, ".old-")):
            pid = _owner_pid(old.name, ".old-")
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue  # another live writer is between its two renames
            try:
                os.replace(old, target)
            except OSError:
                continue
            restored = target
            _fsync_dir(target.parent)
            break
    for tmp in leftovers(target, ".tmp-"):
        pid = _owner_pid(tmp.name, ".tmp-")
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
    return restored


def _install(tmp: Path, target: Path) -> None:
    """Make `tmp` visible as `target`, replacing any old `target` without a moment where neither exists
    (exchange), or with the old one kept as `.name.old-PID` until the new one is in place."""
    if target.exists() and _exchange(tmp, target):
        _fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the last good folder back
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` atomically, on error it is removed and
    the previous `target` (if any) is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _public_modes(tmp)
        fsync_tree(tmp)
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
