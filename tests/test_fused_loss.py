"""The fused upsample + log-softmax + NLL and upsample + softmax of engine.fused_loss (--fused-loss)
against the reference ops, F.interpolate(bilinear, align_corners=False) + F.cross_entropy(reduction=
"sum", ignore 255) or F.softmax.

The Triton kernels run in Triton's CPU interpreter, in a subprocess (tests/fused_loss_cases.py,
TRITON_INTERPRET=1 set before Triton is imported) that saves its losses and gradients; the
references are computed here. The subprocess takes about 21-24 s of CPU on a busy two-core machine
(`OMP_NUM_THREADS=1 TRITON_INTERPRET=1 /usr/bin/time .venv/bin/python tests/fused_loss_cases.py OUT`),
most of it the two MPL steps, hence the slow mark on the tests that read it.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli.builders import resolve_fast_paths
from engine import fused_loss
from engine.fused_loss import axis_tables
from engine.steps import segmentation_loss
from model import build_bisenet
from model.resize import interpolation_matrix
# The cases that run twice, and the adversarial step whose reference runs here.
from tests.fused_loss_cases import REPEATED, SOFTMAX_REPEATED, run_adversarial_step
from tests.helpers import compile_for_hopper, kernels_to_compile, run_in_triton_interpreter, runtime_args
from utils import triton_support
from utils.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]
IGNORE = 255


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """What tests/fused_loss_cases.py computed with the kernels in Triton's interpreter."""
    pytest.importorskip("triton")
    return run_in_triton_interpreter("fused_loss_cases.py", tmp_path_factory.mktemp("fused_loss") / "cases.pt")


def _float32_reference(function, logits, upstream):
    """``function`` of ``logits`` read in float32 (as the kernels read any dtype) and the gradient of
    ``logits`` for the ``upstream`` gradient, by autograd."""
    leaf = logits.detach().float().requires_grad_()
    value = function(leaf)
    value.backward(torch.as_tensor(upstream, dtype=value.dtype).expand_as(value))
    return value.detach(), leaf.grad


def _upsampled(logits, size):
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _reference(logits, labels, upstream=1.0):
    """Loss and gradient by the reference ops, F.interpolate + F.cross_entropy."""
    return _float32_reference(lambda leaf: F.cross_entropy(_upsampled(leaf, labels.shape[-2:]), labels,
                                                           ignore_index=IGNORE, reduction="sum"), logits, upstream)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32", "fp32_channels_last", "odd_sizes", "mixed_axes", "nineteen_classes"])
def test_float32_loss_and_gradient_match_interpolate_and_cross_entropy(interpreted, name):
    # Contiguous and channels_last logits, x8 upsampling, non-integer and mixed up/down scales,
    # 19 classes (padded to 32 lanes), an upstream gradient other than 1: same value and gradient
    # as the reference up to float32 rounding of sums in another order.
    case = interpreted["kernels"][name]
    loss, grad = _reference(case["logits"], case["labels"], case["upstream"])
    assert case["loss"].dtype == torch.float32
    assert torch.allclose(case["loss"], loss, rtol=2e-6, atol=1e-5), (case["loss"], loss)
    assert case["grad"].dtype == case["logits"].dtype
    assert torch.allclose(case["grad"], grad, rtol=1e-5, atol=2e-5 * grad.abs().max().item())
    # The gradient keeps the logits' layout.
    assert case["grad"].stride() == case["logits"].stride()


@pytest.mark.slow
@pytest.mark.parametrize("name", REPEATED)
def test_a_second_run_gives_the_same_loss_and_gradient_bit_for_bit(interpreted, name):
    # Gathers in a fixed order, every element written once (no atomic adds, nothing left from
    # torch.empty): contiguous and channels_last logits, fp32 and bf16, odd and mixed scales.
    case = interpreted["kernels"][name]
    assert torch.equal(case["loss"], case["loss_again"]) and torch.equal(case["grad"], case["grad_again"])


@pytest.mark.slow
def test_bfloat16_logits_are_read_in_float32(interpreted):
    # bf16 logits: the loss is the float32 loss of those (exactly representable) values, tightly;
    # the bf16 gradient is the float32 one within bf16 rounding (8 bits of mantissa).
    case = interpreted["kernels"]["bf16_channels_last"]
    loss, grad = _reference(case["logits"], case["labels"])
    assert torch.allclose(case["loss"], loss, rtol=2e-6, atol=1e-5)
    assert case["grad"].dtype == torch.bfloat16 and case["grad"].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(case["grad"].float(), grad, rtol=2 ** -7, atol=2e-5 * grad.abs().max().item())


