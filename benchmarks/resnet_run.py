"""A full-length ResNet.ipynb run on the CPU, in bfloat16, stopping before the test set.

    EPOCHS=120 DATA_DIR=/tmp/realdata MODEL_DIR=/tmp/resnet/model RUNS_DIR=/tmp/resnet/runs \
        nohup .venv/bin/python benchmarks/resnet_run.py --name ResNet120 > /tmp/resnet/log.txt &
    ... RESUME=1 .venv/bin/python benchmarks/resnet_run.py --name ResNet120    # after an interruption
    ... RESUME=1 TEST=1 .venv/bin/python benchmarks/resnet_run.py --name ResNet120   # test, once

It runs the notebook's own code cells of sections 0-5 in order (settings, data, network,
training, the validation-only choice of the test-time augmentation level), so the recipe is the
notebook's, with two changes a long CPU run wants: `utils.train` runs in bfloat16 autocast
(`amp=True`; 1.5x float32's training rate on a CPU with avx512_bf16, measured in stop 22), and
the settings `--set NAME=VALUE` gives (a Python literal) replace the settings cell's. The
environment overrides the notebook reads (EPOCHS, SUBSET, DATA_DIR, MODEL_DIR, RUNS_DIR) work
as in the notebook. The test cell, and everything after it, runs only with TEST=1: the test set is
read once, after the validation split has chosen.
"""
from __future__ import annotations

import argparse
import ast
import functools
import os
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from benchmarks.train_loop import NOTEBOOK_DIR, code_cells_by_section  # noqa: E402

NOTEBOOK = NOTEBOOK_DIR / "ResNet.ipynb"
LAST_SECTION = 5                                    # sections 0-5: up to the test-time choice
TEST_CELL = "test_loader = utils.make_loader(test_set"


def parse_settings(pairs: list[str]) -> dict:
    """`["CUTOUT=0", "NAME='x'"]` -> {"CUTOUT": 0, "NAME": "x"}; a value is a Python literal or a
    bare word (taken as a string)."""
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier() or not name.isupper():
            raise SystemExit(f"--set wants NAME=VALUE with an upper-case setting name, got {pair!r}")
        try:
            settings[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[name] = value
    return settings


def run(settings: dict, test: bool, amp: bool = True) -> dict:
    """The notebook's namespace after its cells of sections 0-5 (the test cell only when `test`),
    with `utils.train` called with `amp` meanwhile."""
    train = utils.train
    utils.train = functools.partial(train, amp=amp)
    try:
        return run_cells(settings, test)
    finally:
        utils.train = train


def run_cells(settings: dict, test: bool) -> dict:
    cells = code_cells_by_section(NOTEBOOK)
    if not any("EPOCHS = " in source for _, _, source in cells):
        raise SystemExit(f"{NOTEBOOK.name} has no settings cell (a cell assigning EPOCHS)")
    namespace = {"__name__": "__main__"}
    for index, section, source in cells:
        if section > LAST_SECTION or (TEST_CELL in source and not test):
            break
        exec(compile(source, f"{NOTEBOOK.name} cell {index}", "exec"), namespace)
        if "EPOCHS = " in source:                   # the settings cell
            unknown = sorted(set(settings) - set(namespace))
            if unknown:
                raise SystemExit(f"--set names settings the notebook lacks: {', '.join(unknown)}")
            namespace.update(settings)
            if "SEED" in settings:                  # the settings cell seeded with its own
                utils.seed_everything(settings["SEED"])
            print("settings changed:", settings)
    return namespace


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="file names of checkpoints and histories")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="settings that replace the notebook's, e.g. CUTOUT=0")
    args = parser.parse_args(argv)
    settings = parse_settings(args.set) | {"NAME": args.name, "RESUME": os.environ.get("RESUME") == "1"}
    namespace = run(settings, test=os.environ.get("TEST") == "1")
    print("validation accuracy by TTA level:", namespace.get("val_acc_by_level"))
    if "test_acc" in namespace:
        print(f"test accuracy: {namespace['test_acc']:.2%}")
    return namespace


if __name__ == "__main__":
    main()
