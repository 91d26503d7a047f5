"""Writes a long run depends on, and one clear error when the disk refuses one.

Checkpoints, the final model, metrics.jsonl, summary.json, reference-cache entries, the PPO value
head and the demo's own files are written through these helpers. Whatever goes wrong underneath
— a full disk (ENOSPC), an exceeded quota (EDQUOT) or file-size limit (EFBIG), a file system
remounted read-only (EROFS), lost permissions (EACCES, EPERM), a folder deleted, moved or unmounted
(ENOENT), an I/O error (EIO) — ends as one DiskError (exit 3). It names the file, the bytes the
write needed, the space free there and what to do, after the write's temporary files are removed.
Files written before (the last complete checkpoint above all) are never touched by a failed write.

Libraries word these failures their own way: torch.save says "unexpected pos N vs M" (the OSError
is lost inside its C++ writer) or, writing to a path, "basic_ios::clear: iostream error";
safetensors says "I/O error: ... (os error 28)". ``write_stream`` keeps the OSError behind torch's
words, ``os_error_of`` reads safetensors', and where no errno is left ``probe`` asks the folder
with a small write of its own.

OUTPUT is created by the first write of a run and must then stay where it is: a later write that
finds it gone, or replaced by another folder (a mount point left behind by an unmount), stops the
run instead of starting a fresh, partial OUTPUT (``output_dir``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Optional, Union

from prefalign.errors import DiskError, PrefalignError

Then = Union[str, Callable[[], str]]  # what to do once the fault is fixed; a callable is asked when it happens
Needed = Union[None, int, Callable[[], Optional[int]]]  # bytes the write needed; a callable is asked on failure
# Errors that only a write (not a read) meets: the CLI reports these plainly even from writes not guarded here.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_GONE = frozenset({errno.ENOENT, errno.ESTALE, errno.ENOTDIR})


def human(n: Optional[int]) -> str:
    if n is None:
        return "an unknown amount"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def existing_ancestor(path: Path) -> Path:
    for p in [path, *path.absolute().parents]:
        if p.exists():
            return p
    return Path(path.absolute().anchor)


def free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(existing_ancestor(path)).free
    except OSError:
        return None


def _fsize_soft_limit() -> Optional[int]:
    """This process's file-size limit in bytes (ulimit -f), None when unlimited."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _fsize_limit() -> str:
    soft = _fsize_soft_limit()
    return "" if soft is None else f" of {human(soft)}"


def os_error_of(exc: BaseException) -> Optional[OSError]:
    """The OSError behind ``exc``: itself, one in its cause/context chain, or the errno safetensors
    writes into its message ("... (os error 28)"). None when it is not an operating-system error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_error(err: OSError, target: Optional[Path], needed: Optional[int] = None, then: Then = "rerun",
               what: Optional[str] = None) -> DiskError:
    """The DiskError a person reads for ``err``, met while writing ``target`` (a file or a folder;
    None when unknown; ``what`` names it for people when its path does not)."""
    target = Path(target) if target is not None else None
    code = err.errno
    what = (what or (f"{target}" if target else "a file")) + (f" ({human(needed)})" if needed else "")
    place = existing_ancestor(target.parent) if target else "the folder it goes to"
    todo = then() if callable(then) else then
    if code == errno.ENOSPC:
        free = f" with {human(free_bytes(target))} free in {place}" if target else ""
        cause = f"no space left on the device: writing {what} failed{free}"
        fix = (f"free at least {human(needed)} there" if needed else "free space there") + \
            " (or move --output to a disk with room)"
    elif code == errno.EDQUOT:
        cause = f"disk quota exceeded: writing {what} failed in {place}"
        fix = "free space within your quota (or ask for a larger one)"
    elif code == errno.EFBIG:
        cause = f"file too large: writing {what} exceeded this process's file-size limit{_fsize_limit()}"
        fix = "raise the limit (`ulimit -f unlimited`, or the scheduler's file-size limit)"
    elif code == errno.EROFS:
        cause = (f"read-only file system: writing {what} failed because {place} is now on a read-only file "
                 f"system (remounted read-only, often after disk errors)")
        fix = f"make {place} writable again (or copy the folder to a writable disk and use that)"
    elif code in (errno.EACCES, errno.EPERM):
        cause = f"permission denied: writing {what} failed because {place} is no longer writable"
        fix = f"give write permission on {place} back"
    elif code in _GONE:
        gone = next((p for p in reversed([target, *target.absolute().parents]) if not p.exists()), target) \
            if target else "a folder it writes to"
        cause = f"{gone} disappeared while the run was writing {what} (deleted, moved or unmounted)"
        fix = f"put {gone} back (move it back or remount it)"
        if "--resume" in todo:
            todo += "; if it is lost, so are the checkpoints in it: start again without --resume"
    elif code == errno.EIO:
        cause = f"I/O error writing {what} (a failing disk or a lost network file system)"
        fix = "check the disk (dmesg, the file server)"
    else:
        cause = f"writing {what} failed: {err.strerror or err}"
        fix = "fix that"
    return DiskError(f"{cause}. {fix[0].upper()}{fix[1:]}, then {todo}.", path=str(target) if target else None,
                     errno=code)


def remove_quietly(path: Path) -> None:
    """Remove a temporary file or folder; never raises (the disk may be why we are here)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def guarded(target, needed: Needed = None, then: Then = "rerun", cleanup: Iterable[Path] = (),
            what: Optional[str] = None) -> Iterator[None]:
    """Run a write: when it fails, remove ``cleanup`` (its temporary files and folders) and raise the
    OSError behind the failure as a DiskError about ``target`` (see disk_error). Other errors pass
    unchanged."""
    try:
        yield
    except BaseException as e:
        for p in cleanup:
            remove_quietly(p)
        if isinstance(e, PrefalignError):
            raise
        size = needed() if callable(needed) else needed
        err = os_error_of(e)
        if err is None and isinstance(e, Exception):
            err = probe(Path(target), size)  # a writer that hid the cause ("basic_ios::clear: iostream error")
        if err is None:
            raise
        raise disk_error(err, Path(target), size, then, what) from None


