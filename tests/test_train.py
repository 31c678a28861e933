"""utils.train: schedulers, history, checkpoints, AMP and channels_last on the CPU, failures."""
import json
import math

import pytest
import torch
import torch.nn as nn

import utils
from tests import fakedata

optim = torch.optim
sched = torch.optim.lr_scheduler


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):                                     # (B, 3, 32, 32)
        x = nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 4)
        return self.head(x.flatten(1))                         # (B, 10)


@pytest.fixture(scope="module")
def loaders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fakedata.write_cifar10_folder(root, train_per_class=16, test_per_class=4)
    train_set, test_set = utils.load_cifar10(root, augment=utils.RandomCropFlip(padding=2))
    transform = utils.BatchTransform()
    return (utils.make_loader(train_set, 32, "cpu", shuffle=True, transform=transform),
            utils.make_loader(test_set, 64, "cpu", shuffle=False, transform=transform))


def run(loaders, epochs=3, lr=0.05, make_scheduler=None, **options):
    utils.seed_everything(0)
    model = TinyNet()
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    options.setdefault("progress", False)
    options.setdefault("verbose", False)
    history = utils.train(model, *loaders, epochs, optimizer, nn.CrossEntropyLoss(), scheduler, **options)
    return model, optimizer, scheduler, history


def test_loss_falls_and_accuracy_rises_on_learnable_data(loaders):
    _, _, _, history = run(loaders, epochs=4)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.test_acc[-1] > 0.6                          # chance is 0.1


def test_history_is_complete(loaders):
    _, _, _, history = run(loaders, epochs=2)
    assert history.epoch == [1, 2]
    for name in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"):
        values = getattr(history, name)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), name
    assert all(0 <= a <= 1 for a in history.train_acc + history.test_acc)
    assert history.info["model"] == "TinyNet" and history.info["train_images"] == 160


