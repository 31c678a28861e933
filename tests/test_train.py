"""utils.train: the evaluation protocol (validation only), schedulers, history, checkpoints,
resuming bit for bit, AMP and channels_last on the CPU, failures."""
import json
import math
import os
import signal

import pytest
import torch
import torch.nn as nn

import utils
from tests import fakedata

optim = torch.optim
sched = torch.optim.lr_scheduler


class TinyNet(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width * 4 * 4, 10)

    def forward(self, x):                                     # (B, 3, 32, 32)
        x = nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 4)
        return self.head(x.flatten(1))                         # (B, 10)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fakedata.write_cifar10_folder(root, train_per_class=16, test_per_class=4)
    return utils.load_cifar10(root, augment=utils.RandomCropFlip(padding=2))   # 140 / 20 / 40 images


def make_loaders(datasets, batch_size=32):
    train_set, val_set, _ = datasets
    transform = utils.BatchTransform()
    return (utils.make_loader(train_set, batch_size, "cpu", shuffle=True, transform=transform),
            utils.make_loader(val_set, 64, "cpu", shuffle=False, transform=transform))


@pytest.fixture(scope="module")
def loaders(datasets):
    return make_loaders(datasets)


def run(loaders, epochs=3, lr=0.05, make_scheduler=None, model=None, **options):
    utils.seed_everything(0)
    model = model or TinyNet()
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    options.setdefault("progress", False)
    options.setdefault("verbose", False)
    history = utils.train(model, *loaders, epochs, optimizer, nn.CrossEntropyLoss(), scheduler, **options)
    return model, optimizer, scheduler, history


class Counting:
    """A loader that counts its passes."""
    def __init__(self, loader):
        self.loader, self.passes = loader, 0
        self.dataset, self.batch_size = loader.dataset, loader.batch_size
        self.generator = getattr(loader, "generator", None)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        yield from self.loader


# ---- the evaluation protocol ----------------------------------------------------------------

def test_loss_falls_and_accuracy_rises_on_learnable_data(loaders):
    _, _, _, history = run(loaders, epochs=4)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.val_acc[-1] > 0.6                           # chance is 0.1
    assert history.test_acc is None                            # train never measures the test set


def test_train_validates_once_per_epoch_and_leaves_test_acc_to_the_notebook(loaders, tmp_path):
    train_loader, val_loader = Counting(loaders[0]), Counting(loaders[1])
    _, _, _, history = run((train_loader, val_loader), epochs=3, files=utils.RunFiles(tmp_path, "net"),
                           make_scheduler=lambda o: sched.ReduceLROnPlateau(o, patience=0))
    assert (train_loader.passes, val_loader.passes) == (3, 3) and history.test_acc is None
    assert history.info["val_images"] == 20 and history.info["train_images"] == 140


def test_reduce_on_plateau_is_stepped_with_the_validation_loss(loaders, monkeypatch):
    seen = []
    original = sched.ReduceLROnPlateau.step
    monkeypatch.setattr(sched.ReduceLROnPlateau, "step",
                        lambda self, metric: (seen.append(metric), original(self, metric))[1])
    # threshold=1: no epoch counts as an improvement, so every step halves the rate
    _, optimizer, _, history = run(loaders, epochs=3, make_scheduler=lambda o: sched.ReduceLROnPlateau(
        o, factor=0.5, patience=0, threshold=1.0))
    assert seen == history.val_loss                            # exactly these, in this order
    assert seen != history.train_loss
    assert history.lr == pytest.approx([0.05, 0.025, 0.0125])


def test_best_checkpoint_is_the_epoch_with_the_highest_val_acc(loaders, tmp_path):
    files = utils.RunFiles(tmp_path, "net")
    # a high rate makes val accuracy go up and down, so the best is not simply the last epoch
    model, _, _, history = run(loaders, epochs=4, lr=0.3, files=files, metadata={"classes": ["a"] * 10})
    best = history.val_acc.index(max(history.val_acc)) + 1     # earliest on ties
    assert history.best_epoch == best and history.best_val_acc == max(history.val_acc)
    meta = utils.load_checkpoint(files.best, TinyNet())
    assert meta["epoch"] == history.best_epoch and meta["val_acc"] == history.best_val_acc
    assert meta["classes"] == ["a"] * 10 and meta["arch"] == "TinyNet"
    last = TinyNet()
    assert utils.load_checkpoint(files.last, last)["epoch"] == 4
    utils.assert_same_weights(last, model)