def probe(target: Path, needed: Optional[int] = None) -> Optional[OSError]:
    """The OSError a write of ``needed`` bytes next to ``target`` meets now: beyond the file-size
    limit, or in a full or read-only folder (a small write of its own tells). None when writing there
    works. How a failure is explained when the writer's words do not say (torch.save to a path
    reports a full disk as "basic_ios::clear: iostream error")."""
    limit = _fsize_soft_limit()
    if limit is not None and needed is not None and needed > limit:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    folder = existing_ancestor(Path(target).parent)
    test = folder / f".probe-{os.getpid()}.tmp"
    try:
        write_stream(test, lambda f: f.write(b"\0" * (1 << 16)))
    except OSError as e:
        return e
    finally:
        remove_quietly(test)
    return None


class _CountingFile:
    """A binary file that hashes and counts what is written through it and keeps the OSError of a
    failed write (torch.save only reports "unexpected pos" when its writer's write fails)."""

    def __init__(self, f: BinaryIO):
        self.f, self.size, self.sha256, self.error = f, 0, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise

    def fileno(self) -> int:
        return self.f.fileno()


def write_stream(path: Path, write: Callable[[BinaryIO], None]) -> tuple[int, str]:
    """``write(f)`` into a new file ``path``, flushed and fsynced. Returns (bytes, sha256 hex) of what
    was written. A failed write raises its OSError, whatever ``write`` made of it."""
    with open(path, "wb") as raw:
        f = _CountingFile(raw)
        try:
            write(f)
            f.flush()
        except Exception:
            if f.error is not None:
                raise f.error from None
            raise
        os.fsync(raw.fileno())
    return f.size, f.sha256.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Make ``path`` durable: a file's bytes, or a directory's entries (a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data: bytes, then: Then = "rerun") -> None:
    """``data`` into ``path`` through a temporary sibling, fsync and rename: ``path`` holds either its
    old bytes or the new ones, and a failed write leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with guarded(path, len(data), then, cleanup=[tmp]):
        write_stream(tmp, lambda f: f.write(data))
        os.replace(tmp, path)
        fsync_path(path.parent)


def append(path, data: bytes, then: Then = "rerun") -> None:
    """Append ``data`` to ``path``. A write that fails halfway is cut off again, so the file never
    ends in a torn row (a kill can still leave one; readers drop it)."""
    path = Path(path)
    with guarded(path, len(data), then):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


# OUTPUT folders this process has written into: absolute path -> (st_dev, st_ino).
_outputs: dict[str, tuple[int, int]] = {}


def start_run(out) -> None:
    """A run begins (or begins again) in ``out``: its first write may create the folder."""
    _outputs.pop(str(Path(out).absolute()), None)


def output_dir(out, then: Then = "rerun with --resume") -> Path:
    """``out``, created by the first write of a run; later writes find it where it was, or raise a
    DiskError (it was deleted, moved, or unmounted and its mount point left behind). ``then``
    ends the message when creating it fails."""
    path = Path(out).absolute()
    key = str(path)
    try:
        st = os.stat(path)
        now = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        now = None
    seen = _outputs.get(key)
    if seen is not None and now != seen:
        how = "is gone" if now is None else "was replaced by another folder (deleted and recreated, or unmounted)"
        raise DiskError(f"{path} {how} while the run was writing into it. Put the original back (move it back or "
                        f"remount it), then rerun with --resume: it continues from the last complete checkpoint in "
                        f"it; if it is lost, so are the checkpoints in it: start again without --resume.",
                        path=key, errno=errno.ENOENT)
    if now is None:
        with guarded(path, then=then):
            path.mkdir(parents=True, exist_ok=True)
            st = os.stat(path)
        now = (st.st_dev, st.st_ino)
    _outputs[key] = now
    return Path(out)
