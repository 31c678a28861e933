"""The data layer: both CIFAR-10 layouts, the train/val/test split, SUBSET, the offline error,
the fast-path transforms and loaders."""
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import utils
from tests import fakedata


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    fakedata.write_cifar10_folder(root, train_per_class=6, test_per_class=3)
    return root


@pytest.fixture(scope="module")
def split_root(tmp_path_factory):
    """20 training images per class: 2 of each class go to validation."""
    root = tmp_path_factory.mktemp("split")
    fakedata.write_cifar10_folder(root, train_per_class=20, test_per_class=3)
    return root


def write_torchvision_layout(root, per_batch=20, seed=0):
    """torchvision's cifar-10-batches-py pickles, with random pixels and every class in each batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(k) for k in rng.permutation(np.arange(per_batch) % 10)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(fakedata.CIFAR10_CLASSES)}))
    return folder


def image_bytes(dataset):
    return [bytes(image.numpy().tobytes()) for image in dataset.images]


# ---- layouts --------------------------------------------------------------------------------

def test_image_folder_layout_is_found(folder_root):
    train_set, val_set, test_set = utils.load_cifar10(folder_root)
    assert (len(train_set), len(val_set), len(test_set)) == (50, 10, 30)   # 6 per class: 1 to val
    for dataset in (train_set, val_set, test_set):
        assert dataset.classes == list(fakedata.CIFAR10_CLASSES)
    image, label = train_set[7]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label == 1          # files are read class by class, in sorted order (5 per class left)
    assert test_set.labels.tolist() == [k for k in range(10) for _ in range(3)]


def test_torchvision_layout_is_found(tmp_path, monkeypatch):
    write_torchvision_layout(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    train_set, val_set, test_set = utils.load_cifar10(tmp_path, download=False)
    assert (len(train_set), len(val_set), len(test_set)) == (90, 10, 20)
    assert train_set.classes == list(fakedata.CIFAR10_CLASSES)
    raw = [pickle.loads((tmp_path / "cifar-10-batches-py" / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    raw_images = torch.from_numpy(np.concatenate([b["data"] for b in raw]).reshape(-1, 3, 32, 32))
    raw_labels = [int(label) for b in raw for label in b["labels"]]
    by_bytes = {bytes(image.numpy().tobytes()): label for image, label in zip(raw_images, raw_labels)}
    for dataset in (train_set, val_set):                      # every image keeps its own label
        for image, label in zip(dataset.images, dataset.labels.tolist()):
            assert by_bytes[bytes(image.numpy().tobytes())] == label
    assert sorted(image_bytes(train_set) + image_bytes(val_set)) == sorted(by_bytes)
    test_raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert torch.equal(test_set.images, torch.from_numpy(test_raw["data"].reshape(-1, 3, 32, 32)))


def test_offline_and_missing_gives_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(utils.DataNotFoundError) as err:
        utils.load_cifar10(tmp_path)
    message = str(err.value)
    for expected in (f"DATA_DIR={tmp_path}", "cifar-10-batches-py", "cifar10/train/<class>",
                     "internet", "name resolution"):
        assert expected in message


def test_missing_without_download_names_both_layouts(tmp_path):
    with pytest.raises(utils.DataNotFoundError, match="cifar-10-batches-py.*\n.*cifar10/train"):
        utils.load_cifar10(tmp_path, download=False)


def test_images_of_mixed_sizes_are_refused(tmp_path):
    fakedata.write_cifar10_folder(tmp_path, train_per_class=2, test_per_class=1)
    odd = tmp_path / "cifar10" / "train" / "cat" / "big.png"
    fakedata.Image.new("RGB", (40, 40)).save(odd)
    with pytest.raises(ValueError, match="one size"):
        utils.load_cifar10(tmp_path)


# ---- the train / val / test split -----------------------------------------------------------

def test_train_and_val_are_disjoint_and_cover_the_training_images(split_root):
    train_set, val_set, test_set = utils.load_cifar10(split_root)
    train, val = image_bytes(train_set), image_bytes(val_set)
    assert len(set(train)) == len(train) == 180 and len(set(val)) == len(val) == 20   # noise: all distinct
    assert not set(train) & set(val)
    everything = utils.load_cifar10(split_root, val_fraction=0.05)
    assert set(train) | set(val) == set(image_bytes(everything[0])) | set(image_bytes(everything[1]))
    assert not (set(train) | set(val)) & set(image_bytes(test_set))


def test_val_is_stratified(split_root):
    _, val_set, _ = utils.load_cifar10(split_root)
    assert torch.bincount(val_set.labels, minlength=10).tolist() == [2] * 10
    _, bigger, _ = utils.load_cifar10(split_root, val_fraction=0.25)
    assert torch.bincount(bigger.labels, minlength=10).tolist() == [5] * 10


def test_split_is_the_same_on_every_call_and_seeded(split_root):
    first = utils.load_cifar10(split_root)
    second = utils.load_cifar10(split_root)
    for a, b in zip(first, second):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other_seed = utils.load_cifar10(split_root, seed=1)
    assert set(image_bytes(other_seed[1])) != set(image_bytes(first[1]))
    assert torch.equal(other_seed[2].images, first[2].images)     # the test split never moves


def test_subset_caps_each_split_after_the_split(split_root):
    full_train, full_val, full_test = (set(image_bytes(d)) for d in utils.load_cifar10(split_root))
    train_set, val_set, test_set = utils.load_cifar10(split_root, subset=15)
    assert (len(train_set), len(val_set), len(test_set)) == (15, 15, 15)
    assert set(image_bytes(train_set)) <= full_train                # subset never moves images
    assert set(image_bytes(val_set)) <= full_val                    # between splits
    assert set(image_bytes(test_set)) <= full_test
    small = utils.load_cifar10(split_root, subset=5)
    assert [len(d) for d in small] == [5, 5, 5]
    assert set(image_bytes(small[1])) <= full_val
    again = utils.load_cifar10(split_root, subset=15)
    assert all(torch.equal(a.images, b.images) for a, b in zip((train_set, val_set, test_set), again))
    assert len(set(train_set.labels.tolist())) > 5                  # a random draw, not the first class only


def test_val_and_test_are_never_augmented_or_shuffled(folder_root):
    train_set, val_set, test_set = utils.load_cifar10(folder_root, augment=utils.RandomCropFlip())
    assert train_set.augment is not None and val_set.augment is None and test_set.augment is None
    assert torch.equal(test_set[4][0], test_set.images[4]) and torch.equal(val_set[4][0], val_set.images[4])
    for dataset in (val_set, test_set):
        loader = utils.make_loader(dataset, 8, "cpu", shuffle=False)
        first = torch.cat([labels for _, labels in loader])
        second = torch.cat([labels for _, labels in loader])
        assert torch.equal(first, dataset.labels) and torch.equal(second, dataset.labels)


def test_stratified_split_gives_each_part_at_least_one_and_refuses_tiny_classes():
    parts = utils.stratified_split({"a": range(10), "b": range(100, 103)}, [0.1, 0.1], seed=0)
    assert [len(p) for p in parts] == [9, 2, 2]
    assert sorted(sum(parts, [])) == list(range(10)) + [100, 101, 102]
    assert all({m >= 100 for m in part} == {False, True} for part in parts)   # both classes everywhere
    assert parts == utils.stratified_split({"b": range(100, 103), "a": range(10)}, [0.1, 0.1], seed=0)
    with pytest.raises(ValueError, match="'c' has 2 item"):
        utils.stratified_split({"c": [1, 2]}, [0.1, 0.1], seed=0)


@pytest.mark.parametrize("fractions", [[0.0], [10], [-0.2], [0.6, 0.5]])
def test_stratified_split_refuses_fractions_outside_0_to_1(fractions):
    with pytest.raises(ValueError, match="between 0 and 1"):
        utils.stratified_split({"a": range(10)}, fractions, seed=0)


def test_load_cifar10_names_a_val_fraction_given_in_percent(folder_root):
    with pytest.raises(ValueError, match="val_fraction.*0.1 holds out 10 %.*got 10"):
        utils.load_cifar10(folder_root, val_fraction=10)


def test_settings_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EPOCHS", " 7 ")
    assert utils.env_int("EPOCHS", 3) == 7
    monkeypatch.setenv("EPOCHS", " ")
    assert utils.env_int("EPOCHS", 3) == 3                   # empty means the default
    monkeypatch.setenv("EPOCHS", "abc")
    with pytest.raises(ValueError, match="EPOCHS='abc' is not an integer"):
        utils.env_int("EPOCHS", 3)
    monkeypatch.delenv("PREDICT_URL", raising=False)
    assert utils.env_str("PREDICT_URL", "https://x") == "https://x"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", "data")
    assert utils.env_path("DATA_DIR", "elsewhere") == tmp_path.resolve() / "data"   # absolute


def test_stratified_split_is_the_same_on_every_machine():
    """Recorded once: it would change if the split used Python's per-process hash."""
    _, val = utils.stratified_split({"cat": list(range(20)), "dog": list(range(20, 40))}, [0.1], seed=0)
    assert val == [6, 12, 33, 39]


