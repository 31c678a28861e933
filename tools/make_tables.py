"""The course's tables, generated from results/: the course map in README.md, the results table
and the side-by-side comparison in the lab book (results/README.md), and results/comparison.png.

Each run is a training history JSON written by `utils.train` (beside its checkpoint, with the
test accuracy the notebook measured once, in section 5, on the epoch validation chose), copied
into results/ with `add`, which also records what the run was (a note, whether it followed the
notebook's full recipe) and copies its plot. Only measured runs become rows; a notebook
without a full-recipe run gets a row that says so. The comparison also reads
results/throughput.json (benchmarks/throughput.py) and the course map results/notebook-times.json
(benchmarks/notebook_times.py); whatever is not measured says so.

    python tools/make_tables.py add model/AlexNet-32_history.json --name AlexNet-32 \
        --note "full recipe: 20 epochs" --full-recipe --plot model/AlexNet-32_history.png
    python tools/make_tables.py            # rewrite every generated table and the figure
"""
import argparse
import json
import math
import pathlib
import shutil
import statistics
import sys

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402

RESULTS = REPO / "results"
README = REPO / "README.md"                 # the course map
LAB_BOOK = RESULTS / "README.md"            # the results table and the comparison
THROUGHPUT = "throughput.json"              # in RESULTS, written by benchmarks/throughput.py
NOTEBOOK_TIMES = "notebook-times.json"      # in RESULTS, written by benchmarks/notebook_times.py
FIGURE = "comparison.png"                   # in RESULTS, written with the tables
EQUAL_BUDGET_FIGURE = "equal-budget.png"    # in RESULTS, written with the tables
START, END = "<!-- results:start -->", "<!-- results:end -->"
COMPARISON_START, COMPARISON_END = "<!-- comparison:start -->", "<!-- comparison:end -->"
MAP_START, MAP_END = "<!-- course-map:start -->", "<!-- course-map:end -->"
QUICK_START, QUICK_END = "<!-- quick-mode:start -->", "<!-- quick-mode:end -->"
BUDGET_START, BUDGET_END = "<!-- equal-budget:start -->", "<!-- equal-budget:end -->"
OTHER_DATA_SETS = {"AlexNet-Flowers": "flower_photos, 5 classes"}   # every other notebook: CIFAR-10
# The course in reading order, each notebook with the one thing it teaches.
LESSONS = {
    "CustomCNN": "**start here**: the whole workflow written out, from data to predicting your own photo",
    "LeNet5": "where CNNs started: convolution, pooling, weight sharing",
    "AlexNet-32": "AlexNet's ideas shrunk to 32x32 images, and what a tiny network cannot learn",
    "AlexNet-227": "AlexNet at full size: LocalResponseNorm, dropout, Adam with a step schedule, upscaling on the device",
    "ZFNet": "seeing inside a network: a smaller first stride, switches and the deconvnet",
    "VGG16": "depth from stacked 3x3 convolutions, BatchNorm and a one-cycle schedule",
    "ResNet": "residual connections: why a plain deep network trains worse, and how shortcuts fix it",
    "Speedrun": "the modern recipe, one measured trick at a time: fewer epochs for the same accuracy",
    "GoogLeNet": "multi-branch Inception modules, and what 1x1 reductions save",
    "DenseNet": "dense connectivity: every layer reads all earlier feature maps; bottleneck and compression",
    "MobileNetV2": "depthwise-separable convolutions and inverted residuals: fewer multiply-adds is not faster",
    "ViT": "attention instead of convolution: patches, position embeddings, and why a transformer needs augmentation",
    "AlexNet-Flowers": "real photos of any size: your own data set, a train/val/test split, weight initialisation",
    "DDP": "many devices, one model: torchrun, DistributedDataParallel, shared-out data and exact evaluation",
}
NOTEBOOK_ORDER = list(LESSONS)
# The comparison's rows: every notebook that teaches an architecture (DDP.ipynb trains another's).
ARCHITECTURES = [name for name in NOTEBOOK_ORDER if name != "DDP"]
GPU_RECIPES = {"AlexNet-227", "ZFNet"}      # full recipes that take days on a 2-core CPU: measured on a GPU only
# The equal-CPU-budget comparison (benchmarks/equal_budget.py): every CIFAR-10 architecture that
# trains at least an epoch in the budget on a 2-core CPU.
EQUAL_BUDGET = [name for name in ARCHITECTURES if name not in GPU_RECIPES and name not in OTHER_DATA_SETS]
HEADER = ["| notebook | run | epochs | validation accuracy (chosen epoch) | test accuracy (once) "
          "| seconds per epoch | hardware | date |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
NOT_MEASURED = "not measured"
TRAINED_ON = "trained on (last epoch tested)"   # the validation cell of a run retrained on all images


# ---- runs: `add` and the results table -------------------------------------------------------

def add(history_path: pathlib.Path, name: str, note: str, full_recipe: bool, plot: pathlib.Path | None,
        budget_minutes: float | None = None) -> pathlib.Path:
    """Copy a run's history into results/; `budget_minutes` marks a run of the equal-CPU-budget
    comparison (benchmarks/equal_budget.py)."""
    if plot and not plot.is_file():                          # checked before anything is written
        sys.exit(f"{plot}: no such plot")
    history = json.loads(history_path.read_text())
    if not history.get("epoch"):
        sys.exit(f"{history_path}: no completed epochs")
    if "val_acc" not in history:
        sys.exit(f"{history_path}: not a history of utils.train with a validation split")
    history["info"].update(name=name, note=note, full_recipe=full_recipe)
    if budget_minutes is not None:
        if full_recipe:
            sys.exit("a run is either the full recipe or an equal-budget run, not both")
        history["info"]["budget_minutes"] = budget_minutes
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
    test = f"{history.test_acc:.2%}" if history.test_acc is not None else NOT_MEASURED
    seconds = sum(history.seconds) / len(history)
    val = (TRAINED_ON if utils.validation_trained_on(run)
           else f"{history.best_val_acc:.2%} (epoch {history.best_epoch})")
    return (f"| {name} | {history.info['note']} | {len(history)} | {val} | {test} | {seconds:,.0f} "
            f"| {history.info['device']} "
            f"| {history.info['started'][:10]} |")


def rows() -> list[str]:
    lines = list(HEADER)
    for name in NOTEBOOK_ORDER:
        runs = utils.measured_runs(name)
        lines += [row(name, run) for run in runs]
        if not any(run["info"].get("full_recipe") for run in runs):
            lines.append(f"| {name} | full recipe: not yet measured | | | | | | |")
    return lines


# ---- the comparison: one row per notebook, and the figure -----------------------------------

def throughput() -> dict:
    path = RESULTS / THROUGHPUT
    return json.loads(path.read_text()) if path.exists() else {"networks": {}}


def chosen_run(name: str) -> dict | None:
    """The run the comparison shows for notebook `name`: of its full-recipe runs if it has any,
    else of all its measured runs, the one with the highest validation accuracy (the test set
    chooses nothing); None when it has no measured run. Runs that trained on their validation
    images are left out: their validation accuracy measures nothing held out."""
    runs = [run for run in utils.measured_runs(name) if not utils.validation_trained_on(run)]
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
    for name in ARCHITECTURES:
        cells = network_cells(measured["networks"].get(name)) + run_cells(chosen_run(name))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if measured["networks"]:
        lines += ["", f"Training images/s: `benchmarks/throughput.py` on {measured['date']}, torch {measured['torch']}, "
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
    for name in ARCHITECTURES:
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


# ---- every architecture at an equal CPU budget -------------------------------------------------

def budget_run(name: str) -> dict | None:
    """Notebook `name`'s equal-budget run (the latest, if it was run more than once)."""
    runs = [run for run in utils.measured_runs(name) if run["info"].get("budget_minutes")]
    return runs[-1] if runs else None


def arithmetic_rate(mult_adds: float, history: utils.History) -> float:
    """The arithmetic an epoch did, in GFLOP/s over its median time: 2 operations per multiply-add,
    a trained image counted as three forward passes (forward, and a backward pass of about twice
    its work), a validated one as one."""
    passes = 3 * history.info["train_images"] + history.info["val_images"]
    return 2 * mult_adds * passes / statistics.median(history.seconds) / 1e9


def equal_budget() -> list[str]:
    """One row per network of EQUAL_BUDGET: its size, the epochs its budget allowed, the training
    time they took, the arithmetic rate the CPU reached on it, and the validation-chosen epoch's
    accuracies."""
    networks = throughput()["networks"]
    lines = ["| network | parameters | multiply-adds per image | budget | epochs that fit | training time used "
             "| arithmetic rate | validation accuracy (chosen epoch) | test accuracy (once) | machine, date |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for name in EQUAL_BUDGET:
        size = network_cells(networks.get(name))[:2]
        run = budget_run(name)
        if run is None:
            lines.append(f"| {name} | {size[0]} | {size[1]} | | | | | {NOT_MEASURED} | {NOT_MEASURED} | |")
            continue
        history = history_of(run)
        test = f"{history.test_acc:.2%}" if history.test_acc is not None else NOT_MEASURED
        rate = f"{arithmetic_rate(networks[name]['mult_adds'], history):.0f} GFLOP/s" if name in networks else ""
        lines.append(f"| {name} | {size[0]} | {size[1]} | {run['info']['budget_minutes']:g} min | {len(history)} "
                     f"| {sum(history.seconds) / 60:.1f} min | {rate} "
                     f"| {history.best_val_acc:.2%} (epoch {history.best_epoch}) "
                     f"| {test} | {history.info['device']}, {history.info['started'][:10]} |")
    return lines


def write_equal_budget_figure(path: pathlib.Path | None = None) -> pathlib.Path:
    """Validation accuracy against training minutes for every equal-budget run, and the test
    accuracy of each against its parameters and its multiply-adds."""
    networks = throughput()["networks"]
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    by_time, by_size, by_work = figure.subplots(1, 3)
    measured = {name: run for name in EQUAL_BUDGET if (run := budget_run(name)) is not None}
    labelled = {by_size: [], by_work: []}                    # points named so far, per panel
    for name, run in measured.items():
        minutes_done = [sum(run["seconds"][:i + 1]) / 60 for i in range(len(run["seconds"]))]
        line, = by_time.plot(minutes_done, [100 * a for a in run["val_acc"]], marker="o", markersize=3, label=name)
        if run.get("test_acc") is not None and name in networks:
            for axes, key in ((by_size, "parameters"), (by_work, "mult_adds")):
                point = (networks[name][key], 100 * run["test_acc"])
                axes.plot(*point, "o", color=line.get_color())
                crowded = any(abs(math.log10(point[0] / x)) < 0.2 and abs(point[1] - y) < 3 for x, y in labelled[axes])
                axes.annotate(name, point, xytext=(-4 if crowded else 4, 4), textcoords="offset points", fontsize=8,
                              ha="right" if crowded else "left")      # a close neighbour's name is on the right
                labelled[axes].append(point)
    by_time.set(xlabel="training time, minutes (2-core CPU)", ylabel="validation accuracy, %",
                title="validation accuracy while the budget runs")
    by_size.set(xscale="log", xlabel="parameters", ylabel="test accuracy, %", title="test accuracy (once) against size")
    by_work.set(xscale="log", xlabel="multiply-adds per image", ylabel="test accuracy, %",
                title="test accuracy (once) against work per image")
    for axes in (by_time, by_size, by_work):
        axes.grid(True, alpha=0.3)
    if measured:
        by_time.legend(fontsize=7, ncol=2, loc="lower right")
    for axes in (by_size, by_work):
        axes.xaxis.set_minor_formatter(NullFormatter())       # labelled minor ticks overlap on a short log axis
        axes.margins(x=0.15, y=0.1)                            # room for the names beside the points
    missing = [name for name in EQUAL_BUDGET if name not in measured]
    if missing:
        figure.supxlabel(f"not measured: {', '.join(missing)}", fontsize=8)
    path = path or RESULTS / EQUAL_BUDGET_FIGURE
    figure.savefig(path, dpi=100)
    return path


# ---- the course map ---------------------------------------------------------------------------

def minutes(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min"


def course_map() -> list[str]:
    """One row per notebook in reading order: its lesson, its CPU time in quick mode (the whole
    notebook, from notebook-times.json) and for its full recipe (the training time of its full-recipe
    run), that run's test accuracy, and the test accuracy of its equal-CPU-budget run."""
    path = RESULTS / NOTEBOOK_TIMES
    times = json.loads(path.read_text()) if path.exists() else {"notebooks": {}}
    lines = ["| # | notebook | what it teaches | CPU time, quick mode | CPU time, full recipe | test accuracy "
             "| test accuracy, equal CPU budget |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for number, name in enumerate(NOTEBOOK_ORDER, 1):
        quick = times["notebooks"].get(name)
        quick = minutes(quick["seconds"]) if quick else NOT_MEASURED
        runs = [run for run in utils.measured_runs(name) if run["info"].get("full_recipe")]
        run = max(runs, key=lambda run: max(run["val_acc"]), default=None)
        if run is None or run.get("test_acc") is None:
            full = f"GPU recipe, {NOT_MEASURED}" if name in GPU_RECIPES else NOT_MEASURED
            test = NOT_MEASURED
        else:
            full, test = minutes(sum(run["seconds"])), f"{run['test_acc']:.2%}"
        budget = budget_run(name)
        if name not in EQUAL_BUDGET:
            budget = "-"
        elif budget is None or budget.get("test_acc") is None:
            budget = NOT_MEASURED
        else:
            budget = f"{budget['test_acc']:.2%} in {budget['info']['budget_minutes']:g} min"
        lines.append(f"| {number} | [{name}](notebooks/{name}.ipynb) | {LESSONS[name]} | {quick} | {full} | {test} "
                     f"| {budget} |")
    if times["notebooks"]:
        lines += ["", f"Times on {times['machine']}: quick mode is the whole notebook on generated data "
                      f"(`benchmarks/notebook_times.py`, {times['date']}); the full recipe is the training time of "
                      f"its measured run, whose test accuracy is that of the epoch the validation chose, read once; "
                      f"the equal CPU budget is the same training time on the same CPU for every network (the lab "
                      f"book's \"Every architecture at an equal CPU budget\"; a GPU ranks them differently)."]
    return lines


def quick_mode() -> list[str]:
    """The quick runs the test suite makes of each notebook, as benchmarks/notebook_times.py timed them."""
    path = RESULTS / NOTEBOOK_TIMES
    if not path.exists():
        return [f"Quick mode: {NOT_MEASURED} (run benchmarks/notebook_times.py)."]
    times = json.loads(path.read_text())
    lines = ["| notebook | EPOCHS | SUBSET | training images | other settings | seconds, whole notebook "
             "| test accuracy on the generated data |", "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name in NOTEBOOK_ORDER:
        run = times["notebooks"].get(name)
        if run is None:
            lines.append(f"| {name} | | | | | {NOT_MEASURED} | {NOT_MEASURED} |")
            continue
        settings = ", ".join(f"`{key} = {value}`" for key, value in run["settings"].items()) or "-"
        lines.append(f"| {name} | {run['epochs']} | {run['subset']} | {run['train_images']} | {settings} "
                     f"| {run['seconds']:.0f} | {run['test_acc']:.2%} |")
    total = sum(run["seconds"] for run in times["notebooks"].values())
    lines += ["", f"Measured with `benchmarks/notebook_times.py` on {times['machine']}, {times['date']}, torch "
                  f"{times['torch']}: {total:.0f} s for all notebooks."]
    return lines


# ---- README.md and the lab book ----------------------------------------------------------------

def section_in(path: pathlib.Path, start: str, end: str) -> list[str]:
    text = path.read_text()
    if start not in text or end not in text:
        sys.exit(f"{path} lacks the markers {start} and {end}")
    return text.split(start, 1)[1].split(end, 1)[0].strip().splitlines()


def write_section(path: pathlib.Path, start: str, end: str, lines: list[str]) -> None:
    section_in(path, start, end)                        # exits when the markers are missing
    head, rest = path.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)


def generated() -> dict:
    """What each marked section of README.md and the lab book holds: (file, start, end) -> maker."""
    return {(README, MAP_START, MAP_END): course_map,
            (LAB_BOOK, START, END): rows,
            (LAB_BOOK, QUICK_START, QUICK_END): quick_mode,
            (LAB_BOOK, COMPARISON_START, COMPARISON_END): comparison,
            (LAB_BOOK, BUDGET_START, BUDGET_END): equal_budget}


def stale_sections() -> list[str]:
    """The generated sections whose text differs from what results/ gives now."""
    return [f"{path.relative_to(REPO)} {start}" for (path, start, end), make in generated().items()
            if section_in(path, start, end) != make()]


def write_all() -> None:
    """Everything README.md and the lab book show from results/, and the figure."""
    for (path, start, end), make in generated().items():
        write_section(path, start, end, make())
    write_figure()
    write_equal_budget_figure()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    add_parser = sub.add_parser("add", help="copy a run's history into results/")
    add_parser.add_argument("history", type=pathlib.Path)
    add_parser.add_argument("--name", required=True, choices=NOTEBOOK_ORDER)
    add_parser.add_argument("--note", required=True)
    add_parser.add_argument("--full-recipe", action="store_true")
    add_parser.add_argument("--plot", type=pathlib.Path)
    add_parser.add_argument("--budget-minutes", type=float,
                            help="a run of the equal-CPU-budget comparison (benchmarks/equal_budget.py)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "add":
        print("wrote", add(args.history, args.name, args.note, args.full_recipe, args.plot, args.budget_minutes))
    write_all()


if __name__ == "__main__":
    main()
