"""letKD (BMVC 2023): the method, its target kinds and its stage-one fit, in one package.

- ``method``: ``LetKD`` (``letkd1``, ``letkd2``) and the student's KD layers;
- ``functional``: the pure losses and teacher-side target functions;
- ``kinds``: ``PenultTopk``, ``PenultSoftmax``, ``InterSubclass`` (what the store holds);
- ``fit``: what ``kdpipe cluster`` fits on the teacher's features (LDA, K-means, sub-classes).
"""

from kdpipe.methods.letkd.functional import (
    assign_subclasses,
    densify_topk,
    location_kl,
    location_kl_topk,
    penult_softmax_targets,
    penult_topk_targets,
    subclass_score_matrix,
    topk_for_mass,
)
from kdpipe.methods.letkd.kinds import InterSubclass, PenultSoftmax, PenultTopk, index_dtype
from kdpipe.methods.letkd.method import PENULT_TARGETS, CosConv, KDLayer, LetKD

__all__ = [
    "CosConv",
    "KDLayer",
    "LetKD",
    "PENULT_TARGETS",
    "location_kl",
    "location_kl_topk",
    "densify_topk",
    "subclass_score_matrix",
    "penult_topk_targets",
    "penult_softmax_targets",
    "topk_for_mass",
    "assign_subclasses",
    "PenultTopk",
    "PenultSoftmax",
    "InterSubclass",
    "index_dtype",
]
