"""The DSC discriminator's depthwise convolution (model.depthwise, --depthwise) in its dense and
Triton forms against the reference, F.conv2d(groups=C), 4x4 stride 2 padding 1, no bias.

The dense form runs here. The Triton kernels run in Triton's CPU interpreter, in a subprocess
(tests/depthwise_cases.py, TRITON_INTERPRET=1 set before Triton is imported) that saves its outputs
and gradients; the references are computed here from the same inputs. The subprocess takes about
6-7 s of CPU on a busy two-core machine, half of it importing torch and Triton, hence the slow mark
on the tests that read it.
"""
import pytest
import torch
import torch.nn.functional as F

from cli.builders import resolve_fast_paths
from model import build_discriminator
from model import depthwise
from model.depthwise import BLOCK_CHANNELS, BLOCK_PIXELS, WEIGHT_BLOCK_PIXELS, block_diagonal, set_depthwise
from uda.adversarial import build_discriminator_parts
from tests.depthwise_cases import REPEATED  # the cases that run twice
from tests.helpers import compile_for_hopper, kernels_to_compile, run_in_triton_interpreter, runtime_args
from utils import triton_support
from utils.errors import OptionError


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """What tests/depthwise_cases.py computed with the kernels in Triton's interpreter."""
    pytest.importorskip("triton")
    return run_in_triton_interpreter("depthwise_cases.py", tmp_path_factory.mktemp("depthwise") / "cases.pt")


def _reference(x, weight, upstream):
    """Output, input gradient and weight gradient of the grouped convolution, in float32 (the
    kernels read every dtype as float32 and sum in float32)."""
    leaf, leaf_weight = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    y = F.conv2d(leaf, leaf_weight, None, stride=2, padding=1, groups=x.shape[1])
    y.backward(upstream.float())
    return y.detach(), leaf.grad, leaf_weight.grad


def _close(actual, expected, rtol):
    """Within ``rtol`` of each value and of the largest one (sums in another order: cancellations)."""
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["even_nhwc", "odd_nhwc", "odd_rows_45", "nchw_input", "wide_channels"])
def test_triton_forward_and_gradients_match_the_grouped_convolution(interpreted, name):
    # Even and odd sizes (45 rows -> 22), batches 1-3, 5 to 512 channels (not multiples of the block),
    # NHWC and NCHW inputs, upstream gradients in either layout: the same values as the reference up
    # to float32 sums in another order; the output is NHWC, the input gradient in the input's layout,
    # and a second run gives every bit again (no atomics, a fixed reduction order) for each pair of
    # input and upstream layouts (NHWC/NHWC, NHWC/NCHW, NCHW/NCHW: the cases run twice).
    case = interpreted["kernels"][name]
    y, grad_x, grad_weight = _reference(case["x"], case["weight"], case["upstream"])
    assert case["y"].shape == y.shape and case["y"].is_contiguous(memory_format=torch.channels_last)
    _close(case["y"], y, 1e-6)
    assert case["grad_x"].stride() == case["x"].stride()
    _close(case["grad_x"], grad_x, 1e-6)
    assert case["grad_weight"].shape == case["weight"].shape and case["grad_weight"].dtype == torch.float32
    _close(case["grad_weight"], grad_weight, 1e-5)
    if name in REPEATED:
        assert torch.equal(case["y"], case["y_again"]) and torch.equal(case["grad_x"], case["grad_x_again"])
        assert torch.equal(case["grad_weight"], case["grad_weight_again"])


@pytest.mark.slow
# One unit in the last place, relative: the interpreter converts float32 to bf16 by truncation (measured:
# every output equals the truncated reference), a GPU rounds to nearest (half of it); fp16 rounds.
@pytest.mark.parametrize("name,ulp", [("bf16", 2.0 ** -7), ("fp16", 2.0 ** -10)])
def test_triton_half_precision_inputs_are_summed_in_float32(interpreted, name, ulp):
    # bf16/fp16 input and upstream gradient, float32 weight: the output and the input gradient are in
    # the input's dtype and are the float32 results of those (exactly representable) values converted
    # once; the weight gradient is float32 and as tight as in float32.
    case = interpreted["kernels"][name]
    y, grad_x, grad_weight = _reference(case["x"], case["weight"], case["upstream"])
    assert case["y"].dtype == case["grad_x"].dtype == case["x"].dtype
    _close(case["y"], y, ulp)
    _close(case["grad_x"], grad_x, ulp)
    assert case["grad_weight"].dtype == torch.float32
    _close(case["grad_weight"], grad_weight, 1e-5)


