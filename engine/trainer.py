"""The one training loop: iterations, learning-rate schedule, logging, validation, checkpoints.

Every training script (supervised, adversarial, MPL) builds its networks, optimizers and data
streams and hands the loop a ``step_fn``; everything around the step lives here once:

* poly learning rate for each optimizer, set from the iteration before each step;
* losses kept on the device and synchronised only every ``log_every`` iterations;
* validation every ``val_every`` iterations, ``best.pth`` on a new best mIoU, ``metrics.json``;
* ``last.pth`` every ``checkpoint_every`` iterations and at the end, written atomically, holding
  the unwrapped networks, optimizers, scalers, iteration, best score, history and RNG states, so
  ``--resume`` continues exactly (same later losses on the CPU);
* SIGINT/SIGTERM finish the current step, write a checkpoint and exit non-zero;
* under torchrun an iteration is one *global* step (batch size x processes samples per domain):
  the streams, the LR schedule and ``max_iters`` all count global steps, logged losses are means
  over all ranks, only rank 0 writes files, and a checkpoint resumes on any number of processes
  (the same global batch continues the same sample order);
* a non-finite loss stops the run naming the iteration and term (the last checkpoint stays as it
  was); under fp16 loss scaling such steps are skipped and counted instead, as GradScaler does,
  until too many come in a row, and a skipped step leaves the networks' buffers (BatchNorm
  statistics) as they were before it. A step checked on the device (``finite_check``, a
  ``engine.cuda_graph.DeferredFiniteCheck``: --cuda-graph) refuses its update and every later one
  there; the loop stops with the same error at its next sync (log window, validation, checkpoint),
  naming the first refused iteration, and writes nothing.
"""
import contextlib
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from dataset.common import data_report
from dataset.labels import CLASS_NAMES
from utils.checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_torch_save, load_checkpoint_file
from utils.files import atomic_link, remove_stale_temporaries
from engine.data import to_device
from utils.distributed import all_reduce_max, all_reduce_mean, barrier, get_world_size, is_main_process
from engine.steps import NonFiniteLossError, buffers_restored_on_refusal
from utils.logger import git_commit, plain_args, write_json, write_run_info, write_text
from engine.metrics import scores_to_json
from engine.optim import poly_lr, portable_state_dict, set_lr
from utils.seed import rng_state, set_rng_state
from utils.errors import UserError

LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
METRICS_FILE = "metrics.json"
LOSS_LOG_FILE = "losses.jsonl"  # one JSON line per logging step: iteration, mean losses, learning rates
MAX_CONSECUTIVE_SKIPPED = 20
# The flag that sets each entry of a network's config (model.model_config, discriminator config).
CONFIG_FLAGS = {"context_path": "--context-path", "num_classes": "--num-classes",
                "input_convention": "--input-convention", "name": "--discriminator"}


MAX_BAR_LOSSES = 4  # loss fields on the progress bar (MPL has 18 terms); every term goes to losses.jsonl


def progress_fields(means, rates):
    """The progress bar's postfix: the first MAX_BAR_LOSSES mean losses and the first learning rate."""
    fields = {name: f"{value:.3f}" for name, value in list(means.items())[:MAX_BAR_LOSSES]}
    fields.update({f"lr_{name}": f"{value:.1e}" for name, value in list(rates.items())[:1]})
    return fields


def class_iou_tags(iou):
    """{'iou_00_road': ..., ...}: per-class TensorBoard tags that sort by train id and name the class."""
    values = list(iou.values()) if isinstance(iou, dict) else list(iou)
    names = CLASS_NAMES if len(values) == len(CLASS_NAMES) else [None] * len(values)
    return {f"iou_{index:02d}" + (f"_{name.replace(' ', '_')}" if name else ""): value
            for index, (name, value) in enumerate(zip(names, values))}


