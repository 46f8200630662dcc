"""Every picture kdpipe draws, in one place (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["plot_subclass_maps"]


def plot_subclass_maps(reader, record, num_images: int, png_path, dataset) -> str:
    """letKD supplement Fig. 2: for ``num_images`` images (view 0 of each, spread over the
    classes), the sub-class of every location drawn over the image (colour = sub-class index
    k within the class block), next to the score-matrix rows S[c*K:(c+1)*K] of its class;
    plus a heat map of the whole S. ``record``: the target set (``reader.target_set(name)``).
    Writes ``png_path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = int(record.k_inter)
    S = np.asarray(reader[record.array("subclass_scores")][...])
    M = S.shape[0]
    C = M // K
    labels = np.asarray(dataset.labels, dtype=np.int64)
    # one image per class in turn, first occurrences
    picks: list[int] = []
    for rnd in range(len(labels)):
        for c in range(C):
            where = np.flatnonzero(labels == c)
            if rnd < len(where):
                picks.append(int(where[rnd]))
            if len(picks) >= num_images:
                break
        if len(picks) >= num_images or rnd > len(labels):
            break
    picks = picks[:max(1, int(num_images))]
    cmap = plt.get_cmap("tab10" if K <= 10 else "tab20")
    fig, axes = plt.subplots(len(picks) + 1, 2, figsize=(10, 2.6 * (len(picks) + 1)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3]})
    for row, i in enumerate(picks):
        img = dataset.get_batch(np.array([i]))
        if reader.has("views"):
            try:
                params = torch.as_tensor(np.asarray(reader["views"][i:i + 1, 0]))
                img = dataset.policy.apply_images(img, params)
            except Exception:  # noqa: BLE001 - drawing only; fall back to the raw image
                pass
        img = img[0].permute(1, 2, 0).numpy()
        ids = np.asarray(reader[record.array("subclass_idx")][i, 0]).astype(np.int64)
        c = int(labels[i])
        h, w = ids.shape
        H, W = img.shape[:2]
        ax = axes[row, 0]
        ax.imshow(img if img.shape[2] == 3 else img[..., 0], cmap=None if img.shape[2] == 3 else "gray")
        ys = (np.arange(h) + 0.5) * H / h - 0.5
        xs = (np.arange(w) + 0.5) * W / w - 0.5
        gx, gy = np.meshgrid(xs, ys)
        ax.scatter(gx.ravel(), gy.ravel(), c=[cmap(int(k) % cmap.N) for k in (ids.ravel() % K)], s=40,
                   edgecolors="white", linewidths=0.5)
        ax.set_title(f"#{i} class {c}", fontsize=8)
        ax.axis("off")
        ax = axes[row, 1]
        ax.imshow(S[c * K:(c + 1) * K], aspect="auto", cmap="viridis", interpolation="nearest",
                  vmin=0, vmax=max(float(S[c * K:(c + 1) * K].max()), 1e-9))
        for b in range(1, C):
            ax.axvline(b * K - 0.5, color="white", lw=0.4)
        ax.add_patch(plt.Rectangle((c * K - 0.5, -0.5), K, K, fill=False, ec="red", lw=1.2))
        ax.set_yticks(np.arange(K))
        ax.set_yticklabels([str(k) for k in range(K)], fontsize=6)
        for k, tick in enumerate(ax.get_yticklabels()):
            tick.set_color(cmap(k % cmap.N))
        step = max(1, C // 20)
        ax.set_xticks(np.arange(0, M, K * step) + (K - 1) / 2)
        ax.set_xticklabels([str(j) for j in range(0, C, step)], fontsize=6)
        ax.set_xlabel("target class block of S (columns c*K..c*K+K-1)", fontsize=7)
        ax.set_title(f"S rows of class {c}'s sub-classes (dot colours = row labels)", fontsize=8)
    gs = axes[-1, 0].get_gridspec()
    for ax in axes[-1]:
        ax.remove()
    ax = fig.add_subplot(gs[-1, :])
    im = ax.imshow(S, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_title(f"score matrix S ({M} x {M} sub-classes, {C} classes x {K})", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return str(png_path)
