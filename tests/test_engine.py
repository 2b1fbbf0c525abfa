import pytest
import torch

from model import build_bisenet, build_discriminator
from engine.steps import NonFiniteLossError, buffers_restored_on_refusal, segmentation_loss, summed_cross_entropy, supervised_step
from uda.adversarial import adversarial_step
from engine.optim import build_optimizer, poly_lr
from engine.precision import Precision
from tests.helpers import host_reads

SIZE = (64, 64)
# Two threads per process on two shared cores spin against each other; one is several times faster.
pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed, batch=2, labels=True):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *SIZE, generator=generator)
    target = torch.randint(0, 19, (batch, *SIZE), generator=generator) if labels else None
    return images, target


def _parts(discriminator="dsc"):
    torch.manual_seed(0)
    model = build_bisenet("resnet18", 19)
    disc = build_discriminator(discriminator, 19) if discriminator != "none" else None
    optimizer = build_optimizer("sgd", model.parameters(), 1e-2)
    optimizer_d = build_optimizer("adam", disc.parameters(), 1e-3, weight_decay=0.0) if disc is not None else None
    precision = Precision("cpu", "off")
    return model, disc, optimizer, optimizer_d, precision, precision.grad_scaler(), precision.grad_scaler()


def _snapshot(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _changed(before, module):
    return [name for name, value in module.state_dict().items() if not torch.equal(before[name], value)]


def test_adversarial_step_updates_both_and_freezes_discriminator_during_segmentation_update():
    model, disc, optimizer, optimizer_d, precision, scaler, scaler_d = _parts()
    model_before, disc_before = _snapshot(model), _snapshot(disc)
    seen = {}
    original_step = optimizer.step

    def checking_step(*args, **kwargs):
        # At the segmentation update, D must be exactly as before and hold no gradients.
        seen["disc_changed"] = _changed(disc_before, disc)
        seen["disc_grads"] = [p.grad for p in disc.parameters() if p.grad is not None]
        seen["model_grads"] = sum(p.grad is not None for p in model.parameters())
        return original_step(*args, **kwargs)

    def record_frozen(module, inputs):  # D's first call is the adversarial term's: frozen there
        seen.setdefault("disc_requires_grad", any(p.requires_grad for p in disc.parameters()))

    disc.register_forward_pre_hook(record_frozen)
    optimizer.step = checking_step
    source_images, source_labels = _batch(1)
    target_images, _ = _batch(2, labels=False)
    losses = adversarial_step(model, disc, optimizer, optimizer_d, scaler, scaler_d, precision,
                              source_images, source_labels, target_images, lambda_adv=1e-3)
    assert seen["disc_changed"] == [] and seen["disc_grads"] == [] and not seen["disc_requires_grad"]
    assert seen["model_grads"] > 0
    assert set(losses) == {"loss_seg", "loss_adv", "loss_d"}
    assert all(torch.isfinite(value) for value in losses.values())
    assert _changed(model_before, model), "segmentation network not updated"
    assert _changed(disc_before, disc), "discriminator not updated"
    assert all(p.requires_grad for p in disc.parameters())


def test_adversarial_gradient_reaches_segmentation_network_through_discriminator():
    # With lambda_adv > 0 the target batch must change the segmentation update.
    results = []
    for lambda_adv in (0.0, 10.0):
        model, disc, optimizer, optimizer_d, precision, scaler, scaler_d = _parts()
        source_images, source_labels = _batch(1)
        target_images, _ = _batch(2, labels=False)
        adversarial_step(model, disc, optimizer, optimizer_d, scaler, scaler_d, precision,
                         source_images, source_labels, target_images, lambda_adv=lambda_adv)
        results.append(model.classifier.weight.detach().clone())
    assert not torch.equal(results[0], results[1])


def test_source_only_step_ignores_target_and_pseudo_labels_add_a_term():
    model, disc, optimizer, optimizer_d, precision, scaler, scaler_d = _parts("none")
    assert disc is None and optimizer_d is None
    source_images, source_labels = _batch(1)
    target_images, target_labels = _batch(2)
    losses = adversarial_step(model, None, optimizer, None, scaler, scaler_d, precision,
                              source_images, source_labels, target_images)
    assert set(losses) == {"loss_seg"}
    losses = adversarial_step(model, None, optimizer, None, scaler, scaler_d, precision,
                              source_images, source_labels, target_images, target_labels)
    assert set(losses) == {"loss_seg", "loss_pseudo"}


def test_segmentation_loss_sums_three_heads_and_ignores_255():
    logits = torch.randn(1, 19, 4, 4)
    labels = torch.randint(0, 19, (1, 4, 4))
    single = segmentation_loss(logits, labels)
    assert segmentation_loss((logits, logits, logits), labels) == pytest.approx(3 * single.item())
    labels_ignored = labels.clone()
    labels_ignored[0, 0, 0] = 255
    expected = torch.nn.functional.cross_entropy(logits, labels_ignored, ignore_index=255)
    assert segmentation_loss(logits, labels_ignored) == pytest.approx(expected.item())


def test_cross_entropy_reads_channels_last_logits_class_last_with_the_same_value_and_gradient():
    """The class-last view of channels-last logits is the same function, and its gradient stays
    channels-last (so an upsampling before the loss keeps its NHWC backward on a GPU)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 12, 20, dtype=torch.float64)
    labels = torch.randint(0, 19, (2, 12, 20))
    labels[0, :3] = 255
    nchw = logits.clone().requires_grad_()
    nhwc = logits.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    reference = torch.nn.functional.cross_entropy(nchw.float(), labels, ignore_index=255, reduction="sum")
    value = summed_cross_entropy(nhwc, labels)
    reference.backward()
    value.backward()
    assert torch.allclose(value, reference, rtol=1e-6)
    assert torch.allclose(nhwc.grad, nchw.grad, atol=1e-6)
    assert nhwc.grad.is_contiguous(memory_format=torch.channels_last) and not nhwc.grad.is_contiguous()
    # Hand check of the ignore rule: only labeled pixels count.
    one = torch.zeros(1, 19, 1, 2)
    assert torch.isclose(summed_cross_entropy(one, torch.tensor([[[3, 255]]])), torch.log(torch.tensor(19.0)))


def test_supervised_steps_lower_the_loss():
    model, _, optimizer, _, precision, scaler, _ = _parts("none")
    images, labels = _batch(3)
    losses = [supervised_step(model, optimizer, scaler, precision, images, labels)["loss_seg"].item() for _ in range(6)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("poisoned", ["source", "target", "discriminator"])
def test_a_refused_step_leaves_every_parameter_and_buffer_as_it_was(poisoned):
    """check_finite refuses before any update, and buffers_restored_on_refusal puts back what the
    forwards moved: BatchNorm running statistics and num_batches_tracked included."""
    model, disc, optimizer, optimizer_d, precision, scaler, scaler_d = _parts()
    before_model, before_disc = _snapshot(model), _snapshot(disc)
    source_images, source_labels = _batch(1)
    target_images, _ = _batch(2, labels=False)
    if poisoned == "discriminator":
        # D's own step sees a non-finite source term while the segmentation losses are finite: the
        # segmentation update, computed first, must not be taken either.
        calls = []

        def poison_second_call(module, inputs, output):
            calls.append(1)
            return output * float("nan") if len(calls) % 3 == 2 else output
        disc.register_forward_hook(poison_second_call)
    else:
        (source_images if poisoned == "source" else target_images)[0, 0, 0, 0] = float("nan")

    def step():
        adversarial_step(model, disc, optimizer, optimizer_d, scaler, scaler_d, precision,
                         source_images, source_labels, target_images)

    # Without the guard the forwards move the statistics: what the guard has to undo.
    with pytest.raises(NonFiniteLossError, match={"source": "loss_seg", "target": "loss_adv"}.get(poisoned, "loss_d")):
        step()
    moved = _changed(before_model, model)
    assert moved and all(name.endswith(("running_mean", "running_var", "num_batches_tracked")) for name in moved)
    assert _changed(before_disc, disc) == []

    model.load_state_dict(before_model)
    with pytest.raises(NonFiniteLossError):
        with buffers_restored_on_refusal([model, disc]):
            step()
    assert _changed(before_model, model) == [] and _changed(before_disc, disc) == []
    assert optimizer.state_dict()["state"] == {} and optimizer_d.state_dict()["state"] == {}  # no step taken


@pytest.mark.parametrize("pseudo_labels", [False, True])
def test_an_adversarial_step_reads_tensor_values_on_the_host_once(pseudo_labels):
    """On a GPU every read of a tensor's value by the host waits for the device: the step checks its
    losses (source, target, discriminator) in one sync, before its first update (fp32: no GradScaler)."""
    model, disc, optimizer, optimizer_d, precision, scaler, scaler_d = _parts()
    source_images, source_labels = _batch(1)
    target_images, target_labels = _batch(2, labels=pseudo_labels)
    with host_reads() as counted:
        losses = adversarial_step(model, disc, optimizer, optimizer_d, scaler, scaler_d, precision,
                                  source_images, source_labels, target_images, target_labels)
    assert counted == ["tolist"]
    assert set(losses) == {"loss_seg", "loss_adv", "loss_d", *(["loss_pseudo"] if pseudo_labels else [])}


def test_poly_learning_rate():
    assert poly_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert poly_lr(0.1, 50, 100) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert poly_lr(0.1, 100, 100) == 0.0


def _check_finite_worker(rank, init_file, result_file):
    import torch.distributed as dist
    from engine.steps import check_finite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        # Pseudo-label counts: positive on rank 1 only, then on no rank; every rank must see one answer.
        results["one_rank_positive"] = check_finite({"loss": torch.tensor(1.0)}, any_positive=torch.tensor(3.0 * rank))
        results["no_rank_positive"] = check_finite({"loss": torch.tensor(1.0)}, any_positive=torch.tensor(0.0))
        results["plain"] = check_finite({"loss": torch.tensor(1.0)})
        try:  # a NaN on rank 1 only: both ranks refuse (rank 0 naming the other process)
            check_finite({"loss": torch.tensor(float("nan") if rank else 1.0)}, any_positive=torch.tensor(1.0))
            results["refused"] = None
        except NonFiniteLossError as error:
            results["refused"] = error.terms
        torch.save(results, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_check_finite_decides_the_same_on_every_rank(tmp_path):
    """The finiteness flag and MPL's any-pseudo-label decision share one MAX all-reduce (gloo, two processes)."""
    import torch.multiprocessing as mp
    result_file = tmp_path / "result"
    mp.spawn(_check_finite_worker, args=(str(tmp_path / "init"), str(result_file)), nprocs=2)
    results = [torch.load(f"{result_file}.{rank}", weights_only=False) for rank in (0, 1)]
    assert [r["one_rank_positive"] for r in results] == [True, True]
    assert [r["no_rank_positive"] for r in results] == [False, False]
    assert [r["plain"] for r in results] == [None, None]
    assert [r["refused"] for r in results] == [["another process's losses"], ["loss"]]
