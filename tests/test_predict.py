"""utils.load_image / utils.fetch_url / utils.preprocess / utils.predict: every image mode, every
bad input, URLs served on 127.0.0.1, and prediction preprocessed exactly as in training."""
import http.server
import io
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import utils
from tests import fakedata

CLASSES = ["red", "green", "blue"]
META = dict(classes=CLASSES, image_size=32, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, arch="MeanColour")


class MeanColour(nn.Module):
    """Classifies an image by its mean colour: a model whose right answer we know."""
    def forward(self, x):                     # (B, 3, H, W), normalised with mean 0.5, std 0.5
        return 10 * x.mean(dim=(2, 3))        # (B, 3)


def encode(image, fmt="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def predict(source, **options):
    model = MeanColour()
    model.dummy = nn.Parameter(torch.zeros(1))  # predict() finds the device from the parameters
    return utils.predict(model, source, META, **options)


def test_predict_returns_sorted_top_k_pairs():
    top = predict(Image.new("RGB", (50, 40), (0, 0, 255)), topk=2)
    assert top[0][0] == "blue"                 # red and green tie for second place
    assert len(top) == 2 and top[0][1] >= top[1][1] and 0.9 < top[0][1] <= 1
    assert len(predict(Image.new("RGB", (8, 8)), topk=10)) == 3


def rgb_pixel(image):
    return utils.load_image(encode(image) if image.mode not in ("CMYK", "I;16", "F", "La") else image).getpixel((0, 0))


@pytest.mark.parametrize("image, expected", [
    (Image.new("L", (10, 10), 200), (200, 200, 200)),
    (Image.new("1", (10, 10), 1), (255, 255, 255)),
    (Image.new("LA", (10, 10), (0, 0)), (255, 255, 255)),                  # transparent -> white
    (Image.new("RGBA", (10, 10), (255, 0, 0, 255)), (255, 0, 0)),
    (Image.new("RGBA", (10, 10), (255, 0, 0, 0)), (255, 255, 255)),
    (Image.new("RGB", (10, 10), (0, 128, 0)).convert("P", palette=Image.ADAPTIVE), (0, 128, 0)),
    (Image.new("CMYK", (10, 10), (0, 255, 255, 0)), (255, 0, 0)),
    (Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16)), (255, 255, 255)),   # 16-bit
    (Image.fromarray(np.full((10, 10), 32768, dtype=np.uint16)), (128, 128, 128)),
    (Image.fromarray(np.full((10, 10), 0.5, dtype=np.float32)), (128, 128, 128)),    # float in [0, 1]
    (Image.new("La", (10, 10), (100, 128)), (227, 227, 227)),   # premultiplied: grey 199, half over white
])
def test_every_valid_mode_becomes_8_bit_rgb(image, expected):
    loaded = rgb_pixel(image)
    assert loaded == pytest.approx(expected, abs=2)


def test_16_bit_pgm_keeps_its_brightness():
    dark = b"P5 4 4 65535\n" + np.full(16, 200, dtype=">u2").tobytes()        # 200 of 65535: nearly black
    assert utils.load_image(dark).getpixel((0, 0)) == (1, 1, 1)
    grey = b"P5 4 4 1000\n" + np.full(16, 500, dtype=">u2").tobytes()         # half of its own maximum
    assert utils.load_image(grey).getpixel((0, 0)) == pytest.approx((128, 128, 128), abs=1)


