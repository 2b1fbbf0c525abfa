"""What a run reports: logged loss means, TensorBoard events, console lines (the real Trainer, in process)."""
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from utils.data import BatchStream
from utils.trainer import Trainer


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"x": torch.full((2,), float(index))}


def counting_trainer(output_dir, max_iters, log_every, checkpoint_every=0, logger=None, progress=False):
    """The real Trainer around a 2x2 linear layer whose step ``i`` (0-based) reports the loss ``i + 1``."""
    torch.manual_seed(0)
    network = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    def step(batches, iteration):
        optimizer.zero_grad()
        network(batches["numbers"]["x"]).sum().backward()
        optimizer.step()
        return {"loss": torch.tensor(float(iteration + 1))}

    return Trainer(args=SimpleNamespace(seed=0, progress=progress), output_dir=output_dir,
                   device=torch.device("cpu"), networks={"model": network}, optimizers={"model": (optimizer, 0.1)},
                   scalers={}, streams={"numbers": BatchStream(_Numbers(), 2)}, step_fn=step, max_iters=max_iters,
                   log_every=log_every, checkpoint_every=checkpoint_every, logger=logger)


def logged(run):
    return {record["iteration"]: record["loss"] for record in
            map(json.loads, (Path(run) / "losses.jsonl").read_text().splitlines())}


# ----------------------------------------------------------------------------------- item 4
def test_each_logged_loss_is_the_mean_of_the_steps_of_its_window(tmp_path):
    """Steps report 1, 2, 3, 4, 5; --log-every 2 logs the means of (1, 2), (3, 4) and the last, partial
    window (5) alone: 5.0, not 5 / 2 as when every window was divided by log_every."""
    counting_trainer(tmp_path, max_iters=5, log_every=2).run()
    assert logged(tmp_path) == {2: 1.5, 4: 3.5, 5: 5.0}


def test_the_first_window_after_a_resume_is_the_mean_of_the_steps_it_ran(tmp_path):
    """Stopped at 3 (its checkpoint), resumed with --log-every 4: iteration 4 logs step 4 alone (4.0)
    and iteration 6 the mean of 5 and 6 (5.5)."""
    counting_trainer(tmp_path, max_iters=3, log_every=4).run()
    resumed = counting_trainer(tmp_path, max_iters=6, log_every=4)
    resumed.resume(tmp_path / "last.pth")
    resumed.run()
    assert logged(tmp_path) == {3: 2.0, 4: 4.0, 6: 5.5}


# ----------------------------------------------------------------------------------- item 7
def test_tensorboard_events_reach_the_disk_at_each_log_window(tmp_path):
    """What a SIGKILL would leave: while step 4 runs, the event file already holds iterations 1..3
    (it was 0 bytes when events were only flushed at the end or every 120 s)."""
    from utils.logger import RunLogger

    logger = RunLogger(tmp_path / "tensorboard", tensorboard=True)
    trainer = counting_trainer(tmp_path, max_iters=5, log_every=1, logger=logger)
    on_disk = {}
    real_step = trainer.step_fn

    def step(batches, iteration):
        if iteration == 3:
            on_disk["bytes"] = b"".join(path.read_bytes() for path in (tmp_path / "tensorboard").glob("events.*"))
        return real_step(batches, iteration)

    trainer.step_fn = step
    trainer.run()
    logger.close()
    assert on_disk["bytes"].count(b"train/loss") == 3
