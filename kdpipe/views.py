"""Augmentation views: enumerate them, seed them, apply them to images and to target maps.

A *view* is a small integer parameter vector that says exactly which augmentation an image
received. Stage one stores the views it ran the teacher on (`views` [N, V, P]); stage two
replays one of them per sample (exact targets) or, with only the identity view stored, draws
a fresh view and warps the stored target maps with `apply_maps` (approximate, ReLabel-style).

Policies (all params int32):

- ``cifar``: (dx, dy, flip). RandomCrop(H, padding=p) + horizontal flip, as torchvision and
  mdistiller do it: pad the image by p on every side, take the H x W window whose top-left
  corner is (dy, dx) in the padded image, then flip it if flip == 1. dx, dy in 0..2p;
  identity (p, p, 0); (2p+1)^2 * 2 views (162 for 32x32, p = 4).
- ``digits``: (dx, dy). The same crop, never flipped (a flipped digit is another digit or
  none); (2p+1)^2 views (81 for 32x32).
- ``imagenet``: (y0, x0, h, w, flip). torchvision's RandomResizedCrop box in the original
  image's pixels (scale (0.08, 1), ratio (3/4, 4/3), ten tries then a centre crop) + flip;
  the box is resized to the output size (224). The boxes depend on each image's size, so
  `sample`/`random` take `sizes` [N, 2]. Infinitely many views; identity is the whole
  image, unflipped.

The padding defaults to max(1, min(H, W) // 8): 4 for 32x32, as the references use.

Seeded views are a pure function of (seed, sample index, view index): each random number is
a splitmix64 hash of those three counters and a draw number, computed vectorised in numpy
uint64. No global RNG is touched, so any shard of a store can be recomputed on its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError

__all__ = [
    "Policy",
    "CropFlipPolicy",
    "CifarPolicy",
    "DigitsPolicy",
    "ImageNetPolicy",
    "get_policy",
    "policy_names",
    "view_table",
    "resolve_views",
    "with_pad_mode",
    "DEFAULT_INFINITE_VIEWS",
    "hash_uniform",
    "random_resized_crop_boxes",
]

PAD_MODES = ("zero", "reflect")
#: Views stored per image for policies with infinitely many (RandomResizedCrop): the
#: default of ``--views auto`` there. Every view of a finite policy is stored instead.
DEFAULT_INFINITE_VIEWS = 8


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers
# ---------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic is the point)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, sample_idx, view_idx, draw: int) -> np.ndarray:
    """Uniform floats in [0, 1), a pure function of (seed, sample, view, draw).

    sample_idx and view_idx broadcast against each other (e.g. [N, 1] and [1, K] -> [N, K]).
    53 bits of the hash become a float64, so every value is exact and platform-independent.
    """
    seed_key = _splitmix64(np.asarray([seed], dtype=np.int64).astype(np.uint64))
    sample_key = np.asarray(sample_idx, dtype=np.int64).astype(np.uint64)
    view_key = np.asarray(view_idx, dtype=np.int64).astype(np.uint64)
    h = _splitmix64(seed_key ^ sample_key)
    h = _splitmix64(h ^ view_key)
    h = _splitmix64(h ^ np.uint64(draw))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _hash_int(seed, sample_idx, view_idx, draw, high: int) -> np.ndarray:
    """Integers uniform in [0, high), same counters as `hash_uniform`."""
    u = hash_uniform(seed, sample_idx, view_idx, draw)
    return np.minimum(np.floor(u * high), high - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------


def _view_counters(sample_idx, num_views) -> tuple[np.ndarray, np.ndarray]:
    """The counters of `Policy.sample`: samples int64 [N, 1] and views int64 [1, K]."""
    sample_idx = np.asarray(sample_idx, dtype=np.int64).reshape(-1)
    num_views = int(num_views)
    if num_views < 1:
        raise KdpipeError(f"the number of views must be at least 1, got {num_views}.")
    return sample_idx[:, None], np.arange(num_views, dtype=np.int64)[None, :]


def _as_params(params, device) -> torch.Tensor:
    """View parameters (numpy or torch, [B, P]) as an int64 tensor on `device`."""
    return torch.as_tensor(np.asarray(params) if not torch.is_tensor(params) else params, device=device).to(torch.int64)


def _check_images(images: torch.Tensor, params: torch.Tensor, param_dim: int) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if params.shape != (images.shape[0], param_dim):
        raise ValueError(f"params must be [B, {param_dim}] with B = {images.shape[0]}, got {tuple(params.shape)}")


class Policy:
    """An augmentation policy: a family of views with integer parameters.

    Subclasses set `name`, `param_dim`, `num_views` (None when infinite) and implement
    `identity`, `_sample_table`, `apply_images` and `_map_theta`.
    """

    name: str = ""
    param_dim: int = 0
    num_views: int | None = None

    def __init__(self, image_size=(32, 32)):
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))

    # --- parameters -----------------------------------------------------------------------

    def identity(self) -> np.ndarray:
        """The view that leaves the image unchanged: int32 [P]."""
        raise NotImplementedError

    def enumerate(self) -> np.ndarray:
        """Every view of a finite policy: int32 [V, P]."""
        raise KdpipeError(
            f"the {self.name} policy has infinitely many views, so views=all is not possible; use views=1 or views=K."
        )

    def sample(self, seed: int, sample_idx, num_views: int, sizes=None) -> np.ndarray:
        """K seeded views per sample: int32 [N, K, P], a pure function of (seed, sample, view).

        sample_idx: int [N] (global sample indices, so a shard gets the same views as the
        whole data set would). sizes: int [N, 2], each sample's source image (H, W), for
        policies whose views depend on it (`ImageNetPolicy`); the others ignore it.
        """
        samples, views = _view_counters(sample_idx, num_views)
        return self._sample_table(int(seed), samples, views).astype(np.int32)

    def _sample_table(self, seed: int, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def random(self, generator: torch.Generator | None, batch_size: int, device=None, sizes=None) -> torch.Tensor:
        """B fresh random views: torch.int32 [B, P] on `device` (default: the generator's).

        One 62-bit seed is drawn from `generator`; the views are then
        `sample(seed, 0..B-1, 1, sizes)`, so a seeded generator gives reproducible views and
        the global RNG is untouched. sizes: int [B, 2] (H, W) as in `sample`.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())
        table = self.sample(seed, np.arange(batch_size), 1, sizes=sizes)[:, 0]
        return torch.from_numpy(table).to(device if device is not None else gen_device)

    # --- application ----------------------------------------------------------------------

    def apply_images(self, images: torch.Tensor, params) -> torch.Tensor:
        """Apply view `params[b]` to `images[b]`: [B, C, H, W] uint8 or unit float -> same.

        Crop/flip happens before normalisation, as torchvision does it.
        """
        raise NotImplementedError

    def _map_theta(self, params: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Affine [B, 2, 3] taking view-output coordinates to source-image coordinates.

        Both in grid_sample's normalised [-1, 1] units (align_corners=False), x first.
        sizes: int [B, 2] source (H, W), used only by policies whose params are in the
        source image's pixels (`ImageNetPolicy`); the others ignore it.
        """
        raise NotImplementedError

    def apply_maps(self, maps: torch.Tensor, params, mode: str = "bilinear", sizes=None) -> torch.Tensor:
        """Warp target maps of the identity view to the view `params` (ReLabel-style).

        maps: [B, C, h, w] covering the un-padded source image (h, w may differ from the
        image's H, W: a map cell is H/h pixels). params: [B, P]. mode: "bilinear" for dense
        maps (CAMs, features, probabilities), "nearest" for discrete maps (cluster indices).

        The view's output window is mapped into the map's coordinates and sampled with
        grid_sample (align_corners=False). Border rule: where the window reaches outside the
        image (the zero- or reflect-padded margin of a crop), the map is extended with its
        border cells (padding_mode="border"): a teacher's map there is unknown, and the
        nearest real cell is a better guess than zero. The flip is applied last.

        sizes: int [B, 2], each sample's source image (H, W), for policies whose params are
        in the source image's pixels (`ImageNetPolicy`); the others ignore it.

        Returns [B, C, h, w] of the maps' dtype (integer maps need mode="nearest" and keep
        their values and dtype exactly).
        """
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        if maps.dim() != 4:
            raise ValueError(f"maps must be [B, C, h, w], got shape {tuple(maps.shape)}")
        params = _as_params(params, maps.device)
        if params.shape != (maps.shape[0], self.param_dim):
            raise ValueError(
                f"params must be [B, {self.param_dim}] with B = {maps.shape[0]}, got {tuple(params.shape)}"
            )
        is_integer = not (maps.dtype.is_floating_point or maps.dtype.is_complex)
        if is_integer and mode != "nearest":
            raise ValueError("integer maps (indices) must be warped with mode='nearest'")
        # float64 keeps integer indices exact (up to 2**53) and the grid free of rounding
        # drift; half-precision maps are sampled in float32 (grid_sample on CPU lacks half).
        if is_integer:
            work_dtype = torch.float64
        elif maps.dtype in (torch.float16, torch.bfloat16):
            work_dtype = torch.float32
        else:
            work_dtype = maps.dtype
        theta = self._map_theta(params, sizes=sizes).to(work_dtype)
        grid = F.affine_grid(theta, list(maps.shape), align_corners=False)
        out = F.grid_sample(maps.to(work_dtype), grid, mode=mode, padding_mode="border", align_corners=False)
        if is_integer:
            out = out.round()
        return out.to(maps.dtype)

    # --- description ----------------------------------------------------------------------

    def spec(self) -> dict:
        """JSON-able description for the store manifest's `views` entry."""
        return {
            "policy": self.name,
            "param_dim": self.param_dim,
            "num_views": self.num_views,
            "image_size": list(self.image_size),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(sorted(self.spec().items()))))


