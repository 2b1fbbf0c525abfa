"""The training speed levers of docs/speed.md: the exact ones are bitwise exact (torch.equal on the
CPU), the others the same function as the reference op within float32 / bfloat16 rounding."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dataset.labels import NUM_CLASSES
from engine.optim import build_optimizer
from engine.precision import Precision
from model import build_bisenet, build_discriminator
from uda.adversarial import adversarial_step
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
