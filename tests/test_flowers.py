"""Image-folder helpers of utils.py (flower_photos): download and unpacking, the split manifest,
the class index and the file dataset. Everything runs offline on files made in tmp_path."""
import hashlib
import io
import json
import pathlib
import random
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import utils
from tests import fakedata


def make_folder(root: pathlib.Path, counts: dict[str, int], order_seed: int | None = None) -> pathlib.Path:
    """`root/<class>/<class>_NNN.jpg` with `counts` files per class (a few distinct bytes each:
    the split never decodes), created in a shuffled order when `order_seed` is given."""
    names = [(c, f"{c}_{i:03d}.jpg") for c, n in counts.items() for i in range(n)]
    if order_seed is not None:
        random.Random(order_seed).shuffle(names)
    for c, name in names:
        (root / c).mkdir(parents=True, exist_ok=True)
        (root / c / name).write_bytes(name.encode())
    return root


def tree_digest(root: pathlib.Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and modification time of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def relative(files, root):
    return [p.relative_to(root).as_posix() for p in files]


# ---- the split ------------------------------------------------------------------------------

def test_split_is_stratified_and_disjoint(tmp_path):
    counts = {"daisy": 10, "dandelion": 25, "roses": 40, "sunflowers": 63, "tulips": 2}
    root = make_folder(tmp_path / "photos", counts)
    train, val, classes = utils.split_image_folder(root, tmp_path / "split.json")
    assert classes == sorted(counts)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(p for p in root.rglob("*.jpg"))
    for name, n in counts.items():
        n_val = sum(p.parent.name == name for p in val)
        n_train = sum(p.parent.name == name for p in train)
        assert n_val >= 1 and n_train >= 1, name              # every class in both splits
        assert abs(n_val - 0.1 * n) <= 1, (name, n_val)       # about 10 % of each class


def test_split_of_generated_flowers_has_every_class_in_val(tmp_path):
    root = fakedata.write_flower_photos(tmp_path / "data")
    train, val, classes = utils.split_image_folder(root, tmp_path / "split.json")
    assert classes == list(fakedata.FLOWER_CLASSES)
    assert {p.parent.name for p in val} == set(classes)
    assert (len(train), len(val)) == (55, 5)                  # 12 per class: 1 to val


def test_split_is_reproducible_and_independent_of_listing_order(tmp_path, monkeypatch):
    counts = {"a": 30, "b": 17, "c": 44}
    first = make_folder(tmp_path / "first", counts)
    second = make_folder(tmp_path / "second", counts, order_seed=1)   # created in another order
    expected = utils.split_image_folder(first, tmp_path / "m1.json", seed=3)
    original_iterdir = pathlib.Path.iterdir

    def shuffled_iterdir(self):
        entries = list(original_iterdir(self))
        random.Random(str(self)).shuffle(entries)
        return iter(entries)

    monkeypatch.setattr(pathlib.Path, "iterdir", shuffled_iterdir)
    again = utils.split_image_folder(second, tmp_path / "m2.json", seed=3)
    assert relative(again[0], second) == relative(expected[0], first)
    assert relative(again[1], second) == relative(expected[1], first)
    other_seed = utils.split_image_folder(first, tmp_path / "m3.json", seed=4)
    assert relative(other_seed[1], first) != relative(expected[1], first)


def test_split_is_the_same_on_every_machine(tmp_path):
    """A fixed seed gives a fixed split: this list was recorded once and must never change
    (it would if the split used Python's per-process hash or the file system's order)."""
    root = make_folder(tmp_path / "photos", {"a": 20, "b": 20})
    _, val, _ = utils.split_image_folder(root, tmp_path / "split.json", seed=0)
    assert relative(val, root) == ["a/a_003.jpg", "a/a_015.jpg", "b/b_004.jpg", "b/b_012.jpg"]


def test_split_leaves_the_originals_untouched(tmp_path):
    root = fakedata.write_flower_photos(tmp_path / "data")
    before = tree_digest(root)
    train, val, classes = utils.split_image_folder(root, tmp_path / "model" / "split.json")
    dataset = utils.ImageFileDataset(train + val, classes, transform=transforms.ToTensor())
    for i in range(len(dataset)):
        dataset[i]
    assert tree_digest(root) == before                        # same files, bytes and times
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["split.json"]


def test_split_is_idempotent(tmp_path):
    root = make_folder(tmp_path / "photos", {"a": 12, "b": 9})
    manifest = tmp_path / "split.json"
    first = utils.split_image_folder(root, manifest, seed=5)
    stat, content = manifest.stat(), manifest.read_bytes()
    second = utils.split_image_folder(root, manifest, seed=5)
    assert second == first
    assert manifest.read_bytes() == content
    assert manifest.stat().st_mtime_ns == stat.st_mtime_ns and manifest.stat().st_ino == stat.st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "split.json"]   # no temporary files


