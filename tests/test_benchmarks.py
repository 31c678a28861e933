"""The benchmark scripts run end to end on generated data, so they cannot rot unnoticed;
and the batch transform's speed-up (normalising before upscaling) changes no pixel."""
import importlib.util
import json
import pathlib
import time

import pytest
import torch
import torch.nn.functional as F

import utils
from tests.fakedata import write_cifar10_folder

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchdata")
    write_cifar10_folder(root, train_per_class=8, test_per_class=4)
    return root


def test_input_pipeline_benchmark_measures_every_pipeline(data_dir, capsys):
    results = load_script("input_pipeline").main(
        ["--data-dir", str(data_dir), "--images", "40", "--batch-size", "8", "--rounds", "1",
         "--seconds", "0", "--batches", "2", "--sizes", "32", "64"])
    assert set(results) == {32, 64}
    for row in results.values():
        assert row["pil"] > 0 and row["host"] > 0 and row["cpu_e2e"] > 0
        assert row["host_ratio"] == pytest.approx(row["host"] / row["pil"])
    out = capsys.readouterr().out
    for size, row in results.items():                        # the printed table shows the returned figures
        assert f"| {size} | {row['pil']:,.0f} | {row['host']:,.0f} | {row['cpu_e2e']:,.0f} |" in out
    assert results[32]["target_met"] == (results[32]["host_ratio"] >= 3) and results[64]["target_met"]  # none at 64
    assert "target at 32 px" in out


def test_train_loop_benchmark_compares_both_loops(data_dir, capsys):
    results = load_script("train_loop").main(
        ["--data-dir", str(data_dir), "--images", "32", "--batch-size", "16", "--rounds", "2",
         "--predictions", "200", "--threads", "0",    # 0: leave the suite's thread count alone
         "--only", "train_loop", "per_class"])        # channels_last: tested on its own below
    train_loop = load_script("train_loop")
    assert results["train_ratio"] > 0 and results["train_wall_ratio"] > 0
    assert results["train_target_met"] == (results["train_ratio"] <= train_loop.TRAIN_OVERHEAD_TARGET)
    assert results["per_class_speedup"] > 1                  # a Python loop over 200 images never wins
    assert results["per_class_target_met"] == (results["per_class_speedup"] >= train_loop.PER_CLASS_SPEEDUP_TARGET)
    out = capsys.readouterr().out                            # the printed table shows the returned figures
    assert f"| {results['train_ratio']:.3f} | <= {train_loop.TRAIN_OVERHEAD_TARGET:.2f}" in out
    assert f"({results['per_class_speedup']:,.0f}x faster)" in out


