"""A student and its method, built the one way train-student, evaluate and the public API
build them: the method bound to the pair, the student's head, its KD modules, the forward its
loss needs, and a finished run's student rebuilt from its config.json.
"""

from __future__ import annotations

from kdpipe.errors import KdpipeError

__all__ = [
    "build_method",
    "recorded_options",
    "resolved_head",
    "build_student_from_config",
    "student_forward",
    "student_loss_fn",
]


def build_method(
    method: str, method_options: dict | None, teacher_arch: str | None, student: str, dataset: str = "cifar"
):
    from kdpipe.methods import get_method

    m = get_method(method, **dict(method_options or {}))
    m.dataset = dataset
    if teacher_arch:
        m.bind(teacher_arch, student, dataset)
    return m


def recorded_options(method: str, resolved: dict) -> dict:
    """The resolved options of a finished run that its method records for the rebuild
    (``Method.recorded_options``); for a sum, each part's under its name."""
    from kdpipe.methods import get
    from kdpipe.methods.composite import split_name

    parts = split_name(method)
    if len(parts) == 1:
        keep = get(parts[0]).cls.recorded_options
        return {k: v for k, v in resolved.items() if k in keep and v is not None}
    return {get(p).name: recorded_options(p, resolved.get(get(p).name) or {}) for p in parts}


def resolved_head(cfg, method) -> str:
    """The student's classifier (``cfg``: a StudentConfig): the config's, else the method's
    (``Method.default_head``: CAT-KD's CAM head, logits = GAP of a bias-free 1x1 conv, CAT-KD
    tools/train.py if_test; mdistiller's linear head otherwise)."""
    head = cfg.head or method.default_head
    if head not in ("linear", "cam"):
        raise KdpipeError(f"--head must be linear or cam, not {head!r}.")
    return head


def build_student_from_config(saved: dict):
    """The student of a finished run, with the KD layers of its method (for evaluate)."""
    from kdpipe.artifacts.target_set import TargetSet
    from kdpipe.models import build

    options = dict(saved.get("method_options") or {})
    # what the run learnt of the teacher to size its KD modules (FitNet's regressor, SimKD's head)
    options.update(recorded_options(saved["method"], saved.get("method_resolved") or {}))
    m = build_method(
        saved["method"], options, saved.get("teacher_arch"), saved["student"], saved.get("recipe") or "cifar"
    )
    model = build(saved["student"], num_classes=int(saved["num_classes"]), head=saved.get("head") or "linear")
    record = saved.get("target_set")
    ts = TargetSet.from_json(record["name"], record, "the run's config.json") if record else None
    m.prepare_student(model, ts)
    return model


def student_forward(model, method):
    """``forward(net, x) -> (logits, features)`` as ``method`` needs them: CE and logit KD read
    logits only, so a plain forward, as plain training of the student does; otherwise
    ``forward_features`` (``net``: the model, or the loop's ``Forward`` / its DDP wrapper)."""
    needs_features = (
        bool(len(getattr(model, "taps", ())))
        or getattr(model, "collect_stages", False)
        or getattr(model, "reused_head", None) is not None
        or any(key != "logits" for kind in method.kinds() for key in kind.target_keys)
    )

    def forward(net, x):
        if needs_features:
            return net(x, features=True)
        return net(x), {}

    return forward


def student_loss_fn(model, method):
    """``loss_fn(net, x, labels, targets) -> (total, parts, logits)`` of the loop (``net``: the
    loop's ``Forward``, DDP-wrapped when data-parallel)."""
    forward = student_forward(model, method)

    def loss_fn(net, x, labels, targets):
        logits, feats = forward(net, x)
        total, parts = method.loss(logits, feats, targets, labels)
        return total, {k: v for k, v in parts.items() if k != "total"}, logits

    loss_fn.begin_epoch = method.begin_epoch  # type: ignore[attr-defined]  # the loop's per-epoch hook
    loss_fn.restarts_optimizer = method.restarts_optimizer  # type: ignore[attr-defined]
    loss_fn.leaves_parameters_unused = method.leaves_parameters_unused  # type: ignore[attr-defined]
    # the options that weigh a distillation term: what the loop's loss-scale warning names
    loss_fn.weight_options = weight_options(method.options)  # type: ignore[attr-defined]
    return loss_fn


def weight_options(options: dict) -> list[str]:
    """The options of ``options`` (a method's, nested for sums of methods) that weigh a
    distillation term: CAT-KD's and DKD's beta, DKD's alpha, ``*_weight`` other than CE's."""
    names: set[str] = set()
    for key, value in options.items():
        if isinstance(value, dict):
            names.update(weight_options(value))
        elif key != "ce_weight" and (key.endswith("_weight") or key in ("alpha", "beta")):
            names.add(key)
    return sorted(names)