def test_split_refuses_a_manifest_made_with_other_settings(tmp_path):
    root = make_folder(tmp_path / "photos", {"a": 12, "b": 9})
    utils.split_image_folder(root, tmp_path / "split.json", seed=0)
    with pytest.raises(ValueError, match="seed=0"):
        utils.split_image_folder(root, tmp_path / "split.json", seed=1)


@pytest.mark.parametrize("change, kind, name", [
    (lambda root: (root / "a" / "new.jpg").write_bytes(b"new"), "added", "a/new.jpg"),
    (lambda root: (root / "b" / "b_004.jpg").unlink(), "removed", "b/b_004.jpg"),
    (lambda root: (root / "a" / "a_002.jpg").write_bytes(b"A_002.jpg"), "changed", "a/a_002.jpg"),  # same size
])
def test_a_changed_source_folder_is_reported(tmp_path, change, kind, name):
    root = make_folder(tmp_path / "photos", {"a": 12, "b": 9})
    manifest = tmp_path / "split.json"
    utils.split_image_folder(root, manifest)
    content = manifest.read_bytes()
    change(root)
    with pytest.raises(utils.DataChangedError) as info:
        utils.split_image_folder(root, manifest)
    message = str(info.value)
    assert f"{kind} (1): {name}" in message
    assert str(manifest) in message and "delete" in message
    assert manifest.read_bytes() == content                   # never silently re-split


# ---- the class index ------------------------------------------------------------------------

def test_class_index_round_trip(tmp_path):
    classes = list(fakedata.FLOWER_CLASSES)
    path = utils.write_class_index(tmp_path / "class_indices.json", classes)
    assert json.loads(path.read_text()) == {"0": "daisy", "1": "dandelion", "2": "roses",
                                            "3": "sunflowers", "4": "tulips"}
    assert utils.read_class_index(path) == classes
    mtime = path.stat().st_mtime_ns
    utils.write_class_index(path, classes)                    # identical: not rewritten
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("content", ['{"1": "a", "2": "b"}', '["a", "b"]', '{"0": 5}', "not json"])
def test_read_class_index_rejects_other_files(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.json"):
        utils.read_class_index(path)


# ---- the dataset ----------------------------------------------------------------------------

def test_dataset_loads_any_image_mode(tmp_path):
    folder = tmp_path / "flowers" / "roses"
    folder.mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(folder / "grey.jpg")
    rgb.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((20, 40), 40000, dtype=np.uint16)).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                          # orientation: rotate 90 degrees
    rgb.save(folder / "rotated.jpg", exif=exif)
    files = sorted(folder.iterdir())
    raw = utils.ImageFileDataset(files, ["roses"])
    for i, path in enumerate(raw.files):
        image, label = raw[i]
        assert image.mode == "RGB" and int(label) == 0, path.name
        assert image.size == ((20, 40) if path.name == "rotated.jpg" else (40, 20)), path.name
    tensors = utils.ImageFileDataset(files, ["roses"], transforms.Compose([
        transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]))
    for i in range(len(tensors)):
        x, _ = tensors[i]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1


def test_dataset_labels_come_from_folders_and_subset_limits_files(tmp_path):
    root = fakedata.write_flower_photos(tmp_path / "data")
    train, _, classes = utils.split_image_folder(root, tmp_path / "split.json")
    full = utils.ImageFileDataset(train, classes)
    assert [classes[int(label)] for label in full.labels] == [p.parent.name for p in full.files]
    assert len(utils.ImageFileDataset(train, classes, subset=20)) == 20
    with pytest.raises(ValueError, match="not classes"):
        utils.ImageFileDataset(train, ["daisy"])


def test_dataset_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "daisy" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        utils.ImageFileDataset([bad], ["daisy"])[0]


# ---- download and unpacking -----------------------------------------------------------------

