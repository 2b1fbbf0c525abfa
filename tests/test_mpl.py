"""Meta Pseudo Labels: feedback sign, teacher gradients, thresholds, augmentation, exact resume."""
import copy
import json

import pytest
import torch
from torch import nn

import MPL
from dataset.labels import NUM_CLASSES
from model import build_bisenet, build_discriminator, load_bisenet, model_config
from tests.helpers import StopTraining, losses, stop_after, tiny_run
from utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint_file
from engine.steps import main_output, segmentation_loss, set_requires_grad
from uda.adversarial import SOURCE_DOMAIN, adversarial_step, domain_loss
from cli.mpl_options import read_thresholds, resolve_mpl_args
from uda.meta_pseudo_labels import (DEFAULT_REFRESH, Learner, MPLStep, PseudoLabeler, augment_view, flip_where)
from utils.errors import OptionError
from uda.mpl_feedback import CourseFeedback, PhamFeedback, course_coefficient, running_stats_frozen
from engine.optim import build_optimizer
from engine.precision import Precision
from uda.pseudolabel_stats import ConfidenceHistogram, apply_thresholds, softmax_confidence

SIZE = (32, 64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small run faster on one thread, and a busy shared machine cannot oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
LAMBDA_ADV = 0.1  # larger than the default so the adversarial terms visibly matter on tiny inputs
UDA_WEIGHT = 0.5


def _batch(seed, labels=True):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *SIZE, generator=generator)
    return images, (torch.randint(0, NUM_CLASSES, (2, *SIZE), generator=generator) if labels else None)


def _learner(seed, lr=1e-2):
    torch.manual_seed(seed)
    model = build_bisenet("resnet18", NUM_CLASSES)
    discriminator = build_discriminator("dsc", NUM_CLASSES)
    precision = Precision("cpu", "off")
    return Learner(model, build_optimizer("sgd", model.parameters(), lr), precision.grad_scaler(), discriminator,
                   build_optimizer("adam", discriminator.parameters(), 1e-3, weight_decay=0.0), precision.grad_scaler())


def _mpl(feedback, refresh=2, thresholds=None, uda_weight=UDA_WEIGHT):
    return MPLStep(student=_learner(0), teacher=_learner(1), labeler=PseudoLabeler(NUM_CLASSES, refresh, thresholds),
                   feedback=feedback, precision=Precision("cpu", "off"), lambda_adv=LAMBDA_ADV, uda_weight=uda_weight)


