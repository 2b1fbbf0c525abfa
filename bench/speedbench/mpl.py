"""Section ``mpl``: one MPL iteration (``uda.meta_pseudo_labels.MPLStep``, pham and course feedback) over one
adversarial iteration, same sizes and the scripts' default settings."""
from dataset.labels import NUM_CLASSES
from uda.adversarial import DEFAULT_LAMBDA_ADV
from utils.benchmark import time_callable
from uda.adversarial import adversarial_step
from engine.precision import Precision

from .common import Job, bind, cudnn_flags, quantiles, size_text
from .config import R18, scripts_train_config, variant_train_config
from .training import build_training


def mpl_step_callable(bench, kind):
    """One call = one iteration of ``kind`` (adversarial | pham | course, or adversarial_fast_paths |
    pham_fast_paths: the model's speed levers off, or adversarial_fused_loss | pham_fused_loss:
    --fused-loss on) with the scripts' default settings at the training sizes (ImportError when
    ``uda.meta_pseudo_labels`` cannot be imported)."""
    from uda.meta_pseudo_labels import Learner, MPLStep, PseudoLabeler
    from uda.mpl_feedback import CourseFeedback, PhamFeedback

    kind, _, variant = kind.partition("_")
    config = variant_train_config(bench, variant)
    source, labels, target = bench.train_batch()
    precision = Precision(bench.device, config.amp)

    def learner():
        network, _, discriminator, optimizer, optimizer_d, scaler, scaler_d, _ = build_training(
            bench, R18, "dsc", config)
        return Learner(network, optimizer, scaler, discriminator, optimizer_d, scaler_d)

    if kind == "adversarial":
        student = learner()
        return lambda: adversarial_step(student.model, student.discriminator, student.optimizer, student.optimizer_d,
                                        student.scaler, student.scaler_d, precision, source, labels, target,
                                        lambda_adv=DEFAULT_LAMBDA_ADV)
    feedback = PhamFeedback() if kind == "pham" else CourseFeedback(batches_per_epoch=1000)
    step = MPLStep(learner(), learner(), PseudoLabeler(NUM_CLASSES).to(bench.device), feedback.to(bench.device),
                   precision, lambda_adv=DEFAULT_LAMBDA_ADV)
    counter = iter(range(10 ** 9))
    return lambda: step(source, labels, target, next(counter))


def train_default_settings(bench, kind="adversarial"):
    p = bench.profile
    config = variant_train_config(bench, kind.partition("_")[2])
    return {"context_path": R18, "discriminator": "dsc", "batch_size": p.train_batch,
            "source_size": size_text(p.train_source), "target_size": size_text(p.train_target),
            "amp": config.amp, "channels_last": config.channels_last, "optimizers": config.optimizer,
            "skip_unread_aux": config.skip_unread_aux, "classifier_first": config.classifier_first,
            "matmul_resize": config.matmul_resize, "fused_loss": config.fused_loss}


def mpl_jobs(bench, recorder):
    p = bench.profile
    config = scripts_train_config(bench)

    def measure(kind):
        try:
            call = mpl_step_callable(bench, kind)
        except ImportError as error:
            return {"skipped": f"uda.meta_pseudo_labels not importable ({error})"}
        with cudnn_flags(benchmark=config.cudnn_benchmark):
            _, samples = time_callable(call, bench.device, warmup=p.train_warmup, runs=p.mpl_runs)
        result = quantiles(samples)
        if not kind.startswith("adversarial"):  # against the adversarial step of the same settings
            baseline = recorder.find("mpl", kind.replace("pham", "adversarial").replace("course", "adversarial"))
            if baseline and baseline.get("median_ms"):
                result["ratio_to_adversarial"] = result["median_ms"] / baseline["median_ms"]
        return result

    return [Job("mpl", kind, name, bind(measure, kind), settings=train_default_settings(bench, kind), cost_s=10)
            for kind, name in (("adversarial", "adversarial step (ours)"), ("pham", "MPL step, pham feedback"),
                               ("course", "MPL step, course feedback"),
                               ("adversarial_fast_paths", "adversarial step, the model's speed levers off"),
                               ("pham_fast_paths", "MPL step, pham feedback, the model's speed levers off"),
                               ("adversarial_fused_loss", "adversarial step, --fused-loss on"),
                               ("pham_fused_loss", "MPL step, pham feedback, --fused-loss on"))
            if kind in p.mpl_variants and (bench.cuda or not kind.endswith("_fused_loss"))]
