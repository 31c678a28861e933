"""The peer: airbench94, the fastest public CIFAR-10 recipe, run unchanged on this CPU and the
course's data, with one epoch of CustomCNN timed in the same run as the yardstick.

    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/peer_airbench.py
    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/speedrun.py --race   # the peer, then Speedrun.ipynb

The recipe is Keller Jordan's `airbench` package (PyPI 0.1.8, a benchmark dependency in
requirements-dev.txt, not a notebook's): its network, hyperparameters, data loader and training
loop are called as published (9.9 epochs of all 50,000 training images in batches of 1,024, test-time
augmentation level 2). It is written for one CUDA GPU in float16, so `on_the_cpu` redirects only
what a CPU cannot run:

- `Module.half()` and `Tensor.half()` keep float32: a CPU has no fast float16 convolutions;
- `Module.cuda()` and the loaders' default device keep every tensor on the CPU;
- `torch.cuda.Event` becomes a wall clock, and `torch.cuda.synchronize` does nothing (CPU work has
  finished when the call returns).

Its own timer is the sum of the intervals its events measure: the whitening layer's initialisation,
the training epochs and the final evaluation with test-time augmentation, from the data in memory.
Its per-epoch test evaluations (logging only) fall outside that timer and inside `job_seconds`,
the wall time of the whole `train94` call. The course's protocol never reads the test set to choose
anything; the peer reads it every epoch, and trains on the 5,000 images the course holds out.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
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

RESULT = utils.REPO_DIR / "results" / "peer-airbench94.json"


def write_peer_data(data_dir, folder: pathlib.Path) -> dict:
    """The course's CIFAR-10 under `data_dir` in airbench's format: `folder/train.pt` (all 50,000
    training images: the course's training and validation splits) and `folder/test.pt`, each
    {"images": uint8 (N, 32, 32, 3), "labels", "classes"}. The number of images of each split."""
    train_set, val_set, test_set = utils.load_cifar10(data_dir, download=False)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": (torch.cat([train_set.images, val_set.images]), torch.cat([train_set.labels, val_set.labels])),
              "test": (test_set.images, test_set.labels)}
    for split, (images, labels) in splits.items():
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": test_set.classes},
                   folder / f"{split}.pt")
    return {split: len(labels) for split, (_, labels) in splits.items()}


def wall_clock_event(intervals: list):
    """A stand-in for torch.cuda.Event's timing interface on the wall clock; each interval that
    `elapsed_time` measures is appended to `intervals`, in seconds."""

    class WallClockEvent:
        def __init__(self, enable_timing: bool = False, **_):
            self.time = None

        def record(self, stream=None) -> None:
            self.time = time.perf_counter()

        def elapsed_time(self, end: "WallClockEvent") -> float:
            seconds = end.time - self.time
            intervals.append(seconds)
            return 1e3 * seconds                             # milliseconds, as CUDA events report them

    return WallClockEvent


@contextlib.contextmanager
def on_the_cpu(work_dir: pathlib.Path, intervals: list):
    """Run airbench in `work_dir` (its training loop opens `cifar10/test.pt` there) on the CPU in
    float32, its event timings appended to `intervals`."""
    from airbench.utils import CifarLoader

    defaults = CifarLoader.__init__.__defaults__
    if defaults[-1] != 0:
        raise RuntimeError(f"airbench's CifarLoader no longer defaults to GPU 0 ({defaults}): "
                           f"check the redirection against the installed version")
    previous_dir = os.getcwd()
    with mock.patch.object(torch.nn.Module, "cuda", lambda self, device=None: self), \
            mock.patch.object(torch.nn.Module, "half", lambda self: self), \
            mock.patch.object(torch.Tensor, "half", lambda self, memory_format=torch.preserve_format: self.float()), \
            mock.patch.object(torch.cuda, "Event", wall_clock_event(intervals)), \
            mock.patch.object(torch.cuda, "synchronize", lambda device=None: None), \
            mock.patch.object(CifarLoader.__init__, "__defaults__", defaults[:-1] + ("cpu",)):
        os.chdir(work_dir)
        try:
            yield
        finally:
            os.chdir(previous_dir)


def run_peer(data_dir, epochs: float | None = None, batch_size: int | None = None, log=print) -> dict:
    """Train airbench94 on the course's data under `data_dir`; its test accuracy with and without
    test-time augmentation, its own timer and the job's wall time. `epochs` and `batch_size`
    default to the recipe's (the suite's smoke test sets tiny ones)."""
    import airbench
    from airbench.lib_airbench94 import hyp

    epochs = hyp["opt"]["train_epochs"] if epochs is None else epochs
    batch_size = hyp["opt"]["batch_size"] if batch_size is None else batch_size
    tta_level = hyp["net"]["tta_level"]
    with tempfile.TemporaryDirectory(prefix="airbench-") as scratch:
        work_dir = pathlib.Path(scratch)
        images = write_peer_data(data_dir, work_dir / "cifar10")
        intervals = []
        with on_the_cpu(work_dir, intervals):
            train_loader = airbench.CifarLoader("cifar10", train=True, batch_size=batch_size, aug=hyp["aug"],
                                                altflip=True)
            test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
            start = time.perf_counter()
            model = airbench.train94(train_loader, epochs=epochs)
            job_seconds = time.perf_counter() - start
            # The model is in eval mode and inference is deterministic: these repeat what train94 printed.
            test_acc_tta = airbench.evaluate(model, test_loader, tta_level=tta_level)
            test_acc = airbench.evaluate(model, test_loader, tta_level=0)
    peer = {"recipe": f"airbench94 (airbench {importlib.metadata.version('airbench')}), float32 on the CPU",
            "epochs": epochs, "batch_size": batch_size, "train_images": images["train"], "tta_level": tta_level,
            "test_acc_tta": test_acc_tta, "test_acc": test_acc, "timer_seconds": sum(intervals),
            "job_seconds": job_seconds}
    log(f"airbench94, {epochs:g} epochs of {images['train']:,} images: test {test_acc_tta:.2%} with TTA level "
        f"{tta_level} ({test_acc:.2%} without) in {peer['timer_seconds']:,.0f} s by its timer, "
        f"{job_seconds:,.0f} s for the whole job")
    return peer


def environment() -> dict:
    """The machine, its CPU capability, torch and threads, date and load: what every figure sits beside."""
    return {"machine": utils.hardware(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average": round(os.getloadavg()[0], 1)}


def main(argv=None) -> dict:
    from benchmarks.speedrun import customcnn_epoch   # imported here: speedrun.py imports this module

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, help="training epochs (default: the recipe's 9.9)")
    parser.add_argument("--batch-size", type=int, help="training batch (default: the recipe's 1,024)")
    parser.add_argument("--reference-batches", type=int, default=100, help="CustomCNN batches timed for the yardstick")
    parser.add_argument("--output", type=pathlib.Path, default=RESULT)
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.force:
        parser.error(f"{args.output} exists (a recorded run the lab book may cite): pass another --output, "
                     f"or --force to replace it")
    data_dir = utils.env_path("DATA_DIR", utils.REPO_DIR / "data")
    measured = {**environment(), "customcnn": customcnn_epoch(args.reference_batches),
                "peer": run_peer(data_dir, args.epochs, args.batch_size)}
    measured["peer"]["customcnn_epochs"] = measured["peer"]["timer_seconds"] / measured["customcnn"]["epoch_seconds"]
    args.output.write_text(json.dumps(measured, indent=1) + "\n")
    print(f"= {measured['peer']['customcnn_epochs']:.2f} CustomCNN epochs on this machine; wrote {args.output}")
    return measured


if __name__ == "__main__":
    main()
