"""Opening the user's files and writing ours so that nothing hangs, explodes, runs code, or is lost.

Every entry point (training, validation, evaluation, inference, the sender) reads through these:
- `check_regular_file`: a data, latent, plan or artifact file must be a readable regular file: a
  folder, a FIFO or a device is refused before `open` (a FIFO would block forever).
- `read_npy_header`: a `.npy` file's shape and dtype from its header, checked against the file's
  size before any array is allocated (a 128-byte header can declare terabytes).
- `load_torch_file` / `check_safetensors_file` / `check_artifact`: model artifacts (`latent_comm_head.pt`,
  `model.safetensors`, `pytorch_model.bin`, `optimizer.pt`, `scheduler.pt`, `rng_state*.pth`) read with
  `weights_only=True`; an empty, truncated, corrupt or pickle-bearing file is one `DataError` line
  naming the file. torch's advice to retry with `weights_only=False` is never relayed.
- `write_text_atomic` and `staged_folder`: outputs appear whole or not at all; a failed write
  (full disk) leaves what was there before and no temporary files.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import stat
import tempfile
from typing import Any, Iterator

import numpy as np

from common.constants import HEAD_FILE, HEAD_SAFETENSORS_FILE

MAX_LINE_BYTES = int(os.environ.get("INTERLAT_MAX_LINE_BYTES", 32 << 20))  # one JSONL record (see data.read_records)
INCOMPLETE_MARKER = ".incomplete"  # in a model folder while its files are being replaced
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"


class DataError(ValueError):
    """A problem with the user's data: `str(e)` is one line naming its place; the same in parts for tools
    that report it (validation): `where` (a file, `file:line` or `file[index]`), `sample_id`, `field`, `kind`
    (a kind of `validation.SEVERITY`) and `detail` (what was found and expected, without the place)."""

    def __init__(self, message: str = "", *, where: str | None = None, sample_id: str | None = None,
                 field: str | None = None, kind: str | None = None, detail: str | None = None):
        self.where, self.sample_id, self.field, self.kind = where, sample_id, field, kind
        self.detail = detail if detail is not None else message
        sid = None if sample_id is None else f"id {sample_id!r}"
        super().__init__(message or ": ".join(p for p in (where, sid, field, self.detail) if p))


def _prefix(what: str) -> str:
    return f"{what}: " if what else ""


def _file_error(what: str, path: str, detail: str) -> DataError:
    """`what: path: detail`, with `where` the path and `detail` the reason alone."""
    return DataError(f"{_prefix(what)}{path}: {detail}", where=path, detail=detail)


def check_regular_file(path: str, what: str = "") -> int:
    """Raise `DataError` unless `path` is an existing, readable regular file; returns its size in bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _file_error(what, path, "file not found") from None
    except OSError as e:
        raise _file_error(what, path, f"cannot be read ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _file_error(what, path, "is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise _file_error(what, path, "is not a regular file (a FIFO, device or socket); refused")
    if not os.access(path, os.R_OK):
        raise _file_error(what, path, "cannot be read (permission denied)")
    return st.st_size


# ---------------------------------------------------------------------------------------------
# .npy latents
# ---------------------------------------------------------------------------------------------
def read_npy_header(path: str, what: str = "") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a `.npy` file, checked: NumPy's header, no pickled objects, data all there."""
    size = check_regular_file(path, what)
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
        if magic != NPY_MAGIC:
            kind = "is empty (0 bytes)" if size == 0 else \
                "holds pickled Python objects (refused, never unpickled)" if magic[:1] == b"\x80" else \
                "is not a .npy file (no NumPy header)"
            raise _file_error(what, path, f"{kind}; expected an array saved with np.save")
        try:
            f.seek(0)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            raise _file_error(what, path, f"truncated or corrupt .npy header ({str(e).splitlines()[0][:120]})") \
                from None
        offset = f.tell()
    if dtype.hasobject:
        raise _file_error(what, path, "holds pickled Python objects (refused, never unpickled); expected numbers")
    need = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)  # float: a declared shape may overflow int64
    if offset + need > size:
        raise _file_error(what, path, f"truncated: its header declares shape {tuple(shape)} ({need} bytes of "
                                      f"{dtype}), the file holds {size - offset}")
    return tuple(shape), dtype


