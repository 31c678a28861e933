"""The README's results: the results table and the side-by-side comparison, generated from results/.

Each run is a training history JSON written by `utils.train` (beside its checkpoint, with the
test accuracy the notebook measured once, in section 5, on the epoch validation chose), copied
here with `add`, which also records what the run was (a note, whether it followed the
notebook's full recipe) and copies its plot. Only measured runs become rows; a notebook
without a full-recipe run gets a row that says so.

`measure` writes results/throughput.json: each notebook's network (loaded from its notebook, as
benchmarks/train_loop.py does), its parameters, its multiply-adds per image (torchinfo) and its
training images/s on this machine's CPU, with the settings `utils.train` uses there (channels_last).
The comparison table and results/comparison.png put these beside each notebook's measured run;
whatever is not measured says so.

    python results/make_table.py add model/AlexNet-32_history.json --name AlexNet-32 \
        --note "full recipe: 20 epochs" --full-recipe --plot model/AlexNet-32_history.png
    python results/make_table.py measure    # about 3 to 5 minutes on 2 cores; --help for options
    python results/make_table.py            # rewrite both tables in README.md and the figure
"""
import argparse
import json
import math
import os
import pathlib
import shutil
import sys
from datetime import datetime, timezone

import torch
import torchinfo
from matplotlib.figure import Figure

RESULTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(RESULTS.parent))
import utils  # noqa: E402
from benchmarks import train_loop  # noqa: E402

