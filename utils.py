"""Shared helpers for the CIFAR-10 course notebooks.

Everything the notebooks repeat lives here; what each notebook teaches (its network, its
recipe) stays in the notebook. The sections follow the order of a lesson, and nothing is used
above its definition:

    Setup         device, seeding, settings from environment variables, and which process
                  this is when torchrun starts several (`is_distributed`, `rank`, `world_size`)
    Files         atomic writes, and earlier results kept aside instead of overwritten
    Downloads     one downloader (requests), with time and size limits
    Images        one decoder (any source, any mode, to 8-bit RGB), one folder scanner,
                  one conversion to a uint8 tensor
    Data          CIFAR-10 as train / validation / test, augmentation, `BatchTransform`
                  (the one normalisation), loaders that finish batches on the device (and,
                  under torchrun, load each process's share of the data)
    Image folders flower_photos: safe unpacking, a reproducible train/val/test split
    Persistence   checkpoints with metadata, weights-only loading with errors in words
    Evaluation    logits of a whole loader, test-time augmentation, accuracy, per-class
                  accuracy, confusion matrix
    Training      `train`: validation-chosen best checkpoint, resumable, and its `History`;
                  under torchrun, DistributedDataParallel with one process per device
    Prediction    any image to top-k classes, preprocessed exactly as in training
    Plotting      every figure: images, predictions, confusion matrix, history, filters
    Sections 5-9  the end of every lesson in one call each (CustomCNN.ipynb writes them out)
    Results       the course's measured runs, from results/
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import platform
import random
import shutil
import signal
import tarfile
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

REPO_DIR = pathlib.Path(__file__).resolve().parent

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


def synchronize(device) -> None:
    """Wait until `device` has finished the work queued on it, so that a clock read next measures
    that work: CUDA and MPS run asynchronously, the CPU needs no wait."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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


def hardware() -> str:
    """The GPU's name, or the CPU's core count and architecture: written beside every measurement."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"


def is_distributed() -> bool:
    """True in a process of a distributed run: one of several that `torchrun` started, after
    `torch.distributed.init_process_group` (train_ddp.py does both). The helpers below then load
    this process's share of the data, combine the shares, and leave files and printing to
    process 0. False in an ordinary run, a notebook's kernel say."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's number in a distributed run, 0 to `world_size() - 1`; 0 in an ordinary run."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes train together; 1 in an ordinary run."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process writes the files and prints: process 0, or the only one."""
    return rank() == 0


def from_main_process(function, *args):
    """`function(*args)` run by the main process alone, its result (or the exception it raised)
    handed to every process: one decision, or one file read on the machine that wrote it, for all.
    Every process must call it (it waits for the others); in an ordinary run it is the call itself."""
    if not is_distributed():
        return function(*args)
    box = [None]
    if is_main_process():
        try:
            box[0] = (function(*args), None)
        except Exception as err:        # handed on, so that no process waits for a result forever
            box[0] = (None, err)
    torch.distributed.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


# =============================================================================================
# Files
# =============================================================================================

def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, and a file another thread (a
# TensorBoard writer, say) created during that moment would get no umask at all.
UMASK = _read_umask()


@contextlib.contextmanager
def atomic_open(path: pathlib.Path):
    """A temporary file beside `path`, open for binary writing; when the block ends, the file is
    flushed to disk and renamed over `path`. A crash or kill at any moment, or an exception in
    the block, leaves either the old file or the new one, never a part of either."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~UMASK)   # mkstemp makes files private; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_open`."""
    with atomic_open(path) as f:
        f.write(data)


def _backup_existing(path: pathlib.Path) -> pathlib.Path | None:
    """Rename an existing file to `<stem>.<its modification time><suffix>` so that a new run
    never overwrites an earlier run's result. Returns the backup's path, if any."""
    path = pathlib.Path(path)
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


# =============================================================================================
# Downloads
# =============================================================================================

USER_AGENT = "cifar10-course/2.0"


def fetch_url(url: str, file, *, timeout: float, max_bytes: int, progress: bool = False) -> str:
    """Stream `url` into the binary file object `file`, at most `max_bytes` bytes, giving up
    once `timeout` seconds have passed (checked as data arrives: a server that stops sending
    is given `timeout` seconds for its next piece); returns the response's Content-Type.

    Raises `ValueError` starting with the URL and giving the reason: not a valid URL, could not
    connect, an HTTP error, a time-out (also for a server that trickles or stalls), a connection
    cut or a body that cannot be decoded, a declared or actual size over the limit, or an empty
    response.
    """
    deadline = time.monotonic() + timeout
    timed_out = ValueError(f"{url}: the download timed out after {timeout:g} s")
    size = 0
    try:
        with requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": USER_AGENT}) as response:
            if response.status_code >= 400:
                raise ValueError(f"{url}: HTTP error {response.status_code} {response.reason}")
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise ValueError(f"{url}: the response is {int(length):,} bytes, over the "
                                 f"{max_bytes:,}-byte limit")
            with tqdm(total=int(length) if length.isdigit() else None, unit="B", unit_scale=True,
                      desc=f"downloading {url.rsplit('/', 1)[-1]}", disable=not progress) as bar:
                # read1 returns whatever has arrived, so a trickling server cannot stall the deadline
                while chunk := response.raw.read1(64 * 1024, decode_content=True):
                    size += len(chunk)
                    if size > max_bytes:
                        raise ValueError(f"{url}: the download passed the {max_bytes:,}-byte limit")
                    if time.monotonic() > deadline:
                        raise timed_out
                    file.write(chunk)
                    bar.update(len(chunk))
            content_type = response.headers.get("Content-Type", "")
    except (requests.exceptions.Timeout, TimeoutError, urllib3.exceptions.TimeoutError):
        raise timed_out from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema, requests.exceptions.URLRequired) as err:
        raise ValueError(f"{url}: not a valid URL ({err})") from None
    except requests.exceptions.ConnectionError as err:
        if "timed out" in str(err).lower():
            raise timed_out from None
        raise ValueError(f"{url}: could not connect ({err})") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
        # the body is read through urllib3 (`response.raw`), whose errors requests does not wrap
        raise ValueError(f"{url}: the download failed ({err!r})") from None
    if size == 0:
        raise ValueError(f"{url}: the response was empty")
    return content_type


# =============================================================================================
# Images
# =============================================================================================

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024  # refuse bigger image files and downloads
MAX_IMAGE_PIXELS = 50_000_000          # refuse bigger images (decompression bombs)
DOWNLOAD_TIMEOUT = 10.0                # seconds for a whole image download
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit and float greyscale are rescaled, transparent
    pixels are composited onto white, and EXIF orientation is applied."""
    # Pillow opens a PGM/PPM file with more than 8 bits as mode "I", scaled to 16 bits
    sixteen_bits = image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PPM")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if sixteen_bits:
            top = 65535.0                                     # the depth is known: dark stays dark
        else:                                                 # "I" and "F" do not say their range
            top = 1.0 if image.mode == "F" and array.max(initial=0) <= 1 else \
                255.0 if array.max(initial=0) <= 255 else 65535.0
        array = np.clip(array / top * 255, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "La":                                      # Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _read_url(url: str, timeout: float, max_bytes: int) -> bytes:
    buffer = io.BytesIO()
    content_type = fetch_url(url, buffer, timeout=timeout, max_bytes=max_bytes)
    data = buffer.getvalue()
    if content_type and not content_type.startswith("image/"):
        # the bytes decide: a mislabelled image is still an image, a web page is not
        try:
            with Image.open(io.BytesIO(data)):
                pass
        except Image.DecompressionBombError:
            pass                                # an image, too big: load_image refuses it, saying so
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{url}: the response is {content_type.split(';')[0]}, not an image") from None
    return data


def _read_source(source, timeout: float, max_bytes: int) -> tuple[str, bytes]:
    """(a name for messages, the bytes) of a path, http(s) URL, bytes or binary file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"the {len(source):,} bytes given", bytes(source)
    if isinstance(source, str) and source.strip().lower().startswith(("http://", "https://")):
        url = source.strip()                                   # a pasted URL often brings a space
        return url, _read_url(url, timeout, max_bytes)
    if isinstance(source, str) and not source.strip():
        raise ValueError("an empty string is neither a path nor a URL")
    if isinstance(source, (str, os.PathLike)):
        if "://" in str(source):
            raise ValueError(f"{source}: only http:// and https:// URLs are supported")
        path = pathlib.Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"{path}: no such file")
        if not path.is_file():
            raise ValueError(f"{path}: not a file")
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{path}: {path.stat().st_size:,} bytes, over the {max_bytes:,}-byte limit")
        return str(path), path.read_bytes()
    if hasattr(source, "read"):
        name = getattr(source, "name", "the file object")
        data = source.read(max_bytes + 1)
        if not isinstance(data, bytes):
            raise ValueError(f"{name}: opened in text mode; open images with 'rb'")
        if len(data) > max_bytes:
            raise ValueError(f"{name}: over the {max_bytes:,}-byte limit")
        return name, data
    raise ValueError(f"cannot read an image from {type(source).__name__}: pass a path, "
                     f"an http(s) URL, bytes, a binary file or a PIL image")


