"""One process of a distributed test run (tests/test_ddp.py starts it with torchrun): train_ddp.py's
build and train, with what the tests need around them.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py --report DIR [--stop-after 1]
        [--fail-rank 1 --fail-epoch 2] <train_ddp.py settings>

Each process writes DIR/rank<r>.pt: its final weights, its history, the whole validation split's
predictions as `utils.predict_loader` gathered them, and every file it created, wrote, renamed or
removed under MODEL_DIR and RUNS_DIR (seen by an audit hook, so nothing escapes it).
--stop-after N presses Ctrl-C in every process as epoch N + 1 begins; --fail-rank R makes process R
raise an error as epoch --fail-epoch begins.
"""
import argparse
import dataclasses
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

import train_ddp  # noqa: E402
import utils  # noqa: E402

WRITING_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def watch_writes(folders: list[pathlib.Path]) -> list[str]:
    """A list that an audit hook fills with every change this process makes under `folders`."""
    prefixes = tuple(str(folder.resolve()) for folder in folders)
    seen: list[str] = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITING_FLAGS)
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            path, writing = args[0], True
        else:
            return
        path = os.fsdecode(path) if isinstance(path, bytes) else str(path)
        if writing and os.path.abspath(path).startswith(prefixes):
            seen.append(f"{event} {path}")

    sys.addaudithook(hook)
    return seen


class Scripted:
    """The training loader, with a Ctrl-C or an error scripted at the start of an epoch."""

    def __init__(self, loader, stop_after: int, fail_rank: int, fail_epoch: int):
        self.loader, self.stop_after, self.fail_rank, self.fail_epoch = loader, stop_after, fail_rank, fail_epoch
        self.dataset, self.batch_size, self.generator = loader.dataset, loader.batch_size, loader.generator
        self.epoch = 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        if self.stop_after and self.epoch > self.stop_after:
            raise KeyboardInterrupt
        if utils.rank() == self.fail_rank and self.epoch == self.fail_epoch:
            raise RuntimeError(f"process {utils.rank()} fails on purpose in epoch {self.epoch}")
        yield from self.loader


@record
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", type=pathlib.Path, required=True)
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-epoch", type=int, default=0)
    own, rest = parser.parse_known_args()
    settings = train_ddp.parse_settings(rest)
    written = watch_writes([settings.model_dir, settings.runs_dir])
    device = train_ddp.start_processes()
    run = train_ddp.build(settings, device)
    run.train_loader = Scripted(run.train_loader, own.stop_after, own.fail_rank, own.fail_epoch)
    history = train_ddp.train(settings, run)
    logits, labels = utils.predict_loader(run.net, run.val_loader)
    own.report.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": run.net.state_dict(), "history": dataclasses.asdict(history),
                "val_logits": logits, "val_labels": labels, "written": written,
                "world_size": utils.world_size()}, own.report / f"rank{utils.rank()}.pt")
    train_ddp.stop_processes()


if __name__ == "__main__":
    main()
