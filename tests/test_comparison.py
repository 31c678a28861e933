"""The generated tables (tools/make_tables.py): the lab book's side-by-side comparison (one row per
notebook, measured figures only, "not measured" everywhere else), the README's course map, the
figure, recording a run; and benchmarks/throughput.py, which measures what the comparison shows."""
import json
import shutil

import pytest

import utils
from benchmarks import throughput
from tests.test_readmes import FIGURE
from tools import make_tables as make_table


def fake_run(name: str, val_acc: list[float], test_acc: float | None, full_recipe: bool, started: str) -> dict:
    epochs = list(range(1, len(val_acc) + 1))
    return {"epoch": epochs, "train_loss": [1.0] * len(epochs), "train_acc": [0.5] * len(epochs),
            "val_loss": [1.0] * len(epochs), "val_acc": val_acc, "lr": [0.1] * len(epochs),
            "seconds": [40.0] * len(epochs), "test_acc": test_acc,
            "info": {"name": name, "note": "fake run", "full_recipe": full_recipe,
                     "device": "CPU, 2 cores (x86_64)", "started": started}}


FAKE_THROUGHPUT = {
    "machine": "CPU, 2 cores (x86_64)", "torch": "2.x", "date": "2026-11-25",
    "threads": 2, "load_average": 1.0, "rounds": 1, "warmup": 1, "memory_format": "channels_last",
    "networks": {"LeNet5": {"parameters": 62006, "mult_adds": 658238, "images_per_s": 1234.5,
                            "batch_size": 128, "input_size": 32, "steps": 5}}}


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """An empty results/ and copies of the README and the lab book, in place of the repository's."""
    results = tmp_path / "results"
    results.mkdir()
    readme, lab_book = tmp_path / "README.md", results / "README.md"
    shutil.copyfile(make_table.README, readme)
    shutil.copyfile(make_table.LAB_BOOK, lab_book)
    monkeypatch.setattr(make_table, "REPO", tmp_path)
    monkeypatch.setattr(make_table, "RESULTS", results)
    monkeypatch.setattr(make_table, "README", readme)
    monkeypatch.setattr(make_table, "LAB_BOOK", lab_book)
    monkeypatch.setattr(utils, "RESULTS_DIR", results)
    return results


def write(path, data):
    path.write_text(json.dumps(data))


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in lines[2:] if line.startswith("| "))}


def test_one_row_per_notebook_measured_figures_only(results_dir):
    # LeNet5: a short run with the higher validation accuracy, and the full-recipe run that counts
    write(results_dir / "LeNet5-short.json", fake_run("LeNet5", [0.4, 0.6543], 0.6421, False, "2026-11-20T10:00"))
    write(results_dir / "LeNet5-full.json", fake_run("LeNet5", [0.5, 0.6312, 0.6234], 0.6187, True, "2026-11-21T10:00"))
    write(results_dir / make_table.THROUGHPUT, FAKE_THROUGHPUT)
    lines = make_table.comparison()
    rows = table_rows(lines)
    assert list(rows) == make_table.ARCHITECTURES
    assert "CPU, 2 cores (x86_64)" in lines[0]
    assert rows["LeNet5"][:3] == ["62,006", "0.66 M", "1,234.5 (batch 128)"]
    assert rows["LeNet5"][3:5] == ["63.12% (epoch 2)", "61.87%"]      # as the results table formats them
    assert rows["LeNet5"][5].startswith("3 epochs x 40 s on CPU, 2 cores (x86_64)")
    for name in set(make_table.ARCHITECTURES) - {"LeNet5"}:
        assert rows[name] == [make_table.NOT_MEASURED] * 6, name
    assert set(FIGURE.findall("\n".join(lines))) == {"63.12", "61.87"}


