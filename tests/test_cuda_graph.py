"""engine/cuda_graph.py on the CPU: the finiteness check on the device against check_finite, and
GraphedStep's warm-up, static inputs and learning rates around a stand-in for the CUDA graph that
calls the captured function again at each replay (a real capture needs a GPU: bench/gpu_check.sh)."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from cli.builders import refuse_cuda_graph_conflicts, resolve_fast_paths
from engine.cuda_graph import DeferredFiniteCheck, GraphedStep
from engine.optim import build_optimizer, portable_state_dict, set_lr
from engine.steps import NonFiniteLossError, supervised_step
from model import build_bisenet, build_discriminator
from model.resize import set_matmul_resize
from engine.precision import Precision
from uda.step import SelfTrainingStep
from utils.errors import OptionError
from tests.helpers import host_reads

SIZE = (32, 64)  # the smallest BiSeNet takes: its context path pools to 1 x 2
pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(seed, poisoned=False, size=SIZE):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(2, 3, *size, generator=generator)
    labels = torch.randint(0, 19, (2, *size), generator=generator)
    target = torch.randn(2, 3, *size, generator=generator)
    if poisoned:
        target[0, 0, 0, 0] = float("nan")
    return {"source": {"image": source, "label": labels}, "target": {"image": target}}


def _training(deferred):
    """A seeded BiSeNet + DSC adversarial step with the scripts' fused SGD/Adam, as build_step makes it."""
    torch.manual_seed(0)
    model = build_bisenet("resnet18", 19)
    # The levers CUDA runs with by default (classifier first, matmul resize): their code is in the graph too.
    model.set_speed_levers(skip_unread_aux=True, classifier_first=True, matmul_resize=True)
    discriminator = set_matmul_resize(build_discriminator("dsc", 19), True)
    optimizer = build_optimizer("sgd", model.parameters(), 1e-2)
    optimizer_d = build_optimizer("adam", discriminator.parameters(), 1e-3, weight_decay=0.0)
    precision = Precision("cpu", "off")
    step = SelfTrainingStep(model=model, discriminator=discriminator, optimizer=optimizer, optimizer_d=optimizer_d,
                            scaler=precision.grad_scaler(), scaler_d=precision.grad_scaler(), precision=precision,
                            lambda_adv=1e-3, seed=0, uses_target=True)
    if deferred:
        step.finite_check = DeferredFiniteCheck([optimizer, optimizer_d], "cpu")
    return SimpleNamespace(step=step, model=model, discriminator=discriminator, optimizers=[optimizer, optimizer_d],
                           precision=precision)


def _state(training):
    """Every tensor the step changes: both networks and both optimizers' states (steps, moments)."""
    tensors = {**{f"model.{k}": v for k, v in training.model.state_dict().items()},
               **{f"disc.{k}": v for k, v in training.discriminator.state_dict().items()}}
    for index, optimizer in enumerate(training.optimizers):
        for number, state in portable_state_dict(optimizer)["state"].items():
            tensors.update({f"opt{index}.{number}.{k}": v for k, v in state.items()})
    return {name: value.detach().clone() for name, value in tensors.items()}


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


def _set_rates(training, iteration, float32=False):
    """The poly schedule's rates; ``float32``: rounded as a captured step's float32 rate tensors hold
    them (CUDA's fused kernels read a tensor rate as float32: the one numerical difference to an eager
    run, about 6e-8 of the rate)."""
    for optimizer, base in zip(training.optimizers, (1e-2, 1e-3)):
        rate = base * (1 - iteration / 10) ** 0.9
        set_lr(optimizer, float(torch.tensor(rate, dtype=torch.float32)) if float32 else rate)


def test_the_device_check_gives_the_host_checked_steps_bit_for_bit_and_reads_nothing_on_the_host():
    host, device = _training(deferred=False), _training(deferred=True)
    for iteration in range(2):
        batches = _batches(iteration)
        for training in (host, device):
            _set_rates(training, iteration)
        expected = host.step(batches, iteration)
        device.step.finite_check.at_iteration(iteration)
        with host_reads() as reads:
            losses = device.step(batches, iteration)
        assert reads == []  # check_finite reads its flags with one tolist()
        assert losses.keys() == expected.keys() and all(torch.equal(losses[k], expected[k]) for k in losses)
    _assert_equal_states(_state(device), _state(host))
    device.step.finite_check.raise_if_refused()  # nothing refused


