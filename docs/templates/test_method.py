"""Tests of the method template (copy to tests/test_method_<name>.py with the method's file).

1. The loss equals the reference's own function on the same inputs: compute the expected
   value independently (here by hand; for a paper method, with values its reference code
   produced, as tests/test_losses_extra.py does for DKD and AT).
2. The method trains one epoch from a store and from the online teacher (the shared tests in
   tests/test_registry.py and tests/test_methods.py cover every registered method's options;
   add a cached-equals-online test for any new target kind, as tests/test_targets.py does).
"""

from __future__ import annotations

import torch

from kdpipe.methods import get_method


def test_loss_equals_its_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.tensor([0, 1, 2, 3])
    method = get_method("template_method", feat_weight=2.0)
    total, parts = method.loss(student, {}, {"logits": teacher}, labels)
    expected_mse = ((student - teacher) ** 2).mean()
    expected = torch.nn.functional.cross_entropy(student, labels) + 2.0 * expected_mse
    assert torch.allclose(parts["mse"], expected_mse) and torch.allclose(total, expected)
