"""kdpipe.views: view enumeration, seeding, image and map application."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.views import (
    CifarPolicy,
    DigitsPolicy,
    ImageNetPolicy,
    get_policy,
    view_table,
)


def _reference_crop_flip(images, params, padding, pad_mode):
    """torchvision's RandomCrop(H, padding) + flip, one sample at a time: pad, slice, flip."""
    height, width = images.shape[-2:]
    mode = "constant" if pad_mode == "zero" else "reflect"
    outputs = []
    for image, row in zip(images, params.tolist()):
        padded = F.pad(image[None], (padding,) * 4, mode=mode)[0]
        dx, dy = row[0], row[1]
        crop = padded[:, dy : dy + height, dx : dx + width]
        if len(row) > 2 and row[2]:
            crop = crop.flip(-1)
        outputs.append(crop)
    return torch.stack(outputs)


# --- parameters ---------------------------------------------------------------------------


def test_enumerate_counts_and_identity():
    cifar, digits = CifarPolicy(), DigitsPolicy()
    table = cifar.enumerate()
    assert table.shape == (162, 3) and table.dtype == np.int32
    assert len({tuple(r) for r in table}) == 162
    assert table[:, :2].min() == 0 and table[:, :2].max() == 8
    assert cifar.identity().tolist() == [4, 4, 0] and cifar.num_views == 162
    assert tuple(cifar.identity()) in {tuple(r) for r in table}
    digit_table = digits.enumerate()
    assert digit_table.shape == (81, 2) and len({tuple(r) for r in digit_table}) == 81
    assert digits.identity().tolist() == [4, 4] and digits.param_dim == 2
    # Generic padding: min(H, W) // 8.
    assert CifarPolicy(image_size=(16, 16)).num_views == 5 * 5 * 2
    assert ImageNetPolicy(image_size=(20, 24)).identity().tolist() == [0, 0, 20, 24, 0]


def test_sample_is_pure_and_seeded():
    policy = CifarPolicy()
    first = policy.sample(3, np.arange(100), 8)
    assert first.shape == (100, 8, 3) and first.dtype == np.int32
    assert np.array_equal(first, policy.sample(3, np.arange(100), 8))
    assert not np.array_equal(first, policy.sample(4, np.arange(100), 8))
    # A shard's views equal the matching rows of the whole table.
    assert np.array_equal(policy.sample(3, np.arange(40, 60), 8), first[40:60])
    assert np.array_equal(view_table(policy, 20, 8, seed=3, start=40), first[40:60])
    # Fewer views are a prefix of more views.
    assert np.array_equal(policy.sample(3, np.arange(100), 2), first[:, :2])
    assert first[..., :2].min() >= 0 and first[..., :2].max() <= 8
    assert set(np.unique(first[..., 2])) == {0, 1}
    # Roughly uniform over the 162 views on a large draw, and fast.
    many = policy.sample(0, np.arange(50_000), 8).reshape(-1, 3)
    codes = many[:, 2] * 81 + many[:, 1] * 9 + many[:, 0]
    counts = np.bincount(codes, minlength=162)
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()


def test_random_uses_only_the_generator():
    policy = DigitsPolicy()
    state = torch.random.get_rng_state()
    a = policy.random(torch.Generator().manual_seed(5), 16)
    b = policy.random(torch.Generator().manual_seed(5), 16)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.dtype == torch.int32 and a.shape == (16, 2) and torch.equal(a, b)


def test_view_table_modes():
    cifar = CifarPolicy()
    identity = view_table(cifar, 5, "1", seed=0)
    assert identity.shape == (5, 1, 3) and (identity == np.array([4, 4, 0])).all()
    assert view_table(cifar, 5, 1).shape == (5, 1, 3)
    every = view_table(cifar, 3, "all", seed=0)
    assert every.shape == (3, 162, 3) and (every == every[0]).all()
    seeded = view_table(cifar, 6, "4", seed=1)
    assert seeded.shape == (6, 4, 3) and np.array_equal(seeded, view_table(cifar, 6, 4, seed=1))
    imagenet = ImageNetPolicy(image_size=(32, 32))
    with pytest.raises(KdpipeError, match="infinitely many views"):
        view_table(imagenet, 2, "all", seed=0)
    with pytest.raises(KdpipeError, match="views must be"):
        view_table(cifar, 2, "some", seed=0)
    boxes = view_table(imagenet, 200, 4, seed=0).reshape(-1, 5)
    y0, x0, h, w, flip = boxes.T
    assert (h >= 1).all() and (w >= 1).all() and (y0 + h <= 32).all() and (x0 + w <= 32).all()
    assert (y0 >= 0).all() and (x0 >= 0).all() and set(np.unique(flip)) == {0, 1}
    area = h * w / (32 * 32)
    assert area.min() >= 0.05 and area.max() <= 1.0
    assert len({tuple(b) for b in boxes}) > 700


