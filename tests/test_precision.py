"""engine/precision.py: the bf16 autocast path (the scripts' default on recent GPUs), run on the CPU.

CPU autocast supports bf16, so the GPU's default path is covered without a GPU: no loss scaling,
float32 weights and losses, the finiteness checks, and a checkpoint that resumes exactly.
"""
import pytest
import torch

import trainUnsupervised
from model import build_bisenet
from tests.helpers import StopTraining, losses, stop_after, tiny_run
from utils.checkpoint import load_checkpoint_file
from engine.steps import NonFiniteLossError, buffers_restored_on_refusal, segmentation_loss, supervised_step
from engine.optim import build_optimizer
from engine.precision import Precision

SIZE = (32, 32)  # bf16 convolutions are slow on a CPU without native bf16: keep them tiny


def _batch(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, *SIZE, generator=generator), torch.randint(0, 19, (2, *SIZE), generator=generator)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = build_bisenet("resnet18", 19)
    return model, build_optimizer("sgd", model.parameters(), 1e-2)


def test_modes_on_the_cpu():
    assert Precision("cpu", "auto").mode == "off"  # autocast only slows the CPU down: never chosen by default
    bf16 = Precision("cpu", "bf16")
    assert bf16.enabled and bf16.mode == "bf16"
    assert not bf16.grad_scaler().is_enabled()  # bf16 has float32's exponent range: no loss scaling
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        Precision("cpu", "fp16")
    with pytest.raises(ValueError, match="unknown --amp 'fp8'"):
        Precision("cpu", "fp8")


def test_bf16_autocast_computes_in_bf16_and_keeps_float32_weights_and_loss(one_thread):
    model, _ = _model_and_optimizer()
    images, labels = _batch(1)
    precision = Precision("cpu", "bf16")
    with precision.autocast():
        outputs = model(images)
        loss = segmentation_loss(outputs, labels)
    assert all(output.dtype == torch.bfloat16 for output in outputs)
    assert loss.dtype == torch.float32  # the cross-entropy is summed in float32 (engine.summed_cross_entropy)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with Precision("cpu", "off").autocast():
        reference = segmentation_loss(model(images), labels)
    # bf16 keeps 8 bits of mantissa, and a randomly initialised ResNet's large logits carry its
    # rounding through 3 heads: the same loss to within 10 % (5 % measured), not bit for bit.
    assert loss.item() == pytest.approx(reference.item(), rel=0.1)
    assert loss.item() != reference.item()  # and the autocast did change the arithmetic


def test_bf16_gradient_matches_the_float32_gradient(one_thread):
    """The backward through autocast is the float32 gradient up to bf16 rounding. Eval mode: batch
    statistics of 2 samples (the context path's pooled BatchNorm) are ill-conditioned enough to
    turn that rounding into another direction, which would test BatchNorm, not the autocast."""
    model, _ = _model_and_optimizer()
    model.eval()
    images, labels = _batch(2)
    gradients = []
    for mode in ("off", "bf16"):
        model.zero_grad()
        with Precision("cpu", mode).autocast():
            loss = segmentation_loss(model(images), labels)
        loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    reference, bf16 = gradients
    assert bf16.dtype == torch.float32
    # measured: cosine 0.998, relative difference 6 %
    assert torch.nn.functional.cosine_similarity(reference, bf16, dim=0) > 0.99
    assert (bf16 - reference).norm() / reference.norm() < 0.15


def test_bf16_step_updates_float32_weights_without_scaling(one_thread):
    model, optimizer = _model_and_optimizer()
    precision = Precision("cpu", "bf16")
    scaler = precision.grad_scaler()
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss  # a disabled GradScaler hands the loss back untouched
    before = {name: value.clone() for name, value in model.named_parameters()}
    step = supervised_step(model, optimizer, scaler, precision, *_batch(2))
    assert step["loss_seg"].dtype == torch.float32 and torch.isfinite(step["loss_seg"])
    changed = [name for name, value in model.named_parameters() if not torch.equal(before[name], value)]
    assert len(changed) == len(before)  # every parameter got its SGD update
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_bf16_non_finite_loss_is_refused_and_changes_nothing(one_thread):
    model, optimizer = _model_and_optimizer()
    precision = Precision("cpu", "bf16")
    images, labels = _batch(3)
    images[1, :, 5, 5] = float("inf")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="seg"):
        with buffers_restored_on_refusal([model]):
            supervised_step(model, optimizer, precision.grad_scaler(), precision, images, labels)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {}


@pytest.mark.slow
def test_bf16_run_checkpoints_and_resumes_exactly(tiny_data_root, tmp_path, one_thread):
    flags = ["--amp", "bf16", "--device", "cpu", "--discriminator", "none", "--max-iters", "3", "--val-every", "3",
             "--checkpoint-every", "1"]

    def args(run, *extra):
        return trainUnsupervised.get_args(["--data-root", str(tiny_data_root), "--output-dir", str(run),
                                           *tiny_run(*flags, *extra)])

    trainUnsupervised.main(args(tmp_path / "straight"))
    with stop_after(trainUnsupervised, 1), pytest.raises(StopTraining):
        trainUnsupervised.main(args(tmp_path / "split"))
    trainUnsupervised.main(args(tmp_path / "split", "--resume", tmp_path / "split" / "last.pth"))

    straight, split = (load_checkpoint_file(tmp_path / name / "last.pth") for name in ("straight", "split"))
    assert straight["args"]["amp"] == "bf16" and straight["iteration"] == split["iteration"] == 3
    assert all(value.dtype != torch.bfloat16 for value in straight["model"].values())  # weights stay float32
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), f"model.{key} differs after a bf16 resume"
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    assert straight["history"] == split["history"]
