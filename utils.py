"""Shared helpers for the CIFAR-10 course notebooks.

Everything the notebooks repeat lives here; what each notebook teaches (its network, its
recipe) stays in the notebook. Read it top to bottom, section by section:

    Setup         device, seeding, settings from environment variables
    Data          CIFAR-10 in either layout, uint8 fast path, loaders that finish batches on the device
    Image folders flower_photos: safe download, a reproducible split manifest, class index, file dataset
    Training      `train` and its `History`
    Evaluation    accuracy, per-class accuracy, confusion matrix, image grids
    Persistence   checkpoints with metadata, atomic saves, weights-only loading
    Prediction    any image source to top-k classes, with clear errors for bad input
    Plotting      `plot_history`, `show_filters` and `show_feature_maps` (what a network learned)
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import math
import os
import pathlib
import platform
import random
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

REPO_DIR = pathlib.Path(__file__).resolve().parent

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the training images, in [0, 1]
CIFAR10_STD = (0.2470, 0.2435, 0.2616)   # per-channel std of the training images


# =============================================================================================
# Setup
# =============================================================================================

def get_device() -> torch.device:
    """The fastest device here: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so that a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def env_int(name: str, default: int) -> int:
    """The integer in environment variable `name`, or `default` when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def env_str(name: str, default: str) -> str:
    """The string in environment variable `name`, or `default` when it is unset or empty."""
    return os.environ.get(name, "").strip() or default


def env_path(name: str, default: str | os.PathLike) -> pathlib.Path:
    """The folder named by environment variable `name` (or `default`), made absolute."""
    return pathlib.Path(env_str(name, str(default))).expanduser().resolve()


# =============================================================================================
# Data
# =============================================================================================

class DataNotFoundError(FileNotFoundError):
    """A data set is neither in DATA_DIR nor downloadable."""


class UInt8ImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, H, W), with integer labels.

    `augment` runs per sample on the small uint8 image, which is cheap; conversion to float,
    resizing and normalisation wait until a whole batch is on the training device
    (see `BatchTransform`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes, augment=None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.classes = list(classes)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return image, self.labels[index]


class RandomCropFlip:
    """Random crop after zero padding, and a random horizontal flip, for one uint8 image (3, H, W)."""

    def __init__(self, padding: int = 4, flip: bool = True):
        self.padding, self.flip = padding, flip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.padding:
            p = self.padding
            h, w = image.shape[-2:]
            padded = F.pad(image, (p, p, p, p))
            top, left = random.randint(0, 2 * p), random.randint(0, 2 * p)
            image = padded[:, top:top + h, left:left + w]
        if self.flip and random.random() < 0.5:
            image = image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"


def _subset_indices(n: int, subset: int, seed: int = 0) -> torch.Tensor:
    """All indices, or `subset` of them drawn at random with a fixed seed (so every class appears)."""
    if subset <= 0 or subset >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:subset].sort().values


def _decode_rgb(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _load_image_folder(split_dir: pathlib.Path, subset: int):
    """Decode an image-folder split (`<class>/*`) into a uint8 tensor (N, 3, H, W)."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    files = [(f, label) for label, c in enumerate(classes)
             for f in sorted((split_dir / c).iterdir()) if f.is_file() and not f.name.startswith(".")]
    if not files:
        raise DataNotFoundError(f"no images found under {split_dir}")
    files = [files[i] for i in _subset_indices(len(files), subset)]
    arrays = []
    for f, _ in files:
        try:
            arrays.append(_decode_rgb(f))
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{f}: not a readable image ({err})") from None
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"{split_dir}: images must all have one size, found {sorted(sizes)[:3]}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files])
    return images, labels, classes


def _cifar10_missing_message(data_dir: pathlib.Path, reason: str) -> str:
    return (f"CIFAR-10 was not found in DATA_DIR={data_dir} and could not be downloaded ({reason}).\n"
            f"Put it there in either layout:\n"
            f"  1. torchvision's: {data_dir}/cifar-10-batches-py/ (from "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpacked)\n"
            f"  2. an image folder: {data_dir}/cifar10/train/<class>/*.png and {data_dir}/cifar10/test/<class>/*.png\n"
            f"or run once with internet access to download it, or set DATA_DIR to a folder that has it.")


def load_cifar10(data_dir, subset: int = 0, augment=None, download: bool = True):
    """CIFAR-10 as two `UInt8ImageDataset`s (train, test), from `data_dir` in either layout.

    Looks for `data_dir/cifar10/{train,test}/<class>/*` first, then torchvision's
    `data_dir/cifar-10-batches-py`; downloads the latter when both are missing and `download`
    is true. `subset` > 0 keeps at most that many images per split (a fixed random draw).
    `augment` applies to the training split only: the test split is never augmented.
    Raises `DataNotFoundError` naming DATA_DIR, both layouts and how to get the data.
    """
    data_dir = pathlib.Path(data_dir).expanduser().resolve()
    folder = data_dir / "cifar10"
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train = _load_image_folder(folder / "train", subset)
        test = _load_image_folder(folder / "test", subset)
        if train[2] != test[2]:
            raise ValueError(f"{folder}: train classes {train[2]} differ from test classes {test[2]}")
    else:
        train, test = _load_torchvision_cifar10(data_dir, subset, download)
    return (UInt8ImageDataset(*train, augment=augment), UInt8ImageDataset(*test))


