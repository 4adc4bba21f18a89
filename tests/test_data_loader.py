"""SequenceShardLoader: every token of an epoch is read once, by the right (dp, sp) rank, and no
rank reads outside its slice; seeded order; exact resume; clear errors.

The synthetic token file stores token value i at position i (uint32), so a batch tells exactly which
file positions a rank read. The expected ownership is computed independently from the rule in
INTERFACES.md: window w covers positions [w*seq_len, (w+1)*seq_len); position p of window w belongs
to sp rank (p - w*seq_len) // (seq_len // sp_size).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_dist.data import SequenceShardLoader, TokenFile, write_token_file


def positional_token_file(tmp_path, num_tokens: int) -> TokenFile:
    # vocab above 65536 forces uint32 so that every position fits its own value
    return write_token_file(tmp_path / f"positions_{num_tokens}.bin", np.arange(num_tokens),
                            vocab_size=1 << 20, eod_id=(1 << 20) - 1)


class RecordingTokens:
    """Wraps the memmap and records every index used to read it."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, index):
        assert isinstance(index, slice) and index.step is None, f"unexpected read {index!r}"
        self.reads.append((index.start, index.stop))
        return self.tokens[index]


def make_loaders(token_file, dp_size, sp_size, **kwargs):
    return {
        (dp_rank, sp_rank): SequenceShardLoader(token_file, dp_rank=dp_rank, dp_size=dp_size,
                                                sp_rank=sp_rank, sp_size=sp_size, **kwargs)
        for dp_rank in range(dp_size) for sp_rank in range(sp_size)
    }


def check_one_epoch(token_file, *, seq_len, dp_size, sp_size, micro_batch_size, seed=0, epoch_offset=0):
    loaders = make_loaders(token_file, dp_size, sp_size, seq_len=seq_len,
                           micro_batch_size=micro_batch_size, seed=seed)
    recorders = {}
    for rank, loader in loaders.items():
        recorders[rank] = RecordingTokens(token_file.tokens)
        loader.token_file = _with_tokens(token_file, recorders[rank])
        loader.epoch = epoch_offset
    local = seq_len // sp_size
    any_loader = loaders[(0, 0)]
    read_count = np.zeros(token_file.num_tokens, dtype=np.int64)
    windows_seen: list[int] = []
    for step in range(any_loader.steps_per_epoch):
        step_windows = {}
        for (dp_rank, sp_rank), loader in loaders.items():
            batch = next(loader)
            inputs, labels, positions = batch["input_ids"], batch["labels"], batch["positions"]
            assert inputs.shape == labels.shape == (micro_batch_size, local)
            assert inputs.dtype == labels.dtype == positions.dtype == torch.int64
            assert torch.equal(labels, inputs + 1)  # the next token (value == file position)
            for row in inputs.numpy():
                window, offset = divmod(int(row[0]), seq_len)
                # positions are global within the window, and the slice is this sp rank's own
                assert torch.equal(positions, torch.as_tensor(row - window * seq_len))
                assert offset // local == sp_rank and offset % local == 0
                np.testing.assert_array_equal(row, np.arange(row[0], row[0] + local))
                read_count[row] += 1
                step_windows.setdefault(dp_rank, set()).add(window)
        # dp replicas hold disjoint windows; all sp ranks of a replica the same windows
        all_windows = [w for ws in step_windows.values() for w in ws]
        assert len(all_windows) == len(set(all_windows)) == dp_size * micro_batch_size
        windows_seen += all_windows
    # the epoch is over: the next batch belongs to the next epoch
    assert loaders[(0, 0)].state_dict()["step_in_epoch"] == any_loader.steps_per_epoch
    used = np.zeros_like(read_count)
    for window in windows_seen:
        used[window * seq_len:(window + 1) * seq_len] = 1
    np.testing.assert_array_equal(read_count, used)  # every token of the used windows exactly once
    assert len(windows_seen) == len(set(windows_seen)) == any_loader.samples_per_epoch
    # each rank touched the memmap only for its own slice (+1 label token)
    for (dp_rank, sp_rank), recorder in recorders.items():
        assert len(recorder.reads) == any_loader.steps_per_epoch * micro_batch_size
        for lo, hi in recorder.reads:
            window, offset = divmod(lo, seq_len)
            assert offset == sp_rank * local and hi - lo == local + 1
    return windows_seen