def loss_line(iteration, max_iters, means, rates):
    """The console line of a log window when no progress bar shows (--no-progress, output to a file)."""
    values = [f"{name} {value:.4f}" for name, value in means.items()]
    values += [f"lr_{name} {value:.2e}" for name, value in rates.items()]
    return f"[train] iteration {iteration}/{max_iters}: {', '.join(values)}"


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (non-finite loss, too many skipped steps); the message says why."""


class TrainingInterrupted(SystemExit):
    """Raised after SIGINT/SIGTERM once the checkpoint is written; ``str()`` is the message (printed
    to stderr before raising) and the process exits with 128 + signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum
        self.code = 128 + signum  # what the interpreter exits with


class Trainer:
    def __init__(self, *, args, output_dir, device, networks, optimizers, scalers, streams, step_fn,
                 validate_fn=None, max_iters, val_every=0, log_every=10, checkpoint_every=0,
                 logger=None, configs=None, lr_power=0.9, fp16_skipping=False, image_fn=None, finite_check=None):
        self.args = args
        self.output_dir = Path(output_dir)
        self.device = device
        self.networks = networks          # name -> unwrapped nn.Module (what checkpoints hold)
        self.optimizers = optimizers      # name -> (optimizer, base learning rate)
        self.scalers = scalers            # name -> GradScaler
        self.streams = streams            # name -> BatchStream
        self.step_fn = step_fn            # (batches, iteration) -> dict of detached loss tensors
        self.validate_fn = validate_fn    # iteration -> {name: scores}; the first name ranks "best"
        self.image_fn = image_fn          # iteration -> {tag: [HxWx3 uint8]} for the logger
        self.configs = configs or {}
        self.max_iters = max_iters
        self.val_every = val_every
        self.log_every = max(1, log_every)
        self.checkpoint_every = checkpoint_every
        self.logger = logger
        self.lr_power = lr_power
        self.fp16_skipping = fp16_skipping
        self.finite_check = finite_check  # a DeferredFiniteCheck the step checks its losses with, or None
        self.iteration = 0
        self.best_score = -math.inf
        self.history = []
        self.skipped_steps = 0
        self._stop_signal = None
        self._resumed = False
        self._saved = None  # (iteration, path) of the last checkpoint written: it holds the state until the next step

    # ----------------------------------------------------------------- checkpoints
    def state(self):
        state = {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "best_miou": self.best_score if math.isfinite(self.best_score) else None,
            "history": self.history,
            "skipped_steps": self.skipped_steps,
            "optimizers": {name: portable_state_dict(optimizer) for name, (optimizer, _) in self.optimizers.items()},
            "scalers": {name: scaler.state_dict() for name, scaler in self.scalers.items()},
            "rng": rng_state(),
            "world_size": get_world_size(),
            "global_batch_sizes": self._global_batch_sizes(),
            "args": plain_args(self.args),
            "git_commit": git_commit(),
        }
        for name, network in self.networks.items():
            state[name] = network.state_dict()
            if name in self.configs:
                state[f"{name}_config"] = self.configs[name]
        return state

    def _global_batch_sizes(self):
        return {name: stream.sampler.batch_size * stream.sampler.world_size for name, stream in self.streams.items()}

    def save(self, filename):
        """Write the state as ``filename``; a second checkpoint of the same iteration (``last.pth``
        right after a new ``best.pth``) links the file already written instead of writing it again."""
        self._raise_if_refused()  # a refused step's networks are never saved
        if is_main_process():
            path = self.output_dir / filename
            if self._saved is not None and self._saved[0] == self.iteration and self._saved[1].is_file():
                if self._saved[1] != path:
                    atomic_link(self._saved[1], path)
            else:
                atomic_torch_save(self.state(), path)
            self._saved = (self.iteration, path)
            self._flush_logger()
        barrier()

    def _flush_logger(self):
        """Put the logged events on disk: a killed run keeps its curves up to its last log window."""
        if self.logger is not None:
            self.logger.flush()

    def resume(self, path):
        """Restore everything from a checkpoint written by ``save`` and seek the data streams."""
        checkpoint = load_checkpoint_file(path, map_location=self.device)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT or "iteration" not in checkpoint:
            raise CheckpointError(f"{path} is not a training checkpoint of this project (no 'format': "
                                  f"{CHECKPOINT_FORMAT!r} and 'iteration'); --resume needs a last.pth/best.pth")
        missing = [name for name in self.networks if name not in checkpoint]
        missing += [f"optimizers/{name}" for name in self.optimizers if name not in checkpoint.get("optimizers", {})]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}: it was written by another kind of run "
                                  f"than the flags ask (e.g. another --discriminator)")
        self._check_configs(path, checkpoint)
        for name, network in self.networks.items():
            try:
                network.load_state_dict(checkpoint[name])
            except RuntimeError as error:
                details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
                more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
                raise CheckpointError(f"{path}: the stored {name!r} does not fit the network the flags build "
                                      f"(another --context-path or number of classes?): {details[0]}{more}") from None
        for name, (optimizer, _) in self.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        for name, scaler in self.scalers.items():
            if name in checkpoint.get("scalers", {}):
                scaler.load_state_dict(checkpoint["scalers"][name])
        self.iteration = int(checkpoint["iteration"])
        best = checkpoint.get("best_miou")
        self.best_score = -math.inf if best is None else float(best)
        self.history = list(checkpoint.get("history", []))
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        set_rng_state(checkpoint["rng"])
        self._resumed = True
        print(f"[resume] {path}: continuing at iteration {self.iteration}/{self.max_iters}")
        self._check_global_batch(path, checkpoint)

    def _check_configs(self, path, checkpoint):
        """Refuse a checkpoint whose networks were built with other settings than the flags ask now."""
        for name, config in self.configs.items():
            stored = checkpoint.get(f"{name}_config")
            if not isinstance(stored, dict) or not isinstance(config, dict):
                continue
            differing = [key for key in config if key in stored and stored[key] != config[key]]
            if differing:
                described = ", ".join(f"{CONFIG_FLAGS.get(key, key)} {stored[key]} (now {config[key]})"
                                      for key in differing)
                raise CheckpointError(f"{path} holds a {name!r} network built with {described}: resume with the "
                                      f"flags of the run that wrote it, or start a new run in another --output-dir")

    def _check_global_batch(self, path, checkpoint):
        """A different process count is fine; a different global batch changes the run (warn)."""
        stored_world = checkpoint.get("world_size", 1)
        if stored_world != get_world_size():
            print(f"[resume] written by {stored_world} process(es), continuing on {get_world_size()}")
        stored = checkpoint.get("global_batch_sizes")
        now = self._global_batch_sizes()
        if stored is not None and stored != now:
            warnings.warn(f"{path} was trained with global batches {stored}, this run uses {now} (batch size x "
                          f"processes): the iteration count and LR schedule continue, but the epochs and the "
                          f"sample order differ from the original run. Keep batch size x processes equal to "
                          f"continue it exactly.", stacklevel=2)

    def _truncate_loss_log(self):
        """Drop loss-log lines written after the checkpoint we resume from (a killed run's tail)."""
        path = self.output_dir / LOSS_LOG_FILE
        if not is_main_process() or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["iteration"] <= self.iteration]
        write_text(path, "".join(line + "\n" for line in kept))

    def _append_loss_log(self, record):
        if is_main_process():
            with open(self.output_dir / LOSS_LOG_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------- signals
    def _request_stop(self, signum, frame):
        if self._stop_signal is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self._stop_signal = signum
        # tqdm.write clears the progress bar first, so the message gets a line of its own.
        tqdm.write(f"[signal] {signal.Signals(signum).name} received: finishing the current step, then saving a "
                   f"checkpoint")

    def _stop_requested(self):
        """Whether to stop now; under torchrun every rank decides together (a signal reaches the
        ranks at slightly different times, and a rank saving alone would wait for the others forever)."""
        signum = all_reduce_max(self._stop_signal or 0, self.device)
        if signum and self._stop_signal is None:
            self._stop_signal = signum
        return bool(signum)

    def _install_signal_handlers(self):
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, self._request_stop)
            except ValueError:  # not the main thread
                pass
        return previous

    # ----------------------------------------------------------------- loop
    def _set_learning_rates(self):
        rates = {}
        for name, (optimizer, base_lr) in self.optimizers.items():
            rates[name] = poly_lr(base_lr, self.iteration, self.max_iters, self.lr_power)
            set_lr(optimizer, rates[name])
        return rates

    def _raise_if_refused(self):
        """With a device-side finiteness check: stop if a step since the last sync was refused."""
        if self.finite_check is None:
            return
        try:
            self.finite_check.raise_if_refused()
        except NonFiniteLossError as error:
            raise TrainingError(self._non_finite_message(error.iteration, error)
                                + " (the steps after it were not applied either)") from None

    def _non_finite_message(self, iteration, error):
        return (f"iteration {iteration}: {error}. The run stops here; the last good checkpoint "
                f"({self.output_dir / LAST_CHECKPOINT}) was left as it was. Lower the learning rate or check "
                f"the data of this step")

    def _validate(self):
        if self.validate_fn is None:
            return
        self._raise_if_refused()
        results = self.validate_fn(self.iteration)
        record = {"iteration": self.iteration, "scores": {name: scores_to_json(scores) for name, scores in results.items()}}
        self.history.append(record)
        primary = next(iter(results.values()))["miou"]
        summary = ", ".join(f"{name} mIoU {100 * scores['miou']:.2f}" for name, scores in results.items())
        tqdm.write(f"[val] iteration {self.iteration}: {summary}")
        if self.logger is not None:
            for name, scores in results.items():
                self.logger.scalars({"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"]}, self.iteration, prefix=f"val/{name}/")
                self.logger.scalars(class_iou_tags(scores["iou"]), self.iteration, prefix=f"val_class/{name}/")
            if self.image_fn is not None and is_main_process():
                for tag, images in self.image_fn(self.iteration).items():
                    self.logger.images(tag, images, self.iteration)
        if is_main_process():
            write_json(self.output_dir / METRICS_FILE, {"history": self.history, "best_miou": max(self.best_score, primary)})
        if primary > self.best_score:
            self.best_score = primary
            self.save(BEST_CHECKPOINT)

    def _check_output_dir(self):
        """Drop temporaries a killed save left behind. (A fresh run into a folder holding a run is refused
        before this, by cli.run.claim_output_dir.)"""
        if not is_main_process():
            return
        for filename in (LAST_CHECKPOINT, BEST_CHECKPOINT):
            if remove_stale_temporaries(self.output_dir / filename):
                print(f"[run] removed the unfinished temporary file(s) of {self.output_dir / filename} "
                      f"left by a killed save")

    def _report_data(self):
        for name, stream in self.streams.items():
            dataset = getattr(stream, "dataset", None)
            line = data_report(dataset) if hasattr(dataset, "stats") else None
            if line and is_main_process():
                tqdm.write(line)

    def run(self):
        """Train until ``max_iters``; return the final history record (or None without validation)."""
        self._check_output_dir()
        for stream in self.streams.values():
            stream.seek(self.iteration)
        self._truncate_loss_log()  # a fresh run starts a new log; a resumed one drops a killed run's tail
        previous_handlers = self._install_signal_handlers()
        first_iteration = self.iteration
        if is_main_process():  # here, not at start-up: a run that fails to start leaves no run_info.json
            write_run_info(self.output_dir, self.args, {"device": str(self.device), "world_size": get_world_size()})
        running, summed_steps = {}, 0  # loss sums of the current logging window, and how many steps they hold
        consecutive_skips = 0
        progress = tqdm(total=self.max_iters, initial=self.iteration, desc="train", dynamic_ncols=True,
                        disable=not (is_main_process() and getattr(self.args, "progress", True)))
        started = time.perf_counter()
        try:
            while self.iteration < self.max_iters:
                rates = self._set_learning_rates()
                batches = {name: to_device(next(stream), self.device) for name, stream in self.streams.items()}
                # A skipped step (fp16) leaves every buffer as it was: the run goes on with them.
                restoring = (buffers_restored_on_refusal(self.networks.values()) if self.fp16_skipping
                             else contextlib.nullcontext())
                try:
                    with restoring:
                        losses = self.step_fn(batches, self.iteration)
                except NonFiniteLossError as error:
                    if not self.fp16_skipping:
                        raise TrainingError(self._non_finite_message(self.iteration, error) + ".") from None
                    self.skipped_steps += 1
                    consecutive_skips += 1
                    tqdm.write(f"[amp] iteration {self.iteration}: {error}; step skipped ({self.skipped_steps} so far)")
                    if consecutive_skips > MAX_CONSECUTIVE_SKIPPED:
                        raise TrainingError(f"{consecutive_skips} steps in a row had non-finite losses "
                                            f"(last at iteration {self.iteration}); stopping") from None
                    for optimizer, _ in self.optimizers.values():
                        optimizer.zero_grad(set_to_none=True)
                    self.iteration += 1
                    progress.update(1)
                    continue
                consecutive_skips = 0
                for name, value in losses.items():
                    running[name] = running.get(name, 0.0) + value
                summed_steps += 1
                self.iteration += 1
                progress.update(1)

                if self.iteration % self.log_every == 0 or self.iteration == self.max_iters:
                    self._raise_if_refused()
                    # Divide by the steps summed, not log_every: the last window of a run, the first
                    # after a resume and a window with skipped fp16 steps hold fewer.
                    means = {name: float(total) / max(1, summed_steps)
                             for name, total in all_reduce_mean(running).items()}
                    running, summed_steps = {}, 0
                    progress.set_postfix(progress_fields(means, rates), refresh=False)
                    if is_main_process() and (progress.disable or not sys.stderr.isatty()):
                        # No bar to read (--no-progress, or the output goes to a log file): a line.
                        tqdm.write(loss_line(self.iteration, self.max_iters, means, rates))
                    self._append_loss_log({"iteration": self.iteration, **means, **{f"lr_{k}": v for k, v in rates.items()}})
                    if self.logger is not None:
                        self.logger.scalars(means, self.iteration, prefix="train/")
                        self.logger.scalars(rates, self.iteration, prefix="lr/")
                        self._flush_logger()
                if self.val_every and (self.iteration % self.val_every == 0 or self.iteration == self.max_iters):
                    self._validate()
                if self.checkpoint_every and self.iteration % self.checkpoint_every == 0 and self.iteration < self.max_iters:
                    self.save(LAST_CHECKPOINT)
                if self._stop_requested():
                    self.save(LAST_CHECKPOINT)
                    name = signal.Signals(self._stop_signal).name
                    message = (f"[signal] {name}: stopped after iteration {self.iteration}; checkpoint written to "
                               f"{self.output_dir / LAST_CHECKPOINT}. Continue with --resume "
                               f"{self.output_dir / LAST_CHECKPOINT}")
                    print(message, file=sys.stderr, flush=True)
                    raise TrainingInterrupted(message, self._stop_signal)
            self.save(LAST_CHECKPOINT)
        finally:
            progress.close()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            self._flush_logger()
        elapsed = time.perf_counter() - started
        tqdm.write(f"[train] ran {self.iteration - first_iteration} iterations ({first_iteration + 1}..{self.iteration} "
                   f"of {self.max_iters}) in {elapsed:.1f} s"
                   + (f" ({self.skipped_steps} skipped non-finite steps)" if self.skipped_steps else ""))
        self._report_data()
        return self.history[-1] if self.history else None