class SlowNet(torch.nn.Module):
    """A linear classifier whose every forward pass takes at least `seconds`."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.fc = torch.nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.fc(x.flatten(1))


def test_training_images_per_s_counts_the_images_of_every_timed_step():
    train_loop = load_script("train_loop")
    batches = train_loop.random_batches(3, 4, 8, 10)
    assert [(images.shape, labels.shape) for images, labels in batches] == [((4, 3, 8, 8), (4,))] * 3
    assert all(torch.equal(a, b) for a, b in zip(batches[0], train_loop.random_batches(1, 4, 8, 10)[0]))
    rate = train_loop.training_images_per_s(SlowNet(0.02), batches, rounds=2)
    assert 12 / (3 * 0.02) / 4 < rate <= 12 / (3 * 0.02)      # 12 images, 3 steps of at least 20 ms


def test_training_images_per_s_divides_all_timed_images_by_the_median_pass(monkeypatch):
    train_loop = load_script("train_loop")
    passes = iter([(0.1, 0.1), (0.5, 0.5), (0.4, 0.4), (2.0, 2.0)])   # the untimed warmup, then 3 rounds
    monkeypatch.setattr(train_loop, "training_steps", lambda *args: next(passes))
    batches = train_loop.random_batches(3, 4, 8, 10)
    assert train_loop.training_images_per_s(SlowNet(0), batches, rounds=3) == pytest.approx(12 / 0.5)


def test_channels_last_benchmark_measures_both_formats(capsys):
    results = load_script("train_loop").main(
        ["--only", "channels_last", "--networks", "AlexNet-32", "--cl-rounds", "1", "--cl-steps", "1",
         "--cl-batch-size", "2", "--threads", "0"])
    row = results["channels_last"]["AlexNet-32"]
    assert row["contiguous"] > 0 and row["channels_last"] > 0
    assert (row["rounds"], row["steps"], row["batch"]) == (1, 1, 2) and len(row["ratios"]) == 1
    assert row["ratio"] == pytest.approx(row["ratios"][0])       # one round: the median is that round
    assert row["ratio"] == pytest.approx(row["channels_last"] / row["contiguous"])
    out = capsys.readouterr().out
    assert f"| AlexNet-32 | {row['class']} | 32x32 | {row['parameters']:,} | 1 | 2 | 1 | {row['contiguous']:.1f} " in out


def test_articles_per_class_loop_agrees_with_the_confusion_matrix():
    train_loop = load_script("train_loop")
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2])
    batches = [(predictions[:4], labels[:4]), (predictions[4:], labels[4:])]
    expected = torch.tensor([0.5, 2 / 3, 1.0])
    assert torch.allclose(train_loop.articles_per_class(batches, 3), expected)
    assert torch.allclose(train_loop.vectorised_per_class(batches, 3), expected)


def test_batch_transform_equals_resizing_before_normalising():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(utils.CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(utils.CIFAR10_STD).view(1, 3, 1, 1)
    resized = F.interpolate(images.float() / 255, size=(227, 227), mode="bilinear", align_corners=False)
    reference = (resized - mean) / std
    assert torch.allclose(utils.BatchTransform(size=227)(images), reference, atol=1e-5)


def test_speedrun_budget_refuses_to_replace_a_recorded_run_or_to_start_without_data(data_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    speedrun = load_script("speedrun")
    monkeypatch.setattr(speedrun, "measure_steps", lambda *args: pytest.fail("checks come before any timing"))
    recorded = tmp_path / "budget.json"
    recorded.write_text("{}")
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    with pytest.raises(SystemExit):
        speedrun.main(["--run-notebook", "--output", str(recorded)])
    assert "--force" in capsys.readouterr().err and recorded.read_text() == "{}"
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "nothing here"))
    with pytest.raises(utils.DataNotFoundError, match="nothing here"):
        speedrun.main(["--run-notebook", "--output", str(tmp_path / "new.json")])


def test_speedrun_budget_times_the_reference_and_runs_the_notebook(data_dir, tmp_path, monkeypatch):
    """Tiny timings, then the notebook itself for two epochs on generated data, retrained on the
    training and validation images (the default recipe runs in the notebook tests): the budget
    file holds the reference epoch, the budgets as multiples of it, and the run's ratio to it; the
    executed notebook is kept in --work-dir, created when it does not exist yet; --widths reaches
    the notebook's network."""
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    output, work_dir = tmp_path / "budget.json", tmp_path / "not" / "yet"
    measured = load_script("speedrun").main(["--reference-batches", "1", "--speedrun-batches", "1",
                                             "--run-notebook", "--epochs", "2", "--retrain-on-all",
                                             "--widths", "16", "32", "48",
                                             "--output", str(output), "--work-dir", str(work_dir)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(measured))
    assert (work_dir / "Speedrun.ipynb").is_file() and (work_dir / "model" / "Speedrun_history.json").is_file()
    epoch_seconds = measured["customcnn"]["contiguous"]["epoch_seconds"]
    assert epoch_seconds == pytest.approx(45_000 / measured["customcnn"]["contiguous"]["images_per_s"])
    assert measured["budgets_seconds"] == {"90 %": pytest.approx(1.5 * epoch_seconds),
                                           "94 %": pytest.approx(6 * epoch_seconds)}
    assert set(measured["speednet"]) == {"notebook", "airbench94"}
    assert all(0 < row["peak_share"] for row in measured["speednet"].values())
    run = measured["run"]
    assert run["epochs"] == 2 and 0 <= run["test_acc"] <= 1
    train_set, val_set, _ = utils.load_cifar10(data_dir)
    assert run["train_images"] == len(train_set) + len(val_set)
    assert run["tested"] == "last epoch" and run["val_acc"] is None and run["val_acc_tta"] is None
    saved = torch.load(work_dir / "model" / "Speedrun.pth", weights_only=True)      # section 8's file
    assert saved["meta"]["epoch"] == 2 and saved["meta"]["test_acc"] == run["test_acc"]
    assert saved["meta"]["widths"] == [16, 32, 48] and saved["state_dict"]["fc.weight"].shape == (10, 48)
    assert run["customcnn_epochs"] == pytest.approx(run["total_seconds"] / epoch_seconds)


def test_speedrun_compile_timing_compares_the_compiled_step_with_the_plain_one(capsys):
    """With the "eager" backend (no code generation, so the test takes seconds) the compiled step
    runs the same arithmetic as the plain one: the measurement's structure, not the compiler."""
    compiled = load_script("speedrun").compile_speedup(batches=2, backend="eager")
    assert compiled["backend"] == "eager" and compiled["compile_seconds"] > 0
    assert compiled["ratio"] == pytest.approx(compiled["images_per_s"] / compiled["plain_images_per_s"])
    assert "torch.compile (eager)" in capsys.readouterr().out


def test_notebook_times_runs_a_notebook_as_quick_mode_does(tmp_path):
    output = tmp_path / "times.json"
    measured = load_script("notebook_times").main(["LeNet5", "--output", str(output)])
    assert json.loads(output.read_text()) == measured
    lenet = measured["notebooks"]["LeNet5"]
    assert lenet["seconds"] > 0 and 0 <= lenet["test_acc"] <= 1
    from tests.quickmode import QUICK_RUNS
    assert lenet["epochs"] == QUICK_RUNS["LeNet5"][0]


def test_the_peer_redirection_keeps_float32_on_the_cpu_and_times_on_the_wall_clock(tmp_path):
    peer_airbench = load_script("peer_airbench")
    intervals, cuda_event, working_dir = [], torch.cuda.Event, pathlib.Path.cwd()
    with peer_airbench.on_the_cpu(tmp_path, intervals):
        assert pathlib.Path.cwd() == tmp_path
        net = torch.nn.Linear(2, 2).half().cuda()
        assert net.weight.dtype == torch.float32 and net.weight.device.type == "cpu"
        assert torch.zeros(1, dtype=torch.uint8).half().dtype == torch.float32
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        time.sleep(0.05)
        end.record()
        torch.cuda.synchronize()
        milliseconds = start.elapsed_time(end)
    assert pathlib.Path.cwd() == working_dir
    assert 50 <= milliseconds < 1000 and intervals == [pytest.approx(milliseconds / 1000)]
    assert torch.zeros(1).half().dtype == torch.float16          # everything is put back afterwards
    assert torch.cuda.Event is cuda_event and torch.nn.Linear(2, 2).half().weight.dtype == torch.float16


def test_the_peer_trains_airbench94_on_the_course_data_and_times_it(data_dir, tmp_path, monkeypatch, capsys):
    """airbench94's training loop, four tiny epochs on generated data: it learns under the
    redirection (about 90 % against 10 % chance), and its timer (whitening, training, TTA
    evaluation) lies inside the whole job's time."""
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    output = tmp_path / "peer.json"
    measured = load_script("peer_airbench").main(["--epochs", "4", "--batch-size", "16", "--reference-batches", "1",
                                                  "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(measured))
    peer = measured["peer"]
    assert peer["train_images"] == 80 and peer["tta_level"] == 2 and peer["batch_size"] == 16
    assert peer["test_acc_tta"] >= 0.3 and 0 <= peer["test_acc"] <= 1    # at least 3x chance
    assert 0 < peer["timer_seconds"] <= peer["job_seconds"]
    assert peer["customcnn_epochs"] == pytest.approx(peer["timer_seconds"] / measured["customcnn"]["epoch_seconds"])
    assert measured["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"test {peer['test_acc_tta']:.2%} with TTA level 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):                              # a recorded run is never replaced silently
        load_script("peer_airbench").main(["--output", str(output)])


def test_the_race_runs_the_peer_then_the_notebook_and_compares_them(data_dir, tmp_path, monkeypatch):
    """The peer for real (tiny), the notebook's run replaced by a recorded history (the notebook
    itself runs in the budget test above): the ratios and the target follow from both points."""
    speedrun = load_script("speedrun")
    history = {"epoch": [1], "val_acc": [0.5], "test_acc": 0.95,
               "info": {"train_images": 45000, "tta_level": 2, "val_acc_tta": 0.51, "total_seconds": 0.001,
                        "tested": "best validation accuracy"}}
    monkeypatch.setattr(speedrun, "run_notebook", lambda *args, **kwargs: (history, 0.002))
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    output = tmp_path / "race.json"
    measured = speedrun.main(["--race", "--epochs", "1", "--reference-batches", "1", "--peer-epochs", "1",
                              "--peer-batch-size", "16", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(measured))
    peer, ours, ratios = measured["peer"], measured["speedrun"], measured["ratios"]
    assert ours["test_acc_tta"] == 0.95 and ours["timer_seconds"] == 0.001 and ours["job_seconds"] == 0.002
    assert ratios["test_points"] == pytest.approx(100 * (0.95 - peer["test_acc_tta"]))
    assert ratios["timer"] == pytest.approx(0.001 / peer["timer_seconds"])
    assert ratios["job"] == pytest.approx(0.002 / peer["job_seconds"])
    assert measured["target_met"] == (0.95 >= peer["test_acc_tta"])    # 2 ms is never slower than the peer


def test_the_ablation_runs_section_10_after_sections_0_to_3_without_the_test_set(data_dir, tmp_path, monkeypatch):
    """Speedrun.ipynb's own ablation, one tiny epoch per row and two seeds on generated data:
    every row of both parts with one accuracy and one time per seed, and nothing of sections 4-9
    (the main training, the test evaluation) in what ran."""
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    output, work_dir = tmp_path / "ablation.json", tmp_path / "work"
    ablation = load_script("speedrun").main(["--ablation", "--ablation-epochs", "1", "--seeds", "0", "1",
                                             "--work-dir", str(work_dir), "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(ablation))
    assert ablation["epochs"] == 1 and ablation["seeds"] == [0, 1] and ablation["train_images"] == 70   # 8 a class, 1 held out
    assert "sections 0-3 and 10" in ablation["method"]
    rows = ablation["rows"]
    assert [row["part"] for row in rows] == ["technique"] * 7 + ["airbench"] * 3
    assert all(len(row["val_accs"]) == len(row["seconds"]) == 2 for row in rows)
    assert all(0 <= acc <= 1 for row in rows for acc in row["val_accs"])
    executed = json.loads((work_dir / "Speedrun-ablation.ipynb").read_text())
    sources = ["".join(cell["source"]) for cell in executed["cells"]]
    assert not any("test_chosen_model" in source or "utils.train(net," in source for source in sources)
    assert any("## 10." in source for source in sources)