def _load_torchvision_cifar10(data_dir: pathlib.Path, subset: int, download: bool):
    from torchvision.datasets import CIFAR10

    splits = []
    for is_train in (True, False):
        try:
            dataset = CIFAR10(str(data_dir), train=is_train, download=False)
        except RuntimeError:
            if not download:
                raise DataNotFoundError(_cifar10_missing_message(data_dir, "download=False")) from None
            try:
                dataset = CIFAR10(str(data_dir), train=is_train, download=True)
            except (OSError, RuntimeError, urllib.error.URLError) as err:
                raise DataNotFoundError(_cifar10_missing_message(data_dir, f"offline? {err}")) from None
        keep = _subset_indices(len(dataset.data), subset)
        images = torch.from_numpy(dataset.data)[keep].permute(0, 3, 1, 2).contiguous()
        splits.append((images, torch.tensor(dataset.targets)[keep], dataset.classes))
    return splits


class BatchTransform(nn.Module):
    """Finish a batch on the training device: uint8 -> float in [0, 1], resize, normalise.

    Doing this once per batch on the GPU (instead of per image in PIL on the CPU) is what
    keeps a fast GPU fed from a 2-core host. Float batches pass through untouched, so loaders
    whose workers already produce normalised tensors (real photos) can share the same code.
    """

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD, size: int | None = None):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        # Normalise before upscaling: bilinear weights sum to 1, so the result is the same,
        # but the arithmetic runs on 32x32 pixels instead of 227x227 (50 times fewer).
        x = images.float().div_(255).sub_(self.mean).div_(self.std)   # (B, 3, h, w)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=False)
        return x                                                       # (B, 3, size, size)