class CropFlipPolicy(Policy):
    """Pad by `padding`, crop back to the image size at offset (dx, dy), optionally flip.

    Parameters: (dx, dy) or (dx, dy, flip) when `flip` is allowed; dx, dy in 0..2*padding.
    `pad_mode` "zero" fills the margin with 0 (torchvision's default, mdistiller);
    "reflect" mirrors the image without repeating the edge (letKD).
    """

    def __init__(
        self, name: str, image_size=(32, 32), padding: int | None = None, flip: bool = True, pad_mode: str = "zero"
    ):
        super().__init__(image_size)
        height, width = self.image_size
        if padding is None:
            padding = max(1, min(height, width) // 8)
        if pad_mode not in PAD_MODES:
            raise KdpipeError(f"pad_mode must be one of {', '.join(PAD_MODES)}; got {pad_mode!r}.")
        if pad_mode == "reflect" and padding >= min(height, width):
            raise KdpipeError(
                f"reflect padding needs padding < image size; got padding {padding} for {height}x{width} images."
            )
        self.name = name
        self.padding = int(padding)
        self.flip = bool(flip)
        self.pad_mode = pad_mode
        self.param_dim = 3 if self.flip else 2
        side = 2 * self.padding + 1
        self.num_views = side * side * (2 if self.flip else 1)

    def identity(self) -> np.ndarray:
        p = self.padding
        return np.array([p, p, 0] if self.flip else [p, p], dtype=np.int32)

    def enumerate(self) -> np.ndarray:
        """All views, ordered flip-major, then dy, then dx (dx fastest): int32 [V, P]."""
        offsets = np.arange(2 * self.padding + 1)
        flips = [0, 1] if self.flip else [0]
        rows = [(dx, dy, f) if self.flip else (dx, dy) for f in flips for dy in offsets for dx in offsets]
        return np.asarray(rows, dtype=np.int32)

    def _sample_table(self, seed, samples, views):
        side = 2 * self.padding + 1
        dx = _hash_int(seed, samples, views, 0, side)
        dy = _hash_int(seed, samples, views, 1, side)
        columns = [dx, dy]
        if self.flip:
            columns.append(_hash_int(seed, samples, views, 2, 2))
        return np.stack(columns, axis=-1)

    def _source_index(self, offset: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Source indices [B, L] in the un-padded image for crop offsets [B] (padded image).

        Returns (index clamped into 0..L-1, inside mask). Reflect padding folds the index
        back without repeating the edge (torch/numpy "reflect"); zero padding marks it outside.
        """
        positions = torch.arange(length, device=offset.device)[None, :]
        index = positions + offset[:, None] - self.padding
        inside = (index >= 0) & (index < length)
        if self.pad_mode == "reflect":
            index = index.abs()
            index = torch.where(index > length - 1, 2 * (length - 1) - index, index)
        return index.clamp(0, length - 1), inside

    def apply_images(self, images: torch.Tensor, params) -> torch.Tensor:
        """Batched crop (+ flip) by index arithmetic: one gather, no per-sample loop.

        Equal, value for value, to torchvision's RandomCrop(H, padding=p, padding_mode=...)
        followed by RandomHorizontalFlip for the same offsets: pad, crop, then flip.
        """
        params = _as_params(params, images.device)
        _check_images(images, params, self.param_dim)
        batch, _, height, width = images.shape
        if (height, width) != self.image_size:
            raise ValueError(
                f"the {self.name} policy is for {self.image_size[0]}x{self.image_size[1]} images, got {height}x{width}"
            )
        rows, rows_inside = self._source_index(params[:, 1], height)  # [B, H]
        # A flipped output column j shows crop column W-1-j.
        columns = torch.arange(width, device=images.device)[None, :].expand(batch, width)
        if self.flip:
            flipped = params[:, 2:3] != 0
            columns = torch.where(flipped, width - 1 - columns, columns)
        cols_src = columns + params[:, 0:1] - self.padding
        cols_inside = (cols_src >= 0) & (cols_src < width)
        if self.pad_mode == "reflect":
            cols_src = cols_src.abs()
            cols_src = torch.where(cols_src > width - 1, 2 * (width - 1) - cols_src, cols_src)
        cols_src = cols_src.clamp(0, width - 1)
        channels = images.shape[1]
        plane = height * width
        # One gather over the flattened H*W plane (several times faster than 4-D advanced
        # indexing, and the result is already [B, C, H, W] contiguous).
        flat_index = rows[:, :, None] * width + cols_src[:, None, :]
        source = images.reshape(batch, channels, plane)
        if self.pad_mode == "zero":
            # Zero padding: positions outside the image read one appended zero pixel.
            inside = rows_inside[:, :, None] & cols_inside[:, None, :]
            flat_index = torch.where(inside, flat_index, plane)
            source = F.pad(source, (0, 1))
        flat_index = flat_index.reshape(batch, 1, plane).expand(batch, channels, plane)
        return source.gather(2, flat_index).reshape(batch, channels, height, width)

    def _map_theta(self, params, sizes=None):
        # Params are in the (fixed) image_size pixels; per-sample sizes do not apply here.
        height, width = self.image_size
        dtype = torch.float64
        shift_x = (params[:, 0].to(dtype) - self.padding) * (2.0 / width)
        shift_y = (params[:, 1].to(dtype) - self.padding) * (2.0 / height)
        scale_x = torch.ones_like(shift_x)
        if self.flip:
            # Flip after crop: output x reads crop position -x.
            scale_x = torch.where(params[:, 2] != 0, -scale_x, scale_x)
        zero = torch.zeros_like(shift_x)
        return torch.stack(
            [
                torch.stack([scale_x, zero, shift_x], dim=-1),
                torch.stack([zero, torch.ones_like(shift_y), shift_y], dim=-1),
            ],
            dim=1,
        )

    def spec(self) -> dict:
        spec = super().spec()
        spec.update(padding=self.padding, pad_mode=self.pad_mode, flip=self.flip)
        return spec


class CifarPolicy(CropFlipPolicy):
    """RandomCrop(32, padding=4) + horizontal flip: params (dx, dy, flip), 162 views."""

    def __init__(self, image_size=(32, 32), padding: int | None = None, pad_mode: str = "zero"):
        super().__init__("cifar", image_size, padding, flip=True, pad_mode=pad_mode)


class DigitsPolicy(CropFlipPolicy):
    """RandomCrop(32, padding=4), no flip: params (dx, dy), 81 views."""

    def __init__(self, image_size=(32, 32), padding: int | None = None, pad_mode: str = "zero"):
        super().__init__("digits", image_size, padding, flip=False, pad_mode=pad_mode)


def _as_sizes(sizes, count: int) -> np.ndarray:
    """Source image sizes as int64 [count, 2] (H, W), every side at least 1."""
    array = np.asarray(sizes, dtype=np.int64)
    if array.shape != (count, 2):
        raise ValueError(f"sizes must be [N, 2] (H, W) with N = {count}, got {array.shape}")
    if count and array.min() < 1:
        raise ValueError("sizes must be positive (H, W) pairs")
    return array


def random_resized_crop_boxes(
    seed: int,
    samples: np.ndarray,
    views: np.ndarray,
    heights,
    widths,
    scale=(0.08, 1.0),
    ratio=(3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> np.ndarray:
    """torchvision's `RandomResizedCrop.get_params`, vectorised over all (sample, view) pairs.

    samples [N, 1], views [1, K] (counters for `hash_uniform`); heights, widths: each
    sample's source image size, broadcastable to [N, K]. Returns int64 [N, K, 4]
    (y0, x0, h, w) in that image's pixels.

    As torchvision: each of `attempts` tries draws an area uniform in scale * H * W and an
    aspect ratio log-uniform in `ratio`, w = round(sqrt(area * r)), h = round(sqrt(area / r))
    (round half to even, as Python's round); the first try with 0 < w <= W and 0 < h <= H
    wins, its corner uniform over the positions that keep the box inside. If none fits,
    the centre crop of the whole image clamped to the ratio range. Draws 4a..4a+3 of
    `hash_uniform` feed try a.
    """
    shape = np.broadcast(samples, views).shape
    height = np.broadcast_to(np.asarray(heights, dtype=np.int64), shape).reshape(-1)
    width = np.broadcast_to(np.asarray(widths, dtype=np.int64), shape).reshape(-1)
    flat_samples = np.broadcast_to(samples, shape).reshape(-1)
    flat_views = np.broadcast_to(views, shape).reshape(-1)
    box = np.zeros((height.size, 4), dtype=np.int64)
    found = np.zeros(height.size, dtype=bool)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # Each try draws only for the boxes still pending (most fit at the first try): the
    # values are those of drawing everything, at a fraction of the hashing.
    pending = np.arange(height.size)
    for attempt in range(attempts):
        if not pending.size:
            break
        draw = 4 * attempt
        s, v, ph, pw = flat_samples[pending], flat_views[pending], height[pending], width[pending]
        target_area = (ph * pw) * (scale[0] + (scale[1] - scale[0]) * hash_uniform(seed, s, v, draw))
        aspect = np.exp(log_lo + (log_hi - log_lo) * hash_uniform(seed, s, v, draw + 1))
        w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
        h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
        fits = (w > 0) & (w <= pw) & (h > 0) & (h <= ph)
        s, v, h, w, ph, pw = s[fits], v[fits], h[fits], w[fits], ph[fits], pw[fits]
        y = np.floor(hash_uniform(seed, s, v, draw + 2) * (ph - h + 1)).astype(np.int64)
        x = np.floor(hash_uniform(seed, s, v, draw + 3) * (pw - w + 1)).astype(np.int64)
        chosen = pending[fits]
        box[chosen] = np.stack([y, x, h, w], axis=-1)
        found[chosen] = True
        pending = pending[~fits]
    # Fallback: torchvision's central crop, the whole image clamped to the ratio range.
    in_ratio = width / height
    tall, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fallback_w = np.where(wide, np.rint(height * max(ratio)), width).astype(np.int64)
    fallback_h = np.where(tall, np.rint(width / min(ratio)), height).astype(np.int64)
    fallback = np.stack([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w], axis=-1)
    return np.where(found[:, None], box, fallback).reshape(shape + (4,))


class ImageNetPolicy(Policy):
    """RandomResizedCrop(image size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip.

    The ImageNet training recipe of torchvision's references and of mdistiller/CAT-KD
    (mdistiller/dataset/imagenet.py: RandomResizedCrop(224) + RandomHorizontalFlip).

    Params int32 (y0, x0, h, w, flip): the crop box in the ORIGINAL (decoded, full
    resolution) image's pixels, drawn as torchvision's `RandomResizedCrop.get_params` draws
    it from that image's own height and width; the box is resized to `image_size` and
    flipped where flip == 1. An ImageFolder store keeps these boxes, so stage two replays
    exactly the view the teacher saw (`ImageFolderDataset.get_views` decodes them with PIL).

    Because the box depends on each image's size, `sample`, `random` and `identity` take the
    source sizes (`sizes` int [N, 2] (H, W), `size` (H, W)). Without them every source image
    is taken to be `image_size` (the behaviour for batches of equal-size tensors, e.g.
    `apply_images` on a resident data set).

    Identity: the whole image, unflipped, (0, 0, H, W, 0): for ImageNet that is the full
    image resized (anisotropically) to image_size, not the test view (Resize + CenterCrop).
    Infinitely many views.
    """

    name = "imagenet"
    param_dim = 5
    num_views = None

    def __init__(self, image_size=(64, 64), scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10):
        super().__init__(image_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.attempts = int(attempts)

    def identity(self, size=None) -> np.ndarray:
        """The whole source image, unflipped: int32 (0, 0, H, W, 0); size (H, W) defaults
        to `image_size`."""
        height, width = self.image_size if size is None else (int(size[0]), int(size[1]))
        return np.array([0, 0, height, width, 0], dtype=np.int32)

    def identity_rows(self, sizes) -> np.ndarray:
        """`identity` for every sample: int32 [N, 5] from sizes int [N, 2] (H, W)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        sizes = _as_sizes(sizes, len(sizes))
        rows = np.zeros((len(sizes), 5), dtype=np.int32)
        rows[:, 2:4] = sizes
        return rows

    def sample(self, seed: int, sample_idx, num_views: int, sizes=None) -> np.ndarray:
        """K seeded boxes per sample: int32 [N, K, 5], a pure function of (seed, sample
        index, view index, that sample's size).

        sizes: int [N, 2] (H, W) of each sample's original image (the data set's
        `image_sizes[sample_idx]`); None takes every image to be `image_size`.
        """
        samples, views = _view_counters(sample_idx, num_views)
        if sizes is None:
            heights, widths = self.image_size
        else:
            sizes = _as_sizes(sizes, samples.shape[0])
            heights, widths = sizes[:, 0:1], sizes[:, 1:2]
        return self._table(int(seed), samples, views, heights, widths).astype(np.int32)

    def _sample_table(self, seed, samples, views):
        return self._table(seed, samples, views, *self.image_size)

    def _table(self, seed, samples, views, heights, widths) -> np.ndarray:
        boxes = random_resized_crop_boxes(seed, samples, views, heights, widths, self.scale, self.ratio, self.attempts)
        flip = _hash_int(seed, samples, views, 4 * self.attempts, 2)
        flip = np.broadcast_to(flip, boxes.shape[:-1])[..., None]
        return np.concatenate([boxes, flip], axis=-1)

    def apply_images(self, images: torch.Tensor, params) -> torch.Tensor:
        """Crop each box and resize it to the image size (bilinear, antialias off), then flip.

        The tensor path, for batches of equal-size images whose boxes are in those images'
        pixels. ImageFolder data never come here: `ImageFolderDataset.get_views` decodes each
        original image and resizes with PIL (antialiased, as torchvision does for PIL).
        One interpolate per sample: boxes differ in size. uint8 images are resized in
        float32 and rounded back.
        """
        params = _as_params(params, images.device)
        _check_images(images, params, self.param_dim)
        out_h, out_w = images.shape[-2:]
        outputs = []
        for image, (y0, x0, h, w, flip) in zip(images, params.tolist()):
            crop = image[:, y0 : y0 + h, x0 : x0 + w]
            if (h, w) != (out_h, out_w):
                resized = F.interpolate(
                    crop[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False
                )[0]
                if images.dtype == torch.uint8:
                    resized = resized.round().clamp(0, 255)
                crop = resized.to(images.dtype)
            if flip:
                crop = crop.flip(-1)
            outputs.append(crop)
        return torch.stack(outputs).contiguous()

    def _map_theta(self, params, sizes=None):
        """Box -> affine over maps that cover the whole source image (the identity view).

        sizes: int [B, 2] (H, W) of each source image; None takes `image_size`.
        """
        dtype = torch.float64
        if sizes is None:
            height = torch.full((params.shape[0],), float(self.image_size[0]), dtype=dtype, device=params.device)
            width = torch.full_like(height, float(self.image_size[1]))
        else:
            size_t = torch.as_tensor(_as_sizes(sizes, params.shape[0]), dtype=dtype, device=params.device)
            height, width = size_t[:, 0], size_t[:, 1]
        y0, x0, h, w, flip = (params[:, i].to(dtype) for i in range(5))
        # Box [x0, x0 + w] in pixels -> centre and half-width in normalised units.
        centre_x = (2 * x0 + w) / width - 1.0
        centre_y = (2 * y0 + h) / height - 1.0
        scale_x = torch.where(flip != 0, -w / width, w / width)
        scale_y = h / height
        zero = torch.zeros_like(centre_x)
        return torch.stack(
            [torch.stack([scale_x, zero, centre_x], dim=-1), torch.stack([zero, scale_y, centre_y], dim=-1)], dim=1
        )

    def spec(self) -> dict:
        spec = super().spec()
        spec.update(scale=list(self.scale), ratio=list(self.ratio))
        return spec


_POLICIES = {"cifar": CifarPolicy, "digits": DigitsPolicy, "imagenet": ImageNetPolicy}


def policy_names() -> list[str]:
    """The names `get_policy` accepts."""
    return sorted(_POLICIES)


def get_policy(name: str, image_size=None, **options) -> Policy:
    """A policy by name: `cifar` / `digits` (options: padding, pad_mode) or `imagenet`.

    image_size defaults to 32x32 for cifar/digits and 64x64 for imagenet.
    """
    if name not in _POLICIES:
        raise KdpipeError(f"unknown view policy {name!r}; expected one of {', '.join(policy_names())}.")
    if image_size is None:
        image_size = (64, 64) if name == "imagenet" else (32, 32)
    return _POLICIES[name](image_size=image_size, **options)


def with_pad_mode(policy: Policy, pad_mode: str | None) -> Policy:
    """``policy`` with its padding mode replaced (crop policies); unchanged for None or for
    policies without padding. A store records its pad mode, and its students use it."""
    if pad_mode is None or not isinstance(policy, CropFlipPolicy) or pad_mode == policy.pad_mode:
        return policy
    if pad_mode not in PAD_MODES:
        raise KdpipeError(f"--pad-mode must be one of {', '.join(PAD_MODES)}, not {pad_mode!r}.")
    clone = type(policy).__new__(type(policy))
    clone.__dict__.update(policy.__dict__)
    clone.pad_mode = pad_mode
    return clone


def resolve_views(policy: Policy, views) -> str:
    """The stored-views mode for ``--views``: "auto" is every view of a finite policy ("all")
    or ``DEFAULT_INFINITE_VIEWS`` seeded views of an infinite one; a K above the number of
    distinct views is refused (asking for duplicates only costs time)."""
    text = str(views).strip().lower()
    if text == "auto":
        return "all" if policy.num_views is not None else str(DEFAULT_INFINITE_VIEWS)
    if text in ("all", "1"):
        return text
    try:
        k = int(text)
    except ValueError:
        raise KdpipeError(f"--views must be auto, all, 1 or a number of seeded views K; got {views!r}.") from None
    if k < 1:
        raise KdpipeError(f"--views must be auto, all, 1 or a number K >= 1; got {views!r}.")
    if policy.num_views is not None and k > policy.num_views:
        raise KdpipeError(
            f"--views {k} asks for more views than the {policy.num_views} distinct views of the "
            f"{policy.name} policy; use --views all."
        )
    return str(k)


def view_table(policy: Policy, n: int, mode, seed: int = 0, start: int = 0) -> np.ndarray:
    """The views to store for samples start..start+n-1: int32 [N, V, P].

    mode "1" (or 1): the identity view only, V = 1. An int K (or its string): K seeded views
    per sample, `policy.sample(seed, sample, K)`. "all": every view of a finite policy, the
    same table for every sample (raises KdpipeError for an infinite policy).
    `start` lets a shard build its rows alone: the table of a shard equals the matching rows
    of the whole table.
    """
    n = int(n)
    mode_text = str(mode).strip().lower()
    if mode_text == "all":
        table = policy.enumerate()
        return np.ascontiguousarray(np.broadcast_to(table, (n,) + table.shape))
    if mode_text == "1":
        identity = policy.identity()
        return np.ascontiguousarray(np.broadcast_to(identity, (n, 1, identity.shape[0])))
    try:
        num_views = int(mode_text)
    except ValueError:
        raise KdpipeError(f"views must be 1, a number of seeded views K, or all; got {mode!r}.") from None
    if num_views < 1:
        raise KdpipeError(f"views must be 1, a number of seeded views K >= 1, or all; got {mode!r}.")
    return policy.sample(seed, np.arange(start, start + n), num_views)