def test_history_is_complete(loaders):
    _, _, _, history = run(loaders, epochs=2)
    assert history.epoch == [1, 2] and len(history) == 2
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"):
        values = getattr(history, name)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), name
    assert all(0 <= a <= 1 for a in history.train_acc + history.val_acc)
    assert history.info["model"] == "TinyNet" and history.info["train_images"] == 140
    assert not hasattr(history, "test_loss")


@pytest.mark.parametrize("make_scheduler, expected_lrs", [
    (None, [0.05, 0.05, 0.05, 0.05]),
    (lambda o: sched.StepLR(o, step_size=2, gamma=0.5), [0.05, 0.05, 0.025, 0.025]),
    (lambda o: sched.MultiStepLR(o, milestones=[1, 3], gamma=0.1), [0.05, 0.005, 0.005, 0.0005]),
    (lambda o: sched.CosineAnnealingLR(o, T_max=4), [0.05 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
])
def test_per_epoch_schedulers_step_once_per_epoch(loaders, make_scheduler, expected_lrs):
    _, _, _, history = run(loaders, epochs=4, make_scheduler=make_scheduler)
    assert history.lr == pytest.approx(expected_lrs)


def test_one_cycle_is_stepped_every_batch(loaders):
    batches = len(loaders[0])
    _, optimizer, scheduler, history = run(
        loaders, epochs=2, make_scheduler=lambda o: sched.OneCycleLR(o, max_lr=0.1, total_steps=2 * batches))
    assert scheduler.last_epoch == 2 * batches
    assert history.lr[0] == pytest.approx(0.1 / 25)           # OneCycle's initial lr
    assert history.lr[1] > history.lr[0]


def test_log_every_below_one_is_refused(loaders):
    with pytest.raises(ValueError, match="log_every .* at least 1, got 0"):
        run(loaders, epochs=1, log_every=0)


def test_bad_scheduler_interval_is_refused(loaders):
    with pytest.raises(ValueError, match="scheduler_interval"):
        run(loaders, epochs=1, scheduler_interval="step")


# ---- files ----------------------------------------------------------------------------------

def test_run_files_names():
    files = utils.RunFiles("m", "net")
    assert (files.best.name, files.last.name, files.history.name) == ("net_best.pth", "net_last.pth",
                                                                      "net_history.json")
    assert files.best.parent.name == "m"


class RecordingFiles(Counting):
    """A training loader that records, as each pass begins, which epochs the run's files hold."""
    def __init__(self, loader, files):
        super().__init__(loader)
        self.files, self.on_disk = files, []

    def __iter__(self):
        history = json.loads(self.files.history.read_text())["epoch"] if self.files.history.exists() else None
        last = utils.load_checkpoint(self.files.last, TinyNet())["epoch"] if self.files.last.exists() else None
        self.on_disk.append((history, last))
        yield from super().__iter__()


def test_history_json_is_written_after_every_epoch(loaders, tmp_path):
    files = utils.RunFiles(tmp_path, "net")
    recording = RecordingFiles(loaders[0], files)
    _, _, _, history = run((recording, loaders[1]), epochs=3, files=files)
    assert recording.on_disk == [(None, None), ([1], 1), ([1, 2], 2)]   # each epoch saved before the next
    saved = json.loads(files.history.read_text())
    assert saved["val_acc"] == history.val_acc and saved["lr"] == history.lr and saved["test_acc"] is None
    assert utils.History.from_json(files.history) == history
    history.test_acc = 0.5
    history.to_json(tmp_path / "h.json")
    assert utils.History.from_json(tmp_path / "h.json").test_acc == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.json", "net_best.pth", "net_history.json",
                                                          "net_last.pth"]      # no temporary files


def test_a_new_run_keeps_the_earlier_runs_files(loaders, tmp_path):
    files = utils.RunFiles(tmp_path, "net")
    run(loaders, epochs=1, files=files)
    first = {path.name: path.read_bytes() for path in (files.best, files.last, files.history)}
    run(loaders, epochs=1, lr=0.01, files=files)                # resume=False: a fresh run
    kept = {}
    for path in tmp_path.iterdir():
        if path.name not in first:
            stem = path.name.split(".")[0]
            kept[f"{stem}{path.suffix}"] = path.read_bytes()
    assert kept == first                                       # nothing lost, each renamed aside
    assert all(path.exists() for path in (files.best, files.last, files.history))
    assert files.best.read_bytes() != first["net_best.pth"]


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
    files = utils.RunFiles(tmp_path, "net")
    batches = len(loaders[0])
    model = NaNAfter(bad_call=batches + 3)                      # epoch 2, batch 3
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(FloatingPointError, match="epoch 2, batch 3"):
        utils.train(model, *loaders, 3, optimizer, nn.CrossEntropyLoss(), files=files,
                    progress=False, verbose=False)
    reloaded = TinyNet()
    meta = utils.load_checkpoint(files.best, reloaded)
    assert meta["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in reloaded.state_dict().values())
    assert utils.History.from_json(files.history).epoch == [1]


def test_non_finite_loss_is_caught_within_log_every_batches_and_named_exactly(loaders):
    batches = len(loaders[0])
    model = NaNAfter(bad_call=batches + 4)                      # epoch 2, batch 4: in the second window of 2
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(FloatingPointError, match="epoch 2, batch 4:"):
        utils.train(model, *loaders, 3, optimizer, nn.CrossEntropyLoss(), log_every=2,
                    progress=False, verbose=False)
    assert model.calls == batches + 4                           # stopped at the check right after it


def record_weight_layouts(model):
    """During forward passes: whether the convolution's weight is channels_last."""
    layouts = []
    model.conv.register_forward_pre_hook(
        lambda module, args: layouts.append(module.weight.is_contiguous(memory_format=torch.channels_last)))
    return layouts


def test_bfloat16_autocast_and_channels_last_work_on_the_cpu(loaders):
    model = TinyNet()
    layouts = record_weight_layouts(model)
    model, _, _, history = run(loaders, epochs=2, amp=True, amp_dtype=torch.bfloat16, channels_last=True,
                               model=model)
    assert history.info["amp"] == "bfloat16" and history.info["channels_last"] is True
    assert layouts and all(layouts)                              # trained in channels_last
    assert model.conv.weight.is_contiguous()                    # and handed back in the usual layout
    assert history.train_loss[-1] < history.train_loss[0]


@pytest.mark.parametrize("channels_last", [None, False])
def test_channels_last_default_follows_the_device_type(loaders, channels_last):
    model = TinyNet()
    layouts = record_weight_layouts(model)
    model, _, _, history = run(loaders, epochs=1, model=model, channels_last=channels_last)
    expected = utils.CHANNELS_LAST_DEFAULT["cpu"] if channels_last is None else False
    assert history.info["channels_last"] == expected
    assert set(layouts) == {expected}
    assert model.conv.weight.is_contiguous()


def test_the_model_is_handed_back_in_the_usual_layout_after_an_interrupt(loaders):
    model, _, _, history = run((InterruptAt(loaders[0], epoch=2), loaders[1]), epochs=3, channels_last=True)
    assert history.epoch == [1] and model.conv.weight.is_contiguous()


def batch_signature(loader):
    images, labels = next(iter(loader))
    return (images.shape, images.stride(), images.dtype, images.is_contiguous(),
            images.is_contiguous(memory_format=torch.channels_last), labels.shape, labels.dtype)


def test_train_does_not_change_the_callers_loaders(datasets):
    train_loader, val_loader = make_loaders(datasets)
    before = [(dict(vars(loader)), dict(vars(loader.loader)), batch_signature(loader))
              for loader in (train_loader, val_loader)]
    val_batches = [(images.clone(), labels.clone()) for images, labels in val_loader]
    utils.seed_everything(1)                                   # the sample is augmented
    samples = train_loader.sample(8)
    run((train_loader, val_loader), epochs=2, channels_last=True)
    after = [(dict(vars(loader)), dict(vars(loader.loader)), batch_signature(loader))
             for loader in (train_loader, val_loader)]
    for (attrs, inner, signature), (attrs_now, inner_now, signature_now) in zip(before, after):
        assert attrs.keys() == attrs_now.keys() and inner.keys() == inner_now.keys()
        assert all(attrs[k] is attrs_now[k] for k in attrs)     # the same objects, none replaced
        assert all(inner[k] is inner_now[k] or inner[k] == inner_now[k] for k in inner
                   if not k.startswith("_"))
        assert signature == signature_now
    for (images, labels), (images_now, labels_now) in zip(val_batches, val_loader):
        assert torch.equal(images, images_now) and torch.equal(labels, labels_now)
        assert images.stride() == images_now.stride()
    utils.seed_everything(1)
    samples_now = train_loader.sample(8)
    assert torch.equal(samples[0], samples_now[0]) and samples[0].stride() == samples_now[0].stride()


class ZeroLogits(nn.Module):
    """Scores every class 0 for every image: its loss is log(10) and it always predicts class 0."""
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):                                      # (B, 3, 32, 32)
        return torch.zeros(len(x), 10) + 0 * self.unused       # (B, 10)


def test_losses_and_accuracies_are_means_per_image(datasets, loaders):
    _, _, _, history = run(loaders, epochs=1, lr=0.0, model=ZeroLogits())
    assert history.train_loss == pytest.approx([math.log(10)]) and history.val_loss == pytest.approx([math.log(10)])
    assert history.train_acc == pytest.approx([(datasets[0].labels == 0).float().mean().item()])
    assert history.val_acc == pytest.approx([(datasets[1].labels == 0).float().mean().item()])


def test_history_chooses_the_earliest_of_equal_best_epochs():
    history = utils.History(epoch=[1, 2, 3], val_acc=[0.5, 0.7, 0.7])
    assert history.best_epoch == 2 and history.best_val_acc == 0.7
    assert utils.History().best_epoch is None and math.isnan(utils.History().best_val_acc)


def test_per_class_accuracy_reads_rows_as_true_classes_and_gives_nan_for_an_empty_class():
    matrix = utils.confusion_matrix(torch.tensor([1, 1, 0, 1]), torch.tensor([0, 0, 0, 1]), 3)
    assert matrix.tolist() == [[1, 2, 0], [0, 1, 0], [0, 0, 0]]            # row = true class
    accuracy = utils.per_class_accuracy(matrix)
    assert accuracy[:2].tolist() == pytest.approx([1 / 3, 1.0]) and math.isnan(accuracy[2])


def test_confusion_matrix_matches_a_hand_count():
    generator = torch.Generator().manual_seed(0)
    labels, predictions = torch.randint(0, 4, (200,), generator=generator), torch.randint(0, 4, (200,), generator=generator)
    expected = torch.zeros(4, 4, dtype=torch.long)
    for true, predicted in zip(labels.tolist(), predictions.tolist()):
        expected[true, predicted] += 1
    assert torch.equal(utils.confusion_matrix(predictions, labels, 4), expected)


@pytest.mark.parametrize("predictions, labels, words", [
    ([0], [3], "labels must lie in 0..2"),           # would be counted as another class
    ([-1], [0], "predictions must lie in 0..2"),
    (torch.zeros(4, 3), [0, 1, 2, 0], "1-D tensors"),  # logits instead of class indices
    ([0, 1], [0], "same length"),
])
def test_confusion_matrix_names_bad_input(predictions, labels, words):
    with pytest.raises(ValueError, match=words):
        utils.confusion_matrix(torch.as_tensor(predictions), torch.as_tensor(labels), 3)


def test_tta_averages_the_right_views_and_is_the_network_in_training():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(utils.TTA(net, 0).eval()(images), net(images))
        assert torch.allclose(utils.TTA(net, 1).eval()(images), (net(images) + net(images.flip(3))) / 2)
        assert torch.equal(utils.TTA(net, 2).train()(images), net(images))
        padded = nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        views = [images, padded[..., :-2, :-2], padded[..., 2:, 2:]]
        mirrored = [(net(view) + net(view.flip(3))) / 2 for view in views]
        assert torch.allclose(utils.TTA(net, 2).eval()(images), mirrored[0] / 2 + mirrored[1] / 4 + mirrored[2] / 4)
        # level 1 gives a mirrored image the same scores as the image: the mirror is averaged in either way
        assert torch.allclose(utils.TTA(net, 1).eval()(images.flip(3)), utils.TTA(net, 1).eval()(images), atol=1e-6)


@pytest.mark.parametrize("level", [-1, 3, "1"])
def test_tta_refuses_unknown_levels(level):
    with pytest.raises(ValueError, match="TTA level must be 0, 1 or 2"):
        utils.TTA(nn.Identity(), level)


# ---- interrupting and resuming --------------------------------------------------------------

class InterruptAt(Counting):
    """A loader that raises KeyboardInterrupt (Ctrl-C) in the middle of its `epoch`-th pass."""
    def __init__(self, loader, epoch):
        super().__init__(loader)
        self.epoch = epoch

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.loader):
            if self.passes == self.epoch and i == len(self.loader) // 2:
                raise KeyboardInterrupt
            yield batch


