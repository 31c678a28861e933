"""The README's results table, generated from the measured runs in results/.

Each run is a training history JSON written by `utils.train` (beside its checkpoint), copied
here with `add`, which also records what the run was (a note, whether it followed the
notebook's full recipe) and copies its plot. Only measured runs become rows; a notebook
without a full-recipe run gets a row that says so.

    python results/make_table.py add model/CustomCNN_best_history.json --name CustomCNN \
        --note "1 epoch, full data set" [--full-recipe] [--plot model/CustomCNN_history.png]
    python results/make_table.py            # rewrite the table in README.md
"""
import argparse
import json
import pathlib
import shutil
import sys

RESULTS = pathlib.Path(__file__).resolve().parent
README = RESULTS.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
NOTEBOOK_ORDER = ["CustomCNN", "AlexNet-32", "AlexNet-227", "ZFNet", "AlexNet-Flowers"]


def add(history_path: pathlib.Path, name: str, note: str, full_recipe: bool, plot: pathlib.Path | None) -> pathlib.Path:
    history = json.loads(history_path.read_text())
    if not history.get("epoch"):
        sys.exit(f"{history_path}: no completed epochs")
    history["info"].update(name=name, note=note, full_recipe=full_recipe)
    stem = f"{name}-{history['info']['started'][:10]}-{len(history['epoch'])}ep"
    target = RESULTS / f"{stem}.json"
    target.write_text(json.dumps(history, indent=1))
    if plot:
        shutil.copyfile(plot, RESULTS / f"{stem}.png")
    return target


def rows() -> list[str]:
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    lines = ["| notebook | run | epochs | test accuracy (final / best) | seconds per epoch | hardware | date |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in NOTEBOOK_ORDER:
        mine = [r for r in runs if r["info"].get("name") == name]
        for run in mine:
            info, seconds = run["info"], run["seconds"]
            lines.append(f"| {name} | {info['note']} | {len(run['epoch'])} | "
                         f"{run['test_acc'][-1]:.2%} / {max(run['test_acc']):.2%} | "
                         f"{sum(seconds) / len(seconds):,.0f} | {info['device']} | {info['started'][:10]} |")
        if not any(r["info"].get("full_recipe") for r in mine):
            lines.append(f"| {name} | full recipe: not yet measured | | | | | |")
    return lines


def write_table() -> None:
    text = README.read_text()
    if START not in text or END not in text:
        sys.exit(f"{README} lacks the markers {START} and {END}")
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
