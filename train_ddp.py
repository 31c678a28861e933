"""Train a course network on CIFAR-10 in several processes at once: `utils.train` under torchrun.

One machine with N GPUs (or N processes on the CPU):

    torchrun --standalone --nproc_per_node=N train_ddp.py --network ResNet --epochs 30

Several machines: the same command on each, HOST being the first machine's address and 29500 a
port it has free (add --rdzv_id=<any name> to tell two jobs apart):

    torchrun --nnodes=2 --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train_ddp.py --network ResNet --epochs 30

One process, without torchrun: `python train_ddp.py --network LeNet5`.

Every process builds the same network (the class its notebook defines, loaded through
tools/notebook_code.py), loads CIFAR-10 and trains on its share of each epoch: `utils.train`
wraps the network in DistributedDataParallel, which averages the gradients of all processes at
every step, so that all keep the same weights. Process 0 alone writes MODEL_DIR/<name>_best.pth,
<name>_last.pth and <name>_history.json (and, with --tensorboard, the curves in RUNS_DIR) and
prints. The backend is nccl on CUDA (one GPU per process, the LOCAL_RANK-th) and gloo on the CPU.

`--batch-size` is per process: the global batch, the one the learning rate goes with, is the batch
size times the number of processes. The recipe is the lineage notebooks' (SGD with Nesterov
momentum and weight decay, the one-cycle schedule, random crops and flips). DDP.ipynb is the
lesson; it runs this script, then tests and uses what it saved.
"""
from __future__ import annotations

import argparse
import gc
import os
import pathlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.elastic.multiprocessing.errors import record

import utils
from tools import notebook_code

# The networks this script can train: the course's CIFAR-10 networks (AlexNet-Flowers has five classes).
NETWORKS = [name for name in notebook_code.NETWORKS if name != "AlexNet-Flowers"]


