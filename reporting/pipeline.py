"""The report's experiments as a registry: every Table I row has an id that regenerates it.

``experiments.py`` runs the stages in order for each seed, each stage being one of the normal
scripts called with its own command line (so a stage is exactly what a user would type), then
scores every method on target val and writes the tables and pictures.
"""
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

DISCRIMINATOR_STAGES = ("fcd", "dsc")


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    script: str        # module name of the script: trainSupervised, trainUnsupervised, createpseudolabels, MPL
    needs: tuple = ()  # stages whose outputs this one reads, besides its parent's last.pth
    parent: str = None  # the stage whose last.pth this one starts from (its curve continues that one's)

    def argv(self, settings, run_dir, seed_dir):
        return STAGE_ARGS[self.key](settings, run_dir, seed_dir)


@dataclass
class Settings:
    """Sizes and lengths of one pipeline run (the default demo takes 14 minutes on 2 CPU cores with
    --jobs 2: bench/results/demo_time_cpu.md).

    Training from scratch (no ImageNet weights offline) at a few hundred iterations: Adam reaches
    a usable model sooner than the report's SGD, so the demo uses Adam; the real-data commands in
    the README keep the report's SGD.
    Adaptation stages fine-tune the source-only model (an adversarial loss on a random network
    aligns noise), and a control stage continues source-only training for as long, so that each
    adaptation row can be compared with the same amount of training without adaptation.

    The supervised upper bound trains longer than source only because it converges more slowly:
    its target mIoU still rises where source only's has levelled off (its curve in
    results/synthetic/miou_curves.png), and an under-trained bound understates the domain gap.
    results.json records each stage's time (``stage_seconds``).
    """
    data_root: str = None
    source_size: str = "256x144"
    target_size: str = "256x128"
    batch_size: int = 2
    supervised_iterations: int = 1000  # from scratch: the supervised upper bound
    iterations: int = 600           # from scratch: source only
    adapt_iterations: int = 120     # fine-tuning: the control, FCD, DSC
    pseudo_iterations: int = 120    # DSC + PL, from the DSC model
    mpl_iterations: int = 60        # DSC + MPL (each feedback rule), teacher and student from the DSC model
    # Self-training rows (uda/), fine-tuning the source-only model for adapt_iterations like FCD/DSC.
    # FDA's and DAFormer's published values; the window and the temperature are relative, so they
    # mean the same at the demo's size. ADVENT weights its entropy term 1e-3 against a mean CE.
    fda_beta: float = 0.01
    entropy_weight: float = 1e-3
    rcs_temperature: float = 0.01
    val_every: int = 250
    workers: int = 2
    device: str = "auto"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lambda_adv: float = 1e-3
    progress: bool = True

    def common(self, seed, iterations):
        argv = ["--source-size", self.source_size, "--target-size", self.target_size,
                "--batch-size", str(self.batch_size), "--max-iters", str(iterations),
                "--val-every", str(self.val_interval(iterations)), "--workers", str(self.workers),
                "--seed", str(seed), "--device", self.device, "--optimizer", self.optimizer,
                "--learning-rate", str(self.learning_rate), "--log-every", "10", "--no-tensorboard"]
        if self.data_root:
            argv += ["--data-root", str(self.data_root)]
        if not self.progress:
            argv.append("--no-progress")
        return argv

    def val_interval(self, iterations):
        """Every ``val_every`` iterations, and always at the end. A fine-tuning stage shorter than
        that is validated at its end only: its curve starts at its parent's last point, so it is
        still a line. Validations cost seconds each on a CPU (with their checkpoints) and none
        changes the training (tests/test_training.py)."""
        return max(1, min(self.val_every, iterations))

    def stage_iterations(self, key):
        return {"supervised": self.supervised_iterations, "source_only": self.iterations, "pseudo": 0,
                "dsc_pl": self.pseudo_iterations, "mpl": self.mpl_iterations,
                "mpl_course": self.mpl_iterations}.get(key, self.adapt_iterations)


def _seed(seed_dir):
    return int(Path(seed_dir).name.removeprefix("seed"))


def _checkpoint(seed_dir, stage_key):
    return str(Path(seed_dir) / stage_key / "last.pth")  # last, not best: best is picked with target labels