def _reference_softmax(logits, size, upstream):
    """Softmax map and gradient by the reference ops, F.interpolate + F.softmax."""
    return _float32_reference(lambda leaf: F.softmax(_upsampled(leaf, size), dim=1), logits, upstream)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32", "fp32_channels_last", "odd_sizes", "mixed_axes", "nineteen_classes"])
def test_softmax_and_its_gradient_match_interpolate_and_softmax(interpreted, name):
    # fused_upsampled_softmax against F.softmax(F.interpolate(...)) and its autograd, for a random
    # upstream gradient: contiguous and channels_last logits (and upstream), x8, non-integer and mixed
    # scales, 19 classes. The map is contiguous like F.softmax's; the gradient keeps the logits' layout;
    # a second run gives the same bits (gathers, no atomic adds), where the case runs twice.
    case = interpreted["softmax"][name]
    probs, grad = _reference_softmax(case["logits"], case["size"], case["upstream"])
    assert case["probs"].dtype == torch.float32 and case["probs"].stride() == probs.stride()
    assert torch.allclose(case["probs"], probs, rtol=1e-5, atol=1e-6)
    assert case["grad"].dtype == case["logits"].dtype and case["grad"].stride() == case["logits"].stride()
    assert torch.allclose(case["grad"], grad, rtol=1e-5, atol=2e-5 * grad.abs().max().item())
    if name in SOFTMAX_REPEATED:
        assert torch.equal(case["probs"], case["probs_again"]) and torch.equal(case["grad"], case["grad_again"])


@pytest.mark.slow
def test_softmax_of_bfloat16_logits_reads_them_in_float32(interpreted):
    # The map is the float32 softmax of those (exactly representable) values, tightly; the bf16
    # gradient is the float32 one within bf16 rounding.
    case = interpreted["softmax"]["bf16_channels_last"]
    probs, grad = _reference_softmax(case["logits"], case["size"], case["upstream"])
    assert torch.allclose(case["probs"], probs, rtol=1e-5, atol=1e-6)
    assert case["grad"].dtype == torch.bfloat16 and case["grad"].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(case["grad"].float(), grad, rtol=2 ** -7, atol=2e-5 * grad.abs().max().item())
    assert torch.equal(case["probs"], case["probs_again"]) and torch.equal(case["grad"], case["grad_again"])


@pytest.mark.slow
def test_all_ignored_labels_give_zero_loss_and_zero_gradient(interpreted):
    case = interpreted["kernels"]["all_ignored"]
    assert (case["labels"] == IGNORE).all()
    assert case["loss"].item() == 0.0
    assert torch.count_nonzero(case["grad"]) == 0


@pytest.mark.slow
def test_bisenet_heads_through_the_fused_loss_match_the_classifier_first_reference(interpreted, one_thread):
    # forward_heads + segmentation_loss with BiSeNet.fused_loss on against the same network with the
    # classifier-first order and the unfused loss: same loss; the main output handed to the
    # discriminator is the classifier-first output itself, upsampled once. The parameter gradients of
    # that loss: the MPL step's test below (its student's adversarial step begins with this forward and
    # loss).
    case = interpreted["bisenet"]  # computed on one thread: the reference too (oneDNN's sums follow the threads)
    model = build_bisenet("resnet18", num_classes=5).train()
    model.load_state_dict(case["state"])
    model.set_speed_levers(classifier_first=True)
    with torch.no_grad():
        outputs = model(case["images"])
        loss = segmentation_loss(outputs, case["labels"])
    assert torch.allclose(case["loss"], loss, rtol=1e-5)
    main = outputs[0]
    torch.testing.assert_close(case["main"], main, rtol=1e-5, atol=1e-5 * main.abs().max().item())
    assert case["main_cached"]


# The adversarial gradient's float32 rounding, fused against classifier-first: measured 1.0e-6 of its
# largest entry (sums in another order in the kernels, the interpolation and the network's backward);
# allowed 1e-5 of it. A softmax backward scaled by 1.0001 is 1e-4 of it.
ADVERSARIAL_GRADIENT_TOLERANCE = 1e-5