def test_a_non_finite_step_and_every_later_one_change_nothing_and_the_first_is_named():
    training = _training(deferred=True)
    check = training.step.finite_check
    training.step(_batches(0), 0)
    after_first = _state(training)
    adam_steps = {float(state["step"]) for state in training.optimizers[1].state.values()}
    for iteration, poisoned in ((1, True), (2, False)):
        check.at_iteration(iteration)
        training.step(_batches(iteration, poisoned), iteration)
    # Refused on the device: no parameter, momentum or Adam moment moved, Adam's step counts undone.
    # The forwards moved BatchNorm's statistics (NaN now): the loop stops before anything is saved.
    now = _state(training)
    moved = [name for name in now if not torch.equal(now[name], after_first[name])]
    assert moved and all(name.endswith(("running_mean", "running_var", "num_batches_tracked")) for name in moved)
    assert {float(state["step"]) for state in training.optimizers[1].state.values()} == adam_steps == {1.0}
    with pytest.raises(NonFiniteLossError, match="loss_adv") as raised:
        check.raise_if_refused()
    assert raised.value.iteration == 1 and "loss_seg" not in raised.value.terms


class ReplayingCapture:
    """A CUDA graph's contract without a GPU: ``capture`` records the function without running it,
    each replay runs it again, and fails if a learning rate is no longer the tensor captured (a real
    graph reads its address: a float put in its place would never reach the kernels)."""

    def __init__(self, optimizers):
        self.optimizers = optimizers
        self.captures = self.replays = 0

    def _rates(self):
        return [group["lr"] for optimizer in self.optimizers for group in optimizer.param_groups]

    def __call__(self, function):
        self.captures += 1
        captured_rates = self._rates()
        assert all(torch.is_tensor(rate) for rate in captured_rates)

        def replay():
            assert all(now is then for now, then in zip(self._rates(), captured_rates))
            self.replays += 1
            function()
        return replay


def test_graphed_steps_warm_up_then_replay_the_captured_step_like_the_eager_loop():
    eager, graphed = _training(deferred=False), _training(deferred=True)
    capture = ReplayingCapture(graphed.optimizers)
    step = GraphedStep(graphed.step, graphed.step.finite_check, graphed.precision, warmup_steps=1, capture=capture)
    assert graphed.precision.autocast_cache is False
    other_shapes = 3  # a batch the captured step cannot take: run eagerly, with a warning
    for iteration in range(5):
        # New tensors each time: the replay must read them through the static copies.
        batches = _batches(iteration, size=(64, 64) if iteration == other_shapes else SIZE)
        for training in (eager, graphed):
            _set_rates(training, iteration, float32=True)
        expected = eager.step(batches, iteration)
        with (pytest.warns(UserWarning, match="other shapes") if iteration == other_shapes
              else contextlib.nullcontext()):
            losses = step(batches, iteration)
        assert all(torch.equal(losses[k], expected[k]) for k in expected), iteration
        if iteration == 0:
            assert capture.captures == 0
    assert (capture.captures, capture.replays) == (1, 3)
    _assert_equal_states(_state(graphed), _state(eager))
    # A checkpoint of the graphed run is an eager run's: float learning rates, nothing capturable.
    for optimizer in graphed.optimizers:
        groups = portable_state_dict(optimizer)["param_groups"]
        assert all(type(group["lr"]) is float and not group.get("capturable") for group in groups)
        assert all(torch.is_tensor(group["lr"]) for group in optimizer.param_groups)  # the live ones stay tensors


HOLDABLE = {"compile": "off", "amp": "bf16", "optimizer": "sgd", "optimizer_d": "adam", "self_training": "none",
            "fda_beta": 0.0}


@pytest.mark.parametrize("change, reason", [
    ({"device": "cpu"}, "needs a CUDA device"),
    ({"processes": 2}, "runs in one process"),
    ({"compile": "on"}, "replaces --compile on"),
    ({"amp": "fp16"}, "needs bf16 or fp32"),
    ({"optimizer": "rmsprop"}, "needs --optimizer/--optimizer-d sgd or adam"),
    ({"optimizer_d": "rmsprop"}, "needs --optimizer/--optimizer-d sgd or adam"),
    ({"self_training": "dacs"}, "cannot hold --self-training dacs or --fda-beta"),
    ({"fda_beta": 0.01}, "cannot hold --self-training dacs or --fda-beta"),
])
def test_cuda_graph_refuses_what_the_captured_step_cannot_hold(change, reason, monkeypatch):
    refuse_cuda_graph_conflicts(SimpleNamespace(**HOLDABLE), torch.device("cuda"))  # no conflict: passes
    change = dict(change)
    device, processes = torch.device(change.pop("device", "cuda")), change.pop("processes", 1)
    monkeypatch.setattr("cli.builders.get_world_size", lambda: processes)
    with pytest.raises(OptionError, match=f"^--cuda-graph on {reason}"):
        refuse_cuda_graph_conflicts(SimpleNamespace(**{**HOLDABLE, **change}), device)


def test_the_device_check_refuses_optimizers_that_ignore_found_inf():
    network = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="ignores found_inf"):
        DeferredFiniteCheck([torch.optim.SGD(network.parameters(), lr=0.1)], "cpu")