def _snapshot(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _changed(before, module):
    return [name for name, value in module.state_dict().items() if not torch.equal(before[name], value)]


def _teacher_gradients_at_step(step, source, target, iteration=0):
    """Run one MPL step; return the teacher's gradients as its optimizer saw them (the step is
    skipped) and the step's losses."""
    seen = {}

    def capture(*args, **kwargs):
        seen.update({name: p.grad.clone() for name, p in step.teacher.model.named_parameters() if p.grad is not None})

    step.teacher.optimizer.step = capture
    losses = step(source[0], source[1], target[0], iteration)
    return seen, losses


def _labeled_loss(model, images, labels):
    """The student's three-head loss in train mode, running statistics untouched (the reference)."""
    with torch.no_grad(), running_stats_frozen(model):
        return segmentation_loss(model(images), labels)


# ---------------------------------------------------------------------------------- feedback
def test_pham_h_is_the_labeled_loss_drop_minus_a_baseline_updated_first():
    feedback = PhamFeedback(baseline_decay=1.0)  # no baseline: h is the raw drop
    h, logs = feedback(torch.tensor(2.0), torch.tensor(1.5))
    assert h.item() == pytest.approx(0.5) and logs["mpl_improvement"].item() == pytest.approx(0.5)
    h, _ = feedback(torch.tensor(2.0), torch.tensor(2.5))
    assert h.item() == pytest.approx(-0.5)

    # Baseline as in the official code: updated with the current value, then subtracted.
    feedback = PhamFeedback(baseline_decay=0.9)
    h, _ = feedback(torch.tensor(2.0), torch.tensor(3.0))  # drop -1: baseline 0.1 * -1 = -0.1
    assert feedback.baseline.item() == pytest.approx(-0.1) and h.item() == pytest.approx(-0.9)
    h, _ = feedback(torch.tensor(2.0), torch.tensor(1.0))  # drop 1: baseline 0.9 * -0.1 + 0.1 = 0.01
    assert feedback.baseline.item() == pytest.approx(0.01) and h.item() == pytest.approx(0.99)


def test_course_coefficient_follows_the_course_schedule_by_epoch():
    # The course: alpha = exp(epoch / 40) - 1, alpha = 1 / H in epoch 0, alpha = 1 after epoch 25.
    # Values by hand: exp(1/40) - 1 = 0.0253151205, exp(25/40) - 1 = 0.8682459574.
    big_h = torch.tensor(0.6)  # student_lr 0.1 x L_pseudo 3 x L_source 2
    feedback = CourseFeedback(batches_per_epoch=4)
    expected = {0: 1.0, 3: 1.0, 4: 0.6 * 0.0253151205, 103: 0.6 * 0.8682459574, 104: 0.6, 400: 0.6}
    for iteration, value in expected.items():
        coefficient = course_coefficient(feedback.epoch(iteration), big_h)
        assert coefficient.item() == pytest.approx(value, rel=1e-6), iteration  # float32 H
    assert [feedback.epoch(i) for i in (0, 3, 4, 103, 104)] == [0, 0, 1, 25, 26]
    assert course_coefficient(0, torch.tensor(0.0)).item() == 1.0  # 1 / H * H, without the 0 / 0


def _pseudo_labels_before_the_step(step, target, iteration=0):
    """The pseudo labels and augmented view a step will use, from copies of its teacher and labeler."""
    teacher0, labeler0 = copy.deepcopy(step.teacher.model), copy.deepcopy(step.labeler)
    view, flipped = augment_view(target, step.view_generator(iteration, target.device))
    outputs = teacher0(torch.cat((target, view)))
    pseudo = labeler0(outputs[0][:len(target)].detach(), iteration)
    return teacher0, outputs, pseudo, view, flipped


def test_pham_h_scores_the_student_step_on_the_pseudo_labels_alone():
    step = _mpl(PhamFeedback(baseline_decay=1.0))
    source, target = _batch(1), _batch(2, labels=False)
    _, _, pseudo, _, _ = _pseudo_labels_before_the_step(step, target[0])
    # Reference: a copy of the student takes one plain step of its optimizer on the pseudo labels.
    student0 = copy.deepcopy(step.student.model)
    optimizer0 = build_optimizer("sgd", student0.parameters(), 1e-2)
    loss_before = _labeled_loss(student0, *source)
    segmentation_loss(student0(target[0]), pseudo).backward()
    optimizer0.step()
    loss_after = _labeled_loss(student0, *source)

    losses = step(source[0], source[1], target[0], 0)
    assert (pseudo != 255).any() and loss_before != loss_after
    assert losses["mpl_loss_before"].item() == pytest.approx(loss_before.item(), rel=1e-5)
    assert losses["mpl_loss_after"].item() == pytest.approx(loss_after.item(), rel=1e-5)
    assert losses["mpl_h"].item() == pytest.approx((loss_before - loss_after).item(), rel=1e-3, abs=1e-6)
    assert losses["mpl_coefficient"].item() == losses["mpl_h"].item()  # c = h: the derivation's sign


def test_pham_h_does_not_depend_on_the_student_source_step_update(monkeypatch):
    # h's "after" loss is the source step's loss, read before that step's update: the update (here
    # ten times the learning rate) must not reach h, while it does change the student.
    import uda.mpl_feedback as mpl_feedback

    source, target = _batch(1), _batch(2, labels=False)
    runs = {}
    for variant in ("plain", "other lr"):
        step = _mpl(PhamFeedback(baseline_decay=1.0))
        if variant != "plain":
            real_step = mpl_feedback.adversarial_step

            def changed_source_step(model, discriminator, optimizer, *args, **kwargs):
                optimizer.param_groups[0]["lr"] *= 10  # for the source step only
                return real_step(model, discriminator, optimizer, *args, **kwargs)

            monkeypatch.setattr(mpl_feedback, "adversarial_step", changed_source_step)
        runs[variant] = (step(source[0], source[1], target[0], 0), step.student.model)
    (plain, student), (changed, student_changed) = runs.values()
    assert plain["mpl_h"].item() != 0 and torch.equal(plain["mpl_h"], changed["mpl_h"])
    assert torch.equal(plain["loss_seg"], changed["loss_seg"]) and torch.equal(plain["mpl_loss_after"], plain["loss_seg"])
    assert not torch.equal(student.classifier.weight, student_changed.classifier.weight)


def test_pham_h_is_zero_and_no_pseudo_label_step_when_every_pixel_is_ignored():
    # Nothing reaches a threshold of 1.0.
    step = _mpl(PhamFeedback(baseline_decay=0.5), refresh=0, thresholds=torch.ones(NUM_CLASSES))
    step.feedback.baseline.fill_(0.3)
    reference = copy.deepcopy(step.student)
    source, target = _batch(1), _batch(2, labels=False)
    losses = step(source[0], source[1], target[0], 0)
    assert losses["mpl_h"].item() == 0.0 and losses["mpl_coefficient"].item() == 0.0 and losses["pl_kept"].item() == 0.0
    assert step.feedback.baseline.item() == pytest.approx(0.3) and "loss_pseudo" not in losses
    # The student took exactly the source + adversarial step, nothing on the pseudo labels.
    adversarial_step(reference.model, reference.discriminator, reference.optimizer, reference.optimizer_d,
                     reference.scaler, reference.scaler_d, Precision("cpu", "off"), source[0], source[1], target[0],
                     None, lambda_adv=LAMBDA_ADV)
    for name, value in step.student.model.state_dict().items():
        torch.testing.assert_close(value, reference.model.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


def test_running_stats_frozen_uses_batch_statistics_and_leaves_buffers_alone():
    torch.manual_seed(0)
    model = build_bisenet("resnet18", NUM_CLASSES)
    images, _ = _batch(3)
    buffers = _snapshot(model)
    with torch.no_grad(), running_stats_frozen(model):
        frozen = main_output(model(images))
    assert _changed(buffers, model) == []
    with torch.no_grad():
        plain = main_output(model(images))  # train mode: same batch statistics, but buffers move
    assert torch.allclose(frozen, plain, atol=1e-5) and _changed(buffers, model)
    assert all(layer.track_running_stats for layer in model.modules() if isinstance(layer, nn.BatchNorm2d))


# ---------------------------------------------------------------------------------- teacher
@pytest.mark.parametrize("rule, iteration", [("pham", 0), ("course", 0), ("course", 1)])
def test_teacher_gradient_equals_a_hand_built_reference(rule, iteration):
    """pham: h x CE(main head) + lambda_adv x L_adv; course: alpha x H x CE(three heads) + 1 x L_adv
    (epoch 0: coefficient 1; epoch 1: (exp(1/40) - 1) x lr x L_pseudo x L_source); both + UDA +
    the three-head source loss."""
    feedback = PhamFeedback(baseline_decay=1.0) if rule == "pham" else CourseFeedback(batches_per_epoch=1)
    step = _mpl(feedback, refresh=3)
    source, target = _batch(1), _batch(2, labels=False)
    teacher0, outputs, pseudo, _, flipped = _pseudo_labels_before_the_step(step, target[0], iteration)
    discriminator0 = copy.deepcopy(step.teacher.discriminator)
    student0 = copy.deepcopy(step.student.model)
    gradients, losses = _teacher_gradients_at_step(step, source, target, iteration)

    set_requires_grad(discriminator0, False)
    logits, logits_view = outputs[0].split(2)
    adversarial = domain_loss(discriminator0, torch.softmax(logits, 1), SOURCE_DOMAIN)
    if rule == "pham":
        # h by hand: the drop of the labeled loss over a plain step of a copy on the pseudo labels.
        optimizer0 = build_optimizer("sgd", student0.parameters(), 1e-2)
        before = _labeled_loss(student0, *source)
        segmentation_loss(student0(target[0]), pseudo).backward()
        optimizer0.step()
        coefficient = (before - _labeled_loss(student0, *source)).item()
        target_terms = coefficient * segmentation_loss(logits, pseudo) + LAMBDA_ADV * adversarial
    else:
        # Epoch 0: 1. Epoch 1: alpha x lr x L_pseudo x L_source, the student's losses before its step.
        coefficient = 1.0
        if iteration:
            loss_source = segmentation_loss(student0(source[0]), source[1])
            loss_pseudo = segmentation_loss(student0(target[0]), pseudo)
            coefficient = 0.0253151205 * 1e-2 * (loss_pseudo * loss_source).item()
        target_terms = coefficient * segmentation_loss([head[:2] for head in outputs], pseudo) + 1.0 * adversarial
    loss = (target_terms + UDA_WEIGHT * segmentation_loss(logits_view, flip_where(pseudo, flipped))
            + segmentation_loss(teacher0(source[0]), source[1]))
    assert losses["mpl_coefficient"].item() == pytest.approx(coefficient, rel=1e-3)
    names, parameters = zip(*teacher0.named_parameters())
    expected = torch.autograd.grad(loss, parameters, allow_unused=True)
    for name, grad in zip(names, expected):
        reference = torch.zeros_like(gradients[name]) if grad is None else grad
        scale = reference.abs().max().item()
        torch.testing.assert_close(gradients[name], reference, rtol=1e-3, atol=1e-4 * scale + 1e-7, msg=name)


def test_one_mpl_step_updates_teacher_student_and_both_discriminators():
    step = _mpl(PhamFeedback())
    parts = {"student": step.student.model, "teacher": step.teacher.model,
             "student discriminator": step.student.discriminator, "teacher discriminator": step.teacher.discriminator}
    before = {name: _snapshot(module) for name, module in parts.items()}
    source, target = _batch(1), _batch(2, labels=False)
    losses = step(source[0], source[1], target[0], 0)
    for name, module in parts.items():
        assert any("weight" in key for key in _changed(before[name], module)), f"{name} was not updated"
    assert {"loss_seg", "loss_adv", "loss_pseudo", "loss_d", "t_loss_seg", "t_loss_adv", "t_loss_mpl", "t_loss_uda",
            "t_loss_d", "mpl_h", "mpl_coefficient", "pl_kept"} <= set(losses)
    assert all(torch.isfinite(value).all() for value in losses.values())
    assert all(p.requires_grad for p in step.teacher.discriminator.parameters())


def test_a_batch_without_confident_pixels_trains_the_student_on_the_source_only():
    # Nothing reaches a threshold of 1.0; --uda-weight 0 drops the augmented view altogether.
    step = _mpl(CourseFeedback(10), refresh=0, thresholds=torch.ones(NUM_CLASSES), uda_weight=0.0)
    source, target = _batch(1), _batch(2, labels=False)
    losses = step(source[0], source[1], target[0], 3)
    assert "loss_pseudo" not in losses and losses["pl_kept"].item() == 0.0 and "t_loss_uda" not in losses
    assert losses["t_loss_mpl"].item() == 0.0 and losses["mpl_H"].item() == 0.0
    assert losses["mpl_coefficient"].item() == 1.0  # epoch 0 of the course rule
    assert torch.isfinite(losses["t_loss_seg"]) and torch.isfinite(losses["loss_seg"])


# ---------------------------------------------------------------------------------- pseudo labels
def test_pseudo_labeler_refreshes_thresholds_from_the_window_since_the_last_refresh():
    labeler = PseudoLabeler(NUM_CLASSES, refresh=3)
    generator = torch.Generator().manual_seed(0)
    batches = [3 * torch.randn(2, NUM_CLASSES, 8, 8, generator=generator) for _ in range(5)]

    def reference(window):
        histogram = ConfidenceHistogram(NUM_CLASSES)
        for logits in window:
            histogram.update(*softmax_confidence(logits))
        return histogram.thresholds()

    for iteration, logits in enumerate(batches):
        labels = labeler(logits, iteration)
        expected = reference(batches[:1]) if iteration < 3 else reference(batches[1:4])
        assert torch.equal(labeler.thresholds, expected), iteration
        assert torch.equal(labels, apply_thresholds(*softmax_confidence(logits), expected).long())
    assert labeler.counts.sum() == batches[4][:, 0].numel()  # only the batch after the last refresh

    restored = PseudoLabeler(NUM_CLASSES, refresh=3)
    restored.load_state_dict(copy.deepcopy(labeler.state_dict()))
    restored._apply(lambda tensor: tensor.clone())  # what .to(device) does: new buffers
    assert restored.histogram.counts is restored.counts and torch.equal(restored.counts, labeler.counts)


def test_fixed_thresholds_and_their_file_formats(tmp_path):
    values = [0.1 * (c % 10) for c in range(NUM_CLASSES)]
    labeler = PseudoLabeler(NUM_CLASSES, refresh=0, thresholds=values)
    logits = 3 * torch.randn(2, NUM_CLASSES, 8, 8)
    assert torch.equal(labeler(logits, 0), apply_thresholds(*softmax_confidence(logits), torch.tensor(values)).long())
    assert "counts" not in labeler.state_dict()

    names = MPL.read_thresholds.__globals__["CLASS_NAMES"]
    formats = {
        "list": {"thresholds": values},
        "createpseudolabels": {"mode": "dataset", "thresholds": None,
                               "classes": {name: {"train_id": c, "threshold": values[c], "median": 0.5}
                                           for c, name in enumerate(names)}},
        "entries": [{"threshold": value} for value in values],
    }
    for name, data in formats.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        assert torch.equal(read_thresholds(path), torch.tensor(values, dtype=torch.float64)), name
    for bad in ({"thresholds": values[:-1]}, {"thresholds": [2.0] * NUM_CLASSES}, {"mode": "per-image", "thresholds": None}):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(OptionError):
            read_thresholds(path)


def test_augmented_view_is_a_pure_function_of_the_iteration_and_flips_consistently():
    step = _mpl(PhamFeedback())
    images, _ = _batch(4)
    images = torch.cat((images, images.flip(-1)))  # 4 images: enough to see both flip outcomes often
    first, flipped = augment_view(images, step.view_generator(7, images.device))
    torch.randn(10)  # the global RNG plays no part
    again, flipped_again = augment_view(images, step.view_generator(7, images.device))
    other, _ = augment_view(images, step.view_generator(8, images.device))
    assert torch.equal(first, again) and torch.equal(flipped, flipped_again) and not torch.equal(first, other)
    aligned = flip_where(images, flipped)
    for index in range(len(images)):
        correlation = torch.corrcoef(torch.stack((first[index].flatten(), aligned[index].flatten())))[0, 1]
        assert correlation > 0.8, index
    labels = torch.arange(SIZE[1]).expand(len(images), *SIZE)
    assert torch.equal(flip_where(flip_where(labels, flipped), flipped), labels)


# ---------------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    torch.manual_seed(11)
    model = build_bisenet("resnet18", NUM_CLASSES)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model_config(model, "imagenet")}, path)
    return path