def _train(key, *extra, adversarial=False):
    """argv builder of a training stage: the shared flags, its length, its parent's weights, ``extra``
    (``{seed_dir}`` and ``{settings.NAME}`` in it are filled in), and the adversarial weight for
    adversarial stages."""
    def argv(settings, run_dir, seed_dir):
        words = ["--output-dir", str(run_dir), *settings.common(_seed(seed_dir), settings.stage_iterations(key))]
        parent = STAGE_BY_KEY[key].parent
        if parent:
            words += ["--init-from", _checkpoint(seed_dir, parent)]
        words += [word.format(seed_dir=seed_dir, settings=settings) for word in extra]
        if adversarial:
            words += ["--lambda-adv", str(settings.lambda_adv)]
        return words
    return argv


def _pseudo(settings, run_dir, seed_dir):
    return ["--checkpoint", _checkpoint(seed_dir, "dsc"), "--output-dir", str(run_dir),
            "--target-size", settings.target_size, "--workers", str(settings.workers), "--device", settings.device,
            *(["--data-root", str(settings.data_root)] if settings.data_root else []),
            *([] if settings.progress else ["--no-progress"])]


STAGE_ARGS = {
    "supervised": _train("supervised", "--train-domain", "cityscapes"),
    "source_only": _train("source_only", "--discriminator", "none"),
    "source_only_ft": _train("source_only_ft", "--discriminator", "none"),
    "fcd": _train("fcd", "--discriminator", "fcd", adversarial=True),
    "dsc": _train("dsc", "--discriminator", "dsc", adversarial=True),
    "pseudo": _pseudo,
    "dsc_pl": _train("dsc_pl", "--discriminator", "dsc", "--use-pseudolabels", "{seed_dir}/pseudo", adversarial=True),
    "mpl": _train("mpl", "--discriminator", "dsc", "--feedback", "pham", "--teacher-checkpoint", "{seed_dir}/dsc/last.pth",
                  adversarial=True),
    "mpl_course": _train("mpl_course", "--discriminator", "dsc", "--feedback", "course", "--teacher-checkpoint",
                         "{seed_dir}/dsc/last.pth", adversarial=True),
    "dacs": _train("dacs", "--discriminator", "none", "--self-training", "dacs"),
    "dacs_dsc": _train("dacs_dsc", "--discriminator", "dsc", "--self-training", "dacs", adversarial=True),
    "fda_dsc": _train("fda_dsc", "--discriminator", "dsc", "--fda-beta", "{settings.fda_beta}", adversarial=True),
    "entropy_dsc": _train("entropy_dsc", "--discriminator", "dsc", "--entropy-weight", "{settings.entropy_weight}",
                          adversarial=True),
    "dacs_dsc_rcs": _train("dacs_dsc_rcs", "--discriminator", "dsc", "--self-training", "dacs",
                           "--rare-class-sampling", "{settings.rcs_temperature}", adversarial=True),
}

STAGES = (
    Stage("supervised", "Supervised (target labels)", "trainSupervised"),
    Stage("source_only", "Source only", "trainUnsupervised"),
    Stage("source_only_ft", "Source only, continued (control)", "trainUnsupervised", parent="source_only"),
    Stage("fcd", "Adversarial FCD", "trainUnsupervised", parent="source_only"),
    Stage("dsc", "Adversarial DSC", "trainUnsupervised", parent="source_only"),
    Stage("pseudo", "Pseudo labels from DSC", "createpseudolabels", needs=("dsc",)),
    Stage("dsc_pl", "DSC + PL", "trainUnsupervised", needs=("pseudo",), parent="dsc"),
    Stage("mpl", "DSC + MPL, the MPL paper's feedback (pham)", "MPL", parent="dsc"),
    Stage("mpl_course", "DSC + MPL, the course's feedback rule", "MPL", parent="dsc"),
    Stage("dacs", "DACS", "trainUnsupervised", parent="source_only"),
    Stage("dacs_dsc", "DACS + DSC", "trainUnsupervised", parent="source_only"),
    Stage("fda_dsc", "FDA + DSC", "trainUnsupervised", parent="source_only"),
    Stage("entropy_dsc", "Entropy minimisation + DSC", "trainUnsupervised", parent="source_only"),
    Stage("dacs_dsc_rcs", "DACS + DSC + rare-class sampling", "trainUnsupervised", parent="source_only"),
)
STAGE_KEYS = tuple(stage.key for stage in STAGES)
STAGE_BY_KEY = {stage.key: stage for stage in STAGES}

