"""Runs the fused loss kernels in Triton's CPU interpreter and saves what they computed.

tests/test_fused_loss.py runs this file in a subprocess with TRITON_INTERPRET=1 (``triton.jit``
reads it when the kernels' module is imported, so it must be set before the first import) and
compares the saved losses, softmax maps and gradients with references it computes itself from
F.interpolate, F.cross_entropy and F.softmax. Usage: python tests/fused_loss_cases.py OUT.pt
"""
import os
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.fused_loss import fused_upsampled_cross_entropy, fused_upsampled_softmax, interpreted  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.precision import Precision  # noqa: E402
from engine.steps import forward_heads, main_output, segmentation_loss  # noqa: E402
from model import build_bisenet, build_discriminator  # noqa: E402
from model.resize import LowResLogits  # noqa: E402
from uda.adversarial import DEFAULT_LAMBDA_ADV, adversarial_step  # noqa: E402

IGNORE = 255

# The interpreter's cost is per operation, not per element: a backward loops over the output rows
# and columns reading one low-resolution row or column (20 at x8, 4-9 at the scales below), and every
# launch runs it once. So the network's x8 runs once per layout; the other properties (bf16, 19
# classes padded to 32 lanes, ignored labels, odd and mixed scales) on smaller scales, and the second
# run that shows the same bits again (gathers in a fixed order, every element written: the same code
# path at every scale) on those.
# name: (batch, classes, low (h, w), output (H, W), dtype, channels_last, ignored share, upstream gradient)
CASES = {
    "fp32": (2, 5, (6, 7), (48, 56), torch.float32, False, 0.2, 1.0),                # x8
    "fp32_channels_last": (2, 5, (6, 7), (48, 56), torch.float32, True, 0.2, 1.0),   # x8
    "bf16_channels_last": (2, 5, (6, 7), (13, 16), torch.bfloat16, True, 0.2, 1.0),
    "odd_sizes": (1, 3, (5, 3), (17, 11), torch.float32, False, 0.3, 0.37),
    "mixed_axes": (2, 4, (5, 9), (12, 4), torch.float32, True, 0.1, 1.0),   # x2.4 rows, x0.44 columns
    "nineteen_classes": (1, 19, (3, 4), (7, 9), torch.float32, True, 0.0, 1.0),
    "all_ignored": (2, 5, (6, 7), (13, 16), torch.float32, False, 1.0, 1.0),
}
# The cases run twice (the others once).
REPEATED = ("bf16_channels_last", "odd_sizes", "mixed_axes", "nineteen_classes", "all_ignored")


# The softmax: name: (batch, classes, low (h, w), output (H, W), dtype, channels_last logits and upstream gradient)
SOFTMAX_CASES = {
    "fp32": (2, 5, (6, 7), (48, 56), torch.float32, False),                # x8
    "fp32_channels_last": (2, 5, (6, 7), (48, 56), torch.float32, True),   # x8
    "bf16_channels_last": (2, 5, (6, 7), (13, 16), torch.bfloat16, True),
    "odd_sizes": (1, 3, (5, 3), (17, 11), torch.float32, False),
    "mixed_axes": (2, 4, (5, 9), (12, 4), torch.float32, True),   # x2.4 rows, x0.44 columns
    "nineteen_classes": (1, 19, (3, 4), (7, 9), torch.float32, True),
}
SOFTMAX_REPEATED = ("bf16_channels_last", "odd_sizes", "mixed_axes", "nineteen_classes")


def layout(tensor, channels_last):
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor


def random_logits(generator, batch, classes, low, dtype, channels_last):
    return layout((3 * torch.randn(batch, classes, *low, generator=generator)).to(dtype), channels_last)


def make_case(seed, batch, classes, low, out, dtype, channels_last, ignored):
    generator = torch.Generator().manual_seed(seed)
    logits = random_logits(generator, batch, classes, low, dtype, channels_last)
    labels = torch.randint(0, classes, (batch, *out), generator=generator)
    labels[torch.rand(batch, *out, generator=generator) < ignored] = IGNORE
    return logits, labels


def run_kernel_cases():
    results = {}
    for seed, (name, (batch, classes, low, out, dtype, channels_last, ignored, upstream)) in enumerate(CASES.items()):
        logits, labels = make_case(seed, batch, classes, low, out, dtype, channels_last, ignored)
        runs = []
        for _ in range(2 if name in REPEATED else 1):
            leaf = logits.clone().requires_grad_()
            loss = fused_upsampled_cross_entropy(leaf, labels)
            (loss * upstream).backward()
            runs.append((loss.detach(), leaf.grad))
        results[name] = {"logits": logits, "labels": labels, "upstream": upstream, "loss": runs[0][0],
                         "grad": runs[0][1]}
        if len(runs) == 2:
            results[name].update(loss_again=runs[1][0], grad_again=runs[1][1])
    return results


