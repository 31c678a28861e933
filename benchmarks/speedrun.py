"""Speedrun.ipynb's time budget and its training step, measured on this machine in one run.

    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/speedrun.py --run-notebook
    .venv/bin/python benchmarks/speedrun.py           # the step timings only: needs no data
    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/speedrun.py --race   # against airbench94
    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/speedrun.py --ablation --seeds 0 1 2

`--ablation` runs the notebook's section 10 after its sections 0-3 only (settings, data, network
and whitening, optimizer), so that the main training and the test set, sections 4-9, never run,
and writes the rows to results/Speedrun-ablation.json.

`--race` runs the fastest public recipe (benchmarks/peer_airbench.py) and then the notebook's, on
the same data and threads, after timing the CustomCNN yardstick, and writes both accuracy-time
points and their ratios to results/Speedrun-race.json. `--retrain-on-all` sets the notebook's
RETRAIN_ON_ALL (for the race or `--run-notebook`): the chosen recipe trained on all 50,000 training
images, as the peer trains, and its last epoch tested.

The course's speedrun targets are ratios, so that they mean the same on any machine: the
notebook's wall-clock seconds (whitening + training with per-epoch validation + the TTA test
evaluation, as the notebook records them in `history.info["total_seconds"]`) divided by the
time one epoch of the article's CustomCNN recipe takes on the same machine. That epoch is timed
here over `--reference-batches` training steps of batch 128 (the network loaded from
`CustomCNN.ipynb`) and extrapolated to the 45,000 training images, in the article's memory
layout (contiguous), which sets the targets (1.5 such epochs for 90 %, 6 for 94 %), and in
channels_last, as `utils.train` runs the course's notebook on a CPU (faster, so a tighter
reference), reported beside it.

Beside it, the speedrun network's training step (batch 512) at the notebook's widths and at
airbench94's, and the share of the machine's matrix-multiply peak (a float32 2048x2048 matmul,
best of several) that the notebook's step reaches, counting a training step as 3 x 2 x the
multiply-adds of a forward pass; with `--compile`, the same step under `torch.compile` (the
compilation's seconds and the speed ratio), which tells whether the notebook's COMPILE pays
here. `--run-notebook` then executes the notebook with `--epochs` on `DATA_DIR` and writes
everything to results/Speedrun-budget.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from unittest import mock

import nbformat
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from benchmarks import peer_airbench, train_loop  # noqa: E402
from benchmarks.throughput import mult_adds  # noqa: E402
from tools import notebook_code  # noqa: E402

TRAIN_IMAGES = 45_000             # one epoch of the course's training split
REFERENCE_BATCH_SIZE = 128        # CustomCNN.ipynb's BATCH_SIZE
SPEEDRUN_BATCH_SIZE = 512         # Speedrun.ipynb's BATCH_SIZE
WIDTHS = {"notebook": (32, 128, 128), "airbench94": (64, 256, 256)}
TARGETS = {"90 %": 1.5, "94 %": 6.0}   # budget in CustomCNN epochs
MATMUL_SIZE = 2048                # side of the square float32 matrices of the peak measurement
RESULT = utils.REPO_DIR / "results" / "Speedrun-budget.json"
RACE_RESULT = utils.REPO_DIR / "results" / "Speedrun-race.json"
ABLATION_RESULT = utils.REPO_DIR / "results" / "Speedrun-ablation.json"
ABLATION_SECTIONS = (0, 1, 2, 3, 10)   # setup, data, network and whitening, optimizer; the ablation


def matmul_peak_flops(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """Float32 FLOP/s of the fastest of `repeats` size x size matrix products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def customcnn_epoch(batches: int, memory_format=torch.contiguous_format, log=print) -> dict:
    """The course's yardstick of time: one epoch of CustomCNN.ipynb's recipe (45,000 images, batch
    128), extrapolated from `batches` timed training steps on random input in `memory_format`."""
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
    torch.manual_seed(0)
    model = notebook_code.network_class("CustomCNN.ipynb", "MyNet")(num_classes=10)
    data = train_loop.random_batches(batches, REFERENCE_BATCH_SIZE, 32, 10)
    rate = train_loop.training_images_per_s(model, data, memory_format, warmup=2)
    log(f"CustomCNN, {layout}: {rate:.1f} training images/s over {batches} batches of "
        f"{REFERENCE_BATCH_SIZE}: one epoch of {TRAIN_IMAGES:,} images = {TRAIN_IMAGES / rate:.0f} s")
    return {"batches": batches, "batch_size": REFERENCE_BATCH_SIZE, "layout": layout, "images_per_s": rate,
            "epoch_seconds": TRAIN_IMAGES / rate}


