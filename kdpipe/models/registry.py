"""Name -> builder registry for the model zoo.

Family modules register builders with the `register_model` decorator:

    @register_model("vgg8", "vgg8_bn")
    def vgg8(num_classes: int = 100) -> VGG: ...

The first name is the canonical one (mdistiller's `cifar_model_dict` key where there is
one); the others are aliases that build the same model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from kdpipe.errors import KdpipeError
from kdpipe.models.base import HEAD_KINDS, KDModel

Builder = Callable[..., KDModel]

# name (canonical or alias) -> builder
_BUILDERS: dict[str, Builder] = {}
# name (canonical or alias) -> canonical name
_CANONICAL: dict[str, str] = {}


def register_model(*names: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(num_classes) -> KDModel` under `names` (first = canonical)."""
    if not names:
        raise ValueError("register_model needs at least one name")

    def decorate(builder: Builder) -> Builder:
        for name in names:
            if name in _BUILDERS and _BUILDERS[name] is not builder:
                raise ValueError(f"model name {name!r} is registered twice")
            _BUILDERS[name] = builder
            _CANONICAL[name] = names[0]
        return builder

    return decorate


def available() -> list[str]:
    """Every name `build` accepts, aliases included, sorted case-insensitively."""
    return sorted(_BUILDERS, key=str.lower)


def canonical_names() -> list[str]:
    """One name per distinct architecture (aliases left out), in registration order."""
    return list(dict.fromkeys(_CANONICAL.values()))


def canonical_or_same(name: str) -> str:
    """The canonical name of a registered name or alias (``vgg13_bn`` -> ``vgg13``,
    ``mobile_half`` -> ``MobileNetV2``); an unregistered name unchanged, so per-pair reference
    tables find a pair however the user spelled it."""
    return _CANONICAL.get(str(name), str(name))


def canonical_name(name: str) -> str:
    """The canonical name of a registered name or alias (resolve_builder checks it exists)."""
    resolve_builder(name)
    return _CANONICAL[name]


def resolve_builder(name: str) -> Builder:
    """The builder registered under `name`; an unknown name raises KdpipeError with the
    closest registered names."""
    builder = _BUILDERS.get(name)
    if builder is not None:
        return builder
    lowered = {n.lower(): n for n in _BUILDERS}
    close = [lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), n=4, cutoff=0.5)]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(available())}."
    raise KdpipeError(f"unknown architecture {name!r}{hint}")


def build(name: str, num_classes: int = 100, head: str = "linear") -> KDModel:
    """Build the registered model `name` with a `num_classes`-way classifier, randomly
    initialised as its reference implementation does.

    head: "linear" (mdistiller's / torchvision's linear classifier; state dict exactly
    theirs) or "cam" (the CAT-KD reference student's bias-free 1x1 convolution on the last
    feature map, logits = GAP(CAM); see ``kdpipe.models.base``). The model records it as
    ``model.head_kind``.
    """
    if int(num_classes) < 1:
        raise KdpipeError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if head not in HEAD_KINDS:
        raise KdpipeError(f"head must be one of {', '.join(HEAD_KINDS)}, got {head!r}.")
    model = resolve_builder(name)(num_classes=int(num_classes))
    if head == "cam":
        model.use_cam_head()
    return model