def run_softmax_cases():
    """fused_upsampled_softmax forward and backward (a random upstream gradient, in the logits'
    layout), twice for SOFTMAX_REPEATED."""
    results = {}
    for seed, (name, (batch, classes, low, out, dtype, channels_last)) in enumerate(SOFTMAX_CASES.items()):
        generator = torch.Generator().manual_seed(100 + seed)
        logits = random_logits(generator, batch, classes, low, dtype, channels_last)
        upstream = layout(torch.randn(batch, classes, *out, generator=generator), channels_last)
        runs = []
        for _ in range(2 if name in SOFTMAX_REPEATED else 1):
            leaf = logits.clone().requires_grad_()
            probs = fused_upsampled_softmax(leaf, out)
            probs.backward(upstream)
            runs.append((probs.detach(), leaf.grad))
        results[name] = {"logits": logits, "size": out, "upstream": upstream, "probs": runs[0][0],
                         "grad": runs[0][1]}
        if len(runs) == 2:
            results[name].update(probs_again=runs[1][0], grad_again=runs[1][1])
    return results


def run_bisenet_case():
    """BiSeNet's three heads through forward_heads + segmentation_loss with the fused loss on: the loss
    and the main output. Forward only: the MPL step's adversarial step backpropagates the same
    forward_heads + segmentation_loss (its source term), and its test compares the gradients."""
    torch.manual_seed(0)
    model = build_bisenet("resnet18", num_classes=5).train()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    labels = torch.randint(0, 5, (2, 64, 96), generator=generator)
    labels[:, :4] = IGNORE
    model.set_speed_levers(fused_loss=True)
    with torch.no_grad():
        outputs = forward_heads(model, images)
        loss = segmentation_loss(outputs, labels)
    return {"state": state, "images": images, "labels": labels, "loss": loss,
            "main": main_output(outputs).detach(), "main_cached": main_output(outputs) is main_output(outputs)}


def adversarial_parts(fused_loss):
    """A BiSeNet (5 classes) and a DSC with their optimizers, each optimizer recording the gradients it
    is asked to apply. With ``fused_loss`` the fused loss, else the classifier-first order."""
    torch.manual_seed(0)
    model = build_bisenet("resnet18", num_classes=5).train().set_speed_levers(
        classifier_first=not fused_loss, fused_loss=fused_loss)
    discriminator = build_discriminator("dsc", num_classes=5).train()
    optimizer = build_optimizer("sgd", model.parameters(), 1e-2)
    optimizer_d = build_optimizer("adam", discriminator.parameters(), 1e-3, weight_decay=0.0)
    return model, discriminator, optimizer, optimizer_d, recording(optimizer, model), recording(optimizer_d, discriminator)


