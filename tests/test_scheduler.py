"""experiments.py --jobs: stages side by side in subprocesses, each after the stages it reads."""
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from reporting.pipeline import STAGE_ARGS, Settings, Stage
from reporting.scheduler import StageFailed, default_jobs, dependencies, run_stages_in_parallel, threads_per_job

# A stand-in script: --output-dir DIR --seed-dir S --wait-for NAME... --fail. It records the thread
# count it was given, checks that the stages it reads have finished (their done file exists), and,
# with --rendezvous NAME, waits until that stage has started too: two stages that wait for each other
# can only both finish when they run at the same time.
FAKE_STAGE = textwrap.dedent('''
    import argparse, os, pathlib, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir"); parser.add_argument("--seed-dir")
    parser.add_argument("--reads", nargs="*", default=[]); parser.add_argument("--rendezvous", default=None)
    parser.add_argument("--exit", type=int, default=0)
    args = parser.parse_args()
    out, seed = pathlib.Path(args.output_dir), pathlib.Path(args.seed_dir)
    out.mkdir(parents=True)
    (out / "started").write_text(os.environ.get("OMP_NUM_THREADS", "unset"))
    print("stage", out.name, "started", flush=True)
    missing = [name for name in args.reads if not (seed / name / "done").exists()]
    if missing:
        print("missing", missing, flush=True); sys.exit(3)
    if args.rendezvous:
        deadline = time.monotonic() + 60
        while not (seed / args.rendezvous / "started").exists():
            if time.monotonic() > deadline:
                print("no rendezvous", flush=True); sys.exit(4)
            time.sleep(0.05)
    if args.exit:
        print("failing on purpose", flush=True); sys.exit(args.exit)
    (out / "done").write_text("ok")
''')


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Register stages built from ``(key, parent, needs, extra argv)`` and return (stages, script files)."""
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)

    def make(*specs):
        stages = []
        for key, parent, needs, extra in specs:
            reads = [name for name in (parent, *needs) if name]
            monkeypatch.setitem(STAGE_ARGS, key, lambda settings, run_dir, seed_dir, reads=reads, extra=extra: [
                "--output-dir", str(run_dir), "--seed-dir", str(seed_dir), "--reads", *reads, *extra])
            stages.append(Stage(key, key, "fake_stage", needs=tuple(needs), parent=parent))
        return stages, {"fake_stage": str(script)}
    return make


def test_dependencies_are_the_parent_and_needs_of_the_same_seed_among_the_scheduled():
    a, b = Stage("a", "A", "s"), Stage("b", "B", "s", parent="a")
    c = Stage("c", "C", "s", needs=("b",), parent="missing")  # an unscheduled parent ran before
    graph = dependencies([("s0", a), ("s0", b), ("s0", c), ("s1", a), ("s1", b)])
    assert graph == {("s0", "a"): set(), ("s0", "b"): {("s0", "a")}, ("s0", "c"): {("s0", "b")},
                     ("s1", "a"): set(), ("s1", "b"): {("s1", "a")}}


def test_the_default_runs_two_stages_on_a_multi_core_cpu_and_one_on_a_gpu():
    assert default_jobs(torch.device("cpu"), cpu_count=2) == 2
    assert default_jobs(torch.device("cpu"), cpu_count=1) == 1
    assert default_jobs(torch.device("cuda"), cpu_count=16) == 1
    assert threads_per_job(2, cpu_count=2) == 1 and threads_per_job(2, cpu_count=16) == 8
    assert threads_per_job(4, cpu_count=2) == 1


def test_independent_stages_run_together_and_children_after_their_parents(tmp_path, fake_stages):
    # left and right can only finish side by side; child reads left and right's output.
    stages, scripts = fake_stages(("left", None, (), ["--rendezvous", "right"]),
                                  ("right", None, (), ["--rendezvous", "left"]),
                                  ("child", "left", ("right",), []))
    seeds = [tmp_path / "seed0", tmp_path / "seed1"]
    timings = run_stages_in_parallel([(seed, stage) for seed in seeds for stage in stages], Settings(), scripts,
                                     jobs=2, threads=3)
    assert set(timings) == {f"{seed.name}/{stage.key}" for seed in seeds for stage in stages}
    for seed in seeds:
        for stage in stages:
            assert (seed / stage.key / "done").read_text() == "ok"
            assert (seed / stage.key / "started").read_text() == "3"  # OMP_NUM_THREADS of the stage
            assert f"stage {stage.key} started" in (seed / "logs" / f"{stage.key}.log").read_text()


def test_a_failed_stage_stops_its_dependents_and_names_its_log(tmp_path, fake_stages):
    stages, scripts = fake_stages(("broken", None, (), ["--exit", "2"]), ("after", "broken", (), []),
                                  ("other", None, (), []))
    seed = tmp_path / "seed0"
    with pytest.raises(StageFailed) as failure:
        run_stages_in_parallel([(seed, stage) for stage in stages], Settings(), scripts, jobs=2, threads=1)
    message = str(failure.value)
    assert "stage seed0/broken exited with status 2" in message and str(seed / "logs" / "broken.log") in message
    assert "not started: after" in message and not (seed / "after").exists()
    assert "failing on purpose" in (seed / "logs" / "broken.log").read_text()


def test_a_rerun_replaces_the_previous_run_of_the_stage(tmp_path, fake_stages):
    stages, scripts = fake_stages(("only", None, (), []))
    stale = tmp_path / "seed0" / "only" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("previous run")
    run_stages_in_parallel([(tmp_path / "seed0", stages[0])], Settings(), scripts, jobs=2, threads=1)
    assert not stale.exists() and (tmp_path / "seed0" / "only" / "done").exists()


SLEEPING_STAGE = textwrap.dedent('''
    import pathlib, signal, sys, time
    out = pathlib.Path(sys.argv[sys.argv.index("--output-dir") + 1])
    out.mkdir(parents=True)
    def stop(signum, frame):
        (out / "checkpoint-saved").write_text(str(signum)); sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    (out / "started").write_text("")
    time.sleep(120)
''')

DRIVER = textwrap.dedent('''
    import sys
    from reporting.pipeline import STAGE_ARGS, Settings, Stage
    from reporting.scheduler import run_stages_in_parallel
    STAGE_ARGS["sleeper"] = lambda settings, run_dir, seed_dir: ["--output-dir", str(run_dir)]
    run_stages_in_parallel([(sys.argv[1], Stage("sleeper", "Sleeper", "sleeping"))], Settings(),
                           {"sleeping": sys.argv[2]}, jobs=2, threads=1)
''')


def test_sigterm_to_the_job_reaches_the_running_stages_which_save_and_stop(tmp_path):
    import signal
    import subprocess
    import time

    script = tmp_path / "sleeping.py"
    script.write_text(SLEEPING_STAGE)
    seed = tmp_path / "seed0"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(seed), str(script)],
                              cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (seed / "sleeper" / "started").exists():
            assert driver.poll() is None and time.monotonic() < deadline, "the stage never started"
            time.sleep(0.05)
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=60)
    finally:
        driver.kill()
    assert (seed / "sleeper" / "checkpoint-saved").read_text() == str(int(signal.SIGTERM))
    assert driver.returncode != 0  # the job stopped, it did not report success
