"""Image-folder helpers of utils.py (flower_photos): download and unpacking, the split manifest,
the class index and the file dataset. Everything runs offline on files made in tmp_path."""
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import tarfile

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


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Nothing here may reach the real FLOWER_PHOTOS_URL, even if a stand-in downloader is missed."""
    monkeypatch.setattr(utils, "FLOWER_PHOTOS_URL", "http://127.0.0.1:9/flower_photos.tgz")


# ---- the split ------------------------------------------------------------------------------

def test_split_is_stratified_80_10_10_and_disjoint(tmp_path):
    counts = {"daisy": 10, "dandelion": 25, "roses": 40, "sunflowers": 63, "tulips": 3}
    root = make_folder(tmp_path / "photos", counts)
    train, val, test, classes = utils.split_image_folder(root, tmp_path / "split.json")
    assert classes == sorted(counts)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == sorted(p for p in root.rglob("*.jpg"))
    for name, n in counts.items():
        n_train, n_val, n_test = (sum(p.parent.name == name for p in part) for part in (train, val, test))
        assert min(n_train, n_val, n_test) >= 1, name          # every class in every split
        assert abs(n_val - 0.1 * n) <= 1 and abs(n_test - 0.1 * n) <= 1, (name, n_val, n_test)
    assert (len(train), len(val), len(test)) == (113, 14, 14)


def test_split_of_generated_flowers_has_every_class_in_val_and_test(tmp_path):
    root = fakedata.write_flower_photos(tmp_path / "data")
    train, val, test, classes = utils.split_image_folder(root, tmp_path / "split.json")
    assert classes == list(fakedata.FLOWER_CLASSES)
    assert {p.parent.name for p in val} == {p.parent.name for p in test} == set(classes)
    assert (len(train), len(val), len(test)) == (50, 5, 5)    # 12 per class: 1 to val, 1 to test


def test_split_fractions_are_settings(tmp_path):
    root = make_folder(tmp_path / "photos", {"a": 20, "b": 40})
    train, val, test, _ = utils.split_image_folder(root, tmp_path / "split.json", val_fraction=0.2,
                                                   test_fraction=0.25)
    assert (len(train), len(val), len(test)) == (33, 12, 15)
    for fractions in ((0, 0.1), (0.1, 0), (0.5, 0.5), (1.2, 0.1)):
        with pytest.raises(ValueError, match="between 0 and 1"):
            utils.split_image_folder(root, tmp_path / "other.json", *fractions)


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
    for part in range(3):
        assert relative(again[part], second) == relative(expected[part], first)
    other_seed = utils.split_image_folder(first, tmp_path / "m3.json", seed=4)
    assert relative(other_seed[1], first) != relative(expected[1], first)


def test_split_is_the_same_on_every_machine(tmp_path):
    """A fixed seed gives a fixed split: these lists were recorded once and must never change
    (they would if the split used Python's per-process hash or the file system's order)."""
    root = make_folder(tmp_path / "photos", {"a": 20, "b": 20})
    _, val, test, _ = utils.split_image_folder(root, tmp_path / "split.json", seed=0)
    assert relative(val, root) == ["a/a_003.jpg", "a/a_015.jpg", "b/b_004.jpg", "b/b_012.jpg"]
    assert relative(test, root) == ["a/a_010.jpg", "a/a_016.jpg", "b/b_013.jpg", "b/b_017.jpg"]


def test_split_leaves_the_originals_untouched(tmp_path):
    root = fakedata.write_flower_photos(tmp_path / "data")
    before = tree_digest(root)
    train, val, test, classes = utils.split_image_folder(root, tmp_path / "model" / "split.json")
    dataset = utils.ImageFileDataset(train + val + test, classes, 32)
    for i in range(len(dataset)):
        dataset[i]
    utils.split_image_folder(root, tmp_path / "model" / "split.json")
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


def test_manifest_records_size_time_and_hash_of_every_file(tmp_path):
    root = make_folder(tmp_path / "photos", {"a": 4, "b": 3})
    utils.split_image_folder(root, tmp_path / "split.json")
    manifest = json.loads((tmp_path / "split.json").read_text())
    assert sorted(manifest["files"]) == relative(sorted(root.rglob("*.jpg")), root)
    record = manifest["files"]["a/a_001.jpg"]
    path = root / "a" / "a_001.jpg"
    assert record == {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert manifest["fractions"] == {"val": 0.1, "test": 0.1} and manifest["seed"] == 0


@pytest.fixture
def hash_counter(monkeypatch):
    """The files `utils` hashes, by name (through `file_record` or `hashlib.sha256`)."""
    hashed = []
    real_record, real_sha256 = utils.file_record, hashlib.sha256

    def counting_record(path):
        hashed.append(pathlib.Path(path).name)
        return real_record(path)

    def counting_sha256(*args, **kwargs):
        hashed.append("sha256")
        return real_sha256(*args, **kwargs)

    monkeypatch.setattr(utils, "file_record", counting_record)
    monkeypatch.setattr(utils.hashlib, "sha256", counting_sha256)
    return hashed


def test_a_second_call_hashes_no_unchanged_file(tmp_path, hash_counter):
    root = make_folder(tmp_path / "photos", {"a": 12, "b": 9})
    utils.split_image_folder(root, tmp_path / "split.json")
    assert hash_counter.count("sha256") == 21                  # the first call hashes every file
    hash_counter.clear()
    utils.split_image_folder(root, tmp_path / "split.json")
    assert hash_counter == []


def test_a_touched_file_is_hashed_alone_and_its_new_time_recorded(tmp_path, hash_counter):
    root = make_folder(tmp_path / "photos", {"a": 12, "b": 9})
    manifest = tmp_path / "split.json"
    first = utils.split_image_folder(root, manifest)
    touched = root / "b" / "b_003.jpg"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))   # same content, new time
    hash_counter.clear()
    assert utils.split_image_folder(root, manifest) == first   # no error, the same split
    assert hash_counter == ["b_003.jpg", "sha256"]
    assert json.loads(manifest.read_text())["files"]["b/b_003.jpg"]["mtime_ns"] == touched.stat().st_mtime_ns
    hash_counter.clear()
    utils.split_image_folder(root, manifest)
    assert hash_counter == []                                  # recorded: not hashed again


def test_a_copied_folder_still_matches_its_manifest(tmp_path):
    root = make_folder(tmp_path / "photos", {"a": 12, "b": 9})
    manifest = tmp_path / "split.json"
    first = utils.split_image_folder(root, manifest)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)                                # new times, same bytes
    again = utils.split_image_folder(copy, manifest)
    for part in range(3):
        assert relative(again[part], copy) == relative(first[part], root)


def test_split_refuses_a_manifest_made_with_other_settings(tmp_path):
    root = make_folder(tmp_path / "photos", {"a": 12, "b": 9})
    utils.split_image_folder(root, tmp_path / "split.json", seed=0)
    with pytest.raises(ValueError, match="seed=0"):
        utils.split_image_folder(root, tmp_path / "split.json", seed=1)
    with pytest.raises(ValueError, match="0.2"):
        utils.split_image_folder(root, tmp_path / "split.json", val_fraction=0.2)


@pytest.mark.parametrize("content", [
    json.dumps({"val_fraction": 0.1, "train": ["a/a_000.jpg"], "val": ["a/a_001.jpg"], "files": {}}),  # v1
    "not json",
    "[1, 2]",
])
def test_an_old_or_foreign_manifest_says_delete_it(tmp_path, content):
    root = make_folder(tmp_path / "photos", {"a": 12, "b": 9})
    manifest = tmp_path / "split.json"
    manifest.write_text(content)
    with pytest.raises(ValueError) as info:
        utils.split_image_folder(root, manifest)
    message = str(info.value)
    assert message.startswith(str(manifest)) and "not a train/val/test split manifest" in message
    assert "delete it" in message
    assert manifest.read_text() == content                    # left for the user to decide


def bump_time(path):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def same_size_edit(root):
    """Other bytes of the same size; the time is moved on explicitly, because a file system's
    clock may not tick between the split and the edit (the check compares size and time)."""
    path = root / "a" / "a_002.jpg"
    path.write_bytes(b"A_002.jpg")
    bump_time(path)


@pytest.mark.parametrize("change, kind, name", [
    (lambda root: (root / "a" / "new.jpg").write_bytes(b"new"), "added", "a/new.jpg"),
    (lambda root: (root / "b" / "b_004.jpg").unlink(), "removed", "b/b_004.jpg"),
    (same_size_edit, "changed", "a/a_002.jpg"),
    (lambda root: (root / "b" / "b_001.jpg").write_bytes(b"a longer content"), "changed", "b/b_001.jpg"),
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


@pytest.mark.parametrize("content", ['{"1": "a", "2": "b"}', '["a", "b"]', '{"0": 5}', "{}", "not json"])
def test_read_class_index_rejects_other_files(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.json"):
        utils.read_class_index(path)


# ---- the dataset ----------------------------------------------------------------------------

def test_dataset_loads_any_image_mode_as_uint8(tmp_path):
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
    dataset = utils.ImageFileDataset(files, ["roses"], image_size=24)
    assert len(dataset) == 6
    for i, path in enumerate(dataset.files):
        image, label = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and int(label) == 0, path.name
        expected = utils.image_to_tensor(utils.load_image(path), 24)   # the one decoder, the one resize
        assert torch.equal(image, expected), path.name
    assert utils.load_image(folder / "rotated.jpg").size == (20, 40)
    grey, _ = dataset[[p.name for p in dataset.files].index("grey.jpg")]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_dataset_applies_a_pil_augmentation_before_the_tensor(tmp_path):
    root = fakedata.write_flower_photos(tmp_path / "data", per_class=3)
    train, _, _, classes = utils.split_image_folder(root, tmp_path / "split.json")
    seen = []

    def augment(image):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        seen.append(image.size)
        return image.transpose(Image.FLIP_LEFT_RIGHT)

    plain = utils.ImageFileDataset(train, classes, 32)
    flipped = utils.ImageFileDataset(train, classes, 32, augment=augment)
    for i in range(len(plain)):
        assert torch.equal(flipped[i][0], utils.image_to_tensor(
            utils.load_image(plain.files[i]).transpose(Image.FLIP_LEFT_RIGHT), 32))
    assert len(seen) == len(plain)
    random_crop = utils.ImageFileDataset(train, classes, 40, augment=transforms.Compose([
        transforms.RandomResizedCrop(28), transforms.RandomHorizontalFlip()]))
    image, _ = random_crop[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 40)


def test_dataset_labels_come_from_folders_and_subset_limits_files(tmp_path):
    root = fakedata.write_flower_photos(tmp_path / "data")
    train, _, _, classes = utils.split_image_folder(root, tmp_path / "split.json")
    full = utils.ImageFileDataset(train, classes, 32)
    assert [classes[int(label)] for label in full.labels] == [p.parent.name for p in full.files]
    part = utils.ImageFileDataset(train, classes, 32, subset=20)
    assert len(part) == 20 and set(part.files) <= set(full.files)
    assert part.files == utils.ImageFileDataset(train, classes, 32, subset=20).files   # a fixed draw
    assert len({p.parent.name for p in part.files}) > 1
    with pytest.raises(ValueError, match="not classes"):
        utils.ImageFileDataset(train, ["daisy"], 32)


def test_dataset_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "daisy" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        utils.ImageFileDataset([bad], ["daisy"], 32)[0]


def test_scan_image_folder_lists_classes_and_images_sorted(tmp_path):
    make_folder(tmp_path, {"b": 2, "a": 1}, order_seed=0)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "a" / "UPPER.JPG").write_bytes(b"x")
    assert utils.scan_image_folder(tmp_path) == (["a", "b"], ["a/UPPER.JPG", "a/a_000.jpg", "b/b_000.jpg",
                                                              "b/b_001.jpg"])


# ---- download and unpacking -----------------------------------------------------------------

def write_tgz(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def serve_archive(archive):
    """A stand-in for `utils.fetch_url` that writes `archive` into the file object it is given."""
    def fake_download(url, file, *, timeout, max_bytes, progress=False):
        file.write(archive.read_bytes())
        return "application/x-gzip"
    return fake_download


def test_offline_and_missing_gives_one_clear_error(tmp_path, monkeypatch):
    def offline(url, file, **kwargs):
        raise ValueError(f"{url}: could not connect (no network)")

    monkeypatch.setattr(utils, "fetch_url", offline)
    with pytest.raises(utils.DataNotFoundError) as info:
        utils.load_flower_photos(tmp_path)
    message = str(info.value)
    for part in (f"DATA_DIR={tmp_path}", f"{tmp_path}/flower_photos/<class>/*.jpg",
                 utils.FLOWER_PHOTOS_URL, "no network"):
        assert part in message, part
    assert list(tmp_path.iterdir()) == []                     # no half folder, no temp folder left


def test_missing_without_download_never_calls_the_downloader(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "fetch_url", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(utils.DataNotFoundError, match="download=False"):
        utils.load_flower_photos(tmp_path, download=False)


def test_an_empty_flower_photos_folder_is_reported(tmp_path, monkeypatch):
    (tmp_path / "flower_photos").mkdir()
    monkeypatch.setattr(utils, "fetch_url", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(utils.DataNotFoundError, match="no <class>/ folders"):
        utils.load_flower_photos(tmp_path)


def test_download_unpacks_into_place(tmp_path, monkeypatch):
    archive = write_tgz(tmp_path / "flowers.tgz", {"flower_photos/LICENSE.txt": b"cc-by",
                                                   "flower_photos/daisy/1.jpg": b"one",
                                                   "flower_photos/roses/2.jpg": b"two"})
    monkeypatch.setattr(utils, "fetch_url", serve_archive(archive))
    data_dir = tmp_path / "data"
    root = utils.load_flower_photos(data_dir)
    assert root == data_dir / "flower_photos"
    assert (root / "daisy" / "1.jpg").read_bytes() == b"one"
    assert [p.name for p in data_dir.iterdir()] == ["flower_photos"]   # the temporary folder is gone
    monkeypatch.setattr(utils, "fetch_url", lambda *a, **k: pytest.fail("downloaded twice"))
    assert utils.load_flower_photos(data_dir) == root


def test_download_over_http_from_a_local_server_goes_through_fetch_url(tmp_path, monkeypatch):
    photos = fakedata.write_flower_photos(tmp_path / "source", per_class=3)
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "flower_photos.tgz", "w:gz") as tar:
        tar.add(photos, arcname="flower_photos")
    calls = []
    real_download = utils.fetch_url

    def spy(url, file, **kwargs):
        calls.append((url, kwargs["max_bytes"], kwargs["timeout"]))
        return real_download(url, file, **kwargs)

    monkeypatch.setattr(utils, "fetch_url", spy)
    base_url, server = fakedata.serve_directory(served)
    try:
        monkeypatch.setattr(utils, "FLOWER_PHOTOS_URL", f"{base_url}/flower_photos.tgz")
        root = utils.load_flower_photos(tmp_path / "data")
        assert calls == [(f"{base_url}/flower_photos.tgz", utils.MAX_ARCHIVE_BYTES, utils.ARCHIVE_TIMEOUT)]
        assert tree_digest_bytes(root) == tree_digest_bytes(photos)
        train, val, test, classes = utils.split_image_folder(root, tmp_path / "split.json")
        assert classes == list(fakedata.FLOWER_CLASSES) and (len(train), len(val), len(test)) == (5, 5, 5)
        monkeypatch.setattr(utils, "FLOWER_PHOTOS_URL", f"{base_url}/missing.tgz")
        with pytest.raises(utils.DataNotFoundError) as info:
            utils.load_flower_photos(tmp_path / "elsewhere")
        message = str(info.value)
        assert f"DATA_DIR={tmp_path / 'elsewhere'}" in message and "HTTP error 404" in message
        assert f"{base_url}/missing.tgz" in message
        assert list((tmp_path / "elsewhere").iterdir()) == []
    finally:
        server.shutdown()


def tree_digest_bytes(root: pathlib.Path) -> dict[str, str]:
    return {k: digest for k, (digest, _) in tree_digest(root).items()}


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
    monkeypatch.setattr(utils, "fetch_url", serve_archive(archive))
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="refusing to unpack"):
        utils.load_flower_photos(data_dir)
    assert list(data_dir.iterdir()) == [] and not (tmp_path / "evil.txt").exists()