def test_get_policy():
    assert get_policy("cifar", pad_mode="reflect").pad_mode == "reflect"
    assert get_policy("imagenet").image_size == (64, 64)
    assert get_policy("digits") == DigitsPolicy()
    with pytest.raises(KdpipeError, match="unknown view policy"):
        get_policy("autoaugment")
    with pytest.raises(KdpipeError, match="pad_mode"):
        CifarPolicy(pad_mode="edge")


# --- images -------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_mode", ["zero", "reflect"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_apply_images_equals_per_sample_reference(pad_mode, dtype):
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (24, 3, 32, 32), dtype=dtype, generator=generator)
    else:
        images = torch.rand((24, 3, 32, 32), generator=generator)
    for policy in (CifarPolicy(pad_mode=pad_mode), DigitsPolicy(pad_mode=pad_mode)):
        params = policy.sample(11, np.arange(24), 1)[:, 0]
        params[0] = policy.enumerate()[0]  # (0, 0[, 0]): the corner crop
        params[1] = policy.enumerate()[-1]  # (8, 8[, 1]): the other corner
        out = policy.apply_images(images, params)
        assert out.dtype == dtype and out.shape == images.shape
        assert torch.equal(out, _reference_crop_flip(images, params, 4, pad_mode))
        identity = np.tile(policy.identity(), (24, 1))
        assert torch.equal(policy.apply_images(images, identity), images)
    # Other sizes: padding 2 on 16x20.
    small = CifarPolicy(image_size=(16, 20), pad_mode=pad_mode)
    images = torch.rand((5, 3, 16, 20), generator=generator).to(dtype)
    params = torch.from_numpy(small.sample(2, np.arange(5), 1)[:, 0])
    assert torch.equal(small.apply_images(images, params), _reference_crop_flip(images, params, 2, pad_mode))


def test_apply_images_every_cifar_view_on_one_image():
    policy = CifarPolicy()
    table = policy.enumerate()
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    images = image.expand(len(table), -1, -1, -1)
    out = policy.apply_images(images, table)
    assert torch.equal(out, _reference_crop_flip(images, table, 4, "zero"))
    assert len({bytes(x.numpy()) for x in out}) == 162


def test_imagenet_apply_images():
    policy = ImageNetPolicy(image_size=(16, 16))
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    identity = np.tile(policy.identity(), (6, 1))
    assert torch.equal(policy.apply_images(images, identity), images)
    params = policy.sample(0, np.arange(6), 1)[:, 0]
    out = policy.apply_images(images, params)
    assert out.shape == images.shape and out.dtype == torch.uint8
    y0, x0, h, w, flip = params[1].tolist()
    crop = images[1:2, :, y0 : y0 + h, x0 : x0 + w].float()
    expected = (
        F.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)[0]
    )
    if flip:
        expected = expected.flip(-1)
    assert torch.equal(out[1], expected)
    flipped = np.tile(policy.identity(), (6, 1))
    flipped[:, 4] = 1
    assert torch.equal(policy.apply_images(images.float(), flipped), images.float().flip(-1))


# --- maps ---------------------------------------------------------------------------------


def test_apply_maps_identity_flip_and_one_cell_shift():
    policy = CifarPolicy()  # 32x32 images, maps 8x8: one cell = 4 pixels
    maps = torch.randn(2, 5, 8, 8)
    identity = np.tile(policy.identity(), (2, 1))
    assert torch.allclose(policy.apply_maps(maps, identity), maps, atol=1e-6)
    flip = np.array([[4, 4, 1], [4, 4, 1]])
    assert torch.allclose(policy.apply_maps(maps, flip), maps.flip(-1), atol=1e-6)

    # dx = 4 + 4: the view shows the image 4 px (one cell) further right -> map moves left
    # by one cell; the last column, beyond the image, repeats the border column.
    right = np.array([[8, 4, 0]] * 2)
    expected = torch.cat([maps[..., 1:], maps[..., -1:]], dim=-1)
    assert torch.allclose(policy.apply_maps(maps, right), expected, atol=1e-5)
    # dy = 4 - 4: one cell up; the first row repeats the border row.
    up = np.array([[4, 0, 0]] * 2)
    expected = torch.cat([maps[..., :1, :], maps[..., :-1, :]], dim=-2)
    assert torch.allclose(policy.apply_maps(maps, up), expected, atol=1e-5)
    # Shift then flip (crop first, flip last), as apply_images does it.
    right_flip = np.array([[8, 4, 1]] * 2)
    expected = torch.cat([maps[..., 1:], maps[..., -1:]], dim=-1).flip(-1)
    assert torch.allclose(policy.apply_maps(maps, right_flip), expected, atol=1e-5)


