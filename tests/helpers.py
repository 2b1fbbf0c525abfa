"""Helpers shared by the test files: the tiny run's flags, reading a run's files, damaging files,
stopping a training script after a given iteration, launching scripts as subprocesses, randomising
weights, counting the host's reads of tensor values."""
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 240  # what any one script launch may take on a loaded two-core machine

# A training run on the tiny tree of conftest.tiny_data_root: one thread's worth of work per step.
TINY_RUN = ["--source-size", "64x36", "--target-size", "64x32", "--batch-size", "2", "--workers", "0",
            "--log-every", "1", "--no-progress", "--seed", "3", "--no-tensorboard"]


def tiny_run(*extra, tensorboard=False):
    """TINY_RUN plus ``extra`` (strings or paths), with the TensorBoard writer on when asked."""
    flags = [flag for flag in TINY_RUN if tensorboard is False or flag != "--no-tensorboard"]
    return [*flags, *map(str, extra)]


def losses(run_dir):
    """The loss log of a run: one dict per logging step."""
    return [json.loads(line) for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines()]


def folder_digest(folder, exclude=()):
    """{relative path: sha256} of every file under ``folder`` (names in ``exclude`` left out)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


def temporaries(folder):
    """Names of the temporary files an interrupted atomic write leaves (``.NAME.XXXX.tmp``)."""
    return sorted(p.name for p in Path(folder).rglob(".*.tmp"))


def truncate(path, keep=0.5):
    """Cut a file to the first ``keep`` fraction of its bytes (a download or copy that died)."""
    content = Path(path).read_bytes()
    Path(path).write_bytes(content[:int(len(content) * keep)])


class StopTraining(Exception):
    """Raised by ``stop_after`` once the checkpoint of the chosen iteration is written."""


@contextlib.contextmanager
def stop_after(script_module, iteration):
    """While active, ``script_module``'s training run stops right after writing ``last.pth`` of
    ``iteration`` (raising StopTraining), as a job killed there would; ``--resume`` continues it."""
    base = script_module.Trainer

    class StoppingTrainer(base):
        def save(self, filename):
            super().save(filename)
            if filename == "last.pth" and self.iteration == iteration:
                raise StopTraining(iteration)

    script_module.Trainer = StoppingTrainer
    try:
        yield
    finally:
        script_module.Trainer = base


def subprocess_env():
    """One thread per process, unbuffered output, the repository importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def start_script(script, args, log_dir, name, new_session=False):
    """``python REPO/script ARGS...`` with stdout/stderr to ``log_dir/name.{out,err}`` (so nothing
    blocks on a full pipe); ``new_session``: in a process group of its own."""
    out, err = open(log_dir / f"{name}.out", "w"), open(log_dir / f"{name}.err", "w")
    process = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=log_dir, env=subprocess_env(),
                               stdout=out, stderr=err, start_new_session=new_session)
    process.logs = (log_dir / f"{name}.out", log_dir / f"{name}.err")
    out.close(), err.close()
    return process


def finish(process):
    """(exit code, stdout, stderr) of a started script; killed past SUBPROCESS_TIMEOUT_S."""
    try:
        process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return process.returncode, process.logs[0].read_text(), process.logs[1].read_text()


def run_in_triton_interpreter(cases_script, out):
    """What ``tests/<cases_script> OUT`` saved, run in a subprocess with TRITON_INTERPRET=1 (set before
    Triton is imported: ``triton.jit`` reads it when a kernels' module is imported)."""
    import torch

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "tests" / cases_script), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def compile_for_hopper(kernel, argument_type, blocks):
    """The sm_90 (H100/H200) cubin of a Triton kernel, compiled without a GPU: ``blocks`` are its
    constexpr arguments, ``argument_type(name)`` the type of each other one ("*bf16", "i32", ...).
    Skips the test where Triton has no ptxas."""
    import pytest
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {name: "constexpr" if name in blocks else argument_type(name) for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): blocks[name] for name in names if name in blocks})
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]
    except RuntimeError as error:
        if "ptxas" in str(error).lower():
            pytest.skip(f"no ptxas: {error}")
        raise


def runtime_args(*argv):
    """``argv`` parsed by a parser holding only the scripts' runtime options (cli.options.add_runtime_args)."""
    import argparse

    from cli.options import add_runtime_args

    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    return parser.parse_args(list(argv))


def kernels_to_compile(load_kernels, monkeypatch, cache_dir):
    """A Triton kernels' module (``load_kernels()``) for ``compile_for_hopper``: Triton's cache in
    ``cache_dir``, the interpreter off; skips without Triton or when the module was already imported in
    interpreter mode."""
    import pytest

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = load_kernels()
    if not hasattr(kernels.forward_kernel, "arg_names"):
        pytest.skip("the kernels were imported in interpreter mode")
    return kernels


def randomize_(model, seed=0):
    """Give every float parameter and buffer distinct random values, so a tensor loaded under
    the wrong name changes the output (running stats included; variances kept positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.rand(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise)
            elif name.endswith(("bn.weight", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
                tensor.copy_(0.8 + 0.4 * noise)
            else:
                tensor.copy_(0.1 * (noise - 0.5))
    return model


# The Tensor methods through which the host reads a tensor's value: on a GPU, each waits for the device.
HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def host_reads():
    """While active, the names of the HOST_READS methods called on any tensor, in call order."""
    calls = []
    own = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}  # None: inherited from the C base

    def counting(name, real):
        def method(self, *args, **kwargs):
            calls.append(name)
            return real(self, *args, **kwargs)
        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    try:
        yield calls
    finally:
        for name, method in own.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
