"""The MPL iteration as it was before the step lost its waste (kept here as the tests' reference).

``reference_mpl_step(step, ...)`` runs one iteration of an ``MPLStep``'s networks, labeler and
feedback rule the way the step did before (issue 19): the teacher's target terms backpropagated
right after the student's step, then its source forward and a second backward; ``pham``'s labeled
loss after the pseudo-label step as its own no-grad forward (``labeled_loss``), both labeled losses
checked together after that step; whether any rank has a pseudo label as its own host sync; the
labeler's thresholds applied through ``apply_thresholds`` (host-side bins); the teacher's
discriminator loss computed and checked after the teacher's update. Fused loss off
throughout (the old step called the networks directly). tests/test_mpl_waste.py compares the
current step with it.
"""
import torch
import torch.nn.functional as F

from dataset.labels import IGNORE_INDEX
from engine.steps import check_finite, main_output, segmentation_loss, set_requires_grad, unwrap
from uda.adversarial import SOURCE_DOMAIN, discriminator_loss, discriminator_update, domain_loss
from uda.meta_pseudo_labels import augment_view, flip_where
from uda.mpl_feedback import (CourseFeedback, _student_adversarial_step, course_coefficient, mean_over_ranks,
                              running_stats_frozen)
from uda.pseudolabel_stats import apply_thresholds, probability_confidence


def _labeled_loss(model, precision, images, labels):
    network = unwrap(model)
    with torch.no_grad(), precision.autocast(), running_stats_frozen(network):
        return segmentation_loss(network(images), labels).float()


def _pseudo_label_step(learner, precision, images, pseudo):
    learner.optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = segmentation_loss(learner.model(images), pseudo)
    check_finite({"loss_pseudo": loss})
    learner.scaler.scale(loss).backward()
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    return loss.detach()


def _pham_student_step(feedback, student, precision, lambda_adv, source_images, source_labels, target_images,
                       pseudo):
    pseudo_losses = {}
    if pseudo is None:
        h = torch.zeros((), device=source_images.device)
        logs = {"mpl_h": h, "mpl_improvement": h}
    else:
        loss_before = _labeled_loss(student.model, precision, source_images, source_labels)
        pseudo_losses["loss_pseudo"] = _pseudo_label_step(student, precision, target_images, pseudo)
        loss_after = _labeled_loss(student.model, precision, source_images, source_labels)
        check_finite({"mpl_loss_before": loss_before, "mpl_loss_after": loss_after})
        h, logs = feedback(loss_before, loss_after)
        logs.update(mpl_loss_before=loss_before, mpl_loss_after=loss_after)
    losses = _student_adversarial_step(student, precision, lambda_adv, source_images, source_labels,
                                       target_images, None)
    return {**losses, **pseudo_losses}, h, logs


def _course_student_step(feedback, student, precision, lambda_adv, source_images, source_labels, target_images,
                         pseudo, iteration):
    losses = _student_adversarial_step(student, precision, lambda_adv, source_images, source_labels,
                                       target_images, pseudo)
    loss_pseudo = losses.get("loss_pseudo", torch.zeros_like(losses["loss_seg"]))
    big_h = student.optimizer.param_groups[0]["lr"] * loss_pseudo.float() * losses["loss_seg"].float()
    epoch = feedback.epoch(iteration)
    return losses, course_coefficient(epoch, big_h), {"mpl_H": big_h, "mpl_epoch": torch.tensor(float(epoch))}


def _label(labeler, logits, iteration, probabilities):
    pred, conf = probability_confidence(probabilities)
    if labeler.histogram is not None:
        labeler.histogram.update(pred, conf)
        if iteration % labeler.refresh == 0:
            labeler.histogram.all_reduce_()
            labeler.thresholds.copy_(labeler.histogram.thresholds(labeler.max_threshold))
            labeler.counts.zero_()
    return apply_thresholds(pred, conf, labeler.thresholds).long()


def reference_mpl_step(step, source_images, source_labels, target_images, iteration):
    """One iteration of ``step`` (an ``MPLStep`` with a teacher discriminator) by the old algorithm."""
    student, teacher, precision = step.student, step.teacher, step.precision
    batch = target_images.shape[0]
    teacher.optimizer.zero_grad(set_to_none=True)
    frozen_discriminator = unwrap(teacher.discriminator)
    set_requires_grad(frozen_discriminator, False)
    inputs = target_images
    if step.uda_weight > 0:
        view, flipped = augment_view(target_images, step.view_generator(iteration, target_images.device))
        inputs = torch.cat((target_images, view))
    all_heads = step.feedback.teacher_target_all_heads
    with precision.autocast():
        outputs = teacher.model(inputs, aux=all_heads)
    heads = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    main = heads[0].float()
    logits, logits_view = main[:batch], main[batch:]
    target_probabilities = F.softmax(logits, dim=1)
    pseudo = _label(step.labeler, logits.detach(), iteration, target_probabilities.detach())
    target_heads = [head[:batch] for head in heads] if all_heads else logits
    terms = {"t_loss_mpl": segmentation_loss(target_heads, pseudo)}
    if step.uda_weight > 0:
        terms["t_loss_uda"] = segmentation_loss(logits_view, flip_where(pseudo, flipped))
    with precision.autocast():
        terms["t_loss_adv"] = domain_loss(frozen_discriminator, target_probabilities, SOURCE_DOMAIN)
    check_finite(terms)
    labeled = (pseudo != IGNORE_INDEX).float()
    kept = labeled.mean()
    any_pseudo = bool(mean_over_ranks(labeled.sum()) > 0)

    arguments = (step.feedback, student, precision, step.lambda_adv, source_images, source_labels, target_images,
                 pseudo if any_pseudo else None)
    if isinstance(step.feedback, CourseFeedback):
        student_losses, coefficient, feedback_logs = _course_student_step(*arguments, iteration)
    else:
        student_losses, coefficient, feedback_logs = _pham_student_step(*arguments)

    loss_target = coefficient * terms["t_loss_mpl"]
    if "t_loss_uda" in terms:
        loss_target = loss_target + step.uda_weight_at(iteration) * terms["t_loss_uda"]
    loss_target = loss_target + step.teacher_adversarial_weight * terms["t_loss_adv"]
    teacher.scaler.scale(loss_target).backward()
    del outputs, heads, main, target_heads
    with precision.autocast():
        source_outputs = teacher.model(source_images)
        terms["t_loss_seg"] = segmentation_loss(source_outputs, source_labels)
    check_finite({"mpl_coefficient": coefficient, "t_loss_seg": terms["t_loss_seg"]})
    teacher.scaler.scale(terms["t_loss_seg"]).backward()
    source_logits = main_output(source_outputs).detach()
    del source_outputs
    teacher.scaler.step(teacher.optimizer)
    teacher.scaler.update()
    loss_d = discriminator_loss(teacher.discriminator, teacher.optimizer_d, precision, source_logits,
                                target_probabilities)
    check_finite({"t_loss_d": loss_d})
    terms["t_loss_d"] = discriminator_update(teacher.optimizer_d, teacher.scaler_d, loss_d)
    return {**student_losses, **{name: value.detach() for name, value in terms.items()},
            "mpl_coefficient": coefficient, "pl_kept": kept, **feedback_logs}