def load_image(source, *, timeout: float = DOWNLOAD_TIMEOUT, max_bytes: int = MAX_DOWNLOAD_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read an image from a path, an http(s) URL, bytes, a binary file object or a PIL image,
    as 8-bit RGB. The course's one image decoder: training data and new photos both pass here.

    Raises `ValueError` naming the source and the reason for anything that is not a readable
    image: a missing file, a non-image, a truncated image, an HTTP error, a time-out, a
    download over `max_bytes`, or more than `max_pixels` pixels (a decompression bomb).
    """
    if isinstance(source, Image.Image):
        name, image = "the PIL image", source
    else:
        name, data = _read_source(source, timeout, max_bytes)
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


def image_to_tensor(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """An RGB PIL image as a uint8 tensor (3, H, W), first resized to `size` x `size` (bilinear,
    antialiased when shrinking) unless it already has that size. Training data and new photos
    both pass here, so a network sees the same pixels in training and at prediction time."""
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def scan_image_folder(root) -> tuple[list[str], list[str]]:
    """(classes, files): the class folders under `root` and the image files in them as relative
    POSIX paths "class/name", both sorted, whatever order the file system lists them in."""
    root = pathlib.Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = sorted(f"{c}/{f.name}" for c in classes for f in (root / c).iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
    return classes, files


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
    """All indices, or `subset` of them drawn at random with a fixed seed (the same draw on every
    call, so a quick-mode run sees the same images each time)."""
    if subset <= 0 or subset >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:subset].sort().values


def stratified_split(members_by_class: dict, fractions, seed: int) -> list[list]:
    """Split each class's members into [rest, part 1, part 2, ...]: part k takes `fractions[k]`
    of the class (at least one member), the first list keeps the rest (at least one).

    Each class is shuffled by its own generator, seeded with a string (which Python hashes with
    SHA-512, not with the per-process `hash`), so the split is the same on every machine.
    """
    if not (all(0 < f < 1 for f in fractions) and sum(fractions) < 1):
        raise ValueError(f"split fractions must each lie between 0 and 1 and leave a share for the "
                         f"rest, got {list(fractions)}")
    parts = [[] for _ in range(len(fractions) + 1)]
    for name, members in members_by_class.items():
        members = list(members)
        if len(members) < len(fractions) + 1:
            raise ValueError(f"class {name!r} has {len(members)} item(s): "
                             f"a {len(fractions) + 1}-way split needs at least {len(fractions) + 1}")
        random.Random(f"{seed}/{name}").shuffle(members)
        start = 0
        for k, fraction in enumerate(fractions, start=1):
            room = len(members) - start - (len(fractions) - k) - 1   # leave one for each later part
            count = min(max(1, round(len(members) * fraction)), room)
            parts[k] += members[start:start + count]
            start += count
        parts[0] += members[start:]
    return [sorted(part) for part in parts]


def _cifar10_missing_message(data_dir: pathlib.Path, reason: str) -> str:
    return (f"CIFAR-10 was not found in DATA_DIR={data_dir} and could not be downloaded ({reason}).\n"
            f"Put it there in either layout:\n"
            f"  1. torchvision's: {data_dir}/cifar-10-batches-py/ (from "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpacked)\n"
            f"  2. an image folder: {data_dir}/cifar10/train/<class>/*.png and {data_dir}/cifar10/test/<class>/*.png\n"
            f"or run once with internet access to download it, or set DATA_DIR to a folder that has it.")


def _decode_files(paths: list[pathlib.Path]) -> torch.Tensor:
    """Decode image files with `load_image` into one uint8 tensor (N, 3, H, W); all must have
    one size. (Threads do not help: for 32x32 JPEGs the per-file work is Python's, not Pillow's.)"""
    images = [image_to_tensor(load_image(path)) for path in paths]
    sizes = sorted({tuple(image.shape[1:]) for image in images})
    if len(sizes) > 1:
        raise ValueError(f"{paths[0].parent.parent}: images must all have one size, found {sizes[:3]}")
    return torch.stack(images)


def _cifar10_folder(folder: pathlib.Path):
    """(classes, train files, train labels, test files, test labels) of the image-folder layout."""
    splits = []
    for split in ("train", "test"):
        classes, files = scan_image_folder(folder / split)
        if not files:
            raise DataNotFoundError(f"no images found under {folder / split}/<class>/")
        lookup = {name: label for label, name in enumerate(classes)}
        splits.append((classes, [folder / split / f for f in files],
                       torch.tensor([lookup[f.split("/", 1)[0]] for f in files])))
    (classes, train_files, train_labels), (test_classes, test_files, test_labels) = splits
    if classes != test_classes:
        raise ValueError(f"{folder}: train classes {classes} differ from test classes {test_classes}")
    return classes, train_files, train_labels, test_files, test_labels


def _torchvision_cifar10(data_dir: pathlib.Path, download: bool):
    """(classes, train images, train labels, test images, test labels) of torchvision's layout."""
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
            except (OSError, RuntimeError) as err:           # URLError is an OSError
                raise DataNotFoundError(_cifar10_missing_message(data_dir, f"offline? {err}")) from None
        splits.append((torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(),
                       torch.tensor(dataset.targets)))
    return dataset.classes, *splits[0], *splits[1]


def load_cifar10(data_dir, subset: int = 0, augment=None, val_fraction: float = 0.1,
                 seed: int = 0, download: bool = True):
    """CIFAR-10 as three `UInt8ImageDataset`s: (train, val, test).

    The validation split is `val_fraction` of each class of the 50,000 training images
    (5,000 images by default), drawn with `seed` the same way on every machine (see
    `stratified_split`); the official 10,000 test images stay the test split. `augment`
    applies to the training split only: val and test are never augmented. `subset` > 0 keeps
    at most that many images per split (a fixed random draw, made after the split).

    Looks for `data_dir/cifar10/{train,test}/<class>/*` first, then torchvision's
    `data_dir/cifar-10-batches-py`; downloads the latter when both are missing and `download`
    is true. Raises `DataNotFoundError` naming DATA_DIR, both layouts and how to get the data.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction is a share of the training images between 0 and 1 "
                         f"(0.1 holds out 10 %), got {val_fraction}")
    data_dir = pathlib.Path(data_dir).expanduser().resolve()
    folder = data_dir / "cifar10"
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        classes, train_source, train_labels, test_source, test_labels = _cifar10_folder(folder)
    else:
        classes, train_source, train_labels, test_source, test_labels = _torchvision_cifar10(data_dir, download)

    by_class = {name: (train_labels == label).nonzero().flatten().tolist() for label, name in enumerate(classes)}
    train_indices, val_indices = stratified_split(by_class, [val_fraction], seed)
    chosen = [[indices[i] for i in _subset_indices(len(indices), subset)]
              for indices in (train_indices, val_indices, list(range(len(test_labels))))]
    datasets = []
    for indices, source, labels, split_augment in zip(
            chosen, (train_source, train_source, test_source), (train_labels, train_labels, test_labels),
            (augment, None, None)):
        images = _decode_files([source[i] for i in indices]) if isinstance(source, list) else source[indices]
        datasets.append(UInt8ImageDataset(images, labels[indices], classes, augment=split_augment))
    return tuple(datasets)


class BatchTransform(nn.Module):
    """Finish a uint8 batch on the training device: float in [0, 1], normalise, resize.

    The course's one normalisation: every loader yields uint8 images and this module turns
    them into what the network takes, in training and at prediction time alike. Doing it once
    per batch on the GPU (instead of per image in PIL on the CPU) is what keeps a fast GPU fed
    from a 2-core host.
    """

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD, size: int | None = None):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:   # (B, 3, h, w) uint8
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchTransform takes uint8 images, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchTransform takes a batch of shape (B, 3, H, W), got {tuple(images.shape)}")
        # Normalise before upscaling: bilinear weights sum to 1, so the result is the same,
        # but the arithmetic runs on 32x32 pixels instead of 227x227 (50 times fewer).
        x = images.float().div_(255).sub_(self.mean).div_(self.std)
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=False)
        return x                                                # (B, 3, size, size) float


class DeviceLoader:
    """Wrap a DataLoader so that it yields batches ready for the model on `device`.

    Copies are non-blocking from pinned memory on CUDA; `transform` (a `BatchTransform`) runs
    on the device. It keeps `dataset`, `batch_size`, `generator` (the shuffling's random state,
    which a resumed run restores), `sampler` and `len()` of the wrapped loader.
    """

    def __init__(self, loader: DataLoader, device, transform: nn.Module | None = None):
        self.loader, self.device = loader, torch.device(device)
        self.transform = transform.to(self.device) if transform is not None else None
        self.dataset, self.batch_size, self.generator = loader.dataset, loader.batch_size, loader.generator
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Tell a `DistributedSampler` which epoch begins: it shuffles with the seed plus the
        epoch, so each epoch gets a new order, the same in every process. (`train` calls this
        before every epoch; other samplers need nothing.)"""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _ready(self, images, labels):
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking)
        labels = labels.to(self.device, non_blocking=non_blocking)
        if self.transform is not None:
            images = self.transform(images)
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


