"""Atomic saves: a file or a folder appears at its path complete, or not at all.

Every writer in fluxcore goes through this module:

    with atomic_write(path) as f:          # a binary file, opened under a temp name beside `path`
        f.write(...)                       # on success: flush, fsync, os.replace, fsync the folder
    atomic_write_bytes(path, data)
    atomic_write_text(path, text)
    atomic_write_json(path, obj)           # json.dumps(obj, indent=2) + newline

    with atomic_folder(path, replace=("diffusion_pytorch_model*", "config.json")) as tmp:
        ...write every new file into tmp...
    # on success, files of the old folder that `replace` does not match are carried over (hard
    # links), the complete new folder is swapped in with one rename (an atomic exchange where the
    # OS has one), and the old folder is removed last.

Guarantees: a reader of `path` sees the old content or the new content, never a mix or a partial
file; a save that fails (disk full, file-size limit, permission, an exception in the caller's block,
Ctrl-C) leaves the old content and removes its temp file; two saves racing to one path never mix:
the last to finish wins whole. A process killed mid-save (kill -9, power loss) leaves a hidden temp
`.<name>.<pid>-<token>.partial` beside the target; the next save to that path removes leftovers
whose process is gone, and loaders never read them (they do not end in `.safetensors`/`.json`).

Failures are `fluxcore.errors.SaveError` (an OSError) naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from fluxcore.errors import SaveError

__all__ = [
    "atomic_folder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cleanup_leftovers",
    "is_leftover",
    "temp_path",
]

# .<target name>.<pid>-<8 hex>.partial (a file or folder being written), or .old (an old folder on
# its way out). Hidden, and ending in neither .safetensors nor .json, so no loader picks one up.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>partial|old)$")


def temp_path(path, kind: str = "partial") -> Path:
    """A fresh temp name beside `path`, unique per process and call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def is_leftover(name: str) -> bool:
    """Whether a file name is one of this module's temp names (or the old fixed `*.partial`)."""
    return bool(_TEMP.match(name)) or name.endswith(".partial")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or we cannot tell: keep its files
    return True


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def cleanup_leftovers(path) -> list[Path]:
    """Remove the leftovers of killed saves to `path`: temp files/folders whose process is gone,
    and the fixed-name `<name>.partial` of older versions. If a folder swap was killed between its
    two renames (systems without an atomic exchange) and `path` is missing, the old folder is put
    back first. Returns what was removed. Never raises."""
    path = Path(path)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m.group("name") != path.name or _alive(int(m.group("pid"))):
            continue
        p = Path(entry.path)
        if m.group("kind") == "old" and not path.exists():
            with contextlib.suppress(OSError):
                os.rename(p, path)
                continue
        _remove(p)
        removed.append(p)
    legacy = path.with_name(path.name + ".partial")
    if legacy.is_file():
        _remove(legacy)
        removed.append(legacy)
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _failed(path: Path, e: BaseException, existed: bool) -> SaveError:
    was = "the previous content is unchanged" if existed else "nothing was written there"
    err = SaveError(f"cannot save {path}: {e}; {was}")
    if isinstance(e, OSError):
        err.errno = e.errno
    return err


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temp file beside `path` for writing ("wb", or "w" for text in UTF-8); when the block
    ends without an exception, flush + fsync it, rename it over `path`, fsync the folder. On any
    exception the temp file is removed and `path` is untouched; OS errors become SaveError."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    existed = path.exists()
    cleanup_leftovers(path)
    tmp = temp_path(path)
    try:
        kwargs = {"encoding": "utf-8"} if mode == "w" else {}
        with open(tmp, "xb" if mode == "wb" else "x", **kwargs) as f:  # x: never an existing file
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _remove(tmp)
        if isinstance(e, SaveError):
            raise
        raise _failed(path, e, existed) from e
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# --- folders ----------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, replace: Iterable[str]) -> None:
    """Hard-link (or copy) into `new` what `old` holds that the save does not replace."""
    patterns = list(replace)
    for entry in os.scandir(old):
        name = entry.name
        if is_leftover(name) or (new / name).exists() or any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), new / name)
        elif entry.is_dir():
            shutil.copytree(entry.path, new / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, new / name)


@contextlib.contextmanager
def atomic_folder(path, *, replace: Iterable[str] = ("*",)) -> Iterator[Path]:
    """Build a folder's new content in a temp folder beside `path`, then swap it in whole.

    replace: glob patterns of the names this save owns in `path` (e.g. the weight files and
    config.json): old files matching them are dropped even if the new save does not write them
    (stale shards), and every other entry of the old folder is carried over. The default "*"
    replaces the folder's whole content.
    Old content is removed only after the new folder is in place. Yields the temp folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaveError(f"cannot save a folder at {path}: a file is there")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _failed(path, e, existed) from e
    cleanup_leftovers(path)
    tmp = temp_path(path)
    try:
        tmp.mkdir()
        yield tmp
        if path.is_dir():
            _carry_over(path, tmp, replace)
        for entry in os.scandir(tmp):
            if entry.is_file(follow_symlinks=False):
                with open(entry.path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        _swap_in(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _remove(tmp)
        if isinstance(e, SaveError):
            raise
        raise _failed(path, e, existed) from e
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` at `path`; the old folder (if any) is removed afterwards."""
    for _ in range(10):  # retried only when a concurrent save creates or swaps `path` meanwhile
        if not path.exists():
            try:
                os.rename(tmp, path)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue
        if _exchange(tmp, path):
            _remove(tmp)  # now the old folder
            return
        old = temp_path(path, "old")
        try:
            os.rename(path, old)
        except FileNotFoundError:
            continue
        os.rename(tmp, path)
        _remove(old)
        return
    raise SaveError(f"cannot save {path}: other saves kept replacing it; retry")
