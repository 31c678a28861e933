"""Small generated data sets and a local image server, so that the suite runs offline.

The fake CIFAR-10 is learnable on purpose: each class has its own colour and stripe
direction, so a network that trains correctly gets well above chance in a few steps.
"""
from __future__ import annotations

import functools
import http.server
import pathlib
import threading

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
FLOWER_CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def class_image(label: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) uint8 image whose colour and stripes depend on `label`, plus noise."""
    height, width = size
    hue = label / num_classes
    colour = 255 * np.array([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)])
    yy, xx = np.mgrid[0:height, 0:width]
    angle = np.pi * label / num_classes
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 12 / max(height, width) * np.pi)
    image = colour * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 20, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_cifar10_folder(root: pathlib.Path, train_per_class: int = 40, test_per_class: int = 10,
                         seed: int = 0) -> pathlib.Path:
    """`root/cifar10/{train,test}/<class>/NNNN.png`, 32x32 RGB, in CIFAR-10's class order."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / "cifar10" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(class_image(label, 10, (32, 32), rng)).save(folder / f"{i:04d}.png")
    return root / "cifar10"


def write_flower_photos(root: pathlib.Path, per_class: int = 12, seed: int = 0) -> pathlib.Path:
    """`root/flower_photos/<class>/*`: photos of different sizes, in RGB, greyscale, palette,
    CMYK and RGBA, as JPEG and PNG, the way real data sets mix them."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "RGB", "L", "P", "CMYK", "RGBA"]
    for label, name in enumerate(FLOWER_CLASSES):
        folder = root / "flower_photos" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            image = Image.fromarray(class_image(label, 5, size, rng))
            mode = modes[i % len(modes)]
            image = image.convert(mode) if mode != "P" else image.convert("P", palette=Image.ADAPTIVE)
            suffix = ".png" if mode in ("P", "RGBA") else ".jpg"
            image.save(folder / f"{name}_{i:03d}{suffix}")
    return root / "flower_photos"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_directory(directory: pathlib.Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    """Serve `directory` on 127.0.0.1 (a free port) in a daemon thread; returns (base URL, server)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