class DeviceLoader:
    """Wrap a DataLoader so that it yields batches ready for the model on `device`.

    Copies are non-blocking from pinned memory on CUDA; `transform` (a `BatchTransform`) runs
    on the device. It keeps `dataset`, `batch_size` and `len()` of the wrapped loader.
    """

    def __init__(self, loader: DataLoader, device, transform: nn.Module | None = None,
                 channels_last: bool = False):
        self.loader, self.device = loader, torch.device(device)
        self.transform = transform.to(self.device) if transform is not None else None
        self.channels_last = channels_last
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def _ready(self, images, labels):
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking)
        labels = labels.to(self.device, non_blocking=non_blocking)
        if self.transform is not None:
            images = self.transform(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def __iter__(self):
        for images, labels in self.loader:
            yield self._ready(images, labels)

    def sample(self, n: int, seed: int = 0):
        """`n` images drawn at random (with a fixed seed) from the whole data set, as one ready
        batch: a fair sample even when the data set is sorted by class."""
        indices = _subset_indices(len(self.dataset), n, seed).tolist()
        images, labels = default_collate([self.dataset[i] for i in indices])
        return self._ready(images, labels)



def default_num_workers() -> int:
    """DataLoader workers for per-sample PIL pipelines: one per core, leaving one for training."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def make_loader(dataset: Dataset, batch_size: int, device, *, shuffle: bool,
                transform: nn.Module | None = None, num_workers: int = 0,
                drop_last: bool = False, seed: int = 0) -> DeviceLoader:
    """A `DeviceLoader` over `dataset`: shuffled with a seeded generator when `shuffle`,
    pinned memory on CUDA, persistent workers when `num_workers` > 0.

    In-memory uint8 datasets need no workers (`num_workers=0`): indexing them costs
    microseconds. Datasets that decode files per sample want `default_num_workers()`.
    """
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed) if shuffle else None)
    return DeviceLoader(loader, device, transform)


def show_images(images: torch.Tensor, labels, classes, mean=None, std=None, ncols: int = 8,
                title: str | None = None):
    """A grid of images (uint8, or float normalised with mean/std) titled with their class names."""
    import matplotlib.pyplot as plt

    n = len(images)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.7 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels):
        imshow(image, mean, std, ax=ax)
        ax.set_title(classes[int(label)], fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# =============================================================================================
# Image folders (flower_photos)
# =============================================================================================

FLOWER_PHOTOS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataChangedError(ValueError):
    """The files of an image folder differ from those its split manifest was made from."""


def _flower_photos_missing_message(data_dir: pathlib.Path, reason: str) -> str:
    return (f"flower_photos was not found in DATA_DIR={data_dir} and could not be downloaded ({reason}).\n"
            f"Expected layout: {data_dir}/flower_photos/<class>/*.jpg, one folder per class "
            f"(daisy, dandelion, roses, sunflowers, tulips).\n"
            f"Download {FLOWER_PHOTOS_URL} and unpack it into {data_dir}, "
            f"or run once with internet access, or set DATA_DIR to a folder that has it.")


def _download_file(url: str, path: pathlib.Path, timeout: float = 60.0) -> None:
    """Download `url` to `path` with a progress bar. A short read (fewer bytes than the server
    announced) raises `OSError`, like a network error."""
    request = urllib.request.Request(url, headers={"User-Agent": "cifar10-course/1.0"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(path, "wb") as f:
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        size = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {url.rsplit('/', 1)[-1]}") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    if total is not None and size != total:
        raise OSError(f"{url}: received {size:,} of {total:,} bytes")


def _unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name.replace("\\", "/")
    if name.startswith("/") or pathlib.PureWindowsPath(member.name).drive:
        return "an absolute path"
    if ".." in pathlib.PurePosixPath(name).parts:
        return "a '..' component"
    if not (member.isfile() or member.isdir()):
        return "neither a file nor a folder (a link or device)"
    return None


def safe_extract_tar(archive, dest) -> None:
    """Unpack the gzip-compressed tar `archive` into the folder `dest`, with a progress bar,
    after checking the whole archive: a valid gzip tar whose members are plain files and folders
    with relative paths and no `..`. Raises `ValueError` naming the archive and the reason
    before anything is extracted."""
    archive, dest = pathlib.Path(archive), pathlib.Path(dest)
    with open(archive, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            raise ValueError(f"{archive}: not a gzip file")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()              # reads to the end: a truncated file fails here
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{archive}: not a valid gzip tar archive ({err})") from None
    for member in members:
        if reason := _unsafe_member_reason(member):
            raise ValueError(f"{archive}: refusing to unpack, member {member.name!r} has {reason}")
    # tarfile's "data" filter (Python 3.11.4+) repeats these checks and drops odd permissions
    options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tqdm(tar, total=len(members), desc=f"unpacking {archive.name}", unit="file"):
            tar.extract(member, dest, **options)


def load_flower_photos(data_dir, download: bool = True) -> pathlib.Path:
    """The folder `data_dir/flower_photos` (one sub-folder of photos per class), downloaded from
    TensorFlow's example images and unpacked when it is missing and `download` is true.

    The archive is checked (see `safe_extract_tar`) and unpacked into a temporary folder beside
    the destination that is then renamed into place, so a failed or interrupted download never
    leaves half a data set. Raises `DataNotFoundError` naming DATA_DIR, the layout and how to get
    the data when it is missing and cannot be downloaded.
    """
    data_dir = pathlib.Path(data_dir).expanduser().resolve()
    root = data_dir / "flower_photos"
    if root.is_dir():
        if not any(d.is_dir() for d in root.iterdir()):
            raise DataNotFoundError(f"{root} exists but holds no <class>/ folders of images")
        return root
    if not download:
        raise DataNotFoundError(_flower_photos_missing_message(data_dir, "download=False"))
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".flower_photos-", dir=data_dir))
    except OSError as err:
        raise DataNotFoundError(_flower_photos_missing_message(data_dir, f"cannot write there: {err}")) from None
    try:
        archive = tmp / "flower_photos.tgz"
        try:
            _download_file(FLOWER_PHOTOS_URL, archive)
        except (OSError, http.client.HTTPException) as err:    # URLError and time-outs are OSErrors
            raise DataNotFoundError(_flower_photos_missing_message(data_dir, f"offline? {err}")) from None
        safe_extract_tar(archive, tmp / "unpacked")
        unpacked = tmp / "unpacked" / "flower_photos"
        if not unpacked.is_dir():
            raise ValueError(f"{FLOWER_PHOTOS_URL}: the archive holds no flower_photos/ folder")
        os.replace(unpacked, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _scan_image_folder(root: pathlib.Path) -> tuple[list[str], list[str]]:
    """(classes, files): the class folders under `root` and the image files in them as relative
    POSIX paths "class/name", both sorted, whatever order the file system lists them in."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = sorted(f"{c}/{f.name}" for c in classes for f in (root / c).iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
    return classes, files


def _stratified_split(files: list[str], classes: list[str], val_fraction: float, seed: int):
    """(train, val): from each class, `val_fraction` of its files (at least one) go to val.
    Each class is shuffled by its own generator, seeded with a string (which Python hashes with
    SHA-512, not with the per-process `hash`), so the split is the same on every machine."""
    train, val = [], []
    for name in classes:
        members = [f for f in files if f.split("/", 1)[0] == name]
        if len(members) < 2:
            raise ValueError(f"class {name!r} has {len(members)} image(s): a split needs at least 2")
        random.Random(f"{seed}/{name}").shuffle(members)
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val += sorted(members[:n_val])
        train += sorted(members[n_val:])
    return train, val


def _file_digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(path: pathlib.Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        if not {"val_fraction", "seed", "classes", "train", "val", "files"} <= manifest.keys():
            raise ValueError("keys are missing")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a split manifest ({err}); delete it to split afresh") from None
    return manifest


def _check_unchanged(recorded: dict, current: dict, root: pathlib.Path, manifest_path: pathlib.Path) -> None:
    """Raise `DataChangedError` listing the files added, removed or changed since the manifest."""
    added = sorted(current.keys() - recorded.keys())
    removed = sorted(recorded.keys() - current.keys())
    changed = sorted(f for f in current.keys() & recorded.keys() if current[f] != recorded[f])
    if not (added or removed or changed):
        return
    lines = [f"  {kind} ({len(names)}): " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
             for kind, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
    raise DataChangedError(
        f"{root} is not what its split manifest {manifest_path} was made from:\n" + "\n".join(lines) +
        f"\nRestore the original files, or delete {manifest_path} to split the current files afresh "
        f"(a model trained on the old split may then have seen some of the new val images).")


def split_image_folder(root, manifest_path, val_fraction: float = 0.1, seed: int = 0):
    """Split an image folder `root/<class>/*` into train and val, stratified by class: each class
    gives `val_fraction` of its images (at least one) to val. The file names are sorted before a
    generator seeded with `seed` shuffles them, so every machine makes the same split.

    The split is a list of files, written once to the JSON `manifest_path` with a SHA-256 of every
    file; nothing under `root` is moved, changed or written. Later calls reuse the manifest and
    write nothing, after checking that the files are the same (by content, so a copied or moved
    folder still matches). Returns (train_files, val_files, classes), the files as paths under `root`.
    Raises `DataChangedError` naming the files added, removed or changed since the manifest was
    made, and `ValueError` when the manifest was made with another `val_fraction` or `seed`.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    root = pathlib.Path(root).expanduser().resolve()
    manifest_path = pathlib.Path(manifest_path)
    classes, files = _scan_image_folder(root)
    if not files:
        raise DataNotFoundError(f"no images found under {root}/<class>/")
    digests = {f: _file_digest(root / f) for f in files}
    if manifest_path.exists():
        manifest = _read_manifest(manifest_path)
        if (manifest["val_fraction"], manifest["seed"]) != (val_fraction, seed):
            raise ValueError(f"{manifest_path} holds a split with val_fraction={manifest['val_fraction']}, "
                             f"seed={manifest['seed']}, not val_fraction={val_fraction}, seed={seed}: "
                             f"pass those, or another manifest path")
        _check_unchanged(manifest["files"], digests, root, manifest_path)
        classes, train, val = manifest["classes"], manifest["train"], manifest["val"]
    else:
        train, val = _stratified_split(files, classes, val_fraction, seed)
        data = json.dumps({"root": str(root), "val_fraction": val_fraction, "seed": seed, "classes": classes,
                           "train": train, "val": val, "files": digests}, indent=1).encode()
        _atomic_write(manifest_path, lambda f: f.write(data))
    return [root / f for f in train], [root / f for f in val], list(classes)


def write_class_index(path, classes) -> pathlib.Path:
    """Write the class names as JSON {"0": "daisy", "1": "dandelion", ...} (index to name, the
    file the AlexNet-Flowers article writes). An identical file already there is left untouched."""
    path = pathlib.Path(path)
    data = json.dumps({str(i): name for i, name in enumerate(classes)}, indent=4).encode()
    if not (path.is_file() and path.read_bytes() == data):
        _atomic_write(path, lambda f: f.write(data))
    return path


def read_class_index(path) -> list[str]:
    """The class names of a `write_class_index` file, in index order. Raises `ValueError` for a
    file that is not {"0": name, ..., "n-1": name}."""
    path = pathlib.Path(path)
    try:
        index = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    keys = [str(i) for i in range(len(index))] if isinstance(index, dict) else None
    if keys is None or set(index) != set(keys) or not all(isinstance(v, str) for v in index.values()):
        raise ValueError(f'{path}: expected a class index {{"0": name, "1": name, ...}} numbered from 0')
    return [index[k] for k in keys]


class ImageFileDataset(Dataset):
    """Image files whose class is the name of their folder (`.../<class>/<file>`), decoded with
    `load_image` (any mode to RGB, EXIF rotation applied) only when an item is read, so that the
    decoding runs in the DataLoader's worker processes. `transform` (e.g. a torchvision transform)
    turns the PIL image into what the model takes; without it, items are PIL images.
    `subset` > 0 keeps at most that many files (a fixed random draw).
    """

    def __init__(self, files, classes, transform=None, subset: int = 0):
        files = [pathlib.Path(f) for f in files]
        self.files = [files[i] for i in _subset_indices(len(files), subset).tolist()]
        self.classes = list(classes)
        lookup = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({f.parent.name for f in self.files} - lookup.keys())
        if unknown:
            raise ValueError(f"files in folders that are not classes: {unknown} (classes: {self.classes})")
        self.labels = torch.tensor([lookup[f.parent.name] for f in self.files], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = load_image(self.files[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


# =============================================================================================
# Training
# =============================================================================================

PER_BATCH_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


@dataclass
class History:
    """What `train` measured, one entry per completed epoch."""
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)   # fraction in [0, 1]
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)    # fraction in [0, 1]
    lr: list[float] = field(default_factory=list)          # learning rate used during the epoch
    seconds: list[float] = field(default_factory=list)     # wall time of the epoch, evaluation included
    info: dict = field(default_factory=dict)               # model, device, date, settings

    def __len__(self) -> int:
        return len(self.epoch)

    @property
    def best_test_acc(self) -> float:
        return max(self.test_acc, default=float("nan"))

    def to_json(self, path) -> None:
        """Write the history as JSON, atomically."""
        data = json.dumps(asdict(self), indent=1).encode()
        _atomic_write(pathlib.Path(path), lambda f: f.write(data))

    @classmethod
    def from_json(cls, path) -> "History":
        return cls(**json.loads(pathlib.Path(path).read_text()))


def _current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _dataset_size(loader) -> int | None:
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else None


def _hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"


def train(model: nn.Module, train_loader, test_loader, num_epochs: int, optimizer, criterion,
          scheduler=None, *, device=None, checkpoint_path=None, metadata: dict | None = None,
          writer=None, amp: bool | None = None, amp_dtype: torch.dtype | None = None,
          channels_last: bool | None = None, compile: bool = False,
          scheduler_interval: str | None = None, log_every: int = 20, progress: bool = True,
          verbose: bool = True) -> History:
    """Train `model` for `num_epochs`, evaluating on `test_loader` after each epoch.

    scheduler: None, a per-epoch scheduler (StepLR, CosineAnnealingLR, ...), ReduceLROnPlateau
        (stepped with the test loss), or a per-batch one (OneCycleLR, CyclicLR);
        `scheduler_interval` ("batch" or "epoch") overrides the guess.
    checkpoint_path: where the best model (by test accuracy) is saved, atomically, with
        `metadata` (see `save_checkpoint`); the history goes beside it as `<stem>_history.json`
        after every epoch. A file already there from an earlier run is kept as a backup.
    writer: an optional TensorBoard `SummaryWriter`.
    amp, channels_last: default on for CUDA; `amp_dtype` defaults to float16 on CUDA
        (with gradient scaling) and bfloat16 elsewhere.
    A non-finite loss raises `FloatingPointError` naming the epoch and batch (the best
    checkpoint stays); Ctrl-C (KeyboardInterrupt) stops and returns the history so far.
    Loaders must yield batches on `device` (see `DeviceLoader`).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    on_cuda = device.type == "cuda"
    amp = on_cuda if amp is None else amp
    amp_dtype = amp_dtype or (torch.float16 if on_cuda else torch.bfloat16)
    channels_last = on_cuda if channels_last is None else channels_last
    if scheduler_interval is None:
        scheduler_interval = "batch" if isinstance(scheduler, PER_BATCH_SCHEDULERS) else "epoch"
    if scheduler_interval not in ("batch", "epoch"):
        raise ValueError(f"scheduler_interval must be 'batch' or 'epoch', got {scheduler_interval!r}")
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    if channels_last:
        model.to(memory_format=torch.channels_last)
        for loader in (train_loader, test_loader):
            if isinstance(loader, DeviceLoader):
                loader.channels_last = True
    step_model = torch.compile(model) if compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    checkpoint_path = pathlib.Path(checkpoint_path) if checkpoint_path else None
    history = History(info={
        "model": type(model).__name__, "device": _hardware(), "torch": str(torch.__version__),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "optimizer": type(optimizer).__name__,
        "scheduler": type(scheduler).__name__ if scheduler else None,
        "batch_size": getattr(train_loader, "batch_size", None),
        "train_images": _dataset_size(train_loader), "test_images": _dataset_size(test_loader),
        "amp": str(amp_dtype).replace("torch.", "") if amp else None,
    })
    if checkpoint_path:
        history.info["checkpoint"] = str(checkpoint_path)
    backed_up: set[pathlib.Path] = set()
    best_acc = -1.0

    try:
        for epoch in range(1, num_epochs + 1):
            start = time.perf_counter()
            lr = _current_lr(optimizer)
            train_loss, train_acc = _train_one_epoch(
                step_model, train_loader, optimizer, criterion, scaler, amp, amp_dtype, device,
                scheduler if scheduler_interval == "batch" else None,
                epoch, num_epochs, log_every, progress)
            test_loss, test_acc = evaluate(step_model, test_loader, criterion, amp=amp, amp_dtype=amp_dtype)
            if scheduler is not None and scheduler_interval == "epoch":
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(test_loss)
                else:
                    scheduler.step()
            seconds = time.perf_counter() - start
            for name, value in (("epoch", epoch), ("train_loss", train_loss), ("train_acc", train_acc),
                                ("test_loss", test_loss), ("test_acc", test_acc), ("lr", lr),
                                ("seconds", seconds)):
                getattr(history, name).append(value)
            if checkpoint_path and test_acc > best_acc:
                best_acc = test_acc
                save_checkpoint(checkpoint_path, model, backup=checkpoint_path not in backed_up,
                                **(metadata or {}), epoch=epoch, test_acc=test_acc)
                backed_up.add(checkpoint_path)
            if checkpoint_path:
                history_path = history_path_for(checkpoint_path)
                if history_path not in backed_up:
                    _backup_existing(history_path)
                    backed_up.add(history_path)
                history.to_json(history_path)
            if writer is not None:
                for name, value in (("loss/train", train_loss), ("loss/test", test_loss),
                                    ("accuracy/train", train_acc), ("accuracy/test", test_acc),
                                    ("lr", lr)):
                    writer.add_scalar(name, value, epoch)
                writer.flush()
            if verbose:
                print(f"epoch {epoch:>3}/{num_epochs}  train loss {train_loss:.4f}  acc {train_acc:6.2%}  "
                      f"| test loss {test_loss:.4f}  acc {test_acc:6.2%}  | lr {lr:.2e}  {seconds:6.1f} s")
    except KeyboardInterrupt:
        print(f"Interrupted: returning the history of {len(history)} completed epoch(s).")
    return history


def _train_one_epoch(model, loader, optimizer, criterion, scaler, amp, amp_dtype, device,
                     batch_scheduler, epoch, num_epochs, log_every, progress):
    """One pass over `loader`; returns (mean loss, accuracy). Syncs with the device only every
    `log_every` batches (for the progress bar and the non-finite check), not every batch."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    recent_losses: list[torch.Tensor] = []
    bar = tqdm(loader, desc=f"epoch {epoch}/{num_epochs}", leave=False, disable=not progress,
               unit="batch")
    for batch, (images, labels) in enumerate(bar, start=1):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            outputs = model(images)
            loss = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if batch_scheduler is not None:
            batch_scheduler.step()
        loss = loss.detach()
        recent_losses.append(loss)
        loss_sum += loss.float() * len(labels)
        correct += (outputs.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if batch % log_every == 0 or batch == len(loader):
            _check_finite(recent_losses, epoch, batch)
            recent_losses.clear()
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}")
    if seen == 0:
        raise ValueError("the training loader yielded no batches")
    return loss_sum.item() / seen, correct.item() / seen


def _check_finite(losses: list[torch.Tensor], epoch: int, last_batch: int) -> None:
    if not losses:
        return
    finite = torch.isfinite(torch.stack(losses).float())
    if not bool(finite.all()):
        first_bad = int((~finite).nonzero()[0])
        batch = last_batch - len(losses) + 1 + first_bad
        raise FloatingPointError(
            f"the training loss became {losses[first_bad].item()} at epoch {epoch}, batch {batch}: "
            f"training stopped (the best checkpoint so far is kept). "
            f"Try a lower learning rate or check the inputs for NaNs.")


# =============================================================================================
# Evaluation
# =============================================================================================

@torch.no_grad()
def predict_loader(model: nn.Module, loader, amp: bool = False,
                   amp_dtype: torch.dtype = torch.bfloat16):
    """Logits and labels for the whole loader, concatenated: (N, classes) float, (N,) long."""
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp):
            logits.append(model(images).float())
        labels.append(targets)
    if not logits:
        raise ValueError("the loader yielded no batches")
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader, criterion=None, amp: bool = False,
             amp_dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader; loss is nan without a criterion."""
    logits, labels = predict_loader(model, loader, amp, amp_dtype)
    loss = criterion(logits, labels).item() if criterion is not None else float("nan")
    return loss, (logits.argmax(1) == labels).float().mean().item()


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    index = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """Accuracy of each true class from a confusion matrix (nan for a class with no images)."""
    return matrix.diag().float() / matrix.sum(1).float()


def print_per_class_accuracy(matrix: torch.Tensor, classes) -> None:
    width = max(len(c) for c in classes)
    for name, acc, count in zip(classes, per_class_accuracy(matrix).tolist(), matrix.sum(1).tolist()):
        print(f"{name:>{width}}: {acc:7.2%}  of {count} images")


def plot_confusion_matrix(matrix: torch.Tensor, classes, save_path=None):
    """Heat map of the confusion matrix, each row normalised to fractions of its true class."""
    import matplotlib.pyplot as plt

    fractions = (matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(0.6 * len(classes) + 3, 0.6 * len(classes) + 2.5))
    im = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if fractions[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    if save_path:
        fig.savefig(save_path, dpi=100)
    return fig


def imshow(image: torch.Tensor, mean=None, std=None, ax=None):
    """Show one image (3, H, W): uint8, or float normalised with `mean`/`std` (undone here)."""
    import matplotlib.pyplot as plt

    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        image = image.float() / 255
    elif mean is not None and std is not None:
        image = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    ax = ax or plt.gca()
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.axis("off")
    return ax


@torch.no_grad()
def show_predictions(model: nn.Module, loader: DeviceLoader, classes, mean=None, std=None,
                     n: int = 64, ncols: int = 8, seed: int = 0, save_path=None):
    """A grid of `n` images drawn at random from the loader's data set, titled
    "predicted (true)": green when right, red when wrong. Returns (figure, accuracy on them)."""
    import matplotlib.pyplot as plt

    model.eval()
    images, labels = loader.sample(n, seed)
    predictions = model(images).argmax(1)
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, prediction in zip(axes.flat, images, labels.tolist(), predictions.tolist()):
        imshow(image, mean, std, ax=ax)
        ax.set_title(f"{classes[prediction]}\n({classes[label]})", fontsize=9,
                     color="green" if prediction == label else "red")
    accuracy = (predictions == labels).float().mean().item()
    fig.suptitle(f"predicted (true): {accuracy:.1%} right on these {len(images)} images")
    fig.tight_layout()
    if save_path:
        fig.savefig(save_path, dpi=80)
    return fig, accuracy


# =============================================================================================
# Persistence
# =============================================================================================

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: pathlib.Path, write) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it
    over `path`: a crash or kill at any moment leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())   # mkstemp makes files private; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _backup_existing(path: pathlib.Path) -> pathlib.Path | None:
    """Rename an existing file to `<stem>.<its modification time><suffix>` so that a new run
    never overwrites an earlier run's result. Returns the backup's path, if any."""
    if not path.exists():
        return None
    stamp = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 1
    while backup.exists():
        backup = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        n += 1
    os.replace(path, backup)
    print(f"Kept the earlier {path.name} as {backup.name}")
    return backup


def history_path_for(checkpoint_path) -> pathlib.Path:
    """Where `train` writes the history of a checkpoint: `<stem>_history.json` beside it."""
    checkpoint_path = pathlib.Path(checkpoint_path)
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_history.json")


def _plain(value):
    """Metadata as plain Python types, which `torch.load(weights_only=True)` accepts."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (str, pathlib.Path)):
        return str(value)                                 # also str subclasses like TorchVersion
    return value


def save_checkpoint(path, model: nn.Module, *, classes=None, input_size=None, mean=None, std=None,
                    arch: str | None = None, backup: bool = True, **extra) -> pathlib.Path:
    """Save the model's state_dict with what is needed to use it again: class names, input
    size, normalisation and architecture name (plus any `extra` plain values).

    The write is atomic; with `backup`, a file already at `path` is renamed aside, not lost.
    """
    path = pathlib.Path(path)
    model = getattr(model, "_orig_mod", model)               # torch.compile wrapper
    model = model.module if isinstance(model, nn.DataParallel) else model
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    checkpoint = {
        "state_dict": state_dict,
        "meta": _plain({"arch": arch or type(model).__name__, "classes": classes,
                        "input_size": input_size, "mean": mean, "std": std,
                        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "torch": str(torch.__version__), **extra}),
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    if backup:
        _backup_existing(path)
    _atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def load_checkpoint(path, model: nn.Module | None = None, map_location="cpu") -> dict:
    """Load a checkpoint saved by `save_checkpoint` with `weights_only=True` (no pickled code
    runs). With `model`, its weights are loaded into it (strictly). Returns the metadata, with
    the state_dict under "state_dict". A `module.` prefix from `nn.DataParallel` is removed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a checkpoint this course can load ({err})") from None
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        state_dict, meta = checkpoint["state_dict"], dict(checkpoint.get("meta", {}))
    elif isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict, meta = checkpoint, {}                    # a bare state_dict
    else:
        raise ValueError(f"{path}: holds {type(checkpoint).__name__}, not a state_dict")
    state_dict = strip_module_prefix(state_dict)
    if model is not None:
        model.load_state_dict(state_dict)
    meta["state_dict"] = state_dict
    return meta


def assert_same_weights(model: nn.Module, other: nn.Module) -> None:
    """Raise `AssertionError` naming the first tensor (weight or buffer) in which two models
    differ, bit for bit; the proof that a checkpoint round-tripped."""
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys(), f"different tensors: {sorted(mine.keys() ^ theirs.keys())}"
    for name, tensor in mine.items():
        assert torch.equal(tensor.cpu(), theirs[name].cpu()), f"{name} differs"


def strip_module_prefix(state_dict: dict) -> dict:
    """Remove the `module.` that `nn.DataParallel` (and DDP) put before every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


# =============================================================================================
# Prediction
# =============================================================================================

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024  # refuse bigger image downloads
MAX_IMAGE_PIXELS = 50_000_000          # refuse bigger images (decompression bombs)
DOWNLOAD_TIMEOUT = 10.0                # seconds for the whole download


def _fetch_url(url: str, timeout: float, max_bytes: int) -> bytes:
    """Download `url` within `timeout` seconds in all and at most `max_bytes` bytes."""
    deadline = time.monotonic() + timeout
    timed_out = ValueError(f"{url}: the download timed out after {timeout:g} s")
    chunks, size = [], 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "cifar10-course/1.0"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise ValueError(f"{url}: the response is {int(length):,} bytes, over the "
                                 f"{max_bytes:,}-byte limit")
            content_type = response.headers.get("Content-Type", "")
            while chunk := response.read1(64 * 1024):   # read1: whatever arrived, so a trickle can't stall us
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"{url}: the download passed the {max_bytes:,}-byte limit")
                if time.monotonic() > deadline:
                    raise timed_out
                chunks.append(chunk)
    except urllib.error.HTTPError as err:
        raise ValueError(f"{url}: HTTP error {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise timed_out from None
        raise ValueError(f"{url}: could not connect ({err.reason})") from None
    except TimeoutError:
        raise timed_out from None
    except (OSError, http.client.HTTPException) as err:
        raise ValueError(f"{url}: the download failed ({err!r})") from None
    except ValueError as err:                                # a malformed URL
        if str(err).startswith(url):
            raise
        raise ValueError(f"{url}: not a valid URL ({err})") from None
    data = b"".join(chunks)
    if not data:
        raise ValueError(f"{url}: the response was empty")
    if content_type and not content_type.startswith("image/"):
        _check_is_image(data, f"{url}: the response is {content_type.split(';')[0]}, not an image")
    return data


def _check_is_image(data: bytes, message: str) -> None:
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValueError(message) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit and float greyscale are rescaled, transparent
    pixels are composited onto white, and EXIF orientation is applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and array.max(initial=0) <= 1 else \
            255.0 if array.max(initial=0) <= 255 else 65535.0
        array = np.clip(array / top * 255, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source, *, timeout: float = DOWNLOAD_TIMEOUT, max_bytes: int = MAX_DOWNLOAD_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read an image from a path, an http(s) URL, bytes, a binary file object or a PIL image,
    as 8-bit RGB.

    Raises `ValueError` naming the source and the reason for anything that is not a readable
    image: a missing file, a non-image, a truncated image, an HTTP error, a time-out, a
    download over `max_bytes`, or more than `max_pixels` pixels (a decompression bomb).
    """
    if isinstance(source, Image.Image):
        name, data = "the PIL image", None
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, data = f"the {len(source):,} bytes given", bytes(source)
    elif isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        name, data = source, _fetch_url(source, timeout, max_bytes)
    elif isinstance(source, str) and not source.strip():
        raise ValueError("an empty string is neither a path nor a URL")
    elif isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source).expanduser()
        name = str(path)
        if "://" in str(source):
            raise ValueError(f"{source}: only http:// and https:// URLs are supported")
        if not path.exists():
            raise ValueError(f"{name}: no such file")
        if not path.is_file():
            raise ValueError(f"{name}: not a file")
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{name}: {path.stat().st_size:,} bytes, over the {max_bytes:,}-byte limit")
        data = path.read_bytes()
    elif hasattr(source, "read"):
        name = getattr(source, "name", "the file object")
        data = source.read(max_bytes + 1)
        if not isinstance(data, bytes):
            raise ValueError(f"{name}: opened in text mode; open images with 'rb'")
        if len(data) > max_bytes:
            raise ValueError(f"{name}: over the {max_bytes:,}-byte limit")
    else:
        raise ValueError(f"cannot read an image from {type(source).__name__}: pass a path, "
                         f"an http(s) URL, bytes, a binary file or a PIL image")
    if data is not None:
        if not data:
            raise ValueError(f"{name}: empty, not an image")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ValueError(f"{name}: too many pixels, a possible decompression bomb ({err})") from None
        except UnidentifiedImageError:
            raise ValueError(f"{name}: not a readable image (not an image format Pillow knows)") from None
        except (OSError, SyntaxError) as err:
            raise ValueError(f"{name}: not a readable image ({err})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"{name}: {width}x{height} pixels, over the {max_pixels:,}-pixel limit "
                         f"(a possible decompression bomb)")
    if width == 0 or height == 0:
        raise ValueError(f"{name}: the image is empty ({width}x{height})")
    try:
        image.load()
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as err:
        reason = "truncated" if "truncated" in str(err) else "corrupt or unsupported"
        raise ValueError(f"{name}: the image is {reason} ({err})") from None


def preprocess(image: Image.Image, input_size: int, mean, std) -> torch.Tensor:
    """An RGB PIL image as a normalised (1, 3, size, size) batch, the way the model was trained."""
    image = image.resize((input_size, input_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)).unsqueeze(0)


def print_top_k(pairs) -> None:
    """Print (class name, probability) pairs from `predict` as a small table."""
    width = max(len(name) for name, _ in pairs)
    for name, probability in pairs:
        print(f"{name:>{width}}: {probability:6.1%}")


def show_prediction(image: Image.Image, pairs, caption: str | None = None) -> None:
    """Show `image` titled with the most likely class and its probability, then print
    `caption` (if any) and the (class name, probability) table from `predict`. Returns
    nothing, so that a notebook does not draw the figure twice."""
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image)
    ax.set_title(f"{pairs[0][0]} ({pairs[0][1]:.1%})")
    ax.axis("off")
    plt.show()
    if caption:
        print(caption)
    print_top_k(pairs)