# ---- augmentation, normalisation, loaders ---------------------------------------------------

def zero_padded_shift(image, dy, dx, padding):
    h, w = image.shape[-2:]
    padded = F.pad(image, (padding,) * 4)
    return padded[:, padding + dy:padding + dy + h, padding + dx:padding + dx + w]


def test_random_crop_flip_shifts_and_mirrors():
    image = (torch.arange(3 * 8 * 8) + 1).to(torch.uint8).view(3, 8, 8)   # no zeros: any zero is padding
    utils.seed_everything(0)
    crops = [utils.RandomCropFlip(padding=2)(image) for _ in range(400)]   # 1 in 50 is uncropped and unflipped
    assert all(c.shape == image.shape and c.dtype == torch.uint8 for c in crops)
    assert any(torch.equal(c, image) for c in crops) and any(torch.equal(c, image.flip(-1)) for c in crops)
    drawn = []
    for crop in crops:
        (match,) = [(dy, dx, flipped) for dy in range(-2, 3) for dx in range(-2, 3) for flipped in (False, True)
                    if torch.equal(crop, zero_padded_shift(image, dy, dx, 2).flip(-1) if flipped
                                   else zero_padded_shift(image, dy, dx, 2))]
        drawn.append(match)
    assert {(dy, dx) for dy, dx, _ in drawn} == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert {flipped for _, _, flipped in drawn} == {False, True}
    assert any((c == 0).any() for c in crops)   # zero padding shows at some offsets
    flipped = utils.RandomCropFlip(padding=0, flip=True)
    assert {bool(torch.equal(flipped(image), image)) for _ in range(30)} == {True, False}