README = RESULTS.parent / "README.md"
THROUGHPUT = "throughput.json"          # in RESULTS, written by `measure`
FIGURE = "comparison.png"               # in RESULTS, written with the tables
START, END = "<!-- results:start -->", "<!-- results:end -->"
COMPARISON_START, COMPARISON_END = "<!-- comparison:start -->", "<!-- comparison:end -->"
OTHER_DATA_SETS = {"AlexNet-Flowers": "flower_photos, 5 classes"}   # every other notebook: CIFAR-10
NOTEBOOK_ORDER = ["CustomCNN", "LeNet5", "AlexNet-32", "AlexNet-227", "ZFNet", "VGG16", "ResNet", "Speedrun", "AlexNet-Flowers"]
HEADER = ["| notebook | run | epochs | validation accuracy (chosen epoch) | test accuracy (once) "
          "| seconds per epoch | hardware | date |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
NOT_MEASURED = "not measured"
MEASURE_STEPS = (5, 3)                  # timed steps per round: networks of up to 64 px, larger ones
MEASURE_ROUNDS = 3                      # rounds; images/s of the median round


# ---- runs: `add` and the results table -------------------------------------------------------

def add(history_path: pathlib.Path, name: str, note: str, full_recipe: bool, plot: pathlib.Path | None) -> pathlib.Path:
    if plot and not plot.is_file():                          # checked before anything is written
        sys.exit(f"{plot}: no such plot")
    history = json.loads(history_path.read_text())
    if not history.get("epoch"):
        sys.exit(f"{history_path}: no completed epochs")
    if "val_acc" not in history:
        sys.exit(f"{history_path}: not a history of utils.train with a validation split")
    history["info"].update(name=name, note=note, full_recipe=full_recipe)
    started = history["info"]["started"]                    # e.g. 2026-11-24T00:29:54+00:00
    stem = f"{name}-{started[:10]}-{started[11:16].replace(':', '')}-{len(history['epoch'])}ep"
    target = RESULTS / f"{stem}.json"
    if target.exists():
        sys.exit(f"{target} exists already: a run is added once")
    target.write_text(json.dumps(history, indent=1) + "\n")
    if plot:
        shutil.copyfile(plot, RESULTS / f"{stem}.png")
    return target


def history_of(run: dict) -> utils.History:
    return utils.History(**{k: v for k, v in run.items() if k in utils.History.__dataclass_fields__})


def row(name: str, run: dict) -> str:
    history = history_of(run)
    test = f"{history.test_acc:.2%}" if history.test_acc is not None else "not measured"
    seconds = sum(history.seconds) / len(history)
    return (f"| {name} | {history.info['note']} | {len(history)} | {history.best_val_acc:.2%} "
            f"(epoch {history.best_epoch}) | {test} | {seconds:,.0f} | {history.info['device']} "
            f"| {history.info['started'][:10]} |")


def rows() -> list[str]:
    lines = list(HEADER)
    for name in NOTEBOOK_ORDER:
        runs = utils.measured_runs(name)
        lines += [row(name, run) for run in runs]
        if not any(run["info"].get("full_recipe") for run in runs):
            lines.append(f"| {name} | full recipe: not yet measured | | | | | | |")
    return lines


# ---- measure: parameters, multiply-adds and training images/s of every network ---------------

def mult_adds(model: torch.nn.Module, size: int) -> int:
    """Multiply-adds of one forward pass of one size x size image, as torchinfo counts them."""
    return torchinfo.summary(model, input_size=(1, 3, size, size), verbose=0, device="cpu").total_mult_adds


def measure_network(name: str, batch_size: int | None, steps: int | None, rounds: int, warmup: int) -> dict:
    notebook, class_name, kwargs, size = train_loop.NETWORKS[name]
    small = size <= train_loop.SMALL_INPUT
    batch_size = batch_size or train_loop.CL_BATCH_SIZE[0 if small else 1]
    steps = steps or MEASURE_STEPS[0 if small else 1]
    torch.manual_seed(0)
    model = train_loop.notebook_network(notebook, class_name)(**kwargs)
    row = {"parameters": utils.count_parameters(model), "mult_adds": mult_adds(model, size),
           "input_size": size, "batch_size": batch_size, "steps": steps}
    batches = train_loop.random_batches(steps, batch_size, size, kwargs["num_classes"])
    row["images_per_s"] = train_loop.training_images_per_s(model, batches, rounds=rounds, warmup=warmup)
    print(f"{name}: {row['parameters']:,} parameters, {row['mult_adds']:,} multiply-adds per image, "
          f"{row['images_per_s']:,.1f} training images/s (batch {batch_size} x {steps} steps)")
    return row


def measure(networks, batch_size: int | None = None, steps: int | None = None, rounds: int = MEASURE_ROUNDS,
            warmup: int = train_loop.CL_WARMUP, threads: int = 0, path: pathlib.Path | None = None) -> dict:
    """Measure `networks` (names of train_loop.NETWORKS) and write them to `path` (results/throughput.json)."""
    if threads:
        torch.set_num_threads(threads)
    measured = {
        "machine": utils._hardware() if not torch.cuda.is_available() else utils._hardware() + " (timed on its CPU)",
        "torch": torch.__version__, "date": f"{datetime.now(timezone.utc):%Y-%m-%d}",
        "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 1),
        "rounds": rounds, "warmup": warmup, "memory_format": "channels_last",
        "networks": {name: measure_network(name, batch_size, steps, rounds, warmup) for name in networks}}
    path = path or RESULTS / THROUGHPUT
    path.write_text(json.dumps(measured, indent=1) + "\n")
    return measured


# ---- the comparison: one row per notebook, and the figure -----------------------------------

def throughput() -> dict:
    path = RESULTS / THROUGHPUT
    return json.loads(path.read_text()) if path.exists() else {"networks": {}}


def chosen_run(name: str) -> dict | None:
    """The run the comparison shows for notebook `name`: of its full-recipe runs if it has any,
    else of all its measured runs, the one with the highest validation accuracy (the test set
    chooses nothing); None when it has no measured run."""
    runs = utils.measured_runs(name)
    full = [run for run in runs if run["info"].get("full_recipe")]
    return max(full or runs, key=lambda run: max(run["val_acc"]), default=None)


def run_cells(run: dict | None) -> list[str]:
    """Validation accuracy, test accuracy and budget of `run`, formatted as in the results table."""
    if run is None:
        return [NOT_MEASURED] * 3
    history = history_of(run)
    test = f"{history.test_acc:.2%}" if history.test_acc is not None else NOT_MEASURED
    seconds = sum(history.seconds) / len(history)
    budget = (f"{len(history)} epochs x {seconds:,.0f} s on {history.info['device']}, "
              f"{history.info['started'][:10]}: {history.info['note']}")
    return [f"{history.best_val_acc:.2%} (epoch {history.best_epoch})", test, budget]


def network_cells(network: dict | None) -> list[str]:
    """Parameters, multiply-adds per image and training images/s from throughput.json."""
    if network is None:
        return [NOT_MEASURED] * 3
    mult_adds_m = network["mult_adds"] / 1e6
    return [f"{network['parameters']:,}", f"{mult_adds_m:,.{2 if mult_adds_m < 10 else 0}f} M",
            f"{network['images_per_s']:,.1f} (batch {network['batch_size']})"]


def comparison() -> list[str]:
    measured = throughput()
    machine = measured.get("machine", "machine: not measured")
    lines = [f"| notebook | parameters | multiply-adds per image | training images/s ({machine}) "
             f"| validation accuracy (chosen epoch) | test accuracy (once) | budget: epochs x seconds per epoch, run |",
             "| --- | ---: | ---: | ---: | --- | --- | --- |"]
    for name in NOTEBOOK_ORDER:
        cells = network_cells(measured["networks"].get(name)) + run_cells(chosen_run(name))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if measured["networks"]:
        lines += ["", f"Training images/s: `make_table.py measure` on {measured['date']}, torch {measured['torch']}, "
                      f"{measured['threads']} thread(s), load average {measured['load_average']}: training steps "
                      f"on random input in channels_last, median of {measured['rounds']} rounds."]
    return lines


def write_figure(path: pathlib.Path | None = None) -> pathlib.Path:
    """Test accuracy against multiply-adds per image, one labelled point per network whose run
    has a test accuracy and whose multiply-adds are measured; the others listed in a note."""
    networks = throughput()["networks"]
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    points, no_test, no_size = {}, [], []
    for name in NOTEBOOK_ORDER:
        run = chosen_run(name)
        if run is None or run.get("test_acc") is None:
            no_test.append(name)
        elif name not in networks:
            no_size.append(name)
        else:
            points[name] = (networks[name]["mult_adds"], 100 * run["test_acc"], len(run["epoch"]))
    for name, (x, y, epochs) in points.items():
        other_task = name in OTHER_DATA_SETS                 # not CIFAR-10: another task, a hollow marker
        axes.plot(x, y, "o", color="tab:blue", fillstyle="none" if other_task else "full")
        below = any(0 < other_y - y < 4 and abs(math.log10(other_x / x)) < 0.5     # a close point above:
                    for other, (other_x, other_y, _) in points.items() if other != name)   # its label has the top
        axes.annotate(f"{name}, {epochs} epoch{'s' if epochs != 1 else ''}"
                      + (f"\n({OTHER_DATA_SETS[name]})" if other_task else ""), (x, y),
                      xytext=(5, -5 if below else 5), textcoords="offset points", fontsize=9,
                      va="top" if below else "baseline")
    axes.set_xscale("log")
    if points:
        xs, ys = [x for x, _, _ in points.values()], [y for _, y, _ in points.values()]
        axes.set(xlim=(min(xs) / 3, max(xs) * 10), ylim=(max(0, min(ys) - 5), min(100, max(ys) + 5)))
    else:
        axes.set(xlim=(1e5, 1e10), ylim=(0, 100))
    axes.set(xlabel="multiply-adds per image (torchinfo)", ylabel="test accuracy, %",
             title="The course's networks: test accuracy of the validation-chosen epoch, measured once")
    axes.title.set_fontsize(10)
    axes.grid(True, which="major", alpha=0.3)
    note = [f"not measured: {', '.join(no_test)}"] if no_test else []
    note += [f"multiply-adds not measured: {', '.join(no_size)}"] if no_size else []
    if note:                                            # below the x label, inside the layout
        axes.annotate("\n".join(note), (0, 0), xycoords="axes fraction", xytext=(0, -40),
                      textcoords="offset points", va="top", fontsize=9, annotation_clip=False)
    path = path or RESULTS / FIGURE
    figure.savefig(path, dpi=100)
    return path


# ---- README.md --------------------------------------------------------------------------------

def section_in_readme(start: str, end: str) -> list[str]:
    text = README.read_text()
    if start not in text or end not in text:
        sys.exit(f"{README} lacks the markers {start} and {end}")
    return text.split(start, 1)[1].split(end, 1)[0].strip().splitlines()


def table_in_readme() -> list[str]:
    return section_in_readme(START, END)


def comparison_in_readme() -> list[str]:
    return section_in_readme(COMPARISON_START, COMPARISON_END)


def write_section(start: str, end: str, lines: list[str]) -> None:
    section_in_readme(start, end)                       # exits when the markers are missing
    text = README.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)


