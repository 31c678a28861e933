"""Every architecture at an equal CPU budget: each notebook's own recipe, run for the epochs that
fit in the same wall-clock training time on this machine, validation-chosen, test read once.

    DATA_DIR=/path/to/data .venv/bin/python benchmarks/equal_budget.py ResNet LeNet5 --minutes 30
    .venv/bin/python tools/make_tables.py add model/equal-budget/ResNet/ResNet_history.json --name ResNet \\
        --note "equal CPU budget: 30 min, float32, AVX512" --budget-minutes 30
    .venv/bin/python tools/make_tables.py          # the lab book's equal-budget table and figure

For each notebook:

1. A probe runs the notebook's sections 0-9 for two epochs on `--probe-images` training images
   (and as many validation images) and times the second, data pipeline and validation included
   (the first also pays one-time costs: memory, kernel choice); then again on twice as many.
2. The two probes' difference is the cost of the extra images, the rest of the smaller probe a
   cost every epoch pays once whatever its size (starting loader workers, writing checkpoints).
   The epochs that fit in the budget follow, scaled to 45,000 training and 5,000 validation images
   (an evaluated image costs about a third of a trained one); at least one.
3. The notebook's sections 0-9 then run with `EPOCHS` set to that number, so its schedule (one-
   cycle, cosine, warm-up and decay, steps) is fitted to those epochs exactly as a reader's
   `-p EPOCHS` would fit it (a setting counted in epochs, ViT's warm-up, keeps its share of the
   recipe). Section 10 and later are left out: they teach, they do not train the network that is
   tested. Test-time augmentation is off for every network: the test reads the plain network.

The history JSON and the executed notebook land in `--model-dir`; the script prints the epochs,
the budget, the training time the run actually took and the test accuracy section 5 read once.
A budget is a wall-clock budget only on a machine doing nothing else: run one network at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from unittest import mock

import nbformat
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from tools import notebook_code  # noqa: E402

NOTEBOOK_DIR = utils.REPO_DIR / "notebooks"
TRAIN_IMAGES, VAL_IMAGES = 45_000, 5_000     # CIFAR-10's training and validation splits in every notebook
EVAL_COST = 1 / 3                            # an evaluated image's cost, relative to a trained one
PROBE_EPOCHS = 2                             # the last one is timed
# Settings counted in epochs rather than as a share of the run: each keeps its share of the full recipe
# (ViT warms up for 5 of its 200 epochs), so that a short run still warms up and then decays.
EPOCH_SETTINGS = {"ViT": {"WARMUP_EPOCHS": 5 / 200}}
# No test-time augmentation for any network, so that the comparison is of what each learned in its
# training time (TTA would add up to 9 evaluation passes, half an hour for the slowest networks).
NO_TTA = {"TTA_LEVELS": [0], "TTA_LEVEL": 0}


def sections_0_to_9(name: str) -> nbformat.NotebookNode:
    """Notebook `name` without section 10 and what follows it: they teach, they do not train the
    network that is tested."""
    return notebook_code.sections(f"{name}.ipynb", range(10))


def run_notebook(name: str, out_dir: pathlib.Path, environment: dict, parameters: dict) -> dict:
    """Execute sections 0-9 of notebook `name` with papermill, test-time augmentation off; the
    history JSON it wrote."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    trimmed = out_dir / f"{name}-sections-0-9.ipynb"
    nbformat.write(sections_0_to_9(name), trimmed)
    settings = papermill.inspect_notebook(trimmed)
    parameters = {**{key: value for key, value in NO_TTA.items() if key in settings}, **parameters}
    with mock.patch.dict(os.environ, {**environment, "MODEL_DIR": str(out_dir)}):
        papermill.execute_notebook(trimmed, out_dir / f"{name}-executed.ipynb", parameters=parameters,
                                   cwd=str(NOTEBOOK_DIR), progress_bar=False)
    return json.loads((out_dir / f"{name}_history.json").read_text())


