"""The data layer: both CIFAR-10 layouts, SUBSET, the offline error, the fast-path transforms."""
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import utils
from tests import fakedata


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    fakedata.write_cifar10_folder(root, train_per_class=6, test_per_class=3)
    return root


def write_torchvision_layout(root, per_batch=20, seed=0):
    """torchvision's cifar-10-batches-py pickles, with random pixels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(fakedata.CIFAR10_CLASSES)}))
    return folder


def test_image_folder_layout_is_found(folder_root):
    train_set, test_set = utils.load_cifar10(folder_root)
    assert (len(train_set), len(test_set)) == (60, 30)
    assert train_set.classes == list(fakedata.CIFAR10_CLASSES)
    image, label = train_set[7]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label == 1          # files are read class by class, in sorted order


def test_torchvision_layout_is_found(tmp_path, monkeypatch):
    write_torchvision_layout(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    train_set, test_set = utils.load_cifar10(tmp_path, download=False)
    assert (len(train_set), len(test_set)) == (100, 20)
    assert train_set.classes == list(fakedata.CIFAR10_CLASSES)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(train_set.images[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)))


def test_subset_keeps_a_fixed_random_draw(folder_root):
    first, _ = utils.load_cifar10(folder_root, subset=25)
    second, test_set = utils.load_cifar10(folder_root, subset=25)
    assert len(first) == 25 and len(test_set) == 25
    assert torch.equal(first.images, second.images)
    assert len(set(first.labels.tolist())) > 5   # a random draw, not the first class only


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
    fakedata.write_cifar10_folder(tmp_path, train_per_class=1, test_per_class=1)
    odd = tmp_path / "cifar10" / "train" / "cat" / "big.png"
    fakedata.Image.new("RGB", (40, 40)).save(odd)
    with pytest.raises(ValueError, match="one size"):
        utils.load_cifar10(tmp_path)


def test_test_split_is_never_augmented_or_shuffled(folder_root):
    train_set, test_set = utils.load_cifar10(folder_root, augment=utils.RandomCropFlip())
    assert train_set.augment is not None and test_set.augment is None
    assert torch.equal(test_set[4][0], test_set.images[4])
    loader = utils.make_loader(test_set, 8, "cpu", shuffle=False)
    first = torch.cat([labels for _, labels in loader])
    second = torch.cat([labels for _, labels in loader])
    assert torch.equal(first, test_set.labels) and torch.equal(second, test_set.labels)


def test_random_crop_flip_shifts_and_mirrors():
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    utils.seed_everything(0)
    crops = [utils.RandomCropFlip(padding=2)(image) for _ in range(400)]   # 1 in 50 is uncropped and unflipped
    assert all(c.shape == image.shape and c.dtype == torch.uint8 for c in crops)
    assert any(torch.equal(c, image) for c in crops) and any(torch.equal(c, image.flip(-1)) for c in crops)
    assert any((c == 0).any() for c in crops)   # zero padding shows at some offsets
    flipped = utils.RandomCropFlip(padding=0, flip=True)
    assert {bool(torch.equal(flipped(image), image)) for _ in range(30)} == {True, False}


def test_batch_transform_normalises_and_resizes():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = utils.BatchTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=227)(images)
    assert out.shape == (2, 3, 227, 227) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 2.0))
    floats = torch.randn(2, 3, 8, 8)
    assert utils.BatchTransform()(floats) is floats


def test_device_loader_yields_ready_batches_and_a_fair_sample(folder_root):
    train_set, _ = utils.load_cifar10(folder_root)
    loader = utils.make_loader(train_set, 16, "cpu", shuffle=True, transform=utils.BatchTransform(size=40))
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 40, 40) and images.dtype == torch.float32 and labels.shape == (16,)
    assert len(loader) == 4
    sample_images, sample_labels = loader.sample(20)
    assert sample_images.shape == (20, 3, 40, 40)
    assert len(set(sample_labels.tolist())) >= 5


def test_shuffle_is_seeded(folder_root):
    train_set, _ = utils.load_cifar10(folder_root)
    orders = [torch.cat([labels for _, labels in utils.make_loader(train_set, 10, "cpu", shuffle=True, seed=3)])
              for _ in range(2)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], train_set.labels)
