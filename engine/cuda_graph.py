"""A training step replayed from one CUDA graph (``--cuda-graph on``), and the finiteness check
without a host sync that it needs.

Eager, a step launches a few thousand kernels from Python (the host's dispatch then paces the
device for small batches) and waits once for the device, in ``check_finite``, which drains the
queue before the host may launch the next step. A captured step is one graph launch and reads
nothing back:

* ``DeferredFiniteCheck`` replaces ``check_finite``: the step's losses are checked on the device,
  and the verdict goes to the fused optimizers as their ``found_inf`` (the flag GradScaler uses),
  so a step with a non-finite loss updates no parameter and no optimizer state. The flag is
  sticky: once a step was refused, every later step is refused too, and the loop
  (``engine.trainer``) raises at its next sync (a log window, a validation, a checkpoint) naming
  the first refused iteration and its terms, without writing a checkpoint: the run stops where
  ``check_finite`` would have stopped it, its networks as they were before that iteration (only
  BatchNorm's running statistics moved on: they are not saved).
* ``GraphedStep`` runs the first ``WARMUP_STEPS`` steps eagerly on a side stream (cuDNN's
  algorithm search, the optimizers' state and the cached resize matrices are made there), then
  captures one step with its inputs in static buffers and replays it from then on: each iteration
  copies the batch into those buffers and launches the graph. The learning rates become device
  tensors that ``engine.optim.set_lr`` fills in place (a float would be frozen into the graph),
  autocast runs without its weight-cast cache (a cached cast would be captured once and never
  redone), and Adam's param groups are marked capturable.

What the graph can hold: one process (no DistributedDataParallel), no ``torch.compile``, bf16 or
fp32 (fp16's GradScaler decides on the host), the fused SGD/Adam optimizers (they read ``found_inf``)
and a step without per-iteration random draws (FDA and DACS re-seed a generator each step).
``cli.builders.refuse_cuda_graph_conflicts`` refuses the rest before any work.
"""
import contextlib
import warnings

import torch

from engine.steps import NonFiniteLossError, nonfinite_terms, refused_terms

WARMUP_STEPS = 3  # eager steps before the capture (torch's whole-network capture example uses 3)
NOT_REFUSED = -1  # first_refused_iteration while every step so far was finite


class DeferredFiniteCheck:
    """``check_finite`` on the device: ``check(losses)`` inside the step, ``raise_if_refused()``
    (one host read) in the loop. ``optimizers`` are the ones the step updates after the check:
    their ``found_inf`` is this check's sticky verdict."""

    def __init__(self, optimizers, device):
        self.optimizers = list(optimizers)
        self.refused = torch.zeros((), dtype=torch.float32, device=device)  # 1.0 from the first bad step on
        self.iteration = torch.zeros((), dtype=torch.int64, device=device)  # the step's, set by at_iteration
        self.first_refused_iteration = torch.full((), NOT_REFUSED, dtype=torch.int64, device=device)
        self.names = None            # the step's loss terms, in order
        self.first_bad_terms = None  # which of them were non-finite at the first refused step
        for optimizer in self.optimizers:
            if not optimizer.defaults.get("fused"):
                raise ValueError(f"{type(optimizer).__name__} without fused=True ignores found_inf: a refused "
                                 f"step would be applied")
            optimizer.found_inf = self.refused

    def at_iteration(self, iteration):
        """The iteration the next check belongs to (a fill on the device, before the step)."""
        self.iteration.fill_(iteration)

    def __call__(self, losses):
        bad = nonfinite_terms(losses)
        step_bad = bad.any().to(torch.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One rank's non-finite loss refuses the step everywhere (asynchronous, like DDP's own reduce).
            torch.distributed.all_reduce(step_bad, op=torch.distributed.ReduceOp.MAX)
        names = tuple(losses)
        if names != self.names:  # the first step (eager): the terms are the same at every later one
            self.names = names
            self.first_bad_terms = torch.zeros(len(names), dtype=torch.bool, device=bad.device)
        first = (step_bad > 0) & (self.refused == 0)
        self.first_refused_iteration.copy_(torch.where(first, self.iteration, self.first_refused_iteration))
        self.first_bad_terms.copy_(torch.where(first, bad, self.first_bad_terms))
        self.refused.copy_(torch.maximum(self.refused, step_bad))

    def raise_if_refused(self):
        """NonFiniteLossError (with ``.iteration``, the first refused one) if any step so far was refused."""
        iteration = int(self.first_refused_iteration)
        if iteration == NOT_REFUSED:
            return
        error = NonFiniteLossError(refused_terms(self.names, self.first_bad_terms.tolist()))
        error.iteration = iteration
        raise error


