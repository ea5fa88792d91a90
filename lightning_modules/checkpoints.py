"""Reading and writing checkpoints safely; every checkpoint the project loads or saves goes through here.

**Loading.** A checkpoint is a pickle, and unpickling a file can run any code the file names: a downloaded
``best.ckpt`` whose ``__reduce__`` calls ``os.system`` runs it on ``torch.load(weights_only=False)``. We load
with ``weights_only=True`` only: torch's restricted unpickler rebuilds tensors and plain containers and refuses
every other import. Everything cfgen writes is of those kinds (hyperparameters are plain dicts,
``networks.blocks._plain``; the RNG states are tuples and tensors, ``callbacks.rng_state``), so nothing needs
allow-listing beyond torch's own defaults, and ``tests/test_user_mistakes.py`` checks that every kind of
checkpoint the experiments write loads this way. A refused, truncated or foreign file raises
``CheckpointError``: one line naming the file and what to do.

**Saving.** ``AtomicCheckpointIO`` writes a checkpoint to a hidden file beside its target, flushes it to disk and
renames it over the target, so a crash, a full disk or ``kill -9`` during the write leaves the previous
checkpoint whole. (Lightning's own writer goes through an fsspec transaction whose temporary file lives in
``/tmp`` and is *copied* over the target, and it swallows a ``PermissionError``: a failed save left a run
reporting success with a stale ``last.ckpt``.) A failed write raises ``CheckpointWriteError``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from torch import nn

__all__ = ["AtomicCheckpointIO", "CheckpointError", "CheckpointWriteError", "check_fits", "load_checkpoint",
           "load_module", "weight_shapes"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: refused as unsafe, unreadable, or of another model. Names the file and the fix."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _explain(path: Path, err: BaseException, what: str) -> str:
    """One line for a checkpoint that ``torch.load(weights_only=True)`` could not load."""
    if isinstance(err, pickle.UnpicklingError):
        name = re.search(r"GLOBAL (\S+)", str(err))
        asks = f"it asks to import {name.group(1)}, which" if name else "it holds an object that"
        return (f"{what} {path} was refused: {asks} no checkpoint of weights needs and loading it could run code. "
                f"Nothing was loaded or run. Use a checkpoint written by cfgen (runs/<experiment>/<run>/"
                f"checkpoints/*.ckpt) from a source you trust.")
    return (f"{what} {path} cannot be read: it is truncated or not a PyTorch checkpoint ({type(err).__name__}: "
            f"{_first_line(err)}). Use another checkpoint (last.ckpt or best.ckpt of a finished run) or train it "
            f"again.")


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> dict[str, Any]:
    """The contents of a checkpoint, loaded weights-only (on the CPU unless ``map_location`` says otherwise)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(_explain(path, err, what)) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{what} {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint "
                              f"(a mapping with a state_dict). Give the .ckpt file of a cfgen run.")
    return checkpoint


def _examples(names: list[str]) -> str:
    return f"{len(names)} (e.g. '{names[0]}')" if names else "0"


def _mismatch(missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    return (f"{_examples(missing)} of the model's weights are missing from it, {_examples(unexpected)} of its "
            f"weights are not in the model and {_examples(reshaped)} have another shape")


def _source_experiment(path: Path) -> str | None:
    """The experiment a checkpoint at ``runs/<exp>/<run>/checkpoints/x.ckpt`` came from (its run's config.yaml)."""
    import yaml  # only for this hint

    config = path.resolve().parent.parent / "config.yaml"
    try:
        name = (yaml.safe_load(config.read_text()) or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return str(name) if name else None


def weight_shapes(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with only its state dict, as storage-free ("meta") tensors: enough for ``check_fits``
    without holding a second copy of the weights."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return {}
    return {"state_dict": {k: v.to("meta") for k, v in state.items() if torch.is_tensor(v)}}


def check_fits(model: nn.Module, checkpoint: Mapping[str, Any], path: str | os.PathLike, experiment: str) -> None:
    """Raise ``CheckpointError`` unless ``checkpoint``'s state dict has exactly ``model``'s weights and shapes:
    the check ``make eval`` and ``resume=`` make before anything is written."""
    path = Path(path)
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} has no state_dict: it is not a Lightning checkpoint. Give the .ckpt file of "
                              f"a cfgen run of {experiment}.")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if not (missing or unexpected or reshaped):
        return
    source = _source_experiment(path)
    hint = (f" It was written by experiment '{source}': evaluate it with EXP={source}." if source and source != experiment
            else " Pass the overrides it was trained with (its run's config.yaml), or a checkpoint of this experiment.")
    raise CheckpointError(f"{path} is not a checkpoint of experiment '{experiment}' ({type(model).__name__}): "
                          f"{_mismatch(missing, unexpected, reshaped)}.{hint}")


def _keys_in(line: str) -> list[str]:
    return re.findall(r'"([^"]+)"', line)


def load_module(cls: type, path: str | os.PathLike, what: str, fix: str, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path)`` on the CPU, weights-only; ``fix`` (e.g. ``make train EXP=...``) ends the
    message when the file is missing or holds another model.

    Nothing but the load itself happens here: the oracles' loaders rely on exactly one module construction
    (and its draws from the global RNG) per call."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; {fix}.")
    try:
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **kwargs)
    except (pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(_explain(path, err, what)) from err
    except RuntimeError as err:
        text = str(err)
        if "Error(s) in loading state_dict" not in text:
            if "PytorchStreamReader" in text or "zip archive" in text:
                raise CheckpointError(_explain(path, err, what)) from err
            raise
        lines = text.splitlines()
        missing = next((_keys_in(line) for line in lines if "Missing key(s)" in line), [])
        unexpected = next((_keys_in(line) for line in lines if "Unexpected key(s)" in line), [])
        reshaped = re.findall(r"size mismatch for ([^:]+):", text)
        raise CheckpointError(f"{what} {path} is not a {cls.__name__} checkpoint: "
                              f"{_mismatch(missing, unexpected, reshaped)}; {fix}.") from err
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{what} {path} is not a {cls.__name__} checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)}); {fix}.") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write-then-rename saving and weights-only loading for the Trainer (``Trainer(plugins=[...])``).

    :param on_saved: called with the path of every checkpoint once it is complete on disk (the runner points
        ``runs/<experiment>/latest`` at a run only then).
    """

    def __init__(self, on_saved: Callable[[Path], None] | None = None) -> None:
        self.on_saved = on_saved

    @staticmethod
    def partial_path(path: Path) -> Path:
        return path.with_name(f".{path.name}.partial")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        partial = self.partial_path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                self._write(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
            _fsync_dir(path.parent)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise CheckpointWriteError(
                f"cannot write checkpoint {path} ({err.strerror or err}); the previous checkpoint is intact. "
                f"Free disk space or make {path.parent} writable, then resume the run."
            ) from err
        if self.on_saved is not None:
            self.on_saved(path)

    def _write(self, f: io.BufferedWriter, data: memoryview) -> None:
        """The one write of the bytes (a seam for the crash-during-write tests)."""
        f.write(data)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Weights-only whatever the caller asks for: resume= and make eval take files users are given. On the CPU
        # by default, as Lightning's own loader: a checkpoint written on a GPU then loads on a machine without one.
        return load_checkpoint(path, map_location="cpu" if map_location is None else map_location)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); directories cannot be opened for syncing on every platform."""
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
