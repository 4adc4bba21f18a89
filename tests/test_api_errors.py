"""Bad input to the public API: one TypeError/ValueError naming the argument, its value and what is valid,
raised before any compute (the model's parameters are never reached: no torch traceback from deep inside)."""
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from longnet_dist.attention import segment_spans
from longnet_dist.attention.sharding import spanning_ranks
from longnet_dist.distributed import SequenceGroup, init_distributed, mesh_layout, valid_sequence_parallel_sizes
from longnet_dist.generate import generate_ids
from longnet_dist.model import DenseAttention, LongNetConfig, LongNetLM
from longnet_dist.train.host_reads import HostReads

VOCAB = 50
IDS = torch.arange(16).view(2, 8) * 3  # (2, 8) ids in 0..45


def config(**overrides) -> LongNetConfig:
    settings = dict(vocab_size=VOCAB, dim=16, num_layers=1, num_heads=2, segment_lengths=[8], dilation_rates=[1])
    settings.update(overrides)
    return LongNetConfig(**settings)


@pytest.fixture(scope="module")
def model() -> LongNetLM:
    torch.manual_seed(0)
    return LongNetLM(config()).eval()


@pytest.mark.parametrize("overrides,message", [
    ({"tie_embeddings": "no"}, r"model tie_embeddings='no' must be True or False"),
    ({"tie_embeddings": 1}, r"model tie_embeddings=1 must be True or False"),
    ({"rotary_base": 0}, r"model rotary_base=0 must be a finite number > 0 \(the rotary frequency base; e.g. "
                         r"10000.0\)"),
    ({"rotary_base": -1.0}, r"model rotary_base=-1.0 must be a finite number > 0"),
    ({"rotary_base": float("nan")}, r"model rotary_base=nan must be a finite number > 0"),
    ({"rotary_base": float("inf")}, r"model rotary_base=inf must be a finite number > 0"),
    ({"rotary_base": "10000"}, r"model rotary_base='10000' must be a finite number > 0"),
    ({"init_std": -0.02}, r"model init_std=-0.02 must be a finite number >= 0 \(the standard deviation"),
    ({"init_std": float("nan")}, r"model init_std=nan must be a finite number >= 0"),
    ({"init_std": True}, r"model init_std=True must be a finite number >= 0"),
    ({"mlp_hidden_dim": 0}, r"model mlp_hidden_dim=0 must be a positive integer, or None \(null in a config: 4\*dim"),
    ({"mlp_hidden_dim": -4}, r"model mlp_hidden_dim=-4 must be a positive integer, or None"),
    ({"mlp_hidden_dim": 8.5}, r"model mlp_hidden_dim=8.5 must be a positive integer, or None"),
    ({"segment_lengths": [8, 16], "dilation_rates": [1]}, r"must have the same length"),
])
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_edge_config_values_still_build():
    assert LongNetLM(config(init_std=0, rotary_base=500, mlp_hidden_dim=8, tie_embeddings=False)).config.init_std == 0


