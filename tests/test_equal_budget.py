"""benchmarks/equal_budget.py: the epochs that fit a budget, the notebook it runs (sections 0-9,
the recipe unchanged) and the order of probe and run; its real runs take half an hour each and are
never made in the suite."""
import pytest

from benchmarks import equal_budget


def test_the_probes_scale_to_the_whole_split_and_the_epochs_that_fit():
    # 2,250 images trained and 2,250 validated in 30 s, twice as many in 60 s: 0.01 s an image-unit
    # and nothing fixed; a full epoch is 45,000 + 5,000 / 3 units = 466.7 s, so 3 fit in 1,800 s
    epoch_s = equal_budget.full_epoch_seconds(30, 60, 2250)
    assert epoch_s == pytest.approx(466.67, abs=0.01)
    assert equal_budget.epochs_that_fit(1800, epoch_s) == 3
    assert equal_budget.epochs_that_fit(500, epoch_s) == 1
    assert equal_budget.epochs_that_fit(60, epoch_s) == 1           # at least one epoch, always
    assert equal_budget.full_epoch_seconds(30, 60, 2250, train_images=4500, val_images=500) == pytest.approx(46.67, abs=0.01)
    with pytest.raises(ValueError, match="positive"):
        equal_budget.full_epoch_seconds(0, 60, 2250)
    with pytest.raises(ValueError, match="positive"):
        equal_budget.epochs_that_fit(0, epoch_s)


def test_a_fixed_cost_per_epoch_is_paid_once_not_scaled_with_the_images():
    # 4 s of every epoch is fixed (loader workers, checkpoints), 0.001 s an image-unit on top:
    # the probes take 4 + 3 = 7 s and 4 + 6 = 10 s, and a full epoch 4 + 46.67 s, not 15.6 x 7 s
    assert equal_budget.full_epoch_seconds(7, 10, 2250) == pytest.approx(50.67, abs=0.01)
    # noise outside what a fixed cost allows: the larger probe's time, all of it per image
    assert equal_budget.full_epoch_seconds(7, 6, 2250) == pytest.approx(6 / 6000 * 46_667, abs=0.01)
    assert equal_budget.full_epoch_seconds(7, 20, 2250) == pytest.approx(20 / 6000 * 46_667, abs=0.01)


@pytest.mark.parametrize("name", ["ResNet", "CustomCNN", "LeNet5"])
def test_the_notebook_run_is_its_sections_0_to_9(name):
    cells = equal_budget.sections_0_to_9(name).cells
    headings = [line for cell in cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("## ")]
    assert headings[0] == "## 0. Setup" and headings[-1] == "## 9. Predict new images"
    assert any("parameters" in cell.metadata.get("tags", []) for cell in cells)
    assert any("utils.test_chosen_model" in cell.source or "test_acc" in cell.source for cell in cells)


def fake_notebook_runs(monkeypatch, probe_seconds: float) -> list:
    """Replace the notebook runs by ones whose epoch takes `probe_seconds` for 2,250 images and
    in proportion to the images otherwise; the calls made."""
    calls = []

    def fake_run_notebook(name, out_dir, environment, parameters):
        calls.append((out_dir, environment["SUBSET"], parameters))
        epochs, images = parameters["EPOCHS"], int(environment["SUBSET"]) or 45_000
        epoch_s = probe_seconds * images / 2250
        seconds = [2 * epoch_s] + [epoch_s] * (epochs - 1)                  # the first epoch pays for warm-up
        return {"seconds": seconds, "info": {"train_images": images}, "val_acc": [0.5] * epochs, "test_acc": 0.49}

    monkeypatch.setattr(equal_budget, "run_notebook", fake_run_notebook)
    return calls


def test_the_probe_sets_the_epochs_of_the_run(tmp_path, monkeypatch, capsys):
    calls = fake_notebook_runs(monkeypatch, probe_seconds=20.0)
    history = equal_budget.run_at_budget("LeNet5", 5, tmp_path / "LeNet5", 2250, {"DATA_DIR": "data"})
    *probes, (run_dir, run_subset, run_parameters) = calls
    assert [(probe_dir.name, subset) for probe_dir, subset, _ in probes] == [("probe-2250", "2250"),
                                                                            ("probe-4500", "4500")]
    assert all(parameters == {"EPOCHS": 2, "RESUME": False} for *_, parameters in probes)   # the second is timed
    # 20 s for 3,000 units: an epoch of 46,667 units is 311 s, so 300 s fit 1 epoch (never 0)
    assert run_dir == tmp_path / "LeNet5" and run_subset == "0" and run_parameters == {"EPOCHS": 1, "RESUME": True}
    assert history["test_acc"] == 0.49
    assert "not even one epoch fits" in capsys.readouterr().out


def test_a_warm_up_counted_in_epochs_keeps_its_share_of_the_recipe(tmp_path, monkeypatch):
    # ViT warms up for 5 of its 200 epochs; an 11-epoch run warms up for 0.275 of an epoch, not 5
    calls = fake_notebook_runs(monkeypatch, probe_seconds=10.0)
    equal_budget.run_at_budget("ViT", 30, tmp_path / "ViT", 2250, {"DATA_DIR": "data"})
    run_parameters = calls[-1][2]
    epochs = run_parameters["EPOCHS"]                 # 10 s a probe: 155.6 s an epoch, 11 fit in 1,800 s
    assert epochs == 11 and run_parameters["WARMUP_EPOCHS"] == pytest.approx(5 / 200 * epochs)


@pytest.mark.parametrize("name, tta_setting", [("ResNet", {"TTA_LEVELS": [0]}), ("Speedrun", {"TTA_LEVEL": 0}),
                                               ("LeNet5", {})])
def test_every_network_is_tested_without_test_time_augmentation(name, tta_setting, tmp_path, monkeypatch):
    import papermill

    executed = {}

    def fake_execute(source, output, parameters, **options):
        executed.update(parameters)
        (tmp_path / f"{name}_history.json").write_text('{"seconds": [1.0]}')

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    equal_budget.run_notebook(name, tmp_path, {}, {"EPOCHS": 3})
    assert executed == {**tta_setting, "EPOCHS": 3}              # only the settings the notebook has
