"""Writing files so that nothing is lost: the content is made whole in memory first, written to a temporary file in
the same folder, flushed to disk and renamed over the target (`os.replace`, atomic on POSIX and Windows). A failure
at any step leaves the old file byte-identical and no temporary file behind."""

from __future__ import annotations

import json
import os
import tempfile

from .errors import UsageError


def _mode_for(path: str) -> int:
    """The permissions the file would get from a plain open(): the old file's, else 0666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_bytes(path, data: bytes) -> None:
    """Replace `path` with `data` in one step."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes takes bytes, not {type(data).__name__}")
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {target}: the folder {folder} does not exist")
    if os.path.isdir(target):
        raise UsageError(f"cannot write {target}: it is a folder; give a file name")
    mode = _mode_for(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    except OSError as err:
        raise UsageError(f"cannot write {target}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise UsageError(f"cannot write {target}: {err.strerror or err}") from err
        raise
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); where a folder cannot be opened, the rename still happened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text` in one step."""
    write_bytes(path, text.encode(encoding))


def write_json(path, data, indent: int | None = 1) -> None:
    """Serialise `data` completely (strict JSON: no NaN or Infinity), then replace `path` with it in one step."""
    text = json.dumps(data, indent=indent, allow_nan=False)
    write_text(path, text + "\n")