@pytest.mark.parametrize("make_scheduler, expected_lrs", [
    (None, [0.05, 0.05, 0.05, 0.05]),
    (lambda o: sched.StepLR(o, step_size=2, gamma=0.5), [0.05, 0.05, 0.025, 0.025]),
    (lambda o: sched.MultiStepLR(o, milestones=[1, 3], gamma=0.1), [0.05, 0.005, 0.005, 0.0005]),
    (lambda o: sched.CosineAnnealingLR(o, T_max=4), [0.05 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
])
def test_per_epoch_schedulers_step_once_per_epoch(loaders, make_scheduler, expected_lrs):
    _, _, _, history = run(loaders, epochs=4, make_scheduler=make_scheduler)
    assert history.lr == pytest.approx(expected_lrs)


def test_reduce_on_plateau_is_stepped_with_the_test_loss(loaders, monkeypatch):
    seen = []
    original = sched.ReduceLROnPlateau.step
    monkeypatch.setattr(sched.ReduceLROnPlateau, "step",
                        lambda self, metric: (seen.append(metric), original(self, metric))[1])
    # threshold=1: no epoch counts as an improvement, so every step halves the rate
    _, optimizer, _, history = run(loaders, epochs=3, make_scheduler=lambda o: sched.ReduceLROnPlateau(
        o, factor=0.5, patience=0, threshold=1.0))
    assert seen == pytest.approx(history.test_loss)
    assert history.lr == pytest.approx([0.05, 0.025, 0.0125])


def test_one_cycle_is_stepped_every_batch(loaders):
    batches = len(loaders[0])
    _, optimizer, scheduler, history = run(
        loaders, epochs=2, make_scheduler=lambda o: sched.OneCycleLR(o, max_lr=0.1, total_steps=2 * batches))
    assert scheduler.last_epoch == 2 * batches
    assert history.lr[0] == pytest.approx(0.1 / 25)           # OneCycle's initial lr
    assert history.lr[1] > history.lr[0]


def test_bad_scheduler_interval_is_refused(loaders):
    with pytest.raises(ValueError, match="scheduler_interval"):
        run(loaders, epochs=1, scheduler_interval="step")


def test_best_checkpoint_and_history_json_are_written(loaders, tmp_path):
    path = tmp_path / "net_best.pth"
    model, _, _, history = run(loaders, epochs=3, checkpoint_path=path, metadata={"classes": ["a"] * 10})
    saved = json.loads(utils.history_path_for(path).read_text())
    assert saved["test_acc"] == history.test_acc and saved["lr"] == history.lr
    assert utils.History.from_json(utils.history_path_for(path)) == history
    meta = utils.load_checkpoint(path)
    best_epoch = history.test_acc.index(max(history.test_acc)) + 1
    assert meta["epoch"] == best_epoch and meta["test_acc"] == max(history.test_acc)
    assert meta["classes"] == ["a"] * 10


def test_a_new_run_keeps_the_earlier_runs_files(loaders, tmp_path):
    path = tmp_path / "net_best.pth"
    run(loaders, epochs=1, checkpoint_path=path)
    first = path.read_bytes()
    run(loaders, epochs=1, checkpoint_path=path)
    backups = sorted(p for p in tmp_path.iterdir() if p.name.startswith("net_best.") and p != path
                     and p.suffix == ".pth")
    assert [b.read_bytes() for b in backups] == [first]
    assert len(list(tmp_path.glob("net_best_history.*.json"))) == 1


def test_bfloat16_autocast_and_channels_last_work_on_the_cpu(loaders):
    model, _, _, history = run(loaders, epochs=2, amp=True, amp_dtype=torch.bfloat16, channels_last=True)
    assert history.info["amp"] == "bfloat16"
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert history.train_loss[-1] < history.train_loss[0]
    loaders[0].channels_last = loaders[1].channels_last = False


class NaNAfter(TinyNet):
    """Returns NaN logits from the `bad_call`-th training forward pass on."""
    def __init__(self, bad_call):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x):
        self.calls += self.training
        out = super().forward(x)
        return out * float("nan") if self.training and self.calls >= self.bad_call else out


def test_non_finite_loss_stops_with_epoch_and_batch_and_keeps_the_best_checkpoint(loaders, tmp_path):
    path = tmp_path / "best.pth"
    batches = len(loaders[0])
    model = NaNAfter(bad_call=batches + 3)                      # epoch 2, batch 3
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(FloatingPointError, match="epoch 2, batch 3"):
        utils.train(model, *loaders, 3, optimizer, nn.CrossEntropyLoss(), checkpoint_path=path,
                    progress=False, verbose=False)
    reloaded = TinyNet()
    meta = utils.load_checkpoint(path, reloaded)
    assert meta["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in reloaded.state_dict().values())


class InterruptAt:
    """A loader that raises KeyboardInterrupt (Ctrl-C) during its `epoch`-th pass."""
    def __init__(self, loader, epoch):
        self.loader, self.epoch, self.passes = loader, epoch, 0
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.loader):
            if self.passes == self.epoch and i == 1:
                raise KeyboardInterrupt
            yield batch


def test_interrupt_returns_the_history_so_far(loaders, capsys):
    _, _, _, history = run((InterruptAt(loaders[0], epoch=3), loaders[1]), epochs=5)
    assert history.epoch == [1, 2]
    assert "Interrupted" in capsys.readouterr().out


class RecordingWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, step))

    def flush(self):
        pass


def test_tensorboard_writer_gets_every_curve(loaders):
    writer = RecordingWriter()
    run(loaders, epochs=2, writer=writer)
    names = {name for name, _ in writer.scalars}
    assert names == {"loss/train", "loss/test", "accuracy/train", "accuracy/test", "lr"}
    assert sorted({step for _, step in writer.scalars}) == [1, 2]


def test_verbose_prints_one_line_per_epoch(loaders, capsys):
    run(loaders, epochs=2, verbose=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "test loss" in lines[0] and "lr" in lines[0]


def test_any_iterable_of_batches_works_as_a_loader(loaders):
    train_batches, test_batches = list(loaders[0]), list(loaders[1])
    _, _, _, history = run((train_batches, test_batches), epochs=2)
    assert history.epoch == [1, 2] and history.info["train_images"] is None
