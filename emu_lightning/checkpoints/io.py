"""Checkpoints that survive a kill and refuse what is not data.

`SafeCheckpointIO` is the Trainer's checkpoint plugin (the CLI installs it unless a recipe names another):
- save: the bytes go to `<name>.tmp-<pid>` in the checkpoint's own folder, are flushed and fsync'ed, then
  `os.replace`d over the name (atomic on POSIX), so a kill at any moment leaves the previous checkpoint whole; a
  disk that fills up mid-save is an error naming the file, the space it needs and the space free.
  (Lightning's own `_atomic_save` stages through `tempfile.mkstemp()` in the system temp folder; when that is
  another file system the final move is a copy, which a kill can leave half-written.)
- load: `torch.load(weights_only=True)` always: tensors and plain containers only. A file that pickles an
  arbitrary object is refused with a message naming the file and the object.

`rng_state` / `set_rng_state` capture the process RNGs (torch CPU and CUDA, Python, NumPy) as tensors and plain
containers, so they ride in a `weights_only` checkpoint and a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


# What a weights_only `torch.load` raises on a file it cannot take: a refused pickled object, a truncated file, or
# bytes that are no checkpoint at all (the unpickler trips on whatever they happen to encode: KeyError, IndexError...).
LOAD_FAILURES = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, LookupError, ValueError, TypeError)


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with errors that name the file and say why.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file pickles an object other than tensors and plain containers (refused), or it is not a
            torch checkpoint at all (truncated, corrupt).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except LOAD_FAILURES as err:
        # a file that is not a torch checkpoint at all (text, an image) fails inside the unpickler with whatever
        # its bytes happen to trigger (KeyError, IndexError, ...): always name the file and say what it is not
        raise refusal(path, err) from None


def refusal(path: str | os.PathLike, err: BaseException) -> ValueError:
    """The error of a failed `weights_only` load of `path`: a refused pickled object, or an unreadable file."""
    if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):   # a class or function it would import
        lines = str(err).strip().splitlines()
        what = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        return ValueError(f"{path}: refused to load: the file pickles an object that is not a tensor or a plain "
                          f"container ({what.strip()}); only weights_only checkpoints are loaded, since unpickling "
                          f"an arbitrary object can run code")
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [""]
    detail = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0])      # torch's long text: its gist
    return ValueError(f"{path}: not a torch checkpoint, or a truncated / corrupt one ({type(err).__name__}: {detail}); "
                      f"pass a Lightning .ckpt (e.g. <run>/checkpoints/last.ckpt) or a state dict saved by torch.save")


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint object: about what its file needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary name in the same folder, fsync, then rename over `path`.

    Raises:
        OSError: (errno ENOSPC) the disk filled up during the save: the message names the file, about how much it
            needs and how much is free there; the temporary file is removed and a previous `path` is left whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)            # free what the failed write took before measuring what is free
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path.name} is kept whole" if path.exists() else "no earlier file is overwritten"
        raise OSError(err.errno, f"no space left to save {path}: it needs about {_mb(_tensor_bytes(obj))} "
                      f"({_mb(written)} written when the disk filled), {_mb(free)} is free in {path.parent}; "
                      f"{kept}. Free space there, or point the checkpoints at a larger disk "
                      f"(trainer.default_root_dir, or the logger's save_dir)") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)   # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic saves, `weights_only` loads (see the module docstring). Local paths only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"SafeCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise ValueError(f"{path}: weights_only=False was asked for; SafeCheckpointIO loads weights_only only")
        return safe_load(path, map_location or "cpu")


def rng_state() -> dict:
    """The process RNG states, as tensors and plain containers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