def test_without_throughput_every_size_and_speed_says_not_measured(results_dir):
    write(results_dir / "ResNet-run.json", fake_run("ResNet", [0.7012], None, True, "2026-11-21T10:00"))
    rows = table_rows(make_table.comparison())
    assert all(cells[:3] == [make_table.NOT_MEASURED] * 3 for cells in rows.values())
    assert rows["ResNet"][3:5] == ["70.12% (epoch 1)", make_table.NOT_MEASURED]


def test_describe_run_reports_the_test_accuracy_of_the_validation_chosen_epoch():
    run = fake_run("LeNet5", [0.5, 0.6312, 0.6234], 0.6187, True, "2026-11-24T01:00:00+00:00")
    assert utils.describe_run(run) == ("test 61.87%, val 63.12% (epoch 2 of 3), 40 s per epoch on "
                                       "CPU, 2 cores (x86_64), 2026-11-24: fake run")


def test_a_run_retrained_on_its_validation_images_chooses_nothing_and_shows_no_validation_figure(results_dir):
    held_out = fake_run("Speedrun", [0.5, 0.8812], 0.8975, True, "2026-12-05T10:00")
    retrained = fake_run("Speedrun", [0.6, 0.9688], 0.8994, False, "2026-12-05T15:00")
    retrained["info"]["tested"] = "last epoch"            # as utils.test_chosen_model(..., last_epoch=True) records
    write(results_dir / "Speedrun-held-out.json", held_out)
    write(results_dir / "Speedrun-retrained.json", retrained)
    assert make_table.chosen_run("Speedrun") == held_out
    speedrun_rows = [line for line in make_table.rows() if line.startswith("| Speedrun | fake run")]
    assert len(speedrun_rows) == 2
    assert f"| {make_table.TRAINED_ON} | 89.94% |" in speedrun_rows[1] and "96.88%" not in speedrun_rows[1]
    assert utils.describe_run(retrained).startswith("test 89.94%, last epoch of 2, validation images trained on,")


