"""The training run: config -> mesh -> data -> model -> DeepSpeed engine -> steps, eval, checkpoints.

Reads top to bottom like the data path: every rank builds the same things, holds its own slice of
each sample, computes the loss of its own tokens (scaled as in loss.py), and DeepSpeed reduces the
gradients over the whole world. Only rank 0 writes the run directory (checkpoint shards aside).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from longnet_dist.attention import segment_spans
from longnet_dist.data import PAD_ID, SequenceShardLoader, prepare_corpus
from longnet_dist.distributed import build_mesh, comm_stats, leave_distributed
from longnet_dist.distributed.objects import broadcast_from_rank0
from longnet_dist.model import LongNetLM, count_parameters, flops_per_token

from .checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from .config import check_packages, deepspeed_config, describe_branches, model_config, validate_config
from .engine import build_engine, ensure_process_group, grad_norm_value, optimizer_advice, stage0_grad_norm
from .evaluate import bits_per_byte, evaluate
from .faults import StopSignal, check_finite_loss, check_finite_weights
from .host_reads import DeviceValue
from .init_weights import load_initial_weights, resolve_init_source, write_master_weights
from .loss import sequence_parallel_loss
from .metrics import MetricsLogger, peak_memory_bytes
from .peak import resolve_peak_flops
from .profiling import format_summary, phase, profiled, write_step_profile
from .run_dir import check_fresh_start, check_resume_compatible
from .state import client_state, resolve_resume, restore_rng

IGNORE_INDEX = PAD_ID  # labels equal to the pad id carry no loss
MAX_CONSECUTIVE_SKIPS = 100  # nonfinite_loss=skip gives up after this many bad micro-batches in a row


@dataclass
class Interval:
    """Sums over the optimizer steps since the last log line."""

    steps: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    comm_bytes_at_start: int = 0
    grad_norms: list[DeviceValue | float] = field(default_factory=list)  # read on the host when logged


def _comm_bytes() -> int:
    stats = comm_stats()
    return stats.sent_bytes + stats.received_bytes


def _tokens_per_byte(token_file) -> float:
    """Tokens per UTF-8 byte of the split's text (for bits per byte); 1.0 when the metadata lacks bytes."""
    num_bytes = token_file.meta.get("num_bytes")
    return token_file.num_tokens / num_bytes if num_bytes else 1.0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(labels, input_ids, positions) of a loader batch on `device`. To a GPU through page-locked memory and
    without blocking: a copy from pageable memory first waits for all the work queued before it, so the GPU
    would drain and then idle while the host launches the forward (host_reads.py); pin_memory's buffers stay
    allocated until their copies have run."""
    cuda = device.type == "cuda"
    return tuple((batch[key].pin_memory() if cuda else batch[key]).to(device, non_blocking=cuda)
                 for key in ("labels", "input_ids", "positions"))


def _logged_norm(norm: DeviceValue | float) -> float:
    """A kept gradient norm as logged: DeepSpeed's -1 (a non-finite norm, the update skipped) reads inf."""
    value = norm.get() if isinstance(norm, DeviceValue) else float(norm)
    return math.inf if value < 0 else value


