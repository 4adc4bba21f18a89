"""`python -m longnet_dist.generate checkpoint=<run dir | checkpoint | exported folder> prompt="def "`:
sample text from a trained model (Hydra on configs/generate.yaml).

Decoding keeps every layer's keys and values (model/cache.py): the prompt runs as one forward pass, and each
new token then costs one row per layer against the cached rows, sum over the branches of w/r keys
(attention/decode.py), instead of a forward pass over the whole prefix. Each step's logits equal those of a
forward pass over that prefix (the model is causal: rotary positions 0..n-1, dilated segments that start at
position 0; tested to 1e-12 in float64). `use_cache=False` recomputes the whole prefix each step instead.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def check_sampling(temperature, top_k, max_new_tokens) -> None:
    """ValueError naming the bad value: temperature >= 0 (0 = greedy), top_k null/0 or >= 1, max_new_tokens >= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy, 1: the model's "
                         f"distribution, e.g. 0.8)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be null or 0 (no cut) or a positive integer (e.g. 50)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")


def next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """One token id from `logits` (V,): argmax when temperature is 0, else a sample of softmax(logits /
    temperature) restricted to the top_k most likely ids."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth_largest = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_generate_ids(prompt_ids, banned_ids, stop_id, seed, vocab_size: int) -> None:
    """generate_ids' token arguments, before any compute: TypeError/ValueError naming the bad one."""
    ids_range = f"0..{vocab_size - 1} (the model's vocabulary)"
    if not isinstance(prompt_ids, (list, tuple)):
        hint = "; for a tensor of ids pass ids.tolist()" if isinstance(prompt_ids, Tensor) else ""
        raise TypeError(f"prompt_ids must be a list of Python ints (token ids in {ids_range}), got "
                        f"{type(prompt_ids).__name__}{hint}")
    not_ints = [token for token in prompt_ids if not _is_int(token)]
    if not_ints:
        raise TypeError(f"prompt_ids must be a list of Python ints (token ids in {ids_range}), but holds "
                        f"{not_ints[:5]!r} (of type {type(not_ints[0]).__name__})")
    bad = [token for token in prompt_ids if not 0 <= token < vocab_size]
    if not prompt_ids or bad:
        raise ValueError(f"prompt token ids {bad or prompt_ids} must be a non-empty list of ids in 0..{vocab_size - 1} "
                         f"(the model's vocabulary)")
    if not isinstance(banned_ids, (list, tuple, set, frozenset)) or not all(_is_int(token) for token in banned_ids):
        raise TypeError(f"banned_ids={banned_ids!r} must be a tuple, list or set of int token ids in {ids_range}")
    bad = sorted({token for token in banned_ids if not 0 <= token < vocab_size})
    if bad:
        raise ValueError(f"banned_ids {bad} are outside {ids_range}")
    if len(set(banned_ids)) == vocab_size:
        raise ValueError(f"banned_ids bans all {vocab_size} ids of the vocabulary: no token is left to generate")
    if stop_id is not None and not (_is_int(stop_id) and 0 <= stop_id < vocab_size):
        raise ValueError(f"stop_id={stop_id!r} must be None (no stop) or a token id in {ids_range}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed={seed!r} must be an integer or None (a fresh seed each call)")
    if seed is not None and not -2**63 <= seed < 2**64:
        raise ValueError(f"seed={seed} must be in [-2**63, 2**64 - 1] (what torch.Generator.manual_seed takes)")


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = 0, stop_id: int | None = None,
                 banned_ids: tuple[int, ...] = (), step_logits: list[Tensor] | None = None,
                 use_cache: bool = True) -> list[int]:
    """The new token ids after `prompt_ids` (stops early after `stop_id`, which is not returned).

    With `use_cache` the prompt runs once and each step one new row (the module docstring); without, every
    step runs the model over the whole prefix. `banned_ids` (e.g. the pad id) are never sampled. When `step_logits` is a list, each step's raw
    last-position logits (V,) are appended to it.
    """
    check_sampling(temperature, top_k, max_new_tokens)
    vocab_size = model.config.vocab_size
    check_generate_ids(prompt_ids, banned_ids, stop_id, seed, vocab_size)
    device = next(model.parameters()).device
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids, new = torch.tensor([prompt_ids], device=device), []  # (1, n)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None
    feed = ids  # the rows the model has not seen: the prompt, then each new token
    for _ in range(max_new_tokens):
        # (V,) the last position's logits: from the cached rows, or a full forward pass over the prefix
        logits = model(feed, cache=cache)[0, -1] if use_cache else model(ids)[0, -1]
        if step_logits is not None:
            step_logits.append(logits.clone())
        if banned_ids:
            logits = logits.clone()
            logits[sorted(set(banned_ids))] = -math.inf
        token = next_token(logits, temperature, top_k, generator)
        if token == stop_id:
            break
        new.append(token)
        feed = ids.new_tensor([[token]])  # (1, 1)
        ids = torch.cat([ids, feed], dim=1)
    return new


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device (ValueError if unusable)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu or auto")
    return resolved