def measure_steps(reference_batches: int, speedrun_batches: int, log=print) -> dict:
    reference = {layout: customcnn_epoch(reference_batches, memory_format, log)
                 for layout, memory_format in (("contiguous", torch.contiguous_format),
                                               ("channels_last", torch.channels_last))}
    epoch_seconds = reference["contiguous"]["epoch_seconds"]      # the article's recipe: the targets' unit
    peak = matmul_peak_flops()
    log(f"float32 matmul peak ({MATMUL_SIZE}x{MATMUL_SIZE}): {peak / 1e9:.1f} GFLOP/s")
    speed_net = notebook_code.network_class("Speedrun.ipynb", "SpeedNet")
    networks = {}
    batches = train_loop.random_batches(speedrun_batches, SPEEDRUN_BATCH_SIZE, 32, 10)
    for label, widths in WIDTHS.items():
        torch.manual_seed(0)
        model = speed_net(widths=widths, num_classes=10)
        rate = train_loop.training_images_per_s(model, batches, warmup=2)
        forward = mult_adds(model, 32)
        share = rate * 6 * forward / peak
        networks[label] = {"widths": list(widths), "images_per_s": rate, "mult_adds": forward,
                           "peak_share": share}
        log(f"SpeedNet {widths}: {rate:.1f} training images/s (batch {SPEEDRUN_BATCH_SIZE}), "
            f"{forward / 1e6:.0f} M multiply-adds, {share:.1%} of the matmul peak")
    return {"customcnn": {"batches": reference_batches, "batch_size": REFERENCE_BATCH_SIZE,
                          "epoch_seconds": epoch_seconds,
                          **{layout: {key: row[key] for key in ("images_per_s", "epoch_seconds")}
                             for layout, row in reference.items()}},
            "matmul_peak_gflops": peak / 1e9, "speednet": networks,
            "budgets_seconds": {target: epochs * epoch_seconds for target, epochs in TARGETS.items()}}


def compile_speedup(batches: int, backend: str = "inductor", log=print) -> dict:
    """SpeedNet's training step at the notebook's widths under `torch.compile(backend=...)` against
    the plain step: the seconds of the first two compiled steps (the compilation) and the ratio of
    the steady-state images/s, compiled / plain."""
    speed_net = notebook_code.network_class("Speedrun.ipynb", "SpeedNet")
    data = train_loop.random_batches(batches, SPEEDRUN_BATCH_SIZE, 32, 10)
    torch.manual_seed(0)
    plain_rate = train_loop.training_images_per_s(speed_net(widths=WIDTHS["notebook"]), data, warmup=2)
    torch.manual_seed(0)
    compiled = torch.compile(speed_net(widths=WIDTHS["notebook"]).to(memory_format=torch.channels_last),
                             backend=backend)
    compile_seconds, _ = train_loop.training_steps(compiled, data[:2], torch.channels_last)
    compiled_rate = train_loop.training_images_per_s(compiled, data, warmup=0)
    log(f"torch.compile ({backend}): first two steps {compile_seconds:.1f} s, then {compiled_rate:.1f} images/s "
        f"against {plain_rate:.1f} plain: {compiled_rate / plain_rate:.2f}x")
    return {"backend": backend, "compile_seconds": compile_seconds, "images_per_s": compiled_rate,
            "plain_images_per_s": plain_rate, "ratio": compiled_rate / plain_rate}


