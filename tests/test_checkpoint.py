"""save_checkpoint / load_checkpoint: atomic, with the file mode and the folder a plain torch.save would leave."""
import os
import pickle
import stat

import pytest
import torch

import halp_fx


@pytest.fixture
def umask():
    """Run a test under a chosen umask and give the process its own back afterwards."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_saved_checkpoint_loads_back_equal(tmp_path):
    state = {"weight": torch.arange(6.0).view(2, 3), "offset": torch.tensor([-3, 7], dtype=torch.int8), "step": 4}
    path = tmp_path / "checkpoint.pt"
    halp_fx.save_checkpoint(state, path)
    loaded = halp_fx.load_checkpoint(path)
    assert torch.equal(loaded["weight"], state["weight"]) and torch.equal(loaded["offset"], state["offset"])
    assert loaded["step"] == 4
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    halp_fx.save_checkpoint({"epoch": 1}, path)
    halp_fx.save_checkpoint({"epoch": 2}, path)
    assert halp_fx.load_checkpoint(path) == {"epoch": 2}


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask 022", "umask 077", "umask 002"])
def test_the_file_mode_is_what_torch_save_gives_a_plain_path(tmp_path, umask, mask, expected):
    umask(mask)
    halp_fx.save_checkpoint({"epoch": 1}, tmp_path / "checkpoint.pt")
    torch.save({"epoch": 1}, tmp_path / "plain.pt")
    assert mode(tmp_path / "checkpoint.pt") == mode(tmp_path / "plain.pt") == expected


def test_saving_leaves_the_umask_as_it_was(tmp_path, umask):
    umask(0o027)
    halp_fx.save_checkpoint({"epoch": 1}, tmp_path / "checkpoint.pt")
    assert umask(0o022) == 0o027


def test_a_stale_temporary_of_the_same_checkpoint_is_removed_at_the_next_save(tmp_path):
    # What a save killed between creating its temporary and renaming it leaves behind.
    stale = tmp_path / ".checkpoint.pt.checkpoint-k1ll3d"
    stale.write_bytes(b"truncated")
    halp_fx.save_checkpoint({"epoch": 2}, tmp_path / "checkpoint.pt")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_a_temporary_of_another_checkpoint_in_the_folder_is_kept(tmp_path):
    other = tmp_path / ".other.pt.checkpoint-s4v1ng"
    other.write_bytes(b"another run's save in progress")
    halp_fx.save_checkpoint({"epoch": 2}, tmp_path / "checkpoint.pt")
    assert sorted(os.listdir(tmp_path)) == [".other.pt.checkpoint-s4v1ng", "checkpoint.pt"]
    assert other.read_bytes() == b"another run's save in progress"


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    halp_fx.save_checkpoint({"epoch": 1}, path)
    # A local function cannot be pickled (AttributeError before Python 3.12, PicklingError from it).
    with pytest.raises((pickle.PicklingError, AttributeError), match="pickle"):
        halp_fx.save_checkpoint({"epoch": 2, "unpicklable": lambda: None}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert halp_fx.load_checkpoint(path) == {"epoch": 1}
