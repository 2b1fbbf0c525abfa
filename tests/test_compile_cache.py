"""torch.compile as the scripts use it (engine.compilation): static shapes, Inductor's caches in a
persistent folder, and a damaged cache that never stops a run.

The end-to-end test compiles a tiny network in fresh processes (tests/compile_cache_worker.py):
what a second run of a script on the same machine sees. The others check the wiring without
compiling anything.
"""
import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cli.builders import maybe_compile, resolve_fast_paths
from cli.options import add_inference_runtime_args, add_runtime_args
from engine import compilation
from engine.compilation import CACHE_ENV, CompileCacheWarning, configure_compile_cache
from tests.helpers import subprocess_env
from utils.errors import OptionError

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "compile_cache_worker.py"
WORKER_TIMEOUT_S = 240


@pytest.fixture
def cache_state(monkeypatch):
    """The cache environment and switches of this process, restored after the test."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.delenv(CACHE_ENV, raising=False)
    with inductor_config.patch(fx_graph_cache=inductor_config.fx_graph_cache), \
            functorch_config.patch(enable_autograd_cache=functorch_config.enable_autograd_cache):
        yield inductor_config, functorch_config


def run_worker(cache_dir):
    """(JSON record, stderr) of one compiled training step in a fresh process."""
    env = dict(subprocess_env(), TORCHINDUCTOR_COMPILE_THREADS="1")  # no compile worker pool on 2 cores
    completed = subprocess.run([sys.executable, str(WORKER), str(cache_dir)], env=env, capture_output=True, text=True,
                               timeout=WORKER_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


@pytest.mark.slow
def test_second_process_loads_the_compiled_graphs_and_a_damaged_cache_recompiles(tmp_path):
    cache = tmp_path / "cache"
    cold, _ = run_worker(cache)
    # Cold: forward and backward graphs generated and compiled, nothing read from the cache.
    assert cold["inductor"].get("fxgraph_cache_miss") == 2 and not cold["inductor"].get("fxgraph_cache_hit")
    assert cold["aot_autograd"].get("autograd_cache_miss") == 1
    assert cold["compiled"] == pytest.approx(cold["eager"], rel=1e-5, abs=1e-7)
    warm, _ = run_worker(cache)
    # Warm: both graphs and AOTAutograd's split come from the folder, no graph generated.
    assert warm["inductor"].get("fxgraph_cache_hit") == 2 and not warm["inductor"].get("fxgraph_cache_miss")
    assert warm["aot_autograd"].get("autograd_cache_hit") == 1 and not warm["aot_autograd"].get("autograd_cache_miss")
    assert warm["compiled"] == cold["compiled"]

    # Every entry and kernel file overwritten: records that do not unpickle (torch skips them) and
    # generated modules that do not import (the backend's retry in a scratch folder).
    damaged = [path for path in cache.rglob("*") if path.is_file() and path.suffix != ".lock"]
    assert any(path.suffix == ".py" for path in damaged)
    for path in damaged:
        path.write_text("garbage")
    repaired, stderr = run_worker(cache)
    assert repaired["compiled"] == cold["compiled"]
    assert stderr.count("CompileCacheWarning") == 1 and f"compile cache {cache} unusable" in stderr
    assert "Traceback" not in stderr  # torch's own reports of unreadable records are one line each


def test_cache_folder_defaults_to_a_per_user_folder_and_honours_the_users_choices(cache_state, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "uda-bisenet" / "inductor"
    assert configure_compile_cache() == str(default) == os.environ[CACHE_ENV] and default.is_dir()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert configure_compile_cache() == str(tmp_path / "env")  # the user's TORCHINDUCTOR_CACHE_DIR
    assert configure_compile_cache(str(tmp_path / "flag")) == str(tmp_path / "flag") == os.environ[CACHE_ENV]


def test_triton_kernels_follow_the_cache_folder_unless_the_user_chose_their_folder(cache_state, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "old" / "triton" / "0"))  # as torch fixes it
    monkeypatch.setattr(compilation, "_USER_TRITON_CACHE", False)
    compilation.use_cache_folder(tmp_path / "new")
    assert os.environ[CACHE_ENV] == str(tmp_path / "new") and "TRITON_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "users"))
    monkeypatch.setattr(compilation, "_USER_TRITON_CACHE", True)
    compilation.use_cache_folder(None)  # torch's default folder again
    assert CACHE_ENV not in os.environ and os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "users")


def test_off_compiles_from_scratch_and_a_folder_turns_the_caches_back_on(cache_state, tmp_path):
    inductor_config, functorch_config = cache_state
    assert configure_compile_cache("off") == "off"
    assert not inductor_config.fx_graph_cache and not functorch_config.enable_autograd_cache
    scratch = Path(os.environ[CACHE_ENV])
    assert scratch.is_dir() and not any(scratch.iterdir())  # even kernel files are not reused
    configure_compile_cache(str(tmp_path))
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache


def test_unwritable_cache_folder_is_an_option_error_unless_it_is_the_default(cache_state, tmp_path, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(OptionError, match=r"--compile-cache .*file: not a writable folder"):
        configure_compile_cache(str(not_a_folder))
    monkeypatch.setenv(CACHE_ENV, str(not_a_folder))
    with pytest.raises(OptionError, match="TORCHINDUCTOR_CACHE_DIR .*file: not a writable folder"):
        configure_compile_cache()
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))  # the default folder cannot be made
    with pytest.warns(CompileCacheWarning, match="not writable"):
        folder = configure_compile_cache()
    assert Path(folder).is_dir() and not Path(folder).is_relative_to(not_a_folder)


@pytest.mark.parametrize("add_args", [add_runtime_args, add_inference_runtime_args])
def test_compile_flag_resolves_the_cache_before_any_work_and_compiles_static_shapes(add_args, cache_state, tmp_path,
                                                                                    monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args(["--device", "cpu", "--compile", "on", "--compile-cache", str(tmp_path / "kernels")])
    resolve_fast_paths(args, torch.device("cpu"))
    assert args.compile_cache == str(tmp_path / "kernels") == os.environ[CACHE_ENV]  # recorded as used
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    network = torch.nn.Linear(2, 2)
    assert maybe_compile(network, args) is network and calls[0]["dynamic"] is False
    assert calls[0]["backend"].compiler_name == "inductor"
    args = parser.parse_args(["--compile", "on", "--compile-cache", str(tmp_path / "file" / "below")])
    (tmp_path / "file").write_text("")
    with pytest.raises(OptionError, match="--compile-cache"):
        resolve_fast_paths(args, torch.device("cpu"))


def test_backend_retries_once_in_a_fresh_folder_and_raises_a_real_compiler_error(cache_state, tmp_path, monkeypatch):
    configure_compile_cache(str(tmp_path / "cache"))
    backend = compilation._inductor_backend(None)
    attempts = []

    def compile_fx(self, model, inputs, **kwargs):
        attempts.append(os.environ[CACHE_ENV])
        if len(attempts) == 1:
            raise ImportError("cached kernel: file too short")
        return "compiled"

    monkeypatch.setattr(torch._TorchCompileInductorWrapper, "__call__", compile_fx)
    with pytest.warns(CompileCacheWarning, match=f"compile cache {tmp_path / 'cache'} unusable .*file too short"):
        assert backend(None, []) == "compiled"
    assert attempts[0] == str(tmp_path / "cache") and attempts[1] != attempts[0]

    def broken_compiler(self, model, inputs, **kwargs):
        attempts.append(os.environ[CACHE_ENV])
        raise RuntimeError("inductor bug")

    monkeypatch.setattr(torch._TorchCompileInductorWrapper, "__call__", broken_compiler)
    for cache in (None, tmp_path / "other"):  # from the scratch folder: no retry; from a cache: one
        attempts.clear()
        if cache:
            configure_compile_cache(str(cache))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning blames the cache: the compiler's error itself
            with pytest.raises(RuntimeError, match="inductor bug"):
                backend(None, [])
        assert len(attempts) == (2 if cache else 1)


@pytest.mark.slow
def test_bench_training_compile_times_cold_then_warm_in_a_fresh_folder(cache_state, tmp_path, monkeypatch):
    from bench.speedbench import training
    from bench.speedbench.config import PROFILES, TRAIN_SCRIPTS_CPU
    from bench.speedbench.state import Bench

    folders = []

    def recorded(model):  # the bench's flow around the compiler; compiling itself is the worker's test above
        folders.append(os.environ[CACHE_ENV])
        return model

    monkeypatch.setattr(training, "compile_network", recorded)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "users"))
    bench = Bench(SimpleNamespace(), PROFILES["toy"], torch.device("cpu"))
    config = dataclasses.replace(TRAIN_SCRIPTS_CPU, compile="scripts")
    result = training.measure_training(bench, "resnet18", "dsc", config)
    assert result["compile_cold_s"] > 0 and result["compile_warm_s"] > 0 and result["median_ms"] > 0
    assert result["compile_s"] == result["compile_cold_s"]
    # Both compilations used one fresh folder (not the user's), removed afterwards; the user's restored.
    assert len(folders) == 2 and folders[0] == folders[1] != str(tmp_path / "users")
    assert not Path(folders[0]).exists() and os.environ[CACHE_ENV] == str(tmp_path / "users")


def test_bench_compiles_the_training_step_as_the_scripts_do(monkeypatch):
    """The gpu profile's compiled training entries go through compile_network (dynamic=False), the
    function behind --compile on, not torch.compile's default dynamic shapes."""
    from bench.speedbench import training
    from bench.speedbench.config import PROFILES, TRAIN_SCRIPTS_CPU

    bench = SimpleNamespace(cuda=True, device=torch.device("cpu"), profile=PROFILES["gpu"],
                            args=SimpleNamespace(no_compile=False, compile_train="auto"))
    jobs = [job for job in training.training_jobs(bench, None) if job.phase == 1]
    assert [job.key for job in jobs] == ["resnet18+dsc/ours_compile", "resnet101+dsc/ours_compile"]
    assert all(job.settings["compile"] == "scripts" for job in jobs)
    compiled = []
    monkeypatch.setattr(training, "compile_network", lambda model: compiled.append(model) or "compiled")
    network, model, *_ = training.build_training(bench, "resnet18", "dsc",
                                                 dataclasses.replace(TRAIN_SCRIPTS_CPU, compile="scripts"))
    assert network == "compiled" and compiled == [model]