def _with_tokens(token_file, tokens):
    clone = TokenFile(token_file.path)
    clone._tokens = tokens
    return clone


@pytest.mark.parametrize("dp_size, sp_size, seq_len, micro_batch_size",
                         [(2, 2, 16, 1), (3, 4, 32, 2), (1, 1, 8, 3), (1, 8, 64, 1)])
def test_every_token_read_once_by_the_right_rank(tmp_path, dp_size, sp_size, seq_len, micro_batch_size):
    token_file = positional_token_file(tmp_path, 1000)  # not a multiple: last window incomplete
    check_one_epoch(token_file, seq_len=seq_len, dp_size=dp_size, sp_size=sp_size,
                    micro_batch_size=micro_batch_size)


@settings(max_examples=25, deadline=None)
@given(dp_size=st.integers(1, 3), sp_size=st.sampled_from([1, 2, 4]), local=st.integers(1, 6),
       micro_batch_size=st.integers(1, 3), extra=st.integers(0, 200), seed=st.integers(0, 5),
       epoch=st.integers(0, 3))
def test_every_token_read_once_property(tmp_path_factory, dp_size, sp_size, local, micro_batch_size,
                                        extra, seed, epoch):
    seq_len = local * sp_size
    num_tokens = dp_size * micro_batch_size * seq_len + 1 + extra  # at least one step
    token_file = positional_token_file(tmp_path_factory.mktemp("prop"), num_tokens)
    check_one_epoch(token_file, seq_len=seq_len, dp_size=dp_size, sp_size=sp_size,
                    micro_batch_size=micro_batch_size, seed=seed, epoch_offset=epoch)


def test_counts_drop_incomplete_windows_and_batches(tmp_path):
    token_file = positional_token_file(tmp_path, 100)
    # 99 usable tokens -> 6 windows of 16 (the 7th lacks tokens); global batch 4 -> 1 step, 4 samples
    loader = SequenceShardLoader(token_file, seq_len=16, micro_batch_size=2, dp_size=2, dp_rank=1)
    assert (loader.num_windows, loader.steps_per_epoch, loader.samples_per_epoch) == (6, 1, 4)
    # a window whose label token is missing is dropped: 97 tokens give 6 windows, 96 give 5
    assert SequenceShardLoader(positional_token_file(tmp_path, 97), seq_len=16, micro_batch_size=1).num_windows == 6
    assert SequenceShardLoader(positional_token_file(tmp_path, 96), seq_len=16, micro_batch_size=1).num_windows == 5


def collect(loader, steps):
    return [next(loader)["input_ids"].clone() for _ in range(steps)]


def test_same_seed_same_order_and_epochs_reshuffle(tmp_path):
    token_file = positional_token_file(tmp_path, 4001)
    kwargs = dict(seq_len=16, micro_batch_size=2, dp_size=2, dp_rank=1, sp_size=2, sp_rank=1)
    first = SequenceShardLoader(token_file, seed=7, **kwargs)
    second = SequenceShardLoader(token_file, seed=7, **kwargs)
    steps = first.steps_per_epoch
    epoch_0 = collect(first, steps)
    epoch_1 = collect(first, steps)
    assert all(torch.equal(a, b) for a, b in zip(epoch_0, collect(second, steps)))
    assert not all(torch.equal(a, b) for a, b in zip(epoch_0, epoch_1))
    other_seed = collect(SequenceShardLoader(token_file, seed=8, **kwargs), steps)
    assert not all(torch.equal(a, b) for a, b in zip(epoch_0, other_seed))
    assert first.epoch == 1


@pytest.mark.parametrize("stop_after", [0, 5, 62, 63, 64, 130])  # 62 steps per epoch: around the edge
def test_resume_reproduces_the_remaining_batches(tmp_path, stop_after):
    token_file = positional_token_file(tmp_path, 4001)
    kwargs = dict(seq_len=16, micro_batch_size=2, dp_size=2, dp_rank=0, sp_size=2, sp_rank=1, seed=3)
    uninterrupted = SequenceShardLoader(token_file, **kwargs)
    assert uninterrupted.steps_per_epoch == 62
    expected = collect(uninterrupted, stop_after + 70)[stop_after:]
    stopped = SequenceShardLoader(token_file, **kwargs)
    collect(stopped, stop_after)
    state = stopped.state_dict()
    resumed = SequenceShardLoader(token_file, **kwargs)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, collect(resumed, 70)))


