"""utils/logger.py: the commit a run records, in scratch repositories (no dependence on this checkout)."""
import shutil
import subprocess

import pytest

from utils import logger

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]


def scratch_repo(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "c"]):
        subprocess.run(GIT + command, cwd=folder, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def no_commit_env(monkeypatch, tmp_path):
    monkeypatch.delenv(logger.GIT_COMMIT_ENV, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git never looks above the scratch folders


@needs_git
def test_git_commit_named_by_the_environment_wins(tmp_path, no_commit_env, monkeypatch):
    """A tree copied to a GPU machine (no .git, or a stale one) records the commit its caller names."""
    head = scratch_repo(tmp_path, {"code.py": "x = 1\n"})
    assert logger.git_commit(tmp_path) == head and len(head) == 40
    monkeypatch.setenv(logger.GIT_COMMIT_ENV, "abc123")
    assert logger.git_commit(tmp_path) == "abc123"


@needs_git
def test_git_commit_is_none_outside_a_repository(tmp_path, no_commit_env):
    (tmp_path / "copy").mkdir()
    assert logger.git_commit(tmp_path / "copy") is None


def test_git_commit_is_none_without_git(tmp_path, no_commit_env, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to be found
    assert logger.git_commit(tmp_path) is None


@needs_git
def test_git_commit_is_dirty_for_code_changes_but_not_for_the_results_the_demo_writes(tmp_path, no_commit_env):
    head = scratch_repo(tmp_path, {"code.py": "x = 1\n", "results/table1.md": "old\n"})
    (tmp_path / "results" / "table1.md").write_text("new\n")
    assert logger.git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert logger.git_commit(tmp_path) == head + "-dirty"
