"""Shared fixtures: a tiny dataset tree in the real GTA5 / Cityscapes layouts, built with PIL."""
import os

import pytest
import torch

from dataset.tiny import write_tiny_tree

# Under pytest-xdist (make test: one worker per core, at most 4) every worker and every process a
# test starts computes with one thread: two threads per process on cores that other
# processes keep busy spin against each other and run several times slower than one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


_SUITE_THREADS = torch.get_num_threads()


def pytest_collection_finish(session):
    """Collection imported every test module: none may have changed the thread count set above."""
    torch.set_num_threads(_SUITE_THREADS)


@pytest.fixture(autouse=True)
def _thread_count_kept():
    """A test (or the script it runs in this process) that sets torch's thread count sets it for
    the rest of its worker's tests: restore it."""
    yield
    if torch.get_num_threads() != _SUITE_THREADS:
        torch.set_num_threads(_SUITE_THREADS)


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """GTA5/ (8 images 64x36) and Cityscapes/ (6 train + 3 val, 64x32) in the official layouts."""
    return write_tiny_tree(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it: two threads per process on two shared
    cores spin against each other, and one is several times faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