def generate_text(cfg: DictConfig) -> str:
    """The prompt followed by the sampled continuation, as configured by configs/generate.yaml."""
    from longnet_dist.data.tokenizer import load_tokenizer
    from longnet_dist.train.export import load_model

    check_sampling(cfg.temperature, cfg.top_k, cfg.max_new_tokens)
    if cfg.seed is not None and not _is_int(cfg.seed):
        raise ValueError(f"seed={cfg.seed!r} must be an integer or null (a fresh seed each run)")
    for name in ("stop_at_eod", "use_cache"):
        if not isinstance(cfg[name], bool):
            raise ValueError(f"{name}={cfg[name]!r} must be true or false")
    device = resolve_device(str(cfg.device))
    if cfg.checkpoint is None:
        raise ValueError("checkpoint is required: a run directory, a checkpoint folder or an exported folder")
    model, meta = load_model(str(cfg.checkpoint), device=device)
    tokenizer = load_tokenizer(meta["tokenizer"])
    # an empty prompt starts a new document: the context is the end-of-document id alone
    prompt_ids = [int(i) for i in tokenizer.encode(cfg.prompt)] if cfg.prompt else [tokenizer.eod_id]
    bad = sorted({i for i in prompt_ids if i >= model.config.vocab_size})
    if bad:
        raise ValueError(f"prompt {cfg.prompt!r} has token ids {bad} outside the model's vocabulary "
                         f"0..{model.config.vocab_size - 1}: tokenizer {meta['tokenizer']!r} does not match the model")
    outside = {name: getattr(tokenizer, name) for name in ("eod_id", "pad_id")
               if getattr(tokenizer, name) >= model.config.vocab_size}
    if outside:
        raise ValueError(f"tokenizer {meta['tokenizer']!r} has {', '.join(f'{k}={v}' for k, v in outside.items())} "
                         f"outside the model's vocabulary 0..{model.config.vocab_size - 1}: it does not match the "
                         f"model")
    max_length = cfg.max_length if cfg.max_length is not None else meta["seq_len"]
    if len(prompt_ids) + cfg.max_new_tokens > max_length:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens={cfg.max_new_tokens} = "
                         f"{len(prompt_ids) + cfg.max_new_tokens} tokens exceeds max_length={max_length} (the training "
                         f"sequence length unless set); shorten them or set max_length (the model has no hard limit, "
                         f"but positions past the trained length are untrained)")
    new = generate_ids(model, prompt_ids, cfg.max_new_tokens, temperature=float(cfg.temperature), top_k=cfg.top_k,
                       seed=cfg.seed, stop_id=tokenizer.eod_id if cfg.stop_at_eod else None,
                       banned_ids=(tokenizer.pad_id,), use_cache=cfg.use_cache)
    return cfg.prompt + tokenizer.decode(new)


@hydra.main(config_path=str(CONFIG_DIR), config_name="generate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from longnet_dist.train.checkpoint import CheckpointError

    try:
        text = generate_text(cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        sys.exit(f"longnet-generate: {error}")
    print(text)


def quote_prompt(argument: str) -> str:
    """`prompt=def main(` -> `prompt='def main('`: any text reaches the model as it is, without Hydra's
    override grammar (parentheses, commas, quotes). An already quoted value is left alone."""
    key, _, value = argument.partition("=")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return argument
    value = re.sub(r"(\\*)'", lambda match: match.group(1) * 2 + "\\'", value)  # backslashes before a quote double
    value = re.sub(r"(\\+)$", lambda match: match.group(1) * 2, value)  # and at the end (before the closing quote)
    return f"{key}='{value}'"


def main() -> None:
    sys.argv = [quote_prompt(arg) if arg.startswith("prompt=") else arg for arg in sys.argv]
    _hydra_main()


if __name__ == "__main__":
    main()
