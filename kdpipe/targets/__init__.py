"""Target kinds: one small class per kind of teacher target (see ``kdpipe.targets.base``).

    Logits()          logits [B, C]                              store: logits
    Cam(r)            cam [B, C, r, r]                           store: cam_r{r} (or cam)
    NativeCam()       cam [B, C, h, w]                           store: cam
    Feature(layer)    feat_<layer> [B, D, h, w]                  store: feat/<layer>
    AttentionMaps(p)  at_stage{i}(_half) [B, h, w]               store: at_p{p}/stage{i}(_half)
    HintFeature(l)    hint [B, D, h, w]                          store: hint/feats{l}
    PenultMap()       penult_map [B, D, h, w]                    store: penult_map, static/teacher/*
    PooledFeature()   pooled_feat [B, D]                         store: pooled_feat

A method lists the kinds it needs (``Method.kinds()``); everything that moves targets is a
loop over kinds. A kind only one method uses lives with that method (letKD's:
``kdpipe.methods.letkd.kinds``).
"""

from kdpipe.targets.base import KindContext, StoredArray, TargetKind, TeacherOutputs, pool_to
from kdpipe.targets.cam import Cam, NativeCam, pooled_name
from kdpipe.targets.feature import Feature, feature_name
from kdpipe.targets.logits import Logits
from kdpipe.targets.pooled import PooledFeature
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
    "pooled_name",
    "feature_name",
    "AttentionMaps",
    "HintFeature",
    "PenultMap",
    "PooledFeature",
]
