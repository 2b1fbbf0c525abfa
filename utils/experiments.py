"""The report's experiments as a registry: every Table I row has an id that regenerates it.

``experiments.py`` runs the stages in order for each seed, each stage being one of the normal
scripts called with its own command line (so a stage is exactly what a user would type), then
scores every method on target val and writes the tables and pictures.
"""
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

DISCRIMINATOR_STAGES = ("fcd", "dsc")


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    script: str        # module name of the script: trainSupervised, trainUnsupervised, createpseudolabels, MPL
    needs: tuple = ()  # stages whose outputs this one reads

    def argv(self, settings, run_dir, seed_dir):
        return STAGE_ARGS[self.key](settings, run_dir, seed_dir)


@dataclass
class Settings:
    """Sizes and lengths of one pipeline run (the demo defaults fit 2 CPU cores in minutes)."""
    data_root: str = None
    source_size: str = "256x144"
    target_size: str = "256x128"
    batch_size: int = 2
    iterations: int = 300
    pseudo_iterations: int = 300
    mpl_iterations: int = 150
    val_every: int = 100
    workers: int = 2
    device: str = "auto"
    learning_rate: float = 2.5e-2
    lambda_adv: float = 1e-3
    progress: bool = True

    def common(self, seed, iterations):
        argv = ["--source-size", self.source_size, "--target-size", self.target_size,
                "--batch-size", str(self.batch_size), "--max-iters", str(iterations),
                "--val-every", str(min(self.val_every, iterations)), "--workers", str(self.workers),
                "--seed", str(seed), "--device", self.device, "--learning-rate", str(self.learning_rate),
                "--log-every", "10", "--no-tensorboard"]
        if self.data_root:
            argv += ["--data-root", str(self.data_root)]
        if not self.progress:
            argv.append("--no-progress")
        return argv


def _train_common(settings, run_dir, seed, iterations=None):
    return ["--output-dir", str(run_dir), *settings.common(seed, iterations or settings.iterations)]


def _seed(seed_dir):
    return int(Path(seed_dir).name.removeprefix("seed"))


STAGE_ARGS = {
    "supervised": lambda s, run, seed_dir: [*_train_common(s, run, _seed(seed_dir)), "--train-domain", "cityscapes"],
    "source_only": lambda s, run, seed_dir: [*_train_common(s, run, _seed(seed_dir)), "--discriminator", "none"],
    "fcd": lambda s, run, seed_dir: [*_train_common(s, run, _seed(seed_dir)), "--discriminator", "fcd",
                                     "--lambda-adv", str(s.lambda_adv)],
    "dsc": lambda s, run, seed_dir: [*_train_common(s, run, _seed(seed_dir)), "--discriminator", "dsc",
                                     "--lambda-adv", str(s.lambda_adv)],
    "pseudo": lambda s, run, seed_dir: [
        "--checkpoint", str(Path(seed_dir) / "dsc" / "last.pth"), "--output-dir", str(run),
        "--target-size", s.target_size, "--workers", str(s.workers), "--device", s.device,
        *(["--data-root", str(s.data_root)] if s.data_root else []), *([] if s.progress else ["--no-progress"])],
    "dsc_pl": lambda s, run, seed_dir: [*_train_common(s, run, _seed(seed_dir), s.pseudo_iterations),
                                        "--discriminator", "dsc", "--lambda-adv", str(s.lambda_adv),
                                        "--use-pseudolabels", str(Path(seed_dir) / "pseudo")],
    "mpl": lambda s, run, seed_dir: [*_train_common(s, run, _seed(seed_dir), s.mpl_iterations),
                                     "--discriminator", "dsc", "--lambda-adv", str(s.lambda_adv),
                                     "--teacher-checkpoint", str(Path(seed_dir) / "dsc" / "last.pth")],
}

STAGES = (
    Stage("supervised", "Supervised (target labels)", "trainSupervised"),
    Stage("source_only", "Source only", "trainUnsupervised"),
    Stage("fcd", "Adversarial FCD", "trainUnsupervised"),
    Stage("dsc", "Adversarial DSC", "trainUnsupervised"),
    Stage("pseudo", "Pseudo labels from DSC", "createpseudolabels", needs=("dsc",)),
    Stage("dsc_pl", "DSC + PL", "trainUnsupervised", needs=("pseudo",)),
    Stage("mpl", "DSC + MPL", "MPL", needs=("dsc",)),
)
STAGE_KEYS = tuple(stage.key for stage in STAGES)

# Table I rows: (label, stage, network inside the stage's checkpoint).
METHODS = (
    ("Supervised", "supervised", "model"),
    ("Source only", "source_only", "model"),
    ("FCD", "fcd", "model"),
    ("DSC", "dsc", "model"),
    ("DSC + PL", "dsc_pl", "model"),
    ("DSC + MPL (student)", "mpl", "model"),
    ("DSC + MPL (teacher)", "mpl", "teacher"),
)
BASELINE = "Source only"


def run_stage(stage, settings, seed_dir):
    """Run one stage's script in this process with its own command line; return seconds taken."""
    import importlib

    module = importlib.import_module(stage.script)
    run_dir = Path(seed_dir) / stage.key
    argv = stage.argv(settings, run_dir, seed_dir)
    print(f"\n[stage {stage.key}] python {stage.script}.py {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    module.main(module.get_args(argv))
    return time.perf_counter() - started
