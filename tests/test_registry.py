"""The method registry is the one place methods, their options and defaults are written: the
CLI's flags and help, ``--print-config``, ``kdpipe methods``, docs/METHODS.md's table and the
reading of the references' YAML files all come from it. Every test here is parametrised over
the registry; none lists methods by hand."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from kdpipe.cli import cli
from kdpipe.cli_method_options import option_flag, option_help
from kdpipe.errors import KdpipeError
from kdpipe.methods import CompositeMethod, available, entries, get, get_method, registry
from kdpipe.methods.catalog import DOCS_END, DOCS_START, methods_markdown
from kdpipe.methods.registry import option_infos

ROOT = Path(__file__).resolve().parents[1]
METHODS = list(entries())
WITH_YAML = [name for name, e in entries().items() if e.yaml_names]


def _given_defaults(name: str) -> dict:
    """The registry's defaults of ``name`` that are values (None: the method's own rule)."""
    return {k: v for k, v in get(name).options.defaults().items() if v is not None}


@pytest.mark.parametrize("name", METHODS)
def test_entry_is_complete(name):
    entry = get(name)
    assert entry.summary and entry.module.startswith("kdpipe.methods")
    for opt, info in entry.infos().items():
        assert info.source and info.help, f"{name}.{opt} needs a source and a help text"
        if info.default is not None:
            assert info.convert(info.default, "test") == info.default
    method = entry.build()
    assert method.name == name


@pytest.mark.parametrize("name", METHODS)
def test_unbound_method_uses_the_registry_defaults(name):
    """A method bound to a pair that no reference config covers resolves to the defaults the
    registry shows (per-pair tables apply to the references' pairs only)."""
    options = get_method(name).bind("resnet20", "resnet8").options
    for opt, default in _given_defaults(name).items():
        assert options[opt] == default, f"{name}.{opt}: method resolves {options[opt]!r}, registry says {default!r}"


@pytest.mark.parametrize("name", METHODS)
def test_options_are_typed_and_checked(name):
    for opt, info in get(name).infos().items():
        with pytest.raises(KdpipeError, match=opt):
            get_method(name, **{opt: [1, 2]})
        if info.type is float:
            with pytest.raises(KdpipeError, match=opt):
                get_method(name, **{opt: "fast"})
            with pytest.raises(KdpipeError, match=opt):
                get_method(name, **{opt: math.nan})
    with pytest.raises(KdpipeError, match="no option"):
        get_method(name, no_such_option=1.0)


def test_cli_help_is_generated_from_the_registry():
    result = CliRunner().invoke(cli, ["train-student", "--help"], terminal_width=10_000)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    for opt, per_method in option_infos().items():
        assert option_flag(opt) in flat
        assert " ".join(option_help(per_method).split()) in flat, opt


@pytest.mark.parametrize("name", METHODS)
def test_print_config_shows_the_registry_defaults(tmp_path, name):
    row = {
        "teacher": {"arch": "resnet20", "checkpoint": "teacher.pth"},
        "data": "digits",
        "student": {"student": "resnet8", "method": name},
    }
    (tmp_path / "row.yaml").write_text(yaml.safe_dump(row))
    result = CliRunner().invoke(cli, ["train-student", "--config", str(tmp_path / "row.yaml"), "--print-config"])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["method"] == name
    for opt, default in _given_defaults(name).items():
        assert resolved["method_resolved"][opt] == default


def test_docs_table_is_the_registry():
    text = (ROOT / "docs" / "METHODS.md").read_text()
    assert DOCS_START in text and DOCS_END in text
    table = text.split(DOCS_START, 1)[1].split(DOCS_END, 1)[0].strip()
    assert table == methods_markdown(), "run `kdpipe methods --write-docs docs/METHODS.md`"


def test_methods_command_lists_every_method():
    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0
    for name in METHODS:
        assert f"\n{name}: " in "\n" + result.output


@pytest.mark.parametrize("name", WITH_YAML)
def test_reference_yaml_reads_the_registry_keys(tmp_path, name):
    """A minimal mdistiller / CAT-KD file of the method resolves to its YAML defaults."""
    from kdpipe.config.config_files import student_from_file

    entry = get(name)
    doc = {"DISTILLER": {"TYPE": entry.yaml_names[0], "TEACHER": "resnet32x4", "STUDENT": "resnet8x4"}}
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg, record = student_from_file(path)
    assert cfg.method == name and record["format"] == "reference"
    for opt, info in entry.infos().items():
        if info.yaml and info.reference_yaml_default is not None:
            assert cfg.method_options[opt] == info.reference_yaml_default


@pytest.mark.parametrize("name", WITH_YAML)
def test_reference_yaml_values_are_typed(tmp_path, name):
    entry = get(name)
    keyed = [(opt, info) for opt, info in entry.infos().items() if info.yaml and info.type in (int, float)]
    if not keyed:
        pytest.skip(f"{name} has no numeric YAML option")
    opt, info = keyed[0]
    section, *rest = info.yaml.split(".")
    node: dict = {}
    cursor = node
    for part in rest[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[rest[-1]] = "abc"
    doc = {"DISTILLER": {"TYPE": entry.yaml_names[0]}, section: node}
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(doc))
    from kdpipe.config.config_files import student_from_file

    with pytest.raises(KdpipeError, match=opt):
        student_from_file(path)


# ------------------------------------------------------------------------------ sums
def test_sum_of_methods_unions_kinds_and_adds_losses():
    at, kd = get_method("at"), get_method("kd")
    both = get_method("at+kd", temperature=2.0, at={"feat_weight": 10.0})
    assert isinstance(both, CompositeMethod) and both.name == "at+kd"
    assert both.kinds() == at.kinds() + kd.kinds()
    assert both.options["kd"]["temperature"] == 2.0 and both.options["at"]["feat_weight"] == 10.0
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    stages = [torch.randn(4, 3, 4, 4)]
    maps = {"at_stage1": torch.rand(4, 4, 4), "at_stage1_half": torch.rand(4, 2, 2)}
    feats, targets = {"stages": stages}, {"logits": teacher, **maps}
    total, parts = both.loss(logits, feats, targets, labels)
    at_total, _ = get_method("at", feat_weight=10.0).loss(logits, feats, maps, labels)
    kd_total, _ = get_method("kd", temperature=2.0).loss(logits, {}, {"logits": teacher}, labels)
    assert torch.allclose(total, at_total + kd_total)
    assert {"at.at", "kd.kd", "total"} <= set(parts)


def test_sum_refuses_unknown_parts_and_options():
    with pytest.raises(KdpipeError, match="Unknown method"):
        get_method("at+nosuch")
    with pytest.raises(KdpipeError, match="no part takes"):
        get_method("at+kd", warmup=3)
    with pytest.raises(KdpipeError, match="twice"):
        get_method("kd+kd")


def test_sum_on_the_command_line():
    args = ["train-student", "--student", "resnet8", "--method", "at+kd", "--data", "digits", "--print-config"]
    result = CliRunner().invoke(cli, [*args, "--temperature", "3"])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["method"] == "at+kd" and resolved["method_resolved"]["kd"]["temperature"] == 3.0


# ------------------------------------------------------------------------------ plugins
def test_third_party_method_from_an_entry_point(tmp_path, monkeypatch):
    """A package that names its module in the ``kdpipe.methods`` entry-point group adds a
    method: registry, CLI listing and get_method see it."""
    (tmp_path / "kdpipe_plugin_demo.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            import torch.nn.functional as F

            from kdpipe.methods import Method, MethodOptions, option, register
            from kdpipe.methods.base import loss_parts


            @dataclass
            class HalfCEOptions(MethodOptions):
                weight: float | None = option(0.5, source="a plugin", help="weight of CE")


            @register("half_ce", options=HalfCEOptions, summary="CE times a weight (a plugin)")
            class HalfCE(Method):
                name = "half_ce"

                def __init__(self, weight=None):
                    super().__init__(weight=0.5 if weight is None else float(weight))

                def loss(self, logits, feats, targets, labels):
                    ce = F.cross_entropy(logits, labels) * self.options["weight"]
                    return ce, loss_parts(ce=ce, total=ce)
            """
        )
    )
    dist = tmp_path / "kdpipe_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kdpipe-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kdpipe.methods]\nhalf_ce = kdpipe_plugin_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    try:
        assert "half_ce" in available()
        assert get_method("half_ce", weight=0.25).options == {"weight": 0.25}
        result = CliRunner().invoke(cli, ["methods"])
        assert "half_ce: CE times a weight" in result.output
    finally:
        sys.modules.pop("kdpipe_plugin_demo", None)
    monkeypatch.setattr(registry, "_loaded", False)