# ---------------------------------------------------------------------------------------------
# Model artifacts
# ---------------------------------------------------------------------------------------------
def _numpy_globals() -> list:
    """What a Trainer's `rng_state.pth` holds besides tensors (numpy's RNG state), as transformers allows it."""
    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_torch_file(path: str, what: str = "", mmap: bool = False, allow_numpy: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; any failure is one `DataError` line naming the file.

    `mmap=True` maps tensor storages instead of reading them (a cheap integrity check of a large file).
    `allow_numpy` admits numpy arrays (RNG states), as the Trainer does when it reads them.
    """
    import torch

    size = check_regular_file(path, what)
    if size == 0:
        raise _file_error(what, path, "is empty (0 bytes)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != ZIP_MAGIC:
        kind = "holds a bare pickle" if magic[:1] == b"\x80" else "is not a file written by torch.save"
        raise _file_error(what, path, f"{kind} (no zip archive header); refused, never unpickled")
    try:
        with torch.serialization.safe_globals(_numpy_globals()) if allow_numpy else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
            reason = "holds pickled Python objects other than tensors: refused, never unpickled"
        elif "zip archive" in text or "PytorchStreamReader" in text or isinstance(e, EOFError):
            reason = "truncated or corrupt (its zip archive cannot be read)"
        else:
            first = text.strip().splitlines()[0][:160] if text.strip() else ""
            reason = f"cannot be read ({type(e).__name__}{': ' + first if first else ''})"
        raise _file_error(what, path, reason) from None


def check_safetensors_file(path: str, what: str = "") -> list[str]:
    """The tensor names of a `.safetensors` file whose header and length check out (no tensor is read)."""
    from safetensors import safe_open

    if check_regular_file(path, what) == 0:
        raise _file_error(what, path, "is empty (0 bytes)")
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except Exception as e:
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise _file_error(what, path, f"truncated or corrupt safetensors file ({detail})") from None


# The files of an output folder or checkpoint that are read back, and how to check each.
ARTIFACT_NAMES = (HEAD_FILE, HEAD_SAFETENSORS_FILE, "model.safetensors", "adapter_model.safetensors",
                  "pytorch_model.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")


def check_artifact(path: str, what: str = "") -> None:
    """Check one artifact without loading it into memory: safetensors' header, or torch's archive mapped."""
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        check_safetensors_file(path, what)
    elif name.endswith((".pt", ".pth", ".bin")):
        load_torch_file(path, what, mmap=True, allow_numpy=name.startswith("rng_state"))


def check_model_folder(folder: str, what: str = "") -> None:
    """Every artifact present in an output folder or checkpoint reads safely, and no save was cut short."""
    if not os.path.isdir(folder):
        raise _file_error(what, folder, "no such folder")
    if os.path.exists(os.path.join(folder, INCOMPLETE_MARKER)):
        raise _file_error(what, folder, f"a save into this folder was interrupted ({INCOMPLETE_MARKER} is there): "
                          "its weights and head may come from different runs; use a checkpoint")
    for name in sorted(os.listdir(folder)):
        if name in ARTIFACT_NAMES or (name.startswith("model-") and name.endswith(".safetensors")) or \
                (name.startswith("rng_state") and name.endswith(".pth")):
            check_artifact(os.path.join(folder, name), what)


# ---------------------------------------------------------------------------------------------
# Writing: whole or not at all
# ---------------------------------------------------------------------------------------------
def check_output_file(path: str, what: str = "") -> None:
    """Before any work: `path` can be written as a file (not a folder; its folder exists or can be made)."""
    where = f"{_prefix(what)}{path}"
    if os.path.isdir(path):
        raise DataError(f"{where}: is a folder; expected a file path to write")
    if os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"{where}: is not a regular file; expected a file path to write")
    if len(os.path.basename(path).encode()) > 255:
        raise DataError(f"{where}: file name too long (more than 255 bytes)")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise DataError(f"{where}: cannot be written ({existing} is not a writable folder)")


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder; on failure nothing is left behind."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[:100]}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def staged_folder(target: str, replaces: tuple[str, ...] = ()) -> Iterator[str]:
    """Write a folder's files into a hidden staging folder, then move them into `target`.

    A failure while writing (full disk, an exception) removes the staging folder and leaves
    `target` as it was. While the files are moved, `target` holds `INCOMPLETE_MARKER`: a process
    killed in that short window leaves a folder that readers (`check_model_folder`) refuse instead
    of mixing old and new files. Files of `target` whose names start with one of `replaces` and that
    the new set lacks (e.g. the shards of an earlier, differently sharded save) are removed.
    """
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(target):  # left by a process killed while staging
        if name.startswith(".staging-"):
            shutil.rmtree(os.path.join(target, name), ignore_errors=True)
    stage = tempfile.mkdtemp(prefix=".staging-", dir=target)
    try:
        yield stage
        marker = os.path.join(target, INCOMPLETE_MARKER)
        with open(marker, "w") as f:
            f.write("files of this folder are being replaced; if this file stays, the save was interrupted\n")
        new = set(os.listdir(stage))
        for name in os.listdir(target):
            if name not in new and name.startswith(replaces) and os.path.isfile(os.path.join(target, name)):
                os.unlink(os.path.join(target, name))
        for root, dirs, files in os.walk(stage):
            rel = os.path.relpath(root, stage)
            dest_root = target if rel == "." else os.path.join(target, rel)
            os.makedirs(dest_root, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(dest_root, name))
        os.unlink(marker)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
