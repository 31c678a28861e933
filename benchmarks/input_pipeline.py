"""Images per second delivered as ready training batches: the source articles' per-sample
PIL pipelines against the course's uint8 fast path, side by side in one run.

    DATA_DIR=/tmp/realdata .venv/bin/python benchmarks/input_pipeline.py

Pipelines, each at 32 px (random crop with 4 px padding + flip) and at 227 px (flip + resize):

    PIL per sample   torchvision ImageFolder (or CIFAR10) + transforms + DataLoader, 2 workers:
                     every image is decoded, augmented, resized, converted and normalised in PIL
    fast, host       utils.load_cifar10 + utils.make_loader: iterating the DataLoader of uint8
                     32x32 batches, i.e. all a GPU run asks of the CPU per batch
    fast, CPU e2e    the same plus utils.BatchTransform (float, resize, normalise) on the CPU

Each pipeline is measured once per round, the rounds alternate the pipelines, and the table
shows the median of the rounds; ratios are medians of the per-round ratios, so load from
other processes on the machine hits both sides of a ratio alike. Timing starts when the
first batch arrives, so worker start-up is not counted against the PIL pipelines.
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
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import utils  # noqa: E402

TARGETS = {32: 3.0, 227: 10.0}   # fast host-side throughput over PIL per-sample, at least
PIL_WORKERS = 2                  # what the articles use


def article_transform(size: int):
    """The source articles' per-sample training transforms at `size` px."""
    normalise = [transforms.ToTensor(), transforms.Normalize(utils.CIFAR10_MEAN, utils.CIFAR10_STD)]
    if size == 32:
        return transforms.Compose([transforms.RandomCrop(32, padding=4),
                                   transforms.RandomHorizontalFlip(), *normalise])
    return transforms.Compose([transforms.RandomHorizontalFlip(), transforms.Resize(size), *normalise])


def fast_augment(size: int):
    """The same augmentation for the uint8 fast path (the resize happens per batch)."""
    return utils.RandomCropFlip(padding=4 if size == 32 else 0)


def article_dataset(data_dir: pathlib.Path, transform):
    """The training split the way the articles read it, from either CIFAR-10 layout."""
    folder = data_dir / "cifar10" / "train"
    if folder.is_dir():
        return datasets.ImageFolder(str(folder), transform=transform)
    return datasets.CIFAR10(str(data_dir), train=True, download=False, transform=transform)


def endless(loader):
    """Batches from `loader`, epoch after epoch."""
    while True:
        yield from loader


def images_per_second(loader, seconds: float, max_batches: int) -> float:
    """Throughput of a fresh pass over `loader`, timed from its first batch for `seconds`
    (at least two batches, at most `max_batches`)."""
    batches = endless(loader)
    next(batches)                                 # start-up (worker processes) is not timed
    images, timed = 0, 0
    start = time.perf_counter()
    while timed < 2 or (time.perf_counter() - start < seconds and timed < max_batches):
        _, labels = next(batches)
        images += len(labels)
        timed += 1
    elapsed = time.perf_counter() - start
    batches.close()                               # shut down the workers of this pass
    return images / elapsed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", utils.REPO_DIR / "data"),
                        type=pathlib.Path, help="folder holding CIFAR-10 in either layout ($DATA_DIR)")
    parser.add_argument("--images", type=int, default=10_000,
                        help="images per split the fast path loads into memory (0 = all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--batches", type=int, default=400, help="at most this many timed batches per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 227])
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in this process (0 = torch's default, one per core)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir.expanduser().resolve()
    torch.manual_seed(0)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}: "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")

    start = time.perf_counter()
    splits = utils.load_cifar10(data_dir, subset=args.images, download=False)
    load_seconds = time.perf_counter() - start
    train_set, loaded = splits[0], sum(len(split) for split in splits)
    print(f"utils.load_cifar10({data_dir}, subset={args.images}): {loaded:,} images (train + val + test) "
          f"loaded in {load_seconds:.1f} s, {loaded / load_seconds:,.0f} images/s (once per session)")

    pipelines = {}   # (size, name) -> (loader, the fast path's per-sample augmentation)
    for size in args.sizes:
        pil_loader = DataLoader(article_dataset(data_dir, article_transform(size)), args.batch_size,
                                shuffle=True, num_workers=PIL_WORKERS)
        fast_loader = utils.make_loader(train_set, args.batch_size, "cpu", shuffle=True,
                                        transform=utils.BatchTransform(size=size))
        pipelines[size, "PIL per sample"] = (pil_loader, None)
        pipelines[size, "fast, host"] = (fast_loader.loader, fast_augment(size))   # uint8 batches
        pipelines[size, "fast, CPU e2e"] = (fast_loader, fast_augment(size))       # + BatchTransform

    def measure(key) -> float:
        loader, augment = pipelines[key]
        if augment is not None:
            train_set.augment = augment     # the fast loaders share one in-memory data set
        return images_per_second(loader, args.seconds, args.batches)

    rates = {key: [] for key in pipelines}
    for round_ in range(args.rounds):
        order = list(pipelines) if round_ % 2 == 0 else list(reversed(pipelines))
        for key in order:
            rates[key].append(measure(key))
        print(f"round {round_ + 1}/{args.rounds}: " + "  ".join(
            f"{size}px {name} {rates[size, name][-1]:,.0f}" for size, name in pipelines))

    print(f"\nimages/s delivered as ready training batches of {args.batch_size} "
          f"(median of {args.rounds} rounds)\n")
    print(f"| size | PIL per sample ({PIL_WORKERS} workers) | fast, host-side | fast, CPU end to end "
          f"| host / PIL | CPU e2e / PIL | target host / PIL |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    results = {}
    for size in args.sizes:
        pil, host, e2e = (rates[size, name] for name in ("PIL per sample", "fast, host", "fast, CPU e2e"))
        host_ratio = statistics.median(h / p for h, p in zip(host, pil))
        e2e_ratio = statistics.median(e / p for e, p in zip(e2e, pil))
        target = TARGETS.get(size)
        met = target is None or host_ratio >= target
        results[size] = {"pil": statistics.median(pil), "host": statistics.median(host),
                         "cpu_e2e": statistics.median(e2e), "host_ratio": host_ratio,
                         "e2e_ratio": e2e_ratio, "target_met": met}
        verdict = f">= {target:g}x: {'met' if met else 'MISSED'}" if target else "none"
        print(f"| {size} | {results[size]['pil']:,.0f} | {results[size]['host']:,.0f} | "
              f"{results[size]['cpu_e2e']:,.0f} | {host_ratio:.1f}x | {e2e_ratio:.1f}x | {verdict} |")
    print()
    for size in args.sizes:
        if size in TARGETS:
            print(f"target at {size} px: fast host-side >= {TARGETS[size]:g}x PIL per sample: "
                  f"{results[size]['host_ratio']:.1f}x, {'MET' if results[size]['target_met'] else 'MISSED'}")
    return results


if __name__ == "__main__":
    main()
