"""The README's results table, generated from the measured runs in results/.

Each run is a training history JSON written by `utils.train` (beside its checkpoint, with the
test accuracy the notebook measured once, in section 5, on the epoch validation chose), copied
here with `add`, which also records what the run was (a note, whether it followed the
notebook's full recipe) and copies its plot. Only measured runs become rows; a notebook
without a full-recipe run gets a row that says so.

    python results/make_table.py add model/AlexNet-32_history.json --name AlexNet-32 \
        --note "full recipe: 20 epochs" --full-recipe --plot model/AlexNet-32_history.png
    python results/make_table.py            # rewrite the table in README.md
"""
import argparse
import json
import pathlib
import shutil
import sys

RESULTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(RESULTS.parent))
import utils  # noqa: E402

README = RESULTS.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
NOTEBOOK_ORDER = ["CustomCNN", "LeNet5", "AlexNet-32", "AlexNet-227", "ZFNet", "VGG16", "ResNet", "AlexNet-Flowers"]
HEADER = ["| notebook | run | epochs | validation accuracy (chosen epoch) | test accuracy (once) "
          "| seconds per epoch | hardware | date |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]


def add(history_path: pathlib.Path, name: str, note: str, full_recipe: bool, plot: pathlib.Path | None) -> pathlib.Path:
    history = json.loads(history_path.read_text())
    if not history.get("epoch"):
        sys.exit(f"{history_path}: no completed epochs")
    if "val_acc" not in history:
        sys.exit(f"{history_path}: not a history of utils.train with a validation split")
    history["info"].update(name=name, note=note, full_recipe=full_recipe)
    stem = f"{name}-{history['info']['started'][:10]}-{len(history['epoch'])}ep"
    target = RESULTS / f"{stem}.json"
    target.write_text(json.dumps(history, indent=1) + "\n")
    if plot:
        shutil.copyfile(plot, RESULTS / f"{stem}.png")
    return target


def row(name: str, run: dict) -> str:
    history = utils.History(**{k: v for k, v in run.items() if k in utils.History.__dataclass_fields__})
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


def table_in_readme() -> list[str]:
    text = README.read_text()
    if START not in text or END not in text:
        sys.exit(f"{README} lacks the markers {START} and {END}")
    return text.split(START, 1)[1].split(END, 1)[0].strip().splitlines()


def write_table() -> None:
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + START + "\n" + "\n".join(rows()) + "\n" + END + tail)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    add_parser = sub.add_parser("add", help="copy a run's history into results/")
    add_parser.add_argument("history", type=pathlib.Path)
    add_parser.add_argument("--name", required=True, choices=NOTEBOOK_ORDER)
    add_parser.add_argument("--note", required=True)
    add_parser.add_argument("--full-recipe", action="store_true")
    add_parser.add_argument("--plot", type=pathlib.Path)
    args = parser.parse_args()
    if args.command == "add":
        print("wrote", add(args.history, args.name, args.note, args.full_recipe, args.plot))
    write_table()