class EvaluationShard(torch.utils.data.Sampler):
    """This process's share of an evaluation split of `size` images in a distributed run of
    `world_size` processes: images rank, rank + world_size, rank + 2 world_size, ...

    PyTorch's `DistributedSampler` repeats a few images so that every process gets as many, which
    training needs (each process takes the same number of steps) but which would count those
    images twice in an accuracy. Here no image repeats, so over all processes each image counts
    exactly once, and `gather` puts the shares' results back in the split's order.
    """

    def __init__(self, size: int, rank: int, world_size: int):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's `local` (one row per image of its share, in its order) put together as
        the whole split's (size, ...) tensor, in the split's order, on every process. All
        processes must call it: each waits for the others' rows."""
        if self.world_size == 1:
            return local
        longest = len(range(0, self.size, self.world_size))         # process 0's share is the longest
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[:len(local)] = local
        shares = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(shares, padded)
        # row i of process r is image r + i * world_size: interleave the shares, drop the padding
        return torch.stack(shares, dim=1).flatten(0, 1)[:self.size]


def default_num_workers() -> int:
    """DataLoader workers for datasets that decode files: one per core, leaving one for training."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def make_loader(dataset: Dataset, batch_size: int, device, *, shuffle: bool,
                transform: nn.Module | None = None, num_workers: int = 0,
                drop_last: bool = False, seed: int = 0, shard: bool | None = None) -> DeviceLoader:
    """A `DeviceLoader` over `dataset`: shuffled with a generator seeded with `seed` when
    `shuffle`, pinned memory on CUDA, persistent workers when `num_workers` > 0.

    In-memory uint8 datasets need no workers (`num_workers=0`): indexing them costs
    microseconds. Datasets that decode files per sample want `default_num_workers()`.

    shard: load only this process's share of `dataset`; by default, in a distributed run
        (`is_distributed()`). A shuffled (training) loader then draws its share with PyTorch's
        `DistributedSampler`: every epoch a new order from `seed` and the epoch number, the
        same in every process, cut into equal shares (a few images repeated to even them out),
        so that every process takes the same number of steps. An unshuffled (evaluation)
        loader gets an `EvaluationShard`, which repeats nothing, and `predict_loader` gathers
        the shares' results. `batch_size` is per process: the global batch is
        `batch_size * world_size()`.
    """
    device = torch.device(device)
    if shard is None:
        shard = is_distributed()
    sampler = None
    if shard:
        sampler = (torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(),
                                                       shuffle=True, seed=seed)
                   if shuffle else EvaluationShard(len(dataset), rank(), world_size()))
    shuffled_here = shuffle and sampler is None               # else the sampler shuffles
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffled_here, sampler=sampler,
                        drop_last=drop_last, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed) if shuffled_here else None)
    return DeviceLoader(loader, device, transform)


# =============================================================================================
# Image folders (flower_photos)
# =============================================================================================

FLOWER_PHOTOS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
MAX_ARCHIVE_BYTES = 2 * 1024 ** 3      # refuse bigger data set archives
ARCHIVE_TIMEOUT = 3600.0               # seconds for a whole data set download


class DataChangedError(ValueError):
    """The files of an image folder differ from those its split manifest was made from."""


def _flower_photos_missing_message(data_dir: pathlib.Path, reason: str) -> str:
    return (f"flower_photos was not found in DATA_DIR={data_dir} and could not be downloaded ({reason}).\n"
            f"Expected layout: {data_dir}/flower_photos/<class>/*.jpg, one folder per class "
            f"(daisy, dandelion, roses, sunflowers, tulips).\n"
            f"Download {FLOWER_PHOTOS_URL} and unpack it into {data_dir}, "
            f"or run once with internet access, or set DATA_DIR to a folder that has it.")


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
            with open(archive, "wb") as f:
                fetch_url(FLOWER_PHOTOS_URL, f, timeout=ARCHIVE_TIMEOUT, max_bytes=MAX_ARCHIVE_BYTES, progress=True)
        except ValueError as err:
            raise DataNotFoundError(_flower_photos_missing_message(data_dir, f"offline? {err}")) from None
        safe_extract_tar(archive, tmp / "unpacked")
        unpacked = tmp / "unpacked" / "flower_photos"
        if not unpacked.is_dir():
            raise ValueError(f"{FLOWER_PHOTOS_URL}: the archive holds no flower_photos/ folder")
        os.replace(unpacked, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def file_record(path: pathlib.Path) -> dict:
    """Size, modification time and SHA-256 of a file: what a split manifest remembers of it."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _read_manifest(path: pathlib.Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        if not {"fractions", "seed", "classes", "train", "val", "test", "files"} <= manifest.keys():
            raise ValueError("keys are missing; an older version of the course may have made it")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a train/val/test split manifest ({err}); "
                         f"delete it to split afresh") from None
    return manifest