@torch.no_grad()
def predict(model: nn.Module, source, classes, input_size: int, mean, std, topk: int = 5,
            **load_options) -> list[tuple[str, float]]:
    """The `topk` most likely (class name, probability) pairs for one image from any source
    `load_image` accepts. Raises `ValueError` for anything that is not a readable image."""
    image = load_image(source, **load_options)
    device = next(model.parameters()).device
    model.eval()
    logits = model(preprocess(image, input_size, mean, std).to(device)).float()
    probs = logits.softmax(1)[0]
    values, indices = probs.topk(min(topk, len(classes)))
    return [(classes[i], p) for i, p in zip(indices.tolist(), values.tolist())]


# =============================================================================================
# Plotting
# =============================================================================================

def plot_history(history: History, save_path=None, title: str | None = None):
    """Loss, accuracy and learning rate per epoch, side by side; saved as a PNG with `save_path`."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    epochs = history.epoch
    marker = "o" if len(epochs) < 30 else None
    ax_loss.plot(epochs, history.train_loss, marker=marker, label="train")
    ax_loss.plot(epochs, history.test_loss, marker=marker, label="test")
    ax_loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.plot(epochs, [100 * a for a in history.train_acc], marker=marker, label="train")
    ax_acc.plot(epochs, [100 * a for a in history.test_acc], marker=marker, label="test")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="%")
    ax_lr.plot(epochs, history.lr, marker=marker, color="tab:green")
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    if history.lr and min(history.lr) > 0 and max(history.lr) / min(history.lr) > 10:
        ax_lr.set_yscale("log")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if save_path:
        pathlib.Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_path, dpi=100)
    return fig


def _scaled_to_unit(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` shifted and scaled to span [0, 1] (a constant tensor becomes 0.5)."""
    low, high = tensor.min(), tensor.max()
    if high == low:
        return torch.full_like(tensor, 0.5)
    return (tensor - low) / (high - low)


