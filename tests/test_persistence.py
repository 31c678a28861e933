"""Checkpoints: bit-for-bit round trip, metadata, weights-only loading, errors in words,
DataParallel, atomic saves and backups."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import utils


def make_model(seed=0, width=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.Flatten(), nn.Linear(width * 30 * 30, 10))


META = dict(classes=list("abcdefghij"), image_size=32, input_size=32, mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25), arch="Tiny")


def test_round_trip_is_bit_for_bit_with_metadata(tmp_path):
    model = make_model()
    model[1].running_mean.uniform_()                          # buffers travel too
    path = utils.save_checkpoint(tmp_path / "m.pth", model, **META, epoch=3)
    fresh = make_model(seed=1)
    meta = utils.load_checkpoint(path, fresh)
    utils.assert_same_weights(model, fresh)
    assert meta["classes"] == META["classes"] and meta["input_size"] == 32 and meta["image_size"] == 32
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["arch"] == "Tiny" and meta["epoch"] == 3
    assert "state_dict" not in meta and "saved" in meta and "torch" in meta
    again = utils.save_checkpoint(tmp_path / "again.pth", fresh, **meta)
    third = make_model(seed=2)
    assert utils.load_checkpoint(again, third)["classes"] == META["classes"]
    utils.assert_same_weights(model, third)


def test_arch_defaults_to_the_class_name_and_metadata_is_plain(tmp_path):
    path = utils.save_checkpoint(tmp_path / "m.pth", nn.Linear(2, 2), mean=torch.tensor([0.5, 0.25]),
                                 root=tmp_path, shape=(1, 2))
    meta = utils.load_checkpoint(path, nn.Linear(2, 2))
    assert meta["arch"] == "Linear" and meta["mean"] == [0.5, 0.25]
    assert meta["root"] == str(tmp_path) and meta["shape"] == [1, 2]


def test_numpy_metadata_is_saved_as_plain_lists(tmp_path):
    path = utils.save_checkpoint(tmp_path / "m.pth", nn.Linear(2, 2), mean=np.array([0.5, 0.25]),
                                 std=np.float32(0.5), sizes=np.array([[1, 2], [3, 4]]))
    meta = utils.load_checkpoint(path, nn.Linear(2, 2))
    assert meta["mean"] == [0.5, 0.25] and meta["std"] == 0.5 and meta["sizes"] == [[1, 2], [3, 4]]


def test_dataparallel_prefix_is_handled(tmp_path):
    model = make_model()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}   # what DataParallel saves
    torch.save(prefixed, tmp_path / "dp.pth")
    fresh = make_model(seed=1)
    assert utils.load_checkpoint(tmp_path / "dp.pth", fresh) == {}
    utils.assert_same_weights(model, fresh)
    utils.save_checkpoint(tmp_path / "wrapped.pth", nn.DataParallel(model))
    saved = torch.load(tmp_path / "wrapped.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in saved["state_dict"])
    assert saved["meta"]["arch"] == "Sequential"
    other = make_model(seed=2)
    utils.load_checkpoint(tmp_path / "wrapped.pth", nn.DataParallel(other))
    utils.assert_same_weights(model, other)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": make_model().state_dict(), "meta": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth: holds pickled Python objects"):
        utils.load_checkpoint(tmp_path / "evil.pth", make_model())
    assert not marker.exists()


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        utils.load_checkpoint(tmp_path / "nothing.pth", make_model())


# ---- errors in words ------------------------------------------------------------------------

def write_empty(path):
    path.write_bytes(b"")


def write_text(path):
    path.write_text("this is not a checkpoint\n")


def write_truncated(path):
    utils.save_checkpoint(path, make_model(), **META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_whole_model(path):
    torch.save(make_model(), path)                             # the source articles' habit


def write_other_architecture(path):
    utils.save_checkpoint(path, make_model(width=6), **META)


@pytest.mark.parametrize("write, words", [
    (write_empty, ["the file is empty"]),
    (write_text, ["not a PyTorch checkpoint"]),
    (write_truncated, ["truncated or corrupt"]),
    (write_whole_model, ["holds pickled Python objects", "state_dict"]),
    (write_other_architecture, ["the weights do not fit this Sequential",
                                "0.weight: (6, 3, 3, 3) in the file, (4, 3, 3, 3) in the model"]),
])
def test_a_bad_checkpoint_is_explained_in_words(tmp_path, write, words):
    path = tmp_path / "model.pth"
    write(path)
    model = make_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        utils.load_checkpoint(path, model)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, (word, message)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # model untouched


def test_a_checkpoint_with_missing_and_extra_layers_lists_them(tmp_path):
    path = utils.save_checkpoint(tmp_path / "m.pth", nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4)))
    with pytest.raises(ValueError) as info:
        utils.load_checkpoint(path, nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4)))
    message = str(info.value)
    assert "missing from the file (2): 2.bias; 2.weight" in message
    assert "not in the model (2): 1.bias; 1.weight" in message


# ---- saving ---------------------------------------------------------------------------------

def test_saving_over_a_file_keeps_the_old_one_as_a_backup(tmp_path):
    path = tmp_path / "m.pth"
    utils.save_checkpoint(path, make_model(0))
    old = path.read_bytes()
    utils.save_checkpoint(path, make_model(1))
    backups = [p for p in tmp_path.iterdir() if p != path]
    assert len(backups) == 1 and backups[0].read_bytes() == old and backups[0].suffix == ".pth"
    assert backups[0].name.startswith("m.")
    utils.save_checkpoint(path, make_model(2), backup=True)
    assert len(list(tmp_path.iterdir())) == 3                  # a second backup, not overwritten
    utils.save_checkpoint(path, make_model(3), backup=False)
    assert len(list(tmp_path.iterdir())) == 3


def test_atomic_write_writes_bytes_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    utils.atomic_write(path, b"first")
    assert path.read_bytes() == b"first"
    utils.atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    with pytest.raises(TypeError):
        utils.atomic_write(path, "a str, not bytes")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]   # no temporary file left


def test_atomic_open_keeps_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with utils.atomic_open(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]    # no temporary file left


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, torch, torch.nn as nn
    sys.path.insert(0, sys.argv[2])
    import utils

    class DiesHalfway:
        '''A file that writes half of what it is given, flushes it to disk, then is killed.'''
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *args):
            return self.f.__exit__(*args)
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

    real_fdopen = os.fdopen
    os.fdopen = lambda *args, **kwargs: DiesHalfway(real_fdopen(*args, **kwargs))
    torch.manual_seed(1)
    utils.save_checkpoint(sys.argv[1], nn.Linear(100, 100), backup=False)
""")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "best.pth"
    torch.manual_seed(0)
    previous = nn.Linear(100, 100)
    utils.save_checkpoint(path, previous)
    before = path.read_bytes()
    child = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(path), str(utils.REPO_DIR)])
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")   # the kill came mid-write
    assert 0 < leftovers[0].stat().st_size < len(before)
    fresh = nn.Linear(100, 100)
    utils.load_checkpoint(path, fresh)
    assert torch.equal(fresh.weight, previous.weight)


def test_saved_files_get_the_usual_permissions(tmp_path):
    path = utils.save_checkpoint(tmp_path / "m.pth", make_model())
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_assert_same_weights_names_the_differing_tensor():
    model, copy = make_model(0), make_model(0)
    utils.assert_same_weights(model, copy)
    with torch.no_grad():
        copy[1].running_var[0] += 1e-6
    with pytest.raises(AssertionError, match="1.running_var"):
        utils.assert_same_weights(model, copy)
