"""Running the main job's stages side by side (``experiments.py --jobs N``).

On a CPU, one training process does not keep every core busy: a BiSeNet step at the demo's size
is many small operations, and PyTorch's intra-op threads wait on each other between them. The
stages of the pipeline form a graph (every fine-tuning stage reads its parent's ``last.pth``, DSC +
PL reads the pseudo labels), and stages that do not depend on each other can run at the same time,
each in its own process with its share of the cores (``OMP_NUM_THREADS``). A stage starts as soon
as the stages it reads have finished, in pipeline order among those ready. Each stage writes its
output to ``<seed dir>/logs/<stage>.log``; the console gets one line when a stage starts and one
when it ends.

A stage that fails stops the scheduling of new stages; those already running finish, then the
job ends with an error naming the stage and its log. Interrupting the job (Ctrl-C, SIGTERM)
passes the signal to the running stages, which save their checkpoints as the scripts do alone.
"""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from utils.errors import UserError

POLL_SECONDS = 0.2
LOG_TAIL_LINES = 15
STOP_GRACE_SECONDS = 120  # a stage given SIGTERM finishes its step and writes its checkpoint


class StageFailed(UserError):
    """A stage of the main job exited with an error; the message names it and its log."""


def default_jobs(device, cpu_count=None):
    """Stages run at once by default: two on a CPU with at least two cores, else one (a GPU runs
    one stage at a time: two would share its memory and its streams)."""
    cpu_count = cpu_count or os.cpu_count() or 1
    return 2 if device.type == "cpu" and cpu_count >= 2 else 1


def threads_per_job(jobs, cpu_count=None):
    """The cores, shared evenly among the stages that run at once."""
    return max(1, (cpu_count or os.cpu_count() or 1) // jobs)


def dependencies(tasks):
    """{(seed_dir, key): {(seed_dir, key) it waits for}}: the stage's parent and ``needs`` among
    ``tasks`` (a stage whose parent is not scheduled reads the parent's run from before)."""
    scheduled = {(str(seed_dir), stage.key) for seed_dir, stage in tasks}
    return {(str(seed_dir), stage.key): {(str(seed_dir), key) for key in (stage.parent, *stage.needs)
                                         if key and (str(seed_dir), key) in scheduled}
            for seed_dir, stage in tasks}


def _tail(path, lines=LOG_TAIL_LINES):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Running:
    def __init__(self, task, process, log_path, log_file, started):
        self.task, self.process, self.log_path, self.log_file, self.started = task, process, log_path, log_file, started


def run_stages_in_parallel(tasks, settings, script_files, jobs, threads):
    """Run ``tasks`` ((seed_dir, Stage) in pipeline order) with at most ``jobs`` at once, each
    stage a subprocess of its script (``script_files``: {module name: path}) with ``threads``
    threads. Returns {"seedN/key": seconds}; raises StageFailed when a stage fails."""
    waits_for = dependencies(tasks)
    pending, running, done, timings, failures = list(tasks), [], set(), {}, []

    def start(seed_dir, stage):
        run_dir = Path(seed_dir) / stage.key
        if run_dir.exists():  # a rerun replaces the stage's folder whole, as run_stage does
            shutil.rmtree(run_dir)
        argv = stage.argv(settings, run_dir, seed_dir)
        command = [sys.executable, str(script_files[stage.script]), *argv]
        log_path = Path(seed_dir) / "logs" / f"{stage.key}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")
        log_file.write(f"python {Path(script_files[stage.script]).name} {shlex.join(argv)}\n")
        log_file.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONUNBUFFERED": "1"}
        # A session of its own: a Ctrl-C at the terminal reaches this process only, which passes
        # one SIGTERM on (a stage that got both would take the second as "stop now, unsaved").
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        print(f"[stage {Path(seed_dir).name}/{stage.key}] started ({threads} thread(s)), log {log_path}", flush=True)
        running.append(_Running((str(seed_dir), stage), process, log_path, log_file, time.perf_counter()))

    def finish(entry, returncode):
        entry.log_file.close()
        seed_dir, stage = entry.task
        name = f"{Path(seed_dir).name}/{stage.key}"
        seconds = time.perf_counter() - entry.started
        if returncode == 0:
            done.add((seed_dir, stage.key))
            timings[name] = seconds
            print(f"[stage {name}] done in {seconds:.0f} s", flush=True)
        else:
            failures.append(f"stage {name} exited with status {returncode} (log: {entry.log_path})")
            print(f"[stage {name}] FAILED with status {returncode}; the end of {entry.log_path}:\n"
                  f"{_tail(entry.log_path)}", file=sys.stderr, flush=True)

    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while pending or running:
            for seed_dir, stage in list(pending):
                if failures or len(running) >= jobs:
                    break
                if waits_for[(str(seed_dir), stage.key)] <= done:
                    pending.remove((seed_dir, stage))
                    start(seed_dir, stage)
            if failures and not running:
                break
            if not running and pending:  # nothing can start: a dependency cannot be met
                raise StageFailed(f"stages {[stage.key for _, stage in pending]} wait for stages that did not run")
            time.sleep(POLL_SECONDS)
            for entry in list(running):
                returncode = entry.process.poll()
                if returncode is not None:
                    running.remove(entry)
                    finish(entry, returncode)
    finally:
        _stop(running)
        signal.signal(signal.SIGTERM, previous_handler)
    if failures:
        raise StageFailed("; ".join(failures) + (f"; not started: {', '.join(s.key for _, s in pending)}"
                                                 if pending else ""))
    return timings


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(running):
    """On an interruption or an error: SIGTERM to the stages still running (each saves its
    checkpoint and stops), then wait for them."""
    for entry in running:
        if entry.process.poll() is None:
            entry.process.send_signal(signal.SIGTERM)
    for entry in running:
        try:
            entry.process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            entry.process.kill()
            entry.process.wait()
        entry.log_file.close()