def test_palette_with_transparency_and_cmyk_jpeg_and_16_bit_png_files(tmp_path):
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([255, 0, 0] + [0] * 765)
    palette.info["transparency"] = 0
    assert utils.load_image(encode(palette, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, quality=95)
    assert utils.load_image(cmyk).getpixel((8, 8)) == pytest.approx((255, 0, 0), abs=6)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(deep)
    assert utils.load_image(deep).getpixel((0, 0)) == pytest.approx((156, 156, 156), abs=2)
    dark = tmp_path / "dark.png"                           # 16 bits at 0.3 % brightness stay dark
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(dark)
    assert utils.load_image(dark).getpixel((0, 0)) == (1, 1, 1)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6                                       # "rotate 90 degrees clockwise to display"
    loaded = utils.load_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (20, 40)


def test_sources_path_bytes_file_object_and_pil(tmp_path):
    image = Image.new("RGB", (12, 12), (0, 255, 0))
    path = tmp_path / "green.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), open(path, "rb"), image):
        assert predict(source)[0][0] == "green"


# ---- bad input: each a ValueError naming the source and the reason ----

def test_missing_file_directory_and_non_image(tmp_path):
    with pytest.raises(ValueError, match="nope.jpg: no such file"):
        utils.load_image(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match="not a file"):
        utils.load_image(tmp_path)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match="notes.jpg: not a readable image"):
        predict(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png: empty"):
        utils.load_image(empty)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cut.{fmt.lower()}: .*(truncated|corrupt|not a readable)"):
        predict(path)


def test_random_bytes_and_wrong_types():
    with pytest.raises(ValueError, match="bytes given: not a readable image"):
        utils.load_image(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="empty"):
        utils.load_image(b"")
    for bad in (None, 42, 3.5, ["a.jpg"]):
        with pytest.raises(ValueError, match=type(bad).__name__):
            utils.load_image(bad)
    with pytest.raises(ValueError, match="text mode"):
        utils.load_image(io.StringIO("hello"))


MALFORMED_URLS = [
    ("https://[::1", "not a valid URL"),
    ("http://127.0.0.1:abc/x.png", "not a valid URL"),
    ("http://", "not a valid URL"),
    ("http://127.0.0.1:9/x.png", "could not connect"),           # nothing listens on port 9
]


@pytest.mark.parametrize("url, reason", MALFORMED_URLS)
def test_malformed_and_unreachable_urls_name_the_url(url, reason):
    with pytest.raises(ValueError) as err:
        utils.load_image(url, timeout=2)
    assert str(err.value).startswith(f"{url}: {reason}")
    with pytest.raises(ValueError) as err:
        utils.fetch_url(url, io.BytesIO(), timeout=2, max_bytes=1000)
    assert str(err.value).startswith(f"{url}: {reason}")


def test_empty_string_is_refused():
    with pytest.raises(ValueError, match="empty string"):
        utils.load_image("  ")


def test_unsupported_url_scheme():
    with pytest.raises(ValueError, match="ftp://example.com/a.jpg: only http"):
        utils.load_image("ftp://example.com/a.jpg")


def test_decompression_bomb(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)                # 81 million pixels in a few kilobytes
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ValueError, match="bomb.png: 9000x9000 pixels.*decompression bomb"):
        predict(bomb)
    with pytest.raises(ValueError, match="over the 100-pixel limit"):
        utils.load_image(encode(Image.new("RGB", (20, 20))), max_pixels=100)


def test_oversized_file(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("RGB", (8, 8))) + b"\0" * 2000)
    with pytest.raises(ValueError, match="big.png: .*over the 1,000-byte limit"):
        utils.load_image(path, max_bytes=1000)


# ---- URLs, served by a local server ----

PNG = encode(Image.new("RGB", (16, 16), (255, 0, 0)))
BOMB = encode(Image.new("1", (20000, 10000)))   # 24 KB of PNG, 200 million pixels: over Pillow's own limit


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, body, content_type, length=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:                        # the client gave up first (time-out tests)
            pass

    def do_GET(self):
        if self.path == "/red.png":
            self.send(200, PNG, "image/png")
        elif self.path == "/mislabelled.png":
            self.send(200, PNG, "application/octet-stream")
        elif self.path == "/page.html":
            self.send(200, b"<html>hello</html>", "text/html; charset=utf-8")
        elif self.path == "/slow.png":
            time.sleep(3)
            self.send(200, PNG, "image/png")
        elif self.path == "/trickle.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for byte in PNG:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/huge-declared.png":
            self.send(200, PNG, "image/png", length=10**9)
        elif self.path == "/endless.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif self.path == "/cut.png":          # the connection closes 10 bytes into the body
            self.send(200, PNG[:10], "image/png", length=len(PNG))
        elif self.path == "/stall.png":        # part of the body, then silence
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG[:10])
            self.wfile.flush()
            time.sleep(3)
        elif self.path == "/bad-gzip.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", "20")
            self.end_headers()
            self.wfile.write(b"not gzip at all, no!")
        elif self.path == "/bomb.bin":         # an image, mislabelled, and far too big
            self.send(200, BOMB, "application/octet-stream")
        elif self.path == "/empty.png":
            self.send(200, b"", "image/png")
        elif self.path == "/garbage.png":
            self.send(200, b"\x89PNG garbage" * 10, "image/png")
        else:
            self.send(404, b"not found", "text/plain")


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_url_predicts(server):
    assert predict(f"{server}/red.png")[0][0] == "red"
    assert predict(f"{server}/mislabelled.png")[0][0] == "red"   # the bytes decide, not the header
    assert predict(f" {server}/red.png\n")[0][0] == "red"          # as pasted, spaces and all


