"""kdpipe.data: loaders, fingerprints, normalisation, subsets. Tiny files only, no downloads."""

import os
import pickle

import numpy as np
import pytest
import torch

from kdpipe.data import (
    Dataset,
    dataset_spec_name,
    load_dataset,
    normalize,
    subset_indices,
)
from kdpipe.data.base import compute_fingerprint
from kdpipe.errors import DataError
from kdpipe.views import CifarPolicy, DigitsPolicy

# --- digits -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


def test_digits_shapes_and_split_sizes(digits_train, digits_test):
    assert len(digits_train) == 1347 and len(digits_test) == 450
    for ds in (digits_train, digits_test):
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (3, 32, 32)
        assert ds.labels.dtype == np.int64 and ds.num_classes == 10
        assert ds.image_size == (32, 32)
        assert isinstance(ds.policy, DigitsPolicy) and ds.policy.num_views == 81
        # Grey digits: three equal channels, full range used.
        assert torch.equal(ds.images[:, 0], ds.images[:, 1])
        assert int(ds.images.max()) > 200 and int(ds.images.min()) == 0
    batch = digits_train.get_batch(np.array([5, 0, 5]))
    assert batch.shape == (3, 3, 32, 32) and torch.equal(batch[0], batch[2])
    assert torch.equal(batch[1], digits_train.images[0])
    assert "digits train: 1,347 images 32x32" in digits_train.describe()


def test_digits_split_is_stratified_and_disjoint(digits_train, digits_test):
    train_counts = np.bincount(digits_train.labels, minlength=10)
    test_counts = np.bincount(digits_test.labels, minlength=10)
    share = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(share - 0.25) < 0.01)
    train_pixels = {bytes(x) for x in digits_train.images.reshape(len(digits_train), -1).numpy()}
    test_pixels = [bytes(x) for x in digits_test.images.reshape(len(digits_test), -1).numpy()]
    # Duplicated digits could exist in the source; almost all test images must be unseen.
    assert sum(p in train_pixels for p in test_pixels) <= 2


def test_digits_is_deterministic_and_fingerprint_stable(digits_train):
    again = load_dataset("digits", "train")
    assert torch.equal(again.images, digits_train.images)
    assert np.array_equal(again.labels, digits_train.labels)
    assert again.fingerprint == digits_train.fingerprint
    assert len(digits_train.fingerprint) == 64
    int(digits_train.fingerprint, 16)


def test_digits_mean_std_constants_match_train_split(digits_train):
    unit = digits_train.images.double() / 255
    assert np.allclose(unit.mean(dim=(0, 2, 3)).numpy(), digits_train.mean, atol=1e-3)
    assert np.allclose(unit.std(dim=(0, 2, 3)).numpy(), digits_train.std, atol=1e-3)


def test_fingerprint_is_sensitive_to_labels_and_pixels(digits_train):
    base = digits_train.fingerprint
    labels = digits_train.labels.copy()
    labels[3] = (labels[3] + 1) % 10
    assert compute_fingerprint(labels, digits_train.get_batch, (32, 32)) != base
    images = digits_train.images.clone()
    images[0, 1, 7, 9] ^= 1  # index 0 is always among the sampled images
    changed = Dataset(
        name="digits",
        split="train",
        num_classes=10,
        labels=digits_train.labels,
        image_size=(32, 32),
        mean=digits_train.mean,
        std=digits_train.std,
        policy=digits_train.policy,
        images=images,
    )
    assert changed.fingerprint != base
    same = Dataset(
        name="digits",
        split="train",
        num_classes=10,
        labels=digits_train.labels,
        image_size=(32, 32),
        mean=digits_train.mean,
        std=digits_train.std,
        policy=digits_train.policy,
        images=digits_train.images.clone(),
    )
    assert same.fingerprint == base
    assert load_dataset("digits", "test").fingerprint != base


# --- CIFAR --------------------------------------------------------------------------------


def _write_pickle(path, obj):
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _cifar_batch(rng, n, num_classes, label_key):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    return {
        b"batch_label": b"test",
        label_key: labels,
        b"data": data,
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


@pytest.fixture
def cifar10_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", _cifar_batch(rng, 4, 10, b"labels"))
    _write_pickle(folder / "test_batch", _cifar_batch(rng, 3, 10, b"labels"))
    _write_pickle(
        folder / "batches.meta",
        {b"label_names": [b"c%d" % i for i in range(10)], b"num_cases_per_batch": 4, b"num_vis": 3072},
    )
    return folder


@pytest.fixture
def cifar100_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 6), ("test", 2)):
        batch = _cifar_batch(rng, n, 100, b"fine_labels")
        batch[b"coarse_labels"] = [0] * n
        _write_pickle(folder / name, batch)
    _write_pickle(
        folder / "meta",
        {b"fine_label_names": [b"f%d" % i for i in range(100)], b"coarse_label_names": [b"k%d" % i for i in range(20)]},
    )
    return folder