def test_write_all_fills_the_readme_and_draws_the_figure(results_dir):
    write(results_dir / "LeNet5-full.json", fake_run("LeNet5", [0.5, 0.6312], 0.6187, True, "2026-11-21T10:00"))
    write(results_dir / make_table.THROUGHPUT, FAKE_THROUGHPUT)
    make_table.write_all()
    assert make_table.stale_sections() == []
    assert make_table.section_in(make_table.LAB_BOOK, make_table.START, make_table.END) == make_table.rows()
    course_map = make_table.section_in(make_table.README, make_table.MAP_START, make_table.MAP_END)
    assert course_map == make_table.course_map() and "| 61.87% |" in course_map[3]   # LeNet5, the second notebook
    png = (results_dir / make_table.FIGURE).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_figure_plots_the_test_accuracy_of_the_chosen_run_against_multiply_adds(results_dir, monkeypatch):
    write(results_dir / "LeNet5-full.json", fake_run("LeNet5", [0.5, 0.6312], 0.6187, True, "2026-11-21T10:00"))
    write(results_dir / make_table.THROUGHPUT, FAKE_THROUGHPUT)
    drawn = []
    monkeypatch.setattr(make_table.Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    make_table.write_figure()
    axes = drawn[0].axes[0]
    (point,) = axes.lines
    assert list(point.get_xdata()) == [658238] and list(point.get_ydata()) == pytest.approx([61.87])
    labels = [text.get_text() for text in axes.texts]
    assert "LeNet5, 2 epochs" in labels
    assert any(label.startswith("not measured:") and "ResNet" in label for label in labels)


def test_figure_without_any_measured_run(results_dir, monkeypatch):
    path = make_table.write_figure(results_dir / "empty.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    drawn = []
    monkeypatch.setattr(make_table.Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    make_table.write_figure()
    axes = drawn[0].axes[0]
    assert len(axes.lines) == len(axes.collections) == 0
    assert [text.get_text() for text in axes.texts] == [f"not measured: {', '.join(make_table.ARCHITECTURES)}"]


def test_measure_writes_throughput_with_exact_parameters(tmp_path):
    path = tmp_path / "throughput.json"
    throughput.main(["--networks", "LeNet5", "--batch-size", "2", "--steps", "1",
                     "--rounds", "1", "--warmup", "1", "--output", str(path)])
    measured = json.loads(path.read_text())
    assert measured["machine"] and measured["threads"] >= 1 and measured["torch"]
    lenet = measured["networks"]["LeNet5"]
    assert list(measured["networks"]) == ["LeNet5"]
    assert lenet["parameters"] == 62_006 and lenet["mult_adds"] == 658_238
    assert lenet["images_per_s"] > 0 and lenet["batch_size"] == 2 and lenet["input_size"] == 32


def test_every_generated_table_matches_results():
    assert make_table.stale_sections() == [], "run: python tools/make_tables.py"


def test_add_never_overwrites_a_recorded_run(results_dir, tmp_path):
    history = tmp_path / "history.json"
    write(history, fake_run("LeNet5", [0.5, 0.6], 0.59, True, "2026-11-24T01:15:02+00:00"))
    first = make_table.add(history, "LeNet5", "first", True, None)
    write(history, fake_run("LeNet5", [0.4, 0.7], 0.69, True, "2026-11-24T01:26:40+00:00"))
    second = make_table.add(history, "LeNet5", "second run, same day and epochs", True, None)
    assert first != second and json.loads(first.read_text())["info"]["note"] == "first"
    with pytest.raises(SystemExit, match="exists already"):
        make_table.add(history, "LeNet5", "again", True, None)


def test_a_missing_plot_adds_nothing(results_dir, tmp_path):
    history = tmp_path / "history.json"
    write(history, fake_run("LeNet5", [0.5, 0.6], 0.59, True, "2026-11-24T01:15:02+00:00"))
    with pytest.raises(SystemExit, match="no such plot"):
        make_table.add(history, "LeNet5", "first", True, tmp_path / "typo.png")
    assert list(results_dir.glob("*.json")) == []           # so the corrected command still works
    assert make_table.add(history, "LeNet5", "first", True, None).exists()


def test_measuring_some_networks_never_replaces_the_whole_throughput_file(results_dir, monkeypatch):
    recorded = results_dir / make_table.THROUGHPUT
    monkeypatch.setattr(throughput, "OUTPUT", recorded)
    write(recorded, {"networks": {"LeNet5": {}, "VGG16": {}}})
    with pytest.raises(SystemExit, match="would drop the other networks"):
        throughput.main(["--networks", "LeNet5", "--output", str(recorded)])
    assert json.loads(recorded.read_text()) == {"networks": {"LeNet5": {}, "VGG16": {}}}


def test_the_course_map_lists_every_notebook_in_order_with_what_was_measured(results_dir):
    write(results_dir / "LeNet5-full.json", fake_run("LeNet5", [0.5, 0.6312], 0.6187, True, "2026-11-21T10:00"))
    write(results_dir / "VGG16-short.json", fake_run("VGG16", [0.7], 0.69, False, "2026-11-21T10:00"))
    write(results_dir / make_table.NOTEBOOK_TIMES, {"machine": "CPU, 2 cores (x86_64)", "date": "2026-12-04",
                                                    "notebooks": {"LeNet5": {"seconds": 14.6}, "ZFNet": {"seconds": 250}}})
    rows = table_rows(make_table.course_map())
    assert [int(number) for number in rows] == list(range(1, len(make_table.NOTEBOOK_ORDER) + 1))
    assert [cells[0] for cells in rows.values()] == [f"[{name}](notebooks/{name}.ipynb)"
                                                     for name in make_table.NOTEBOOK_ORDER]
    by_name = {name: cells for name, cells in zip(make_table.NOTEBOOK_ORDER, rows.values())}
    assert by_name["LeNet5"][2:] == ["15 s", "80 s", "61.87%", "not measured"]   # 2 epochs x 40 s, the full recipe's test
    assert by_name["ZFNet"][2:] == ["4 min", "GPU recipe, not measured", "not measured", "-"]   # not in the budget race
    assert by_name["VGG16"][2:] == ["not measured"] * 4                    # a short run is not the full recipe
    assert "start here" in by_name["CustomCNN"][1]


def budget_run(name, val_acc, test_acc, minutes, started):
    run = fake_run(name, val_acc, test_acc, False, started)
    run["info"].update(budget_minutes=minutes, train_images=45_000, val_images=5_000)
    return run


def test_the_equal_budget_table_has_every_network_and_only_budget_runs(results_dir, monkeypatch):
    write(results_dir / make_table.THROUGHPUT, FAKE_THROUGHPUT)
    write(results_dir / "LeNet5-full.json", fake_run("LeNet5", [0.5, 0.6312], 0.6187, True, "2026-11-21T10:00"))
    write(results_dir / "LeNet5-budget.json", budget_run("LeNet5", [0.4, 0.5, 0.5512, 0.55], 0.5498, 30,
                                                         "2026-12-05T01:00"))
    write(results_dir / "ResNet-budget.json", budget_run("ResNet", [0.6, 0.7123], 0.7045, 30, "2026-12-05T02:00"))
    rows = table_rows(make_table.equal_budget())
    assert list(rows) == make_table.EQUAL_BUDGET
    assert {"LeNet5", "ResNet", "ViT", "Speedrun"} <= set(rows) and not {"ZFNet", "AlexNet-Flowers", "DDP"} & set(rows)
    # 4 epochs x 40 s = 2.7 min of the 30; 2 x 658,238 multiply-adds x (3 x 45,000 + 5,000) passes in 40 s
    # = 4.6 GFLOP/s; the chosen epoch is the best by validation, never the full-recipe run
    assert rows["LeNet5"] == ["62,006", "0.66 M", "30 min", "4", "2.7 min", "5 GFLOP/s", "55.12% (epoch 3)", "54.98%",
                              "CPU, 2 cores (x86_64), 2026-12-05"]
    assert rows["ResNet"][:2] == [make_table.NOT_MEASURED] * 2 and rows["ResNet"][5:8] == ["", "71.23% (epoch 2)",
                                                                                          "70.45%"]
    assert rows["VGG16"][6:8] == [make_table.NOT_MEASURED] * 2
    course_map = {cells[0]: cells for cells in table_rows(make_table.course_map()).values()}
    assert course_map["[LeNet5](notebooks/LeNet5.ipynb)"][-1] == "54.98% in 30 min"
    drawn = []
    monkeypatch.setattr(make_table.Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    make_table.write_equal_budget_figure()
    by_time, by_size, by_work = drawn[0].axes
    assert [line.get_label() for line in by_time.lines] == ["LeNet5", "ResNet"]
    assert list(by_time.lines[0].get_xdata()) == pytest.approx([40 / 60, 80 / 60, 120 / 60, 160 / 60])
    assert [list(line.get_xdata()) for line in by_size.lines] == [[62006]]    # ResNet's size is not measured
    assert list(by_work.lines[0].get_ydata()) == pytest.approx([54.98])


def test_a_run_is_not_both_the_full_recipe_and_a_budget_run(results_dir, tmp_path):
    history = tmp_path / "history.json"
    write(history, fake_run("LeNet5", [0.5, 0.6], 0.59, False, "2026-11-24T01:15:02+00:00"))
    with pytest.raises(SystemExit, match="not both"):
        make_table.add(history, "LeNet5", "both", True, None, budget_minutes=30)
    recorded = make_table.add(history, "LeNet5", "equal CPU budget", False, None, budget_minutes=30)
    assert json.loads(recorded.read_text())["info"]["budget_minutes"] == 30
