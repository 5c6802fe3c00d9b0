"""Write a directory or a file all at once or not at all — also under SIGKILL, a full disk and a second writer.

``with atomic_directory(target, overwrite=False) as tmp:`` — everything is
written into a fresh temp directory beside the target (same filesystem), which
is moved into place only when the block finishes. ``with atomic_file(path) as
tmp:`` does the same for one file (steer's one atomic single-file writer), and
``write_text_atomic(path, text)`` writes a text file through it. Nothing else in
steer renames a temp file into place by hand.

What a reader of the target can rely on:

- **Nothing half-written.** An exception or Ctrl-C removes the temp directory.
  A process killed outright (SIGKILL, power loss) cannot clean up, so its
  ``.NAME.partial-*`` is left; the next write to the same target removes such
  leftovers (they are recognisable because only the lock holder makes them) and
  says so on stderr.
- **Never missing.** ``overwrite`` swaps the new directory and the old one in a
  single ``renameat2(RENAME_EXCHANGE)`` (Linux); the old one is deleted only
  after the new one is in place. Where the kernel or filesystem has no exchange,
  the old directory is renamed aside and the new one renamed in (a window of
  two renames), and put back if the second rename fails.
- **One writer per target.** An exclusive ``flock`` on ``.NAME.write-lock`` beside the
  target is held from the emptiness check to the rename; a second writer fails
  at once with a message naming the target (and the holder's pid), instead of
  racing. The kernel drops the lock when its holder dies.
- **One line for a disk that refuses.** ENOSPC, EDQUOT, EFBIG (RLIMIT_FSIZE),
  EROFS, EACCES and EPERM while writing become ``error`` (a `SteerError`) naming
  the target and the file, after the temp directory is removed.

An existing target is refused unless ``overwrite`` (an empty directory counts
as free). Never touches anything but the target, its temp and old copies, and
its write-lock file.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from steer.errors import SteerError

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
"""OSErrors that mean "this disk or directory will not take the output": reported as one line."""

RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


@contextmanager
def atomic_directory(target, *, overwrite: bool = False, what: str = "output", error=SteerError):
    """Yield a temp directory that becomes ``target`` when the block ends; ``error`` is the SteerError subclass
    to raise. See the module docstring for what this guarantees."""
    target = Path(target).expanduser().absolute()
    with disk_errors(target, what, error):
        if target.exists() and not target.is_dir():
            raise error(f"{what} path exists and is not a directory", where=str(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(target, what, error)
    try:
        with disk_errors(target, what, error):
            _remove_leftovers(target)
            if target.is_dir() and any(target.iterdir()) and not overwrite:
                raise error(f"{what} directory already exists and is not empty; pass --overwrite (overwrite=True) "
                            "to replace it", where=str(target))
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
            try:
                os.chmod(tmp, 0o755)
                yield tmp
                _move_into_place(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    finally:
        _unlock(lock, target)


@contextmanager
def atomic_file(path, *, what: str = "file", error=SteerError):
    """Yield a temp path beside ``path`` to write; it replaces ``path`` (``os.replace``) when the block ends, and
    is removed on any error. Disk errors become one-line ``error``s, as for `atomic_directory`."""
    path = Path(path).expanduser().absolute()
    with disk_errors(path, what, error):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would otherwise become the file's mode
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text_atomic(path, text: str, *, what: str = "file", error=SteerError) -> None:
    """Write ``text`` (UTF-8) to ``path`` through `atomic_file`: the whole text or the old file, never a part.
    A directory at ``path`` is refused with a one-line ``error``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise error("is a directory; give a file name", where=str(path))
    with atomic_file(path, what=what, error=error) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def disk_errors(target: Path, what: str, error=SteerError):
    """Turn a refusing disk (`DISK_ERRNOS`) into one ``error`` line naming ``target`` and the file involved."""
    try:
        yield
    except SteerError:
        raise
    except Exception as exc:
        code, filename = _disk_errno(exc)
        if code not in DISK_ERRNOS:
            raise
        involved = f" ({filename})" if filename and str(filename) != str(target) else ""
        raise error(f"cannot write the {what}: {os.strerror(code)}{involved}; nothing was written",
                    where=str(target)) from None


def _disk_errno(exc: Exception) -> tuple[int | None, str | None]:
    """The errno behind ``exc``: an OSError's own, or the "(os error N)" a Rust writer (safetensors) reports."""
    if isinstance(exc, OSError):
        return exc.errno, exc.filename
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return (int(match.group(1)), None) if match else (None, None)


@contextmanager
def job_lock(target, *, waiting: str):
    """Hold an exclusive lock on ``.NAME.lock`` beside ``target`` for a whole job that ends by writing ``target``
    (training the default SAE, converting a GGUF model): a second process that wants the same ``target`` waits
    for the first — saying ``steer: {waiting}`` on stderr — and then finds its result, instead of doing the work
    twice. Not `lock_path`, which `atomic_directory` takes for the final write. The lock file is removed on
    release; the kernel drops the lock when its holder dies."""
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.with_name(f".{target.name}.lock")
    fd = _flock(path, lambda holder: print(f"steer: {waiting}", file=sys.stderr))
    try:
        yield
    finally:
        _release(fd, path)


def lock_path(target: Path) -> Path:
    """The writer's lock beside ``target``: its own name, so a caller may hold a `job_lock` (``.NAME.lock``)
    around the whole job (as `steer.train.default` does while training the SAE it then saves here)."""
    return target.with_name(f".{target.name}.write-lock")


def _lock(target: Path, what: str, error) -> int:
    """An exclusive lock on `lock_path` (its fd), or ``error`` when another process holds it."""

    def refuse(holder: str) -> None:
        raise error(f"another process{f' (pid {holder})' if holder else ''} is writing this {what} right now; "
                    "wait for it to finish, or write elsewhere", where=str(target)) from None

    return _flock(lock_path(target), refuse)


def _flock(path: Path, busy) -> int:
    """An exclusive ``flock`` on the file at ``path`` (its fd, with our pid written in it). When another process
    holds it, ``busy(holder's pid)`` is called once: it raises to give up, or returns to wait for the lock."""
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    told = True
                    busy(os.pread(fd, 32, 0).decode(errors="replace").strip())
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there now
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _unlock(fd: int, target: Path) -> None:
    _release(fd, lock_path(target))


def _release(fd: int, path: Path) -> None:
    try:
        path.unlink(missing_ok=True)  # while still held, so no one locks a file about to vanish
    except OSError:
        pass
    os.close(fd)


def _remove_leftovers(target: Path) -> None:
    """Temp and old copies of ``target`` left by a killed writer (we hold the lock, so no live writer owns one)."""
    leftovers = sorted(p for pattern in (f".{target.name}.partial-*", f".{target.name}.old-*")
                       for p in target.parent.glob(pattern))
    for p in leftovers:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if leftovers:
        print(f"steer: removed {len(leftovers)} leftover(s) of an interrupted write to {target}: "
              + ", ".join(p.name for p in leftovers), file=sys.stderr)


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # target now holds the new tree, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)  # put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # no exchange here: fall back to two renames
        return False
    raise OSError(code, os.strerror(code), str(b))


_LIBC = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]
