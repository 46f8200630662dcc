"""letKD's pure tensor functions: the student-side losses and the teacher-side targets.

- ``location_kl(scores, target_probs)``: KL(p_T || p_S) summed over the M channels and
  averaged over the B*h*w locations (PyTorch's ``batchmean`` on the flattened locations, as
  the reference), p_S = softmax over M of the scores at each location.
- ``location_kl_topk``: the same on a sparse target that keeps only the top-k teacher
  probabilities per location (the store's ``penult_topk_idx`` / ``penult_topk_val``).
- ``subclass_score_matrix``: the sub-class score matrix S of letKD-2.
- ``penult_topk_targets`` and ``assign_subclasses``: the teacher-side target computations
  (softmax(-T * ||f - rho||^2) top-k; label-constrained nearest sub-class centre), shared by
  the cluster stage's assignment pass and the online target source through letKD's kinds.

Location order everywhere: locations are flattened in (b, y, x) order, i.e. row
``(b * h + y) * w + x`` of a [(B*h*w), M] target is sample b, row y, column x (a
[B, h, w, M] tensor reshaped to [B*h*w, M]).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError

__all__ = [
    "location_kl",
    "location_kl_topk",
    "densify_topk",
    "subclass_score_matrix",
    "penult_topk_targets",
    "penult_softmax_targets",
    "topk_for_mass",
    "assign_subclasses",
]


# --------------------------------------------------------------------------- losses
def _flat_scores(scores: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B, M, h, w], got {tuple(scores.shape)}")
    B, M, h, w = scores.shape
    return scores.permute(0, 2, 3, 1).reshape(B * h * w, M)


def location_kl(scores: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) summed over M, averaged over the B*h*w locations.

    Args:
        scores: [B, M, h, w] student scores; p_S = softmax over M at each location.
        target_probs: [(B*h*w), M] teacher distributions in (b, y, x) location order, or the
            same as [B, h, w, M]. Rows should sum to 1; 0 * log 0 counts as 0.

    Returns:
        scalar: ``sum_{l, m} p_T[l, m] * (log p_T[l, m] - log p_S[l, m]) / (B*h*w)``.
    """
    log_q = F.log_softmax(_flat_scores(scores), dim=1)
    n, M = log_q.shape
    target = target_probs.reshape(-1, target_probs.shape[-1]).to(log_q.dtype)
    if target.shape != (n, M):
        raise KdpipeError(
            f"letKD targets do not fit the student's KD layer: expected {n} locations x {M} "
            f"clusters, got {tuple(target_probs.shape)} (was the target set built for another "
            "student grid or cluster count?)."
        )
    return F.kl_div(log_q, target, reduction="sum") / n