def run_notebook(epochs: int, data_dir: pathlib.Path, work_dir: pathlib.Path | None = None,
                 retrain_on_all: bool = False, log=print, widths: list[int] | None = None) -> tuple[dict, float]:
    """Execute Speedrun.ipynb with papermill (`EPOCHS`, `RETRAIN_ON_ALL` and, when given, `WIDTHS`
    set, the ablation off) on `data_dir`, its kernel on as many threads as this process; the
    history it recorded and the seconds of the whole execution. The executed notebook and its model folder are kept in
    `work_dir` when given, else in a scratch folder that is removed."""
    import papermill

    with tempfile.TemporaryDirectory(prefix="speedrun-") as scratch:
        scratch = pathlib.Path(work_dir or scratch)
        scratch.mkdir(parents=True, exist_ok=True)      # papermill writes into the folder, and never creates it
        paths = {"DATA_DIR": str(data_dir), "MODEL_DIR": str(scratch / "model"), "RUNS_DIR": str(scratch / "runs")}
        threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
        parameters = {"EPOCHS": epochs, "RETRAIN_ON_ALL": retrain_on_all, "RUN_ABLATION": False}
        if widths:
            parameters["WIDTHS"] = list(widths)
        start = time.perf_counter()
        with mock.patch.dict(os.environ, {**paths, **threads, "SUBSET": "0"}):   # the settings cell reads the paths from here
            papermill.execute_notebook(utils.REPO_DIR / "notebooks" / "Speedrun.ipynb", scratch / "Speedrun.ipynb",
                                       parameters=parameters,
                                       cwd=utils.REPO_DIR / "notebooks", progress_bar=False)
        job_seconds = time.perf_counter() - start
        log(f"notebook executed in {job_seconds:.0f} s (kernel start and every cell)")
        history = json.loads((scratch / "model" / "Speedrun_history.json").read_text())
    return history, job_seconds