# Table I rows: (label, stage, network inside the stage's checkpoint).
METHODS = (
    ("Supervised", "supervised", "model"),
    ("Source only", "source_only", "model"),
    ("Source only, continued", "source_only_ft", "model"),
    ("FCD", "fcd", "model"),
    ("DSC", "dsc", "model"),
    ("DSC + PL", "dsc_pl", "model"),
    ("DSC + MPL pham (student)", "mpl", "model"),
    ("DSC + MPL pham (teacher)", "mpl", "teacher"),
    ("DSC + MPL course (student)", "mpl_course", "model"),
    ("DSC + MPL course (teacher)", "mpl_course", "teacher"),
    ("DACS", "dacs", "model"),
    ("DACS + DSC", "dacs_dsc", "model"),
    ("FDA + DSC", "fda_dsc", "model"),
    ("Entropy + DSC", "entropy_dsc", "model"),
    ("DACS + DSC + RCS", "dacs_dsc_rcs", "model"),
)
BASELINE = "Source only"
CONTROL = "Source only, continued"
# The paired comparisons (deltas.md): the baseline, the control, the report's adaptation rows that
# the others build on, and the best of the report's rows, which a new method has to beat.
PAIRED_REFERENCES = (BASELINE, CONTROL, "DSC", "DSC + PL")
REPORT_ADAPTATION_ROWS = ("FCD", "DSC", "DSC + PL", "DSC + MPL pham (student)", "DSC + MPL pham (teacher)",
                          "DSC + MPL course (student)", "DSC + MPL course (teacher)")

# --methods: the report's rows (every stage above up to MPL) and the self-training rows, one each.
REPORT_METHODS = "report"
SELF_TRAINING_METHODS = ("dacs", "dacs_dsc", "fda_dsc", "entropy_dsc", "dacs_dsc_rcs")
METHOD_CHOICES = (REPORT_METHODS, *SELF_TRAINING_METHODS, "all")
# The default pipeline: the report's rows plus the one new row expected to be the best (DACS + DSC:
# DACS is the strongest of these methods in the literature, and the discriminator combines with it).
DEFAULT_METHODS = (REPORT_METHODS, "dacs_dsc")


def selected_stage_keys(methods):
    """The stage keys that ``--methods`` asks for, in pipeline order."""
    methods = set(methods)
    if "all" in methods:
        return STAGE_KEYS
    wanted = set(methods & set(SELF_TRAINING_METHODS))
    if REPORT_METHODS in methods:
        wanted |= set(STAGE_KEYS) - set(SELF_TRAINING_METHODS)
    if wanted & set(SELF_TRAINING_METHODS):
        wanted.add("source_only")  # every new row fine-tunes it
    return tuple(key for key in STAGE_KEYS if key in wanted)


def total_iterations(settings, key):
    """Iterations of training behind a stage's model, its ancestors' included (curves and tables)."""
    stage = STAGE_BY_KEY[key]
    own = settings.stage_iterations(key)
    return own + (total_iterations(settings, stage.parent) if stage.parent else 0)


def start_iteration(settings, key):
    """Where a stage's curve starts: the end of its parent's training."""
    stage = STAGE_BY_KEY[key]
    return total_iterations(settings, stage.parent) if stage.parent else 0


def run_stage(stage, settings, seed_dir, script):
    """Run one stage's ``script`` (the module of ``stage.script``, passed in by experiments.py: the
    pipeline sits below the scripts and imports none) in this process with its own command line;
    return seconds taken."""
    run_dir = Path(seed_dir) / stage.key
    argv = stage.argv(settings, run_dir, seed_dir)
    if run_dir.exists():  # a rerun replaces the stage's folder whole: no file of the previous run survives
        print(f"[stage {stage.key}] replacing the previous run in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    print(f"\n[stage {stage.key}] python {stage.script}.py {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    script.main(script.get_args(argv))
    return time.perf_counter() - started