def write_table() -> None:
    write_section(START, END, rows())


def write_all() -> None:
    """Everything the README shows from results/: the results table, the comparison, the figure."""
    write_table()
    write_section(COMPARISON_START, COMPARISON_END, comparison())
    write_figure()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    add_parser = sub.add_parser("add", help="copy a run's history into results/")
    add_parser.add_argument("history", type=pathlib.Path)
    add_parser.add_argument("--name", required=True, choices=NOTEBOOK_ORDER)
    add_parser.add_argument("--note", required=True)
    add_parser.add_argument("--full-recipe", action="store_true")
    add_parser.add_argument("--plot", type=pathlib.Path)
    measure_parser = sub.add_parser("measure", help=f"write results/{THROUGHPUT} (then run without a command)")
    measure_parser.add_argument("--networks", nargs="+", choices=list(train_loop.NETWORKS),
                                default=list(train_loop.NETWORKS), help="default: all")
    measure_parser.add_argument("--batch-size", type=int, default=None,
                                help=f"default: {train_loop.CL_BATCH_SIZE[0]} for networks of up to "
                                     f"{train_loop.SMALL_INPUT} px, {train_loop.CL_BATCH_SIZE[1]} for larger ones")
    measure_parser.add_argument("--steps", type=int, default=None,
                                help=f"timed training steps per round (default: {MEASURE_STEPS[0]} for networks "
                                     f"of up to {train_loop.SMALL_INPUT} px, {MEASURE_STEPS[1]} for larger ones)")
    measure_parser.add_argument("--rounds", type=int, default=MEASURE_ROUNDS, help="rounds; the median counts")
    measure_parser.add_argument("--warmup", type=int, default=train_loop.CL_WARMUP, help="untimed steps first")
    measure_parser.add_argument("--threads", type=int, default=0,
                                help="torch threads (default 0: torch's default, as utils.train runs)")
    measure_parser.add_argument("--output", type=pathlib.Path, default=RESULTS / THROUGHPUT)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "measure":
        if args.output == RESULTS / THROUGHPUT and set(args.networks) != set(train_loop.NETWORKS):
            sys.exit(f"measuring only {', '.join(args.networks)} would drop the other networks from "
                     f"{args.output}: measure all of them, or pass --output for a partial measurement")
        measure(args.networks, args.batch_size, args.steps, args.rounds, args.warmup, args.threads, args.output)
        print(f"wrote {args.output}; now run: .venv/bin/python results/make_table.py")
        return
    if args.command == "add":
        print("wrote", add(args.history, args.name, args.note, args.full_recipe, args.plot))
    write_all()


if __name__ == "__main__":
    main()