def show_filters(weights: torch.Tensor, ncols: int = 12, titles=None, title: str | None = None,
                 cell_size: float = 1.1):
    """A grid of (N, C, H, W) weights or images, each scaled to [0, 1] on its own: colour for
    C = 3 (e.g. a first convolution's filters, or deconvnet reconstructions), the channel mean
    in grey otherwise; `cell_size` inches per image. Returns the figure."""
    import matplotlib.pyplot as plt

    weights = weights.detach().float().cpu()
    n = len(weights)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell_size * ncols, cell_size * nrows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, w) in enumerate(zip(axes.flat, weights)):
        if w.shape[0] == 3:
            ax.imshow(_scaled_to_unit(w).permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.imshow(_scaled_to_unit(w.mean(0)).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_feature_maps(maps: torch.Tensor, n: int = 16, ncols: int = 8, title: str | None = None):
    """The `n` most active channels (highest mean) of one image's feature maps (C, H, W), in
    grey on one shared scale, each titled with its channel index. Returns the figure."""
    import matplotlib.pyplot as plt

    maps = maps.detach().float().cpu()
    if maps.dim() != 3:
        raise ValueError(f"maps must be (C, H, W) for one image, got {tuple(maps.shape)}")
    channels = maps.mean((1, 2)).argsort(descending=True)[:n].tolist()
    vmin, vmax = float(maps[channels].min()), float(maps[channels].max())
    nrows = math.ceil(len(channels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 1.5 * nrows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, channel in zip(axes.flat, channels):
        ax.imshow(maps[channel].numpy(), cmap="gray", vmin=vmin, vmax=vmax)
        ax.set_title(f"#{channel}", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
