"""pytest plugin (loaded by pytest.ini): quick mode for the whole suite, and the check that every
notebook learns.

Before any test runs it generates the offline data sets, serves one image on 127.0.0.1 and
sets the environment variables that every notebook's settings cell reads, so that nbval
executes each notebook in seconds, offline, without touching the repository's data/ or model/.
Each notebook gets the epochs and images that let it learn the generated data within the suite's
time (`QUICK_RUNS`), set just before nbval starts its kernel; where a setting of the recipe
itself must change for that, it is injected after the notebook's `parameters` cell, as
papermill's `-p` would do.

After the last cell of each notebook, one more test item, `<notebook>::learned`, reads what the
notebook recorded and fails unless it trained the epochs it was given, tested the checkpoint
that validation chose, and reached a test accuracy of three times chance: a notebook that
silently stops learning (a zero learning rate, labels shuffled against their images, a frozen
network) fails the suite.
"""
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests import fakedata

QUICK_SETTINGS = {
    "RUN_ABLATION": "1",   # Speedrun.ipynb: run section 10's ablation instead of showing results/
}
# (EPOCHS, SUBSET, other settings) per notebook. The generated CIFAR-10 has 360 training, 40
# validation and 100 test images (SUBSET 0: all of them). Learning needs optimizer steps, and a
# step costs what its batch costs, so a large network gets a few images (each epoch one small
# step) and many epochs; BatchNorm's running statistics need a few dozen steps to catch up with
# the weights. VGG-16 at its recipe's peak learning rate collapses within a few steps on these
# images (not on CIFAR-10's), and ZFNet's AdamW at 1e-3 sticks to one class for most of a short
# run: their quick runs learn at a tenth of it. MobileNetV2 takes batches of 8 at 0.02, so that
# 32 images give 4 steps an epoch (single steps of 32 at 0.1 left validation at chance); ViT keeps
# its network but skips AutoAugment and the warm-up, which would take most of 6 epochs; GoogLeNet
# evaluates without test-time augmentation and DenseNet times section 10 on one tiny step, their
# evaluation costing as much as their training; Speedrun's ablation trains each of its rows for one
# epoch with one seed (the two-seed path runs in tests/test_benchmarks.py). Each setting learns
# with a margin over LEARNED_FACTOR x chance: measured in the lab book, "Quick mode".
QUICK_RUNS = {"CustomCNN": (4, 0, {}), "LeNet5": (30, 0, {}), "AlexNet-32": (80, 0, {}),
              "AlexNet-227": (10, 32, {}), "ZFNet": (12, 32, {"LEARNING_RATE": 1e-4}),
              "VGG16": (30, 64, {"MAX_LR": 0.01}), "ResNet": (60, 64, {}),
              "Speedrun": (30, 0, {"ABLATION_EPOCHS": 1, "ABLATION_SEEDS": [0]}),
              "AlexNet-Flowers": (8, 0, {}), "DDP": (30, 0, {}),
              "GoogLeNet": (12, 16, {"TTA_LEVELS": [0]}),
              "DenseNet": (12, 16, {"SPEED_BATCH_SIZE": 2, "SPEED_WARMUP": 1, "SPEED_STEPS": 1}),
              "MobileNetV2": (16, 32, {"BATCH_SIZE": 8, "LEARNING_RATE": 0.02}),
              "ViT": (6, 32, {"BATCH_SIZE": 16, "WARMUP_EPOCHS": 0, "AUTOAUGMENT": False, "AMP": True})}
DEFAULT_RUN = (1, 200, {})             # a notebook not listed above
LEARNED_FACTOR = 3     # the quick run's test accuracy must reach this many times chance
FLOWER_PHOTOS_PER_CLASS = 24   # 120 generated photos: 96 training, 12 validation, 12 test


def write_quick_data(data_dir: pathlib.Path) -> None:
    """The generated CIFAR-10 and flower_photos that quick mode trains on."""
    fakedata.write_cifar10_folder(data_dir)
    fakedata.write_flower_photos(data_dir, per_class=FLOWER_PHOTOS_PER_CLASS)