def full_epoch_seconds(small_probe_s: float, large_probe_s: float, probe_images: int,
                       train_images: int = TRAIN_IMAGES, val_images: int = VAL_IMAGES) -> float:
    """Seconds of one epoch of `train_images` with validation on `val_images` after it, from probe
    epochs of `probe_images` and of twice as many training images (each with as many validation
    images): a fixed cost per epoch plus a cost per image. Where noise puts the larger probe
    outside what that allows (no slower than the smaller, or more than twice as slow), all of its
    time counts as cost per image."""
    if min(small_probe_s, large_probe_s, probe_images) <= 0:
        raise ValueError(f"probe times and probe images must be positive, got {small_probe_s}, "
                         f"{large_probe_s}, {probe_images}")
    units = probe_images * (1 + EVAL_COST)                   # the extra work of the larger probe
    if small_probe_s < large_probe_s <= 2 * small_probe_s:
        seconds_per_unit = (large_probe_s - small_probe_s) / units
        fixed_s = small_probe_s - seconds_per_unit * units
    else:
        seconds_per_unit, fixed_s = large_probe_s / (2 * units), 0.0
    return fixed_s + seconds_per_unit * (train_images + EVAL_COST * val_images)


def epochs_that_fit(budget_s: float, epoch_s: float) -> int:
    """Whole epochs of `epoch_s` seconds that fit in `budget_s`; at least one."""
    if budget_s <= 0:
        raise ValueError(f"the budget must be positive, got {budget_s}")
    return max(1, math.floor(budget_s / epoch_s))


def run_at_budget(name: str, minutes: float, model_dir: pathlib.Path, probe_images: int, environment: dict) -> dict:
    probes = [run_notebook(name, model_dir / f"probe-{images}", {**environment, "SUBSET": str(images)},
                           {"EPOCHS": PROBE_EPOCHS, "RESUME": False}) for images in (probe_images, 2 * probe_images)]
    small, large = probes
    epoch_s = full_epoch_seconds(small["seconds"][-1], large["seconds"][-1], small["info"]["train_images"])
    epochs = epochs_that_fit(60 * minutes, epoch_s)
    took = "; ".join(f"{probe['info']['train_images']:,} images {', '.join(f'{s:.1f}' for s in probe['seconds'])} s"
                     for probe in probes)
    print(f"{name}: probe epochs of {took}, so {epochs} epoch(s) of about {epoch_s:,.0f} s fit in "
          f"{minutes:g} minutes (CPU capability {torch.backends.cpu.get_cpu_capability()})", flush=True)
    if epoch_s > 60 * minutes:
        print(f"{name}: not even one epoch fits in {minutes:g} minutes; it trains for one, over the budget", flush=True)
    scaled = {setting: share * epochs for setting, share in EPOCH_SETTINGS.get(name, {}).items()}
    start = time.perf_counter()
    history = run_notebook(name, model_dir, {**environment, "SUBSET": "0"},
                           {"EPOCHS": epochs, "RESUME": True, **scaled})
    wall = time.perf_counter() - start
    print(f"{name}: {epochs} epochs, training {sum(history['seconds']) / 60:.1f} min of the {minutes:g}-minute "
          f"budget ({wall / 60:.1f} min in all), validation {max(history['val_acc']):.2%}, "
          f"test {history['test_acc']:.2%} (read once)", flush=True)
    return history


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", choices=sorted(notebook_code.NETWORKS), metavar="NOTEBOOK")
    parser.add_argument("--minutes", type=float, default=30, help="training budget per network (default 30)")
    parser.add_argument("--model-dir", type=pathlib.Path, default=utils.REPO_DIR / "model" / "equal-budget")
    parser.add_argument("--probe-images", type=int, default=2_250, help="training images of the smaller probe (the larger has twice as many)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.probe_images <= 0:
        parser.error("--minutes and --probe-images must be positive")
    environment = {"DATA_DIR": str(utils.env_path("DATA_DIR", utils.REPO_DIR / "data")),
                   "RUNS_DIR": str(args.model_dir / "runs")}
    for name in args.notebooks:
        run_at_budget(name, args.minutes, args.model_dir.resolve() / name, args.probe_images, environment)


if __name__ == "__main__":
    main()
