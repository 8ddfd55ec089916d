"""Checked inputs and atomic outputs.

Inputs: :func:`check_input_file` refuses, before any ``open()``, whatever is not a regular file
(a named pipe would block forever). Outputs: every file is written to a hidden temporary next to
its destination and renamed over it, with the user's umask; a full disk becomes one
:class:`ConvlensError`; :func:`rollback_on_error` removes what a failed command created.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .errors import ConvlensError

MAX_NAME_BYTES = 255
TMP_PREFIX = ".convlens-"
TMP_PATTERN = re.compile(r"^\.convlens-(\d+)-.+\.tmp$")
LEGACY_TMP_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?\.tmp$")  # mkstemp names of convlens ≤ 0.1
LEGACY_TMP_AGE = 3600.0  # seconds: older legacy temporaries cannot belong to a running write


# ---------------------------------------------------------------- inputs
def file_kind(mode: int) -> str:
    """'a named pipe', 'a character device'… for the file type bits of ``mode``."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def stat_input(path: str | os.PathLike) -> os.stat_result:
    """``os.stat(path)`` with every failure worded the same way, as one ConvlensError."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ConvlensError(f"{display(path)}: no such file or folder") from None
    except PermissionError:
        raise ConvlensError(f"{display(path)}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConvlensError(f"{display(path)}: symbolic link loop") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise ConvlensError(f"{display(path)}: file name too long") from None
        raise ConvlensError(f"{display(path)}: {exc.strerror or exc}") from None


def check_input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path when it is a regular file (links followed); else one clear error.

    Checked before any ``open()``: opening a named pipe blocks until a writer appears.
    """
    st = stat_input(path)
    if not stat.S_ISREG(st.st_mode):
        raise ConvlensError(f"{display(path)}: is {file_kind(st.st_mode)}, not a regular {what}")
    if not os.access(path, os.R_OK):
        raise ConvlensError(f"{display(path)}: permission denied")
    return Path(path)


def display(path: str | os.PathLike) -> str:
    """A path as printable text: bytes that are not UTF-8 become U+FFFD."""
    return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ---------------------------------------------------------------- output checks
def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check, without creating anything, that ``path`` is (or can become) a writable folder."""
    path = Path(path)
    probe = path
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    try:
        st = os.stat(probe)
    except OSError:
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode):
        kind = "a broken link" if st is None else file_kind(st.st_mode)
        where = "" if probe == path else f" ({display(probe)} is {kind})"
        if probe == path:
            raise ConvlensError(f"{option} {display(path)}: is {kind}, not a folder")
        raise ConvlensError(f"{option} {display(path)}: cannot create this folder{where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == path:
            raise ConvlensError(f"{option} {display(path)}: folder is not writable")
        raise ConvlensError(f"{option} {display(path)}: cannot create this folder ({display(probe)} is not writable)")
    return path


def check_output_file(path: str | os.PathLike, option: str | None = None) -> Path:
    """Check that ``path`` can be replaced by a regular file: not a folder, device, pipe or socket."""
    path = Path(path)
    label = f"{option} {display(path)}" if option else display(path)
    if len(os.fsencode(path.name)) > MAX_NAME_BYTES:
        raise ConvlensError(f"{label}: file name longer than {MAX_NAME_BYTES} bytes")
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = os.lstat(path).st_mode  # a dangling link is replaced like a file
        if stat.S_ISDIR(mode):
            raise ConvlensError(f"{label}: is a folder; the output file cannot be written there")
        if not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
            raise ConvlensError(f"{label}: is {file_kind(mode)}; refusing to replace it")
    check_output_dir(path.parent, option or "output")
    return path


def same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_out_not_input(out: str | os.PathLike, items: Iterable[str | os.PathLike]) -> None:
    """Refuse an output folder that is one of the input folders (a re-run would read its own outputs)."""
    for item in items:
        if os.path.isdir(item) and same_folder(item, out):
            raise ConvlensError(f"--out {display(out)}: is also an input folder; choose another output folder")


# ---------------------------------------------------------------- output names
def fit_name(stem: str, suffix_bytes: int = 40) -> str:
    """``stem`` as valid UTF-8, shortened (with a short hash) so ``stem + suffix`` fits in 255 bytes."""
    text = display(stem)
    raw = text.encode("utf-8")
    limit = MAX_NAME_BYTES - suffix_bytes
    if len(raw) <= limit:
        return text
    tag = "~" + hashlib.sha1(os.fsencode(stem)).hexdigest()[:8]
    return raw[:limit - len(tag)].decode("utf-8", "ignore") + tag


def distinct_stems(paths: list[Path], suffix_bytes: int = 40) -> list[str]:
    """One output stem per input path; same-name inputs from different folders get -2, -3…"""
    stems, used = [], set()
    for path in paths:
        base = fit_name(path.stem, suffix_bytes + 6)
        stem, k = base, 1
        while stem in used:
            k += 1
            stem = f"{base}-{k}"
        used.add(stem)
        stems.append(stem)
    return stems


# ---------------------------------------------------------------- rollback of a failed command
class OutputLog:
    """Files and folders created by the running command, removed again when it fails."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.dirs: list[Path] = []

    def rollback(self) -> None:
        for path in reversed(self.files):
            with contextlib.suppress(OSError):
                path.unlink()
        for path in reversed(self.dirs):
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty


