"""attention=geometric: the paper's rule w_i = w0 * a^i, r_i = a^i up to seq_len, and its config path."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longnet_dist.attention import geometric_branches
from longnet_dist.train.__main__ import CONFIG_DIR
from longnet_dist.train.config import describe_branches, validate_config


@pytest.mark.parametrize("seq_len, expected_w, expected_r", [
    (2048, [2048], [1]),
    (4096, [2048, 4096], [1, 2]),
    (32768, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]),
    (1048576, [2048 * 2**i for i in range(10)], [2**i for i in range(10)]),
    (100000, [2048, 4096, 8192, 16384, 32768, 65536, 100000], [1, 2, 4, 8, 16, 32, 64]),  # last capped
    (3000, [2048, 3000], [1, 2]),
])
def test_default_rule(seq_len, expected_w, expected_r):
    assert geometric_branches(seq_len) == (expected_w, expected_r)


def test_other_base_and_growth():
    assert geometric_branches(8192, 512, 4) == ([512, 2048, 8192], [1, 4, 16])
    assert geometric_branches(10000, 1000, 3) == ([1000, 3000, 9000, 10000], [1, 3, 9, 27])


@pytest.mark.parametrize("args, words", [
    ((1024, 2048, 2), ["base_segment_length=2048", "larger than seq_len=1024", "1..1024"]),
    ((4096, 2048, 1), ["growth=1", "integer >= 2"]),
    ((4096, 2048, 1.5), ["growth=1.5", "integer >= 2"]),
    ((4096, 2048.0, 2), ["base_segment_length=2048.0", "integer"]),
    ((0, 1, 2), ["seq_len=0", "integer >= 1"]),
    ((64, 2, 4), ["growth=4", "base_segment_length=2"]),
])
def test_invalid_values_name_the_value_and_what_is_valid(args, words):
    with pytest.raises(ValueError) as error:
        geometric_branches(*args)
    assert all(word in str(error.value) for word in words), str(error.value)


def make_config(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["attention=geometric", *overrides])


def test_hydra_config_resolves_the_lists_for_the_sequence_length():
    cfg = make_config("data.seq_len=1048576")
    validate_config(cfg, world_size=1)
    resolved = OmegaConf.to_container(cfg, resolve=True)["attention"]  # what the run's config.yaml saves
    assert resolved["segment_lengths"] == [2048 * 2**i for i in range(10)]
    assert resolved["dilation_rates"] == [2**i for i in range(10)]
    line = describe_branches(cfg)
    assert "segment_lengths [2048, 4096," in line and "w_i = 2048 * 2^i" in line
    cfg = make_config("data.seq_len=8192", "attention.base_segment_length=512", "attention.growth=4")
    assert list(cfg.attention.segment_lengths) == [512, 2048, 8192] and list(cfg.attention.dilation_rates) == [1, 4, 16]


@pytest.mark.parametrize("overrides, words", [
    (["data.seq_len=1024"], ["attention.segment_lengths", "base_segment_length=2048", "1..1024"]),
    (["attention.growth=1"], ["growth=1", "integer >= 2"]),
    (["attention.growth=2.5"], ["growth=2.5", "integer >= 2"]),
])
def test_invalid_config_fails_in_validation(overrides, words):
    with pytest.raises(ValueError) as error:
        validate_config(make_config(*overrides), world_size=1)
    assert all(word in str(error.value) for word in words), str(error.value)
