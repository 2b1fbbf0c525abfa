"""MPL's step without waste (issue 19) against the step as it was (tests/mpl_reference.py), on the CPU.

What changed: pham's labeled loss after the pseudo-label step is the student's source-step loss
(read before that step's update) instead of a second no-grad forward; the teacher takes one backward
over its summed target and source losses instead of two; whether any rank has a pseudo label is
decided in the finiteness check's host sync; the labeler's thresholds are binned on their device;
the teacher's discriminator loss is computed and checked with the teacher's losses, before its update.
None of that changes a number: losses, the gradients each optimizer applies, the networks, their
optimizers' state and the MPL state after a few iterations are bitwise equal (torch.equal). The
teacher's two backward passes summed each parameter's two gradients (target graph, then source
graph) in .grad; the single backward sums the same two tensors in autograd's input buffer, and a
sum of two floats does not depend on their order, which is why even that is bitwise.
"""
import copy

import pytest
import torch

from dataset.labels import NUM_CLASSES
from engine.precision import Precision
from engine.steps import NonFiniteLossError
from model import build_bisenet, build_discriminator
from engine.optim import build_optimizer
from tests.helpers import host_reads
from tests.mpl_reference import reference_mpl_step
from uda.meta_pseudo_labels import Learner, MPLStep, PseudoLabeler
from uda.mpl_feedback import CourseFeedback, PhamFeedback

SIZE = (32, 64)
ITERATIONS = 3  # thresholds refreshed at 0 and 2 (refresh 2), the pham baseline moved twice


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _batches(iteration):
    generator = torch.Generator().manual_seed(100 + iteration)
    source = torch.randn(2, 3, *SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (2, *SIZE), generator=generator)
    return source, labels, 2.0 * torch.randn(2, 3, *SIZE, generator=generator)


def _learner(seed, precision):
    torch.manual_seed(seed)
    model = build_bisenet("resnet18", NUM_CLASSES)
    discriminator = build_discriminator("dsc", NUM_CLASSES)
    # SGD with momentum and weight decay: a step taken with a zero gradient would still move the weights.
    return Learner(model, build_optimizer("sgd", model.parameters(), 1e-2, 5e-4, 0.9), precision.grad_scaler(),
                   discriminator, build_optimizer("adam", discriminator.parameters(), 1e-3, weight_decay=0.0),
                   precision.grad_scaler())


def _step(rule, uda_weight, thresholds=None, amp="off"):
    precision = Precision("cpu", amp)
    feedback = PhamFeedback(baseline_decay=0.5) if rule == "pham" else CourseFeedback(batches_per_epoch=2)
    labeler = PseudoLabeler(NUM_CLASSES, 0, thresholds) if thresholds is not None else PseudoLabeler(NUM_CLASSES, 2)
    return MPLStep(student=_learner(0, precision), teacher=_learner(1, precision), labeler=labeler, feedback=feedback,
                   precision=precision, lambda_adv=0.1, uda_weight=uda_weight, uda_ramp_iters=4)


def _record_gradients(step):
    """Every gradient each of the step's four optimizers is asked to apply, in call order."""
    seen = []
    for side in ("student", "teacher"):
        learner = getattr(step, side)
        for optimizer, module, name in ((learner.optimizer, learner.model, side),
                                        (learner.optimizer_d, learner.discriminator, side + " D")):
            def recording(*args, _real=optimizer.step, _module=module, _name=name, **kwargs):
                seen.append((_name, {key: p.grad.clone() for key, p in _module.named_parameters()
                                     if p.grad is not None}))
                return _real(*args, **kwargs)
            optimizer.step = recording
    return seen


def _state(step):
    """Networks (parameters and buffers), optimizer states and the MPL state, as flat tensors."""
    state = {}
    for side in ("student", "teacher"):
        learner = getattr(step, side)
        for part in ("model", "discriminator"):
            state.update({f"{side}.{part}.{k}": v for k, v in getattr(learner, part).state_dict().items()})
        for part in ("optimizer", "optimizer_d"):
            for index, entry in getattr(learner, part).state_dict()["state"].items():
                state.update({f"{side}.{part}.{index}.{k}": torch.as_tensor(v) for k, v in entry.items()})
    state.update({f"mpl.{k}": v for k, v in step.state_module().state_dict().items()})
    return state


def _assert_bitwise(expected, got, what):
    assert expected.keys() == got.keys(), what
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"{what}: {different[:5]}"


def _run_both(step):
    reference = copy.deepcopy(step)
    runs = []
    for run in (reference, step):
        gradients = _record_gradients(run)
        losses = []
        for iteration in range(ITERATIONS):
            source, labels, target = _batches(iteration)
            call = reference_mpl_step if run is reference else type(run).__call__
            losses.append(call(run, source, labels, target, iteration))
        runs.append((losses, gradients, _state(run)))
    return runs


