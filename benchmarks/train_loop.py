"""What `utils.train` and the vectorised per-class accuracy cost, measured side by side.

    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/train_loop.py

1. `utils.train` against a minimal hand-written loop (forward, loss, backward, step, accuracy
   count, then the same evaluation on the test split that `utils.train` runs each epoch), on
   the same network, data, optimizer and settings, on the CPU. The two alternate for several
   rounds (A B, B A, ...), each from the same initial weights; the ratio is the median of the
   per-round ratios, so load from other processes hits both sides alike. The target is judged
   on this process's CPU time, which other processes' load barely moves; the wall-clock ratio
   is shown beside it.
2. `utils.confusion_matrix` + `utils.per_class_accuracy` against the source articles'
   per-image Python loop over each batch, on the same predictions and labels.
"""
from __future__ import annotations

import argparse
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

TRAIN_OVERHEAD_TARGET = 1.03    # utils.train time / minimal loop time, at most
PER_CLASS_SPEEDUP_TARGET = 10   # per-image loop time / vectorised time, at least


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


def minimal_loop(model, train_loader, test_loader, num_epochs, optimizer, criterion):
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
        test_correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                test_correct += (model(images).argmax(1) == labels).sum().item()
    return correct / seen, test_correct / len(test_loader.dataset)


def course_loop(model, train_loader, test_loader, num_epochs, optimizer, criterion):
    history = utils.train(model, train_loader, test_loader, num_epochs, optimizer, criterion,
                          device="cpu", progress=False, verbose=False)
    return history.train_acc[-1], history.test_acc[-1]


def timed_run(loop, initial_state, train_loader, test_loader, args) -> tuple[float, float]:
    """(wall-clock, CPU) seconds `loop` takes to train a SmallNet from `initial_state`. CPU time
    (of this process) barely moves when other processes compete for the cores; wall time does."""
    model = SmallNet()
    model.load_state_dict(initial_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    start, start_cpu = time.perf_counter(), time.process_time()
    loop(model, train_loader, test_loader, args.epochs, optimizer, nn.CrossEntropyLoss())
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", utils.REPO_DIR / "data"),
                        type=pathlib.Path, help="folder holding CIFAR-10 in either layout ($DATA_DIR)")
    parser.add_argument("--images", type=int, default=1280, help="images per split (0 = all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    parser.add_argument("--predictions", type=int, default=10_000,
                        help="predictions for the per-class accuracy comparison (the test split's size)")
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
    train_set, test_set = utils.load_cifar10(args.data_dir, subset=args.images, download=False,
                                             augment=utils.RandomCropFlip(padding=4))
    transform = utils.BatchTransform()
    train_loader = utils.make_loader(train_set, args.batch_size, "cpu", shuffle=True, transform=transform)
    test_loader = utils.make_loader(test_set, args.batch_size, "cpu", shuffle=False, transform=transform)
    torch.manual_seed(0)
    initial_state = {k: v.clone() for k, v in SmallNet().state_dict().items()}

    loops = {"minimal loop": minimal_loop, "utils.train": course_loop}
    for loop in loops.values():                      # warm-up: allocator, first-call costs
        timed_run(loop, initial_state, train_loader, test_loader, args)
    wall, cpu = {name: [] for name in loops}, {name: [] for name in loops}
    for round_ in range(args.rounds):
        for name in (list(loops) if round_ % 2 == 0 else list(reversed(loops))):
            seconds = timed_run(loops[name], initial_state, train_loader, test_loader, args)
            wall[name].append(seconds[0])
            cpu[name].append(seconds[1])
        print(f"round {round_ + 1}/{args.rounds}: minimal {wall['minimal loop'][-1]:.2f} s "
              f"(CPU {cpu['minimal loop'][-1]:.2f} s), utils.train {wall['utils.train'][-1]:.2f} s "
              f"(CPU {cpu['utils.train'][-1]:.2f} s)")
    cpu_ratios = [c / m for c, m in zip(cpu["utils.train"], cpu["minimal loop"])]
    wall_ratios = [c / m for c, m in zip(wall["utils.train"], wall["minimal loop"])]
    train_ratio, wall_ratio = statistics.median(cpu_ratios), statistics.median(wall_ratios)

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
    per_class_speedup = statistics.median(l / v for l, v in zip(loop_seconds, vector_seconds))

    images = len(train_set) * args.epochs
    print(f"\n{images:,} training + {len(test_set) * args.epochs:,} test images per run, batch {args.batch_size}, "
          f"SmallNet ({utils.count_parameters(SmallNet()):,} parameters), SGD, CPU; "
          f"median of {args.rounds} alternating rounds\n")
    print("| measurement | baseline | course | course / baseline | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    train_met = train_ratio <= TRAIN_OVERHEAD_TARGET
    per_class_met = per_class_speedup >= PER_CLASS_SPEEDUP_TARGET
    print(f"| training run, CPU time: minimal loop vs utils.train | {statistics.median(cpu['minimal loop']):.2f} s "
          f"| {statistics.median(cpu['utils.train']):.2f} s | {train_ratio:.3f} "
          f"| <= {TRAIN_OVERHEAD_TARGET:.2f}: {'met' if train_met else 'MISSED'} |")
    print(f"| training run, wall clock: minimal loop vs utils.train | {statistics.median(wall['minimal loop']):.2f} s "
          f"| {statistics.median(wall['utils.train']):.2f} s | {wall_ratio:.3f} | (noisier: shown, not judged) |")
    print(f"| per-class accuracy of {args.predictions:,} predictions: per-image loop vs vectorised "
          f"| {1000 * statistics.median(loop_seconds):.1f} ms | {1000 * statistics.median(vector_seconds):.2f} ms "
          f"| {1 / per_class_speedup:.4f} ({per_class_speedup:,.0f}x faster) "
          f"| >= {PER_CLASS_SPEEDUP_TARGET}x faster: {'met' if per_class_met else 'MISSED'} |")
    print()
    for kind, ratios in (("CPU time", cpu_ratios), ("wall clock", wall_ratios)):
        print(f"utils.train / minimal loop per round, {kind}: "
              f"{min(ratios):.3f} to {max(ratios):.3f}, median {statistics.median(ratios):.3f}")
    print(f"target: utils.train costs at most {100 * (TRAIN_OVERHEAD_TARGET - 1):.0f}% more CPU time than the minimal loop: "
          f"{100 * (train_ratio - 1):+.1f}%, {'MET' if train_met else 'MISSED'}")
    print(f"target: vectorised per-class accuracy at least {PER_CLASS_SPEEDUP_TARGET}x faster: "
          f"{per_class_speedup:,.0f}x, {'MET' if per_class_met else 'MISSED'}")
    return {"train_ratio": train_ratio, "train_wall_ratio": wall_ratio, "train_target_met": train_met,
            "per_class_speedup": per_class_speedup, "per_class_target_met": per_class_met}


if __name__ == "__main__":
    main()
