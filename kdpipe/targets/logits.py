"""The teacher's logits (KD, CAT-KD's class selection): ``logits`` [N, V, C] float16."""

from __future__ import annotations

import torch

from kdpipe.targets.base import StoreContents, StoredArray, TargetKind, TeacherOutputs


class Logits(TargetKind):
    """Target ``logits`` [B, C] float32: the teacher's logits on the student's view.

    Warp keeps the identity view's logits unchanged (they are not spatial); how far that is
    from the online teacher is what ``inspect --fidelity`` measures."""

    listing_order = 0

    name = "logits"
    target_keys = ("logits",)

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if "logits" in contents.names else []

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {"logits": StoredArray("float16", "teacher logits on the image with that view applied")}

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        return {"logits": out.logits.float()}

    def targets(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": rows["logits"].float()}
