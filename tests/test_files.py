"""utils.files: the one atomic write, durable (checkpoints, reports) or not (the synthetic benchmark's images)."""
import os
import stat

import pytest

from tests.helpers import temporaries
from utils import files


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_bytes_replaces_whole_with_open_permissions(tmp_path, durable):
    path = tmp_path / "sub" / "out.json"
    files.atomic_write_bytes(path, b"old", durable=durable)
    files.atomic_write_bytes(path, b"new", durable=durable)
    assert path.read_bytes() == b"new"
    reference = tmp_path / "plain"
    reference.write_bytes(b"")  # what open() creates under this umask: not mkstemp's private 0600
    assert mode(path) == mode(reference)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


@pytest.mark.parametrize("durable", [True, False])
def test_failed_rename_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch, durable):
    path = tmp_path / "out.txt"
    files.atomic_write_bytes(path, b"previous")

    def crash(source, destination):
        assert open(source, "rb").read() == b"replacement"  # complete before the rename
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        files.atomic_write_bytes(path, b"replacement", durable=durable)
    monkeypatch.undo()
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_remove_stale_temporaries_removes_only_this_files_leftovers(tmp_path):
    (tmp_path / ".last.pth.k1ll3d.tmp").write_bytes(b"half")
    (tmp_path / ".other.pth.x.tmp").write_bytes(b"another file's")
    (tmp_path / "last.pth").write_bytes(b"whole")
    assert files.remove_stale_temporaries(tmp_path / "last.pth") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pth.x.tmp", "last.pth"]


@pytest.mark.parametrize("links", [True, False], ids=["hard link", "no hard links"])
def test_atomic_link_keeps_its_bytes_when_the_source_is_written_again(tmp_path, monkeypatch, links):
    source, target = tmp_path / "last.pth", tmp_path / "best.pth"
    files.atomic_write_bytes(source, b"iteration 4")
    target.write_bytes(b"iteration 2")
    if not links:
        def no_link(*args):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(files.os, "link", no_link)
    files.atomic_link(source, target)
    assert target.read_bytes() == b"iteration 4"
    assert (os.stat(target).st_ino == os.stat(source).st_ino) is links
    files.atomic_write_bytes(source, b"iteration 6")  # the next write of the source replaces its name only
    assert target.read_bytes() == b"iteration 4" and source.read_bytes() == b"iteration 6"
    assert temporaries(tmp_path) == []
