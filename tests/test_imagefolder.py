"""ImageFolder: the ImageNet protocol (RandomResizedCrop boxes in the original image's pixels,
Resize + CenterCrop test views), image sizes from headers, and batches decoded in order by
DataLoader workers. Tiny PNG/JPEG folders made with PIL in tmp_path; expected values are
computed by hand or with PIL directly."""

import math

import numpy as np
import pytest
import torch

from kdpipe.data import load_dataset, loader
from kdpipe.data.imagefolder import parse_imagefolder_spec, read_image_sizes
from kdpipe.errors import DataError, KdpipeError
from kdpipe.views import ImageNetPolicy, hash_uniform

# (H, W) of the training images: landscape, portrait, square, a 10x1000 strip whose crops
# never fit (torchvision's fallback every time), and one at the protocol's test size.
TRAIN_SIZES = [(30, 46), (50, 30), (33, 33), (10, 1000), (36, 40), (24, 73)]
VAL_SIZES = [(30, 48), (41, 35)]


def _pixels(rng, height, width):
    """A smooth gradient plus noise: bilinear resizing then has something to average."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([yy * 255 // max(1, height - 1), xx * 255 // max(1, width - 1), (yy + xx) % 256], axis=-1)
    noise = rng.integers(0, 40, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """train/{ant,cat}/*.png|jpg (sizes TRAIN_SIZES in sample order), val/{ant,cat}/*.png;
    returns (root, {sample index: original RGB pixels [H, W, 3]})."""
    from PIL import Image

    rng = np.random.default_rng(2)
    originals = {}
    for index, (height, width) in enumerate(TRAIN_SIZES):
        cls = "ant" if index < 3 else "cat"
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        pixels = _pixels(rng, height, width)
        originals[index] = pixels
        Image.fromarray(pixels).save(folder / f"{index}.png")  # lossless: pixels known exactly
    for index, (height, width) in enumerate(VAL_SIZES):
        folder = tmp_path / "val" / ("ant", "cat")[index]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(rng, height, width)).save(folder / f"{index}.jpg", quality=90)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    return tmp_path, originals


def _train(root, options="?size=32&resize=36"):
    return load_dataset(f"imagefolder:{root}{options}", "train")


# --- spec, loading, errors --------------------------------------------------------------


def test_spec_defaults_and_options():
    assert parse_imagefolder_spec("/data") == ("/data", 224, 256)
    assert parse_imagefolder_spec("/data?size=32&resize=36") == ("/data", 32, 36)
    # size alone keeps the reference's crop fraction 224 / 256.
    assert parse_imagefolder_spec("/data?size=112") == ("/data", 112, 128)
    with pytest.raises(DataError, match="options size and resize"):
        parse_imagefolder_spec("/data?crop=3")
    with pytest.raises(DataError, match="resize .* must be at least size"):
        parse_imagefolder_spec("/data?size=64&resize=32")
    with pytest.raises(DataError, match="must be an integer"):
        parse_imagefolder_spec("/data?size=big")
    with pytest.raises(DataError, match="at least 8 pixels"):
        parse_imagefolder_spec("/data?size=4")


def test_imagefolder_lazy_loading(image_folder):
    root, _ = image_folder
    train = _train(root)
    assert train.images is None and len(train) == 6 and train.num_classes == 2
    assert train.class_names == ["ant", "cat"]  # sorted, like torchvision
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert isinstance(train.policy, ImageNetPolicy) and train.policy.num_views is None
    assert train.policy.image_size == (32, 32) and train.image_size == (32, 32)
    assert train.mean == (0.485, 0.456, 0.406)
    batch = train.get_batch([3, 0])
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch, train.get_test([3, 0]))  # get_batch is the test view
    assert train.fingerprint == _train(root).fingerprint
    assert train.fingerprint != _train(root, "?size=32&resize=40").fingerprint
    val = load_dataset(f"imagefolder:{root}", "val")
    assert val.split == "test" and len(val) == 2 and val.image_size == (224, 224)
    assert (val.size, val.resize) == (224, 256)
    assert val.get_batch([1]).shape == (1, 3, 224, 224)
    assert "loaded lazily" in val.describe()


def test_imagefolder_errors(image_folder):
    root, _ = image_folder
    with pytest.raises(DataError, match="has no folder 'train'"):
        load_dataset(f"imagefolder:{root / 'train'}", "train")
    (root / "val" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        load_dataset(f"imagefolder:{root}", "test")
    (root / "train" / "cat" / "9.png").write_bytes(b"broken")
    broken = _train(root)
    with pytest.raises(DataError, match="could not read the image .*9.png"):
        broken.get_batch([6])  # cat/9.png sorts last
    with pytest.raises(DataError, match="could not read the image .*9.png"):
        _ = broken.image_sizes
    with pytest.raises(IndexError):
        broken.get_views([7], [[0, 0, 1, 1, 0]])


def test_image_sizes_from_headers(image_folder):
    root, _ = image_folder
    train = _train(root)
    sizes = train.image_sizes
    assert sizes.dtype == np.int32 and sizes.tolist() == [list(s) for s in TRAIN_SIZES]
    assert train.image_sizes is sizes  # computed once, kept
    assert load_dataset(f"imagefolder:{root}", "val").image_sizes.tolist() == [list(s) for s in VAL_SIZES]
    # The process pool reads the same sizes in the same order.
    pooled = read_image_sizes(train.paths * 3, workers=2, chunk=4)
    assert pooled.tolist() == [list(s) for s in TRAIN_SIZES] * 3


# --- the policy's boxes -----------------------------------------------------------------


def _get_params_scalar(seed, sample, view, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params written as torchvision writes it (one box,
    Python floats and round), with the policy's hash_uniform draws in place of torch's RNG.
    Returns ((y0, x0, h, w), fell_back)."""

    def u(draw):
        return float(hash_uniform(seed, sample, view, draw).reshape(()))

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u(4 * attempt))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u(4 * attempt + 1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u(4 * attempt + 2) * (height - h + 1))
            j = int(u(4 * attempt + 3) * (width - w + 1))
            return (i, j, h, w), False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w), True


def test_boxes_equal_torchvision_get_params_written_out():
    policy = ImageNetPolicy(image_size=(32, 32))
    sizes = np.array([[375, 500], [500, 333], [12, 60], [10, 1000], [1000, 10], [64, 64]])
    samples = np.arange(100, 100 + len(sizes))
    table = policy.sample(7, samples, 40, sizes=sizes)
    assert table.shape == (len(sizes), 40, 5) and table.dtype == np.int32
    fallbacks = 0
    for row, (sample, (height, width)) in enumerate(zip(samples, sizes)):
        for view in range(40):
            box, fell_back = _get_params_scalar(7, sample, view, height, width)
            assert tuple(table[row, view, :4]) == box
            fallbacks += fell_back
    assert fallbacks > 80  # both strips always, and 12x60 now and then (7 of 40 here)


def test_boxes_inside_and_within_scale_and_ratio():
    policy = ImageNetPolicy(image_size=(224, 224))
    sizes = np.array([[375, 500], [500, 375], [333, 500], [256, 256], [480, 640]] * 40)
    table = policy.sample(0, np.arange(len(sizes)), 8, sizes=sizes).reshape(-1, 5)
    height, width = np.repeat(sizes, 8, axis=0).T.astype(np.int64)
    y0, x0, h, w, flip = table.T.astype(np.int64)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (y0 + h <= height).all() and (x0 + w <= width).all()
    # These ratios always fit within ten tries in practice; areas and ratios then lie in the
    # ranges up to the rounding of w and h to whole pixels.
    area = h * w / (height * width)
    assert area.min() >= 0.08 * 0.9 and area.max() <= 1.0
    log_ratio = np.log(w / h)
    slack = 2.0 / np.minimum(h, w)
    assert (log_ratio >= math.log(3 / 4) - slack).all() and (log_ratio <= math.log(4 / 3) + slack).all()
    # Uniform scale: about as many boxes in the lower half of the range as in the upper.
    lower = np.mean(area < (0.08 + 1.0) / 2)
    assert 0.45 < lower < 0.7  # boxes of large area fail the fit more often
    assert abs(flip.mean() - 0.5) < 0.05 and set(np.unique(flip)) == {0, 1}
    assert len({tuple(b) for b in table}) > 0.99 * len(table)


def test_fallback_centre_crop_for_extreme_aspect_ratios():
    policy = ImageNetPolicy(image_size=(32, 32))
    # 10x1000: no box of area >= 800 and ratio <= 4/3 fits a height of 10, so every try
    # fails and torchvision's fallback takes h = 10, w = round(10 * 4/3) = 13, centred.
    wide = policy.sample(3, np.arange(5), 4, sizes=[[10, 1000]] * 5)
    assert (wide[..., :4] == [0, (1000 - 13) // 2, 10, 13]).all()
    tall = policy.sample(3, np.arange(5), 4, sizes=[[1000, 10]] * 5)
    assert (tall[..., :4] == [(1000 - 13) // 2, 0, 13, 10]).all()
    assert set(np.unique(wide[..., 4])) == {0, 1}  # the flip is still drawn


def test_sample_is_a_pure_function_of_seed_sample_view_and_size():
    policy = ImageNetPolicy(image_size=(224, 224))
    sizes = np.array([[375, 500], [500, 333], [240, 320], [600, 400]] * 25)
    whole = policy.sample(5, np.arange(100), 6, sizes=sizes)
    assert np.array_equal(whole, policy.sample(5, np.arange(100), 6, sizes=sizes))
    assert not np.array_equal(whole, policy.sample(6, np.arange(100), 6, sizes=sizes))
    # A shard's rows equal the whole table's rows.
    assert np.array_equal(policy.sample(5, np.arange(40, 60), 6, sizes=sizes[40:60]), whole[40:60])
    # A row depends on its own image's size only.
    other = sizes.copy()
    other[1] = [100, 100]
    changed = policy.sample(5, np.arange(100), 6, sizes=other)
    assert np.array_equal(np.delete(changed, 1, axis=0), np.delete(whole, 1, axis=0))
    # Fewer views are a prefix of more views.
    assert np.array_equal(policy.sample(5, np.arange(100), 3, sizes=sizes), whole[:, :3])
    # Without sizes every image is image_size (the old behaviour).
    assert np.array_equal(
        policy.sample(5, np.arange(10), 2), policy.sample(5, np.arange(10), 2, sizes=[[224, 224]] * 10)
    )
    with pytest.raises(ValueError, match="sizes must be"):
        policy.sample(5, np.arange(3), 2, sizes=[[10, 10]])
    with pytest.raises(KdpipeError, match="at least 1"):
        policy.sample(5, np.arange(3), 0, sizes=[[10, 10]] * 3)


def test_random_views_take_sizes_and_follow_the_generator():
    policy = ImageNetPolicy(image_size=(224, 224))
    sizes = np.array([[375, 500], [10, 1000], [500, 333]] * 10)
    first = policy.random(torch.Generator().manual_seed(1), 30, device="cpu", sizes=sizes)
    assert first.dtype == torch.int32 and first.shape == (30, 5)
    again = policy.random(torch.Generator().manual_seed(1), 30, device="cpu", sizes=sizes)
    assert torch.equal(first, again)
    y0, x0, h, w, _ = first.numpy().astype(np.int64).T
    assert (y0 + h <= sizes[:, 0]).all() and (x0 + w <= sizes[:, 1]).all()
    assert (first[1::3, :4].numpy() == [0, 493, 10, 13]).all()


def test_identity_is_the_whole_image():
    policy = ImageNetPolicy(image_size=(224, 224))
    assert policy.identity().tolist() == [0, 0, 224, 224, 0]
    assert policy.identity(size=(375, 500)).tolist() == [0, 0, 375, 500, 0]
    rows = policy.identity_rows([[375, 500], [20, 30]])
    assert rows.dtype == np.int32 and rows.tolist() == [[0, 0, 375, 500, 0], [0, 0, 20, 30, 0]]


def test_apply_maps_with_source_sizes():
    policy = ImageNetPolicy(image_size=(16, 16))
    maps = torch.randn(2, 3, 4, 4)
    sizes = np.array([[300, 400], [300, 400]])
    whole = np.array([[0, 0, 300, 400, 0], [0, 0, 300, 400, 1]])
    out = policy.apply_maps(maps, whole, sizes=sizes)
    assert torch.allclose(out[0], maps[0], atol=1e-5)
    assert torch.allclose(out[1], maps[1].flip(-1), atol=1e-5)
    right_half = np.array([[0, 200, 300, 200, 0]] * 2)
    nearest = policy.apply_maps(maps, right_half, mode="nearest", sizes=sizes)
    assert torch.equal(nearest, maps[..., [2, 2, 3, 3]])


# --- decoding ---------------------------------------------------------------------------


def _hand_view(original, box, flip, size):
    """numpy slice of the box, PIL bilinear resize to size x size, numpy flip: [3, S, S]."""
    from PIL import Image

    y0, x0, h, w = box
    crop = Image.fromarray(np.ascontiguousarray(original[y0 : y0 + h, x0 : x0 + w]))
    pixels = np.asarray(crop.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
    return pixels[:, :, ::-1] if flip else pixels


def test_get_views_equals_crop_resize_flip_by_hand(image_folder):
    root, originals = image_folder
    train = _train(root)
    params = np.array(
        [
            [3, 5, 20, 31, 0],  # 30x46: a 20x31 box, upscaled
            [0, 0, 50, 30, 1],  # 50x30: the whole image, flipped
            [1, 1, 32, 32, 1],  # 33x33: a 32x32 box, no resize, flipped
            [0, 493, 10, 13, 0],  # 10x1000: the fallback box
            [2, 4, 34, 36, 0],  # 36x40: downscaled
            [10, 63, 14, 10, 1],
        ],  # 24x73: the bottom-right corner
        dtype=np.int32,
    )
    views = train.get_views(np.arange(6), params)
    assert views.dtype == torch.uint8 and views.shape == (6, 3, 32, 32)
    for i, (y0, x0, h, w, flip) in enumerate(params.tolist()):
        expected = _hand_view(originals[i], (y0, x0, h, w), flip, 32)
        assert np.array_equal(views[i].numpy(), expected), i
    # Any order, repeats allowed, params as a tensor.
    again = train.get_views(torch.tensor([4, 4, 0]), torch.from_numpy(params[[4, 4, 0]]))
    assert torch.equal(again, views[[4, 4, 0]])
    # The policy's own boxes decode too.
    sampled = train.policy.sample(0, np.arange(6), 2, sizes=train.image_sizes)
    assert train.get_views(np.arange(6), sampled[:, 1]).shape == (6, 3, 32, 32)
    with pytest.raises(DataError, match=r"lies outside the 46x30 image .*0.png"):
        train.get_views([0], [[0, 0, 31, 10, 0]])


def test_get_views_crops_before_resizing(tmp_path):
    """torchvision's F.resized_crop on a PIL image crops, then resizes: no pixel outside the
    box enters the bilinear filter (PIL's resize(box=...) would blend them in)."""
    from PIL import Image

    pixels = np.full((40, 40, 3), 255, dtype=np.uint8)
    pixels[10:30, 10:30] = 0
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / split / "a" / "0.png")
    train = _train(tmp_path, "?size=8&resize=8")
    view = train.get_views([0], [[10, 10, 20, 20, 0]])
    assert int(view.max()) == 0
    leaky = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BILINEAR, box=(10, 10, 30, 30)))
    assert leaky.max() > 0  # what the other reading of "resize a box" would give


def _resize_then_centre_crop_by_hand(original, new_w, new_h, top, left, size):
    from PIL import Image

    resized = Image.fromarray(original).resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(resized)[top : top + size, left : left + size].transpose(2, 0, 1)


def test_get_test_equals_resize_and_centre_crop_by_hand(image_folder):
    root, originals = image_folder
    train = _train(root)  # size 32, resize 36
    test = train.get_test(np.arange(6)).numpy()
    # Resize(36): shorter side 36, longer int(36 * long / short); CenterCrop(32) offsets
    # int(round((side - 32) / 2)) with round half to even. Worked out by hand per image:
    #   30x46 -> 36x55 (55.2), top 2, left round(11.5) = 12
    #   50x30 -> 60x36,        top 14, left 2
    #   33x33 -> 36x36,        top 2, left 2
    #   10x1000 -> 36x3600,    top 2, left 1784
    #   36x40 -> 36x40 (kept as is), top 2, left 4
    #   24x73 -> 36x109 (109.5 truncated), top 2, left round(38.5) = 38
    expected = [(55, 36, 2, 12), (36, 60, 14, 2), (36, 36, 2, 2), (3600, 36, 2, 1784), (40, 36, 2, 4), (109, 36, 2, 38)]
    for i, (new_w, new_h, top, left) in enumerate(expected):
        hand = _resize_then_centre_crop_by_hand(originals[i], new_w, new_h, top, left, 32)
        assert np.array_equal(test[i], hand), i


def test_get_test_equals_torchvision_where_it_imports(image_folder):
    try:
        from torchvision import transforms
    except Exception as error:  # noqa: BLE001 - any import failure means "not here"
        pytest.skip(
            f"torchvision does not import here ({type(error).__name__}: {error}); "
            "the hand computations above check the same transforms"
        )
    from PIL import Image

    root, _ = image_folder
    train = _train(root)
    reference = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.PILToTensor()])
    for i, path in enumerate(train.paths):
        with Image.open(path) as image:
            assert torch.equal(reference(image.convert("RGB")), train.get_test([i])[0]), i
    from torchvision.transforms import functional as TF

    params = train.policy.sample(1, np.arange(6), 1, sizes=train.image_sizes)[:, 0]
    for i, (y0, x0, h, w, flip) in enumerate(params.tolist()):
        with Image.open(train.paths[i]) as image:
            out = TF.resized_crop(image.convert("RGB"), y0, x0, h, w, [32, 32])
        if flip:
            out = TF.hflip(out)
        assert torch.equal(TF.pil_to_tensor(out), train.get_views([i], params[i : i + 1])[0]), i


def test_grayscale_and_palette_images_become_rgb(tmp_path):
    from PIL import Image

    gray = np.arange(20 * 24, dtype=np.uint8).reshape(20, 24)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(gray).save(tmp_path / split / "a" / "0.png")
        Image.fromarray(gray).convert("P").save(tmp_path / split / "a" / "1.png")
    train = _train(tmp_path, "?size=16&resize=20")
    views = train.get_views([0, 1], [[2, 3, 16, 16, 0], [2, 3, 16, 16, 0]])
    expected = gray[2:18, 3:19]
    for view in views:
        assert view.shape == (3, 16, 16) and (view.numpy() == expected).all()


# --- batches in order, from workers -------------------------------------------------------


def test_view_batches_in_order_with_and_without_workers(image_folder):
    root, _ = image_folder
    train = _train(root)
    params = train.policy.sample(4, np.arange(6), 3, sizes=train.image_sizes)
    order = np.array([5, 2, 0, 3, 1, 4, 2, 2])
    batches = [(order[s : s + 3], params[order[s : s + 3], s % 3]) for s in range(0, 8, 3)]
    expected = [train.get_views(idx, p) for idx, p in batches]
    in_process = list(loader.view_batches(train, batches, workers=0))
    from_workers = list(loader.view_batches(train, batches, workers=2, prefetch=1))
    assert [b.shape[0] for b in from_workers] == [3, 3, 2]
    for want, a, b in zip(expected, in_process, from_workers):
        assert torch.equal(want, a) and torch.equal(want, b)
    # torch tensors as inputs too.
    tensors = [(torch.from_numpy(i), torch.from_numpy(p)) for i, p in batches]
    assert all(torch.equal(a, b) for a, b in zip(loader.view_batches(train, tensors, 1), expected))


def test_test_batches_in_order(image_folder):
    root, _ = image_folder
    train = _train(root)
    indices = np.array([4, 0, 5, 1, 3])
    for workers in (0, 2):
        got = list(loader.test_batches(train, indices, batch_size=2, workers=workers))
        assert [i.tolist() for i, _ in got] == [[4, 0], [5, 1], [3]]
        assert torch.equal(torch.cat([im for _, im in got]), train.get_test(indices))
    # Data sets without get_test are read with get_batch.
    digits = load_dataset("digits", "test")
    ((idx, images),) = loader.test_batches(digits, [3, 1], batch_size=8, workers=0)
    assert torch.equal(images, digits.get_batch([3, 1]))


def test_a_worker_failure_is_one_sentence(image_folder):
    root, _ = image_folder
    (root / "train" / "cat" / "9.png").write_bytes(b"broken")
    train = _train(root)
    batches = [(np.array([0]), np.array([[0, 0, 5, 5, 0]])), (np.array([6]), np.array([[0, 0, 5, 5, 0]]))]
    for workers in (0, 2):
        decoded = loader.view_batches(train, batches, workers=workers)
        assert next(decoded).shape == (1, 3, 32, 32)
        with pytest.raises(DataError) as caught:
            next(decoded)
        message = str(caught.value)
        assert message.startswith("imagefolder could not read the image") and "9.png" in message
        assert "Traceback" not in message and "\n" not in message


def test_loader_arguments():
    assert 0 <= loader.default_workers() <= loader.MAX_DEFAULT_WORKERS
    digits = load_dataset("digits", "test")
    with pytest.raises(TypeError, match="get_views"):
        loader.view_batches(digits, [], workers=0)
    with pytest.raises(KdpipeError, match="batch size"):
        loader.test_batches(digits, [0], batch_size=0, workers=0)
    with pytest.raises(KdpipeError, match="workers"):
        loader.test_batches(digits, [0], batch_size=1, workers=-1)


def test_place_dataset_decodes_with_default_workers_unless_given(image_folder):
    from kdpipe.data.loader import default_workers
    from kdpipe.engine.data import place_dataset
    from kdpipe.errors import KdpipeError

    train = _train(image_folder[0])
    cpu = torch.device("cpu")
    assert place_dataset(train, cpu, data_path="stream").workers == default_workers()
    assert place_dataset(train, cpu, data_path="stream", workers=0).workers == 0
    with pytest.raises(KdpipeError, match="--workers"):
        place_dataset(train, cpu, data_path="stream", workers=-1)