def _train_step(engine, loader, sequence_group, gradient_accumulation_steps: int, step: int, policy: str,
                diagnostics_dir: Path) -> tuple[float, DeviceValue | float | None, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches -> (global mean loss, grad norm, lr).

    Reading a loss on the host waits for its forward to finish. Under nonfinite_loss=skip each loss is read
    before its backward, which a non-finite one must not run. Under stop they are read after the optimizer
    step, where DeepSpeed has already waited for the GPU, so the backward is queued without a wait; a
    non-finite loss then stops the run there, before anything is saved. The grad norm comes back as a
    host_reads.DeviceValue, read when logged, for the same reason."""
    losses, skipped, grad_norm, lr = [], 0, None, float(engine.get_lr()[0])
    check_first = policy == "skip"
    while len(losses) < gradient_accumulation_steps:
        with phase("data"):  # ranges a profile names the GPU's idle gaps by (profiling.phase; free otherwise)
            labels, input_ids, positions = _to_device(next(loader), engine.device)
        with phase("forward"):
            token_losses = engine(input_ids, labels=labels, positions=positions, sequence_group=sequence_group,
                                  ignore_index=IGNORE_INDEX)  # (B, l) this rank's tokens
        with phase("loss"):
            loss = sequence_parallel_loss(token_losses, labels, IGNORE_INDEX)
        if check_first and not check_finite_loss(loss.mean, step, policy, diagnostics_dir, lr=lr,
                                                 extra={"micro_batch": len(losses)}, same_on_every_rank=True):
            skipped += 1
            if skipped >= MAX_CONSECUTIVE_SKIPS:
                raise RuntimeError(f"{skipped} non-finite micro-batches in a row at step {step}; giving up")
            continue
        skipped = 0
        with phase("backward"):
            engine.backward(loss.backward_loss)
        if engine.is_gradient_accumulation_boundary():
            with phase("grad norm"):
                norm = stage0_grad_norm(engine)
                grad_norm = None if norm is None else DeviceValue(norm)
        with phase("optimizer step"):
            engine.step()
        losses.append(loss)
    if not check_first:
        with phase("loss check"):
            for index, loss in enumerate(losses):  # raises (policy "stop") at the first non-finite one
                check_finite_loss(loss.mean, step, policy, diagnostics_dir, lr=lr, extra={"micro_batch": index},
                                  same_on_every_rank=True)  # the all-reduced global mean
    if grad_norm is None:
        grad_norm = grad_norm_value(engine)
    return sum(loss.mean for loss in losses) / len(losses), grad_norm, lr


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary dict (final step, last loss, run directory)."""
    validate_config(cfg)  # before any compute: one clear ValueError for a bad config
    check_packages(cfg)  # and one ImportError for a package the run needs and this environment lacks
    # Stop signals are caught from the start: one that arrives during setup (data, engine, resume)
    # stops the run cleanly at the first step boundary instead of killing the process.
    with StopSignal() as stop:
        return _train(cfg, stop)


def _resume_point(cfg: DictConfig, checkpoint_root: Path, world_size: int) -> Path | None:
    """The checkpoint to resume from (None: fresh), after run_dir's checks: no fresh start over another run's
    checkpoints, no resume with another model or optimizer layout."""
    resume_from = resolve_resume(cfg.resume, checkpoint_root)
    check_fresh_start(cfg.resume, resume_from, checkpoint_root)
    if resume_from is not None:
        check_resume_compatible(resume_from, cfg, world_size)
    return resume_from


def _schedule_lr(engine) -> None:
    """Set the optimizer's learning rate to this run's schedule at the loaded step. The loaded optimizer state holds
    the lr the saving run last set, and the scheduler would only set its own after the next step: a resume with
    another trainer.lr or trainer.max_steps (to continue past the end) would take its first step at the old lr."""
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        scheduler.step(scheduler.last_batch_iteration)  # the same iteration again: only the lr is set


def _saved_data_position(folder: Path) -> dict[str, Any] | None:
    """The data loader's position its manifest recorded (None for checkpoints saved before it did so)."""
    try:
        return read_manifest(folder).get("data")
    except CheckpointError:  # loading it names the damage, on every rank
        return None


def _decided_by_rank0(decide, is_main: bool):
    """`decide()` on rank 0, its result on every rank; its ValueError or CheckpointError raised on every rank alike
    (the other ranks would otherwise wait for rank 0 in the next collective)."""
    outcome = None
    if is_main:
        try:
            outcome = ("ok", decide())
        except (ValueError, CheckpointError) as error:
            outcome = (type(error), str(error))
    kind, value = broadcast_from_rank0(outcome)
    if kind != "ok":
        raise kind(value)
    return value


def _train(cfg: DictConfig, stop: StopSignal) -> dict[str, Any]:
    trainer, data_cfg = cfg.trainer, cfg.data
    if trainer.num_threads is not None:
        torch.set_num_threads(trainer.num_threads)

    # ---- mesh: world = dp x sp; segment subgroups for the branches that span ranks
    ensure_process_group(cfg.distributed.backend)
    sp_size = cfg.distributed.sequence_parallel_size
    mesh = build_mesh(sp_size)
    if mesh.sequence_group is not None:
        mesh.sequence_group.prepare_segment_subgroups(
            segment_spans(data_cfg.seq_len, sp_size, list(cfg.attention.segment_lengths)))
    is_main = mesh.rank == 0

    # ---- run directory (rank 0 decides it: ranks may resolve a timestamp differently)
    output_dir = Path(broadcast_from_rank0(str(Path(trainer.output_dir).resolve())))
    checkpoint_root, diagnostics_dir = output_dir / "checkpoints", output_dir / "diagnostics"
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config["trainer"]["output_dir"] = str(output_dir)
    # what to resume, decided (and checked against the run directory) before anything is written into it
    resume_from = _decided_by_rank0(lambda: _resume_point(cfg, checkpoint_root, mesh.world_size), is_main)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ---- data: every rank reads only its slice of each sample
    corpus = prepare_corpus(data_cfg.source, cache_dir=data_cfg.cache_dir, tokenizer=data_cfg.tokenizer,
                            val_fraction=data_cfg.val_fraction, seed=data_cfg.split_seed,
                            text_field=data_cfg.text_field)
    shard = dict(seq_len=data_cfg.seq_len, micro_batch_size=data_cfg.micro_batch_size, dp_rank=mesh.dp_rank,
                 dp_size=mesh.dp_size, sp_rank=mesh.sp_rank, sp_size=mesh.sp_size, seed=data_cfg.shuffle_seed)
    train_loader = SequenceShardLoader(corpus["train"], shuffle=True, **shard)
    # without evaluation (eval_every=0) the validation split need not hold one sample of seq_len
    val_loader = SequenceShardLoader(corpus["validation"], shuffle=False, **shard) if trainer.eval_every else None
    if resume_from is not None:  # a changed seq_len, batch or corpus: refused now, not after the engine loaded
        _decided_by_rank0(lambda: train_loader.check_resumable(_saved_data_position(resume_from),
                                                               where=str(resume_from)), is_main)
    train_tokens_per_byte = _tokens_per_byte(corpus["train"])
    val_tokens_per_byte = _tokens_per_byte(corpus["validation"])

    # ---- model and engine
    _seed_everything(trainer.seed)
    lm_config = model_config(cfg, vocab_size=corpus["train"].vocab_size)
    model = LongNetLM(lm_config)
    initialised_from = None
    if resume_from is None and cfg.init_from is not None:  # a fresh run from another run's weights
        source = Path(_decided_by_rank0(lambda: str(resolve_init_source(cfg.init_from)), is_main))
        meta, initial_weights = load_initial_weights(model, source, tokenizer=data_cfg.tokenizer,
                                                     tokenizer_name=corpus["train"].meta["tokenizer"])
        initialised_from = (source, meta)
    num_params, step_flops_per_token = count_parameters(model), flops_per_token(lm_config, data_cfg.seq_len)
    engine = build_engine(model, deepspeed_config(cfg))
    if initialised_from is not None:
        write_master_weights(engine, initial_weights)  # a 16-bit engine's fp32 masters: the source's, not rounded
        del initial_weights
    peak_flops, peak_source = resolve_peak_flops(trainer.peak_flops, engine.device,
                                                 sixteen_bit=engine.bfloat16_enabled() or engine.fp16_enabled())
    gas = trainer.gradient_accumulation_steps
    tokens_per_step = data_cfg.seq_len * data_cfg.micro_batch_size * gas * mesh.dp_size

    # ---- resume
    step, last_saved, last_eval, checkpoint, tokens_seen = 0, None, None, None, 0
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        step = int(state["step"])
        # counted as the steps ran: gradient_accumulation_steps may differ from the run that saved it
        tokens_seen = int(state.get("tokens_seen", step * tokens_per_step))
        train_loader.load_state_dict(state["data"])
        restore_rng(state["rng"])
        _schedule_lr(engine)
        last_saved = last_eval = step  # nothing new to save or evaluate until a step runs
        checkpoint = resume_from

    if is_main:  # once the start succeeded: a failed resume leaves the run's config.yaml that of its checkpoints
        OmegaConf.save(OmegaConf.create(run_config), output_dir / "config.yaml")
    logger = MetricsLogger(output_dir, run_config["logger"], run_config, enabled=is_main,
                           resumed=resume_from is not None)
    logger.forget_after(step)
    wrapper = type(engine.optimizer).__name__  # DeepSpeed's optimizer wrapper (or the bare torch optimizer)
    logger.write(
        f"LongNet LM: {num_params / 1e6:.2f}M parameters, {step_flops_per_token / 1e6:.1f} MFLOP/token at seq_len "
        f"{data_cfg.seq_len} | world {mesh.world_size} = dp {mesh.dp_size} x sp {mesh.sp_size} | "
        f"ZeRO stage {engine.zero_optimization_stage()}, {'bf16' if engine.bfloat16_enabled() else 'fp32'} "
        f"({wrapper}) | MFU of {peak_flops / 1e12:.4g} TFLOP/s per device ({peak_source}) | "
        f"{tokens_per_step:,} tokens/step | train {corpus['train'].num_tokens:,} tokens, "
        f"validation {corpus['validation'].num_tokens:,} | run dir {output_dir}"
        + (f" | resumed from {resume_from} at step {step}" if resume_from is not None else "")
        + (f" | weights from {initialised_from[0]} (step {initialised_from[1]['step']}, seq_len "
           f"{initialised_from[1]['seq_len']})" if initialised_from is not None else ""))
    logger.write(describe_branches(cfg))
    if step >= trainer.max_steps:
        logger.write(f"note: resumed at step {step}, and trainer.max_steps={trainer.max_steps}: nothing to train; "
                     f"raise trainer.max_steps to continue")
    advice = optimizer_advice(wrapper, on_gpu=next(engine.module.parameters()).is_cuda)
    if advice:
        logger.write(f"note: {advice}")

    def save(at_step: int) -> Path:
        check_finite_weights(engine.module, at_step, checkpoint)
        data_position = train_loader.state_dict()  # also in the manifest: a resume checks it before the engine
        return save_checkpoint(engine, checkpoint_root, at_step, client_state(
            at_step, data_position, run_config, tokens_seen=tokens_seen), keep_last=trainer.keep_last_checkpoints,
            manifest_extra={"data": data_position, "tokenizer": corpus["train"].meta["tokenizer"]})

    def run_eval(at_step: int) -> dict[str, Any]:
        result = evaluate(engine, val_loader, num_batches=trainer.eval_batches, seq_len=data_cfg.seq_len,
                          num_buckets=trainer.eval_position_buckets, sequence_group=mesh.sequence_group,
                          ignore_index=IGNORE_INDEX, tokens_per_byte=val_tokens_per_byte)
        logger.log_eval(at_step, result)
        return result

    # ---- loop
    started, last_loss, last_eval_loss, stop_reason = time.perf_counter(), float("nan"), float("nan"), None
    interval = Interval(comm_bytes_at_start=_comm_bytes())
    hide_progress = None if is_main and trainer.progress_bar else True  # tqdm: None = only on a terminal
    progress = tqdm(total=trainer.max_steps, initial=step, disable=hide_progress, dynamic_ncols=True, desc="train")
    with logging_redirect_tqdm():  # log lines print above the progress bar
        while step < trainer.max_steps:
            step_started = time.perf_counter()
            with profiled(engine.device, enabled=is_main and trainer.profile_step == step + 1) as found:
                loss, grad_norm, lr = _train_step(engine, train_loader, mesh.sequence_group, gas, step + 1,
                                                  trainer.nonfinite_loss, diagnostics_dir)
            step, tokens_seen = step + 1, tokens_seen + tokens_per_step
            if found:  # this step ran under torch.profiler (rank 0): its time includes the profiler's
                path = write_step_profile(output_dir, step, found, {"tokens": tokens_per_step})
                logger.write(format_summary(f"step {step} profiled ({path})", found["summary"], found["seconds"]))
            interval.seconds += time.perf_counter() - step_started
            interval.steps, interval.loss_sum = interval.steps + 1, interval.loss_sum + loss
            if grad_norm is not None:
                interval.grad_norms.append(grad_norm)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if step % trainer.log_every == 0 or step == trainer.max_steps:
                tokens_per_s = interval.steps * tokens_per_step / interval.seconds
                mean_loss = last_loss = interval.loss_sum / interval.steps
                logger.log_step({
                    "step": step, "loss": mean_loss, "bits_per_byte": bits_per_byte(mean_loss, train_tokens_per_byte),
                    "lr": lr,  # of the last step
                    "grad_norm": (float(np.mean([_logged_norm(norm) for norm in interval.grad_norms]))
                                  if interval.grad_norms else float("nan")),
                    "tokens_per_s": tokens_per_s,
                    "mfu": step_flops_per_token * tokens_per_s / (peak_flops * mesh.world_size),
                    "attn_comm_bytes_per_step": (_comm_bytes() - interval.comm_bytes_at_start) / interval.steps,
                    "peak_mem_bytes": peak_memory_bytes(engine.device),
                    "tokens_seen": tokens_seen, "elapsed_s": time.perf_counter() - started,
                })
                interval = Interval(comm_bytes_at_start=_comm_bytes())
            if trainer.eval_every and step % trainer.eval_every == 0:
                eval_started_bytes = _comm_bytes()
                last_eval_loss = run_eval(step)["loss"]
                interval.comm_bytes_at_start += _comm_bytes() - eval_started_bytes  # count training only
                last_eval = step
            if step % trainer.save_every == 0:
                checkpoint, last_saved = save(step), step
            if stop.sync(mesh):
                stop_reason = stop.signal_name
                break
    progress.close()

    # ---- end: final eval and checkpoint, then say where everything is
    if trainer.eval_every and last_eval != step and stop_reason is None:
        last_eval_loss = run_eval(step)["loss"]
    if last_saved != step:
        checkpoint = save(step)
    if stop_reason is not None:
        logger.write(f"stopped by {stop_reason} after step {step}; checkpoint {checkpoint}. Continue with: "
                     f"resume=auto trainer.output_dir={output_dir}")
    validation = "" if math.isnan(last_eval_loss) else f", validation loss {last_eval_loss:.4f}"
    logger.write(f"done: {step} steps in {time.perf_counter() - started:.1f} s, train loss {last_loss:.4f} "
                 f"(last log interval){validation}; checkpoint {checkpoint}; metrics {logger.metrics_path}")
    logger.finish()
    leave_distributed()
    return {"step": step, "loss": last_loss, "eval_loss": last_eval_loss, "output_dir": str(output_dir),
            "checkpoint": str(checkpoint), "stopped_by": stop_reason}
