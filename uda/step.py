"""The step that combines the methods of ``uda/``
with the adversarial step (``--discriminator fcd|dsc|none``) of ``engine.steps``.

One iteration: FDA restyles the source batch (``--fda-beta``); DACS' teacher labels the target batch
and ClassMix builds the mixed batch (``--self-training dacs``); then ``adversarial_step`` trains on the
source, the target's adversarial / entropy (``--entropy-weight``) / pseudo-label terms and the mixed
batch, in one optimizer step; last, the EMA teacher follows the student. Rare-class sampling
(``--rare-class-sampling``) only changes which source images the stream draws.

The step's random draws (FDA's target picks, ClassMix's classes, crops, jitter, blur) come from one
generator re-seeded from (seed, iteration, rank) at each step: a resumed run repeats them exactly.
With none of these flags the step is exactly ``adversarial_step``.
"""
from engine.cuda_graph import DeferredFiniteCheck, GraphedStep
from uda.dacs import DACS
from uda.entropy import entropy_terms
from uda.fda import FourierStyleTransfer
from utils.distributed import get_rank
from uda.adversarial import adversarial_step
from utils.seed import StepGenerator


def build_dacs(args, model, source_normalization, target_normalization):
    """The DACS state (teacher) for --self-training dacs, else None. ``model`` is the unwrapped student."""
    if args.self_training != "dacs":
        return None
    return DACS(model, args.num_classes, source_normalization, target_normalization, ema_decay=args.ema_decay,
                pseudo_threshold=args.pseudo_threshold)


class SelfTrainingStep:
    """``step_fn`` of the Trainer: (batches, iteration) -> detached losses."""

    def __init__(self, *, model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision, lambda_adv,
                 seed, pseudo_labels=False, uses_target=False, dacs=None, fda=None, entropy_weight=0.0):
        self.model = model                    # as trained (maybe DDP / compiled)
        self.discriminator = discriminator
        self.optimizer, self.optimizer_d = optimizer, optimizer_d
        self.scaler, self.scaler_d = scaler, scaler_d
        self.precision = precision
        self.lambda_adv = lambda_adv
        self.pseudo_labels = pseudo_labels
        self.uses_target = uses_target
        self.dacs = dacs
        self.fda = fda
        self.target_terms = entropy_terms(entropy_weight) if entropy_weight > 0 else None
        self.generator = StepGenerator(seed)  # FDA's target picks, ClassMix, crops, jitter, blur
        self.finite_check = None  # adversarial_step's check_finite unless set (a DeferredFiniteCheck)

    def __call__(self, batches, iteration):
        source_images, source_labels = batches["source"]["image"], batches["source"]["label"]
        target = batches.get("target", {}) if self.uses_target else {}
        target_images = target.get("image")
        extra_terms = None
        if self.fda is not None or self.dacs is not None:
            generator = self.generator(iteration, source_images.device, get_rank())
            if self.fda is not None:
                source_images = self.fda(source_images, target_images, generator)
            if self.dacs is not None:
                extra_terms = self.dacs.mixed_terms(source_images, source_labels, target_images, generator,
                                                    self.precision)
        losses = adversarial_step(
            self.model, self.discriminator, self.optimizer, self.optimizer_d, self.scaler, self.scaler_d,
            self.precision, source_images, source_labels, target_images,
            target.get("label") if self.pseudo_labels else None, lambda_adv=self.lambda_adv,
            target_terms=self.target_terms, extra_terms=extra_terms, check=self.finite_check)
        if self.dacs is not None:
            self.dacs.update_teacher(iteration)
        return losses


def build_step(args, *, train_model, discriminator, optimizer, optimizer_d, scaler, scaler_d, precision,
               uses_target, pseudo_labels, dacs, source_normalization, target_normalization):
    """The SelfTrainingStep the flags ask for; with --cuda-graph on, replayed from a CUDA graph
    (``engine.cuda_graph.GraphedStep``, its ``finite_check`` the Trainer's)."""
    fda = (FourierStyleTransfer(args.fda_beta, source_normalization, target_normalization)
           if args.fda_beta > 0 else None)
    step = SelfTrainingStep(model=train_model, discriminator=discriminator, optimizer=optimizer,
                            optimizer_d=optimizer_d, scaler=scaler, scaler_d=scaler_d, precision=precision,
                            lambda_adv=args.lambda_adv, seed=args.seed, pseudo_labels=pseudo_labels,
                            uses_target=uses_target, dacs=dacs, fda=fda, entropy_weight=args.entropy_weight)
    if getattr(args, "cuda_graph", "off") != "on":
        return step
    step.finite_check = DeferredFiniteCheck([o for o in (optimizer, optimizer_d) if o is not None], precision.device)
    return GraphedStep(step, step.finite_check, precision)