def _verify_files(root: pathlib.Path, files: list[str], manifest: dict, manifest_path: pathlib.Path) -> bool:
    """Check the files under `root` against the manifest: names first, then size and modification
    time, and a SHA-256 only for a file whose size or time changed. Returns whether any file's
    recorded size and time were refreshed (its content matched); raises `DataChangedError`
    listing the files added, removed or changed since the manifest was made."""
    recorded = manifest["files"]
    added = sorted(set(files) - recorded.keys())
    removed = sorted(recorded.keys() - set(files))
    changed, refreshed = [], False
    for name in sorted(set(files) & recorded.keys()):
        stat = (root / name).stat()
        if (stat.st_size, stat.st_mtime_ns) == (recorded[name]["size"], recorded[name]["mtime_ns"]):
            continue
        record = file_record(root / name)
        if record["sha256"] != recorded[name]["sha256"]:
            changed.append(name)
        else:
            recorded[name], refreshed = record, True           # copied or touched, same content
    if added or removed or changed:
        lines = [f"  {kind} ({len(names)}): " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
                 for kind, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
        raise DataChangedError(
            f"{root} is not what its split manifest {manifest_path} was made from:\n" + "\n".join(lines) +
            f"\nRestore the original files, or delete {manifest_path} to split the current files afresh "
            f"(a model trained on the old split may then have seen some of the new val and test images).")
    return refreshed


def split_image_folder(root, manifest_path, val_fraction: float = 0.1, test_fraction: float = 0.1,
                       seed: int = 0):
    """Split an image folder `root/<class>/*` into train, val and test, stratified by class:
    each class gives `val_fraction` and `test_fraction` of its images (at least one each) to
    val and test, the rest to train, the same way on every machine (see `stratified_split`).

    The split is a list of files, written once to the JSON `manifest_path` with the size,
    modification time and SHA-256 of every file; nothing under `root` is moved, changed or
    written. Later calls reuse the manifest after checking that the files are the same: by size
    and time, which is cheap, and by content only for a file whose size or time changed (so a
    copied folder still matches; its new times are then recorded). Returns
    (train_files, val_files, test_files, classes), the files as paths under `root`.
    Raises `DataChangedError` naming the files added, removed or changed since the manifest was
    made, and `ValueError` when the manifest was made with other fractions or another seed.
    """
    fractions = {"val": val_fraction, "test": test_fraction}
    if not (all(0 < f < 1 for f in fractions.values()) and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be between 0 and 1 and leave room "
                         f"for training, got {val_fraction} and {test_fraction}")
    root = pathlib.Path(root).expanduser().resolve()
    manifest_path = pathlib.Path(manifest_path)
    classes, files = scan_image_folder(root)
    if not files:
        raise DataNotFoundError(f"no images found under {root}/<class>/")
    if manifest_path.exists():
        manifest = _read_manifest(manifest_path)
        if (manifest["fractions"], manifest["seed"]) != (fractions, seed):
            raise ValueError(f"{manifest_path} holds a split with {manifest['fractions']}, seed={manifest['seed']}, "
                             f"not {fractions}, seed={seed}: pass those, or another manifest path")
        if _verify_files(root, files, manifest, manifest_path):
            atomic_write(manifest_path, json.dumps(manifest, indent=1).encode())
    else:
        by_class = {name: [f for f in files if f.split("/", 1)[0] == name] for name in classes}
        train, val, test = stratified_split(by_class, [val_fraction, test_fraction], seed)
        manifest = {"root": str(root), "fractions": fractions, "seed": seed, "classes": classes,
                    "train": train, "val": val, "test": test,
                    "files": {f: file_record(root / f) for f in files}}
        atomic_write(manifest_path, json.dumps(manifest, indent=1).encode())
    return ([root / f for f in manifest["train"]], [root / f for f in manifest["val"]],
            [root / f for f in manifest["test"]], list(manifest["classes"]))


def write_class_index(path, classes) -> pathlib.Path:
    """Write the class names as JSON {"0": "daisy", "1": "dandelion", ...} (index to name, the
    file the AlexNet-Flowers article writes). An identical file already there is left untouched."""
    path = pathlib.Path(path)
    data = json.dumps({str(i): name for i, name in enumerate(classes)}, indent=4).encode()
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write(path, data)
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
    if not keys or set(index) != set(keys) or not all(isinstance(v, str) for v in index.values()):
        raise ValueError(f'{path}: expected a class index {{"0": name, "1": name, ...}} numbered from 0, '
                         f'with at least one class')
    return [index[k] for k in keys]


class ImageFileDataset(Dataset):
    """Image files whose class is the name of their folder (`.../<class>/<file>`), decoded with
    `load_image` only when an item is read, so that the decoding runs in the DataLoader's
    worker processes. `augment` (e.g. torchvision's RandomResizedCrop and RandomHorizontalFlip)
    takes and returns a PIL image; then `image_to_tensor` makes it a uint8 (3, image_size,
    image_size) tensor, for `BatchTransform` to finish on the device, exactly as at prediction
    time. `subset` > 0 keeps at most that many files (a fixed random draw).
    """

    def __init__(self, files, classes, image_size: int, augment=None, subset: int = 0):
        files = [pathlib.Path(f) for f in files]
        self.files = [files[i] for i in _subset_indices(len(files), subset).tolist()]
        self.classes = list(classes)
        lookup = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({f.parent.name for f in self.files} - lookup.keys())
        if unknown:
            raise ValueError(f"files in folders that are not classes: {unknown} (classes: {self.classes})")
        self.labels = torch.tensor([lookup[f.parent.name] for f in self.files], dtype=torch.long)
        self.image_size, self.augment = image_size, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = load_image(self.files[index])
        if self.augment is not None:
            image = self.augment(image)
        return image_to_tensor(image, self.image_size), self.labels[index]


# =============================================================================================
# Persistence
# =============================================================================================

@dataclass(frozen=True)
class RunFiles:
    """Where a training run keeps its files: `model_dir/<name>_best.pth` (the checkpoint the
    validation chose), `<name>_last.pth` (everything needed to resume) and `<name>_history.json`."""
    model_dir: pathlib.Path
    name: str

    @property
    def best(self) -> pathlib.Path:
        return pathlib.Path(self.model_dir) / f"{self.name}_best.pth"

    @property
    def last(self) -> pathlib.Path:
        return pathlib.Path(self.model_dir) / f"{self.name}_last.pth"

    @property
    def history(self) -> pathlib.Path:
        return pathlib.Path(self.model_dir) / f"{self.name}_history.json"


def _plain(value):
    """Metadata as plain Python types, which `torch.load(weights_only=True)` accepts."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (str, pathlib.Path)):
        return str(value)                                 # also str subclasses like TorchVersion
    return value


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)            # torch.compile wrapper
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    return model.module if wrapped else model


def _checkpoint(model: nn.Module, meta: dict, training: dict | None = None) -> dict:
    model = _unwrap(model)
    checkpoint = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": _plain({"arch": type(model).__name__, **meta,
                        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "torch": str(torch.__version__)}),
    }
    if training is not None:
        checkpoint["training"] = training
    return checkpoint


def _checkpoint_bytes(model: nn.Module, meta: dict, training: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    torch.save(_checkpoint(model, meta, training), buffer)
    return buffer.getvalue()


def _write_checkpoint(path: pathlib.Path, model: nn.Module, meta: dict, training: dict | None = None) -> None:
    """Save a checkpoint straight into its file, atomically. `train` calls this after every epoch:
    with the optimizer's state a checkpoint holds several copies of the weights (700 MB for
    ZFNet with AdamW), and serialising it in memory first would copy all of it twice more."""
    with atomic_open(path) as f:
        torch.save(_checkpoint(model, meta, training), f)


def save_checkpoint(path, model: nn.Module, *, backup: bool = True, **meta) -> pathlib.Path:
    """Save the model's state_dict with plain metadata: what prediction needs (`classes`,
    `image_size`: the size images are stored at before the batch transform, `input_size`: what
    the network takes, `mean`, `std`), the architecture's name (`arch`, default the class name)
    and anything else worth keeping (epochs, accuracies).

    The write is atomic; with `backup`, a file already at `path` is renamed aside, not lost.
    """
    path = pathlib.Path(path)
    # serialised before the old file moves aside, so that metadata torch cannot save leaves it in place
    data = _checkpoint_bytes(model, meta)
    if backup:
        _backup_existing(path)
    atomic_write(path, data)
    return path


def strip_module_prefix(state_dict: dict) -> dict:
    """Remove the `module.` that `nn.DataParallel` (and DDP) put before every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict at `path` ({"state_dict", "meta"} and, for a last checkpoint,
    "training"), loaded with `weights_only=True`; a bare state_dict gets empty metadata.
    Raises `ValueError` naming the file and saying in words what is wrong with it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path}: the file is empty, not a checkpoint (was a save interrupted?)")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":       # zip archive (torch.save) or legacy pickle
        raise ValueError(f"{path}: not a PyTorch checkpoint (it starts with {head!r})")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise ValueError(f"{path}: a corrupt checkpoint ({str(err).splitlines()[0]})") from None
        raise ValueError(f"{path}: holds pickled Python objects (a whole model?), which weights_only "
                         f"loading refuses because loading them can run code; save the state_dict "
                         f"instead") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path}: a truncated or corrupt checkpoint ({str(err).splitlines()[0]})") from None
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint["state_dict"] = strip_module_prefix(checkpoint["state_dict"])
        checkpoint.setdefault("meta", {})
        return checkpoint
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return {"state_dict": strip_module_prefix(checkpoint), "meta": {}}      # a bare state_dict
    raise ValueError(f"{path}: holds {type(checkpoint).__name__}, not a state_dict")


