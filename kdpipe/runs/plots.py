"""Every picture kdpipe draws, in one place (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdpipe.errors import KdpipeError

__all__ = ["plot_subclass_maps", "draw_cam_grid", "plot_student_curves", "picture_path"]


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
    labels = np.asarray(dataset.labels, dtype=np.int64)
    picks = _one_image_per_class(labels, S.shape[0] // K, num_images)
    cmap = plt.get_cmap("tab10" if K <= 10 else "tab20")
    fig, axes = plt.subplots(
        len(picks) + 1, 2, figsize=(10, 2.6 * (len(picks) + 1)), squeeze=False, gridspec_kw={"width_ratios": [1, 3]}
    )
    for row, i in enumerate(picks):
        c = int(labels[i])
        ids = np.asarray(reader[record.array("subclass_idx")][i, 0]).astype(np.int64)
        _draw_subclass_dots(axes[row, 0], _stored_view(reader, dataset, i), ids % K, cmap, f"#{i} class {c}")
        _draw_score_rows(axes[row, 1], S, c, K, cmap)
    gs = axes[-1, 0].get_gridspec()
    for ax in axes[-1]:
        ax.remove()
    _draw_score_matrix(fig, fig.add_subplot(gs[-1, :]), S, K)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return str(png_path)


def _one_image_per_class(labels: np.ndarray, num_classes: int, num_images: int) -> list[int]:
    """Sample indices taking each class in turn (its first, then second, ... occurrence)."""
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    picks: list[int] = []
    for rank in range(max((len(m) for m in members), default=0)):
        picks.extend(int(m[rank]) for m in members if rank < len(m))
        if len(picks) >= num_images:
            break
    return picks[: max(1, int(num_images))]


def _stored_view(reader, dataset, index: int) -> np.ndarray:
    """Image ``index`` as its first stored view [H, W, 3] (the raw image where views cannot be
    applied: drawing only)."""
    img = dataset.get_batch(np.array([index]))
    if reader.has("views"):
        try:
            img = dataset.policy.apply_images(img, torch.as_tensor(np.asarray(reader["views"][index : index + 1, 0])))
        except Exception:  # noqa: BLE001 - drawing only; fall back to the raw image
            pass
    return img[0].permute(1, 2, 0).numpy()


def _draw_subclass_dots(ax, img: np.ndarray, subclass: np.ndarray, cmap, title: str) -> None:
    """The image with one dot per feature location, coloured by its sub-class k [h, w]."""
    h, w = subclass.shape
    H, W = img.shape[:2]
    ax.imshow(img if img.shape[2] == 3 else img[..., 0], cmap=None if img.shape[2] == 3 else "gray")
    gx, gy = np.meshgrid((np.arange(w) + 0.5) * W / w - 0.5, (np.arange(h) + 0.5) * H / h - 0.5)
    ax.scatter(
        gx.ravel(),
        gy.ravel(),
        c=[cmap(int(k) % cmap.N) for k in subclass.ravel()],
        s=40,
        edgecolors="white",
        linewidths=0.5,
    )
    ax.set_title(title, fontsize=10)
    ax.axis("off")


#: class blocks an S-row panel shows at most: more become hair-thin columns nobody reads
MAX_BLOCKS = 12


def shown_blocks(rows: np.ndarray, c: int, K: int, most: int = MAX_BLOCKS) -> list[int]:
    """The class blocks an S-row panel shows: all where there are few classes, else class
    ``c`` and the classes its sub-classes score highest, in class order."""
    C = rows.shape[1] // K
    if C <= most:
        return list(range(C))
    peak = rows.reshape(rows.shape[0], C, K).max(axis=(0, 2))
    peak[c] = np.inf
    return sorted(int(b) for b in np.argsort(-peak, kind="stable")[:most])


def _draw_score_rows(ax, S: np.ndarray, c: int, K: int, cmap) -> None:
    """Rows S[c*K:(c+1)*K] (class c's sub-classes) over the target class blocks (all of them,
    or with many classes class c's and those it scores highest)."""
    import matplotlib.pyplot as plt

    C = S.shape[0] // K
    rows = S[c * K : (c + 1) * K]
    blocks = shown_blocks(rows, c, K)
    cols = np.concatenate([rows[:, b * K : (b + 1) * K] for b in blocks], axis=1)
    ax.imshow(cols, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=max(float(rows.max()), 1e-9))
    for n in range(1, len(blocks)):
        ax.axvline(n * K - 0.5, color="white", lw=0.8)
    ax.add_patch(plt.Rectangle((blocks.index(c) * K - 0.5, -0.5), K, K, fill=False, ec="red", lw=1.5))
    ax.set_yticks(np.arange(K))
    ax.set_yticklabels([str(k) for k in range(K)], fontsize=9)
    for k, tick in enumerate(ax.get_yticklabels()):
        tick.set_color(cmap(k % cmap.N))
    ax.set_xticks(np.arange(len(blocks)) * K + (K - 1) / 2)
    ax.set_xticklabels([str(b) for b in blocks], fontsize=9)
    which = "target class" if len(blocks) == C else f"target class ({len(blocks)} of {C}: its own and its highest)"
    ax.set_xlabel(f"{which}; {K} columns per class", fontsize=9)
    ax.set_ylabel("sub-class", fontsize=9)
    ax.set_title(f"S rows of class {c}'s sub-classes (red: its own block; dot colours = rows)", fontsize=10)


def _draw_score_matrix(fig, ax, S: np.ndarray, K: int) -> None:
    M = S.shape[0]
    im = ax.imshow(S, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_title(f"score matrix S ({M} x {M} sub-classes: {M // K} classes x {K})", fontsize=10)
    ax.set_xlabel("sub-class (target)", fontsize=9)
    ax.set_ylabel("sub-class (source)", fontsize=9)
    _integer_ticks(ax)
    fig.colorbar(im, ax=ax, fraction=0.03).set_label("score", fontsize=9)


def draw_cam_grid(
    images: torch.Tensor,
    cams: np.ndarray,
    logits: np.ndarray,
    names: list,
    captions: list,
    title: str,
    png_path,
    top: int,
) -> str:
    """One row per image: the image, then the CAMs of its ``top`` classes (by ``logits``)
    upsampled bilinearly and overlaid, each titled with its class and softmax probability.

    Args:
        images: [k, 3, H, W] in [0, 1]; cams: [k, C, h, w]; logits: [k, C];
        names: class names; captions: one title per image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    k = images.shape[0]
    h, w = images.shape[-2:]
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    fig, axes = plt.subplots(
        k, top + 1, figsize=(2.6 * (top + 1) + 1.0, 2.7 * k + 0.6), squeeze=False, layout="constrained"
    )
    overlay = None
    for r in range(k):
        img = images[r].permute(1, 2, 0).numpy()
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(captions[r], fontsize=11)
        for j, c in enumerate(np.argsort(-logits[r])[:top]):
            cam = F.interpolate(
                torch.from_numpy(cams[r, c])[None, None], size=(h, w), mode="bilinear", align_corners=False
            )[0, 0].numpy()
            span = float(cam.max() - cam.min()) or 1.0
            ax = axes[r, j + 1]
            ax.imshow(img)
            # each map scaled to its own range: the colour says where, not how strongly across maps
            overlay = ax.imshow((cam - cam.min()) / span, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            name = str(names[int(c)])
            ax.set_title(f"{'class ' + name if name.isdigit() else name}  p={probs[r, c]:.2f}", fontsize=11)
    for ax in axes.ravel():
        ax.axis("off")
    if overlay is not None:
        bar = fig.colorbar(overlay, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, pad=0.02)
        bar.set_label("CAM, scaled per map (low to high)", fontsize=10)
        bar.set_ticks([0.0, 0.5, 1.0])
    fig.suptitle(title, fontsize=13)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return str(png_path)


def _integer_ticks(ax, x: bool = True, y: bool = True) -> None:
    """Ticks on whole numbers only (epochs, indices: no 2.5 or 1.75)."""
    from matplotlib.ticker import MaxNLocator

    if x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _series(rows: list[dict], key: str) -> list:
    return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]


def _curve_panel(ax, rows: list[dict], lines, title: str, ylabel: str, dashed=()) -> None:
    epochs = [r.get("epoch") for r in rows]
    for key, label in lines:
        if any(key in r for r in rows):
            ax.plot(epochs, _series(rows, key), marker=".", label=label)
    for key in dashed:
        ax.plot(epochs, _series(rows, key), linestyle="--", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _integer_ticks(ax, y=False)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def draw_run_curves(rows: list[dict], title: str, fh) -> None:
    """One run's loss (and its parts) and top-1/top-5 against epoch, as a PNG into ``fh``
    (matplotlib Agg; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=80)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    part_keys = sorted({k for r in rows for k in r if k.startswith("loss_")})
    _curve_panel(
        ax1, rows, (("train_loss", "train loss"), ("test_loss", "test loss (CE)")), "loss", "loss", dashed=part_keys
    )
    values = [v for r in rows for k, v in r.items() if ("loss" in k) and isinstance(v, int | float) and v == v]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax1.set_yscale("log")  # a diverging epoch would flatten every other loss curve to zero
        ax1.set_ylabel("loss (log scale)")
    _curve_panel(
        ax2,
        rows,
        (("train_top1", "train top-1"), ("test_top1", "test top-1"), ("test_top5", "test top-5")),
        "accuracy",
        "accuracy (%)",
    )
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.88, wspace=0.22)  # (tight_layout is slow)
    fig.savefig(fh, format="png")


def plot_student_curves(curves_by_label: dict, png) -> Path:
    """Test top-1 per epoch: one colour per student label, the mean over its runs (seeds) with
    a band from the lowest to the highest. ``curves_by_label``: label -> [per-run top-1 lists]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for label, curves in curves_by_label.items():
        length = min(len(c) for c in curves)
        top1 = np.array([c[:length] for c in curves], dtype=float)
        epochs = np.arange(1, length + 1)
        (line,) = ax.plot(epochs, top1.mean(0), label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(epochs, top1.min(0), top1.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    _integer_ticks(ax, y=False)
    ax.set_title("Students on 10% of digits: test top-1 per epoch (mean over seeds, min-max band)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def picture_path(png) -> str:
    """Where a picture goes: the path as given (its folder made when missing), ``.png`` added
    when it has no extension; an extension matplotlib cannot write is one sentence."""
    import os

    from matplotlib.figure import Figure

    path = os.fspath(png)
    root, ext = os.path.splitext(path)
    formats = Figure().canvas.get_supported_filetypes()
    if not ext:
        path = root + ".png"
    elif ext[1:].lower() not in formats:
        raise KdpipeError(
            f"--png {png}: matplotlib cannot write .{ext[1:]} pictures; use one of {', '.join(sorted(formats))}."
        )
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise KdpipeError(f"--png {png}: the folder {folder} cannot be made ({err.strerror}).") from None
    return path
