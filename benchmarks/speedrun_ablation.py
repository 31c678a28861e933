"""Speedrun.ipynb's section 10 on its own: the ablation's rows, or the full recipe trained from
other seeds (the seed-to-seed spread that the ablation's differences are read against).

    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/speedrun_ablation.py --output /tmp/ablation.json
    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/speedrun_ablation.py --seeds 1 2 3 --output /tmp/seeds.json

The notebook's code cells of sections 0-3 (settings, data, network, patch whitening, optimizer)
run as they are; of section 10, the cell that defines `train_variant` and `run_ablation`, with
RUN_ABLATION = 0 so that it only defines them. Sections 4-9 (the main training run, and the
test set it opens) are skipped: only the validation split is read, so a result of this script
may choose things. Every row trains from scratch for `--epochs` (the notebook's ABLATION_EPOCHS
by default), about seven minutes a row on a 2-core CPU. A `--seeds` row changes only the
training seed (initial weights, batch order, augmentation); the validation split and the
whitening images stay those of the notebook's SEED. The script never replaces an existing
`--output`; to make an ablation the course's, copy it to results/Speedrun-ablation.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")   # the data section draws a figure; nobody is there to see it

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from benchmarks import train_loop  # noqa: E402

NOTEBOOK = utils.REPO_DIR / "notebooks" / "Speedrun.ipynb"
SETUP_SECTIONS = {0, 1, 2, 3}


def setup_cells(notebook: pathlib.Path = NOTEBOOK) -> list[str]:
    """The sources of the code cells of sections 0-3, then of section 10's `run_ablation` cell,
    with IPython's magics made inert."""
    chosen = [source for _, section, source in train_loop.code_cells_by_section(notebook)
              if section in SETUP_SECTIONS or (section == 10 and "def run_ablation" in source)]
    if not any("def run_ablation" in source for source in chosen):
        raise LookupError(f"{notebook.name} has no section 10 cell defining run_ablation")
    return chosen


def notebook_setup() -> dict:
    """The notebook's namespace after its setup cells: data, whitening images, train_variant..."""
    namespace = {"__name__": "__main__"}
    for index, source in enumerate(setup_cells()):
        if "def run_ablation" in source:
            namespace["RUN_ABLATION"] = 0         # the cell then only defines, it trains nothing
        exec(compile(source, f"{NOTEBOOK.name} setup cell {index}", "exec"), namespace)
    return namespace


def seed_rows(notebook: dict, seeds: list[int], num_epochs: int) -> list[dict]:
    """The full recipe (the last ablation row's) trained from each training seed, on validation."""
    recipe = dict(notebook["PLAIN"])
    for _, changes in notebook["ABLATION_ROWS"]:
        recipe.update(changes)
    split_seed, rows = notebook["SEED"], []
    for seed in seeds:
        notebook["SEED"] = seed                   # train_variant seeds weights, batches and flips from it
        model, seconds = notebook["train_variant"](recipe, num_epochs)
        _, val_acc = utils.evaluate(utils.TTA(model, recipe["tta_level"]), notebook["val_loader"],
                                    notebook["criterion"])
        rows.append({"row": f"full recipe, training seed {seed}", "seed": seed, "val_acc": val_acc,
                     "seconds": seconds})
        print(f"{rows[-1]['row']:<42} validation {val_acc:6.2%}  {seconds:6.1f} s", flush=True)
    notebook["SEED"] = split_seed
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=pathlib.Path, required=True, help="JSON file to write (never replaced)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per row (default: ABLATION_EPOCHS)")
    parser.add_argument("--seeds", type=int, nargs="+", help="train the full recipe from these seeds instead")
    args = parser.parse_args(argv)
    if args.output.exists():
        parser.error(f"{args.output} exists: pass another --output (nothing is ever overwritten)")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")

    notebook = notebook_setup()
    num_epochs = args.epochs or notebook["ABLATION_EPOCHS"]
    rows = (seed_rows(notebook, args.seeds, num_epochs) if args.seeds
            else notebook["run_ablation"](num_epochs))
    measured = {"rows": rows, "epochs": num_epochs, "train_images": len(notebook["train_set"]),
                "val_images": len(notebook["val_set"]), "widths": list(notebook["WIDTHS"]),
                "device": utils._hardware(), "torch": notebook["torch"].__version__,
                "threads": notebook["torch"].get_num_threads(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if args.seeds and len(rows) > 1:
        accuracies = [row["val_acc"] for row in rows]
        measured.update(val_acc_mean=statistics.mean(accuracies), val_acc_std=statistics.stdev(accuracies))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(measured, indent=1) + "\n")
    print(f"wrote {args.output}")
    return measured


if __name__ == "__main__":
    main()