def test_batch_transform_normalises_and_resizes():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = utils.BatchTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=227)(images)
    assert out.shape == (2, 3, 227, 227) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 2.0))
    same_size = utils.BatchTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(images[:, :, :8, :8])
    assert same_size.shape == (2, 3, 8, 8) and torch.allclose(same_size, torch.full_like(same_size, 2.0))


def test_batch_transform_resizes_when_only_the_height_differs():
    out = utils.BatchTransform(size=32)(torch.zeros(2, 3, 40, 32, dtype=torch.uint8))
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 32, 32, 3)])
def test_batch_transform_names_a_batch_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        utils.BatchTransform()(torch.zeros(shape, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_batch_transform_refuses_anything_but_uint8(dtype):
    with pytest.raises(TypeError, match="uint8"):
        utils.BatchTransform()(torch.zeros(2, 3, 8, 8, dtype=dtype))


def test_device_loader_yields_ready_batches_and_a_fair_sample(folder_root):
    train_set, _, _ = utils.load_cifar10(folder_root)
    loader = utils.make_loader(train_set, 16, "cpu", shuffle=True, transform=utils.BatchTransform(size=40))
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 40, 40) and images.dtype == torch.float32 and labels.shape == (16,)
    assert len(loader) == 4 and loader.batch_size == 16 and loader.dataset is train_set
    assert not hasattr(loader, "channels_last")
    sample_images, sample_labels = loader.sample(20)
    assert sample_images.shape == (20, 3, 40, 40)
    assert len(set(sample_labels.tolist())) >= 5
    again_images, again_labels = loader.sample(20)
    assert torch.equal(sample_images, again_images) and torch.equal(sample_labels, again_labels)
    assert not torch.equal(loader.sample(20, seed=1)[1], sample_labels)


def test_shuffle_is_seeded(folder_root):
    train_set, _, _ = utils.load_cifar10(folder_root)
    orders = [torch.cat([labels for _, labels in utils.make_loader(train_set, 10, "cpu", shuffle=True, seed=3)])
              for _ in range(2)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], train_set.labels)
    other = torch.cat([labels for _, labels in utils.make_loader(train_set, 10, "cpu", shuffle=True, seed=4)])
    assert not torch.equal(other, orders[0])


def test_device_loader_sample_keeps_each_label_with_its_image():
    labels = torch.randperm(50, generator=torch.Generator().manual_seed(0)) % 10
    images = (25 * labels).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()   # pixels say the label
    loader = utils.make_loader(utils.UInt8ImageDataset(images, labels, list("abcdefghij")), 8, "cpu", shuffle=False)
    sample_images, sample_labels = loader.sample(20)
    assert len(set(sample_labels.tolist())) > 1
    assert torch.equal(sample_images[:, 0, 0, 0].long(), 25 * sample_labels)