def run_ablation(epochs: int, seeds: list[int], data_dir: pathlib.Path, work_dir: pathlib.Path | None = None,
                 subset: int = 0, log=print) -> dict:
    """Speedrun.ipynb's section 10 with `epochs` per row, once per seed in `seeds`, executed with
    papermill after sections 0-3 only, its kernel on as many threads as this process: the rows as
    the notebook recorded them. Kept in `work_dir` when given, else in a scratch folder."""
    import papermill

    with tempfile.TemporaryDirectory(prefix="speedrun-ablation-") as scratch:
        scratch = pathlib.Path(work_dir or scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        trimmed = scratch / "Speedrun-sections-0-3-10.ipynb"
        nbformat.write(notebook_code.sections("Speedrun.ipynb", ABLATION_SECTIONS), trimmed)
        environment = {"DATA_DIR": str(data_dir), "MODEL_DIR": str(scratch / "model"),
                       "RUNS_DIR": str(scratch / "runs"), "SUBSET": str(subset),
                       "OMP_NUM_THREADS": str(torch.get_num_threads())}
        start = time.perf_counter()
        with mock.patch.dict(os.environ, environment):
            papermill.execute_notebook(trimmed, scratch / "Speedrun-ablation.ipynb", cwd=utils.REPO_DIR / "notebooks",
                                       parameters={"RUN_ABLATION": True, "EPOCHS": epochs, "ABLATION_EPOCHS": epochs,
                                                   "ABLATION_SEEDS": list(seeds)}, progress_bar=False)
        log(f"ablation executed in {time.perf_counter() - start:.0f} s")
        written, = (scratch / "model").glob("Speedrun-ablation-*.json")
        return json.loads(written.read_text())


def race(data_dir: pathlib.Path, epochs: int, reference_batches: int, work_dir: pathlib.Path | None = None,
         retrain_on_all: bool = False, peer_epochs: float | None = None, peer_batch_size: int | None = None,
         log=print, widths: list[int] | None = None) -> dict:
    """The peer (benchmarks/peer_airbench.py) and Speedrun.ipynb with `epochs` back to back on
    `data_dir` and the same threads, the CustomCNN yardstick timed first: both accuracy-time points
    and their ratios. Each time is counted two ways: by the recipe's own timer (whitening, training
    and the final evaluation with test-time augmentation, from the data in memory; the notebook's
    also holds its per-epoch validation) and as the whole job's wall time."""
    measured = {**peer_airbench.environment(), "customcnn": customcnn_epoch(reference_batches, log=log)}
    peer = measured["peer"] = peer_airbench.run_peer(data_dir, peer_epochs, peer_batch_size, log)
    history, job_seconds = run_notebook(epochs, data_dir, work_dir, retrain_on_all, log, widths)
    ours = measured["speedrun"] = {
        "recipe": (f"Speedrun.ipynb, EPOCHS={epochs}" + (", RETRAIN_ON_ALL=True" if retrain_on_all else "")
                   + (f", WIDTHS={tuple(widths)}" if widths else "")),
        "epochs": len(history["epoch"]), "tested": history["info"]["tested"],
        "train_images": history["info"]["train_images"], "tta_level": history["info"]["tta_level"],
        "val_acc_tta": history["info"]["val_acc_tta"], "test_acc_tta": history["test_acc"],
        "timer_seconds": history["info"]["total_seconds"], "job_seconds": job_seconds}
    epoch_seconds = measured["customcnn"]["epoch_seconds"]
    for run in (peer, ours):
        run["customcnn_epochs"] = run["timer_seconds"] / epoch_seconds
    measured["ratios"] = {"test_points": 100 * (ours["test_acc_tta"] - peer["test_acc_tta"]),
                          "timer": ours["timer_seconds"] / peer["timer_seconds"],
                          "job": ours["job_seconds"] / peer["job_seconds"]}
    measured["target_met"] = ours["test_acc_tta"] >= peer["test_acc_tta"] and ours["job_seconds"] <= peer["job_seconds"]
    for label, run in (("airbench94", peer), ("Speedrun", ours)):
        log(f"{label:>10}: test {run['test_acc_tta']:.2%} (TTA level {run['tta_level']}) in {run['timer_seconds']:,.0f} s "
            f"by its timer = {run['customcnn_epochs']:.2f} CustomCNN epochs; {run['job_seconds']:,.0f} s for the whole job")
    ratios = measured["ratios"]
    log(f"Speedrun - airbench94: {ratios['test_points']:+.2f} points of test accuracy in {ratios['timer']:.2f} of its "
        f"timed seconds ({ratios['job']:.2f} of its job); target (at least its accuracy in no more time): "
        f"{'met' if measured['target_met'] else 'not met'}")
    return measured


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-batches", type=int, default=100, help="CustomCNN batches timed per layout")
    parser.add_argument("--speedrun-batches", type=int, default=20, help="SpeedNet batches timed per width")
    parser.add_argument("--run-notebook", action="store_true", help="then execute Speedrun.ipynb on DATA_DIR")
    parser.add_argument("--epochs", type=int, default=10, help="EPOCHS for the notebook run")
    parser.add_argument("--retrain-on-all", action="store_true",
                        help="RETRAIN_ON_ALL for the notebook run: all 50,000 training images, the last epoch tested")
    parser.add_argument("--widths", type=int, nargs=3, metavar="CHANNELS",
                        help="WIDTHS for the notebook run (default: the notebook's)")
    parser.add_argument("--race", action="store_true",
                        help="instead: the peer (benchmarks/peer_airbench.py), then Speedrun.ipynb, on DATA_DIR")
    parser.add_argument("--ablation", action="store_true",
                        help="instead: section 10's ablation on DATA_DIR, without sections 4-9 (no test set)")
    parser.add_argument("--ablation-epochs", type=int, default=4, help="epochs per ablation row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ablation seeds (each row once per seed)")
    parser.add_argument("--peer-epochs", type=float, help=argparse.SUPPRESS)       # the tests' tiny race
    parser.add_argument("--peer-batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=pathlib.Path,
                        help=f"default {RESULT.name}; {RACE_RESULT.name} with --race, {ABLATION_RESULT.name} with --ablation")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    parser.add_argument("--work-dir", type=pathlib.Path, help="keep the executed notebook and its model folder here")
    parser.add_argument("--compile", action="store_true", help="also time SpeedNet's step under torch.compile")
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)   # the tests use "eager"
    args = parser.parse_args(argv)
    if args.race and args.ablation:
        parser.error("--race and --ablation are separate runs: pass one")
    args.output = args.output or (RACE_RESULT if args.race else ABLATION_RESULT if args.ablation else RESULT)
    if args.run_notebook or args.race or args.ablation:          # check before minutes of timing, not after
        if args.output.exists() and not args.force:
            parser.error(f"{args.output} exists (a recorded run the README may cite): pass another --output, "
                         f"or --force to replace it")
        data_dir = utils.env_path("DATA_DIR", utils.REPO_DIR / "data")
        utils.load_cifar10(data_dir, subset=1, download=False)   # DataNotFoundError names DATA_DIR
    if args.ablation:
        ablation = run_ablation(args.ablation_epochs, args.seeds, data_dir, args.work_dir)
        ablation["method"] = ("benchmarks/speedrun.py --ablation: Speedrun.ipynb's sections 0-3 and 10 executed "
                              "with papermill, so the main training and the test evaluation never ran")
        args.output.write_text(json.dumps(ablation, indent=1) + "\n")
        print(f"wrote {args.output}")
        return ablation
    if args.race:
        measured = race(data_dir, args.epochs, args.reference_batches, args.work_dir, args.retrain_on_all,
                        args.peer_epochs, args.peer_batch_size, widths=args.widths)
        args.output.write_text(json.dumps(measured, indent=1) + "\n")
        print(f"wrote {args.output}")
        return measured
    measured = {**peer_airbench.environment(), **measure_steps(args.reference_batches, args.speedrun_batches)}
    if args.compile:
        measured["compile"] = compile_speedup(args.speedrun_batches, args.compile_backend)
    if args.run_notebook:
        history, _ = run_notebook(args.epochs, data_dir, args.work_dir, args.retrain_on_all, widths=args.widths)
        total = history["info"]["total_seconds"]
        ratio = total / measured["customcnn"]["epoch_seconds"]
        ratio_channels_last = total / measured["customcnn"]["channels_last"]["epoch_seconds"]
        measured["run"] = {"epochs": len(history["epoch"]), "test_acc": history["test_acc"],
                           "train_images": history["info"]["train_images"], "tested": history["info"]["tested"],
                           "val_acc": None if args.retrain_on_all else max(history["val_acc"]),
                           "val_acc_tta": history["info"]["val_acc_tta"],
                           "total_seconds": total, "customcnn_epochs": ratio,
                           "customcnn_channels_last_epochs": ratio_channels_last,
                           "load_average_after": round(os.getloadavg()[0], 1)}
        print(f"Speedrun, {args.epochs} epochs: test accuracy {history['test_acc']:.2%} in {total:.0f} s "
              f"= {ratio:.2f} CustomCNN epochs on this machine ({ratio_channels_last:.2f} in channels_last)")
        args.output.write_text(json.dumps(measured, indent=1) + "\n")
        print(f"wrote {args.output}")
    return measured


if __name__ == "__main__":
    main()