def test_interrupt_returns_the_history_so_far(loaders, capsys):
    _, _, _, history = run((InterruptAt(loaders[0], epoch=3), loaders[1]), epochs=5)
    assert history.epoch == [1, 2]
    assert "Interrupted" in capsys.readouterr().out


class ResumeNet(nn.Module):
    """Small, but with everything a resume must restore: BatchNorm buffers and Dropout's RNG."""
    def __init__(self, width=6):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(width * 16, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def sgd_step(model, lr):
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return optimizer, sched.StepLR(optimizer, step_size=1, gamma=0.7)


def adamw_plateau(model, lr):
    optimizer = optim.AdamW(model.parameters(), lr=lr / 50)
    return optimizer, sched.ReduceLROnPlateau(optimizer, factor=0.5, patience=0, threshold=0.5)


def sgd_one_cycle(model, lr):
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return optimizer, sched.OneCycleLR(optimizer, max_lr=lr, total_steps=4 * 7)   # 4 epochs of 7 batches


def resume_run(datasets, files, epochs=4, interrupt_epoch=None, resume=False, lr=0.05, width=6,
               recipe=sgd_step, **options):
    utils.seed_everything(0)
    model = ResumeNet(width)
    optimizer, scheduler = recipe(model, lr)
    train_loader, val_loader = make_loaders(datasets, batch_size=20)
    if interrupt_epoch:
        train_loader = InterruptAt(train_loader, interrupt_epoch)
    history = utils.train(model, train_loader, val_loader, epochs, optimizer, nn.CrossEntropyLoss(), scheduler,
                          files=files, resume=resume, progress=False, verbose=False, **options)
    return model, history


@pytest.fixture(scope="module")
def uninterrupted(datasets, tmp_path_factory):
    files = utils.RunFiles(tmp_path_factory.mktemp("whole"), "net")
    return (*resume_run(datasets, files), files)


def test_an_interrupted_run_resumes_bit_for_bit(datasets, uninterrupted, tmp_path, capsys):
    whole_model, whole, _ = uninterrupted
    files = utils.RunFiles(tmp_path, "net")
    _, cut = resume_run(datasets, files, interrupt_epoch=3)
    assert cut.epoch == [1, 2]
    assert utils.load_checkpoint(files.last, ResumeNet())["epoch"] == 2
    resumed_model, resumed = resume_run(datasets, files, resume=True)
    assert "Resuming net after epoch 2 of 4" in capsys.readouterr().out
    utils.assert_same_weights(resumed_model, whole_model)
    assert resumed.epoch == [1, 2, 3, 4]
    assert resumed.val_acc == whole.val_acc and resumed.val_loss == whole.val_loss
    assert resumed.train_loss == whole.train_loss and resumed.lr == whole.lr
    assert utils.History.from_json(files.history).val_acc == whole.val_acc
    assert not list(tmp_path.glob("net_*.*.*"))                  # resuming renames nothing aside


def test_a_resumed_one_cycle_run_continues_its_schedule(datasets, tmp_path):
    _, whole = resume_run(datasets, utils.RunFiles(tmp_path / "whole", "net"), recipe=sgd_one_cycle)
    files = utils.RunFiles(tmp_path / "cut", "net")
    resume_run(datasets, files, interrupt_epoch=3, recipe=sgd_one_cycle)
    _, resumed = resume_run(datasets, files, resume=True, recipe=sgd_one_cycle)
    assert resumed.lr == whole.lr and resumed.val_acc == whole.val_acc and resumed.train_loss == whole.train_loss


def test_ctrl_c_during_a_save_waits_until_the_epoch_is_saved_whole(datasets, tmp_path, monkeypatch, capsys):
    files = utils.RunFiles(tmp_path, "net")
    atomic_open = utils.atomic_open

    def open_after_ctrl_c(path):
        if path == files.last:
            os.kill(os.getpid(), signal.SIGINT)          # Ctrl-C between the best and the last checkpoint
        return atomic_open(path)

    monkeypatch.setattr(utils, "atomic_open", open_after_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)    # as in a terminal or Jupyter
    try:
        _, history = resume_run(datasets, files, epochs=3)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # Ctrl-C works as before
    finally:
        signal.signal(signal.SIGINT, previous)        # CI may run the suite with Ctrl-C ignored
    assert history.epoch == [1] and "Interrupted" in capsys.readouterr().out
    assert utils.load_checkpoint(files.best, ResumeNet())["epoch"] == 1
    assert utils.load_checkpoint(files.last, ResumeNet())["epoch"] == 1
    assert utils.History.from_json(files.history).epoch == [1]


def test_a_run_saved_without_amp_resumes_with_float16_amp(datasets, tmp_path):
    files = utils.RunFiles(tmp_path, "net")
    resume_run(datasets, files, interrupt_epoch=2)                        # AMP off: the scaler saved nothing
    _, resumed = resume_run(datasets, files, resume=True, amp=True, amp_dtype=torch.float16)
    assert resumed.epoch == [1, 2, 3, 4] and all(math.isfinite(loss) for loss in resumed.train_loss)


def test_resuming_restores_adamw_and_reduce_on_plateau_too(datasets, tmp_path):
    whole_model, whole = resume_run(datasets, utils.RunFiles(tmp_path / "whole", "net"), epochs=3,
                                    recipe=adamw_plateau)
    assert whole.lr[-1] < whole.lr[0]                           # the plateau scheduler acted
    files = utils.RunFiles(tmp_path / "cut", "net")
    resume_run(datasets, files, epochs=3, interrupt_epoch=2, recipe=adamw_plateau)
    model, history = resume_run(datasets, files, epochs=3, resume=True, recipe=adamw_plateau)
    utils.assert_same_weights(model, whole_model)
    assert history.val_acc == whole.val_acc and history.lr == whole.lr


def test_resuming_a_finished_run_trains_no_more(datasets, uninterrupted, tmp_path):
    whole_model, whole, whole_files = uninterrupted
    files = utils.RunFiles(tmp_path, "net")
    for name in ("last", "best", "history"):
        getattr(files, name).write_bytes(getattr(whole_files, name).read_bytes())
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    model, history = resume_run(datasets, files, resume=True)
    assert history.epoch == [1, 2, 3, 4] and history.val_acc == whole.val_acc
    utils.assert_same_weights(model, whole_model)
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


@pytest.mark.parametrize("change, names", [
    (dict(epochs=5), ["num_epochs", "4 in the file, 5 now"]),
    (dict(lr=0.1), ["optimizer_settings", "'lr': 0.05", "'lr': 0.1"]),
])
def test_resuming_with_another_recipe_is_refused(datasets, tmp_path, change, names):
    files = utils.RunFiles(tmp_path, "net")
    resume_run(datasets, files, interrupt_epoch=2)
    before = files.last.read_bytes()
    with pytest.raises(ValueError, match="cannot resume") as info:
        resume_run(datasets, files, resume=True, **change)
    message = str(info.value)
    assert message.startswith(str(files.last))
    for name in names:
        assert name in message, name
    assert "num_epochs" not in message or "epochs" in change        # only the difference is listed
    assert files.last.read_bytes() == before


def test_resuming_another_architecture_names_the_layer(datasets, tmp_path):
    files = utils.RunFiles(tmp_path, "net")
    resume_run(datasets, files, interrupt_epoch=2)
    with pytest.raises(ValueError, match="do not fit this ResumeNet") as info:
        resume_run(datasets, files, resume=True, width=4)
    message = str(info.value)
    assert message.startswith(str(files.last))
    assert "features.0.weight: (6, 3, 3, 3) in the file, (4, 3, 3, 3) in the model" in message


def test_resume_without_a_last_file_starts_at_epoch_one(datasets, uninterrupted, tmp_path, capsys):
    whole_model, whole, _ = uninterrupted
    _, history = resume_run(datasets, utils.RunFiles(tmp_path, "net"), epochs=1, resume=True)
    assert "starting at epoch 1" in capsys.readouterr().out
    assert history.epoch == [1] and history.val_acc == whole.val_acc[:1]   # the same as a fresh run


def test_resume_needs_files(loaders):
    with pytest.raises(ValueError, match="RunFiles"):
        run(loaders, epochs=1, resume=True)


# ---- other loaders and outputs --------------------------------------------------------------

class RecordingWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def flush(self):
        pass


def test_tensorboard_writer_gets_every_curve(loaders):
    writer = RecordingWriter()
    _, _, _, history = run(loaders, epochs=2, writer=writer)
    curves = {"loss/train": history.train_loss, "loss/val": history.val_loss, "accuracy/train": history.train_acc,
              "accuracy/val": history.val_acc, "lr": history.lr}
    assert {name for name, _, _ in writer.scalars} == set(curves)
    for name, values in curves.items():
        assert {step: value for n, value, step in writer.scalars if n == name} == dict(zip(history.epoch, values))


def test_verbose_prints_one_line_per_epoch(loaders, capsys):
    run(loaders, epochs=2, verbose=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "val loss" in lines[0] and "lr" in lines[0] and "test" not in lines[0]


def test_any_iterable_of_batches_works_as_a_loader(loaders):
    train_batches, val_batches = list(loaders[0]), list(loaders[1])
    _, _, _, history = run((train_batches, val_batches), epochs=2)
    assert history.epoch == [1, 2] and history.info["train_images"] is None


class EpochAware(Counting):
    """A loader with `set_epoch`, like PyTorch's DistributedSampler: records what it was told."""
    def __init__(self, loader):
        super().__init__(loader)
        self.told = []

    def set_epoch(self, epoch):
        self.told.append(epoch)


def test_a_loader_with_set_epoch_is_told_each_epoch_before_it_is_iterated(loaders):
    loader = EpochAware(loaders[0])
    run((loader, loaders[1]), epochs=3)
    assert loader.told == [1, 2, 3] and loader.passes == 3


def test_a_resumed_run_tells_the_loader_the_epochs_it_continues_with(datasets, tmp_path):
    files = utils.RunFiles(tmp_path, "net")
    resume_run(datasets, files, epochs=3, interrupt_epoch=2)       # cut in epoch 2 of 3
    utils.seed_everything(0)
    model = ResumeNet()
    optimizer, scheduler = sgd_step(model, 0.05)
    train_loader, val_loader = make_loaders(datasets, batch_size=20)
    loader = EpochAware(train_loader)
    utils.train(model, loader, val_loader, 3, optimizer, nn.CrossEntropyLoss(), scheduler,
                files=files, resume=True, progress=False, verbose=False)
    assert loader.told == [2, 3]
