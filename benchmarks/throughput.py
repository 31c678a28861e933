"""Parameters, multiply-adds per image and training images/s of every notebook's network, on
this machine's CPU, written to results/throughput.json for the lab book's comparison.

    .venv/bin/python benchmarks/throughput.py      # about 3 to 5 minutes on 2 cores; --help
    .venv/bin/python tools/make_tables.py          # then regenerate the tables

Each network is loaded from the notebook that defines it (tools/notebook_code.py) and trained
for a few steps on random input with the settings `utils.train` uses on a CPU (channels_last);
the images/s of the median of several rounds count.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from datetime import datetime, timezone

import torch
import torchinfo

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from benchmarks import train_loop  # noqa: E402
from tools.notebook_code import NETWORKS, build_network  # noqa: E402

OUTPUT = utils.RESULTS_DIR / "throughput.json"
MEASURE_STEPS = (5, 3)                  # timed steps per round: networks of up to 64 px, larger ones
MEASURE_ROUNDS = 3                      # rounds; images/s of the median round


def mult_adds(model: torch.nn.Module, size: int) -> int:
    """Multiply-adds of one forward pass of one size x size image: torchinfo's count, or PyTorch's
    FlopCounterMode's (half its FLOPs) where that is larger. torchinfo counts a linear layer as if
    it saw one token and misses matrix products outside modules, which undercounts a transformer
    (ViT) about 70 times; for convolutional networks its count, biases included, is the larger."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros(1, 3, size, size)
    counted = torchinfo.summary(model, input_data=image, verbose=0, device="cpu").total_mult_adds
    was_training = model.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(image)
    model.train(was_training)
    return max(counted, counter.get_total_flops() // 2)


def measure_network(name: str, batch_size: int | None, steps: int | None, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model, size = build_network(name)
    small = size <= train_loop.SMALL_INPUT
    batch_size = batch_size or train_loop.CL_BATCH_SIZE[0 if small else 1]
    steps = steps or MEASURE_STEPS[0 if small else 1]
    row = {"parameters": utils.count_parameters(model), "mult_adds": mult_adds(model, size),
           "input_size": size, "batch_size": batch_size, "steps": steps}
    batches = train_loop.random_batches(steps, batch_size, size, NETWORKS[name][2]["num_classes"])
    row["images_per_s"] = train_loop.training_images_per_s(model, batches, rounds=rounds, warmup=warmup)
    print(f"{name}: {row['parameters']:,} parameters, {row['mult_adds']:,} multiply-adds per image, "
          f"{row['images_per_s']:,.1f} training images/s (batch {batch_size} x {steps} steps)")
    return row


def measure(networks, batch_size: int | None = None, steps: int | None = None, rounds: int = MEASURE_ROUNDS,
            warmup: int = train_loop.CL_WARMUP, threads: int = 0, path: pathlib.Path = OUTPUT) -> dict:
    """Measure `networks` (names in tools/notebook_code.NETWORKS) and write them to `path`."""
    if threads:
        torch.set_num_threads(threads)
    machine = utils.hardware() + (" (timed on its CPU)" if torch.cuda.is_available() else "")
    measured = {
        "machine": machine, "torch": torch.__version__, "date": f"{datetime.now(timezone.utc):%Y-%m-%d}",
        "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 1),
        "rounds": rounds, "warmup": warmup, "memory_format": "channels_last",
        "networks": {name: measure_network(name, batch_size, steps, rounds, warmup) for name in networks}}
    path.write_text(json.dumps(measured, indent=1) + "\n")
    return measured


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS), help="default: all")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default: {train_loop.CL_BATCH_SIZE[0]} for networks of up to "
                             f"{train_loop.SMALL_INPUT} px, {train_loop.CL_BATCH_SIZE[1]} for larger ones")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed training steps per round (default: {MEASURE_STEPS[0]} for networks "
                             f"of up to {train_loop.SMALL_INPUT} px, {MEASURE_STEPS[1]} for larger ones)")
    parser.add_argument("--rounds", type=int, default=MEASURE_ROUNDS, help="rounds; the median counts")
    parser.add_argument("--warmup", type=int, default=train_loop.CL_WARMUP, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default 0: torch's default, as utils.train runs)")
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.output == OUTPUT and set(args.networks) != set(NETWORKS):
        sys.exit(f"measuring only {', '.join(args.networks)} would drop the other networks from "
                 f"{args.output}: measure all of them, or pass --output for a partial measurement")
    measured = measure(args.networks, args.batch_size, args.steps, args.rounds, args.warmup, args.threads, args.output)
    print(f"wrote {args.output}; now run: .venv/bin/python tools/make_tables.py")
    return measured


if __name__ == "__main__":
    main()