BAD_FORWARD = [
    (dict(input_ids=[[1, 2, 3]]), TypeError, r"input_ids must be a torch.Tensor \(batch, seq\) of token ids, got list"),
    (dict(input_ids=IDS.float()), TypeError, r"input_ids must be a tensor of an integer dtype \(e.g. torch.long\) "
                                             r"\(batch, seq\) of token ids, got dtype torch.float32"),
    (dict(input_ids=IDS.bool()), TypeError, r"input_ids must be a tensor of an integer dtype .* got dtype torch.bool"),
    (dict(input_ids=IDS[0]), ValueError, r"input_ids must have shape \(batch, seq\) with batch >= 1 and seq >= 1, "
                                         r"got \(8,\)"),
    (dict(input_ids=IDS[None]), ValueError, r"input_ids must have shape \(batch, seq\).* got \(1, 2, 8\)"),
    (dict(input_ids=torch.tensor(3)), ValueError, r"input_ids must have shape \(batch, seq\).* got \(\)"),
    (dict(input_ids=IDS[:, :0]), ValueError, r"input_ids must have shape \(batch, seq\).* got \(2, 0\)"),
    (dict(input_ids=IDS + 10), ValueError, r"input_ids hold ids outside 0..49 \(min 10, max 55\): every id must "
                                           r"index the model's vocabulary \(vocab_size=50\)"),
    (dict(input_ids=IDS - 1), ValueError, r"input_ids hold ids outside 0..49 \(min -1, max 44\)"),
    (dict(input_ids=IDS.to(torch.int8) - 1), ValueError, r"input_ids hold ids outside 0..49 \(min -1"),
    (dict(input_ids=IDS, labels=IDS.float()), TypeError, r"labels must be a tensor of an integer dtype .*any "
                                                         r"integer dtype: cast to int64 for the loss.* got dtype "
                                                         r"torch.float32"),
    (dict(input_ids=IDS, labels=IDS.bool()), TypeError, r"labels must be a tensor of an integer dtype"),
    (dict(input_ids=IDS, labels=IDS.tolist()), TypeError, r"labels must be a torch.Tensor \(2, 8\).* got list"),
    (dict(input_ids=IDS, labels=IDS[:, :4]), ValueError, r"labels shape \(2, 4\) must match input_ids \(2, 8\)"),
    (dict(input_ids=IDS, labels=IDS + 5), ValueError, r"labels hold values outside 0..49 that are not "
                                                      r"ignore_index=-100 \(min 50, max 50\)"),
    (dict(input_ids=IDS, labels=IDS - 4), ValueError, r"labels hold values outside 0..49 .* \(min -4, max -1\)"),
    (dict(input_ids=IDS, labels=IDS, ignore_index=None), TypeError, r"ignore_index=None must be an integer"),
    (dict(input_ids=IDS, labels=IDS, ignore_index=True), TypeError, r"ignore_index=True must be an integer"),
    (dict(input_ids=IDS, positions=torch.arange(8.0)), TypeError, r"positions must be a tensor of an integer dtype "
                                                                   r".*\(8,\) of the rows' global positions, got dtype "
                                                                   r"torch.float32"),
    (dict(input_ids=IDS, positions=torch.ones(8, dtype=torch.bool)), TypeError, r"positions .* got dtype torch.bool"),
    (dict(input_ids=IDS, positions=torch.arange(7)), ValueError, r"positions must have shape \(seq,\) = \(8,\) .* "
                                                                 r"got \(7,\)"),
    (dict(input_ids=IDS, positions=torch.arange(16).view(2, 8)), ValueError, r"positions must have shape \(seq,\) = "
                                                                             r"\(8,\) \(one global position per row "
                                                                             r"of input_ids \(2, 8\), shared by the "
                                                                             r"batch\), got \(2, 8\)"),
    (dict(input_ids=IDS, positions=list(range(8))), TypeError, r"positions must be a torch.Tensor .* got list"),
    (dict(input_ids=IDS, sequence_group=("sp", 1)), TypeError, r"sequence_group must be None, a longnet_dist "
                                                               r"SequenceGroup.* got tuple \('sp', 1\)"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_FORWARD,
                         ids=[f"{i}-{'-'.join(k for k in kwargs if k != 'input_ids') or 'input_ids'}"
                              for i, (kwargs, _, _) in enumerate(BAD_FORWARD)])
def test_bad_forward_arguments_are_named_before_any_compute(model, kwargs, error, message, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("the embedding ran before the arguments were checked")

    monkeypatch.setattr(model.embed, "forward", no_compute)
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        model(kwargs.pop("input_ids"), **kwargs)


def test_any_integer_dtype_gives_the_int64_results(model):
    with torch.no_grad():
        logits = model(IDS)
        losses = model(IDS, labels=IDS.roll(1, 1))
        for dtype in (torch.uint8, torch.int16, torch.int32):
            assert torch.equal(model(IDS.to(dtype)), logits)
            assert torch.equal(model(IDS.to(dtype), labels=IDS.roll(1, 1).to(dtype)), losses)
        assert torch.equal(model(IDS, positions=torch.arange(8, dtype=torch.int32)), logits)
        ignored = IDS.roll(1, 1).clone()
        ignored[:, :3] = -100  # the ignore_index is not a vocabulary id, and is accepted
        assert torch.all(model(IDS, labels=ignored)[:, :3] == 0)


def test_checking_values_reads_nothing_on_the_host(model):
    """The range checks run inside torch's ops: on valid input no value is read (train/host_reads.py)."""
    with torch.no_grad(), HostReads() as reads:
        model(IDS, labels=IDS, positions=torch.arange(8))
    assert not [site for site in reads.sites if "longnet_dist" in site], reads.sites


def test_meta_tensors_get_the_metadata_checks_only(model):
    meta = torch.empty(2, 8, dtype=torch.long, device="meta")
    ids, labels, positions, group = model._check_inputs(meta, meta, None, None, -100)
    assert ids is meta and labels.is_meta and positions is None and group is None
    with pytest.raises(ValueError, match=r"labels are on cpu but input_ids on meta"):
        model._check_inputs(meta, IDS, None, None, -100)
    with pytest.raises(ValueError, match=r"positions are on cpu but input_ids on meta"):
        model._check_inputs(meta, None, torch.arange(8), None, -100)


def test_token_losses_checks_its_labels(model):
    hidden = torch.zeros(2, 8, 16)
    with pytest.raises(ValueError, match=r"labels hold values outside 0..49"):
        model.token_losses(hidden, IDS + 10)
    assert model.token_losses(hidden, IDS.int()).dtype == torch.float32


def test_dense_attention_converts_its_group_like_the_dilated_path():
    dense = DenseAttention(16, 2, [8], [1])
    qkv = torch.randn(3, 1, 8, 2, 8)
    with pytest.raises(TypeError, match=r"sequence_group must be None, a longnet_dist SequenceGroup.* got tuple "
                                        r"\('sp', 1\)"):
        dense.attend(*qkv, sequence_group=("sp", 1))
    one_rank = SequenceGroup(None, [0], global_rank=0)
    torch.testing.assert_close(dense.attend(*qkv, sequence_group=one_rank), dense.attend(*qkv))
    lm = LongNetLM(config(attention_impl="dense"))
    with pytest.raises(TypeError, match=r"sequence_group must be None"):
        lm(IDS, sequence_group="sp")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(prompt_ids=torch.tensor([1, 2, 3])), TypeError, r"prompt_ids must be a list of Python ints \(token ids in "
                                                          r"0..49 \(the model's vocabulary\)\), got Tensor; for a "
                                                          r"tensor of ids pass ids.tolist\(\)"),
    (dict(prompt_ids="abc"), TypeError, r"prompt_ids must be a list of Python ints .* got str"),
    (dict(prompt_ids=[1, 2.0, True]), TypeError, r"prompt_ids must be a list of Python ints .* but holds \[2.0, "
                                                 r"True\] \(of type float\)"),
    (dict(prompt_ids=[1, torch.tensor(2)]), TypeError, r"prompt_ids must be a list of Python ints .* \(of type "
                                                       r"Tensor\)"),
    (dict(prompt_ids=[]), ValueError, r"prompt token ids \[\] must be a non-empty list of ids in 0..49"),
    (dict(prompt_ids=[1, 50, -1]), ValueError, r"prompt token ids \[50, -1\] must be a non-empty list of ids in "
                                               r"0..49"),
    (dict(banned_ids=(50,)), ValueError, r"banned_ids \[50\] are outside 0..49 \(the model's vocabulary\)"),
    (dict(banned_ids=[-1, 3]), ValueError, r"banned_ids \[-1\] are outside 0..49"),
    (dict(banned_ids=tuple(range(VOCAB))), ValueError, r"banned_ids bans all 50 ids of the vocabulary: no token is "
                                                       r"left to generate"),
    (dict(banned_ids=torch.tensor([1, 2])), TypeError, r"banned_ids=tensor\(\[1, 2\]\) must be a tuple, list or set "
                                                       r"of int token ids in 0..49"),
    (dict(banned_ids=3), TypeError, r"banned_ids=3 must be a tuple, list or set of int token ids"),
    (dict(banned_ids=(1.0,)), TypeError, r"banned_ids=\(1.0,\) must be a tuple, list or set of int token ids"),
    (dict(stop_id=50), ValueError, r"stop_id=50 must be None \(no stop\) or a token id in 0..49"),
    (dict(stop_id="eod"), ValueError, r"stop_id='eod' must be None \(no stop\) or a token id in 0..49"),
    (dict(seed="7"), TypeError, r"seed='7' must be an integer or None \(a fresh seed each call\)"),
    (dict(seed=1.5), TypeError, r"seed=1.5 must be an integer or None"),
    (dict(seed=True), TypeError, r"seed=True must be an integer or None"),
    (dict(seed=2**64), ValueError, r"seed=18446744073709551616 must be in \[-2\*\*63, 2\*\*64 - 1\]"),
])
def test_bad_generate_arguments_are_named_before_any_compute(kwargs, error, message):
    class NoForward(LongNetLM):
        def forward(self, *args, **kwargs):
            raise AssertionError("the model ran before the arguments were checked")

    model = NoForward(config())
    kwargs = {"prompt_ids": [1, 2, 3], **kwargs}
    with pytest.raises(error, match=message):
        generate_ids(model, kwargs.pop("prompt_ids"), 2, **kwargs)


