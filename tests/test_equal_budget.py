"""benchmarks/equal_budget.py: the epochs that fit a budget, the notebook it runs (sections 0-9,
the recipe unchanged) and the order of probe and run; its real runs take half an hour each and are
never made in the suite."""
import pytest

from benchmarks import equal_budget


def test_epochs_that_fit_scale_the_probe_to_the_whole_split():
    # 2,250 images trained and 2,250 validated in 30 s: 30 / 3,000 image-units = 0.01 s a unit;
    # a full epoch is 45,000 + 5,000 / 3 units = 466.7 s, so 3 fit in 1,800 s and 1 in 500 s
    assert equal_budget.epochs_that_fit(1800, 30, 2250) == 3
    assert equal_budget.epochs_that_fit(500, 30, 2250) == 1
    assert equal_budget.epochs_that_fit(60, 30, 2250) == 1           # at least one epoch, always
    assert equal_budget.epochs_that_fit(1800, 30, 2250, train_images=4500, val_images=500) == 38
    with pytest.raises(ValueError, match="positive"):
        equal_budget.epochs_that_fit(1800, 0, 2250)


@pytest.mark.parametrize("name", ["ResNet", "CustomCNN", "LeNet5"])
def test_the_notebook_run_is_its_sections_0_to_9(name):
    cells = equal_budget.sections_0_to_9(name).cells
    headings = [line for cell in cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("## ")]
    assert headings[0] == "## 0. Setup" and headings[-1] == "## 9. Predict new images"
    assert any("parameters" in cell.metadata.get("tags", []) for cell in cells)
    assert any("utils.test_chosen_model" in cell.source or "test_acc" in cell.source for cell in cells)


def test_the_probe_sets_the_epochs_of_the_run(tmp_path, monkeypatch):
    calls = []

    def fake_run_notebook(name, out_dir, environment, parameters):
        calls.append((out_dir, environment["SUBSET"], parameters))
        epochs = parameters["EPOCHS"]
        return {"seconds": [20.0] * epochs, "info": {"train_images": 2250 if epochs == 1 else 45000},
                "val_acc": [0.5] * epochs, "test_acc": 0.49}

    monkeypatch.setattr(equal_budget, "run_notebook", fake_run_notebook)
    history = equal_budget.run_at_budget("LeNet5", 5, tmp_path / "LeNet5", 2250, {"DATA_DIR": "data"})
    (probe_dir, probe_subset, probe_parameters), (run_dir, run_subset, run_parameters) = calls
    assert probe_dir == tmp_path / "LeNet5" / "probe" and probe_subset == "2250"
    assert probe_parameters == {"EPOCHS": 1, "RESUME": False}
    # 20 s for 3,000 units: an epoch of 46,667 units is 311 s, so 300 s fit 1 epoch (never 0)
    assert run_dir == tmp_path / "LeNet5" and run_subset == "0" and run_parameters == {"EPOCHS": 1, "RESUME": True}
    assert history["test_acc"] == 0.49