@pytest.mark.slow
def test_triton_under_autocast_casts_the_input_like_the_native_convolution(interpreted):
    case = interpreted["autocast"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = F.conv2d(case["x"], case["weight"], None, stride=2, padding=1, groups=case["x"].shape[1])
    assert case["y"].dtype == native.dtype == torch.bfloat16
    # The kernel reads the weight in float32 where the native one rounds it to bf16 too: within bf16 rounding.
    reference, _, _ = _reference(case["x"].bfloat16(), case["weight"], torch.zeros_like(native))
    _close(case["y"], reference, 2.0 ** -7)
    _close(case["y"], native.float(), 2.0 ** -6)


@pytest.mark.slow
def test_dsc_discriminator_with_triton_depthwise_matches_native(interpreted, one_thread):
    # A whole DSCDiscriminator (depthwise widths 5, 64, 128, 256, 512 on 32x48 -> 1x1) with --depthwise
    # triton against the same weights with the native grouped convolutions: same output, same input
    # gradient, same gradient for every parameter (depthwise and pointwise).
    case = interpreted["discriminator"]
    discriminator = build_discriminator("dsc", num_classes=case["x"].shape[1]).train()
    discriminator.load_state_dict(case["state"])
    leaf = case["x"].clone().requires_grad_()
    out = discriminator(leaf)
    out.backward(case["upstream"])
    _close(case["out"], out.detach(), 1e-5)
    _close(case["grad_x"], leaf.grad, 1e-5)
    assert case["grads"].keys() == dict(discriminator.named_parameters()).keys()
    for name, parameter in discriminator.named_parameters():
        torch.testing.assert_close(case["grads"][name], parameter.grad, rtol=1e-4,
                                   atol=1e-5 * parameter.grad.abs().max().item(), msg=name)


def test_block_diagonal_weight_is_the_depthwise_weight_on_its_diagonal():
    weight = torch.randn(3, 1, 4, 4)
    dense = block_diagonal(weight)
    assert dense.shape == (3, 3, 4, 4)
    for out_channel in range(3):
        for in_channel in range(3):
            expected = weight[out_channel, 0] if in_channel == out_channel else torch.zeros(4, 4)
            assert torch.equal(dense[out_channel, in_channel], expected)


@pytest.mark.parametrize("batch,channels,size", [(2, 5, (9, 11)), (1, 19, (8, 12)), (3, 64, (45, 6)), (1, 256, (5, 4))])
def test_dense_forward_and_gradients_match_the_grouped_convolution(batch, channels, size, one_thread):
    # The dense convolution with the block-diagonal weight is the same function: the off-diagonal
    # products are exact zeros. oneDNN's backward sums in another order than the grouped one's, so the
    # float32 gradients agree to rounding, not bit for bit (measured: up to 1.2e-7 of the largest value;
    # the forward was bitwise equal in these cases, which nothing promises).
    generator = torch.Generator().manual_seed(channels)
    x = torch.randn(batch, channels, *size, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, 4, 4, generator=generator)
    upstream = torch.randn(batch, channels, (size[0] - 2) // 2 + 1, (size[1] - 2) // 2 + 1, generator=generator)
    y, grad_x, grad_weight = _reference(x, weight, upstream)
    leaf, leaf_weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    dense = F.conv2d(leaf, block_diagonal(leaf_weight), None, stride=2, padding=1)
    dense.backward(upstream)
    _close(dense.detach(), y, 1e-6)
    _close(leaf.grad, grad_x, 1e-6)
    assert leaf_weight.grad.shape == weight.shape  # the gradient reaches the [C, 1, 4, 4] parameter
    _close(leaf_weight.grad, grad_weight, 1e-5)


def test_dense_discriminator_keeps_its_state_dict_and_matches_native_under_bf16_autocast(one_thread):
    # --depthwise dense leaves the parameters as they are (same names and shapes: checkpoints load either
    # way); under bf16 autocast both forms compute in bf16 and agree within bf16 rounding.
    torch.manual_seed(0)
    native = build_discriminator("dsc", num_classes=5).train()
    dense = set_depthwise(build_discriminator("dsc", num_classes=5), "dense").train()
    assert {k: v.shape for k, v in dense.state_dict().items()} == {k: v.shape for k, v in native.state_dict().items()}
    assert native.conv1.depthwise.weight.shape == (5, 1, 4, 4)
    dense.load_state_dict(native.state_dict())
    x = torch.randn(2, 5, 64, 96, generator=torch.Generator().manual_seed(1)).softmax(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = native(x), dense(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2 ** -6, atol=2 ** -6 * expected.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native(x).float().square().sum().backward()
        dense(x).float().square().sum().backward()
    for (name, a), b in zip(native.named_parameters(), dense.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=2 ** -5, atol=2 ** -5 * a.grad.abs().max().item(), msg=name)


def test_set_depthwise_refuses_an_unknown_implementation():
    with pytest.raises(ValueError, match="unknown depthwise implementation 'auto'"):
        set_depthwise(build_discriminator("dsc", num_classes=5), "auto")


def test_depthwise_is_native_by_default_and_triton_needs_cuda_and_triton(monkeypatch):
    # The scripts' refusal (one error line, exit 2, before any work): tests/test_exits.py, "depthwise triton on the CPU".
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_fast_paths(runtime_args(), cpu).depthwise == "native"
    assert resolve_fast_paths(runtime_args(), cuda).depthwise == "native"  # auto: nothing timed on a GPU yet
    assert resolve_fast_paths(runtime_args("--depthwise", "dense"), cpu).depthwise == "dense"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(OptionError, match="--depthwise triton: .*CUDA"):
        resolve_fast_paths(runtime_args("--depthwise", "triton"), cpu)
    monkeypatch.setattr(triton_support, "triton_available", lambda: True)
    assert resolve_fast_paths(runtime_args("--depthwise", "triton"), cuda).depthwise == "triton"
    monkeypatch.setattr(triton_support, "triton_available", lambda: False)
    with pytest.raises(OptionError, match="--depthwise triton: .*Triton"):
        resolve_fast_paths(runtime_args("--depthwise", "triton"), cuda)


def test_build_discriminator_parts_applies_the_depthwise_choice():
    args = runtime_args("--depthwise", "dense")
    args.discriminator, args.optimizer_d, args.learning_rate_d, args.momentum = "dsc", "adam", 1e-4, 0.9
    discriminator, _, _ = build_discriminator_parts(resolve_fast_paths(args, torch.device("cpu")), torch.device("cpu"), 5)
    layers = [discriminator.conv1.depthwise, discriminator.conv4.depthwise, discriminator.classifier.depthwise]
    assert all(layer.implementation == "dense" for layer in layers)


# Pointer arguments: the activations and their gradients in the network's dtype, the weight and
# the partial sums float32; the other arguments int32.
FLOAT32_POINTERS = ("w_ptr", "partial_ptr")


def test_kernels_compile_for_a_hopper_gpu_without_one(tmp_path, monkeypatch):
    # The interpreter forgives what the compiler refuses (types, constexprs): each kernel is compiled
    # here down to an sm_90 cubin (H100/H200), for bf16 activations (the CUDA default's autocast).
    kernels = kernels_to_compile(depthwise._kernels, monkeypatch, tmp_path)

    def argument_type(name):
        return ("*fp32" if name in FLOAT32_POINTERS else "*bf16") if name.endswith("_ptr") else "i32"
    for kernel, block_p in ((kernels.forward_kernel, BLOCK_PIXELS), (kernels.input_grad_kernel, BLOCK_PIXELS),
                            (kernels.weight_grad_kernel, WEIGHT_BLOCK_PIXELS)):
        assert compile_for_hopper(kernel, argument_type, {"BLOCK_P": block_p, "BLOCK_C": BLOCK_CHANNELS}), \
            kernel.__name__
