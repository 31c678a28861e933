"""How long each notebook takes in quick mode on this machine: the whole notebook, executed with
papermill on the suite's generated data and with the suite's quick settings (tests/quickmode.py),
written to results/notebook-times.json for the README's course map.

    .venv/bin/python benchmarks/notebook_times.py            # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/notebook_times.py LeNet5     # some notebooks only (--output needed)
    .venv/bin/python tools/make_tables.py                    # then regenerate the tables
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from datetime import datetime, timezone
from unittest import mock

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from tests import quickmode  # noqa: E402

OUTPUT = utils.RESULTS_DIR / "notebook-times.json"
NOTEBOOK_DIR = utils.REPO_DIR / "notebooks"


def time_notebook(name: str, work_dir: pathlib.Path) -> dict:
    """Seconds to execute notebook `name` in quick mode (kernel start included), and what it reached."""
    import papermill

    epochs, subset, parameters = quickmode.QUICK_RUNS[name]
    settings = {**quickmode.QUICK_SETTINGS, "EPOCHS": str(epochs), "SUBSET": str(subset),
                "DATA_DIR": str(work_dir / "data"), "MODEL_DIR": str(work_dir / name),
                "RUNS_DIR": str(work_dir / "runs"), "PREDICT_URL": "http://127.0.0.1:9/unreachable.jpg"}
    start = time.perf_counter()
    with mock.patch.dict(os.environ, settings):           # the settings cell reads them from here
        papermill.execute_notebook(NOTEBOOK_DIR / f"{name}.ipynb", work_dir / f"{name}.ipynb",
                                   parameters=parameters, cwd=str(NOTEBOOK_DIR), progress_bar=False)
    seconds = time.perf_counter() - start
    history = json.loads((work_dir / name / f"{name}_history.json").read_text())
    print(f"{name}: {seconds:.1f} s, {len(history['epoch'])} epochs, test accuracy {history['test_acc']:.2%}")
    return {"seconds": round(seconds, 1), "epochs": len(history["epoch"]), "subset": subset,
            "settings": parameters, "train_images": history["info"]["train_images"], "test_acc": history["test_acc"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", default=list(quickmode.QUICK_RUNS), help="default: all")
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.output == OUTPUT and set(args.notebooks) != set(quickmode.QUICK_RUNS):
        parser.error(f"timing only some notebooks would drop the others from {OUTPUT}: pass --output")
    with tempfile.TemporaryDirectory(prefix="notebook-times-") as scratch:
        work_dir = pathlib.Path(scratch)
        quickmode.write_quick_data(work_dir / "data")
        measured = {"machine": utils.hardware(), "torch": torch.__version__,
                    "date": f"{datetime.now(timezone.utc):%Y-%m-%d}",
                    "notebooks": {name: time_notebook(name, work_dir) for name in args.notebooks}}
    args.output.write_text(json.dumps(measured, indent=1) + "\n")
    print(f"wrote {args.output}")
    return measured


if __name__ == "__main__":
    main()
