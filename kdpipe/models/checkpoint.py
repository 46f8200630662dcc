"""Loading teacher checkpoints, and telling which architecture a state dict belongs to.

mdistiller publishes CIFAR teachers as `<arch>_vanilla/ckpt_epoch_240.pth` holding
`{"model": state_dict}`; torchvision publishes bare state dicts; DataParallel training
leaves `module.` prefixes. All three load here, with `weights_only=True` (no pickled code), from a
local path or an fsspec URL (``s3://...``; ``kdpipe.storage``).
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from kdpipe import storage
from kdpipe.errors import CheckpointError, KdpipeError
from kdpipe.models.base import KDModel
from kdpipe.models.registry import build, canonical_names, resolve_builder

# BatchNorm layers gained this buffer in torch 0.4.1; older checkpoints lack it, and a
# missing counter changes nothing at inference, so its absence is not a mismatch.
_BN_COUNTER = "num_batches_tracked"

StateListing = dict[str, tuple[int, ...]]


def _numpy_scalar_globals() -> list:
    """numpy's scalar reconstructor and dtype classes: training scripts often save metrics
    such as best accuracy as numpy scalars next to the weights. They hold data, not code."""
    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    scalar = multiarray.scalar
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    dtype_classes = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes is not None else []
    return [scalar, np.dtype, *dtype_classes]


def _first_line(exc: BaseException) -> str:
    """The informative line of an exception message, without terminal colour codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:  # torch's weights-only refusal names the forbidden global on one of these
        if line.startswith("WeightsUnpickler error:") or "GLOBAL" in line:
            return line
    return lines[0] if lines else ""


def _load_weights_only(path: str | Path) -> object:
    """torch.load(path, weights_only=True) on the CPU, also accepting numpy scalars; any
    failure becomes a CheckpointError. A URL's bytes are read through fsspec first
    (``kdpipe.storage``): torch.load needs a seekable file."""
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5
                raise
            if isinstance(source, io.BytesIO):
                source.seek(0)
            with torch.serialization.safe_globals(_numpy_scalar_globals()):
                return torch.load(source, map_location="cpu", weights_only=True)
    except KdpipeError:
        raise
    except Exception as exc:  # corrupt zip, truncated file, pickled code, ...
        raise CheckpointError(
            f"checkpoint {path} could not be read by torch.load(weights_only=True) "
            f"({type(exc).__name__}: {_first_line(exc)})."
        ) from exc


def extract_state_dict(payload: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: `payload["model"]`, `payload["state_dict"]`
    or the payload itself, with `module.` prefixes stripped."""
    state = payload
    if isinstance(payload, Mapping):
        for wrapper_key in ("model", "state_dict"):
            inner = payload.get(wrapper_key)
            if isinstance(inner, Mapping):
                state = inner
                break
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointError(
            f"checkpoint {path} holds neither {{'model': state_dict}} nor a state dict of tensors "
            f"(found {_describe(payload)})."
        )
    return {_strip_module_prefix(k): v for k, v in state.items()}


def _strip_module_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _describe(payload: object) -> str:
    if isinstance(payload, Mapping):
        keys = list(payload)[:5]
        return f"a {type(payload).__name__} with keys {keys}"
    return f"a {type(payload).__name__}"


def state_listing(model: torch.nn.Module) -> StateListing:
    """key -> shape of a model's state dict, in state-dict order."""
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@functools.cache
def _registered_layout(name: str) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], str, str] | None:
    """(state listing with a 1-class head, head weight key, head bias key) of registered
    model `name`, built once on the meta device (no memory, no initialisation cost); None
    where the model cannot be built here (an ImageNet model without torchvision)."""
    try:
        with torch.device("meta"):
            model = build(name, 1)
    except KdpipeError:
        return None
    head = model.head()
    head_name = next(module_name for module_name, module in model.named_modules() if module is head)
    return tuple(state_listing(model).items()), f"{head_name}.weight", f"{head_name}.bias"


def registered_listing(name: str, num_classes: int) -> StateListing | None:
    """key -> shape of registered model `name` with `num_classes` classes, without building
    it again for each class count; None where it cannot be built here."""
    layout = _registered_layout(name)
    if layout is None:
        return None
    listing, weight_key, bias_key = layout
    expected = dict(listing)
    expected[weight_key] = (num_classes, *expected[weight_key][1:])
    expected[bias_key] = (num_classes,)
    return expected


def _listing_matches(expected: StateListing, found: StateListing) -> bool:
    """True when `found` has exactly `expected`'s keys and shapes (BN counters optional)."""
    for key, shape in expected.items():
        if key not in found:
            if key.endswith(_BN_COUNTER):
                continue
            return False
        if found[key] != shape:
            return False
    return all(key in expected for key in found)


def identify_architecture(found: StateListing) -> tuple[str, int] | None:
    """(canonical name, num_classes) of the registered model whose state dict has exactly
    these keys and shapes, or None. num_classes is read off each candidate's classifier."""
    for name in canonical_names():
        layout = _registered_layout(name)
        if layout is None or layout[1] not in found:
            continue
        num_classes = found[layout[1]][0]
        expected = registered_listing(name, num_classes)
        if expected is not None and _listing_matches(expected, found):
            return name, num_classes
    return None


def _mismatch_summary(expected: StateListing, found: StateListing) -> str:
    missing = [k for k in expected if k not in found and not k.endswith(_BN_COUNTER)]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if reshaped:
        key = reshaped[0]
        parts.append(
            f"{len(reshaped)} shape mismatches (e.g. {key}: checkpoint {list(found[key])}, model {list(expected[key])})"
        )
    return ", ".join(parts)


def load_teacher(name: str, path: str | Path, num_classes: int) -> KDModel:
    """Build registered model `name` with `num_classes` classes, load the checkpoint at
    `path` into it and return it in eval mode.

    Raises CheckpointError when the file is missing or unreadable, holds no state dict, or
    holds a state dict of another architecture or class count (naming the one it looks
    like, where a registered model matches); KdpipeError for an unknown `name`.
    """
    resolve_builder(name)  # unknown names fail before any file is touched
    path = storage.normalize(path)
    if not storage.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file).")
    payload = _load_weights_only(path)
    state = extract_state_dict(payload, path)

    model = build(name, num_classes)
    expected = state_listing(model)
    found = {key: tuple(value.shape) for key, value in state.items()}
    if not _listing_matches(expected, found):
        asked = f"{name} (num_classes={num_classes})"
        tap_points = sorted({key.split(".")[1] for key in found if key.startswith("taps.")})
        without_taps = {key: shape for key, shape in found.items() if not key.startswith("taps.")}
        if tap_points and _listing_matches(expected, without_taps):
            raise CheckpointError(
                f"checkpoint {path} holds a {asked} student with KD-layer taps at "
                f"{', '.join(tap_points)}; load_teacher loads plain models only, so build the "
                f"student, add its method's taps and load the state dict into that."
            )
        guess = identify_architecture(found)
        if guess is not None:
            raise CheckpointError(
                f"checkpoint {path} holds a {guess[0]} state dict (num_classes={guess[1]}), not {asked}."
            )
        raise CheckpointError(
            f"checkpoint {path} does not fit {asked}: {_mismatch_summary(expected, found)}; "
            f"it matches no registered architecture."
        )
    # Fill BN counters an old checkpoint lacks from the fresh model (they are unused in eval).
    own_state = model.state_dict()
    for key in expected:
        if key not in state:
            state[key] = own_state[key]
    model.load_state_dict(state, strict=True)
    return model.eval()
