"""The training config: key schema, start-up validation, and what it builds (model config, DeepSpeed dict).

Values live in configs/ (Hydra groups); the dataclasses here only say which keys exist and their
types, so a misspelt or mistyped key fails at start with a ValueError naming it; config_checks.py checks
the values. Every check runs before any process group, data or model is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from longnet_dist.attention import check_sequence_parallel_config, geometric_branches
from longnet_dist.distributed import valid_sequence_parallel_sizes
from longnet_dist.distributed.mesh import world_size_from_env
from longnet_dist.model import LongNetConfig
from longnet_dist.optional import ensure_installed

from .config_checks import check_backends, check_data, check_integer, check_trainer

TOP_LEVEL_KEYS = ("model", "attention", "data", "distributed", "deepspeed", "trainer", "logger", "resume",
                  "init_from")
LOGGER_BACKENDS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
# DeepSpeed entries the trainer fills from trainer.* / data.* (one place for each value)
TRAINER_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.micro_batch_size x trainer.gradient_accumulation_steps x world size",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "gradient_clipping": "trainer.grad_clip",
    "optimizer": "trainer.lr / weight_decay / betas / eps / torch_adam",
    "scheduler": "trainer.warmup_steps / min_lr_ratio / max_steps",
}


@dataclass
class ModelSchema:
    name: str = MISSING
    dim: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    mlp: str = MISSING
    mlp_hidden_dim: Optional[int] = MISSING
    norm: str = MISSING
    tie_embeddings: bool = MISSING
    rotary_base: float = MISSING
    activation_checkpointing: Any = MISSING  # none | full | selective (true/false: full/none); LongNetConfig checks
    token_chunk_size: int = MISSING
    init_std: float = MISSING
    compile: Any = "auto"  # auto | true | false
    attention_impl: str = "dilated"  # dilated | dense
    checkpoint_group_size: int = 1  # with activation_checkpointing=full: blocks per recomputed group


@dataclass
class AttentionSchema:
    segment_lengths: list[int] = MISSING
    dilation_rates: list[int] = MISSING
    backend: Optional[str] = MISSING
    base_segment_length: Any = None  # attention=geometric: w0 (checked by geometric_branches, not here)
    growth: Any = None  # attention=geometric: a


# attention=geometric: `segment_lengths: ${geometric_segment_lengths:${data.seq_len},${.base_segment_length},
# ${.growth}}` (and dilation_rates alike) resolve to the paper's rule; the saved config.yaml holds the lists.
GEOMETRIC_RESOLVERS = {"geometric_segment_lengths": 0, "geometric_dilation_rates": 1}
for _name, _index in GEOMETRIC_RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(
            _name, lambda seq_len, w0, a, _index=_index: geometric_branches(seq_len, w0, a)[_index])


def describe_branches(cfg: DictConfig) -> str:
    """One line naming the attention branches this config uses (and the rule that made them)."""
    attention = cfg.attention
    line = f"attention branches: segment_lengths {list(attention.segment_lengths)}, " \
           f"dilation_rates {list(attention.dilation_rates)}"
    if OmegaConf.is_interpolation(attention, "segment_lengths") and attention.base_segment_length is not None:
        line += (f" (geometric: w_i = {attention.base_segment_length} * {attention.growth}^i up to "
                 f"data.seq_len={cfg.data.seq_len}, r_i = {attention.growth}^i)")
    return line


@dataclass
class DataSchema:  # values: configs/data/ (the data package's keys)
    source: str = MISSING
    tokenizer: str = MISSING
    cache_dir: Optional[str] = MISSING
    val_fraction: float = MISSING
    split_seed: int = MISSING
    text_field: str = MISSING
    seq_len: int = MISSING
    micro_batch_size: int = MISSING
    shuffle_seed: int = MISSING


@dataclass
class DistributedSchema:
    sequence_parallel_size: int = MISSING
    backend: Optional[str] = MISSING


@dataclass
class TrainerSchema:
    max_steps: int = MISSING
    gradient_accumulation_steps: int = MISSING
    lr: float = MISSING
    min_lr_ratio: float = MISSING
    warmup_steps: int = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    grad_clip: float = MISSING
    torch_adam: bool = MISSING
    seed: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_batches: int = MISSING
    eval_position_buckets: int = MISSING
    save_every: int = MISSING
    keep_last_checkpoints: Optional[int] = MISSING
    output_dir: str = MISSING
    nonfinite_loss: str = MISSING
    peak_flops: Any = MISSING  # FLOP/s or "auto" (peak.py)
    progress_bar: bool = MISSING
    num_threads: Optional[int] = MISSING
    profile_step: Optional[int] = None


@dataclass
class LoggerSchema:
    backend: str = MISSING
    project: Optional[str] = None
    entity: Optional[str] = None
    mode: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = MISSING


SCHEMAS = {"model": ModelSchema, "attention": AttentionSchema, "data": DataSchema,
           "distributed": DistributedSchema, "trainer": TrainerSchema, "logger": LoggerSchema}


def _check_keys_and_types(cfg: DictConfig) -> None:
    unknown = sorted(set(cfg.keys()) - set(TOP_LEVEL_KEYS))
    missing = sorted(set(TOP_LEVEL_KEYS) - set(cfg.keys()))
    if unknown or missing:
        raise ValueError(f"config top-level keys: unknown {unknown}, missing {missing}; "
                         f"expected {list(TOP_LEVEL_KEYS)}")
    for group, schema in SCHEMAS.items():
        section = cfg[group]
        if not isinstance(section, DictConfig):
            raise ValueError(f"config group {group!r} must be a mapping, got {section!r}")
        valid = [f.name for f in fields(schema)]
        extra = sorted(set(section.keys()) - set(valid))
        if extra:
            raise ValueError(f"unknown key(s) {[f'{group}.{k}' for k in extra]}; valid keys of {group}: {valid}")
        try:
            OmegaConf.merge(OmegaConf.structured(schema), section)
            OmegaConf.to_container(section, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as error:
            detail = str(error).split("\n")[0].replace("ValueError raised while resolving interpolation: ", "")
            raise ValueError(f"bad value in config group {group!r} ({error.full_key}): {detail}") from None


def model_config(cfg: DictConfig, vocab_size: int) -> LongNetConfig:
    """The LongNetConfig of `cfg.model` + `cfg.attention` for a vocabulary of `vocab_size` ids."""
    model = cfg.model
    return LongNetConfig(
        vocab_size=vocab_size, dim=model.dim, num_layers=model.num_layers, num_heads=model.num_heads,
        segment_lengths=list(cfg.attention.segment_lengths), dilation_rates=list(cfg.attention.dilation_rates),
        mlp=model.mlp, mlp_hidden_dim=model.mlp_hidden_dim, norm=model.norm, tie_embeddings=model.tie_embeddings,
        rotary_base=float(model.rotary_base), activation_checkpointing=model.activation_checkpointing,
        attention_backend=cfg.attention.backend, token_chunk_size=model.token_chunk_size,
        init_std=float(model.init_std), compile=model.get("compile", "auto"),
        attention_impl=model.get("attention_impl", "dilated"),
        checkpoint_group_size=model.get("checkpoint_group_size", 1),
    )


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    """The dict for deepspeed.initialize: the `deepspeed` group plus the entries owned by trainer/data."""
    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    trainer = cfg.trainer
    # Linear warmup from lr/warmup to lr, then cosine down to min_lr_ratio*lr at max_steps.
    warmup = max(1, min(trainer.warmup_steps, trainer.max_steps))
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": trainer.gradient_accumulation_steps,
        "gradient_clipping": float(trainer.grad_clip),
        "optimizer": {"type": "AdamW", "params": {
            "lr": float(trainer.lr), "betas": [float(b) for b in trainer.betas], "eps": float(trainer.eps),
            "weight_decay": float(trainer.weight_decay), "torch_adam": bool(trainer.torch_adam)}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": trainer.max_steps, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_ratio": 1.0 / warmup, "cos_min_ratio": float(trainer.min_lr_ratio)}},
    })
    return ds


def validate_config(cfg: DictConfig, world_size: int | None = None) -> None:
    """Raise one ValueError naming the bad key/value when `cfg` cannot run; no compute, no I/O."""
    _check_keys_and_types(cfg)
    world_size = world_size_from_env() if world_size is None else world_size
    data, trainer, dist_cfg, attention = cfg.data, cfg.trainer, cfg.distributed, cfg.attention
    sp = dist_cfg.sequence_parallel_size
    check_integer("distributed.sequence_parallel_size", sp)
    if world_size % sp != 0:
        raise ValueError(f"distributed.sequence_parallel_size={sp} does not divide the world size {world_size} "
                         f"(processes launched); valid sizes: {valid_sequence_parallel_sizes(world_size)}")
    check_sequence_parallel_config(data.seq_len, sp, list(attention.segment_lengths), list(attention.dilation_rates))
    model_config(cfg, vocab_size=2)  # the model's own checks (dim/heads, mlp, norm, ...)
    check_data(data)
    check_trainer(trainer)
    _validate_deepspeed(cfg.deepspeed)
    _validate_logger(cfg.logger)
    check_backends(cfg)  # distributed.backend and attention.backend, on this machine (its CUDA, triton)
    resume = cfg.resume
    if resume is not None and resume != "auto" and not Path(str(resume)).exists():
        raise ValueError(f"resume={resume!r}: no such path; use null (fresh start), 'auto' (latest complete "
                         f"checkpoint of trainer.output_dir) or a checkpoint/run directory")
    init_from = cfg.init_from  # whether it exists is checked on a fresh start only: a rerun resumes its own checkpoints
    if init_from is not None and (not isinstance(init_from, str) or not init_from.strip()):
        raise ValueError(f"init_from={init_from!r}: use null (weights initialised at random) or the path of an exported "
                         f"model folder, a checkpoint folder or a run directory to start from its weights")
    if init_from is not None and resume not in (None, "auto"):
        raise ValueError(f"resume={resume!r} and init_from={init_from!r}: a resume continues that checkpoint's weights "
                         f"and optimizer, so init_from would be ignored; give one of them (resume=auto with init_from: "
                         f"start from init_from, then continue this run's own checkpoints)")


def _validate_deepspeed(ds_cfg: DictConfig) -> None:
    if not isinstance(ds_cfg, DictConfig):
        raise ValueError(f"config group 'deepspeed' must be a mapping of DeepSpeed config entries, got {ds_cfg!r}")
    clash = sorted(set(ds_cfg.keys()) & set(TRAINER_OWNED_DEEPSPEED_KEYS))
    if clash:
        where = "; ".join(f"deepspeed.{key} -> set {TRAINER_OWNED_DEEPSPEED_KEYS[key]}" for key in clash)
        raise ValueError(f"the trainer fills these DeepSpeed entries itself: {where}")
    stage = OmegaConf.select(ds_cfg, "zero_optimization.stage", default=0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    accumulate = OmegaConf.select(ds_cfg, "data_types.grad_accum_dtype", default=None)
    if accumulate not in (None, "fp32", "fp16", "bf16"):
        raise ValueError(f"deepspeed.data_types.grad_accum_dtype={accumulate!r} must be fp32, fp16, bf16 or null "
                         "(the model's dtype)")
    if accumulate == "fp32" and OmegaConf.select(ds_cfg, "bf16.enabled", default=False) and stage == 0:
        # DeepSpeed would raise NotImplementedError deep inside deepspeed.initialize
        raise ValueError("deepspeed.data_types.grad_accum_dtype=fp32 with bf16 needs deepspeed.zero_optimization.stage"
                         "=1 (DeepSpeed's BF16_Optimizer; `deepspeed=bf16` sets both), not stage 0")


def check_packages(cfg: DictConfig) -> None:
    """One ImportError, before any work, for a package the run needs and this environment lacks: `wandb` for the
    W&B logger, `datasets` for a corpus of files or from the hub, `tokenizers` for a tokenizer.json. (Apart from
    validate_config, which checks the config alone.)"""
    if cfg.logger.backend == "wandb" and cfg.logger.mode != "disabled":
        ensure_installed("wandb", f"logger=wandb (mode {cfg.logger.mode!r})", "use logger=none")
    if cfg.data.source != "stdlib":
        ensure_installed("datasets", f"data.source={cfg.data.source!r}", "use data.source=stdlib")
    if cfg.data.tokenizer != "bytes":
        ensure_installed("tokenizers", f"data.tokenizer={cfg.data.tokenizer!r}", "use data.tokenizer=bytes")


def _validate_logger(logger_cfg: DictConfig) -> None:
    if logger_cfg.backend not in LOGGER_BACKENDS:
        raise ValueError(f"logger.backend={logger_cfg.backend!r} is not one of {list(LOGGER_BACKENDS)}")
    if logger_cfg.backend == "wandb" and logger_cfg.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={logger_cfg.mode!r} is not one of {list(WANDB_MODES)}")
