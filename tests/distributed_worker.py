"""Test helper: run the project's scripts under torchrun (or in-process) for tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py \
        [--stop-at N] -- SCRIPT ARGS... [--then SCRIPT ARGS...]

Training scripts keep a copy of each ``last.pth`` as ``stepK.pth``; ``--stop-at N`` ends a
training run (on every rank, cleanly) right after the checkpoint of iteration N, as a crash or a
pre-empted job would, so that it can be resumed elsewhere. Several scripts joined by ``--then``
run one after the other in the same process group: one torchrun start-up instead of several.
"""
import argparse
import importlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # launched as a file by torchrun: make the repository importable
    sys.path.insert(0, str(ROOT))

from utils.distributed import barrier, cleanup_distributed, is_main_process  # noqa: E402
from engine.trainer import LAST_CHECKPOINT  # noqa: E402

TRAINING_SCRIPTS = ("trainSupervised", "trainUnsupervised")
SCRIPTS = (*TRAINING_SCRIPTS, "eval", "createpseudolabels")


class StopTraining(Exception):
    """Raised on every rank after the checkpoint of the --stop-at iteration."""


def run(script, argv, stop_at=None, keep_process_group=False):
    """``script``'s main() on ``argv``; returns what it returns (None when stopped at ``stop_at``).

    ``keep_process_group``: leave the process group up at the end, for a next script.
    """
    module = importlib.import_module(script)
    patched = {}
    if script in TRAINING_SCRIPTS:
        base = module.Trainer

        class RecordingTrainer(base):
            def save(self, filename):
                super().save(filename)
                if filename != LAST_CHECKPOINT:
                    return
                if is_main_process():
                    shutil.copyfile(self.output_dir / filename, self.output_dir / f"step{self.iteration}.pth")
                barrier()
                if stop_at is not None and self.iteration >= stop_at:
                    raise StopTraining

        patched["Trainer"] = RecordingTrainer
    if keep_process_group:
        patched["cleanup_distributed"] = lambda: None
    originals = {name: getattr(module, name) for name in patched}
    for name, value in patched.items():
        setattr(module, name, value)
    try:
        return module.main(module.get_args(argv))
    except StopTraining:
        if not keep_process_group:
            cleanup_distributed()
        return None
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop-at", type=int, default=None, help="stop training runs after this iteration's checkpoint")
    parser.add_argument("commands", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS... [--then SCRIPT ARGS...]")
    args = parser.parse_args()
    words = args.commands[1:] if args.commands[:1] == ["--"] else args.commands
    commands, current = [], []
    for word in words + ["--then"]:
        if word == "--then":
            if not current or current[0] not in SCRIPTS:
                parser.error(f"each command starts with one of {SCRIPTS}, got {current[:1]}")
            commands.append(current)
            current = []
        else:
            current.append(word)
    for index, (script, *argv) in enumerate(commands):
        run(script, argv, args.stop_at, keep_process_group=index + 1 < len(commands))


if __name__ == "__main__":
    main()