BAD_URLS = [
    ("/missing.png", {}, "HTTP error 404"),
    ("/page.html", {}, "text/html, not an image"),
    ("/slow.png", {"timeout": 1}, "timed out after 1 s"),
    ("/trickle.png", {"timeout": 1}, "timed out after 1 s"),
    ("/stall.png", {"timeout": 1}, "timed out after 1 s"),
    ("/cut.png", {}, "the download failed"),
    ("/bad-gzip.png", {}, "the download failed"),
    ("/bomb.bin", {}, "decompression bomb"),
    ("/huge-declared.png", {}, "1,000,000,000 bytes, over the"),
    ("/endless.png", {"max_bytes": 200_000}, "passed the 200,000-byte limit"),
    ("/empty.png", {}, "empty"),
    ("/garbage.png", {}, "not a readable image"),
]


@pytest.mark.parametrize("path, options, reason", BAD_URLS)
def test_bad_urls_raise_value_error_naming_url_and_reason(server, path, options, reason):
    url = f"{server}{path}"
    with pytest.raises(ValueError) as err:
        predict(url, **options)
    assert str(err.value).startswith(url) and reason in str(err.value)


# ---- the downloader itself ------------------------------------------------------------------

@pytest.mark.parametrize("path, options, reason", [case for case in BAD_URLS
                                                   if case[0] not in ("/page.html", "/garbage.png", "/bomb.bin")])
def test_download_failures_name_url_and_reason(server, path, options, reason):
    url = f"{server}{path}"
    options = {"timeout": 10, "max_bytes": utils.MAX_DOWNLOAD_BYTES, **options}
    with pytest.raises(ValueError) as err:
        utils.fetch_url(url, io.BytesIO(), **options)
    assert str(err.value).startswith(f"{url}: ") and reason in str(err.value)


def test_download_streams_the_body_and_returns_the_content_type(server):
    buffer = io.BytesIO()
    assert utils.fetch_url(f"{server}/red.png", buffer, timeout=5, max_bytes=10_000) == "image/png"
    assert buffer.getvalue() == PNG
    page = io.BytesIO()                                        # any content: deciding is the caller's job
    assert utils.fetch_url(f"{server}/page.html", page, timeout=5, max_bytes=10_000).startswith("text/html")
    assert page.getvalue() == b"<html>hello</html>"
    with pytest.raises(ValueError, match=f"is {len(PNG)} bytes, over the {len(PNG) - 1}-byte limit"):
        utils.fetch_url(f"{server}/red.png", io.BytesIO(), timeout=5, max_bytes=len(PNG) - 1)
    utils.fetch_url(f"{server}/red.png", io.BytesIO(), timeout=5, max_bytes=len(PNG))   # the limit is allowed


def test_load_image_downloads_through_utils_download(monkeypatch):
    calls = []

    def fake_download(url, file, *, timeout, max_bytes, progress=False):
        calls.append((url, timeout, max_bytes))
        file.write(PNG)
        return "image/png"

    monkeypatch.setattr(utils, "fetch_url", fake_download)
    image = utils.load_image("https://example.invalid/red.png", timeout=3, max_bytes=5000)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert calls == [("https://example.invalid/red.png", 3, 5000)]


# ---- output ---------------------------------------------------------------------------------

def test_print_top_k_prints_a_row_per_class(capsys):
    utils.print_top_k([("cat", 0.75), ("automobile", 0.25)])
    assert capsys.readouterr().out.splitlines() == ["       cat:  75.0%", "automobile:  25.0%"]


def test_show_top_k_titles_the_image_and_prints_the_table(capsys, monkeypatch):
    import matplotlib.pyplot as plt
    titles = []
    monkeypatch.setattr(plt, "show", lambda: titles.append(plt.gca().get_title()))
    assert utils.show_top_k(Image.new("RGB", (8, 8)), [("cat", 0.75), ("dog", 0.25)], "my photo") is None
    assert titles == ["cat (75.0%)"]
    assert capsys.readouterr().out.splitlines() == ["my photo", "cat:  75.0%", "dog:  25.0%"]
    plt.close("all")


# ---- preprocessing: exactly the training path -----------------------------------------------

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    fakedata.write_cifar10_folder(root, train_per_class=3, test_per_class=2)
    return root