@pytest.mark.slow
def test_adversarial_gradient_through_the_fused_softmax_matches_the_classifier_first_step(interpreted, one_thread):
    # uda.adversarial.adversarial_step at the scripts' --lambda-adv 1e-3 with every source label
    # ignored and no target labels: the gradient applied to the network is the adversarial term's
    # alone, through the discriminator and the fused upsample + softmax backward (the MPL test's
    # gradients, where cross-entropies weigh far more, stay within tolerance with that backward scaled
    # by 1.5). Against the classifier-first step (F.interpolate + F.softmax): the same losses, and every
    # applied gradient within float32 rounding of the largest.
    reference, fused = run_adversarial_step(False), interpreted["adversarial"]
    assert fused["losses"].keys() == reference["losses"].keys() == {"loss_seg", "loss_adv", "loss_d"}
    assert fused["losses"]["loss_seg"] == reference["losses"]["loss_seg"] == 0.0
    for name, value in reference["losses"].items():
        torch.testing.assert_close(fused["losses"][name], value, rtol=1e-5, atol=0.0, msg=name)
    expected, got = reference["grads"], fused["grads"]
    scale = max(grad.abs().max().item() for grad in expected.values())
    assert got.keys() == expected.keys() and scale > 0.0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0.0, atol=ADVERSARIAL_GRADIENT_TOLERANCE * scale, msg=name)


# Cross-entropies of one MPL iteration: pham: the student's labeled loss before its pseudo-label step,
# that step and its source step (3 heads each), the teacher's pseudo-label and UDA terms (main head)
# and its source loss (3); course: the student's source and pseudo-label terms (3 + 3), the
# teacher's pseudo-label term (3), UDA term (1) and source loss (3).
MPL_LOSSES = {"pham": 14, "course": 13}
# Full-resolution class maps of one MPL iteration with the fused loss (and heads upsampled by
# LowResLogits.full): only the teacher's clean target main head, whose logits its labeler reads; every
# discriminator's input comes from the fused upsample + softmax kernel.
MPL_FULL_MAPS = 1
# The student's adversarial_step (AdaptSegNet's step: source CE, target adversarial and pseudo-label terms,
# discriminator step), whose losses the MPL step returns.
ADVERSARIAL_LOSSES = {"loss_seg", "loss_adv", "loss_pseudo", "loss_d"}


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["pham", "course"])
def test_mpl_step_with_the_fused_loss_reads_low_resolution_heads_and_matches_the_classifier_first_step(
        interpreted, one_thread, rule):
    # uda.meta_pseudo_labels.MPLStep with --fused-loss on: every cross-entropy (the student's no-grad
    # labeled loss included) reads LowResLogits, no full-resolution map is made that nothing reads,
    # and losses and the first applied gradients are those of the classifier-first step. The student's
    # step is uda.adversarial.adversarial_step: its source CE and target pseudo-label CE through the loss
    # kernel, its discriminator's source and target maps through the softmax kernel (forward, and
    # backward into the student with --lambda-adv 1); course's student update is that step's, and its
    # discriminator's update too.
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from fused_loss_cases import run_mpl_step
    finally:
        sys.path.remove(str(ROOT / "tests"))
    reference, fused = run_mpl_step(False, rule), interpreted["mpl"][rule]
    assert fused["read"] == ["low_res"] * MPL_LOSSES[rule] and reference["read"] == ["full"] * MPL_LOSSES[rule]
    assert fused["full_maps"] == fused["full_calls"] == MPL_FULL_MAPS < reference["full_maps"]
    assert fused["losses"].keys() == reference["losses"].keys() and fused["losses"]["pl_kept"] > 0
    assert ADVERSARIAL_LOSSES <= fused["losses"].keys()
    loss_scale = reference["losses"]["t_loss_seg"].item()
    for name, value in reference["losses"].items():  # h = a difference of two losses: absolute tolerance
        torch.testing.assert_close(fused["losses"][name], value, rtol=1e-5, atol=1e-6 * loss_scale, msg=name)
    # The first update of each network (pham's student: its pseudo-label step); later ones start from
    # weights that already differ by a step's rounding, which these tiny networks amplify.
    for side in ("student_grads", "teacher_grads"):
        expected, got = reference[side][0], fused[side][0]
        scale = max(grad.abs().max().item() for grad in expected.values())
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{side} {name}")
    # The student's discriminator's update (after pham's pseudo-label step, whose rounding its maps carry:
    # course's only).
    if rule == "course":
        expected, got = reference["student_grads_d"][0], fused["student_grads_d"][0]
        scale = max(grad.abs().max().item() for grad in expected.values())
        assert got.keys() == expected.keys() and expected
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"discriminator {name}")