def test_resume_with_another_dp_sp_split_of_the_same_global_batch(tmp_path):
    # dp 2 x mb 2 and dp 1 x mb 4 visit the same windows per step; the position carries over
    token_file = positional_token_file(tmp_path, 2001)
    two = [SequenceShardLoader(token_file, seq_len=16, micro_batch_size=2, dp_size=2, dp_rank=r) for r in (0, 1)]
    for loader in two:
        collect(loader, 3)
    one = SequenceShardLoader(token_file, seq_len=16, micro_batch_size=4, sp_size=4, sp_rank=0)
    one.load_state_dict(two[0].state_dict())
    merged = torch.cat([next(loader)["input_ids"][:, 0] for loader in two])
    assert torch.equal(merged, next(one)["input_ids"][:, 0])


def test_resume_refuses_a_changed_setup(tmp_path):
    token_file = positional_token_file(tmp_path, 2001)
    state = SequenceShardLoader(token_file, seq_len=16, micro_batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"seed \(data.shuffle_seed\): 1 in the checkpoint, 2 now; global_batch "
                                         r"\(data.micro_batch_size x data-parallel size\): 2 in the checkpoint, 3 now"):
        SequenceShardLoader(token_file, seq_len=16, micro_batch_size=3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"position of run/step_2, .*: seq_len \(data.seq_len\): 16 in run/step_2, 8"):
        SequenceShardLoader(token_file, seq_len=8, micro_batch_size=2, seed=1).check_resumable(state, "run/step_2")
    SequenceShardLoader(token_file, seq_len=16, micro_batch_size=1, dp_size=2, seed=1).check_resumable(state)
    SequenceShardLoader(token_file, seq_len=16, micro_batch_size=3, seed=2).check_resumable(None)  # nothing recorded


def test_validation_pass_is_fixed_and_finite(tmp_path):
    token_file = positional_token_file(tmp_path, 1001)
    loader = SequenceShardLoader(token_file, seq_len=10, micro_batch_size=3, dp_size=2, dp_rank=1, shuffle=False)
    next(loader)  # training-style iteration does not move the evaluation pass
    batches = list(loader.iter_epoch())
    assert len(batches) == loader.steps_per_epoch == 16  # 99 windows // (2 x 3)
    # unshuffled: step s, replica 1 takes windows (2s + 1) * 3 .. (2s + 1) * 3 + 2, in file order
    starts = torch.stack([b["input_ids"][:, 0] for b in batches])
    expected = torch.tensor([[((2 * s + 1) * 3 + i) * 10 for i in range(3)] for s in range(16)])
    assert torch.equal(starts, expected)
    assert len(list(loader.iter_epoch(max_steps=4))) == 4
    again = list(loader.iter_epoch(max_steps=4))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_errors_name_the_bad_value(tmp_path):
    token_file = positional_token_file(tmp_path, 100)
    with pytest.raises(ValueError, match=r"seq_len=30 is not divisible by sp_size=4.*\[1, 2, 3, 5, 6, 10, 15, 30\]"):
        SequenceShardLoader(token_file, seq_len=30, micro_batch_size=1, sp_size=4)
    with pytest.raises(ValueError, match=r"has 100 tokens; one sample of seq_len=100 needs 101"):
        SequenceShardLoader(token_file, seq_len=100, micro_batch_size=1)
    with pytest.raises(ValueError, match=r"gives 3 windows.*dp_size=2 x micro_batch_size=2 = 4"):
        SequenceShardLoader(token_file, seq_len=32, micro_batch_size=2, dp_size=2)
    with pytest.raises(ValueError, match=r"sp_rank=2: expected an integer in \[0, 2\)"):
        SequenceShardLoader(token_file, seq_len=8, micro_batch_size=1, sp_size=2, sp_rank=2)
    with pytest.raises(ValueError, match=r"dp_rank=-1"):
        SequenceShardLoader(token_file, seq_len=8, micro_batch_size=1, dp_rank=-1)
    with pytest.raises(ValueError, match=r"micro_batch_size=0: expected an integer >= 1"):
        SequenceShardLoader(token_file, seq_len=8, micro_batch_size=0)