def _load_weights(model: nn.Module, state_dict: dict, path) -> None:
    """Load `state_dict` into `model`, or raise `ValueError` naming the file and the layers
    that are missing, unexpected or of another shape."""
    expected = _unwrap(model).state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
              for k in expected.keys() & state_dict.keys() if state_dict[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        lines = [f"  {kind} ({len(items)}): " + "; ".join(sorted(items)[:6]) + (" ..." if len(items) > 6 else "")
                 for kind, items in (("missing from the file", missing), ("not in the model", unexpected),
                                     ("other shapes", shapes)) if items]
        raise ValueError(f"{path}: the weights do not fit this {type(_unwrap(model)).__name__} "
                         f"(another architecture or settings?):\n" + "\n".join(lines))
    _unwrap(model).load_state_dict(state_dict)


def load_checkpoint(path, model: nn.Module) -> dict:
    """Load the weights of a checkpoint saved by `save_checkpoint` (or `train`) into `model`
    and return its metadata (classes, image size, normalisation, ...) as a dict.

    Loads with `weights_only=True`, so no pickled code runs; a `module.` prefix from
    `nn.DataParallel` is removed. Raises `ValueError` naming the file and saying why it cannot
    be loaded: empty, not a PyTorch checkpoint, truncated, pickled objects, or weights that
    do not fit the model (which layers and shapes differ).
    """
    checkpoint = _read_checkpoint(path, map_location=next(model.parameters()).device)
    _load_weights(model, checkpoint["state_dict"], path)
    return dict(checkpoint["meta"])


def assert_same_weights(model: nn.Module, other: nn.Module) -> None:
    """Raise `AssertionError` naming the first tensor (weight or buffer) in which two models
    differ, bit for bit; the proof that a checkpoint round-tripped."""
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys(), f"different tensors: {sorted(mine.keys() ^ theirs.keys())}"
    for name, tensor in mine.items():
        assert torch.equal(tensor.cpu(), theirs[name].cpu()), f"{name} differs"


# =============================================================================================
# Evaluation
# =============================================================================================

@torch.no_grad()
def predict_loader(model: nn.Module, loader, amp: bool = False,
                   amp_dtype: torch.dtype = torch.bfloat16):
    """Logits and labels for the whole loader, concatenated: (N, classes) float, (N,) long.

    A loader of this process's share of a split (`EvaluationShard`, see `make_loader`) yields
    the whole split's, gathered from every process in the split's order, on every process:
    an accuracy computed from them counts each image exactly once."""
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp):
            logits.append(model(images).float())
        labels.append(targets)
    if not logits:
        raise ValueError("the loader yielded no batches")
    logits, labels = torch.cat(logits), torch.cat(labels)
    shard = getattr(loader, "sampler", None)
    if isinstance(shard, EvaluationShard):
        logits, labels = shard.gather(logits), shard.gather(labels)
    return logits, labels


class TTA(nn.Module):
    """Test-time augmentation. In evaluation mode, the mean logits of `net` over views of each
    image: level 0 the image alone, level 1 also its mirror, level 2 also both shifted by one
    pixel up-left and down-right (reflected borders; six passes, the unshifted pair counting
    half). In training mode it is `net` itself. Any network trained with flips (and shifts)."""

    def __init__(self, net: nn.Module, level: int = 1):
        super().__init__()
        if level not in (0, 1, 2):
            raise ValueError(f"TTA level must be 0, 1 or 2, got {level!r}")
        self.net, self.level = net, level

    def mirrored(self, x):                                     # x: (B, 3, H, W)
        return (self.net(x) + self.net(x.flip(3))) / 2 if self.level >= 1 else self.net(x)

    def forward(self, x):                                      # x: (B, 3, H, W)
        if self.training:
            return self.net(x)
        if self.level < 2:
            return self.mirrored(x)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")       # (B, 3, H + 2, W + 2)
        up_left, down_right = padded[..., :-2, :-2], padded[..., 2:, 2:]
        return self.mirrored(x) / 2 + self.mirrored(up_left) / 4 + self.mirrored(down_right) / 4


def evaluate(model: nn.Module, loader, criterion, amp: bool = False,
             amp_dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader."""
    logits, labels = predict_loader(model, loader, amp, amp_dtype)
    return criterion(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true class, column = predicted class.
    Both inputs are 1-D class indices of the same length (take `logits.argmax(1)` first)."""
    predictions, labels = torch.as_tensor(predictions).long().cpu(), torch.as_tensor(labels).long().cpu()
    if predictions.dim() != 1 or labels.dim() != 1 or len(predictions) != len(labels):
        raise ValueError(f"confusion_matrix takes two 1-D tensors of class indices of the same length, "
                         f"got predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)}")
    for name, values in (("predictions", predictions), ("labels", labels)):
        if len(values) and not (0 <= int(values.min()) and int(values.max()) < num_classes):
            raise ValueError(f"confusion_matrix: {name} must lie in 0..{num_classes - 1}, "
                             f"got values from {int(values.min())} to {int(values.max())}")
    index = labels * num_classes + predictions
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """Accuracy of each true class from a confusion matrix (nan for a class with no images)."""
    return matrix.diag().float() / matrix.sum(1).float()


def print_per_class_accuracy(matrix: torch.Tensor, classes) -> None:
    width = max(len(c) for c in classes)
    for name, acc, count in zip(classes, per_class_accuracy(matrix).tolist(), matrix.sum(1).tolist()):
        print(f"{name:>{width}}: {acc:7.2%}  of {count} images")


# =============================================================================================
# Training
# =============================================================================================

PER_BATCH_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)
# channels_last by device type. On this course's 2-core CPU (torch 2.14) a training step ran
# faster with it for four of the five networks timed (AlexNet-227: 0.93, within the noise of
# its rounds): see the lab book, results/README.md, "Performance".
CHANNELS_LAST_DEFAULT = {"cuda": True, "cpu": True}


