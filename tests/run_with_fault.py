"""Test helper: run one of the project's scripts, which sends itself a signal at a fixed point.

    python tests/run_with_fault.py --signal TERM --after-logged-iteration 1 -- trainUnsupervised.py ARGS...
    python tests/run_with_fault.py --signal KILL --after-label-files 3 -- createpseudolabels.py ARGS...

``--after-logged-iteration N``: right after the training loop has written iteration N's loss-log
line (so with --log-every 1, after step N, before its checkpoint and stop check);
``--after-label-files N``: right after the N-th pseudo label is written. ``--process-group``
signals the whole process group (DataLoader workers included), as SLURM and Ctrl-C do. The fault
lands at the same point of the run however loaded the machine is: the tests that use this poll
nothing and depend on no timing.
"""
import argparse
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # launched as a file: make the repository importable
    sys.path.insert(0, str(ROOT))


def _send(signum, process_group):
    if process_group:
        # Only a process that leads its own group (started with start_new_session) may do this:
        # in the caller's group the signal would reach the test runner too.
        assert os.getpgid(0) == os.getpid(), "--process-group needs a process started in a session of its own"
        os.killpg(os.getpgid(0), signum)
    else:
        os.kill(os.getpid(), signum)


def _after_logged_iteration(iteration, signum, process_group):
    from engine.trainer import Trainer

    append = Trainer._append_loss_log

    def append_then_signal(self, record):
        append(self, record)
        if record["iteration"] == iteration:
            _send(signum, process_group)

    Trainer._append_loss_log = append_then_signal


def _after_label_files(count, signum, process_group):
    from uda import pseudolabel_files

    write = pseudolabel_files.write_label_files
    written = []

    def write_then_signal(*args, **kwargs):
        write(*args, **kwargs)
        written.append(args[1])
        if len(written) == count:
            _send(signum, process_group)

    pseudolabel_files.write_label_files = write_then_signal


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signal", required=True, choices=("TERM", "INT", "KILL"))
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--after-logged-iteration", type=int)
    where.add_argument("--after-label-files", type=int)
    parser.add_argument("--process-group", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT.py ARGS...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    signum = signal.Signals[f"SIG{args.signal}"]
    if args.after_logged_iteration is not None:
        _after_logged_iteration(args.after_logged_iteration, signum, args.process_group)
    else:
        _after_label_files(args.after_label_files, signum, args.process_group)
    script = str(ROOT / command[0])
    sys.argv = [script, *command[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
