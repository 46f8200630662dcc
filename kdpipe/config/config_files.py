"""Config files: one YAML file per paper row (``configs/``), and the references' own YAML files.

kdpipe's format (``kdpipe run``, ``train-student --config``), every section optional but
``teacher``, ``data`` and ``student``::

    name: catkd-resnet32x4-resnet8x4          # default: the file name
    paper: {source: ..., top1: 76.91, reference_config: ...}   # recorded, compared in results
    teacher: {arch: resnet32x4, checkpoint: "${KDPIPE_TEACHERS}/resnet32x4_vanilla/ckpt_epoch_240.pth"}
    data: "cifar100:${KDPIPE_CIFAR100}"
    extract: {views: auto, cam_res: [2], features: [], pad_mode: zero}    # ExtractConfig fields
    cluster: {k_penult: 4096, k_inter: 8, student_grid: null}             # ClusterConfig fields, or null
    student: {student: resnet8x4, method: cat_kd, method_options: {beta: 15}, ...}   # StudentConfig
    seeds: [0, 1, 2]
    notes: ...                                                             # recorded

``${VAR}`` is replaced by the environment variable VAR (one sentence when it is unset);
``--set section.key=value`` overrides any value (YAML syntax for the value).

The references' own files (mdistiller / CAT-KD ``tools/train.py --cfg``: upper-case
sections EXPERIMENT, DISTILLER, SOLVER, CAT_KD, DATASET, KD, DKD, LOG) are read as they are,
with the reference's defaults (``mdistiller/engine/cfg.py``) for keys they omit, and mapped
to a ``StudentConfig`` (``reference_student``). Keys that do not change a kdpipe run (device
numbers, logging frequencies, W&B) are accepted and recorded; an unknown key is one sentence.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdpipe.config.configs import ClusterConfig, ExtractConfig, StudentConfig
from kdpipe.config.fields import SEED_MAX, check_section, check_value
from kdpipe.errors import KdpipeError
from kdpipe.recipes import CIFAR

__all__ = [
    "RowConfig",
    "load_yaml",
    "load_row",
    "apply_sets",
    "is_reference_yaml",
    "reference_student",
    "student_from_file",
]

ROW_SECTIONS = ("name", "paper", "teacher", "data", "extract", "cluster", "student", "seeds", "notes")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class RowConfig:
    """One paper row: everything ``kdpipe run`` needs to make its store and train its students."""

    name: str
    path: str
    teacher_arch: str
    teacher_checkpoint: str
    data: str
    extract: dict
    cluster: dict | None
    student: StudentConfig
    seeds: list = field(default_factory=lambda: [0])
    paper: dict = field(default_factory=dict)
    notes: str = ""


# ------------------------------------------------------------------------------ YAML
def load_yaml(path) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise KdpipeError(f"The config file {path} cannot be read ({err.strerror}).") from None
    except yaml.YAMLError as err:
        raise KdpipeError(f"The config file {path} is not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(doc, dict):
        raise KdpipeError(f"The config file {path} holds no mapping of settings.")
    return doc


def apply_sets(doc: dict, sets, where: str) -> dict:
    """``["student.epochs=2", "seeds=[0,1]"]`` applied to a copy of ``doc`` (dotted keys)."""
    import copy

    import yaml

    doc = copy.deepcopy(doc)
    for item in sets or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise KdpipeError(f"--set takes KEY=VALUE (e.g. student.epochs=2), not {item!r}.")
        parts = key.strip().split(".")
        node = doc
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise KdpipeError(f"--set {key}: {part} in {where} is not a section.")
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return doc


def _expand(value, where: str, strict: bool = True):
    if isinstance(value, str):

        def env(match):
            name = match.group(1)
            if name not in os.environ:
                if not strict:
                    return match.group(0)
                raise KdpipeError(
                    f"{where} uses ${{{name}}}, but the environment variable {name} is not set; "
                    f"set it (e.g. export {name}=/path) or override the value with --set."
                )
            return os.environ[name]

        return _ENV.sub(env, value)
    if isinstance(value, list):
        return [_expand(v, where, strict) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, where, strict) for k, v in value.items()}
    return value


def _fields(cls, section: dict, where: str, exclude=()) -> dict:
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = sorted(set(section) - known)
    if unknown:
        raise KdpipeError(f"{where} has the unknown key {unknown[0]!r}; it takes {', '.join(sorted(known))}.")
    return dict(section)


def _section(doc: dict, key: str, where: str, required: bool = False) -> dict:
    value = doc.get(key)
    if value is None and required:
        raise KdpipeError(f"{where}: {key} must be a mapping of settings, not null.")
    value = value or {}
    if not isinstance(value, dict):
        raise KdpipeError(f"{where}: {key} must be a mapping, not {type(value).__name__}.")
    return value


def _row_sections(doc: dict, teacher: dict, where: str) -> tuple[dict, dict | None, StudentConfig]:
    """The extract, cluster and student sections of a row, every value typed (one sentence)."""
    try:
        extract = _fields(
            ExtractConfig,
            _section(doc, "extract", where),
            f"{where} (extract)",
            exclude=("teacher", "arch", "data", "out", "resume", "overwrite"),
        )
        extract = check_section(ExtractConfig, extract, "extract")
        cluster = doc.get("cluster")
        if cluster is not None:
            cluster = _fields(
                ClusterConfig,
                _section(doc, "cluster", where),
                f"{where} (cluster)",
                exclude=("store", "teacher", "data", "resume", "overwrite"),
            )
            cluster = check_section(ClusterConfig, cluster, "cluster")
        student = _fields(
            StudentConfig, _section(doc, "student", where, required=True), f"{where} (student)", exclude=("store",)
        )
        student.setdefault("data", doc["data"])
        student.setdefault("teacher_arch", teacher["arch"])
        return extract, cluster, StudentConfig(**student)
    except KdpipeError as err:
        raise KdpipeError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise KdpipeError(f"{where} (student): {err}.") from None


# ------------------------------------------------------------------------------ kdpipe rows
def load_row(path, sets=(), strict: bool = True) -> RowConfig:
    """A kdpipe config file, checked key by key; ``strict`` False leaves unset ``${VAR}`` in place
    (``--print-config`` needs no paths)."""
    where = f"The config file {path}"
    doc = apply_sets(load_yaml(path), sets, where)
    if is_reference_yaml(doc):
        raise KdpipeError(
            f"{where} is a reference (mdistiller / CAT-KD) file: pass it to "
            "`kdpipe train-student --config`, not `kdpipe run`."
        )
    unknown = sorted(set(doc) - set(ROW_SECTIONS))
    if unknown:
        raise KdpipeError(f"{where} has the unknown section {unknown[0]!r}; it takes {', '.join(ROW_SECTIONS)}.")
    doc = _expand(doc, where, strict)
    teacher = _section(doc, "teacher", where, required="teacher" in doc)
    for key in ("arch", "checkpoint"):
        if teacher.get(key) is not None and not isinstance(teacher[key], str):
            raise KdpipeError(f"{where}: teacher.{key} must be a string, not {teacher[key]!r}.")
    if doc.get("data") is not None and not isinstance(doc["data"], str):
        raise KdpipeError(f"{where}: data must be a data set spec (a string), not {doc['data']!r}.")
    for key, kind, what in (("paper", dict, "a mapping"), ("name", str, "a string"), ("notes", str, "a string")):
        if doc.get(key) is not None and not isinstance(doc[key], kind):
            raise KdpipeError(f"{where}: {key} must be {what}, not {doc[key]!r}.")
    missing = [k for k in ("arch", "checkpoint") if not teacher.get(k)] + (["data"] if not doc.get("data") else [])
    if missing or "student" not in doc:
        raise KdpipeError(
            f"{where} needs teacher.arch, teacher.checkpoint, data and student "
            f"(missing: {', '.join(missing + ([] if 'student' in doc else ['student']))})."
        )
    extract, cluster, student_cfg = _row_sections(doc, teacher, where)
    seeds = doc.get("seeds", [student_cfg.seed])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX for s in seeds)
    ):
        raise KdpipeError(f"{where}: seeds must be a list of integers from 0 to {SEED_MAX}, not {seeds!r}.")
    return RowConfig(
        name=str(doc.get("name") or Path(path).stem),
        path=str(path),
        teacher_arch=str(teacher["arch"]),
        teacher_checkpoint=str(teacher["checkpoint"]),
        data=str(doc["data"]),
        extract=extract,
        cluster=cluster,
        student=student_cfg,
        seeds=list(seeds),
        paper=dict(doc.get("paper") or {}),
        notes=str(doc.get("notes") or ""),
    )


# ------------------------------------------------------------------------------ reference files
def is_reference_yaml(doc: dict) -> bool:
    """mdistiller / CAT-KD files have upper-case sections (DISTILLER, SOLVER, ...)."""
    return any(k in doc for k in ("DISTILLER", "SOLVER", "EXPERIMENT"))


#: The keys mdistiller/CAT-KD configs use outside the methods' sections, with the reference's
#: default (CAT-KD mdistiller/engine/cfg.py); each method's keys come from the registry
#: (``reference_defaults``). Keys in RECORDED_ONLY do not change a kdpipe run.
SOLVER_DEFAULTS = {
    "EXPERIMENT.PROJECT": "distill",
    "EXPERIMENT.NAME": "",
    "EXPERIMENT.TAG": "default",
    "DATASET.TYPE": "cifar100",
    "DATASET.NUM_WORKERS": 2,
    "DATASET.TEST.BATCH_SIZE": 64,
    "DATASET.REDUCTION": False,
    "DATASET.RESERVED_RATE": 1.0,
    "DATASET.RESERVED_CLASS_NUM": 100,
    "DISTILLER.TYPE": "NONE",
    "DISTILLER.TEACHER": "ResNet50",
    "DISTILLER.STUDENT": "resnet32",
    "SOLVER.TRAINER": "base",
    # cfg.py's SOLVER equals the CIFAR recipe (kdpipe.recipes) except its weight decay: every
    # CIFAR-100 config sets 5e-4, cfg.py's default is 1e-4
    "SOLVER.BATCH_SIZE": CIFAR.batch_size,
    "SOLVER.EPOCHS": CIFAR.epochs,
    "SOLVER.LR": CIFAR.lr,
    "SOLVER.LR_DECAY_STAGES": list(CIFAR.milestones),
    "SOLVER.LR_DECAY_RATE": CIFAR.lr_decay,
    "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.MOMENTUM": CIFAR.momentum,
    "SOLVER.TYPE": "SGD",
    "LOG.TENSORBOARD_FREQ": 500,
    "LOG.SAVE_CHECKPOINT_FREQ": 40,
    "LOG.PREFIX": "./output",
    "LOG.WANDB": True,
    "device": 0,
    "if_test": False,
    "if_Augment": False,
    "if_useFactor": False,
    "if_self_train": False,
}
#: Keys that only steer the reference's logging, devices and bookkeeping: recorded only.
RECORDED_ONLY = {
    "EXPERIMENT.PROJECT",
    "EXPERIMENT.NAME",
    "EXPERIMENT.TAG",
    "DATASET.NUM_WORKERS",
    "DATASET.TEST.BATCH_SIZE",
    "SOLVER.TRAINER",
    "LOG.TENSORBOARD_FREQ",
    "LOG.SAVE_CHECKPOINT_FREQ",
    "LOG.PREFIX",
    "LOG.WANDB",
    "CAT_KD.teacher_dir",
    "CAT_KD.student_dir",
    "device",
    "if_test",
    "if_useFactor",
    "if_self_train",
}
# The references' ImageNet model names -> kdpipe's. CAT-KD's ImageNet "MobileNetV2"
# (mdistiller/models/imagenet/mobilenetv2.py) is a MobileNet (v1), the network mdistiller calls
# MobileNetV1 (mdistiller/models/imagenet/mobilenetv1.py): both are imagenet_mobilenet_v1.
_IMAGENET_NAMES = {
    "ResNet34": "imagenet_resnet34",
    "ResNet18": "imagenet_resnet18",
    "ResNet50": "imagenet_resnet50",
    "MobileNetV2": "imagenet_mobilenet_v1",
    "MobileNetV1": "imagenet_mobilenet_v1",
}


def _flatten(doc: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def reference_defaults() -> dict:
    """Every key kdpipe reads from mdistiller / CAT-KD files, with the reference's default:
    the solver's, and each registered method's (its options' ``yaml`` keys and ``yaml_extra``)."""
    from kdpipe.methods import entries

    keys = dict(SOLVER_DEFAULTS)
    for entry in entries().values():
        keys.update({i.yaml: i.reference_yaml_default for i in entry.infos().values() if i.yaml})
        keys.update(entry.yaml_extra)
        keys.update(entry.yaml_recorded)
    return keys


def _reference_methods() -> dict:
    """DISTILLER.TYPE (upper case) -> kdpipe method name, from the registry."""
    from kdpipe.methods import entries

    return {yaml_name.upper(): e.name for e in entries().values() for yaml_name in e.yaml_names}


def reference_student(doc: dict, where: str) -> tuple[dict, dict]:
    """(StudentConfig fields, recorded keys) of a mdistiller / CAT-KD config file."""
    given = _flatten(doc)
    known = reference_defaults()
    methods = _reference_methods()
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise KdpipeError(
            f"{where} has the key {unknown[0]} that kdpipe does not know (it reads the CAT-KD / "
            f"mdistiller keys of mdistiller/engine/cfg.py for {', '.join(sorted(methods))})."
        )
    v = {**known, **given}
    if check_value("if_Augment", v["if_Augment"], (bool,), False, f"{where}: if_Augment"):
        raise KdpipeError(f"{where} sets if_Augment (TrivialAugment), which kdpipe's stores do not replay.")
    if str(v["SOLVER.TYPE"]).upper() != "SGD":
        raise KdpipeError(
            f"{where} asks for the {v['SOLVER.TYPE']} optimiser; kdpipe trains with SGD as the references do."
        )
    kind = str(v["DISTILLER.TYPE"]).upper()
    if kind not in methods:
        raise KdpipeError(
            f"{where} names the distiller {v['DISTILLER.TYPE']!r}; kdpipe runs "
            f"{', '.join(sorted(methods))} from such files."
        )
    imagenet = str(v["DATASET.TYPE"]).lower() == "imagenet"
    rename = (lambda n: _IMAGENET_NAMES.get(str(n), str(n))) if imagenet else str

    def typed(key: str, name: str, base: type):
        """The file's value of ``key`` as StudentConfig field ``name`` takes it (one sentence)."""
        try:
            return check_value(name, v[key], (base,), False, key)
        except KdpipeError as err:
            raise KdpipeError(f"{where}: {err}") from None

    fields = {
        "student": rename(typed("DISTILLER.STUDENT", "student", str)),
        "teacher_arch": rename(typed("DISTILLER.TEACHER", "teacher_arch", str)),
        "method": methods[kind],
        "method_options": _method_options(methods[kind], v, where),
        "epochs": typed("SOLVER.EPOCHS", "epochs", int),
        "lr": typed("SOLVER.LR", "lr", float),
        "batch_size": typed("SOLVER.BATCH_SIZE", "batch_size", int),
        "momentum": typed("SOLVER.MOMENTUM", "momentum", float),
        "weight_decay": typed("SOLVER.WEIGHT_DECAY", "weight_decay", float),
        "nesterov": False,
        "milestones": typed("SOLVER.LR_DECAY_STAGES", "milestones", list),
        "lr_decay": typed("SOLVER.LR_DECAY_RATE", "lr_decay", float),
        "recipe": "imagenet" if imagenet else "cifar",
    }
    if typed("DATASET.REDUCTION", "reduction", bool):
        fields.update(
            reserved_classes=typed("DATASET.RESERVED_CLASS_NUM", "reserved_classes", int),
            reserved_rate=typed("DATASET.RESERVED_RATE", "reserved_rate", float),
        )
    from kdpipe.methods import get

    recorded_keys = RECORDED_ONLY | set(get(methods[kind]).yaml_recorded)
    recorded = {k: v[k] for k in sorted(recorded_keys) if k in given}
    return fields, recorded


def _method_options(method: str, v: dict, where: str) -> dict:
    """The method's options from the file's values: each option's ``yaml`` key, typed, then
    the method's own reading of its other keys (``Method.options_from_reference``)."""
    from kdpipe.methods import get

    entry = get(method)
    options = {name: info.convert(v[info.yaml], where) for name, info in entry.infos().items() if info.yaml}
    return entry.cls.options_from_reference({k: x for k, x in options.items() if x is not None}, v)


def student_from_file(path, sets=(), overrides: dict | None = None) -> tuple[StudentConfig, dict]:
    """``train-student --config FILE``: (StudentConfig, what the file said for the record).
    ``overrides`` (the command line's options) win over the file."""
    where = f"The config file {path}"
    doc = apply_sets(load_yaml(path), sets, where)
    if is_reference_yaml(doc):
        fields, recorded = reference_student(doc, where)
        record = {"format": "reference", "file": str(path), "recorded": recorded}
    else:
        row = load_row(path, sets, strict=False)
        fields = {k: v for k, v in dataclasses.asdict(row.student).items() if v is not None}
        record = {"format": "kdpipe", "file": str(path), "row": row.name}
    for key, value in (overrides or {}).items():
        if key == "method_options":
            fields["method_options"] = {**fields.get("method_options", {}), **value}
        elif value is not None:
            fields[key] = value
    try:
        return StudentConfig(**fields), record
    except KdpipeError as err:
        raise KdpipeError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise KdpipeError(f"{where}: {err}.") from None