# Pointer arguments of the kernels: the logits and their gradient in the network's dtype, labels
# int64, tap indices and ranges int32, everything else float32; the other arguments are int32.
INDEX_POINTERS = {"labels_ptr": "*i64", "row0_ptr": "*i32", "row1_ptr": "*i32", "col0_ptr": "*i32",
                  "col1_ptr": "*i32", "row_start_ptr": "*i32", "row_count_ptr": "*i32", "col_start_ptr": "*i32",
                  "col_count_ptr": "*i32"}


def test_kernels_compile_for_a_hopper_gpu_without_one(tmp_path, monkeypatch):
    # The interpreter runs Python on NumPy and forgives what the compiler refuses (types, constexprs,
    # tuples returned by helpers): each kernel is compiled here down to an sm_90 cubin (H100/H200),
    # for bf16 logits (the CUDA default's autocast); the softmax's map and its gradient are float32.
    dtype = "bf16"
    kernels = kernels_to_compile(fused_loss._kernels, monkeypatch, tmp_path)

    def argument_type(name):
        return INDEX_POINTERS.get(name, f"*{dtype}" if name in ("logits_ptr", "grad_ptr")
                                  else "*fp32" if name.endswith("_ptr") else "i32")
    for kernel, blocks in ((kernels.forward_kernel, {"BLOCK_P": fused_loss.BLOCK_PIXELS}),
                           (kernels.column_pass_kernel, {"BLOCK_Q": fused_loss.BLOCK_COLUMN_PASS}),
                           (kernels.row_pass_kernel, {"BLOCK_Q": fused_loss.BLOCK_ROW_PASS}),
                           (kernels.softmax_forward_kernel, {"BLOCK_P": fused_loss.BLOCK_SOFTMAX_PIXELS}),
                           (kernels.softmax_column_pass_kernel, {"BLOCK_Q": fused_loss.BLOCK_SOFTMAX_COLUMN_PASS})):
        blocks["BLOCK_K"] = 32  # 19 classes
        assert compile_for_hopper(kernel, argument_type, blocks), kernel.__name__


@pytest.mark.parametrize("in_size,out_size", [(6, 48), (7, 56), (5, 17), (9, 4), (3, 3), (1, 5), (160, 1280)])
def test_axis_tables_are_interpolates_weights_and_cover_every_reader(in_size, out_size):
    # The two taps and weights per output index rebuild F.interpolate's own 1-D matrix; every output
    # index with a nonzero weight on input index i lies in i's gather range [start, start + count).
    first, second, w0, w1, start, count, max_count = axis_tables(in_size, out_size, torch.device("cpu"))
    rebuilt = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    rebuilt.index_put_((rows, first.long()), w0, accumulate=True)
    rebuilt.index_put_((rows, second.long()), w1, accumulate=True)
    assert torch.allclose(rebuilt, interpolation_matrix(in_size, out_size, torch.device("cpu"), torch.float32),
                          atol=1e-6)
    for i in range(in_size):
        readers = torch.nonzero(rebuilt[:, i]).flatten()
        assert ((readers >= start[i]) & (readers < start[i] + count[i])).all(), i
    assert max_count == int(count.max())


def test_fused_loss_is_off_by_default_and_on_needs_cuda_and_triton(monkeypatch):
    # The scripts' refusal (one error line, exit 2, before any work): tests/test_exits.py, "fused loss on the CPU".
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_fast_paths(runtime_args(), cpu).fused_loss == "off"
    assert resolve_fast_paths(runtime_args("--fused-loss", "auto"), cpu).fused_loss == "off"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(OptionError, match="--fused-loss on: .*CUDA"):
        resolve_fast_paths(runtime_args("--fused-loss", "on"), cpu)
    monkeypatch.setattr(triton_support, "triton_available", lambda: True)
    assert resolve_fast_paths(runtime_args("--fused-loss", "auto"), cuda).fused_loss == "on"
    monkeypatch.setattr(triton_support, "triton_available", lambda: False)
    assert resolve_fast_paths(runtime_args("--fused-loss", "auto"), cuda).fused_loss == "off"
    with pytest.raises(OptionError, match="--fused-loss on: .*Triton"):
        resolve_fast_paths(runtime_args("--fused-loss", "on"), cuda)
