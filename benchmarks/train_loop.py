"""What `utils.train`, the vectorised per-class accuracy and `channels_last` cost, measured side by side.

    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/train_loop.py
    .venv/bin/python benchmarks/train_loop.py --only channels_last      # needs no data

1. `utils.train` against a minimal hand-written loop (forward, loss, backward, step, accuracy
   count, then the same evaluation on the validation split that `utils.train` runs each epoch), on
   the same network, data, optimizer and settings, on the CPU. The two alternate for several
   rounds (A B, B A, ...), each from the same initial weights; the ratio is the median of the
   per-round ratios, so load from other processes hits both sides alike. The target is judged
   on this process's CPU time, which other processes' load barely moves; the wall-clock ratio
   is shown beside it.
2. `utils.confusion_matrix` + `utils.per_class_accuracy` against the source articles'
   per-image Python loop over each batch, on the same predictions and labels.
3. CPU training-step throughput (images/s: forward, cross-entropy loss, zero_grad, backward,
   SGD step, on random 3xHxW input and random labels) of each notebook's network in the default
   contiguous memory format against `channels_last` (the model converted with
   `model.to(memory_format=torch.channels_last)`, each batch converted inside the timed step, as
   a training loop fed by a loader would). The networks are not copied here: they are loaded
   from the notebooks that define them (`tools/notebook_code.py`, `NETWORKS`).
   The two sides alternate for several rounds, each round from the same initial weights after
   untimed warm-up steps; the ratio (channels_last images/s / contiguous images/s) is the median
   of the per-round ratios, on wall clock, with the CPU-time ratio beside it. No target: reported.
"""
from __future__ import annotations

import argparse
import copy
import os
import pathlib
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from tools.notebook_code import NETWORKS, build_network  # noqa: E402

TRAIN_OVERHEAD_TARGET = 1.03    # utils.train time / minimal loop time, at most
PER_CLASS_SPEEDUP_TARGET = 10   # per-image loop time / vectorised time, at least

MEASUREMENTS = ("train_loop", "per_class", "channels_last")   # what --only picks from
SMALL_INPUT = 64                # input side up to which a network counts as small (CIFAR-10's 32 px)
CL_BATCH_SIZE = (128, 16)       # channels_last batch size: small networks, larger ones (< 10 images/s here)
CL_STEPS = (10, 3)              # timed training steps per side per round: small networks, larger ones
CL_ROUNDS = 3                   # alternating rounds; the five article networks take about 5 minutes on 2 cores
CL_WARMUP = 1                   # untimed training steps per side before the rounds

class SmallNet(nn.Module):
    """A small CIFAR-10 CNN, so that any per-batch overhead of the loop shows."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def minimal_loop(model, train_loader, val_loader, num_epochs, optimizer, criterion):
    """The textbook loop: what `utils.train` must not be much slower than."""
    for _ in range(num_epochs):
        model.train()
        correct = seen = 0
        for images, labels in train_loader:
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += len(labels)
        model.eval()
        val_correct = 0
        with torch.no_grad():
            for images, labels in val_loader:
                val_correct += (model(images).argmax(1) == labels).sum().item()
    return correct / seen, val_correct / len(val_loader.dataset)


def course_loop(model, train_loader, val_loader, num_epochs, optimizer, criterion):
    # the same memory layout as the minimal loop: this measures the loop's own overhead
    history = utils.train(model, train_loader, val_loader, num_epochs, optimizer, criterion,
                          channels_last=False, progress=False, verbose=False)
    return history.train_acc[-1], history.val_acc[-1]


def timed_run(loop, initial_state, train_loader, val_loader, args) -> tuple[float, float]:
    """(wall-clock, CPU) seconds `loop` takes to train a SmallNet from `initial_state`. CPU time
    (of this process) barely moves when other processes compete for the cores; wall time does."""
    model = SmallNet()
    model.load_state_dict(initial_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    start, start_cpu = time.perf_counter(), time.process_time()
    loop(model, train_loader, val_loader, args.epochs, optimizer, nn.CrossEntropyLoss())
    return time.perf_counter() - start, time.process_time() - start_cpu


def articles_per_class(batches, num_classes: int):
    """The source articles' per-class accuracy: a Python loop over every image of every batch."""
    class_correct = list(0. for _ in range(num_classes))
    class_total = list(0. for _ in range(num_classes))
    for predicted, labels in batches:
        c = (predicted == labels).squeeze()
        for i in range(len(labels)):
            label = labels[i]
            class_correct[label] += c[i]
            class_total[label] += 1
    return torch.tensor([float(class_correct[i]) / class_total[i] for i in range(num_classes)])