@dataclass
class History:
    """What `train` measured, one entry per completed epoch, and the final test accuracy
    once the notebook has measured it (the only figure that comes from the test set)."""
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)   # fraction in [0, 1]
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)     # fraction in [0, 1]
    lr: list[float] = field(default_factory=list)          # learning rate at the start of the epoch
    seconds: list[float] = field(default_factory=list)     # wall time of the epoch, validation included
    info: dict = field(default_factory=dict)               # model, device, date, settings
    test_acc: float | None = None                          # of the best_epoch's checkpoint, measured once

    def __len__(self) -> int:
        return len(self.epoch)

    @property
    def best_epoch(self) -> int | None:
        """The epoch whose checkpoint the validation chose (highest val_acc, earliest on ties)."""
        return self.epoch[self.val_acc.index(max(self.val_acc))] if self.val_acc else None

    @property
    def best_val_acc(self) -> float:
        return max(self.val_acc, default=float("nan"))

    def to_json(self, path) -> None:
        """Write the history as JSON, atomically."""
        atomic_write(pathlib.Path(path), json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def from_json(cls, path) -> "History":
        return cls(**json.loads(pathlib.Path(path).read_text()))


def _current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _dataset_size(loader) -> int | None:
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else None


def _recipe(model, optimizer, scheduler, num_epochs, train_loader, val_loader) -> dict:
    """What a resumed run must share with the run it continues (the number of processes too:
    it multiplies the batch)."""
    settings = {k: v for k, v in optimizer.defaults.items()
                if isinstance(v, (bool, int, float, str, tuple, type(None)))}
    return _plain({"model": type(_unwrap(model)).__name__, "optimizer": type(optimizer).__name__,
                   "optimizer_settings": settings,
                   "scheduler": type(scheduler).__name__ if scheduler else None,
                   "num_epochs": num_epochs, "batch_size": getattr(train_loader, "batch_size", None),
                   "train_images": _dataset_size(train_loader), "val_images": _dataset_size(val_loader),
                   "processes": world_size()})


def _rng_state(train_loader) -> dict:
    """Every random-number state a training epoch draws from, as plain values and tensors."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    generator = getattr(train_loader, "generator", None)
    return {"python": _plain(random.getstate()), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": generator.get_state() if generator is not None else None}


def _set_rng_state(state: dict, train_loader) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(train_loader, "generator", None)
    if state["loader"] is not None and generator is not None:
        generator.set_state(state["loader"])


def _resume(files: RunFiles, recipe: dict, model, optimizer, scheduler, scaler, train_loader) -> History:
    """Restore everything from `files.last`; raise `ValueError` when it belongs to another
    model or recipe. In a distributed run the main process reads the file (the others' machines
    may not have it) and hands it to every process, each of which takes back its own random states."""
    checkpoint = from_main_process(_read_checkpoint, files.last)
    training = checkpoint.get("training")
    if training is None:
        raise ValueError(f"{files.last}: holds weights only, not the state of a run to resume")
    saved = {"processes": 1, **training["recipe"]}         # runs saved before torchrun came had one
    differences = [f"{key}: {saved.get(key)!r} in the file, {value!r} now"
                   for key, value in recipe.items() if saved.get(key) != value]
    if differences:
        raise ValueError(f"{files.last}: cannot resume, this run's recipe differs from the interrupted one:\n  "
                         + "\n  ".join(differences) +
                         "\nUse the settings of the interrupted run, or start afresh with resume=False "
                         "(the earlier files are kept aside).")
    _load_weights(model, checkpoint["state_dict"], files.last)
    optimizer.load_state_dict(training["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(training["scheduler"])
    if scaler.is_enabled() and training["scaler"]:           # a run saved without AMP has no scale yet
        scaler.load_state_dict(training["scaler"])
    _set_rng_state(training.get("rng_by_rank", [training["rng"]])[rank()], train_loader)
    return History(**training["history"])


def _check_finite(losses: list[torch.Tensor], epoch: int, last_batch: int) -> None:
    if not losses:
        return
    finite = torch.isfinite(torch.stack(losses).float())
    if not bool(finite.all()):
        first_bad = int((~finite).nonzero()[0])
        batch = last_batch - len(losses) + 1 + first_bad
        raise FloatingPointError(
            f"the training loss became {losses[first_bad].item()} at epoch {epoch}, batch {batch}: "
            f"training stopped (the checkpoints so far are kept). "
            f"Try a lower learning rate or check the inputs for NaNs.")


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
        if batch % log_every == 0:
            _check_finite(recent_losses, epoch, batch)
            recent_losses.clear()
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}")
    if seen == 0:
        raise ValueError("the training loader yielded no batches")
    _check_finite(recent_losses, epoch, batch)
    if is_distributed():                  # every process's images count: add up the sums, then divide
        totals = torch.tensor([loss_sum.item(), correct.item(), seen], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        loss_total, correct_total, seen = totals.tolist()
        return loss_total / seen, correct_total / seen
    return loss_sum.item() / seen, correct.item() / seen


@contextlib.contextmanager
def _interrupt_deferred():
    """Hold a Ctrl-C (or a Jupyter interrupt) until the block has finished, then hand it to the
    handler that was in place (Python's raises KeyboardInterrupt): the best checkpoint, the last
    state and the history are written together, so an interrupt never leaves them describing
    different epochs. An ignored Ctrl-C stays ignored."""
    in_main_thread = threading.current_thread() is threading.main_thread()   # the only one that may set handlers
    if not in_main_thread or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:   # ignored stays ignored
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        if callable(previous):
            previous(*caught[0])                # Python's own handler raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt


def _save_epoch(files: RunFiles, model, metadata, history, improved, recipe,
                optimizer, scheduler, scaler, train_loader) -> None:
    """After an epoch: the best checkpoint (when val accuracy improved), then the last state,
    then the history JSON; each write atomic. In a distributed run the main process writes,
    with every process's random states (each draws its own augmentation and dropout)."""
    rng = _rng_state(train_loader)
    if is_distributed():
        rng_by_rank = [None] * world_size()
        torch.distributed.all_gather_object(rng_by_rank, rng)
    if not is_main_process():
        return
    meta = {**metadata, "epoch": history.epoch[-1], "val_acc": history.val_acc[-1]}
    if improved:
        _write_checkpoint(files.best, model, meta)
    training = {"recipe": recipe, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "rng": rng, "history": asdict(history)}
    if is_distributed():
        training["rng_by_rank"] = rng_by_rank
    _write_checkpoint(files.last, model, meta, training)
    history.to_json(files.history)


def _check_equal_shares(train_loader) -> None:
    """In a distributed run, raise `ValueError` in every process unless all of them have as many
    training batches: at each step every process waits for the others' gradients, so one with
    an extra batch would wait forever."""
    counts = [None] * world_size()
    torch.distributed.all_gather_object(counts, len(train_loader))
    if len(set(counts)) > 1:
        raise ValueError(f"the processes' training loaders have {counts} batches: every process must take "
                         f"the same number of steps. Make the training loader with "
                         f"utils.make_loader(..., shuffle=True), whose DistributedSampler gives equal shares.")


def _for_processes(model: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """`model` wrapped in DistributedDataParallel (a model wrapped already is taken as it is: wrap
    it in the memory layout it will train in, as DDP's buckets copy the layout they first see),
    with its BatchNorm layers made SyncBatchNorm when asked (see `train`)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if sync_batchnorm:
            raise ValueError("sync_batchnorm=True needs the model before DistributedDataParallel wraps it: "
                             "pass the model itself, or convert it with nn.SyncBatchNorm.convert_sync_batchnorm first")
        return model
    if sync_batchnorm:
        if device.type == "cpu":
            raise ValueError("sync_batchnorm=True: PyTorch's SyncBatchNorm runs on GPUs only; on the CPU "
                             "leave it off (each process then normalises with its own batch's statistics)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # the same parameters, in new layers
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm's running statistics, which
    each process has updated from its own last batch), so that all evaluate, and save, one model."""
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def train(model: nn.Module, train_loader, val_loader, num_epochs: int, optimizer, criterion,
          scheduler=None, *, files: RunFiles | None = None, metadata: dict | None = None,
          resume: bool = False, writer=None, amp: bool | None = None,
          amp_dtype: torch.dtype | None = None, channels_last: bool | None = None,
          compile: bool = False, scheduler_interval: str | None = None, log_every: int = 20,
          progress: bool = True, verbose: bool = True, sync_batchnorm: bool = False) -> History:
    """Train `model` for `num_epochs`, measuring loss and accuracy on `val_loader` after each.
    The test set has no part in it: evaluate it once, afterwards, on `files.best`.

    scheduler: None, a per-epoch scheduler (StepLR, CosineAnnealingLR, ...), ReduceLROnPlateau
        (stepped with the validation loss), or a per-batch one (OneCycleLR, CyclicLR);
        `scheduler_interval` ("batch" or "epoch") overrides the guess.
    files: where to keep the run (see `RunFiles`): after every epoch the history JSON, the
        checkpoint with the best validation accuracy so far (with `metadata`, see
        `save_checkpoint`), and the last epoch's full state. All writes are atomic; files of an
        earlier run are renamed aside, never overwritten.
    resume: continue from `files.last` (model, optimizer, scheduler, gradient scaler, random
        states, epoch counter, history) when it exists; the recipe must be the same.
    writer: an optional TensorBoard `SummaryWriter`.
    amp: mixed precision, default on for CUDA (float16 with gradient scaling; `amp_dtype`
        bfloat16 elsewhere). channels_last: default per device, `CHANNELS_LAST_DEFAULT`.
    A non-finite loss raises `FloatingPointError` naming the epoch and batch (the checkpoints
    stay); Ctrl-C (KeyboardInterrupt) stops and returns the history so far.
    Loaders must yield batches on the model's device (see `DeviceLoader`); they are not changed,
    and the model ends in the usual memory layout, whatever layout training used. A training
    loader with a `set_epoch(epoch)` method (as PyTorch's samplers have) is told each epoch's
    number before it is iterated, on a resumed run too.

    Under torchrun (`is_distributed()`: one process per GPU, or several CPU processes), each
    process calls `train` with its own copy of the model and its share of the data (loaders from
    `make_loader`; the training loaders must have as many batches in every process, or a
    `ValueError` says so). `train` wraps the model in DistributedDataParallel (or takes one
    wrapped already), which averages the gradients of all processes at every step, so that all
    keep identical weights; it measures validation over the whole split, each image once; the
    main process alone writes the files and the TensorBoard curves and prints, and `resume`
    restores every process. The batch is per process, so the global batch is
    `batch_size * world_size()`: scale the learning rate with it.
    sync_batchnorm: under torchrun, BatchNorm layers normalise with the statistics of the global
        batch instead of each process's share (`nn.SyncBatchNorm`, GPUs only; the layers are
        replaced in `model` itself, with the same weights). It matters when the per-process batch
        is small (a few dozen images or fewer): its statistics are noisy, and the
        validation-time running averages inherit the noise; with large batches per process it
        only costs time. Ignored in an ordinary run.
    """
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    amp = on_cuda if amp is None else amp
    amp_dtype = amp_dtype or (torch.float16 if on_cuda else torch.bfloat16)
    if channels_last is None:
        channels_last = CHANNELS_LAST_DEFAULT.get(device.type, False)
    if scheduler_interval is None:
        scheduler_interval = "batch" if isinstance(scheduler, PER_BATCH_SCHEDULERS) else "epoch"
    if scheduler_interval not in ("batch", "epoch"):
        raise ValueError(f"scheduler_interval must be 'batch' or 'epoch', got {scheduler_interval!r}")
    if log_every < 1:
        raise ValueError(f"log_every counts batches between progress updates and must be at least 1, "
                         f"got {log_every}")
    if resume and files is None:
        raise ValueError("resume=True needs files=RunFiles(...) to resume from")
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    if channels_last:
        # convolutions then run in NHWC whatever the input's layout (they follow the weights);
        # the model goes back to the usual layout at the end, where a reloaded copy will be
        model.to(memory_format=torch.channels_last)
    distributed, main = is_distributed(), is_main_process()
    if distributed:
        _check_equal_shares(train_loader)
        wrapped = _for_processes(model, device, sync_batchnorm)   # steps: gradients averaged over processes
        net = _unwrap(wrapped)                                      # evaluation: each process its share
        step_model = torch.compile(wrapped) if compile else wrapped
        eval_model = torch.compile(net) if compile else net
    else:
        step_model = eval_model = torch.compile(model) if compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    recipe = _recipe(model, optimizer, scheduler, num_epochs, train_loader, val_loader)

    if resume and from_main_process(files.last.exists):
        history = _resume(files, recipe, model, optimizer, scheduler, scaler, train_loader)
        if main:
            print(f"Resuming {files.name} after epoch {len(history)} of {num_epochs} (from {files.last.name})")
    else:
        if resume and main:
            print(f"No {files.last} to resume from: starting at epoch 1.")
        if files is not None and main:
            for path in (files.best, files.last, files.history):
                _backup_existing(path)
        history = History(info={
            "model": type(_unwrap(model)).__name__, "device": hardware(), "torch": str(torch.__version__),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "optimizer": type(optimizer).__name__,
            "scheduler": type(scheduler).__name__ if scheduler else None,
            "batch_size": getattr(train_loader, "batch_size", None),
            "train_images": _dataset_size(train_loader), "val_images": _dataset_size(val_loader),
            "amp": str(amp_dtype).replace("torch.", "") if amp else None, "channels_last": channels_last,
        })
        if distributed:
            history.info.update(processes=world_size(), sync_batchnorm=sync_batchnorm)

    try:
        for epoch in range(len(history) + 1, num_epochs + 1):
            start = time.perf_counter()
            lr = _current_lr(optimizer)
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            train_loss, train_acc = _train_one_epoch(
                step_model, train_loader, optimizer, criterion, scaler, amp, amp_dtype, device,
                scheduler if scheduler_interval == "batch" else None,
                epoch, num_epochs, log_every, progress and main)
            if distributed:
                _broadcast_buffers(net)
            val_loss, val_acc = evaluate(eval_model, val_loader, criterion, amp=amp, amp_dtype=amp_dtype)
            if scheduler is not None and scheduler_interval == "epoch":
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(val_loss)
                else:
                    scheduler.step()
            seconds = time.perf_counter() - start
            improved = val_acc > history.best_val_acc or not history.val_acc
            with _interrupt_deferred():        # an epoch is recorded and saved whole, or not at all
                for name, value in (("epoch", epoch), ("train_loss", train_loss), ("train_acc", train_acc),
                                    ("val_loss", val_loss), ("val_acc", val_acc), ("lr", lr),
                                    ("seconds", seconds)):
                    getattr(history, name).append(value)
                if files is not None:
                    _save_epoch(files, model, metadata or {}, history, improved, recipe,
                                optimizer, scheduler, scaler, train_loader)
            if writer is not None and main:
                for name, value in (("loss/train", train_loss), ("loss/val", val_loss),
                                    ("accuracy/train", train_acc), ("accuracy/val", val_acc), ("lr", lr)):
                    writer.add_scalar(name, value, epoch)
                writer.flush()
            if verbose and main:
                print(f"epoch {epoch:>3}/{num_epochs}  train loss {train_loss:.4f}  acc {train_acc:6.2%}  "
                      f"| val loss {val_loss:.4f}  acc {val_acc:6.2%}  | lr {lr:.2e}  {seconds:6.1f} s"
                      + ("  *" if improved and files is not None else ""))
    except KeyboardInterrupt:
        if main:
            print(f"Interrupted: returning the history of {len(history)} completed epoch(s)."
                  + (f" Continue with resume=True (from {files.last})." if files is not None and len(history) else ""))
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    return history


# =============================================================================================
# Prediction
# =============================================================================================

PREDICTION_META = ("classes", "image_size", "input_size", "mean", "std")


def preprocess(image: Image.Image, meta: dict, device="cpu") -> torch.Tensor:
    """An RGB PIL image as the (1, 3, input_size, input_size) batch the network was trained on:
    resized to the data set's `image_size` (CIFAR-10: reduced to 32x32), as uint8, then the
    same `BatchTransform` as in training, on `device`. `meta` is what `load_checkpoint` returns."""
    missing = [key for key in PREDICTION_META if meta.get(key) is None]
    if missing:
        raise ValueError(f"the checkpoint's metadata lacks {missing}: save it with "
                         f"utils.save_checkpoint(..., {', '.join(f'{k}=...' for k in missing)})")
    batch = image_to_tensor(image, meta["image_size"]).unsqueeze(0).to(device)
    return BatchTransform(meta["mean"], meta["std"], meta["input_size"]).to(device)(batch)


@torch.no_grad()
def predict(model: nn.Module, source, meta: dict, topk: int = 5, **load_options) -> list[tuple[str, float]]:
    """The `topk` most likely (class name, probability) pairs for one image from any source
    `load_image` accepts, preprocessed as `meta` (from `load_checkpoint`) says.
    Raises `ValueError` for anything that is not a readable image."""
    image = load_image(source, **load_options)
    model.eval()
    logits = model(preprocess(image, meta, next(model.parameters()).device)).float()
    probs = logits.softmax(1)[0]
    values, indices = probs.topk(min(topk, len(meta["classes"])))
    return [(meta["classes"][i], p) for i, p in zip(indices.tolist(), values.tolist())]


CAT_PHOTO_URL = ("https://upload.wikimedia.org/wikipedia/commons/thumb/4/4d/Cat_November_2010-1a.jpg/"
                 "320px-Cat_November_2010-1a.jpg")   # section 9's photo from the web (Wikimedia Commons)


def print_top_k(pairs) -> None:
    """Print (class name, probability) pairs from `predict` as a small table."""
    width = max(len(name) for name, _ in pairs)
    for name, probability in pairs:
        print(f"{name:>{width}}: {probability:6.1%}")


# =============================================================================================
# Plotting
# =============================================================================================

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


@torch.no_grad()
def plot_sample_predictions(model: nn.Module, loader: DeviceLoader, classes, mean=None, std=None,
                            n: int = 64, ncols: int = 8, seed: int = 0, save_path=None):
    """A grid of `n` images drawn at random (with `seed`) from the loader's data set, titled
    "predicted (true)": green when right, red when wrong. Returns (figure, accuracy on them)."""
    import matplotlib.pyplot as plt

    model.eval()
    images, labels = loader.sample(n, seed)
    predictions = model(images).argmax(1)
    nrows = math.ceil(len(images) / ncols)
    # constrained layout leaves room for the title above the first row's titles
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.3 * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, prediction in zip(axes.flat, images, labels.tolist(), predictions.tolist()):
        imshow(image, mean, std, ax=ax)
        ax.set_title(f"{classes[prediction]}\n({classes[label]})", fontsize=9,
                     color="green" if prediction == label else "red")
    accuracy = (predictions == labels).float().mean().item()
    fig.suptitle(f"predicted (true): {accuracy:.1%} right on these {len(images)} images")
    if save_path:
        fig.savefig(save_path, dpi=80)
    return fig, accuracy


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


def show_top_k(image: Image.Image, pairs, caption: str | None = None) -> None:
    """Show one photo titled with the most likely class and its probability, then print
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


def plot_history(history: History, save_path=None, title: str | None = None):
    """Loss, accuracy and learning rate per epoch, side by side, with the epoch the validation
    chose marked; saved as a PNG with `save_path`."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    epochs = history.epoch
    marker = "o" if len(epochs) < 30 else None
    ax_loss.plot(epochs, history.train_loss, marker=marker, label="train")
    ax_loss.plot(epochs, history.val_loss, marker=marker, label="validation")
    ax_loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.plot(epochs, [100 * a for a in history.train_acc], marker=marker, label="train")
    ax_acc.plot(epochs, [100 * a for a in history.val_acc], marker=marker, label="validation")
    if history.best_epoch is not None:
        ax_acc.axvline(history.best_epoch, color="grey", linestyle=":", label="best (by validation)")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="%")
    ax_lr.plot(epochs, history.lr, marker=marker, color="tab:green")
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    if history.lr and min(history.lr) > 0 and max(history.lr) / min(history.lr) > 10:
        ax_lr.set_yscale("log")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:   # whole epochs only, and no ticks (so no axis) beyond the data
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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


# =============================================================================================
# Sections 5-9, packed up: CustomCNN.ipynb writes each out in full, the other notebooks call these
# =============================================================================================

@dataclass
class TestResult:
    """What section 5 measured, for sections 6-8: the test accuracy of the checkpoint the
    validation chose, every test prediction with its label, and that checkpoint's metadata."""
    test_acc: float
    predictions: torch.Tensor       # (N,) predicted classes
    labels: torch.Tensor            # (N,) true classes
    best: dict                      # the chosen checkpoint's metadata: epoch, val_acc, ...
    tta_level: int = 0


def choose_tta_level(model: nn.Module, files: RunFiles, val_loader, levels, history: History) -> int:
    """Load the checkpoint the validation chose, measure each test-time augmentation level
    on the validation split (the test split has no say) and return the best one, the first
    of equal ones; the accuracies are kept in `history.info["val_acc_by_tta_level"]`."""
    load_checkpoint(files.best, model)
    val_acc_by_level = {}
    for level in levels:
        logits, labels = predict_loader(TTA(model, level), val_loader)
        val_acc_by_level[level] = (logits.argmax(1) == labels).float().mean().item()
        print(f"TTA level {level}: validation accuracy {val_acc_by_level[level]:.2%}")
    chosen = max(val_acc_by_level, key=val_acc_by_level.get)
    history.info["val_acc_by_tta_level"] = val_acc_by_level
    print(f"chosen: level {chosen}")
    return chosen


def test_chosen_model(model: nn.Module, files: RunFiles, test_loader, history: History,
                      tta_level: int = 0, last_epoch: bool = False) -> TestResult:
    """Section 5: load the checkpoint the validation chose (`files.best`) into `model`, predict
    the whole test split once (with test-time augmentation at `tta_level`), record the test
    accuracy in `history` and its JSON file, and print it beside the validation accuracy.
    last_epoch: test the last epoch (`files.last`) instead, for a run whose validation images
        were trained on (a chosen recipe retrained on all the training images), where the
        validation accuracy no longer chooses anything; `history.info["tested"]` says which.
    Under torchrun every process calls it with its share of the test split (see `make_loader`),
    and the main process writes and prints."""
    path = files.last if last_epoch else files.best
    checkpoint = from_main_process(_read_checkpoint, path)    # under torchrun: read once, on process 0
    _load_weights(model, checkpoint["state_dict"], path)
    tested = dict(checkpoint["meta"])
    logits, labels = predict_loader(TTA(model, tta_level), test_loader)
    predictions = logits.argmax(1)
    test_acc = (predictions == labels).float().mean().item()
    history.test_acc = test_acc
    history.info["tested"] = "last epoch" if last_epoch else "best validation accuracy"
    if tta_level:
        history.info["tta_level"] = tta_level
    if is_main_process():
        history.to_json(files.history)
        with_tta = f", test-time augmentation level {tta_level}" if tta_level else ""
        chosen_by = "the last" if last_epoch else f"validation accuracy {tested['val_acc']:.2%}"
        print(f"epoch {tested['epoch']} ({chosen_by}) on {len(labels):,} test images{with_tta}: {test_acc:.2%}")
    return TestResult(test_acc, predictions, labels, tested, tta_level)


def show_per_class_accuracy(test: TestResult, classes, save_path=None) -> None:
    """Section 6: print each class's test accuracy and draw the confusion matrix (saved as a PNG
    with `save_path`)."""
    import matplotlib.pyplot as plt

    matrix = confusion_matrix(test.predictions, test.labels, num_classes=len(classes))
    print_per_class_accuracy(matrix, classes)
    plot_confusion_matrix(matrix, classes, save_path=save_path)
    plt.show()


def save_and_reload(path, model: nn.Module, fresh_model: nn.Module, test_loader, test: TestResult,
                    check_images: int = 1000, **meta) -> dict:
    """Section 8: save `model`'s state_dict with `meta` and the chosen epoch's accuracies, load
    the file into `fresh_model` (an untrained instance of the same class), assert that every
    tensor is identical, bit for bit, and so are the predictions on the first `check_images`
    test images (with test-time augmentation a full pass costs several), and return the
    checkpoint's metadata."""
    chosen = dict(tta_level=test.tta_level, epoch=test.best["epoch"], val_acc=test.best["val_acc"],
                  test_acc=test.test_acc)
    path = save_checkpoint(path, model, **{**meta, **chosen})
    loaded = load_checkpoint(path, fresh_model)
    assert_same_weights(model, fresh_model)
    reloaded_net, predictions = TTA(fresh_model, test.tta_level).eval(), []
    with torch.no_grad():
        for images, _ in test_loader:
            predictions.append(reloaded_net(images).argmax(1).cpu())
            if sum(map(len, predictions)) >= check_images:
                break
    predictions = torch.cat(predictions)
    assert torch.equal(predictions, test.predictions[:len(predictions)].cpu()), "the reloaded model predicts differently"
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB) and reloaded it: identical weights, and identical "
          f"predictions on {len(predictions):,} test images")
    print(loaded)
    return loaded