def _args(data_root, output_dir, teacher, *extra):
    return MPL.get_args(["--data-root", str(data_root), "--output-dir", str(output_dir), "--teacher-checkpoint",
                         str(teacher), *tiny_run(*extra)])


@pytest.mark.slow
def test_resumed_mpl_run_equals_uninterrupted(tiny_data_root, teacher_checkpoint, tmp_path):
    # --refresh 3: the checkpoint at iteration 2 must carry the histogram of iterations 1-2.
    flags = ["--max-iters", "4", "--val-every", "2", "--refresh", "3", "--baseline-decay", "0.5"]
    straight = tmp_path / "straight"
    MPL.main(_args(tiny_data_root, straight, teacher_checkpoint, *flags))
    split = tmp_path / "split"
    with stop_after(MPL, 2), pytest.raises(StopTraining):
        MPL.main(_args(tiny_data_root, split, teacher_checkpoint, *flags))
    assert load_checkpoint_file(split / "last.pth")["iteration"] == 2
    MPL.main(_args(tiny_data_root, split, teacher_checkpoint, *flags, "--resume", str(split / "last.pth")))

    assert losses(split) == losses(straight)
    final_straight, final_split = load_checkpoint_file(straight / "last.pth"), load_checkpoint_file(split / "last.pth")
    for network in ("model", "teacher", "discriminator", "discriminator_teacher", "mpl"):
        for key, value in final_straight[network].items():
            assert torch.equal(value, final_split[network][key]), f"{network}.{key} differs after resume"
    assert final_straight["history"] == final_split["history"]
    assert list(final_straight["history"][-1]["scores"]) == ["student", "teacher"]
    assert final_straight["mpl"]["feedback.baseline"] != 0