def vectorised_per_class(batches, num_classes: int):
    predictions = torch.cat([p for p, _ in batches])
    labels = torch.cat([t for _, t in batches])
    return utils.per_class_accuracy(utils.confusion_matrix(predictions, labels, num_classes))


def seconds_of(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def training_steps(model, batches, memory_format) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one training step per batch: each batch converted to
    `memory_format`, forward, cross-entropy loss, zero_grad, backward, SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    start, start_cpu = time.perf_counter(), time.process_time()
    for images, labels in batches:
        images = images.contiguous(memory_format=memory_format)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, time.process_time() - start_cpu


def random_batches(count: int, batch_size: int, size: int, num_classes: int) -> list:
    """`count` (images, labels) batches of random 3 x size x size input, the same on every call."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 3, size, size, generator=generator),
             torch.randint(0, num_classes, (batch_size,), generator=generator)) for _ in range(count)]


def training_images_per_s(model, batches, memory_format=torch.channels_last, rounds: int = 1,
                          warmup: int = CL_WARMUP) -> float:
    """Training images/s of `model` in `memory_format`: `warmup` untimed steps, then `rounds` timed
    passes over `batches`, each from the same initial weights; images/s of the median pass."""
    model = model.to(memory_format=memory_format)
    initial_state = copy.deepcopy(model.state_dict())
    training_steps(model, batches[:warmup], memory_format)
    seconds = []
    for _ in range(rounds):
        model.load_state_dict(initial_state)                       # copy_ keeps channels_last strides
        seconds.append(training_steps(model, batches, memory_format)[0])
    return len(batches) * len(batches[0][1]) / statistics.median(seconds)


def measure_channels_last(networks, rounds: int, batch_size: int | None = None, steps: int | None = None,
                          warmup: int = CL_WARMUP, log=print) -> dict:
    """For each named network of `NETWORKS`: training images/s in the contiguous format and in
    channels_last, alternating (A B, B A, ...) for `rounds` rounds, each side of each round from the
    same initial weights. `batch_size` and `steps` default by input size (`CL_BATCH_SIZE`, `CL_STEPS`)."""
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    results = {}
    for name in networks:
        notebook, class_name, _, size = NETWORKS[name]
        small = size <= SMALL_INPUT
        batch = batch_size or CL_BATCH_SIZE[0 if small else 1]
        count = steps or CL_STEPS[0 if small else 1]
        torch.manual_seed(0)
        model, _ = build_network(name)
        initial_state = copy.deepcopy(model.state_dict())
        models = {"contiguous": model,
                  "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last)}
        with torch.no_grad():
            num_classes = model.eval()(torch.zeros(1, 3, size, size)).shape[1]
        batches = random_batches(max(count, warmup), batch, size, num_classes)
        for side, memory_format in formats.items():                 # warm-up: allocator, first-call costs
            training_steps(models[side], batches[:warmup], memory_format)
        wall, cpu = {side: [] for side in formats}, {side: [] for side in formats}
        for round_ in range(rounds):
            for side in (list(formats) if round_ % 2 == 0 else list(reversed(formats))):
                models[side].load_state_dict(initial_state)         # copy_ keeps channels_last strides
                seconds = training_steps(models[side], batches[:count], formats[side])
                wall[side].append(seconds[0])
                cpu[side].append(seconds[1])
            log(f"{name} round {round_ + 1}/{rounds}: contiguous {batch * count / wall['contiguous'][-1]:.1f} "
                f"images/s, channels_last {batch * count / wall['channels_last'][-1]:.1f} images/s")
        ratios = [c / l for c, l in zip(wall["contiguous"], wall["channels_last"])]   # time ratio = speed ratio
        cpu_ratios = [c / l for c, l in zip(cpu["contiguous"], cpu["channels_last"])]
        results[name] = {
            "notebook": notebook, "class": class_name, "size": size, "batch": batch, "steps": count,
            "rounds": rounds, "parameters": utils.count_parameters(model),
            "contiguous": batch * count / statistics.median(wall["contiguous"]),
            "channels_last": batch * count / statistics.median(wall["channels_last"]),
            "ratio": statistics.median(ratios), "ratios": ratios, "cpu_ratio": statistics.median(cpu_ratios)}
    return results


def measure_train_loop(args) -> dict:
    """Measurement 1: wall-clock and CPU seconds of `utils.train` and of the minimal loop, per round."""
    train_set, val_set, _ = utils.load_cifar10(args.data_dir, subset=args.images, download=False,
                                               augment=utils.RandomCropFlip(padding=4))
    transform = utils.BatchTransform()
    train_loader = utils.make_loader(train_set, args.batch_size, "cpu", shuffle=True, transform=transform)
    val_loader = utils.make_loader(val_set, args.batch_size, "cpu", shuffle=False, transform=transform)
    torch.manual_seed(0)
    initial_state = {k: v.clone() for k, v in SmallNet().state_dict().items()}

    loops = {"minimal loop": minimal_loop, "utils.train": course_loop}
    for loop in loops.values():                      # warm-up: allocator, first-call costs
        timed_run(loop, initial_state, train_loader, val_loader, args)
    wall, cpu = {name: [] for name in loops}, {name: [] for name in loops}
    for round_ in range(args.rounds):
        for name in (list(loops) if round_ % 2 == 0 else list(reversed(loops))):
            seconds = timed_run(loops[name], initial_state, train_loader, val_loader, args)
            wall[name].append(seconds[0])
            cpu[name].append(seconds[1])
        print(f"round {round_ + 1}/{args.rounds}: minimal {wall['minimal loop'][-1]:.2f} s "
              f"(CPU {cpu['minimal loop'][-1]:.2f} s), utils.train {wall['utils.train'][-1]:.2f} s "
              f"(CPU {cpu['utils.train'][-1]:.2f} s)")
    cpu_ratios = [c / m for c, m in zip(cpu["utils.train"], cpu["minimal loop"])]
    wall_ratios = [c / m for c, m in zip(wall["utils.train"], wall["minimal loop"])]
    return {"wall": wall, "cpu": cpu, "cpu_ratios": cpu_ratios, "wall_ratios": wall_ratios,
            "train_images": len(train_set), "val_images": len(val_set)}


def measure_per_class(args) -> tuple[list[float], list[float]]:
    """Measurement 2: seconds of the per-image loop and of the vectorised per-class accuracy."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (args.predictions,), generator=generator)
    predictions = torch.where(torch.rand(args.predictions, generator=generator) < 0.7, labels,
                              torch.randint(0, 10, (args.predictions,), generator=generator))
    batches = list(zip(predictions.split(args.batch_size), labels.split(args.batch_size)))
    loop_seconds, vector_seconds = [], []
    for _ in range(5):
        elapsed, by_loop = seconds_of(articles_per_class, batches, 10)
        loop_seconds.append(elapsed)
        elapsed, by_matrix = seconds_of(vectorised_per_class, batches, 10)
        vector_seconds.append(elapsed)
        if not torch.allclose(by_loop, by_matrix):
            raise AssertionError(f"per-class accuracies differ: {by_loop} vs {by_matrix}")
    return loop_seconds, vector_seconds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS),
                        help="measurements to run (default: all; channels_last alone needs no data)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", utils.REPO_DIR / "data"),
                        type=pathlib.Path, help="folder holding CIFAR-10 in either layout ($DATA_DIR)")
    parser.add_argument("--images", type=int, default=1280, help="images per split (0 = all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    parser.add_argument("--predictions", type=int, default=10_000,
                        help="predictions for the per-class accuracy comparison (the test split's size)")
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS),
                        help="notebook networks for the channels_last comparison (default: all)")
    parser.add_argument("--cl-rounds", type=int, default=CL_ROUNDS, help="channels_last: alternating rounds")
    parser.add_argument("--cl-batch-size", type=int, default=None,
                        help=f"channels_last: batch size (default: {CL_BATCH_SIZE[0]} for networks of up to "
                             f"{SMALL_INPUT} px, {CL_BATCH_SIZE[1]} for larger ones)")
    parser.add_argument("--cl-steps", type=int, default=None,
                        help=f"channels_last: timed training steps per side per round (default: {CL_STEPS[0]} "
                             f"for networks of up to {SMALL_INPUT} px, {CL_STEPS[1]} for larger ones)")
    parser.add_argument("--cl-warmup", type=int, default=CL_WARMUP,
                        help="channels_last: untimed training steps per side before the rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0 = torch's default, one per core). One by default: "
                             "on a 2-core machine that other processes load, two threads make every op "
                             "wait for the busier core, and that noise (+-20%% per run) hides a 3%% effect")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}: "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results = {}
    if "train_loop" in args.only:
        runs = measure_train_loop(args)
        cpu, wall, cpu_ratios, wall_ratios = runs["cpu"], runs["wall"], runs["cpu_ratios"], runs["wall_ratios"]
        train_ratio, wall_ratio = statistics.median(cpu_ratios), statistics.median(wall_ratios)
        train_met = train_ratio <= TRAIN_OVERHEAD_TARGET
        results.update(train_ratio=train_ratio, train_wall_ratio=wall_ratio, train_target_met=train_met)
    if "per_class" in args.only:
        loop_seconds, vector_seconds = measure_per_class(args)
        per_class_speedup = statistics.median(l / v for l, v in zip(loop_seconds, vector_seconds))
        per_class_met = per_class_speedup >= PER_CLASS_SPEEDUP_TARGET
        results.update(per_class_speedup=per_class_speedup, per_class_target_met=per_class_met)
    if "channels_last" in args.only:
        results["channels_last"] = measure_channels_last(
            args.networks, args.cl_rounds, args.cl_batch_size, args.cl_steps, args.cl_warmup)

    if "train_loop" in args.only or "per_class" in args.only:
        if "train_loop" in args.only:
            print(f"\n{runs['train_images'] * args.epochs:,} training + {runs['val_images'] * args.epochs:,} "
                  f"validation images per run, batch {args.batch_size}, "
                  f"SmallNet ({utils.count_parameters(SmallNet()):,} parameters), SGD, CPU; "
                  f"median of {args.rounds} alternating rounds")
        print("\n| measurement | baseline | course | course / baseline | target |")
        print("| --- | ---: | ---: | ---: | --- |")
        if "train_loop" in args.only:
            print(f"| training run, CPU time: minimal loop vs utils.train | {statistics.median(cpu['minimal loop']):.2f} s "
                  f"| {statistics.median(cpu['utils.train']):.2f} s | {train_ratio:.3f} "
                  f"| <= {TRAIN_OVERHEAD_TARGET:.2f}: {'met' if train_met else 'MISSED'} |")
            print(f"| training run, wall clock: minimal loop vs utils.train | {statistics.median(wall['minimal loop']):.2f} s "
                  f"| {statistics.median(wall['utils.train']):.2f} s | {wall_ratio:.3f} | (noisier: shown, not judged) |")
        if "per_class" in args.only:
            print(f"| per-class accuracy of {args.predictions:,} predictions: per-image loop vs vectorised "
                  f"| {1000 * statistics.median(loop_seconds):.1f} ms | {1000 * statistics.median(vector_seconds):.2f} ms "
                  f"| {1 / per_class_speedup:.4f} ({per_class_speedup:,.0f}x faster) "
                  f"| >= {PER_CLASS_SPEEDUP_TARGET}x faster: {'met' if per_class_met else 'MISSED'} |")
        print()
        if "train_loop" in args.only:
            for kind, ratios in (("CPU time", cpu_ratios), ("wall clock", wall_ratios)):
                print(f"utils.train / minimal loop per round, {kind}: "
                      f"{min(ratios):.3f} to {max(ratios):.3f}, median {statistics.median(ratios):.3f}")
            print(f"target: utils.train costs at most {100 * (TRAIN_OVERHEAD_TARGET - 1):.0f}% more CPU time than the minimal loop: "
                  f"{100 * (train_ratio - 1):+.1f}%, {'MET' if train_met else 'MISSED'}")
        if "per_class" in args.only:
            print(f"target: vectorised per-class accuracy at least {PER_CLASS_SPEEDUP_TARGET}x faster: "
                  f"{per_class_speedup:,.0f}x, {'MET' if per_class_met else 'MISSED'}")
    if "channels_last" in args.only:
        print(f"\nCPU training steps on random input and labels (forward, cross-entropy, zero_grad, backward, "
              f"SGD step), torch {torch.get_num_threads()} thread(s); images/s from the median round; "
              f"ratio = median of the per-round channels_last / contiguous ratios (CPU-time ratio beside it)\n")
        print("| network | class | input | parameters | rounds | batch | steps | contiguous images/s "
              "| channels_last images/s | channels_last / contiguous | per-round range | CPU-time ratio |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
        for name, row in results["channels_last"].items():
            print(f"| {name} | {row['class']} | {row['size']}x{row['size']} | {row['parameters']:,} | {row['rounds']} "
                  f"| {row['batch']} | {row['steps']} | {row['contiguous']:.1f} | {row['channels_last']:.1f} "
                  f"| {row['ratio']:.3f} | {min(row['ratios']):.3f} to {max(row['ratios']):.3f} "
                  f"| {row['cpu_ratio']:.3f} |")
    return results


if __name__ == "__main__":
    main()