def test_cifar10_reader_layout(cifar10_folder):
    train = load_dataset(f"cifar10:{cifar10_folder}", "train")
    test = load_dataset(f"cifar10:{cifar10_folder}", "test")
    assert len(train) == 20 and len(test) == 3
    assert train.num_classes == 10 and train.name == "cifar10"
    assert train.mean == (0.4914, 0.4822, 0.4465)
    assert isinstance(train.policy, CifarPolicy) and train.policy.num_views == 162
    assert train.class_names[3] == "c3"
    with open(cifar10_folder / "data_batch_2", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    # Row layout: 1024 R, 1024 G, 1024 B, each row-major.
    image = train.images[4]
    assert image[0, 0, 0] == raw[b"data"][0, 0] and image[1, 0, 0] == raw[b"data"][0, 1024]
    assert image[2, 31, 31] == raw[b"data"][0, 3071] and image[0, 1, 0] == raw[b"data"][0, 32]
    assert train.labels[4:8].tolist() == raw[b"labels"]
    assert train.labels.dtype == np.int64


def test_cifar100_reader_layout(cifar100_folder):
    train = load_dataset(f"cifar100:{cifar100_folder}", "train")
    assert len(train) == 6 and train.num_classes == 100
    assert train.mean == (0.5071, 0.4867, 0.4408) and train.std == (0.2675, 0.2565, 0.2761)
    with open(cifar100_folder / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    assert train.labels.tolist() == raw[b"fine_labels"]
    assert np.array_equal(train.images.reshape(6, -1).numpy(), raw[b"data"])
    assert train.class_names[99] == "f99"
    assert len(load_dataset(f"cifar100:{cifar100_folder}", "val")) == 2
    assert dataset_spec_name(f"cifar100:{cifar100_folder}") == "cifar100"


def test_cifar_missing_folder_and_file(tmp_path, cifar100_folder):
    with pytest.raises(DataError, match="cifar10 expects the folder 'cifar-10-batches-py'.*is not a folder"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}", "train")
    os.remove(cifar100_folder / "train")
    with pytest.raises(DataError, match="has no file 'train'"):
        load_dataset(f"cifar100:{cifar100_folder}", "train")
    with pytest.raises(DataError, match="give its path"):
        load_dataset("cifar100", "train")


def test_cifar_malformed_pickle(cifar10_folder):
    (cifar10_folder / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR pickle"):
        load_dataset(f"cifar10:{cifar10_folder}", "train")
    _write_pickle(cifar10_folder / "data_batch_3", {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"not uint8 \[N, 3072\]"):
        load_dataset(f"cifar10:{cifar10_folder}", "train")
    _write_pickle(cifar10_folder / "test_batch", {b"images": 1})
    with pytest.raises(DataError, match="lacks b'data'"):
        load_dataset(f"cifar10:{cifar10_folder}", "test")


# --- synthetic, specs, helpers ------------------------------------------------------------


def test_synthetic_is_deterministic_and_class_dependent():
    spec = "synthetic:n=40,classes=4,size=16,seed=3"
    first, again = load_dataset(spec, "train"), load_dataset(spec, "train")
    assert len(first) == 40 and first.image_size == (16, 16) and first.num_classes == 4
    assert torch.equal(first.images, again.images) and first.fingerprint == again.fingerprint
    assert np.bincount(first.labels).tolist() == [10, 10, 10, 10]
    assert isinstance(first.policy, CifarPolicy) and first.policy.padding == 2
    test = load_dataset(spec, "test")
    assert len(test) == 10 and test.fingerprint != first.fingerprint
    assert load_dataset("synthetic:n=40,classes=4,size=16,seed=4", "train").fingerprint != first.fingerprint
    default = load_dataset("synthetic", "train")
    assert len(default) == 256 and default.num_classes == 10 and default.image_size == (32, 32)


def test_synthetic_is_learnable_by_channel_energy():
    """Class colour shows in per-channel contrast: nearest class centroid beats chance by far."""
    train = load_dataset("synthetic:n=200,classes=10,size=16", "train")
    test = load_dataset("synthetic:n=200,classes=10,size=16", "test")

    def features(ds):
        unit = ds.images.double() / 255 - 0.5
        flat = unit.reshape(len(ds), 3, -1)
        return torch.cat(
            [(flat[:, i] * flat[:, j]).mean(-1, keepdim=True) for i in range(3) for j in range(i, 3)], dim=1
        )

    train_features, test_features = features(train), features(test)
    centroids = torch.stack([train_features[torch.from_numpy(train.labels == c)].mean(0) for c in range(10)])
    predicted = torch.cdist(test_features, centroids).argmin(1).numpy()
    assert (predicted == test.labels).mean() > 0.5


def test_unknown_spec_and_split():
    with pytest.raises(DataError, match="expected one of digits, cifar10:"):
        load_dataset("mnist", "train")
    with pytest.raises(DataError, match="split must be"):
        load_dataset("digits", "dev")
    with pytest.raises(DataError, match="synthetic options"):
        load_dataset("synthetic:count=3", "train")
    assert dataset_spec_name("synthetic:n=3") == "synthetic"
    assert dataset_spec_name("digits") == "digits"
    with pytest.raises(DataError):
        dataset_spec_name("nope:/x")


def test_normalize_uint8_and_unit_float_agree():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    from_uint8 = normalize(images, mean, std)
    from_float = normalize(images.float() / 255, mean, std)
    assert from_uint8.dtype == torch.float32
    assert torch.allclose(from_uint8, from_float, atol=1e-6)
    expected = (images[:, 1].float() / 255 - 0.25) / 0.25
    assert torch.allclose(from_uint8[:, 1], expected, atol=1e-6)
    assert normalize(images[0], mean, std).shape == (3, 4, 4)


def test_subset_indices_stratified_sorted_deterministic():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3 + [3])
    picked = subset_indices(labels, 0.1, seed=7)
    assert np.array_equal(picked, np.sort(picked)) and picked.dtype == np.int64
    assert np.bincount(labels[picked], minlength=4).tolist() == [5, 3, 1, 1]
    assert np.array_equal(picked, subset_indices(labels, 0.1, seed=7))
    assert not np.array_equal(picked, subset_indices(labels, 0.1, seed=8))
    assert np.array_equal(subset_indices(labels, 1.0, seed=0), np.arange(len(labels)))
    with pytest.raises(Exception, match="fraction"):
        subset_indices(labels, 0.0, seed=0)
