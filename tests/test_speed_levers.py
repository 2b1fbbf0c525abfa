"""The training speed levers of docs/speed.md: the exact ones are bitwise exact (torch.equal on the
CPU), the others the same function as the reference op within float32 / bfloat16 rounding."""
import argparse
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli.builders import prepare_network, resolve_fast_paths
from cli.options import add_runtime_args
from dataset.labels import IGNORE_INDEX, NUM_CLASSES
from engine.optim import build_optimizer
from engine.precision import Precision
from engine.steps import segmentation_loss
from model import build_bisenet, build_discriminator
from model.resize import BilinearResize, bilinear_matmul, interpolation_matrix
from uda.adversarial import adversarial_step, build_discriminator_parts
from uda.entropy import entropy_terms
from uda.meta_pseudo_labels import Learner, MPLStep, PseudoLabeler
from uda.mpl_feedback import CourseFeedback, PhamFeedback

SIZE = (32, 64)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (the conftest fixture)."""


def _batch(seed, labels=True):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *SIZE, generator=generator)
    return images, (torch.randint(0, NUM_CLASSES, (2, *SIZE), generator=generator) if labels else None)


def _learner(seed, skip_unread_aux):
    torch.manual_seed(seed)
    model = build_bisenet("resnet18", NUM_CLASSES).set_speed_levers(skip_unread_aux=skip_unread_aux)
    discriminator = build_discriminator("dsc", NUM_CLASSES)
    precision = Precision("cpu", "off")
    return Learner(model, build_optimizer("sgd", model.parameters(), 1e-2), precision.grad_scaler(), discriminator,
                   build_optimizer("adam", discriminator.parameters(), 1e-3, weight_decay=0.0), precision.grad_scaler())


def _gradient_recorder(optimizer, module, store):
    """Record ``module``'s gradients each time ``optimizer`` steps (then step as usual)."""
    step = optimizer.step

    def recording_step(*args, **kwargs):
        store.append({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)
    optimizer.step = recording_step


def _count_aux_calls(model):
    calls = []
    for head in (model.aux_head16, model.aux_head32):
        head.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    return calls


def _assert_equal_dicts(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ------------------------------------------------------------------ lever 1: unread auxiliary heads
def test_auxiliary_heads_are_plain_convolutions_without_state():
    """The claim the skip rests on: the heads are 1x1 convolutions with no BatchNorm (no running
    statistics a skipped forward would leave unmoved) on features the main path computes anyway."""
    model = build_bisenet("resnet18", NUM_CLASSES)
    for head in (model.aux_head16, model.aux_head32):
        assert type(head) is nn.Conv2d and head.kernel_size == (1, 1)
        assert not list(head.buffers()) and not list(head.children())
    model.train()
    x = torch.randn(2, 3, *SIZE)
    main, aux16, aux32 = model(x)
    main_only = model(x, aux=False)
    assert torch.is_tensor(main_only) and torch.equal(main_only, main)
    assert model.set_speed_levers(skip_unread_aux=False)(x, aux=False)[1].shape == aux16.shape


@pytest.mark.parametrize("with_discriminator", [True, False])
def test_adversarial_step_skipping_unread_heads_is_bitwise_exact(with_discriminator):
    """Adversarial + entropy terms on the target (no target labels): the target forward skips the
    heads, and every loss and gradient of the step is bitwise what the full forward gives."""
    source, target = _batch(1), _batch(2, labels=False)
    runs = []
    for skip in (False, True):
        learner = _learner(0, skip)
        gradients, gradients_d = [], []
        _gradient_recorder(learner.optimizer, learner.model, gradients)
        _gradient_recorder(learner.optimizer_d, learner.discriminator, gradients_d)
        calls = _count_aux_calls(learner.model)
        losses = adversarial_step(learner.model, learner.discriminator if with_discriminator else None,
                                  learner.optimizer, learner.optimizer_d, learner.scaler, learner.scaler_d,
                                  Precision("cpu", "off"), source[0], source[1], target[0], lambda_adv=0.1,
                                  target_terms=entropy_terms(0.5))
        runs.append((losses, gradients, gradients_d, learner.model.state_dict(), calls))
    (losses0, grads0, grads_d0, state0, calls0), (losses1, grads1, grads_d1, state1, calls1) = runs
    assert calls0 == [2, 2, 2, 2] and calls1 == [2, 2]  # heads on source and target; on the source only
    _assert_equal_dicts(losses0, losses1)
    _assert_equal_dicts(grads0[0], grads1[0])
    assert len(grads_d0) == len(grads_d1) == int(with_discriminator)
    if with_discriminator:
        _assert_equal_dicts(grads_d0[0], grads_d1[0])
    _assert_equal_dicts(state0, state1)  # BatchNorm statistics and the stepped weights too


def test_pseudo_label_targets_still_train_all_three_heads():
    """With target labels the pseudo-label loss sums the three heads: nothing is skipped."""
    source, target = _batch(1), _batch(2)
    learner = _learner(0, True)
    calls = _count_aux_calls(learner.model)
    adversarial_step(learner.model, None, learner.optimizer, None, learner.scaler, None, Precision("cpu", "off"),
                     source[0], source[1], target[0], target[1])
    assert calls == [2, 2, 2, 2]


def _mpl(feedback, skip):
    return MPLStep(student=_learner(0, skip), teacher=_learner(1, skip), labeler=PseudoLabeler(NUM_CLASSES, 2),
                   feedback=feedback, precision=Precision("cpu", "off"), lambda_adv=0.1, uda_weight=0.5)


@pytest.mark.parametrize("rule", ["pham", "course"])
def test_mpl_step_skipping_unread_heads_is_bitwise_exact(rule):
    """pham: the teacher's target forward (clean + augmented view) and the student's adversarial
    target forward skip the heads; course sums the teacher's three target heads and trains the
    student on pseudo labels, so its teacher forward keeps them. Either way every loss, every
    gradient and every network after the step are bitwise those of the full forwards."""
    source, target = _batch(1), _batch(2, labels=False)
    runs = []
    for skip in (False, True):
        step = _mpl(PhamFeedback() if rule == "pham" else CourseFeedback(batches_per_epoch=10), skip)
        gradients = []
        _gradient_recorder(step.teacher.optimizer, step.teacher.model, gradients)
        teacher_calls = _count_aux_calls(step.teacher.model)
        losses = step(source[0], source[1], target[0], 0)
        states = {(side, part): copy.deepcopy(getattr(getattr(step, side), part).state_dict())
                  for side in ("student", "teacher") for part in ("model", "discriminator")}
        runs.append((losses, gradients[0], states, teacher_calls))
    (losses0, grads0, states0, calls0), (losses1, grads1, states1, calls1) = runs
    assert calls0 == [4, 4, 2, 2]  # [target; view] then source
    assert calls1 == ([2, 2] if rule == "pham" else [4, 4, 2, 2])
    _assert_equal_dicts(losses0, losses1)
    _assert_equal_dicts(grads0, grads1)
    for part in states0:
        _assert_equal_dicts(states0[part], states1[part])


# ------------------------------------------------------------------ levers 2 and 3: other rounding
def _hand_interpolation_matrix(in_size, out_size):
    """PyTorch's bilinear rule (align_corners=False, size given) written out in float64: output
    pixel i reads source coordinate max((i + 0.5) * in / out - 0.5, 0) from its two neighbours,
    the right one clamped to the border."""
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        source = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        left = min(int(source), in_size - 1)
        right = min(left + 1, in_size - 1)
        weight = source - left
        matrix[i, left] += 1.0 - weight
        matrix[i, right] += weight
    return matrix


RESIZES = [(8, 64), (12, 96), (23, 720), (45, 90), (7, 60), (90, 23), (64, 17), (5, 5)]


@pytest.mark.parametrize("in_size, out_size", RESIZES)
def test_interpolation_matrix_is_the_bilinear_rule_and_its_rows_sum_to_one(in_size, out_size):
    """What both levers rest on: the matrix form uses F.interpolate's coefficients, and each output
    pixel's weights sum to 1 (borders included), so a 1x1 convolution's bias passes through."""
    matrix = interpolation_matrix(in_size, out_size, torch.device("cpu"), torch.float32)
    # PyTorch computes the source coordinate (< in_size) in float32: its weights carry that rounding.
    coordinate_rounding = 2 * in_size * torch.finfo(torch.float32).eps
    torch.testing.assert_close(matrix.double(), _hand_interpolation_matrix(in_size, out_size), rtol=0,
                               atol=coordinate_rounding)
    torch.testing.assert_close(matrix.double().sum(1), torch.ones(out_size, dtype=torch.float64), rtol=0, atol=1e-6)


def _resize_pair(x, size, dtype=None):
    """(F.interpolate, bilinear_matmul) outputs and input gradients for a fixed random upstream gradient."""
    upstream = torch.randn(x.shape[0], x.shape[1], *size, generator=torch.Generator().manual_seed(9))
    results = []
    for resize in (lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False),
                   lambda t: bilinear_matmul(t, size)):
        leaf = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            output = resize(leaf.to(dtype) if dtype is not None else leaf)
        (output.float() * upstream).sum().backward()
        results.append((output, leaf.grad))
    return results


@pytest.mark.parametrize("in_hw, out_hw", [((8, 16), (64, 128)), ((23, 40), (720, 1280)), ((7, 11), (60, 90)),
                                           ((60, 90), (7, 11)), ((45, 80), (90, 160)), ((16, 16), (16, 40))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matmul_resize_equals_interpolate_forward_and_backward(in_hw, out_hw, channels_last):
    """Up- and down-sampling, odd sizes, one axis unchanged: float32 values and input gradients
    within float32 rounding; a channels_last input comes back channels_last."""
    x = torch.randn(2, 5, *in_hw, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (reference, reference_grad), (output, grad) = _resize_pair(x, out_hw)
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-4)
    assert output.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_matmul_resize_in_bfloat16_stays_within_bfloat16_rounding():
    x = torch.randn(2, 19, 23, 40, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last)
    (reference, reference_grad), (output, grad) = _resize_pair(x, (720, 1280), dtype=torch.bfloat16)
    assert output.dtype == reference.dtype == torch.bfloat16
    scale = reference.float().abs().max()
    assert (output.float() - reference.float()).abs().max() <= 2 ** -7 * scale  # bf16: 8 significant bits
    assert (grad - reference_grad).abs().max() <= 2 ** -7 * reference_grad.abs().max()


def _step_gradients(model, x, labels):
    model.zero_grad(set_to_none=True)
    outputs = model(x)
    segmentation_loss(outputs, labels).backward()
    return outputs[0].detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("levers", [{"classifier_first": True}, {"matmul_resize": True},
                                    {"classifier_first": True, "matmul_resize": True}])
@pytest.mark.parametrize("size", [(64, 128), (60, 90)])
def test_rounding_levers_give_the_same_bisenet_forward_and_backward(levers, size):
    """The classifier before the upsampling (exact by linearity) and the matrix-product resizing:
    the main output and every gradient of the three-head loss agree with the current order within
    float32 rounding, also for an input that is no multiple of 8. The state_dict is untouched."""
    torch.manual_seed(0)
    reference_model = build_bisenet("resnet18", NUM_CLASSES).train()
    with torch.no_grad():
        reference_model.classifier.bias.uniform_(-1.0, 1.0)  # a bias that must pass through the resize
    model = copy.deepcopy(reference_model).set_speed_levers(**levers)
    assert model.state_dict().keys() == reference_model.state_dict().keys()
    x, labels = torch.randn(2, 3, *size), torch.randint(0, NUM_CLASSES, (2, *size))
    reference_main, reference_grads = _step_gradients(reference_model, x, labels)
    main, grads = _step_gradients(model, x, labels)
    torch.testing.assert_close(main, reference_main, rtol=1e-5, atol=1e-5 * reference_main.abs().max().item())
    # Measured: relative differences of a few 1e-6. The scale is the largest gradient of the network:
    # the biases of the convolutions right before a BatchNorm have a true gradient of 0 (rounding noise).
    scale = max(reference.abs().max().item() for reference in reference_grads.values())
    for name, reference in reference_grads.items():
        torch.testing.assert_close(grads[name], reference, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_rounding_levers_are_on_for_cuda_and_off_on_the_cpu_by_default():
    """--classifier-first / --matmul-resize auto: on for CUDA only, so CPU runs (and the committed CPU
    results) keep their bits; prepare_network and build_discriminator_parts apply them; a script
    without the flags (eval, predict) gets neither and records nothing new."""
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    benchmark = torch.backends.cudnn.benchmark
    try:
        resolved = {kind: resolve_fast_paths(parser.parse_args([]), SimpleNamespace(type=kind))
                    for kind in ("cpu", "cuda")}
    finally:
        torch.backends.cudnn.benchmark = benchmark  # resolve_fast_paths turns it on for CUDA
    assert (resolved["cpu"].classifier_first, resolved["cpu"].matmul_resize) == ("off", "off")
    assert (resolved["cuda"].classifier_first, resolved["cuda"].matmul_resize) == ("on", "on")
    forced = resolve_fast_paths(parser.parse_args(["--classifier-first", "on", "--matmul-resize", "on"]),
                                torch.device("cpu"))
    assert (forced.classifier_first, forced.matmul_resize) == ("on", "on")
    assert not hasattr(resolve_fast_paths(argparse.Namespace(), torch.device("cpu")), "matmul_resize")

    forced.sync_bn = forced.freeze_bn = False
    network = prepare_network(build_bisenet("resnet18", NUM_CLASSES), forced, torch.device("cpu"))
    resizes = [layer for layer in network.modules() if isinstance(layer, BilinearResize)]
    assert network.classifier_first and resizes and all(layer.matmul for layer in resizes)
    forced.discriminator, forced.optimizer_d, forced.learning_rate_d, forced.momentum = "dsc", "adam", 1e-4, 0.9
    discriminator, _, _ = build_discriminator_parts(forced, torch.device("cpu"), NUM_CLASSES)
    assert discriminator.upsample.matmul
    plain = prepare_network(build_bisenet("resnet18", NUM_CLASSES), resolved["cpu"], torch.device("cpu"))
    assert not plain.classifier_first and not any(layer.matmul for layer in plain.modules()
                                                  if isinstance(layer, BilinearResize))


# ------------------------------------------------------------------ lever 4: MPL without changing the method
@pytest.mark.parametrize("channels_last", [False, True])
def test_mpl_labeler_reading_the_shared_softmax_is_bitwise_the_labeler_on_logits(channels_last):
    """MPL's teacher computes one float32 softmax for its discriminator and its labeler: pseudo labels,
    threshold histogram and refreshed thresholds are bitwise those of the labeler's own softmax."""
    torch.manual_seed(0)
    model = build_bisenet("resnet18", NUM_CLASSES).train()
    x = torch.randn(2, 3, *SIZE)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    logits = (3.0 * model(x, aux=False)).float()  # sharper than at initialisation: some pixels pass
    own, shared = PseudoLabeler(NUM_CLASSES, refresh=1), PseudoLabeler(NUM_CLASSES, refresh=1)
    for iteration in range(2):
        labels = own(logits.detach(), iteration)
        shared_labels = shared(logits.detach(), iteration, F.softmax(logits, dim=1).detach())
        assert torch.equal(labels, shared_labels)
        _assert_equal_dicts(own.state_dict(), shared.state_dict())
    assert (labels != IGNORE_INDEX).any() and own.thresholds.gt(0).any()