def test_the_supervised_step_checked_on_the_device_is_the_host_checked_one_without_host_reads():
    """trainSupervised.py --cuda-graph on: the same step with DeferredFiniteCheck, bit for bit."""
    runs = []
    for deferred in (False, True):
        torch.manual_seed(0)
        model = build_bisenet("resnet18", 19)
        optimizer = build_optimizer("sgd", model.parameters(), 1e-2)
        precision = Precision("cpu", "off")
        check = DeferredFiniteCheck([optimizer], "cpu") if deferred else None
        for seed in range(2):
            batch = _batches(seed)["source"]
            with host_reads() as reads:
                losses = supervised_step(model, optimizer, precision.grad_scaler(), precision, batch["image"],
                                         batch["label"], check=check)
            assert reads == ([] if deferred else ["tolist"])
        runs.append((losses, model.state_dict()))
    (host_losses, host_state), (device_losses, device_state) = runs
    assert torch.equal(host_losses["loss_seg"], device_losses["loss_seg"])
    assert all(torch.equal(host_state[name], device_state[name]) for name in host_state)


def test_both_training_scripts_take_the_flag_and_refuse_it_without_cuda(tmp_path):
    import trainSupervised
    import trainUnsupervised

    for script in (trainSupervised, trainUnsupervised):
        args = script.get_args(["--output-dir", str(tmp_path), "--device", "cpu", "--cuda-graph", "on"])
        with pytest.raises(OptionError, match="--cuda-graph on needs a CUDA device"):
            resolve_fast_paths(args, torch.device("cpu"))
        assert script.get_args(["--output-dir", str(tmp_path)]).cuda_graph == "off"


def test_a_capture_that_records_nothing_is_an_error_not_a_warning(monkeypatch):
    """torch only warns when a capture recorded no kernel (the step ran on another device or stream):
    every replay would then train nothing. CudaGraphCapture turns that warning into an error.
    torch.cuda.graph is replaced by a context that warns as torch's capture_end does."""
    import contextlib
    import warnings

    from engine.cuda_graph import CudaGraphCapture

    @contextlib.contextmanager
    def empty_capture(graph, **options):
        yield
        warnings.warn("The CUDA Graph is empty. This usually means that the graph was attempted to be captured "
                      "on wrong device or stream.")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=None))
    monkeypatch.setattr(torch.cuda, "graph", empty_capture)
    with pytest.raises(UserWarning, match="The CUDA Graph is empty"):
        CudaGraphCapture()(lambda: None)


@pytest.mark.slow
def test_train_unsupervised_with_the_flag_trains_as_without_it_and_its_checkpoint_resumes_eagerly(
        tiny_data_root, tmp_path, monkeypatch, one_thread):
    """The script's wiring on the CPU (build_step's GraphedStep, the Trainer's finite_check, the rate
    tensors set by the loop, validation and checkpoints between replays), with the CUDA-only refusal
    lifted and a stand-in graph that runs the captured step again at each replay: the same losses as
    the eager run up to the float32 learning rates, and a last.pth that an eager run resumes."""
    import trainUnsupervised
    from tests.helpers import losses, tiny_run
    from utils.checkpoint import load_checkpoint_file

    def replaying_capture(stream):
        return lambda function: function
    monkeypatch.setattr("engine.cuda_graph.CudaGraphCapture", replaying_capture)
    monkeypatch.setattr("cli.builders.refuse_cuda_graph_conflicts", lambda args, device: None)
    schedule = ["--data-root", tiny_data_root, "--max-iters", "5", "--val-every", "5", "--device", "cpu"]
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = tmp_path / mode
        trainer = trainUnsupervised.main(trainUnsupervised.get_args(
            ["--output-dir", str(runs[mode]), "--cuda-graph", mode, *tiny_run(*schedule)]))
        graphed = isinstance(trainer.step_fn, GraphedStep)
        assert graphed == (mode == "on") and (trainer.finite_check is trainer.step_fn.finite_check if graphed
                                              else trainer.finite_check is None)
    eager, graphed = losses(runs["off"]), losses(runs["on"])
    assert [record["iteration"] for record in graphed] == [1, 2, 3, 4, 5]  # 3 warm-up steps, capture, replay
    for expected, got in zip(eager, graphed):
        assert got.keys() == expected.keys()
        assert all(got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7) for key in expected)
    saved = load_checkpoint_file(runs["on"] / "last.pth")
    groups = [group for state in saved["optimizers"].values() for group in state["param_groups"]]
    assert all(type(group["lr"]) is float and not group.get("capturable") for group in groups)
    trainUnsupervised.main(trainUnsupervised.get_args(
        ["--output-dir", str(runs["on"]), "--resume", str(runs["on"] / "last.pth"), "--cuda-graph", "off",
         *tiny_run(*schedule[:2], "--max-iters", "6", "--val-every", "6", "--device", "cpu")]))
    assert losses(runs["on"])[-1]["iteration"] == 6
