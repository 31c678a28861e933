"""Checkpoints: bit-for-bit round trip, metadata, weights-only loading, DataParallel, atomic saves."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import utils


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))


META = dict(classes=list("abcdefghij"), input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), arch="Tiny")


def test_round_trip_is_bit_for_bit_with_metadata(tmp_path):
    model = make_model()
    model[1].running_mean.uniform_()                          # buffers travel too
    path = utils.save_checkpoint(tmp_path / "m.pth", model, **META, epoch=3)
    fresh = make_model(seed=1)
    meta = utils.load_checkpoint(path, fresh)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    assert meta["classes"] == META["classes"] and meta["input_size"] == 32 and meta["epoch"] == 3
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["arch"] == "Tiny"
    again = utils.save_checkpoint(tmp_path / "again.pth", fresh, **META, epoch=3)
    assert utils.load_checkpoint(again)["state_dict"].keys() == model.state_dict().keys()


def test_dataparallel_prefix_is_handled(tmp_path):
    model = make_model()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}   # what DataParallel saves
    torch.save(prefixed, tmp_path / "dp.pth")
    fresh = make_model(seed=1)
    utils.load_checkpoint(tmp_path / "dp.pth", fresh)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    utils.save_checkpoint(tmp_path / "wrapped.pth", nn.DataParallel(model))
    assert not any(k.startswith("module.") for k in utils.load_checkpoint(tmp_path / "wrapped.pth")["state_dict"])


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": make_model().state_dict(), "meta": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth"):
        utils.load_checkpoint(tmp_path / "evil.pth")
    torch.save(make_model(), tmp_path / "whole.pth")             # the source articles' habit
    with pytest.raises(ValueError, match="whole.pth"):
        utils.load_checkpoint(tmp_path / "whole.pth")


def test_missing_and_corrupt_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        utils.load_checkpoint(tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        utils.load_checkpoint(tmp_path / "junk.pth")


def test_saving_over_a_file_keeps_the_old_one_as_a_backup(tmp_path):
    path = tmp_path / "m.pth"
    utils.save_checkpoint(path, make_model(0))
    old = path.read_bytes()
    utils.save_checkpoint(path, make_model(1))
    backups = [p for p in tmp_path.iterdir() if p != path]
    assert len(backups) == 1 and backups[0].read_bytes() == old and backups[0].suffix == ".pth"
    utils.save_checkpoint(path, make_model(2), backup=False)
    assert len(list(tmp_path.iterdir())) == 2


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, torch, torch.nn as nn
    sys.path.insert(0, sys.argv[2])
    import utils
    real_atomic_write = utils._atomic_write
    def write_half_then_die(path, write):
        def half(f):
            import io
            buffer = io.BytesIO(); write(buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2]); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_atomic_write(path, half)
    utils._atomic_write = write_half_then_die
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
