"""utils.load_image / utils.predict: every image mode, every bad input, URLs served on 127.0.0.1."""
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

CLASSES = ["red", "green", "blue"]


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
    return utils.predict(model, source, CLASSES, 32, (0.5,) * 3, (0.5,) * 3, **options)


def test_predict_returns_sorted_top_k_pairs():
    top = predict(Image.new("RGB", (50, 40), (0, 0, 255)), topk=2)
    assert [name for name, _ in top] == ["blue", "green"] or top[0][0] == "blue"
    assert len(top) == 2 and top[0][1] >= top[1][1] and 0.9 < top[0][1] <= 1
    assert len(predict(Image.new("RGB", (8, 8)), topk=10)) == 3


def rgb_pixel(image):
    return utils.load_image(encode(image) if image.mode not in ("CMYK", "I;16", "F") else image).getpixel((0, 0))


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
])
def test_every_valid_mode_becomes_8_bit_rgb(image, expected):
    loaded = rgb_pixel(image)
    assert loaded == pytest.approx(expected, abs=2)


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


@pytest.mark.parametrize("url, reason", [
    ("https://[::1", "not a valid URL"),
    ("http://127.0.0.1:abc/x.png", "nonnumeric port"),
    ("http://", "could not connect"),
])
def test_malformed_urls_name_the_url(url, reason):
    with pytest.raises(ValueError) as err:
        utils.load_image(url, timeout=2)
    assert str(err.value).startswith(url) and reason in str(err.value)


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


@pytest.mark.parametrize("path, options, reason", [
    ("/missing.png", {}, "HTTP error 404"),
    ("/page.html", {}, "text/html, not an image"),
    ("/slow.png", {"timeout": 1}, "timed out after 1 s"),
    ("/trickle.png", {"timeout": 1}, "timed out after 1 s"),
    ("/huge-declared.png", {}, "1,000,000,000 bytes, over the"),
    ("/endless.png", {"max_bytes": 200_000}, "passed the 200,000-byte limit"),
    ("/empty.png", {}, "empty"),
    ("/garbage.png", {}, "not a readable image"),
])
def test_bad_urls_raise_value_error_naming_url_and_reason(server, path, options, reason):
    url = f"{server}{path}"
    with pytest.raises(ValueError) as err:
        predict(url, **options)
    assert str(err.value).startswith(url) and reason in str(err.value)


def test_connection_refused_names_the_url():
    with pytest.raises(ValueError, match=r"http://127.0.0.1:9/x.png: could not connect"):
        utils.load_image("http://127.0.0.1:9/x.png", timeout=2)


def test_print_top_k_prints_a_row_per_class(capsys):
    utils.print_top_k([("cat", 0.75), ("automobile", 0.25)])
    assert capsys.readouterr().out.splitlines() == ["       cat:  75.0%", "automobile:  25.0%"]


def test_show_prediction_titles_the_image_and_prints_the_table(capsys, monkeypatch):
    import matplotlib.pyplot as plt
    titles = []
    monkeypatch.setattr(plt, "show", lambda: titles.append(plt.gca().get_title()))
    utils.show_prediction(Image.new("RGB", (8, 8)), [("cat", 0.75), ("dog", 0.25)], "my photo")
    assert titles == ["cat (75.0%)"]
    assert capsys.readouterr().out.splitlines() == ["my photo", "cat:  75.0%", "dog:  25.0%"]