def _renormalized(topk_val: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    v = topk_val.clamp_min(0)
    return v / v.sum(dim=-1, keepdim=True).clamp_min(eps)


def location_kl_topk(scores: torch.Tensor, topk_idx: torch.Tensor, topk_val: torch.Tensor) -> torch.Tensor:
    """``location_kl`` on a sparse top-k target.

    Args:
        scores: [B, M, h, w] student scores.
        topk_idx: int [B, h, w, k] cluster indices of the k largest teacher probabilities.
        topk_val: [B, h, w, k] those probabilities (as stored: they sum to the retained mass
            <= 1).

    The k values are renormalised to sum 1 at each location before the KL. Why: the dropped
    clusters carry the (small) remaining mass, which the store does not keep; renormalising
    makes the target a proper distribution, so the loss is a true KL (>= 0, 0 iff the student
    matches it), its gradient on the scores is exactly p_S - p_T, and replaying it equals
    ``location_kl`` on the densified target (``densify_topk``). Without it the loss would
    weigh locations by their retained mass and pull p_S towards a sub-normalised vector.
    """
    log_q = F.log_softmax(_flat_scores(scores), dim=1)
    n, M = log_q.shape
    k = topk_idx.shape[-1]
    idx = topk_idx.reshape(-1, k).long()
    if idx.shape[0] != n or topk_val.reshape(-1, k).shape[0] != n:
        raise KdpipeError(
            f"letKD penultimate targets do not fit the student's KD layer: expected {n} "
            f"locations, got {tuple(topk_idx.shape)} (was the target set built for another "
            "student grid?)."
        )
    p = _renormalized(topk_val.reshape(-1, k).to(log_q.dtype))
    log_q_k = torch.gather(log_q, 1, idx)
    kl = torch.xlogy(p, p) - p * log_q_k
    return kl.sum() / n


def densify_topk(
    topk_idx: torch.Tensor, topk_val: torch.Tensor, num_clusters: int, renormalize: bool = True
) -> torch.Tensor:
    """[..., k] indices and values -> dense [..., M] probabilities (renormalised to sum 1)."""
    val = _renormalized(topk_val.float()) if renormalize else topk_val.float()
    out = torch.zeros(*topk_idx.shape[:-1], int(num_clusters), dtype=val.dtype, device=val.device)
    return out.scatter_(-1, topk_idx.long(), val)


# ------------------------------------------------------------- teacher-side targets
def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, K] between rows of x [n, d] and c [K, d]."""
    return ((x * x).sum(1, keepdim=True) + (c * c).sum(1)[None, :] - 2.0 * x @ c.t()).clamp_min(0)


def penult_topk_targets(
    feat: torch.Tensor, centers: torch.Tensor, temperature: float, k: int, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the teacher's soft assignment softmax_K(-T * ||f - rho_K||^2).

    Args:
        feat: [B, D, h, w] teacher penultimate map (already pooled to the student's grid).
        centers: [K, D] K-means centres (``penult_centers``).
        temperature: T (reference 1).
        k: how many of the K probabilities to keep.

    Returns:
        (idx int64 [B, h, w, k], val float32 [B, h, w, k]): probabilities in decreasing order,
        not renormalised (their sum is the retained mass). Computed in float32.
    """
    B, D, h, w = feat.shape
    x = feat.float().permute(0, 2, 3, 1).reshape(-1, D)
    c = centers.float().to(x.device)
    idx_out, val_out = [], []
    for s in range(0, x.shape[0], chunk):
        p = torch.softmax(-float(temperature) * _sq_dists(x[s : s + chunk], c), dim=1)
        val, idx = torch.topk(p, int(k), dim=1)
        idx_out.append(idx)
        val_out.append(val)
    idx = torch.cat(idx_out).reshape(B, h, w, -1)
    val = torch.cat(val_out).reshape(B, h, w, -1)
    return idx, val


def penult_softmax_targets(
    feat: torch.Tensor, centers: torch.Tensor, temperature: float, chunk: int = 8192
) -> torch.Tensor:
    """The whole soft assignment softmax_K(-T * ||f - rho_K||^2), as the letKD reference's
    training computes it every step (no top-k truncation).

    Args:
        feat: [B, D, h, w] teacher penultimate map (already pooled to the student's grid).
        centers: [K, D] K-means centres; temperature: T.

    Returns:
        float32 [B, h, w, K], each location's row summing to 1.
    """
    B, D, h, w = feat.shape
    x = feat.float().permute(0, 2, 3, 1).reshape(-1, D)
    c = centers.float().to(x.device)
    rows = [
        torch.softmax(-float(temperature) * _sq_dists(x[s : s + chunk], c), dim=1) for s in range(0, x.shape[0], chunk)
    ]
    return torch.cat(rows).reshape(B, h, w, -1)


def topk_for_mass(vectors, centers, temperature: float, mass: float, cap: int, chunk: int = 8192) -> tuple[int, int]:
    """The smallest k whose top-k probabilities of softmax_K(-T * ||x - rho_K||^2) sum to at
    least ``mass`` at every vector, capped at ``cap``.

    Args:
        vectors: [n, D] location vectors (numpy or torch).
        centers: [K, D]; temperature: T; mass: in (0, 1]; cap: the largest k allowed.

    Returns:
        (k, k_needed): k = min(cap, k_needed), k_needed the smallest k that holds ``mass`` at
        every vector (float32 arithmetic, a 1e-6 slack for rounding).
    """
    x = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
    c = torch.as_tensor(np.asarray(centers), dtype=torch.float32)
    needed = 1
    for s in range(0, x.shape[0], chunk):
        p = torch.softmax(-float(temperature) * _sq_dists(x[s : s + chunk], c), dim=1)
        cum = torch.sort(p, dim=1, descending=True).values.cumsum(dim=1)
        reached = cum >= float(mass) - 1e-6
        first = torch.where(
            reached.any(dim=1),
            reached.float().argmax(dim=1) + 1,
            torch.full((cum.shape[0],), c.shape[0], dtype=torch.int64),
        )
        needed = max(needed, int(first.max()))
    return min(int(cap), needed), needed