_logs: list[OutputLog] = []


@contextlib.contextmanager
def rollback_on_error() -> Iterator[OutputLog]:
    """Record what is created inside; on an exception remove it again (files, then empty folders)."""
    log = OutputLog()
    _logs.append(log)
    try:
        yield log
    except BaseException:
        log.rollback()
        raise
    finally:
        _logs.remove(log)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Files written inside stay when the command fails (checkpoints that a re-run resumes from)."""
    saved = _logs[:]
    _logs.clear()
    try:
        yield
    finally:
        _logs[:] = saved


def _record(kind: str, path: Path) -> None:
    for log in _logs:
        getattr(log, kind).append(path)


# ---------------------------------------------------------------- atomic writing
def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> None:
    """Delete hidden temporaries left by killed convlens processes: ours name their PID (removed when
    it no longer runs); those of earlier versions are removed once an hour old."""
    import time

    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not entry.is_file(follow_symlinks=False):
                continue
            match = TMP_PATTERN.match(entry.name)
            stale = (not pid_alive(int(match.group(1)))) if match else (
                bool(LEGACY_TMP_PATTERN.match(entry.name))
                and time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_TMP_AGE)
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents); raise a clear error when it is not a writable folder."""
    path = Path(path)
    check_output_dir(path, "output folder")
    missing = []
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvlensError(f"cannot create output folder {display(path)}: {exc.strerror or exc}") from None
    for created in reversed(missing):
        _record("dirs", created)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConvlensError(f"output folder {display(path)} is not writable")
    remove_stale_temporaries(path)
    return path