def test_apply_maps_agrees_with_apply_images_on_pooled_images():
    """A map that is the image pooled to 8x8 warps like the image (whole-cell shifts, inside)."""
    policy = CifarPolicy()
    images = torch.rand(4, 3, 32, 32)
    params = np.array([[0, 8, 1], [8, 0, 0], [4, 8, 1], [0, 0, 0]])
    pooled_view = F.avg_pool2d(policy.apply_images(images, params), 4)
    warped = policy.apply_maps(F.avg_pool2d(images, 4), params)
    # Cells whose window lies inside the image agree exactly.
    for b, (dx, dy, flip) in enumerate(params):
        sx, sy = (dx - 4) // 4, (dy - 4) // 4
        cols = [c for c in range(8) if 0 <= c + sx < 8]
        rows = [r for r in range(8) if 0 <= r + sy < 8]
        got, want = warped[b], pooled_view[b]
        if flip:
            got, want = got.flip(-1), want.flip(-1)
        assert torch.allclose(got[:, rows][:, :, cols], want[:, rows][:, :, cols], atol=1e-5)


def test_apply_maps_nearest_keeps_integer_values_and_dtype():
    policy = CifarPolicy()
    indices = torch.randint(0, 4096, (3, 2, 8, 8), dtype=torch.int64)
    params = np.array([[5, 3, 1], [1, 7, 0], [8, 8, 1]])
    out = policy.apply_maps(indices, params, mode="nearest")
    assert out.dtype == torch.int64 and out.shape == indices.shape
    for b in range(3):
        assert set(out[b].unique().tolist()) <= set(indices[b].unique().tolist())
    small = indices.to(torch.int16)
    assert policy.apply_maps(small, params, mode="nearest").dtype == torch.int16
    assert torch.equal(policy.apply_maps(indices, np.tile(policy.identity(), (3, 1)), mode="nearest"), indices)
    with pytest.raises(ValueError, match="nearest"):
        policy.apply_maps(indices, params)


def test_apply_maps_half_precision_and_digits_and_imagenet():
    digits = DigitsPolicy()
    maps = torch.randn(2, 3, 4, 4).half()
    out = digits.apply_maps(maps, np.array([[4, 4], [4, 4]]))
    assert out.dtype == torch.float16 and torch.allclose(out.float(), maps.float(), atol=1e-3)
    # 4x4 map on 32x32: one cell = 8 px, so dx = 8 shifts by half a cell: each output cell
    # is the mean of two neighbours; the last one reads past the image and gets the border.
    shifted = digits.apply_maps(maps.float(), np.array([[8, 4], [8, 4]]))
    half_cell = 0.5 * (maps.float()[..., :-1] + maps.float()[..., 1:])
    assert torch.allclose(shifted[..., :-1], half_cell, atol=1e-5)
    assert torch.allclose(shifted[..., -1], maps.float()[..., -1], atol=1e-5)

    imagenet = ImageNetPolicy(image_size=(16, 16))
    maps = torch.randn(2, 4, 4, 4)
    full = np.array([[0, 0, 16, 16, 0], [0, 0, 16, 16, 1]])
    out = imagenet.apply_maps(maps, full)
    assert torch.allclose(out[0], maps[0], atol=1e-5)
    assert torch.allclose(out[1], maps[1].flip(-1), atol=1e-5)
    # The right half of the image, stretched: map cells 2, 3 become cells 0-1 and 2-3.
    right_half = np.array([[0, 8, 16, 8, 0]] * 2)
    nearest = imagenet.apply_maps(maps, right_half, mode="nearest")
    # Output cell centres sit at map coordinates 1.75, 2.25, 2.75, 3.25 -> cells 2, 2, 3, 3.
    assert torch.equal(nearest, maps[..., [2, 2, 3, 3]])