def test_generate_takes_a_set_of_banned_ids_and_bans_them(model):
    with torch.no_grad():
        first = int(model(torch.tensor([[1, 2, 3]]))[0, -1].argmax())
    new = generate_ids(model, (1, 2, 3), 6, temperature=0, banned_ids={first})
    greedy = generate_ids(model, [1, 2, 3], 6, temperature=0)
    assert len(new) == len(greedy) == 6 and new[0] != greedy[0]


@pytest.mark.parametrize("world_size", [0, -2, 4.0, "4", True, None])
def test_mesh_layout_and_valid_sizes_need_a_positive_integer_world_size(world_size):
    with pytest.raises(ValueError, match=re.escape(f"world_size={world_size!r} must be a positive integer (the number "
                                                   f"of processes)")):
        mesh_layout(world_size, 1)
    with pytest.raises(ValueError, match=r"must be a positive integer \(the number of processes\)"):
        valid_sequence_parallel_sizes(world_size)


def _three_rank_group():
    return dist.ProcessGroup(dist.HashStore(), 0, 3)


@pytest.mark.parametrize("group,error,message", [
    ("sp-pg", TypeError, r"group must be a torch.distributed.ProcessGroup \(or None for a group of one rank\), got str "
                         r"'sp-pg'"),
    (7, TypeError, r"group must be a torch.distributed.ProcessGroup .* got int 7$"),
    (-100, TypeError, r"got int -100 \(torch returns GroupMember.NON_GROUP_MEMBER to ranks outside a new group"),
    (None, ValueError, r"a group of 2 ranks \[0, 1\] needs a ProcessGroup"),
    (_three_rank_group, ValueError, r"group has 3 ranks but global_ranks \[0, 1\] lists 2"),
])
def test_sequence_group_needs_a_process_group(group, error, message):
    group = group() if callable(group) else group
    with pytest.raises(error, match=message):
        SequenceGroup(group, [0, 1], global_rank=0)