@pytest.mark.slow
def test_course_run_checkpoints_both_networks_for_eval(tiny_data_root, teacher_checkpoint, tmp_path):
    run = tmp_path / "course"
    trainer = MPL.main(_args(tiny_data_root, run, teacher_checkpoint, "--feedback", "course", "--discriminator", "0",
                             "--max-iters", "1", "--teacher-learning-rate", "1e-3", "--teacher-optimizer", "adam"))
    assert set(trainer.networks) == {"model", "teacher", "discriminator", "discriminator_teacher", "mpl"}
    assert type(trainer.optimizers["teacher"][0]).__name__ == "Adam" and trainer.optimizers["teacher"][1] == 1e-3
    teacher = load_bisenet(run / "last.pth", key="teacher")
    student = load_bisenet(run / "last.pth")
    assert teacher.checkpoint_info["input_convention"] == "imagenet"
    assert not torch.equal(teacher.classifier.weight, student.classifier.weight)
    checkpoint = load_checkpoint_file(run / "last.pth")
    assert checkpoint["discriminator_teacher_config"]["name"] == "fcd"
    assert set(losses(run)[0]) >= {"mpl_H", "mpl_epoch", "t_loss_mpl", "t_loss_uda"}


def test_inconsistent_threshold_flags_are_refused(tmp_path, teacher_checkpoint):
    for flags in (["--refresh", "0"], ["--refresh", "5", "--thresholds", str(tmp_path / "t.json")]):
        with pytest.raises(OptionError, match="thresholds"):
            MPL.main(MPL.get_args(["--output-dir", str(tmp_path), "--teacher-checkpoint", str(teacher_checkpoint), *flags]))


def test_flag_defaults_resolve_teacher_optimizer_learning_rate_and_threshold_mode(tmp_path):
    args = resolve_mpl_args(MPL.get_args(["--output-dir", str(tmp_path), "--teacher-checkpoint", "t.pth",
                                          "--optimizer", "adam", "--learning-rate", "1e-3"]))
    assert args.teacher_optimizer == "adam" and args.teacher_learning_rate == pytest.approx(1e-4)
    assert args.refresh == DEFAULT_REFRESH and args.feedback == "pham" and args.discriminator == "dsc"
    args = resolve_mpl_args(MPL.get_args(["--output-dir", str(tmp_path), "--teacher-checkpoint", "t.pth",
                                          "--thresholds", "t.json", "--discriminator", "1"]))
    assert args.refresh == 0 and args.discriminator == "dsc"
    # course: the course's teacher, SGD at 1.25e-2, whatever the student's optimizer.
    args = resolve_mpl_args(MPL.get_args(["--output-dir", str(tmp_path), "--teacher-checkpoint", "t.pth",
                                          "--optimizer", "adam", "--learning-rate", "1e-3", "--feedback", "course"]))
    assert args.teacher_optimizer == "sgd" and args.teacher_learning_rate == pytest.approx(1.25e-2)
