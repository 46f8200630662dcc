"""Target kinds: one small class per kind of teacher target (see ``kdpipe.targets.base``).

    Logits()          logits [B, C]                              store: logits
    Cam(r)            cam [B, C, r, r]                           store: cam_r{r} (or cam)
    NativeCam()       cam [B, C, h, w]                           store: cam
    Feature(layer)    feat_<layer> [B, D, h, w]                  store: feat/<layer>
    PenultTopk()      penult_topk_idx / _val [B, h, w, k]        store: targets/<set>/penult_topk_*
    PenultSoftmax()   penult_probs [B, h, w, K]                  online only
    InterSubclass()   inter_probs [B, h, w, C*K_inter]           store: targets/<set>/subclass_idx
    AttentionMaps(p)  at_stage{i}(_half) [B, h, w]               store: at_p{p}/stage{i}(_half)
    HintFeature(l)    hint [B, D, h, w]                          store: hint/feats{l}
    PenultMap()       penult_map [B, D, h, w]                    store: penult_map, static/teacher/*

A method lists the kinds it needs (``Method.kinds()``); everything that moves targets is a
loop over kinds.
"""

from kdpipe.targets.base import KindContext, StoredArray, TargetKind, TeacherOutputs, pool_to
from kdpipe.targets.cam import Cam, NativeCam, pooled_name
from kdpipe.targets.feature import Feature, feature_name
from kdpipe.targets.letkd import InterSubclass, PenultSoftmax, PenultTopk, index_dtype
from kdpipe.targets.logits import Logits
from kdpipe.targets.stages import AttentionMaps, HintFeature, PenultMap

__all__ = [
    "TargetKind",
    "TeacherOutputs",
    "KindContext",
    "StoredArray",
    "pool_to",
    "Logits",
    "Cam",
    "NativeCam",
    "Feature",
    "PenultTopk",
    "PenultSoftmax",
    "InterSubclass",
    "pooled_name",
    "feature_name",
    "index_dtype",
    "AttentionMaps",
    "HintFeature",
    "PenultMap",
]