@pytest.mark.parametrize("global_ranks,global_rank,message", [
    ([0, 0], 0, r"global_ranks=\[0, 0\] must be a non-empty list of distinct global ranks"),
    ([], 0, r"global_ranks=\[\] must be a non-empty list"),
    ("01", 0, r"global_ranks='01' must be a non-empty list"),
    ([0, -1], 0, r"global_ranks=\[0, -1\] must be"),
    ([0, 1], 2, r"global rank 2 is not a member of ranks \[0, 1\]"),
    ([0, 1], "0", r"global rank '0' is not a member of ranks \[0, 1\]"),
])
def test_sequence_group_ranks_are_checked(global_ranks, global_rank, message):
    with pytest.raises(ValueError, match=message):
        SequenceGroup(dist.ProcessGroup(dist.HashStore(), 0, 2), global_ranks, global_rank=global_rank)


def test_sequence_group_takes_a_process_group_or_none_for_one_rank():
    pair = SequenceGroup(dist.ProcessGroup(dist.HashStore(), 0, 2), [4, 5], global_rank=5)
    assert (pair.size, pair.rank) == (2, 1)
    assert SequenceGroup(None, [3], global_rank=3).size == 1


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "four"}, r"environment variable WORLD_SIZE='four' must be an integer >= 1 \(the number of "
                             r"processes; unset or 1: one\); torchrun sets it"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE='0' must be an integer >= 1"),
    ({"WORLD_SIZE": "-2"}, r"WORLD_SIZE='-2' must be an integer >= 1"),
    ({"WORLD_SIZE": "2.0"}, r"WORLD_SIZE='2.0' must be an integer >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "zero"}, r"environment variable RANK='zero' must be an integer >= 0 \(this "
                                          r"process's global rank\)"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK='-1' must be an integer >= 0"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"environment variable RANK=2 must be in 0..1 \(this process's global rank; "
                                       r"WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, r"environment variable LOCAL_RANK='x' must be an integer "
                                                          r">= 0 \(this process's rank on its node\)"),
])
def test_init_distributed_names_a_bad_torchrun_variable(env, message, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "0")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        init_distributed("gloo")
    assert not dist.is_initialized()


def test_init_distributed_names_a_bad_local_world_size_under_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "two",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE='two' must be an integer >= 1"):
        init_distributed("nccl")


@pytest.mark.parametrize("seq_len,sp_size,message", [
    (32, 0, r"sequence_parallel_size must be a positive integer, got 0"),
    (32, -4, r"sequence_parallel_size must be a positive integer, got -4"),
    (32, 2.0, r"sequence_parallel_size must be a positive integer, got 2.0"),
    (2, 4, r"seq_len 2 is not divisible by sequence_parallel_size 4: every rank holds seq_len / sp rows \(at least "
           r"one\); valid sp sizes for this seq_len include \[1, 2\]"),
    (0, 4, r"seq_len must be a positive integer, got 0"),
    (30, 4, r"seq_len 30 is not divisible by sequence_parallel_size 4"),
])
def test_sharding_arithmetic_names_impossible_shards(seq_len, sp_size, message):
    with pytest.raises(ValueError, match=message):
        segment_spans(seq_len, sp_size, [16])
    with pytest.raises(ValueError, match=message):
        spanning_ranks(seq_len, sp_size, 16)


def test_sharding_arithmetic_checks_segment_lengths():
    with pytest.raises(ValueError, match=r"segment length 0 must be a positive integer"):
        segment_spans(32, 4, [16, 0])
    assert segment_spans(32, 4, [16]) == [(0, 2), (2, 2)] and spanning_ranks(32, 4, 64) == 4
