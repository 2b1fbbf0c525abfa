import torch

from engine.data import BatchStream, EpochSampler, ShardedEvalSampler


class _Numbers(torch.utils.data.Dataset):
    """Sample i returns i and a random draw, so augmentation randomness is visible."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return {"index": index, "noise": torch.rand(())}


def _take(stream, count):
    return [next(stream) for _ in range(count)]


def test_stream_is_a_pure_function_of_seed_and_position():
    straight = _take(BatchStream(_Numbers(), batch_size=3, seed=5), 7)  # crosses epoch boundaries (3 batches/epoch)
    resumed = BatchStream(_Numbers(), batch_size=3, seed=5)
    resumed.seek(4)
    for expected, got in zip(straight[4:], _take(resumed, 3)):
        assert torch.equal(expected["index"], got["index"])
        assert torch.equal(expected["noise"], got["noise"])


def test_epochs_reshuffle_and_drop_the_incomplete_batch():
    stream = BatchStream(_Numbers(), batch_size=3, seed=0)
    first, second = [torch.cat([b["index"] for b in _take(stream, 3)]) for _ in range(2)]
    assert len(set(first.tolist())) == 9 and len(set(second.tolist())) == 9
    assert not torch.equal(first, second)


def test_two_ranks_see_exactly_the_samples_of_one_process_with_the_double_batch():
    single = list(EpochSampler(10, batch_size=4, seed=1, rank=0, world_size=1))
    rank0 = list(EpochSampler(10, batch_size=2, seed=1, rank=0, world_size=2))
    rank1 = list(EpochSampler(10, batch_size=2, seed=1, rank=1, world_size=2))
    for step in range(2):
        merged = rank0[2 * step: 2 * step + 2] + rank1[2 * step: 2 * step + 2]
        assert merged == single[4 * step: 4 * step + 4]  # same indices and same augmentation seeds


def test_global_rng_untouched_by_loading_in_the_main_process():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _take(BatchStream(_Numbers(), batch_size=2, seed=0), 2)
    assert torch.equal(torch.rand(3), expected)


def test_sharded_eval_sampler_covers_every_image_once():
    shards = [list(ShardedEvalSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
