"""utils/benchmark.py against a fake clock: the figures are hand-computed from the time each call takes."""
import pytest
import torch

from utils import benchmark
from engine.precision import Precision


@pytest.fixture
def fake_clock(monkeypatch):
    """time.perf_counter reads this clock; only what a test's calls add to it moves it."""
    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock["now"])
    return clock


def test_time_callable_divides_each_sample_by_its_block_of_calls(fake_clock):
    def call():  # each call "takes" 2 s of the fake clock
        fake_clock["now"] += 2.0
        fake_clock["calls"] += 1

    median, samples = benchmark.time_callable(call, torch.device("cpu"), warmup=3, runs=4, calls_per_sample=5)
    assert fake_clock["calls"] == 3 + 4 * 5
    assert median == 2.0 and samples == [2.0] * 4


def test_time_callable_takes_the_median_sample(fake_clock):
    costs = iter([9.0, 1.0, 3.0, 2.0, 50.0])  # one warm-up call, then 4 timed samples of one call

    def call():
        fake_clock["now"] += next(costs)

    median, samples = benchmark.time_callable(call, torch.device("cpu"), warmup=1, runs=4)
    assert samples == [1.0, 3.0, 2.0, 50.0] and median == 2.5  # the outlier does not move it


class _FakeModel(torch.nn.Module):
    """A forward of a batch of B images "takes" 0.1 + 0.2 B seconds of the fake clock."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.batches = []

    def forward(self, images):
        self.clock["now"] += 0.1 + 0.2 * images.shape[0]
        self.batches.append(tuple(images.shape))
        return images


@pytest.mark.parametrize("batch, seconds", [(1, 0.3), (4, 0.9)])
def test_inference_throughput_reports_images_per_second_and_latency(fake_clock, batch, seconds):
    model = _FakeModel(fake_clock).train()
    result = benchmark.inference_throughput(model, torch.device("cpu"), batch, 8, 16, Precision("cpu", "off"),
                                            warmup=2, runs=3, block=5)
    assert not model.training  # timed in eval mode
    assert model.batches == [(batch, 3, 8, 16)] * (2 + 3 * 5 + 3)  # warm-up, throughput blocks, latency calls
    assert result["median_s"] == pytest.approx(seconds)
    assert result["images_per_s"] == pytest.approx(batch / seconds)  # 3.33 img/s at batch 1, 4.44 at batch 4
    assert result["latency_ms"] == pytest.approx(1000 * seconds)
    assert result["images_per_s_one_call_at_a_time"] == pytest.approx(batch / seconds)
    assert (result["batch_size"], result["height"], result["width"], result["runs"], result["block"],
            result["warmup"], result["precision"]) == (batch, 8, 16, 3, 5, 2, "off")