def assign_subclasses(
    feat: torch.Tensor,
    labels: torch.Tensor,
    lda_xbar: torch.Tensor,
    lda_scalings: torch.Tensor,
    subclass_centers: torch.Tensor,
    num_subclasses_per_class: int,
) -> torch.Tensor:
    """Label-constrained sub-class of every location (letKD-2, Algorithm 2 online).

    Args:
        feat: [B, D, h, w] teacher intermediate map (already pooled to the student's grid).
        labels: int [B] image labels y.
        lda_xbar: [D]; lda_scalings: [D, >= d] (sklearn's ``xbar_`` / ``scalings_``).
        subclass_centers: [C*K, d] K-means centres; rows c*K .. c*K+K-1 belong to class c.
        num_subclasses_per_class: K.

    Returns:
        int64 [B, h, w]: y*K + argmin_k ||(f - xbar) @ scalings[:, :d] - rho_y^k||^2
        (ties: lowest k). Computed in float32.
    """
    B, D, h, w = feat.shape
    K = int(num_subclasses_per_class)
    centers = subclass_centers.float().to(feat.device)
    d = centers.shape[1]
    C = centers.shape[0] // K
    z = (
        feat.float().permute(0, 2, 3, 1).reshape(B, h * w, D) - lda_xbar.float().to(feat.device)
    ) @ lda_scalings.float().to(feat.device)[:, :d]
    labels = labels.long().to(feat.device)
    if int(labels.max()) >= C:
        raise KdpipeError(f"label {int(labels.max())} has no sub-class centres ({C} classes).")
    rho = centers.reshape(C, K, d)[labels]  # [B, K, d]
    dist = ((z[:, :, None, :] - rho[:, None, :, :]) ** 2).sum(-1)  # [B, hw, K]
    k_star = dist.argmin(dim=2)
    return (labels[:, None] * K + k_star).reshape(B, h, w)


def subclass_score_matrix(z, subclass_ids, num_subclasses: int, chunk: int = 16384) -> np.ndarray:
    """The sub-class score matrix S [M, M] of letKD-2 (float64 numpy array).

    Args:
        z: [n, d] projected vectors (numpy or torch); computed in float64.
        subclass_ids: int [n] sub-class id of each vector, in 0..M-1.
        num_subclasses: M (= C * K_inter).

    Prototype of sub-class a = mean of its vectors. S[a, b] = share of the vectors of
    sub-class a whose nearest prototype among all (non-empty) sub-classes is b (squared
    Euclidean distance, ties to the lowest index). Each row sums to 1.

    Empty sub-class a (no vectors): it has no prototype, so it is never anyone's nearest
    prototype, and its row is one-hot on itself (S[a, a] = 1): a location assigned to it
    online then gets a confident target on its own sub-class. (The reference divides 0 by
    0 there and gets a NaN row.)
    """
    if isinstance(z, torch.Tensor):
        z = z.detach().cpu().numpy()
    if isinstance(subclass_ids, torch.Tensor):
        subclass_ids = subclass_ids.detach().cpu().numpy()
    z = np.asarray(z, dtype=np.float64)
    ids = np.asarray(subclass_ids).astype(np.int64).reshape(-1)
    M = int(num_subclasses)
    if z.ndim != 2 or z.shape[0] != ids.shape[0]:
        raise ValueError(f"z must be [n, d] with one id per row; got {z.shape}, {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= M):
        raise ValueError(f"sub-class ids must lie in 0..{M - 1}")
    counts = np.bincount(ids, minlength=M).astype(np.int64)
    sums = np.zeros((M, z.shape[1]), dtype=np.float64)
    for j in range(z.shape[1]):
        sums[:, j] = np.bincount(ids, weights=z[:, j], minlength=M)
    present = counts > 0
    protos = sums[present] / counts[present][:, None]
    proto_ids = np.nonzero(present)[0]
    hits = np.zeros((M, M), dtype=np.float64)
    pn = (protos * protos).sum(1)
    for s in range(0, z.shape[0], chunk):
        x = z[s : s + chunk]
        dist = (x * x).sum(1, keepdims=True) + pn[None, :] - 2.0 * x @ protos.T
        nearest = proto_ids[np.argmin(dist, axis=1)]
        hits += np.bincount(ids[s : s + chunk] * M + nearest, minlength=M * M).reshape(M, M)
    S = np.zeros((M, M), dtype=np.float64)
    S[present] = hits[present] / counts[present][:, None]
    empty = np.nonzero(~present)[0]
    S[empty, empty] = 1.0
    return S
