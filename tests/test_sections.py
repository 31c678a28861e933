"""The helpers that pack sections 5-9 for the notebooks after CustomCNN: the test split is read
on the checkpoint validation chose, the test-time augmentation level is chosen on validation,
a saved model round-trips, and prediction works from a file and reports a failed download."""
import json

import matplotlib
import pytest
import torch
from PIL import Image

import utils
from tests import fakedata
from tests.test_train import TinyNet, make_loaders, run

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fakedata.write_cifar10_folder(root, train_per_class=16, test_per_class=4)
    return utils.load_cifar10(root, augment=utils.RandomCropFlip(padding=2))   # 140 / 20 / 40 images


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    """A TinyNet trained 4 epochs with its files kept: (model, files, history, test loader)."""
    files = utils.RunFiles(tmp_path_factory.mktemp("model"), "Tiny")
    model, _, _, history = run(make_loaders(datasets), epochs=4, files=files,
                               metadata=dict(classes=datasets[0].classes, image_size=32, input_size=32,
                                             mean=utils.CIFAR10_MEAN, std=utils.CIFAR10_STD))
    test_loader = utils.make_loader(datasets[2], 16, "cpu", shuffle=False, transform=utils.BatchTransform())
    return model, files, history, test_loader


def test_the_chosen_checkpoint_is_tested_and_recorded(trained, capsys):
    model, files, history, test_loader = trained
    torch.nn.init.zeros_(model.head.weight)                    # whatever the model holds now is replaced
    test = utils.test_chosen_model(model, files, test_loader, history)
    chosen = TinyNet()
    best = utils.load_checkpoint(files.best, chosen)
    logits, labels = utils.predict_loader(chosen, test_loader)
    assert torch.equal(test.predictions, logits.argmax(1)) and torch.equal(test.labels, labels)
    assert test.test_acc == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert test.best["epoch"] == best["epoch"] == history.best_epoch
    assert json.loads(files.history.read_text())["test_acc"] == test.test_acc == history.test_acc
    assert f"{test.test_acc:.2%}" in capsys.readouterr().out


def test_a_retrained_run_tests_its_last_epoch(datasets, tmp_path):
    """With `last_epoch=True` (validation images trained on) the last epoch is tested, not the
    best: trained at a rate where validation accuracy goes up and down, so they differ."""
    files = utils.RunFiles(tmp_path, "Tiny")
    model, _, _, history = run(make_loaders(datasets), epochs=4, lr=0.3, files=files)
    assert history.best_epoch != 4, "the test needs a run whose best epoch is not the last"
    test_loader = utils.make_loader(datasets[2], 16, "cpu", shuffle=False, transform=utils.BatchTransform())
    test = utils.test_chosen_model(TinyNet(), files, test_loader, history, last_epoch=True)
    logits, _ = utils.predict_loader(model, test_loader)             # the model as training left it
    assert torch.equal(test.predictions, logits.argmax(1)) and test.best["epoch"] == 4
    assert json.loads(files.history.read_text())["info"]["tested"] == "last epoch"


def test_the_tta_level_is_chosen_on_validation(trained, datasets):
    model, files, history, _ = trained
    val_loader = make_loaders(datasets)[1]
    level = utils.choose_tta_level(model, files, val_loader, (0, 1, 2), history)
    by_level = history.info["val_acc_by_tta_level"]
    assert set(by_level) == {0, 1, 2} and by_level[level] == max(by_level.values())
    assert level == min(k for k, v in by_level.items() if v == by_level[level])   # the first of equal ones
    utils.load_checkpoint(files.best, model)
    logits, labels = utils.predict_loader(utils.TTA(model, 1), val_loader)
    assert by_level[1] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_save_and_reload_round_trips_and_catches_a_different_model(trained, tmp_path, capsys):
    model, files, history, test_loader = trained
    test = utils.test_chosen_model(model, files, test_loader, history, tta_level=1)
    metadata = dict(classes=list(fakedata.CIFAR10_CLASSES), image_size=32, input_size=32,
                    mean=utils.CIFAR10_MEAN, std=utils.CIFAR10_STD)
    fresh = TinyNet()
    meta = utils.save_and_reload(tmp_path / "Tiny.pth", model, fresh, test_loader, test, **metadata)
    utils.assert_same_weights(model, fresh)
    assert meta["tta_level"] == 1 and meta["epoch"] == test.best["epoch"] and meta["test_acc"] == test.test_acc
    assert meta["classes"] == metadata["classes"]
    wrong = utils.TestResult(test.test_acc, (test.predictions + 1) % 10, test.labels, test.best, 1)
    with pytest.raises(AssertionError, match="predicts differently"):
        utils.save_and_reload(tmp_path / "Tiny.pth", model, TinyNet(), test_loader, wrong, **metadata)
    assert len(list(tmp_path.glob("Tiny*.pth"))) == 2                     # the first file kept aside


def test_an_example_image_is_saved_and_predicted_and_a_failed_download_is_reported(trained, datasets, tmp_path,
                                                                                  capsys, monkeypatch):
    model, _, _, _ = trained
    path, true_class = utils.save_example_image(datasets[2], tmp_path / "example.png", index=3)
    assert true_class == datasets[2].classes[int(datasets[2].labels[3])]
    assert torch.equal(utils.image_to_tensor(Image.open(path).convert("RGB")), datasets[2].images[3])
    monkeypatch.setattr("matplotlib.pyplot.show", lambda: None)
    meta = dict(classes=datasets[2].classes, image_size=32, input_size=32, mean=utils.CIFAR10_MEAN,
                std=utils.CIFAR10_STD)
    utils.predict_new_images(model, meta, path, "http://127.0.0.1:9/nothing.jpg", true_class=true_class)
    out = capsys.readouterr().out
    assert f"(true class: {true_class})" in out and "Could not predict from the URL" in out
    assert "127.0.0.1:9" in out
