"""`utils.train` under torchrun, on the CPU with the gloo backend and processes that meet on
127.0.0.1: train_ddp.py's build and train, run by tests/ddp_worker.py, which reports what each
process ended with. Two processes train one model and only process 0 writes; two processes at
batch B equal one at 2B; validation over a split the processes cannot share evenly counts each
image once; a resumed run equals a straight one; two "machines" (c10d rendezvous) equal one; a
process that fails fails the launch and leaves whole checkpoints. LeNet-5 (no BatchNorm) on the
generated data, two epochs: each launch takes seconds."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import utils
from tests import fakedata
from tools import notebook_code

WORKER = utils.REPO_DIR / "tests" / "ddp_worker.py"
TIMEOUT = 180                 # seconds for one launch: a hung process fails the test, not the suite
EPOCHS = 2


def loopback_interface() -> str | None:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def environment() -> dict:
    """The suite's environment, with gloo held to the loopback interface and one thread a process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if loopback_interface():
        env["GLOO_SOCKET_IFNAME"] = loopback_interface()
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The generated CIFAR-10 with two images of "airplane" and one of "automobile" removed, so that
    the seeded split leaves 138 training images (69 per process) and 19 validation images (10 + 9)."""
    root = tmp_path_factory.mktemp("data")
    fakedata.write_cifar10_folder(root, train_per_class=16, test_per_class=4)
    for path in ("airplane/0000.png", "airplane/0001.png", "automobile/0000.png"):
        (root / "cifar10" / "train" / path).unlink()
    return root


@pytest.fixture(scope="module")
def datasets(data_dir):
    return utils.load_cifar10(data_dir)


def settings(data_dir, model_dir, *extra, batch_size=16, augment=True) -> list[str]:
    return ["--network", "LeNet5", "--epochs", str(EPOCHS), "--batch-size", str(batch_size), "--subset", "0",
            "--data-dir", str(data_dir), "--model-dir", str(model_dir), "--runs-dir", str(model_dir.parent / "runs"),
            "--name", "net", "--no-progress", *([] if augment else ["--no-augment"]), *extra]


def launch(report, arguments, processes=2, worker_options=()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(WORKER), "--report", str(report), *worker_options, *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment())


def reports(folder, processes=2) -> list[dict]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(processes)]


def succeeded(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def assert_same_tensors(mine: dict, theirs: dict) -> None:
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """Two processes, two epochs straight through, with augmentation and TensorBoard curves."""
    root = tmp_path_factory.mktemp("straight")
    output = succeeded(launch(root / "report", settings(data_dir, root / "model", "--tensorboard")))
    return output, reports(root / "report"), root


def test_two_processes_end_with_one_model_and_only_process_0_writes(straight):
    output, (first, second), root = straight
    assert first["world_size"] == second["world_size"] == 2
    assert_same_tensors(first["state_dict"], second["state_dict"])        # DDP kept the copies identical
    assert second["written"] == []                                        # process 1 wrote nothing at all
    assert any("net_last.pth" in change for change in first["written"])
    assert sorted(path.name for path in (root / "model").iterdir()) == ["net_best.pth", "net_history.json",
                                                                        "net_last.pth"]
    assert len(list((root / "runs").rglob("events.out.tfevents.*"))) == 1   # one TensorBoard writer
    history = utils.History.from_json(root / "model" / "net_history.json")
    assert history.epoch == [1, 2] and history.info["processes"] == 2
    assert history.info["train_images"] == 138 and history.info["batch_size"] == 16
    assert sum(line.startswith("epoch   1/2") for line in output.splitlines()) == 1   # printed once
    assert history.train_loss[-1] < history.train_loss[0]


def test_validation_counts_each_image_once_when_the_processes_cannot_share_it_evenly(straight, datasets):
    _, (first, second), root = straight
    history = utils.History.from_json(root / "model" / "net_history.json")
    assert history.info["val_images"] == 19                               # 10 in process 0, 9 in process 1
    net = notebook_code.network_class("LeNet5.ipynb", "LeNet5")()
    utils.load_checkpoint(root / "model" / "net_last.pth", net)          # the weights after epoch 2
    loader = utils.make_loader(datasets[1], 64, "cpu", shuffle=False, transform=utils.BatchTransform())
    logits, labels = utils.predict_loader(net, loader)                    # one process, the whole split
    assert len(labels) == 19
    assert history.val_acc[-1] == (logits.argmax(1) == labels).float().mean().item()
    assert history.val_loss[-1] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    for report in (first, second):                                        # gathered, in the split's order
        assert torch.equal(report["val_labels"], datasets[1].labels)
        assert torch.allclose(report["val_logits"], logits, atol=1e-5)


def test_the_shares_of_an_evaluation_split_cover_it_once():
    shares = [list(utils.EvaluationShard(19, rank, 2)) for rank in range(2)]
    assert shares == [list(range(0, 19, 2)), list(range(1, 19, 2))]
    assert sorted(shares[0] + shares[1]) == list(range(19))
    assert [len(utils.EvaluationShard(19, rank, 4)) for rank in range(4)] == [5, 5, 5, 4]
    assert not utils.is_distributed() and utils.rank() == 0 and utils.world_size() == 1


def test_two_processes_at_batch_b_equal_one_process_at_2b(data_dir, tmp_path):
    """The global batch of two processes of 16 is the batch of one process of 32, in the same order
    (DistributedSampler's permutation, dealt out), and DDP averages the two halves' gradients."""
    two = launch(tmp_path / "two", settings(data_dir, tmp_path / "model-two", augment=False))
    one = launch(tmp_path / "one", settings(data_dir, tmp_path / "model-one", batch_size=32, augment=False),
                 processes=1)
    succeeded(two), succeeded(one)
    (two_first, _), (alone,) = reports(tmp_path / "two"), reports(tmp_path / "one", processes=1)
    for name, tensor in alone["state_dict"].items():
        assert torch.allclose(two_first["state_dict"][name], tensor, rtol=1e-4, atol=1e-6), name
    assert two_first["history"]["train_loss"] == pytest.approx(alone["history"]["train_loss"], rel=1e-4)
    assert two_first["history"]["val_acc"] == alone["history"]["val_acc"]


def test_a_run_resumed_after_epoch_1_equals_the_straight_run(straight, data_dir, tmp_path):
    _, (first, second), root = straight
    arguments = settings(data_dir, tmp_path / "model")
    succeeded(launch(tmp_path / "cut", arguments, worker_options=["--stop-after", "1"]))
    assert utils.History.from_json(tmp_path / "model" / "net_history.json").epoch == [1]
    output = succeeded(launch(tmp_path / "resumed", [*arguments, "--resume"]))
    assert "Resuming net after epoch 1 of 2" in output
    resumed = reports(tmp_path / "resumed")
    for mine, straight_one in zip(resumed, (first, second)):     # each process's augmentation continued
        assert_same_tensors(mine["state_dict"], straight_one["state_dict"])
    for key in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert resumed[0]["history"][key] == first["history"][key], key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_machines_meeting_at_a_c10d_rendezvous_train_as_one(straight, data_dir, tmp_path):
    _, (first, _), root = straight
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=test-ddp",
               "--rdzv_conf=join_timeout=60", str(WORKER), "--report", str(tmp_path / "report"),
               *settings(data_dir, tmp_path / "model")]
    machines = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=environment()) for _ in range(2)]
    try:
        outputs = [machine.communicate(timeout=TIMEOUT)[0] for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    assert [machine.returncode for machine in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    two_machines = reports(tmp_path / "report")
    for report in two_machines:
        assert report["world_size"] == 2
        assert_same_tensors(report["state_dict"], first["state_dict"])
    assert two_machines[0]["history"]["val_acc"] == first["history"]["val_acc"]
    assert sorted(path.name for path in (tmp_path / "model").iterdir()) == ["net_best.pth", "net_history.json",
                                                                            "net_last.pth"]


def test_a_failing_process_fails_the_launch_and_leaves_whole_checkpoints(data_dir, tmp_path):
    model_dir = tmp_path / "model"
    result = launch(tmp_path / "report", settings(data_dir, model_dir),
                    worker_options=["--fail-rank", "1", "--fail-epoch", "2"])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "process 1 fails on purpose in epoch 2" in output and "FAILED" in output   # torchrun's report
    assert not (tmp_path / "report").exists()                    # no process got to the end
    assert sorted(path.name for path in model_dir.iterdir()) == ["net_best.pth", "net_history.json",
                                                                 "net_last.pth"]    # no temporary file left
    net = notebook_code.network_class("LeNet5.ipynb", "LeNet5")()
    assert utils.load_checkpoint(model_dir / "net_last.pth", net)["epoch"] == 1
    assert utils.load_checkpoint(model_dir / "net_best.pth", net)["epoch"] == 1
    assert utils.History.from_json(model_dir / "net_history.json").epoch == [1]


@pytest.fixture
def world_of_one(monkeypatch):
    """torch.distributed initialised in this process alone (a world of one process), then torn down."""
    if loopback_interface():
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback_interface())
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_a_wrapped_model_is_taken_as_it_is_and_sync_batchnorm_on_the_cpu_is_refused(world_of_one, datasets):
    assert utils.is_distributed() and utils.world_size() == 1 and utils.is_main_process()
    transform = utils.BatchTransform()
    train_loader = utils.make_loader(datasets[0], 32, "cpu", shuffle=True, transform=transform)
    val_loader = utils.make_loader(datasets[1], 64, "cpu", shuffle=False, transform=transform)
    assert isinstance(train_loader.sampler, torch.utils.data.DistributedSampler)    # shares, chosen by itself
    assert isinstance(val_loader.sampler, utils.EvaluationShard)
    net = notebook_code.network_class("LeNet5.ipynb", "LeNet5")()
    wrapped = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    history = utils.train(wrapped, train_loader, val_loader, 1, optimizer, torch.nn.CrossEntropyLoss(),
                          progress=False, verbose=False, channels_last=False)    # wrapped in its layout already
    assert history.epoch == [1] and history.info["processes"] == 1 and history.info["model"] == "LeNet5"
    with pytest.raises(ValueError, match="needs the model before DistributedDataParallel wraps it"):
        utils.train(wrapped, train_loader, val_loader, 1, optimizer, torch.nn.CrossEntropyLoss(),
                    progress=False, verbose=False, sync_batchnorm=True)
    with_batchnorm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                         torch.nn.Flatten(), torch.nn.Linear(4, 10))
    with pytest.raises(ValueError, match="SyncBatchNorm runs on GPUs only"):
        utils.train(with_batchnorm, train_loader, val_loader, 1, torch.optim.SGD(with_batchnorm.parameters(), lr=0.1),
                    torch.nn.CrossEntropyLoss(), progress=False, verbose=False, sync_batchnorm=True)
    with pytest.raises(ZeroDivisionError):                  # handed to every process, raised in each
        utils.from_main_process(lambda: 1 / 0)