def learning_rates_on_device(optimizers, device):
    """Each param group's learning rate as a float32 tensor on ``device``, filled in place from then on
    (``engine.optim.set_lr``): a captured optimizer step reads it from its address."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


class CudaGraphCapture:
    """``capture(function) -> replay``: the CUDA graph of one call of ``function`` (not run by the
    capture), and a callable that launches it. ``stream``: the stream the warm-up ran on (per-stream
    library state such as cuBLAS workspaces is then made before the capture, not during it)."""

    def __init__(self, stream=None):
        self.stream = stream

    def __call__(self, function):
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            # A capture on another device or stream than the step's kernels records nothing, and
            # torch only warns: every replay would then train nothing.
            warnings.filterwarnings("error", message="The CUDA Graph is empty")
            # thread_local: the DataLoader's pin-memory thread keeps calling CUDA while the step is
            # captured, which the default (global) mode would refuse.
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                function()
        return graph.replay


def _static_copy(batches):
    return {domain: {key: value.clone() if torch.is_tensor(value) else value for key, value in batch.items()}
            for domain, batch in batches.items()}


def _shapes(batches):
    return {(domain, key): (tuple(value.shape), value.dtype) for domain, batch in batches.items()
            for key, value in batch.items() if torch.is_tensor(value)}


class GraphedStep:
    """The Trainer's ``step_fn``: ``step`` (with ``finite_check``, a DeferredFiniteCheck, as its
    finiteness check) run eagerly for ``warmup_steps`` steps, then captured once and replayed. The
    optimizers it prepares for the capture are the check's, on the check's device.

    ``capture`` makes the graph (``CudaGraphCapture``; the tests pass a stand-in that calls the
    function again at each replay, which checks everything around the graph on the CPU).
    A batch of other shapes than the captured one (none in the scripts: their crops are fixed) runs
    eagerly, with a warning.

    The graph reads every tensor at the address it had in the capture: the parameters, gradients and
    optimizer states, the learning-rate tensors (so nothing may replace them later, e.g. a
    ``load_state_dict``: the Trainer resumes before the first step), and the cached resize matrices
    and axis tables (their caches hold far more sizes than a run uses, so none is evicted)."""

    def __init__(self, step, finite_check, precision, warmup_steps=WARMUP_STEPS, capture=None):
        self.step = step
        self.finite_check = finite_check
        self.optimizers = finite_check.optimizers
        self.device = finite_check.refused.device
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.replay = None
        self.static_batches = self.static_losses = self._static_shapes = None
        precision.autocast_cache = False  # a cached weight cast would be captured once, then stale
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.capture = capture or CudaGraphCapture(self._side_stream)

    def _on_side_stream(self):
        """torch's rule for what runs before a capture: on a side stream that waits for the default one."""
        if self._side_stream is None:
            return contextlib.nullcontext()
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._side_stream)

    def _rejoin(self):
        if self._side_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)

    def _eager(self, batches, iteration):
        with self._on_side_stream():
            losses = self.step(batches, iteration)
        self._rejoin()
        return losses

    def _capture(self, batches, iteration):
        learning_rates_on_device(self.optimizers, self.device)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                if "capturable" in group:
                    group["capturable"] = True
            optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
        self.static_batches = _static_copy(batches)
        self._static_shapes = _shapes(batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

        def captured():
            self.static_losses = self.step(self.static_batches, iteration)
        self.replay = self.capture(captured)

    def __call__(self, batches, iteration):
        self.finite_check.at_iteration(iteration)
        if self.replay is None and self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            return self._eager(batches, iteration)
        if self.replay is None:
            self._capture(batches, iteration)
        elif _shapes(batches) != self._static_shapes:
            warnings.warn(f"iteration {iteration}: a batch of other shapes than the captured step's runs "
                          f"eagerly", stacklevel=2)
            with warnings.catch_warnings():  # capturable optimizers warn when they step uncaptured
                warnings.simplefilter("ignore")
                return self._eager(batches, iteration)
        else:
            for domain, batch in batches.items():
                for key, value in batch.items():
                    if torch.is_tensor(value):
                        self.static_batches[domain][key].copy_(value, non_blocking=True)
        self.replay()
        # Copies: the graph's outputs are overwritten by the next replay.
        return {name: value.clone() for name, value in self.static_losses.items()}