@pytest.mark.parametrize("size", [None, 64])
def test_preprocess_of_a_cifar_file_equals_the_training_batch(cifar_root, size):
    _, _, test_set = utils.load_cifar10(cifar_root)
    test_dir = cifar_root / "cifar10" / "test"
    _, files = utils.scan_image_folder(test_dir)
    for name in ("airplane/0000.png", "cat/0001.png", "truck/0001.png"):
        index = files.index(name)                              # load_cifar10 keeps the file order
        expected = utils.BatchTransform(MEAN, STD, size)(test_set.images[index:index + 1])
        meta = dict(classes=test_set.classes, image_size=32, input_size=size or 32, mean=MEAN, std=STD)
        got = utils.preprocess(utils.load_image(test_dir / name), meta)
        assert got.shape == (1, 3, size or 32, size or 32)
        assert torch.equal(got, expected), name


def test_preprocess_of_a_flower_photo_equals_the_val_dataset_item(tmp_path):
    root = fakedata.write_flower_photos(tmp_path / "data", per_class=3)
    _, val_files, _, classes = utils.split_image_folder(root, tmp_path / "split.json")
    dataset = utils.ImageFileDataset(val_files, classes, image_size=48)
    meta = dict(classes=classes, image_size=48, input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    transform = utils.BatchTransform(meta["mean"], meta["std"], meta["input_size"])
    sizes = set()
    for i, path in enumerate(dataset.files):
        image = utils.load_image(path)
        sizes.add(image.size)
        item, _ = dataset[i]
        assert item.dtype == torch.uint8 and item.shape == (3, 48, 48)
        assert torch.equal(utils.preprocess(image, meta), transform(item[None])), path.name
    assert (48, 48) not in sizes                                # every photo was resized


def test_a_big_photo_is_reduced_to_image_size_before_upscaling():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))   # 400x300
    meta = dict(classes=CLASSES, image_size=32, input_size=64, mean=MEAN, std=STD)
    got = utils.preprocess(photo, meta)
    small = utils.image_to_tensor(photo.resize((32, 32), Image.BILINEAR))
    assert torch.equal(got, utils.BatchTransform(MEAN, STD, 64)(small[None]))
    direct = utils.image_to_tensor(photo, 64)                  # straight to 64x64 would differ
    assert not torch.allclose(got, utils.BatchTransform(MEAN, STD)(direct[None]), atol=1e-3)


def test_image_to_tensor_is_uint8_and_resizes_only_when_needed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    tensor = utils.image_to_tensor(image)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 20, 30) and tensor.is_contiguous()
    assert torch.equal(tensor.permute(1, 2, 0), torch.from_numpy(np.array(image)))
    square = image.resize((16, 16))
    assert torch.equal(utils.image_to_tensor(square, 16), utils.image_to_tensor(square))
    assert utils.image_to_tensor(image, 16).shape == (3, 16, 16)


@pytest.mark.parametrize("drop", [["image_size"], ["std", "classes"], ["input_size"]])
def test_preprocess_names_missing_metadata(drop):
    meta = {k: v for k, v in META.items() if k not in drop}
    with pytest.raises(ValueError) as info:
        utils.preprocess(Image.new("RGB", (8, 8)), meta)
    for key in drop:
        assert repr(key) in str(info.value)
    with pytest.raises(ValueError, match="'input_size'"):
        utils.preprocess(Image.new("RGB", (8, 8)), {**META, "input_size": None})


def test_predict_uses_the_checkpoints_metadata(tmp_path):
    model = MeanColour()
    model.dummy = nn.Parameter(torch.zeros(1))
    path = utils.save_checkpoint(tmp_path / "m.pth", model, **META)
    meta = utils.load_checkpoint(path, model)
    top = utils.predict(model, Image.new("RGB", (300, 200), (0, 255, 0)), meta, topk=1)
    assert top[0][0] == "green" and len(top) == 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP", "ICO"])
def test_mutated_files_give_rgb_or_value_error(fmt):
    """Seeded random damage (changed bytes, cut tails) to a valid file: load_image returns an
    RGB image or raises ValueError, never any other exception."""
    import random
    import warnings
    rng = random.Random(fmt)
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)), fmt)
    for _ in range(60):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        if rng.random() < 0.3:
            damaged = damaged[:rng.randrange(1, len(damaged))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                assert utils.load_image(bytes(damaged)).mode == "RGB"
            except ValueError:
                pass


@pytest.mark.parametrize("source", [None, 3, 2.5, np.zeros((2, 2)), torch.zeros(3), "   ", "ftp://host/x.png",
                                    "file:///etc/passwd", "http://", "https://", "http://exa mple.com/x.png",
                                    "http://127.0.0.1:99999/x.png", "http://[/x.png", io.StringIO("text")])
def test_odd_sources_give_value_error(source):
    with pytest.raises(ValueError):
        utils.load_image(source, timeout=2)