def write_error(path: Path, exc: OSError) -> ConvlensError:
    reason = {errno.ENOSPC: "no space left on the device (disk or inodes full)",
              errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
    return ConvlensError(f"cannot write {display(path)}: {reason}")


def temp_path(folder: Path, suffix: str = ".tmp") -> Path:
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    The file gets the permissions a new file would get under the user's umask; ``path`` must not be
    a folder or a special file (never replaced); an OSError (disk full…) becomes a ConvlensError.
    """
    path = Path(path)
    check_output_file(path)
    ensure_dir(path.parent)
    existed = os.path.lexists(path)
    try:
        tmp = temp_path(path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    if not existed:
        _record("files", path)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FdWriter(io.RawIOBase):
    """A seekable binary file on a descriptor whose writes go through :func:`write_all`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        write_all(self.fd, data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8", "surrogateescape"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return display(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    try:
        text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
    except ValueError:
        raise ConvlensError(f"cannot write {display(path)}: the results hold NaN or infinite values") from None
    return write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    check_input_file(path, "JSON file")
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConvlensError(f"cannot read JSON {display(path)}: {exc}") from None


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes(path, buf.getvalue())


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    return write_bytes(path, figure_png(fig, dpi))


def move_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rename ``src`` over ``dst`` (same file system: atomic); ``dst`` is removed again if the command fails."""
    dst = check_output_file(dst)
    existed = os.path.lexists(dst)
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise write_error(dst, exc) from None
    if not existed:
        _record("files", dst)
    return dst


class NpzStream:
    """Arrays written batch by batch, joined into one ``.npz`` at the end (memory flat in the row count).

    ``append(name=array, …)`` adds rows along axis 0 to hidden part files next to ``path`` (or, to
    resume after an interruption, to fixed part files in ``parts``: :meth:`state` says how many rows are
    kept, :meth:`restore` truncates the parts back to such a state); ``close()`` writes the stored
    (uncompressed) npz atomically and removes the parts.
    """

    def __init__(self, path: str | os.PathLike, parts: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        check_output_file(self.path)
        self.folder = ensure_dir(self.path.parent)
        self.parts_dir = None if parts is None else ensure_dir(parts)
        self.parts: dict[str, tuple[Path, int, np.dtype, tuple]] = {}

    def _new_part(self, name: str) -> Path:
        if self.parts_dir is not None:
            part = self._kept_part(name)
            part.write_bytes(b"")
            return part
        return temp_path(self.folder, ".part.tmp")

    def _kept_part(self, name: str) -> Path:
        """The part file of array ``name`` in the parts folder (named by a hash: any array name is safe)."""
        return self.parts_dir / f"{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}.part"

    def state(self) -> dict:
        """Rows, dtype and row shape of every array so far (plain values, for a checkpoint)."""
        return {name: {"rows": rows, "dtype": dtype.str, "shape": list(shape)}
                for name, (_, rows, dtype, shape) in self.parts.items()}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`: the persistent parts are cut back to the rows it counts."""
        if self.parts_dir is None:
            raise ValueError("only an NpzStream with a parts folder can be restored")
        self.parts = {}
        for name, info in state.items():
            part, dtype, shape = self._kept_part(name), np.dtype(info["dtype"]), tuple(info["shape"])
            size = int(info["rows"]) * dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if not part.is_file() or part.stat().st_size < size:
                raise ConvlensError(f"{display(part)}: shorter than its checkpoint says")
            os.truncate(part, size)
            self.parts[name] = (part, int(info["rows"]), dtype, shape)

    def append(self, **arrays: np.ndarray) -> None:
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            if name not in self.parts:
                try:
                    part = self._new_part(name)
                except OSError as exc:
                    raise write_error(self.path, exc) from None
                self.parts[name] = (part, 0, arr.dtype, arr.shape[1:])
            part, rows, dtype, shape = self.parts[name]
            if arr.dtype != dtype or arr.shape[1:] != shape:
                raise ConvlensError(f"{name}: rows of shape {arr.shape[1:]} after {shape}")
            try:
                fd = os.open(part, os.O_WRONLY | os.O_APPEND)
                try:
                    write_all(fd, arr.tobytes())
                finally:
                    os.close(fd)
            except OSError as exc:
                self.discard()
                raise write_error(self.path, exc) from None
            self.parts[name] = (part, rows + len(arr), dtype, shape)

    def close(self) -> Path:
        try:
            with atomic_path(self.path) as tmp:
                fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
                try:
                    self._write_zip(FdWriter(fd))
                finally:
                    os.close(fd)
        finally:
            self.discard()
        return self.path

    def _write_zip(self, raw: FdWriter) -> None:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (part, rows, dtype, shape) in self.parts.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member, open(part, "rb") as src:
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                              "shape": (rows, *shape)}
                    np.lib.format.write_array_header_2_0(member, header)
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        member.write(chunk)

    def discard(self) -> None:
        for part, *_ in self.parts.values():
            with contextlib.suppress(OSError):
                part.unlink()
        self.parts = {}