def pytest_configure(config):
    root = pathlib.Path(tempfile.mkdtemp(prefix="course-quickmode-"))
    config._quickmode_root = root
    data_dir = root / "data"
    write_quick_data(data_dir)
    served = root / "served"
    served.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(fakedata.class_image(3, 10, (120, 160), rng)).save(served / "cat.jpg")
    base_url, config._quickmode_server = fakedata.serve_directory(served)
    os.environ.update(QUICK_SETTINGS)
    os.environ.update({
        "EPOCHS": "1", "SUBSET": "200",        # for anything that runs a notebook outside nbval
        "DATA_DIR": str(data_dir),
        "MODEL_DIR": str(root / "model"),
        "RUNS_DIR": str(root / "runs"),
        "PREDICT_URL": f"{base_url}/cat.jpg",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",   # never through a proxy
    })


def pytest_unconfigure(config):
    server = getattr(config, "_quickmode_server", None)
    if server is not None:
        server.shutdown()
    root = getattr(config, "_quickmode_root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def notebook_name(item) -> str | None:
    path = pathlib.Path(str(item.path))
    return path.stem if path.suffix == ".ipynb" else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before nbval starts a notebook's kernel (in the setup of its first cell), its quick run."""
    name = notebook_name(item)
    if name is not None:
        epochs, subset, _ = QUICK_RUNS.get(name, DEFAULT_RUN)
        os.environ.update(EPOCHS=str(epochs), SUBSET=str(subset))


class LearnedCheck(pytest.Item):
    """What a notebook's quick run recorded in MODEL_DIR: its history and its final checkpoint."""

    def runtest(self):
        name = notebook_name(self)
        model_dir = pathlib.Path(os.environ["MODEL_DIR"])
        history_path, final_path = model_dir / f"{name}_history.json", model_dir / f"{name}.pth"
        assert history_path.is_file() and final_path.is_file(), \
            f"{name} left no {history_path.name} and {final_path.name} in MODEL_DIR (NAME = \"{name}\"?)"
        history = json.loads(history_path.read_text())
        meta = torch.load(final_path, weights_only=True)["meta"]
        epochs, subset, _ = QUICK_RUNS.get(name, DEFAULT_RUN)
        assert len(history["epoch"]) == epochs, "the notebook ignored EPOCHS"
        assert not subset or history["info"]["train_images"] <= subset, "the notebook ignored SUBSET"
        best_epoch = history["epoch"][int(np.argmax(history["val_acc"]))]
        assert meta["epoch"] == best_epoch and meta["test_acc"] == history["test_acc"], \
            "the model tested and saved is not the epoch validation chose"
        chance = 1 / len(meta["classes"])
        assert history["test_acc"] >= LEARNED_FACTOR * chance, (
            f"{name} did not learn: test accuracy {history['test_acc']:.1%} on the generated data after "
            f"{len(history['epoch'])} epochs, chance {chance:.0%} (training accuracy {history['train_acc'][-1]:.1%})")

    def repr_failure(self, excinfo):
        return str(excinfo.value)          # the reason, without pytest's hook frames

    def reportinfo(self):
        return self.path, None, f"{notebook_name(self)}: learned"


def inject_settings(item, settings: dict) -> None:
    """Append `settings` to the source nbval will run for the notebook's `parameters` cell: the
    same override papermill's `-p NAME VALUE` makes in the cell it injects after that one."""
    if settings and "parameters" in item.cell.metadata.get("tags", []):
        lines = "".join(f"\n{name} = {value!r}   # quick mode (tests/quickmode.py)" for name, value in settings.items())
        item.cell.source += "\n" + lines


def pytest_collection_modifyitems(session, config, items):
    """Each notebook's quick settings into its parameters cell, and after its last cell its
    LearnedCheck."""
    position = {}
    for index, item in enumerate(items):
        if notebook_name(item) is not None:
            position[item.parent] = index
            if hasattr(item, "cell"):
                inject_settings(item, QUICK_RUNS.get(notebook_name(item), DEFAULT_RUN)[2])
    for parent, index in sorted(position.items(), key=lambda pair: -pair[1]):
        items.insert(index + 1, LearnedCheck.from_parent(parent, name="learned"))