def write_tgz(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_offline_and_missing_gives_one_clear_error(tmp_path, monkeypatch):
    def offline(url, path, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(utils, "_download_file", offline)
    with pytest.raises(utils.DataNotFoundError) as info:
        utils.load_flower_photos(tmp_path)
    message = str(info.value)
    for part in (f"DATA_DIR={tmp_path}", f"{tmp_path}/flower_photos/<class>/*.jpg",
                 utils.FLOWER_PHOTOS_URL, "no network"):
        assert part in message, part
    assert list(tmp_path.iterdir()) == []                     # no half folder, no temp folder left


def test_missing_without_download_never_calls_the_downloader(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "_download_file", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(utils.DataNotFoundError, match="download=False"):
        utils.load_flower_photos(tmp_path, download=False)


def test_download_unpacks_into_place(tmp_path, monkeypatch):
    archive = write_tgz(tmp_path / "flowers.tgz", {"flower_photos/LICENSE.txt": b"cc-by",
                                                   "flower_photos/daisy/1.jpg": b"one",
                                                   "flower_photos/roses/2.jpg": b"two"})
    monkeypatch.setattr(utils, "_download_file", lambda url, path, *a, **k: path.write_bytes(archive.read_bytes()))
    data_dir = tmp_path / "data"
    root = utils.load_flower_photos(data_dir)
    assert root == data_dir / "flower_photos"
    assert (root / "daisy" / "1.jpg").read_bytes() == b"one"
    assert [p.name for p in data_dir.iterdir()] == ["flower_photos"]   # the temporary folder is gone
    monkeypatch.setattr(utils, "_download_file", lambda *a, **k: pytest.fail("downloaded twice"))
    assert utils.load_flower_photos(data_dir) == root


def test_download_over_http_from_a_local_server(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    write_tgz(served / "flower_photos.tgz", {"flower_photos/tulips/1.jpg": b"one"})
    base_url, server = fakedata.serve_directory(served)
    try:
        monkeypatch.setattr(utils, "FLOWER_PHOTOS_URL", f"{base_url}/flower_photos.tgz")
        root = utils.load_flower_photos(tmp_path / "data")
        assert (root / "tulips" / "1.jpg").read_bytes() == b"one"
        monkeypatch.setattr(utils, "FLOWER_PHOTOS_URL", f"{base_url}/missing.tgz")
        with pytest.raises(utils.DataNotFoundError, match="404"):
            utils.load_flower_photos(tmp_path / "elsewhere")
    finally:
        server.shutdown()


@pytest.mark.parametrize("name", ["../evil.txt", "flower_photos/../../evil.txt", "/tmp/evil.txt"])
def test_an_archive_escaping_its_folder_is_rejected(tmp_path, name):
    archive = write_tgz(tmp_path / "evil.tgz", {"flower_photos/daisy/1.jpg": b"one", name: b"evil"})
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(ValueError, match="refusing to unpack"):
        utils.safe_extract_tar(archive, dest)
    assert not (tmp_path / "dest").exists() and not (tmp_path / "evil.txt").exists()


def test_an_archive_with_a_link_is_rejected(tmp_path):
    archive = tmp_path / "link.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("flower_photos/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="link"):
        utils.safe_extract_tar(archive, tmp_path / "dest")


@pytest.mark.parametrize("content, reason", [(b"<html>not found</html>", "not a gzip file"),
                                             ("truncated", "not a valid gzip tar")])
def test_a_broken_archive_is_rejected(tmp_path, content, reason):
    archive = tmp_path / "broken.tgz"
    if content == "truncated":
        whole = write_tgz(tmp_path / "whole.tgz", {f"flower_photos/daisy/{i}.jpg": np.random.bytes(5000)
                                                   for i in range(5)}).read_bytes()
        content = whole[:len(whole) // 2]
    archive.write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        utils.safe_extract_tar(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_an_unsafe_download_leaves_nothing_behind(tmp_path, monkeypatch):
    archive = write_tgz(tmp_path / "evil.tgz", {"flower_photos/daisy/1.jpg": b"one", "../evil.txt": b"evil"})
    monkeypatch.setattr(utils, "_download_file", lambda url, path, *a, **k: path.write_bytes(archive.read_bytes()))
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="refusing to unpack"):
        utils.load_flower_photos(data_dir)
    assert list(data_dir.iterdir()) == [] and not (tmp_path / "evil.txt").exists()