def parse_settings(argv=None) -> argparse.Namespace:
    """The settings, named as in the notebooks' settings cells; the folders default to the
    environment variables DATA_DIR, MODEL_DIR and RUNS_DIR, as there."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=NETWORKS, default="LeNet5", help="the notebook whose network to train")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step in each process")
    parser.add_argument("--max-lr", type=float, default=0.05,
                        help="peak learning rate of the one-cycle schedule, for the global batch "
                             "(batch size x processes): scale it with the global batch")
    parser.add_argument("--warmup", type=float, default=0.3, help="share of the steps spent raising the rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty")
    parser.add_argument("--subset", type=int, default=0, help="images per split at most; 0: all")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the training images held out")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="no random crops and flips")
    parser.add_argument("--seed", type=int, default=0, help="split, shuffling, initial weights (process r: seed + r)")
    parser.add_argument("--name", help="file names in MODEL_DIR; default: <network>-ddp")
    parser.add_argument("--data-dir", type=pathlib.Path, default=utils.env_path("DATA_DIR", utils.REPO_DIR / "data"))
    parser.add_argument("--model-dir", type=pathlib.Path, default=utils.env_path("MODEL_DIR", utils.REPO_DIR / "model"))
    parser.add_argument("--runs-dir", type=pathlib.Path, default=utils.env_path("RUNS_DIR", utils.REPO_DIR / "runs"))
    parser.add_argument("--tensorboard", action="store_true", help="write TensorBoard curves to RUNS_DIR")
    parser.add_argument("--resume", action="store_true", help="continue from MODEL_DIR/<name>_last.pth")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision; default: on CUDA only")
    parser.add_argument("--sync-batchnorm", action="store_true",
                        help="BatchNorm over the global batch (GPUs only; see utils.train)")
    parser.add_argument("--test", action="store_true",
                        help="at the end, measure the checkpoint validation chose on the test split, once")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process; 0: PyTorch's default (torchrun sets 1 per process)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    settings = parser.parse_args(argv)
    settings.name = settings.name or f"{settings.network}-ddp"
    return settings


def start_processes() -> torch.device:
    """Join the other processes when torchrun started this one (it sets RANK, WORLD_SIZE,
    LOCAL_RANK and where to meet) and return this process's device: the LOCAL_RANK-th GPU with
    nccl, or the CPU with gloo. Without torchrun: one ordinary process on `utils.get_device()`."""
    if "RANK" not in os.environ:
        return utils.get_device()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.distributed.init_process_group("gloo")
    return device


def load_data(settings):
    """CIFAR-10's (train, val, test) in every process. The first process on each machine loads
    first (and downloads, when the data is missing); the others wait, then read its copy."""
    first_here = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if utils.is_distributed() and not first_here:
        torch.distributed.barrier()
    datasets = utils.load_cifar10(settings.data_dir, subset=settings.subset, val_fraction=settings.val_fraction,
                                  augment=utils.RandomCropFlip(padding=4) if settings.augment else None,
                                  seed=settings.seed)
    if utils.is_distributed() and first_here:
        torch.distributed.barrier()
    return datasets


@dataclass
class Run:
    """What `build` makes and `train` uses."""
    device: torch.device
    net: nn.Module
    train_loader: utils.DeviceLoader
    val_loader: utils.DeviceLoader
    test_set: utils.UInt8ImageDataset
    batch_transform: utils.BatchTransform
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    files: utils.RunFiles
    metadata: dict


def build(settings, device: torch.device) -> Run:
    """The network, this process's loaders, the optimizer and the schedule, from the settings."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    # each process draws its own augmentation; the initial weights are process 0's (DDP copies them)
    utils.seed_everything(settings.seed + utils.rank())
    train_set, val_set, test_set = load_data(settings)
    net, size = notebook_code.build_network(settings.network)
    net = net.to(device)
    batch_transform = utils.BatchTransform(utils.CIFAR10_MEAN, utils.CIFAR10_STD, size=None if size == 32 else size)
    # under torchrun, make_loader gives each process its share (utils.make_loader, `shard`)
    train_loader = utils.make_loader(train_set, settings.batch_size, device, shuffle=True,
                                     transform=batch_transform, seed=settings.seed)
    val_loader = utils.make_loader(val_set, settings.batch_size, device, shuffle=False, transform=batch_transform)
    optimizer = torch.optim.SGD(net.parameters(), lr=settings.max_lr, momentum=settings.momentum, nesterov=True,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.max_lr, epochs=settings.epochs,
                                                    steps_per_epoch=len(train_loader), pct_start=settings.warmup,
                                                    cycle_momentum=False)
    metadata = dict(classes=train_set.classes, image_size=32, input_size=size, mean=utils.CIFAR10_MEAN,
                    std=utils.CIFAR10_STD, arch=notebook_code.NETWORKS[settings.network][1],
                    network=settings.network)
    return Run(device, net, train_loader, val_loader, test_set, batch_transform, optimizer, scheduler,
               utils.RunFiles(settings.model_dir, settings.name), metadata)


def train(settings, run: Run) -> utils.History:
    """`utils.train` with the settings (and, with --test, section 5 of the notebooks)."""
    writer = None
    if settings.tensorboard and utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(settings.runs_dir / f"{settings.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if utils.is_main_process():
        print(f"{utils.world_size()} process(es) on {run.device.type}, {settings.batch_size} images "
              f"per step in each: a global batch of {settings.batch_size * utils.world_size()}")
    history = utils.train(run.net, run.train_loader, run.val_loader, settings.epochs, run.optimizer,
                          nn.CrossEntropyLoss(), run.scheduler, files=run.files, metadata=run.metadata,
                          resume=settings.resume, writer=writer, amp=settings.amp, progress=settings.progress,
                          sync_batchnorm=settings.sync_batchnorm)
    if writer is not None:
        writer.close()
    if settings.test:
        test_loader = utils.make_loader(run.test_set, settings.batch_size, run.device,
                                        shuffle=False, transform=run.batch_transform)
        utils.test_chosen_model(run.net, run.files, test_loader, history)
    return history


def stop_processes() -> None:
    """Leave the process group once every process has finished with it. DistributedDataParallel's
    wrapper lives on in reference cycles: collected here, while the group it uses still exists,
    and not at interpreter exit, where its teardown can abort the process."""
    if utils.is_distributed():
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@record          # a failing process's error reaches torchrun's report
def main(argv=None) -> utils.History:
    settings = parse_settings(argv)
    device = start_processes()
    history = train(settings, build(settings, device))
    stop_processes()
    return history


if __name__ == "__main__":
    main()