@pytest.mark.parametrize("rule, uda_weight", [("pham", 0.5), ("pham", 0.0), ("course", 0.5)])
def test_mpl_step_equals_the_step_before_bitwise(rule, uda_weight):
    (losses0, gradients0, state0), (losses1, gradients1, state1) = _run_both(_step(rule, uda_weight))
    assert any(loss["pl_kept"] > 0 for loss in losses1)  # the pseudo-label terms were exercised
    if rule == "pham":
        assert all("mpl_loss_after" in loss for loss in losses1) and losses1[-1]["mpl_h"] != 0
    for iteration, (expected, got) in enumerate(zip(losses0, losses1)):
        _assert_bitwise(expected, got, f"losses of iteration {iteration}")
    assert [name for name, _ in gradients0] == [name for name, _ in gradients1]
    assert len(gradients1) == 4 * ITERATIONS + (ITERATIONS if rule == "pham" else 0)  # + the pseudo-label steps
    for (name, expected), (_, got) in zip(gradients0, gradients1):
        _assert_bitwise(expected, got, f"gradients applied to the {name}")
    _assert_bitwise(state0, state1, "state after the steps")


def test_without_any_pseudo_label_the_step_still_equals_the_step_before():
    # Nothing reaches a threshold of 1.0: the student takes no pseudo-label step, h = 0, and the
    # momentum SGD would have moved the student had the step run with a zero gradient.
    (losses0, gradients0, state0), (losses1, gradients1, state1) = _run_both(
        _step("pham", 0.5, thresholds=torch.ones(NUM_CLASSES)))
    assert all(loss["pl_kept"] == 0 and "loss_pseudo" not in loss for loss in losses1)
    assert len(gradients1) == 4 * ITERATIONS
    for expected, got in zip(losses0, losses1):
        _assert_bitwise(expected, got, "losses")
    _assert_bitwise(state0, state1, "state after the steps")


def test_mpl_step_in_bfloat16_autocast_equals_the_step_before():
    # Under autocast the heads are bfloat16 and cast to float32 where the losses read them: the
    # cast and the summed backward must not change where gradients are rounded.
    (losses0, _, state0), (losses1, _, state1) = _run_both(_step("pham", 0.5, amp="bf16"))
    for expected, got in zip(losses0, losses1):
        _assert_bitwise(expected, got, "losses")
    _assert_bitwise(state0, state1, "state after the steps")


def test_a_non_finite_source_batch_refuses_before_the_student_moves():
    # The labeled loss before the pseudo-label step is checked with that step's loss, before its
    # update (it used to be checked after it, with the student already stepped).
    step = _step("pham", 0.5)
    source, labels, target = _batches(0)
    student = copy.deepcopy(step.student.model.state_dict())
    teacher = {k: v.clone() for k, v in step.teacher.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="mpl_loss_before"):
        step(torch.full_like(source, float("nan")), labels, target, 0)
    parameters = dict(step.student.model.named_parameters())
    assert all(torch.equal(student[name], parameters[name]) for name in parameters)
    assert all(torch.equal(value, dict(step.teacher.model.named_parameters())[name]) for name, value in teacher.items())
    assert not step.student.optimizer.state  # no step taken: no momentum buffer either


def test_a_non_finite_teacher_discriminator_loss_refuses_the_teacher_update(monkeypatch):
    # The teacher's discriminator loss is checked with the teacher's source loss and the coefficient,
    # before the teacher's update (it used to be computed and checked after it).
    import uda.meta_pseudo_labels as mpl

    real = mpl.discriminator_loss
    monkeypatch.setattr(mpl, "discriminator_loss", lambda *args, **kwargs: real(*args, **kwargs) * float("nan"))
    step = _step("course", 0.5)
    teacher = {k: v.clone() for k, v in step.teacher.model.named_parameters()}
    discriminator = {k: v.clone() for k, v in step.teacher.discriminator.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="t_loss_d"):
        step(*_batches(0), 0)
    assert all(torch.equal(value, dict(step.teacher.model.named_parameters())[name]) for name, value in teacher.items())
    assert all(torch.equal(value, dict(step.teacher.discriminator.named_parameters())[name])
               for name, value in discriminator.items())
    assert not step.teacher.optimizer.state and not step.teacher.optimizer_d.state
    assert step.student.optimizer.state  # the student had stepped: what the module docstring says


@pytest.mark.parametrize("rule, reads", [("pham", 4), ("course", 3)])
def test_the_step_reads_tensor_values_on_the_host_once_per_finiteness_check_only(rule, reads):
    # On a GPU each read of a tensor's value by the host waits for the device. What is left: one
    # finiteness check per update (pham: the teacher's target terms, the pseudo-label step with the
    # labeled loss before it, the student's adversarial step, the teacher's losses with its
    # discriminator's); the step before read 10 (pham) and 8 (course) values.
    step = _step(rule, 0.5)
    step(*_batches(0), 0)  # the first iteration refreshes the thresholds: a later one is the usual one
    with host_reads() as counted:
        step(*_batches(1), 1)
    assert counted == ["tolist"] * reads