def save_example_image(dataset: UInt8ImageDataset, path, index: int = 0) -> tuple[pathlib.Path, str]:
    """Write image `index` of an in-memory data set as a PNG at `path`, to stand in for a photo
    of your own; returns the path and the image's true class name."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(dataset.images[index].permute(1, 2, 0).numpy()).save(path)
    return path, dataset.classes[int(dataset.labels[index])]


def predict_new_images(model: nn.Module, meta: dict, image_path, url: str, true_class: str | None = None) -> None:
    """Section 9: the top-5 classes of a local image file, then of an image on the web (a
    download that fails prints its reason instead). `meta` is the checkpoint's metadata; the
    model predicts with the test-time augmentation level it was tested with."""
    model = TTA(model, meta.get("tta_level") or 0)
    image = load_image(image_path)
    caption = f"{pathlib.Path(image_path).name}" + (f" (true class: {true_class})" if true_class else "")
    show_top_k(image, predict(model, image, meta), caption)
    try:
        web_image = load_image(url)
    except ValueError as err:
        print("Could not predict from the URL:", err)
        return
    show_top_k(web_image, predict(model, web_image, meta), url)


# =============================================================================================
# Results
# =============================================================================================

RESULTS_DIR = REPO_DIR / "results"


def measured_runs(name: str) -> list[dict]:
    """The course's measured runs of notebook `name`: the history JSON files in `results/`
    (recorded with tools/make_tables.py), oldest first."""
    files = [json.loads(path.read_text()) for path in sorted(RESULTS_DIR.glob("*.json"))]
    runs = [run for run in files if "epoch" in run and run["info"].get("name") == name]   # histories only
    return sorted(runs, key=lambda run: run["info"]["started"])


def validation_trained_on(run: dict) -> bool:
    """Whether a measured run trained on its validation images (a chosen recipe retrained on all
    the training images, its last epoch tested): its validation accuracy then chose nothing."""
    return run["info"].get("tested") == "last epoch"


def describe_run(run: dict) -> str:
    """One line for a measured run: the test accuracy of the validation-chosen epoch, the
    validation accuracy beside it (or, for a run retrained on its validation images, that its last
    epoch was tested), the budget and the machine."""
    history = History(**{key: value for key, value in run.items() if key in History.__dataclass_fields__})
    test = f"test {history.test_acc:.2%}" if history.test_acc is not None else "test not measured"
    seconds = sum(history.seconds) / len(history)
    if validation_trained_on(run):
        chosen = f"last epoch of {len(history)}, validation images trained on"
    else:
        chosen = f"val {history.best_val_acc:.2%} (epoch {history.best_epoch} of {len(history)})"
    return (f"{test}, {chosen}, "
            f"{seconds:,.0f} s per epoch on {history.info['device']}, {history.info['started'][:10]}: "
            f"{history.info['note']}")


def print_measured_runs(name: str, history: History | None = None) -> None:
    """Print the measured runs of notebook `name` (the rows of the lab book's results table),
    then, given this run's `history`, one line for it."""
    runs = measured_runs(name)
    for run in runs:
        print(describe_run(run))
    if not runs:
        print(f"no measured run of {name} in {RESULTS_DIR} yet")
    if history is not None:
        test = f"test accuracy {history.test_acc:.2%}" if history.test_acc is not None else "test not measured"
        print(f"this run: {len(history)} epoch(s), validation chose epoch {history.best_epoch} "
              f"({history.best_val_acc:.2%}), {test}, {sum(history.seconds) / len(history):.0f} s per epoch "
              f"on {history.info['device']}")
