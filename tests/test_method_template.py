"""docs/templates/method.py is a working method and its test passes: the "Add a method" steps
(copy the template, fill it in, add its test) start from code that runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from kdpipe.methods import available, get, registry

TEMPLATES = Path(__file__).resolve().parents[1] / "docs" / "templates"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_template_registers_and_its_test_passes(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.entries()))
    try:
        _load("kdpipe_method_template", TEMPLATES / "method.py")
        assert "template_method" in available()
        assert get("template_method").options.defaults() == {"feat_weight": 1.0, "ce_weight": 1.0}
        _load("kdpipe_method_template_test", TEMPLATES / "test_method.py").test_loss_equals_its_definition()
    finally:
        sys.modules.pop("kdpipe_method_template", None)
        sys.modules.pop("kdpipe_method_template_test", None)