def recording(optimizer, module):
    """The gradients of ``module`` at each ``optimizer.step`` (a list that fills as it steps)."""
    grads, step = [], optimizer.step

    def recording_step(*args, **kwargs):
        grads.append({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)
    optimizer.step = recording_step
    return grads


# The MPL step's source and target sizes (were 64 x 96 and 48 x 80): the interpreter's forward
# kernels take 4096 pixels a program, and the heads are x8 at any size. The target is the smallest
# the DSC discriminator takes (five 4x4 stride-2 convolutions); a source of 32 x 64 made pham's
# mpl_improvement (a difference of two losses of the student) differ by 1.1e-5, just past its
# tolerance (48 x 64: 5e-7).
SOURCE_SIZE, TARGET_SIZE = (48, 64), (32, 48)


def source_and_target_batch():
    generator = torch.Generator().manual_seed(3)
    source, target = torch.randn(2, 3, *SOURCE_SIZE, generator=generator), torch.randn(2, 3, *TARGET_SIZE,
                                                                                       generator=generator)
    return source, torch.randint(0, 5, (2, *SOURCE_SIZE), generator=generator), target


# The student's adversarial weight (--lambda-adv) in the MPL step: 1 rather than the scripts' 1e-3, so
# that its gradient (through the discriminator and the fused softmax) weighs in the student's
# segmentation gradients as much as it can. Still too little to show a wrong softmax backward there
# (measured: that backward scaled by 1.5 passes the MPL tests): run_adversarial_step isolates the
# adversarial gradient for that.
ADVERSARIAL_WEIGHT = 1.0


def run_mpl_step(fused_loss, rule):
    """One iteration of uda.meta_pseudo_labels.MPLStep (student and teacher BiSeNets with 5 classes,
    DSC discriminators, UDA view on, feedback ``rule``): its losses, the gradients each network's
    optimizer and the student's discriminator's applied, what every cross-entropy of the step read
    (LowResLogits or a full-resolution tensor), how many full-resolution class maps the networks made
    (bilinear resizes to the input size with 5 channels) and how many heads were upsampled
    (``LowResLogits.full``). The student's step is uda.adversarial.adversarial_step (source CE,
    adversarial + pseudo-label terms on the target (course), discriminator step)."""
    from engine import steps
    from model.resize import BilinearResize
    from uda.meta_pseudo_labels import Learner, MPLStep, PseudoLabeler
    from uda.mpl_feedback import CourseFeedback, PhamFeedback

    precision = Precision(torch.device("cpu"), "off")
    learners, applied, applied_d = [], [], []
    for role in ("student", "teacher"):
        model, discriminator, optimizer, optimizer_d, grads, grads_d = adversarial_parts(fused_loss)
        applied.append(grads)
        applied_d.append(grads_d)
        if role == "teacher":  # other weights than the student's
            torch.manual_seed(1)
            model.load_state_dict(build_bisenet("resnet18", num_classes=5).state_dict())
        learners.append(Learner(model, optimizer, precision.grad_scaler(), discriminator, optimizer_d,
                                precision.grad_scaler()))
    feedback = PhamFeedback(baseline_decay=0.5) if rule == "pham" else CourseFeedback(batches_per_epoch=1)
    step = MPLStep(*learners, labeler=PseudoLabeler(5, refresh=1), feedback=feedback, precision=precision,
                   lambda_adv=ADVERSARIAL_WEIGHT, uda_weight=0.5)
    read, full_maps, real_loss = [], [0], steps.summed_cross_entropy

    def recording_loss(logits, labels):
        read.append("low_res" if isinstance(logits, LowResLogits) else "full")
        return real_loss(logits, labels)

    def counting_resize(module, inputs, output):
        if output.shape[1] == 5 and tuple(output.shape[-2:]) == tuple(inputs[1]):
            full_maps[0] += 1

    hooks = [layer.register_forward_hook(counting_resize) for learner in learners for layer in learner.model.modules()
             if isinstance(layer, BilinearResize)]
    steps.summed_cross_entropy = recording_loss
    try:
        source, source_labels, target = source_and_target_batch()
        with mock.patch.object(LowResLogits, "full", autospec=True, side_effect=LowResLogits.full) as full:
            losses = step(source, source_labels, 3.0 * target, 0)
    finally:
        steps.summed_cross_entropy = real_loss
        for hook in hooks:
            hook.remove()
    return {"losses": losses, "read": read, "full_maps": full_maps[0], "full_calls": full.call_count,
            "student_grads": applied[0], "teacher_grads": applied[1], "student_grads_d": applied_d[0]}


def run_adversarial_step(fused_loss):
    """One uda.adversarial.adversarial_step (BiSeNet with 5 classes, DSC, the scripts' --lambda-adv
    1e-3) whose segmentation gradient is the adversarial term's alone: every source label ignored (a
    zero source loss and gradient), no target labels or terms. So the gradients applied to the
    network all flow through the discriminator's target map, class_probabilities, which with the
    fused loss is the fused upsample + softmax and its backward. Its losses and the gradients applied
    to the network."""
    model, discriminator, optimizer, optimizer_d, applied, _ = adversarial_parts(fused_loss)
    precision = Precision(torch.device("cpu"), "off")
    source, source_labels, target = source_and_target_batch()
    losses = adversarial_step(model, discriminator, optimizer, optimizer_d, precision.grad_scaler(),
                              precision.grad_scaler(), precision, source, torch.full_like(source_labels, IGNORE),
                              3.0 * target, lambda_adv=DEFAULT_LAMBDA_ADV)
    return {"losses": losses, "grads": applied[0]}


def main(path):
    assert os.environ.get("TRITON_INTERPRET") == "1" and interpreted()
    torch.set_num_threads(1)
    torch.save({"kernels": run_kernel_cases(), "softmax": run_softmax_cases(), "bisenet": run_bisenet_case(),
                "adversarial": run_adversarial_step(True),
                "mpl": {rule: run_mpl_step(True, rule) for rule in ("pham", "course")}}, path)


if __name__ == "__main__":
    main(sys.argv[1])
