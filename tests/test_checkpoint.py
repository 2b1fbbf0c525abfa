"""utils/checkpoint.py: atomic checkpoint writes (the error paths of loading are in test_reliability.py)."""
from pathlib import Path

import pytest
import torch

from tests.helpers import temporaries
from utils import files as files_module  # where atomic_write calls os.replace
from utils.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save, load_checkpoint_file


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "iteration": 4, "w": torch.arange(5.0)}, path)
    before = path.read_bytes()

    def crash(source, destination):
        assert Path(source).is_file() and Path(source).parent == path.parent  # written next to it, complete
        assert torch.load(source, weights_only=True)["iteration"] == 6
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(files_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "iteration": 6, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint_file(path)["iteration"] == 4
    assert temporaries(tmp_path) == []
