"""What the three alignment scripts share (two_stage_baseline.py, hbat.py, ld_align.py).

The method comes first: the shared settings and their defaults; how a (prompt, response) becomes tokens and labels;
batches and masking; log-probs; the losses, each beside its equation; the Fisher/EWC math; the training loops (with
precision and gradient clipping); generation and evaluation. Below the MACHINERY banner (skip it): the built-in task,
loading models, reading data files and row formats into (prompt, response) text, the command line, output folders and
checkpoints, set-up, torchrun.
Conventions: labels are built before padding; prompt and padding positions are labelled IGNORE_INDEX; EOS ends
every response and is labelled (only truncation can cut it); log-probs are float32.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import set_seed

IGNORE_INDEX = -100  # the label of a position no loss reads: prompt and padding


# ==== Settings every script shares: the defaults are the built-in task's ====================================

@dataclass
class TrainConfig:
    """Settings every script shares. Defaults fit the built-in task on the tiny model; for a real model lower the
    learning rates (README). A comment's [a, b) is the flag's range, {a, b} its choices: both are enforced."""
    # --- model and data
    model: str = "tiny"  # Hugging Face model name or folder; tiny = the built-in task's small Llama, warm-started (tiny-random: not)
    trust_remote_code: bool = False  # allow a hub model's own Python code (only for models you trust)
    sft_data: str = ""  # SFT rows: a file, data set folder or hub name (README: formats); empty = the built-in task
    pref_data: str = ""  # preference rows: a file, data set folder or hub name; empty = the built-in task
    eval_data: str = ""  # held-out SFT-format rows for evaluation; empty = the last --eval_size rows of --sft_data
    sft_split: str = "train"  # split of --sft_data (a slice works: train_sft[:2000])
    pref_split: str = "train"  # split of --pref_data
    eval_split: str = "test"  # split of --eval_data
    sft_config: str = ""  # config of --sft_data when its README.md lists several (datasets' name, e.g. smoltalk's all); empty = the default
    pref_config: str = ""  # config of --pref_data
    eval_config: str = ""  # config of --eval_data
    eval_size: int = 100  # number of test prompts [1, inf)
    n_sft: int = 3000  # SFT rows: generated (built-in task), or the first n_sft of --sft_data (0 = all) [0, inf)
    n_pref: int = 2000  # preference pairs: generated, or the first n_pref of --pref_data (0 = all) [0, inf)
    max_length: int = 512  # prompt + response tokens; longer rows are truncated [2, inf)
    max_prompt_length: int = 256  # a truncated prompt keeps at least its last this-many tokens [1, inf)
    last_turn_only: bool = False  # chat SFT: only a conversation's last assistant turn carries the loss (default: every assistant turn)
    show_examples: int = 0  # print the first N examples of each training set as the model sees them, the tokens with a loss in [[ ]], and exit [0, inf)
    # --- optimisation: every stage has its own AdamW and schedule
    seed: int = 0  # seeds data generation, initialisation, shuffling and sampling [0, 4294967295]
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda | cuda:N
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on CUDA, float32 on CPU {auto, float32, bfloat16, bf16}
    batch_size: int = 32  # examples or pairs per optimizer step [1, inf)
    grad_accum_steps: int = 1  # micro-batches per optimizer step (the same update, less memory) [1, inf)
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~1/3 more compute
    precompute_ref_logps: bool = False  # DPO: the reference's log-probs computed once, before training; no reference model held
    fsdp: bool = False  # under torchrun: shard each transformer layer over the processes with FSDP2 (default: DDP)
    sft_epochs: int = 3  # passes over the SFT data (per stage in HBAT) [0, inf)
    sft_lr: float = 1e-3  # SFT learning rate (tiny model; ~2e-5 for a real one) (0, inf)
    pref_epochs: int = 1  # passes over the preference data (DPO pairs or PPO prompts) [1, inf)
    pref_lr: float = 2e-4  # DPO / PPO policy learning rate (tiny model; ~5e-7 to 1e-6 for a real one) (0, inf)
    lr_scheduler_type: str = "constant"  # the learning rate after the warm-up, in every stage {constant, linear, cosine}
    warmup_steps: int = 10  # linear warm-up at the start of every stage (at most half the stage) [0, inf)
    warmup_ratio: float = 0.0  # if above 0: the warm-up is this fraction of each stage's steps instead [0, 1]
    weight_decay: float = 0.0  # AdamW weight decay (matrices only) [0, inf)
    adam_beta1: float = 0.9  # AdamW beta1 [0, 1)
    adam_beta2: float = 0.999  # AdamW beta2 [0, 1)
    max_grad_norm: float = 1.0  # gradient clipping (0, inf)
    # --- DPO, and the joint objective
    beta: float = 0.1  # DPO temperature on the log-ratios (0, inf)
    loss_type: str = "sigmoid"  # DPO loss {sigmoid, ipo}
    label_smoothing: float = 0.0  # conservative DPO: the assumed fraction of flipped labels [0, 0.5)
    sft_coef: float = 0.0  # joint objective: + this times the SFT loss in every preference update (DPO: the chosen response's per-token NLL; PPO: an SFT batch) [0, inf)
    # --- reward model and PPO
    rm_epochs: int = 1  # reward-model passes over the preference pairs [1, inf)
    rm_lr: float = 1e-4  # reward-model learning rate (0, inf)
    value_lr: float = 1e-4  # value-model learning rate (it starts from the reward model) (0, inf)
    ppo_batch_size: int = 64  # prompts per rollout [1, inf)
    ppo_epochs: int = 2  # optimisation passes over each rollout [1, inf)
    ppo_minibatches: int = 2  # minibatches (optimizer steps) per pass [1, inf)
    ppo_micro_batch_size: int = 4  # sequences per PPO forward and backward (gradients accumulated): bounds PPO's memory [1, inf)
    critic: bool = True  # PPO with a value model and GAE; --no-critic: the HBAT authors' critic-free PPO (README)
    kl_coef: float = 0.05  # per-token KL penalty to the reference [0, inf)
    gamma: float = 1.0  # discount [0, 1]
    lam: float = 0.95  # GAE lambda [0, 1]
    clip: float = 0.2  # policy ratio clip (0, inf)
    value_clip: float = 0.2  # value clip (0, inf)
    temperature: float = 1.0  # rollout sampling temperature (PPO's log-probs use the same) (0, inf)
    # --- evaluation and output
    max_new_tokens: int = 32  # generation limit (evaluation and rollouts) [1, inf)
    eval_samples: int = 4  # responses sampled at temperature 1 per test prompt, scored beside the greedy one (0 = greedy only) [0, inf)
    eval_batch_size: int = 64  # prompts per generation batch [1, inf)
    reward_model: str = ""  # real data: a reward model folder (same tokenizer) that scores evaluations
    output_dir: str = "runs/out"  # models, metrics.jsonl and results.json go here
    overwrite: bool = False  # replace the run in --output_dir (kept aside until this one finishes)
    resume: bool = False  # continue the interrupted run in --output_dir from its last checkpoint
    debug: bool = False  # on an error, show the Python traceback too (or set ALIGN_DEBUG=1)


# ==== Tokens and labels: how a (prompt, response) becomes a training example ================================

def prompt_text(prompt) -> str:
    """A prompt's text: the string, or its segments joined."""
    return prompt if isinstance(prompt, str) else "".join(text for text, _ in prompt)

def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids, with BOS where the tokenizer normally adds it (chat templates carry their own)."""
    ids, bos = tokenizer(text, add_special_tokens=False).input_ids, tokenizer.bos_token_id
    return [bos] + ids if bos is not None and ids[:1] != [bos] and tokenizer("a").input_ids[:1] == [bos] else ids

def encode_context(tokenizer, prompt) -> tuple[list[int], list[int]]:
    """A prompt's ids and labels: IGNORE_INDEX, but for the ids of segments marked trained (a conversation's earlier assistant
    turns). Segments are tokenized apart, like prompt and response."""
    segments = [(prompt, False)] if isinstance(prompt, str) else prompt
    ids, labels = [], []
    for k, (text, trained) in enumerate(segments):
        part = encode_prompt(tokenizer, text) if k == 0 else tokenizer(text, add_special_tokens=False).input_ids
        ids, labels = ids + part, labels + (part if trained else [IGNORE_INDEX] * len(part))
    return ids, labels

def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids + EOS, tokenized apart from the prompt so the boundary never drifts."""
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

def keep_last(ids: list[int], n: int, bos_id: int | None = None) -> list[int]:
    """The last n tokens of ids; a leading BOS survives the cut (it still counts towards n)."""
    if len(ids) <= n:
        return ids
    if n > 0 and bos_id is not None and ids[:1] == [bos_id]:
        return [bos_id] + ids[len(ids) - n + 1:]
    return ids[len(ids) - n:] if n > 0 else []

def kept_labels(labels: list[int], ids: list[int], kept: list[int], bos_id: int | None) -> list[int]:
    """The labels of the tokens that keep_last(ids, ...) kept: a leading BOS and the last ones."""
    if len(kept) == len(ids):
        return labels
    head = 1 if kept and bos_id is not None and ids[:1] == [bos_id] else 0
    return labels[:head] + labels[len(labels) - len(kept) + head:]

def truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int, bos_id: int | None = None):
    """Over max_length, the prompt loses its left side first (as much as needed, never below max_prompt_length tokens), then
    the responses their right side (and EOS). None if no response token is left."""
    longest = max(map(len, responses))
    if len(prompt_ids) + longest > max_length:
        prompt_ids = keep_last(prompt_ids, max(max_length - longest, max_prompt_length), bos_id)
        responses = [r[: max(max_length - len(prompt_ids), 0)] for r in responses]
    return None if min(map(len, responses)) == 0 else (prompt_ids, responses)

def generation_prompt(tokenizer, text: str, cfg) -> list[int]:
    """Prompt ids for generation, cut by the training rule so that --max_new_tokens still fit."""
    return keep_last(encode_prompt(tokenizer, text), max(cfg.max_length - cfg.max_new_tokens, cfg.max_prompt_length), tokenizer.bos_token_id)

def tokenize(texts: list[tuple], tokenizer, max_length: int, max_prompt_length: int) -> tuple[list[dict], dict]:
    """Tokenized, truncated (prompt, response, ...) texts: examples ({"input_ids", "labels", "prompt", "reference", "prompt_ids"},
    or {"chosen", "rejected", "prompt", "prompt_ids"}) and counts: prompt_cut, response_cut, skipped (no room), identical
    (chosen == rejected), and earlier_turns: the assistant turns before the last that carry the loss (segmented prompts)."""
    examples, counts = [], {"prompt_cut": 0, "response_cut": 0, "skipped": 0, "identical": 0, "earlier_turns": 0}
    for prompt, *responses in texts:
        if len(responses) == 2 and responses[0] == responses[1]:
            counts["identical"] += 1
            continue
        (prompt_ids, prompt_labels), response_ids = encode_context(tokenizer, prompt), [encode_response(tokenizer, r) for r in responses]
        cut = truncate(prompt_ids, response_ids, max_length, max_prompt_length, tokenizer.bos_token_id)
        counts["skipped"] += cut is None
        if cut is None:
            continue
        counts["prompt_cut"] += len(cut[0]) < len(prompt_ids)
        counts["response_cut"] += any(len(a) < len(b) for a, b in zip(cut[1], response_ids))
        if len(responses) == 1:
            labels = kept_labels(prompt_labels, prompt_ids, cut[0], tokenizer.bos_token_id)
            counts["earlier_turns"] += sum(a == IGNORE_INDEX != b for a, b in zip([IGNORE_INDEX, *labels], labels))  # (those kept)
            examples.append({**sequence(cut[0], cut[1][0], labels), "prompt": prompt_text(prompt), "reference": responses[0],
                             "prompt_ids": cut[0]})
        else:
            examples.append({"chosen": sequence(cut[0], cut[1][0]), "rejected": sequence(cut[0], cut[1][1]), "prompt": prompt,
                             "prompt_ids": cut[0]})
    return examples, counts


# ==== Batches and masking ===================================================================================

def sequence(prompt_ids: list[int], response_ids: list[int], prompt_labels: list[int] | None = None) -> dict:
    """One (prompt, response) as input ids and labels, before any padding: prompt labels are IGNORE_INDEX (or prompt_labels:
    a conversation's earlier assistant turns keep their ids, so they carry the loss too)."""
    return {"input_ids": prompt_ids + response_ids,
            "labels": ([IGNORE_INDEX] * len(prompt_ids) if prompt_labels is None else prompt_labels) + response_ids}

def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    fill = [[value] * (max(map(len, seqs)) - len(s)) for s in seqs]
    return torch.tensor([s + f if side == "right" else f + s for s, f in zip(seqs, fill)])

def collate(seqs: list[dict], pad_id: int) -> dict:
    """A right-padded batch. Labels are padded with IGNORE_INDEX, never with the pad id (pad may be EOS)."""
    return {"input_ids": pad([s["input_ids"] for s in seqs], pad_id),
            "attention_mask": pad([[1] * len(s["input_ids"]) for s in seqs], 0),
            "labels": pad([s["labels"] for s in seqs], IGNORE_INDEX)}

def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """Chosen then rejected in one batch, for one concatenated forward: rows [:n] chosen, [n:] rejected."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)

def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """PPO: left-padded prompts, then right-padded responses, labelled; response token t at column Q + t ("query_width")."""
    query, response = pad(prompts, pad_id, "left"), pad(responses, pad_id, "right")
    query_mask, response_mask = pad([[1] * len(p) for p in prompts], 0, "left"), pad([[1] * len(r) for r in responses], 0)
    labels = torch.cat([torch.full_like(query, IGNORE_INDEX), response.masked_fill(response_mask == 0, IGNORE_INDEX)], 1)
    return {"input_ids": torch.cat([query, response], 1), "attention_mask": torch.cat([query_mask, response_mask], 1),
            "labels": labels, "query_width": query.shape[1]}

def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

def select(batch: dict, rows) -> dict:
    """Some rows of a batch: tensors indexed, other entries kept."""
    return {k: v[rows] if torch.is_tensor(v) else v for k, v in batch.items()}

def response_tokens(example: dict) -> int:
    """The tokens a loss is taken over: the labelled positions after the first (the first is never predicted)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])

def split(items: list, n: int) -> list[list]:
    """n contiguous parts of `items`, sizes differing by at most one."""
    bounds = [round(i * len(items) / n) for i in range(n + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]

def batches_of(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]

def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions follow the mask, so a left-padded row starts at 0 like a right-padded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ==== Log-probs =============================================================================================

def token_logps(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(labels[:, t+1] | tokens <= t) at every position t, float32 (B, T-1), and the mask of labelled
    positions (the others get 0); `temperature` divides the logits (PPO's sampling temperature). The plain
    computation of the DPO authors' reference trainer: a forward, a log-softmax, the label's entry. The fast path: where the
    output layer is a plain linear head (output_head_is_plain), the first line hands over to fast_token_logps, the same numbers
    without the [B, T, V] logits (both equal a brute-force loop: tests/test_losses.py::test_logps_match_brute_force_loop)."""
    if FAST_LOGPS and output_head_is_plain(model):
        return fast_token_logps(model, batch, temperature)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logps = (logits[:, :-1].float() / temperature).log_softmax(-1)
    logps = logps.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return torch.where(mask, logps, 0.0), mask

def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed response log-prob log pi(y | x) (float32), and its number of response tokens."""
    logps, mask = token_logps(model, batch)
    return logps.sum(-1), mask.sum(-1)

def concatenated_logps(model, pair_batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi(y_w | x) and log pi(y_l | x) from one forward over collate_pairs' batch, and |y_w| in tokens."""
    logps, n_tokens = sequence_logps(model, pair_batch)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:], n_tokens[:n]

def response_logps(model, rollout: dict, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of a rollout's response tokens, aligned to its response columns (B, R)."""
    return token_logps(model, rollout, temperature)[0][:, rollout["query_width"] - 1:]

def score_tokens(model, input_ids, attention_mask) -> torch.Tensor:
    """A scalar-head model's output at every token, float32 (the value model's V(s_t))."""
    hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                                     position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return model.score(hidden.last_hidden_state).squeeze(-1).float()

def sequence_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """The reward r(x, y): the scalar head at each row's last real token (the EOS; found by position, so
    pad == EOS is safe), for left or right padding."""
    last = attention_mask.shape[1] - 1 - attention_mask.long().flip(1).argmax(1)
    return score_tokens(model, input_ids, attention_mask).gather(1, last.unsqueeze(1)).squeeze(1)

def response_values(value_model, rollout: dict) -> torch.Tensor:
    """V(s_t) for each response token t: the value head on the token just before it (B, R)."""
    return score_tokens(value_model, rollout["input_ids"], rollout["attention_mask"])[:, rollout["query_width"] - 1:-1]

# ---- Fast log-probs (optional reading): token_logps' numbers without the [B, T, V] logits ------------------
# Only labelled positions reach the output layer, and LinearLogProbs computes log softmax(h W^T / t)[y] for
# them in row chunks with a hand-written backward (d log p_y / dz = onehot(y) - softmax(z)): no [B, T, V]
# tensor, nor a float32 copy of one, is made. tests/test_losses.py checks values and gradients against the
# plain token_logps.

FAST_LOGPS = True  # fast_token_logps wherever the output layer is plain (tests switch it off to compare)
KEEP_LOGITS_BYTES, CHUNK_BYTES = 1 << 30, 1 << 28  # keep exp(logits) for the backward up to 1 GiB; chunks of 256 MiB

def output_head_is_plain(model) -> bool:
    """Logits = lm_head(last hidden state) (Llama, Qwen, GPT-2, ...); not for models that scale or soft-cap them."""
    config = model.config.get_text_config()
    scaled = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return isinstance(model.get_output_embeddings(), torch.nn.Linear) and all(getattr(config, k, None) is None for k in scaled)

def fast_token_logps(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logps: the transformer body over the batch, the output layer over the labelled positions only."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    positions, head = mask.flatten().nonzero().squeeze(1), model.get_output_embeddings()
    hidden = getattr(model, model.base_model_prefix)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                     position_ids=position_ids_from_mask(batch["attention_mask"]),
                                                     use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].flatten(0, 1).index_select(0, positions)
    rows = LinearLogProbs.apply(hidden, head.weight, head.bias, labels.flatten().index_select(0, positions), temperature)
    logps = torch.zeros(mask.numel(), dtype=torch.float32, device=rows.device).index_copy(0, positions, rows.float())
    return logps.view(mask.shape), mask

class LinearLogProbs(torch.autograd.Function):
    """log softmax((hidden_i W^T + b) / t)[target_i] for each row of hidden (N, H), float32 (N,). The backward
    needs e = exp(z / t - max): kept from the forward while it fits in KEEP_LOGITS_BYTES, else recomputed.
    Under autocast the matmuls run in the autocast dtype and the softmax in float32, as a model's own output
    layer and a log_softmax would."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float):
        compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        keep = any(ctx.needs_input_grad[:3]) and hidden.shape[0] * weight.shape[0] * 4 <= KEEP_LOGITS_BYTES
        step = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        kept, row_max, row_sum, target = [], [], [], []
        for start in range(0, hidden.shape[0], step):
            z = _logits(hidden[start:start + step], weight, bias, compute)
            m = z.amax(-1).to(torch.promote_types(compute, torch.float32)) / temperature
            target.append(z.gather(1, targets[start:start + step, None]).squeeze(1).to(m.dtype) / temperature - m)
            e = _exp_logits(z, m, temperature)
            row_max.append(m), row_sum.append(e.sum(-1)), kept.append(e if keep else None)
        stats = [torch.cat(x) if x else hidden.new_zeros(0, dtype=torch.promote_types(compute, torch.float32))
                 for x in (row_max, row_sum, target)]
        ctx.save_for_backward(hidden, weight, bias, targets, *stats[:2])
        ctx.kept, ctx.step, ctx.temperature, ctx.compute = kept if keep else None, step, temperature, compute
        return stats[2] - torch.log(stats[1])  # log softmax_y = (z_y / t - m) - log sum exp(z / t - m)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, row_max, row_sum = ctx.saved_tensors
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # weight gradients summed over chunks in float32
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        for i, start in enumerate(range(0, hidden.shape[0], ctx.step)):
            rows = slice(start, start + ctx.step)
            e = ctx.kept[i] if ctx.kept else _exp_logits(_logits(hidden[rows], weight, bias, ctx.compute), row_max[rows], ctx.temperature)
            g = grad_logps[rows].to(e.dtype) / ctx.temperature  # dL/dz = g (onehot(y) - softmax(z / t)) / t, in place of e
            grad_z = e.mul_((-g / row_sum[rows])[:, None]).scatter_add_(1, targets[rows, None], g[:, None]).to(ctx.compute)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_z @ weight.to(ctx.compute)).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                part = (grad_z.t() @ hidden[rows].to(ctx.compute)).to(accumulate)
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
            if ctx.needs_input_grad[2]:
                part = grad_z.to(accumulate).sum(0)
                grad_bias = part if grad_bias is None else grad_bias.add_(part)
        ctx.kept = None
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)

def _logits(hidden, weight, bias, compute) -> torch.Tensor:
    z = hidden.to(compute) @ weight.to(compute).t()
    return z if bias is None else z + bias.to(compute)

def _exp_logits(z, row_max, temperature: float) -> torch.Tensor:
    """exp(z / t - row_max) in (at least) float32, in place of z when z is float32 already."""
    e = z.to(torch.promote_types(z.dtype, torch.float32))
    if temperature != 1.0:
        e /= temperature
    return e.sub_(row_max[:, None]).exp_()


# ==== Losses ================================================================================================

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, weights=None):
    """Per-pair DPO losses and implicit rewards beta log(pi / ref), where
    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)] and
        sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing: conservative DPO)
        ipo:     (h - 1 / (2 beta))^2                                         (Azar et al.)
    `weights` scales each pair's loss (LD-Align's latent-distance weights)."""
    chosen_logratios, rejected_logratios = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid, ipo)")
    if weights is not None:
        losses = losses * weights
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()

def joint_loss(preference_losses, chosen_logps, chosen_tokens, sft_coef: float):
    """The joint objective (RPO): each pair's preference loss plus a times the chosen response's per-token
    NLL, L = L_DPO - a log pi(y_w | x) / |y_w|."""
    return preference_losses - sft_coef * chosen_logps / chosen_tokens

def bradley_terry_loss(chosen_scores, rejected_scores):
    """The reward model's loss per pair: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(chosen_scores - rejected_scores)

def masked_mean(x, mask):
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum()

def masked_whiten(x, mask):
    """(x - mean) / std over the masked entries (unbiased variance); the rest stays as it was."""
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    return torch.where(mask.bool(), centered * torch.rsqrt(var + 1e-8), x)

def ppo_rewards(scores, logps, ref_logps, mask, kl_coef: float):
    """Per-token reward: -kl_coef (log pi(y_t) - log ref(y_t)) at every response token (the k1 KL estimate),
    plus the reward model's score r(x, y) on the last one."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    rewards[torch.arange(rewards.shape[0]), mask.long().sum(1) - 1] += scores  # right-padded: the last token is len - 1
    return rewards

def critic_free_rewards(scores, logps, ref_logps, mask, kl_coef: float, gamma: float, reward_clip: float = 10.0):
    """The HBAT authors' critic-free PPO reward at token t of a T-token response:
    clip(r, -10, 10) gamma^(T-1-t) - kl_coef max(log pi(y_t) - log ref(y_t), 0); whitened, the advantages."""
    steps_to_end = (mask.sum(1, keepdim=True) - 1 - torch.arange(mask.shape[1], device=mask.device)).clamp(min=0)
    discounted = scores.clamp(-reward_clip, reward_clip)[:, None] * gamma ** steps_to_end
    return (discounted - kl_coef * (logps - ref_logps).clamp(min=0)) * mask

def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over right-padded response tokens:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns = A + V;
    V after the last token is 0 (the episode ends with the response)."""
    rewards, values = rewards * mask, values * mask
    advantages, next_advantage = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        next_advantage = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages * mask, advantages * mask + values

def ppo_policy_loss(logps, old_logps, advantages, mask, clip: float = 0.2):
    """Clipped surrogate: token mean of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = pi / pi_old; and
    the fraction of tokens clipped."""
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)

def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss: 0.5 token mean of max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)


# ==== Fisher information and elastic weight consolidation ===================================================
# Plain tensors in, tensors or floats out. Under torchrun the caller hands in this rank's part of the
# weights (my_part), so that the parts add up over ranks to the one-process value.

def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}

def snapshot(params: dict) -> dict[str, torch.Tensor]:
    """A detached copy of some tensors: an EWC anchor, or the weights before a stage."""
    return {name: p.detach().clone() for name, p in params.items()}

def empirical_fisher(model, examples: list[dict], device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher F = mean_i (d log pi(y_i | x_i) / d theta)^2, one sample at a time with the
    data's own labels (the square of a batch-mean gradient, or argmax labels, would be wrong)."""
    params = trainable(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for example in examples:
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logps, _ = sequence_logps(model, to_device(collate([example], model.config.pad_token_id), device))
        logps.sum().backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    return {name: f / len(examples) for name, f in fisher.items()}

def ewc_penalty(params: dict, fisher: dict, anchor: dict, lam: float) -> torch.Tensor:
    """Textbook EWC: (lambda / 2) sum_j F_j (theta_j - anchor_j)^2."""
    terms = [(fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items()]
    return 0.5 * lam * sum(terms) if terms else torch.zeros(())

def drift_importance(before: torch.Tensor, after: torch.Tensor, mse_factor: float = 1e10) -> float:
    """HBAT's raw importance of a tensor n, F_n = mean(((theta_after - theta_before) s)^2): how far the other
    objective's most recent stage moved it (in float64: s = 1e10 squares to 1e20)."""
    return (((after.double() - before.double()) * mse_factor) ** 2).mean().item()

def accumulate_importance(previous: dict | None, new: dict) -> dict[str, float]:
    """Raw importance is carried across rounds by addition, R = R_previous + F (one R per stage type)."""
    return dict(new) if previous is None else {n: previous[n] + new[n] for n in new}

def softmax_importance(raw: dict) -> dict[str, float]:
    """w = softmax over the tensors of the raw importance (the released code; one-hot at s = 1e10)."""
    return dict(zip(raw, torch.softmax(torch.tensor(list(raw.values()), dtype=torch.float64), dim=0).tolist()))

def sum_importance(raw: dict) -> dict[str, float]:
    """w = R / sum R: each tensor weighted in proportion to its raw importance (s cancels out)."""
    total = math.fsum(raw.values())
    return {n: (v / total if total > 0 else 1.0 / len(raw)) for n, v in raw.items()}

def weight_spread(weights: dict) -> tuple[float, float]:
    """(entropy in nats, largest weight): (0, 1) when one-hot, (ln n, 1/n) when uniform over n tensors."""
    return max(0.0, -math.fsum(w * math.log(w) for w in weights.values() if w > 0)), max(weights.values())

def hbat_penalty(params: dict, weights: dict, anchor: dict, lam: float = 1.0, max_weight: float = 100.0) -> torch.Tensor:
    """HBAT's modified EWC: L_ewc = M sum_n w_n sum_j (lambda (theta_nj - anchor_nj))^2 (w_n = 0: skipped)."""
    terms = [weights[n] * ((lam * (p - anchor[n])) ** 2).sum() for n, p in params.items() if weights.get(n, 0.0) != 0.0]
    return max_weight * sum(terms) if terms else torch.zeros(())


# ==== Training loops: a supervised stage (SFT, DPO, reward model), a PPO step ===============================
# Every stage has its own AdamW and learning-rate schedule, as if it ran as its own job. `penalty` returns
# a scalar added to the loss at every optimizer step (HBAT's EWC). A non-finite loss, metric or gradient
# norm stops the run before the optimizer steps.

def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: auto = bfloat16 on CUDA, float32 on CPU. Weights stay float32 (mixed precision),
    so optimizer state and small updates are not lost to bf16 rounding."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype in ("bfloat16", "bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype {dtype}: this GPU has no bfloat16 support; use --dtype float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]

def autocast(device: torch.device, dtype: torch.dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)

def clip_gradients(params: list, max_norm: float) -> float:
    """clip_grad_norm_ (returns the norm before clipping); with FSDP shards by hand: shards' squares summed over ranks."""
    if not any(is_sharded(p) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [(local(p.grad), is_sharded(p)) for p in params if p.grad is not None]
    sharded = sum_over_ranks(sum(((g.float() ** 2).sum() for g, s in grads if s), torch.zeros((), device=grads[0][0].device)))
    norm = (sharded + sum((g.float() ** 2).sum() for g, s in grads if not s)).sqrt()
    for g, _ in grads:
        g.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm.item()

def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The learning rate of optimizer step `step` (from 0) of a `total`-step stage, as a fraction of the
    peak: (step + 1) / warmup in the warm-up, then constant, or a linear or cosine decay towards 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[kind]

def adamw(params: list, cfg, lr: float):
    """Fused AdamW; weight decay on matrices only (not on biases and norms). FSDP shards and whole tensors
    go in separate groups (a fused step may not mix them)."""
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0} for decay in (True, False) for sharded in (False, True)
              if (ps := [p for p in params if (p.ndim >= 2) == decay and is_sharded(p) == sharded])]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)

def stage_optimizer(params: list, cfg, lr: float, total_steps: int):
    """A stage's AdamW and its schedule. The warm-up is --warmup_ratio of the stage if set, else
    --warmup_steps, and at most half the stage (so a short HBAT stage still reaches its learning rate)."""
    optimizer = adamw(params, cfg, lr)
    warmup = min(math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio > 0 else cfg.warmup_steps, total_steps // 2)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.lr_scheduler_type))

def check_finite(metrics: dict[str, float], where: str) -> None:
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"{where}: {name} is {value}. Stopped before the optimizer step: the weights were not updated, "
                                 f"and files already written are intact. Common causes: a learning rate too high, fp16 overflow.")

def optimizer_step(params: list, optimizer, max_grad_norm: float, where: str) -> float:
    """Clip, then step, unless the gradient norm is not finite (clipping would spread NaN into every weight)."""
    grad_norm = clip_gradients(params, max_grad_norm)
    check_finite({"grad_norm": grad_norm}, where)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm

def micro_steps(step_fn: Callable, batch: list, cfg) -> dict:
    """step_fn(micro_batches, batch, scale) on this rank's share of `batch` in --grad_accum_steps micro-batches; a rank with fewer
    than the others also runs zero-weighted fillers (lockstep), so that every rank has gradients and enters each FSDP forward."""
    mine = my_share(batch)
    micro = split(mine, min(cfg.grad_accum_steps, len(mine))) if mine else []
    fillers = lockstep(micro, batch[:1])[len(micro):]
    metrics = step_fn(micro, batch)
    if fillers:
        step_fn(fillers, batch, 0.0)
    return metrics

def add_penalty(metrics: dict, penalty: Callable | None, device) -> None:
    """The penalty's backward (this rank's part of it: it adds up once over ranks), and its value logged."""
    if penalty is not None:
        ewc = penalty()
        if ewc.requires_grad:
            ewc.backward()
        metrics["loss/ewc"] = ewc.detach().to(device)

def train_epochs(model, examples: list, step_fn: Callable, cfg, *, lr: float, epochs: int, seed: int, desc: str,
                 log: Callable | None = None, penalty: Callable | None = None, quiet: bool = False) -> None:
    """The loop of every supervised stage. step_fn(micro_batches, batch, scale=1.0) runs forward and backward
    on each micro-batch, its loss already divided by the whole batch's count (so that micro-batch and rank
    gradients add up to the batch gradient), and returns {name: 0-dim tensor}, its share of each metric."""
    params = list(trainable(model).values())
    set_checkpointing(model, cfg)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    optimizer, schedule = stage_optimizer(params, cfg, lr, epochs * steps_per_epoch)
    order_rng = torch.Generator().manual_seed(seed)
    model.train()
    with progress(epochs * steps_per_epoch, desc, disable=quiet) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(examples), generator=order_rng).tolist()
            for batch in batches_of([examples[i] for i in order], cfg.batch_size):
                metrics = micro_steps(step_fn, batch, cfg)
                add_penalty(metrics, penalty, params[0].device)
                sync_gradients(params)
                values = dict(zip(metrics, sum_over_ranks(torch.stack([v.float() for v in metrics.values()])).tolist()))
                where = f"{desc}, epoch {epoch + 1}, step {bar.n + 1}"
                check_finite(values, where)
                values["lr"] = optimizer.param_groups[0]["lr"]
                values["grad_norm"] = optimizer_step(params, optimizer, cfg.max_grad_norm, where)
                schedule.step()
                bar.update()
                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k.startswith("loss")}, refresh=False)
                if log is not None:
                    log({"stage": desc, "step": bar.n, "epoch": epoch + 1, **values})

def sft_backward(model, micro_batches: list, whole_batch: list, *, device, dtype, scale: float = 1.0) -> torch.Tensor:
    """SFT: L = -(1/N) sum_t log pi(y_t | x, y_<t) over the response tokens of the whole batch (N of them),
    backward micro-batch by micro-batch (times `scale`); returns the loss."""
    n_tokens, total = sum(map(response_tokens, whole_batch)), torch.zeros((), device=device)
    for examples in micro_batches:
        with autocast(device, dtype):
            logps, _ = token_logps(model, to_device(collate(examples, model.config.pad_token_id), device))
        loss = -logps.sum() / n_tokens * scale
        loss.backward()
        total += loss.detach()
    return total

def train_sft(model, examples: list, cfg, *, device, dtype, seed: int, desc: str = "sft", log=None, penalty=None, quiet=False):
    step = lambda micro, whole, scale=1.0: {"loss/sft": sft_backward(model, micro, whole, device=device, dtype=dtype, scale=scale)}  # noqa: E731
    train_epochs(model, examples, step, cfg, lr=cfg.sft_lr, epochs=cfg.sft_epochs, seed=seed, desc=desc, log=log,
                 penalty=penalty, quiet=quiet)

@torch.no_grad()
def with_reference_logps(reference, pairs: list[dict], cfg, *, device, dtype) -> list[dict]:
    """Copies of the pairs with "ref_logps" = (log ref(y_w|x), log ref(y_l|x)), at training's micro-batch
    size; each rank computes its share, and every rank gets them all."""
    was_training, mine, logps = reference.training, my_share(pairs), []
    reference.eval()
    for chunk in lockstep(batches_of(mine, math.ceil(cfg.batch_size / cfg.grad_accum_steps)), pairs[:1]):
        with autocast(device, dtype):
            chosen, rejected, _ = concatenated_logps(reference, to_device(collate_pairs(chunk, reference.config.pad_token_id), device))
        logps += zip(chosen.tolist(), rejected.tolist())
    reference.train(was_training)
    return [{**p, "ref_logps": r} for p, r in zip(pairs, gather(logps[:len(mine)]))]

DPO_METRICS = ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")

def train_dpo(policy, examples: list, cfg, *, device, dtype, seed: int, desc: str = "dpo", log=None, penalty=None) -> None:
    """DPO against the policy as it is now, frozen: the SFT model (two-stage), the stage start (HBAT), the
    previous iterate (LD-Align). A frozen copy runs beside the policy, or (--precompute_ref_logps) its
    log-probs are computed once first. A pair's "weight" scales its loss (LD-Align); --sft_coef a adds a
    times the chosen response's per-token NLL (joint_loss)."""
    pad_id, reference = policy.config.pad_token_id, None
    if "ref_logps" not in examples[0]:
        if cfg.precompute_ref_logps:
            examples = with_reference_logps(policy, examples, cfg, device=device, dtype=dtype)
        else:
            reference = frozen_copy(policy)
    names = DPO_METRICS + (("nll/chosen",) if cfg.sft_coef else ())

    def step(micro_batches, whole_batch, scale=1.0):
        sums = dict.fromkeys(names, torch.zeros((), device=device))
        for pairs in micro_batches:
            batch = to_device(collate_pairs(pairs, pad_id), device)
            if reference is None:
                ref_chosen_logps, ref_rejected_logps = torch.tensor([p["ref_logps"] for p in pairs], device=device).T
            else:
                with torch.no_grad(), autocast(device, dtype):
                    ref_chosen_logps, ref_rejected_logps, _ = concatenated_logps(reference, batch)
            with autocast(device, dtype):
                policy_chosen_logps, policy_rejected_logps, chosen_tokens = concatenated_logps(policy, batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=cfg.beta,
                loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                weights=torch.tensor([p["weight"] for p in pairs], device=device) if "weight" in pairs[0] else None)
            values = [losses.detach(), chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                      (chosen_rewards > rejected_rewards).float(), policy_chosen_logps.detach(), policy_rejected_logps.detach()]
            if cfg.sft_coef:
                losses = joint_loss(losses, policy_chosen_logps, chosen_tokens, cfg.sft_coef)
                values.append(-policy_chosen_logps.detach() / chosen_tokens)
            (losses.sum() / len(whole_batch) * scale).backward()
            sums = {name: sums[name] + value.sum() / len(whole_batch) for name, value in zip(names, values)}
        return sums

    train_epochs(policy, examples, step, cfg, lr=cfg.pref_lr, epochs=cfg.pref_epochs, seed=seed, desc=desc, log=log, penalty=penalty)

def train_reward_model(reward_model, examples: list, cfg, *, device, dtype, seed: int, desc: str = "reward model", log=None) -> None:
    """The Bradley-Terry reward model on the preference pairs (bradley_terry_loss)."""
    def step(micro_batches, whole_batch, scale=1.0):
        loss_sum, accuracy_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        for pairs in micro_batches:
            batch = to_device(collate_pairs(pairs, reward_model.config.pad_token_id), device)
            with autocast(device, dtype):
                scores = sequence_scores(reward_model, batch["input_ids"], batch["attention_mask"])
            chosen_scores, rejected_scores = scores[:len(pairs)], scores[len(pairs):]
            loss = bradley_terry_loss(chosen_scores, rejected_scores).sum() / len(whole_batch) * scale
            loss.backward()
            loss_sum += loss.detach()
            accuracy_sum += (chosen_scores > rejected_scores).float().sum().detach() / len(whole_batch)
        return {"loss/reward_model": loss_sum, "accuracy": accuracy_sum}

    train_epochs(reward_model, examples, step, cfg, lr=cfg.rm_lr, epochs=cfg.rm_epochs, seed=seed, desc=desc, log=log)

def ppo_step(policy, ref_model, reward_model, value_model, prompts: list[list[int]], optimizers: list, cfg, *, device, dtype,
             penalty: Callable | None = None, sft_batches: Iterable | None = None) -> dict[str, float]:
    """One PPO iteration on a batch of prompts, the three steps of the algorithm: roll out (sample and score), advantages,
    update. `sft_batches` (the joint objective, PPO-ptx): each update adds --sft_coef times the SFT loss on the next batch of
    SFT examples. `optimizers`: (AdamW, schedule) of the policy, then of the critic. Returns the updates' mean metrics and
    the rollout's score, KL, length and total reward."""
    rollout = ppo_rollout(policy, ref_model, reward_model, value_model, prompts, cfg, device=device, dtype=dtype)
    rewards, advantages, returns = ppo_advantages(rollout, cfg)
    metrics = ppo_update(policy, value_model, rollout, advantages, returns, optimizers, cfg, device=device, dtype=dtype,
                         penalty=penalty, sft_batches=sft_batches)
    mask = rollout["mask"]
    kl = ((rollout["old_logps"] - rollout["ref_logps"]) * mask).sum(1)
    stats = torch.stack([rollout["scores"].mean(), kl.mean(), mask.sum(1).mean(), rewards.sum(1).mean()]).tolist()
    return {**metrics, **dict(zip(("score", "kl", "response_tokens", "total_reward"), stats))}

def ppo_rollout(policy, ref_model, reward_model, value_model, prompts: list[list[int]], cfg, *, device, dtype) -> dict:
    """PPO step 1: a sampled response per prompt, scored (--eval_batch_size prompts at a time): the rollout batch, its response
    mask, log pi_old, log ref, V_old (zeros without a value model) and the reward model's r."""
    pad_id, eos_id = policy.config.pad_token_id, policy.config.eos_token_id
    policy.eval()
    responses = generate(policy, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.eval_batch_size, device=device, dtype=dtype, do_sample=True, temperature=cfg.temperature)
    batch = to_device(rollout_batch(prompts, responses, pad_id), device)
    scored, mine = [], my_share(list(range(len(prompts))))
    with torch.no_grad(), autocast(device, dtype):
        for rows in lockstep(batches_of(mine, cfg.eval_batch_size), [0]):
            sub = select(batch, rows)
            logps = response_logps(policy, sub, cfg.temperature)
            scored.append((logps, response_logps(ref_model, sub, cfg.temperature),
                           response_values(value_model, sub) if value_model is not None else torch.zeros_like(logps),
                           sequence_scores(reward_model, sub["input_ids"], sub["attention_mask"])))
    names = ("old_logps", "ref_logps", "old_values", "scores")
    return {"batch": batch, "mask": (batch["labels"][:, batch["query_width"]:] != IGNORE_INDEX).float(), "critic": value_model is not None,
            **{name: gather_rows(torch.cat(parts)[:len(mine)]) for name, parts in zip(names, zip(*scored))}}

def ppo_advantages(rollout: dict, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PPO step 2: per-token rewards (ppo_rewards), whitened GAE advantages and the returns; without a value model (the HBAT
    authors' critic-free stage, --no-critic) the whitened critic_free_rewards are the advantages, and there are no returns."""
    mask, old_logps, ref_logps = rollout["mask"], rollout["old_logps"], rollout["ref_logps"]
    if not rollout["critic"]:
        rewards = critic_free_rewards(rollout["scores"], old_logps, ref_logps, mask, cfg.kl_coef, cfg.gamma)
        return rewards, masked_whiten(rewards, mask), None
    rewards = ppo_rewards(rollout["scores"], old_logps, ref_logps, mask, cfg.kl_coef)
    advantages, returns = gae(rewards, rollout["old_values"], mask, cfg.gamma, cfg.lam)
    return rewards, masked_whiten(advantages, mask), returns

def ppo_update(policy, value_model, rollout: dict, advantages, returns, optimizers: list, cfg, *, device, dtype,
               penalty: Callable | None = None, sft_batches: Iterable | None = None) -> dict[str, float]:
    """PPO step 3: --ppo_epochs passes of clipped policy (and value) updates over --ppo_minibatches minibatches, each
    accumulated over micro-batches of --ppo_micro_batch_size sequences weighted by their share of the minibatch's tokens
    (the update of one big forward; memory bounded by the micro-batch). Returns the metrics' means over the updates."""
    batch, mask, old_logps, old_values = rollout["batch"], rollout["mask"], rollout["old_logps"], rollout["old_values"]
    critics = [value_model] if value_model is not None else []
    groups = [list(trainable(model.train()).values()) for model in [policy, *critics]]
    sums, n_updates = {}, 0
    for _ in range(cfg.ppo_epochs):
        for minibatch in split(torch.randperm(len(mask)).tolist(), min(cfg.ppo_minibatches, len(mask))):
            n_tokens = mask[minibatch].sum()
            totals = torch.zeros(3, device=device)  # policy loss, value loss, clipped fraction: minibatch means
            mine = batches_of(my_share(minibatch), cfg.ppo_micro_batch_size)
            for i, rows in enumerate(lockstep(mine, minibatch[:1])):
                sub, share = select(batch, rows), mask[rows].sum() / n_tokens * (1.0 if i < len(mine) else 0.0)
                with autocast(device, dtype):
                    logps = response_logps(policy, sub, cfg.temperature)
                policy_loss, clipfrac = ppo_policy_loss(logps, old_logps[rows], advantages[rows], mask[rows], cfg.clip)
                (policy_loss * share).backward()  # the policy's graph is freed before the critic's is built
                value_loss = torch.zeros((), device=device)
                for critic in critics:
                    with autocast(device, dtype):
                        values = response_values(critic, sub)
                    value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], cfg.value_clip)
                    (value_loss * share).backward()
                totals += torch.stack([policy_loss.detach(), value_loss.detach(), clipfrac]) * share
            metrics = dict(zip(("loss/policy", "loss/value", "clipfrac"), totals))
            if sft_batches is not None:  # PPO-ptx: + a times the SFT loss on a batch of SFT data
                metrics["loss/sft"] = micro_steps(lambda micro, whole, scale=1.0: {"loss/sft": sft_backward(
                    policy, micro, whole, device=device, dtype=dtype, scale=scale * cfg.sft_coef)}, next(sft_batches), cfg)["loss/sft"] / cfg.sft_coef
            add_penalty(metrics, penalty, device)
            for params in groups:
                sync_gradients(params)
            values = dict(zip(metrics, sum_over_ranks(torch.stack([v.float() for v in metrics.values()])).tolist()))
            check_finite(values, "ppo step")
            values["lr"] = optimizers[0][0].param_groups[0]["lr"]
            norms = [clip_gradients(params, cfg.max_grad_norm) for params in groups]  # both checked before either steps
            check_finite(dict(zip(("grad_norm/policy", "grad_norm/value"), norms)), "ppo step")
            for optimizer, schedule in optimizers:
                optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
            sums, n_updates = {k: sums.get(k, 0.0) + v for k, v in values.items()}, n_updates + 1
    return {k: v / n_updates for k, v in sums.items() if critics or k != "loss/value"}

def train_ppo(policy, ref_model, reward_model, value_model, prompts: list[list[int]], cfg, *, device, dtype, seed: int,
              desc: str = "ppo", log=None, penalty=None, sft_examples: list | None = None) -> None:
    """--pref_epochs passes over the prompts in batches of --ppo_batch_size, a ppo_step each; the reference
    and reward models frozen in eval mode; value_model None: critic-free. With --sft_coef > 0, batches of
    `sft_examples` (seeded random order) feed the joint objective."""
    ref_model.eval(), reward_model.eval()
    n_batches = math.ceil(len(prompts) / cfg.ppo_batch_size)
    updates = cfg.pref_epochs * n_batches * cfg.ppo_epochs * cfg.ppo_minibatches
    optimizers = []
    for model, lr in ((policy, cfg.pref_lr), (value_model, cfg.value_lr)):
        if model is not None:
            set_checkpointing(model, cfg)
            optimizers.append(stage_optimizer(list(trainable(model).values()), cfg, lr, updates))
    sft_batches = endless_batches(sft_examples, cfg.batch_size, seed) if cfg.sft_coef and sft_examples else None
    order_rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the rollouts follow the stage's seed, not whatever drew numbers before (a fresh reward head)
    with progress(cfg.pref_epochs * n_batches, desc) as bar:
        for epoch in range(cfg.pref_epochs):
            order = torch.randperm(len(prompts), generator=order_rng).tolist()
            for batch_prompts in batches_of([prompts[i] for i in order], cfg.ppo_batch_size):
                stats = ppo_step(policy, ref_model, reward_model, value_model, batch_prompts, optimizers, cfg, device=device,
                                 dtype=dtype, penalty=penalty, sft_batches=sft_batches)
                bar.update()
                bar.set_postfix({k: f"{stats[k]:.3g}" for k in ("score", "kl", "loss/policy")}, refresh=False)
                if log is not None:
                    log({"stage": desc, "step": bar.n, "epoch": epoch + 1, **stats})

def endless_batches(examples: list, size: int, seed: int):
    """Batches of `size` examples, in a fresh seeded random order every pass, for ever."""
    order_rng = torch.Generator().manual_seed(seed)
    while True:
        yield from batches_of([examples[i] for i in torch.randperm(len(examples), generator=order_rng).tolist()], size)


# ==== Generation and evaluation =============================================================================

@torch.no_grad()
def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int, batch_size: int, device,
             dtype=torch.float32, do_sample: bool = False, temperature: float = 1.0, desc: str | None = None) -> list[list[int]]:
    """Batched generation from left-padded prompts with the KV cache; each response is cut after its first
    EOS (kept: it is scored and trained on like a data response's). On N ranks each generates its share,
    sampling from its own seed, and every rank gets them all."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if do_sample else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
    was_training, responses, mine = model.training, [], my_share(prompts)
    model.eval()
    batches = batches_of(mine, batch_size)
    synced = any(is_sharded(p) for p in model.parameters())  # FSDP: ranks that finish early keep stepping with the rest
    with progress(len(batches), desc or "generate", disable=desc is None or len(batches) < 2) as bar, rank_sampling(device):
        for chunk in lockstep(batches, prompts[:1]):
            input_ids, attention_mask = pad(chunk, pad_id, "left").to(device), pad([[1] * len(p) for p in chunk], 0, "left").to(device)
            with autocast(device, dtype):
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, synced_gpus=synced)
            responses += [row[: row.index(eos_id) + 1] if eos_id in row else row for row in out[:, input_ids.shape[1]:].tolist()]
            bar.update()
    model.train(was_training)
    return gather(responses[:len(mine)])

def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (\\w+), from the longest common subsequence."""
    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    if not pred or not ref:
        return 0.0
    lcs = [0] * (len(ref) + 1)
    for p in pred:
        diagonal = 0
        for j, r in enumerate(ref):
            diagonal, lcs[j + 1] = lcs[j + 1], diagonal + 1 if p == r else max(lcs[j + 1], lcs[j])
    if lcs[-1] == 0:
        return 0.0
    precision, recall = lcs[-1] / len(pred), lcs[-1] / len(ref)
    return 2 * precision * recall / (precision + recall)

def win_rate(scores: list[float], other_scores: list[float]) -> float:
    """The fraction of prompts where our response scores higher than the other model's (ties count 1/2)."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, other_scores)) / len(scores)

def evaluate(model, tokenizer, test_rows: list[dict], cfg, *, device, dtype, score_fn: Callable | None = None,
             against: dict | None = None, desc: str = "eval") -> tuple[dict, dict]:
    """Greedy responses to the test prompts, and --eval_samples more per prompt at temperature 1 (their means:
    the *_sampled metrics, which move before a greedy answer flips). instruction (built-in task): the format
    asked for is kept (instruction_score, over the prompts that ask for a list); rougeL: F1 against the
    reference; reward: score_fn's (the gold reward or a reward model: preference); win_rate: by score_fn
    against `against` (another evaluate() output on the same rows); length: response tokens, EOS not counted."""
    prompt_ids = [generation_prompt(tokenizer, r["prompt"], cfg) for r in test_rows]
    prompts, n, k = [r["prompt"] for r in test_rows], len(test_rows), cfg.eval_samples
    settings = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.eval_batch_size, device=device, dtype=dtype)
    response_ids = generate(model, prompt_ids, **settings, desc=desc)
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    sample_prompts, sample_prompt_ids = [p for p in prompts for _ in range(k)], [p for p in prompt_ids for _ in range(k)]
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the same samples whenever this model is evaluated; training's generator untouched
        sample_ids = generate(model, sample_prompt_ids, **settings, do_sample=True) if k else []
    samples = tokenizer.batch_decode(sample_ids, skip_special_tokens=True)
    metrics = {}
    if not cfg.sft_data:  # the built-in task: its instruction can be checked (on the prompts that ask for a list)
        metrics["instruction"] = mean_of([instruction_score(p, y) for p, y in zip(prompts, responses)])
        metrics["instruction_sampled"] = mean_of([instruction_score(p, y) for p, y in zip(sample_prompts, samples)])
        metrics = {m: v for m, v in metrics.items() if v is not None}  # none asked (a tiny --eval_size) or no samples
    metrics |= {"rougeL": sum(rouge_l_f1(y, r["reference"]) for y, r in zip(responses, test_rows)) / n,
                "length": sum(len(ids) - (ids[-1:] == [tokenizer.eos_token_id]) for ids in response_ids) / n}
    outputs = {"responses": responses, "scores": None}
    if score_fn is not None:
        outputs["scores"] = score_fn(prompts, responses, prompt_ids, response_ids)
        metrics["reward"] = sum(outputs["scores"]) / n
        if k:
            metrics["reward_sampled"] = mean_of(score_fn(sample_prompts, samples, sample_prompt_ids, sample_ids))
        if against is not None:
            metrics["win_rate"] = win_rate(outputs["scores"], against["scores"])
    return metrics, outputs

def mean_of(values: list) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None

def preference_scorer(builtin: bool, reward_model, independent: bool, tokenizer, cfg, device, dtype):
    """(score_fn, its name): the gold reward on the built-in task; on real data a reward model's score of the
    generated ids themselves, flagged when it is the one PPO optimised (then not an independent judge)."""
    if builtin:
        return (lambda prompts, responses, *_: [gold_reward(p, r) for p, r in zip(prompts, responses)]), "gold reward"
    if reward_model is None:
        return None, "n/a (give --reward_model)"

    @torch.no_grad()
    def score(prompts, responses, prompt_ids, response_ids) -> list[float]:
        reward_model.eval()
        out = []
        for rows in batches_of(list(range(len(prompt_ids))), cfg.eval_batch_size):
            batch = to_device(collate([sequence(prompt_ids[i], response_ids[i]) for i in rows], tokenizer.pad_token_id), device)
            with autocast(device, dtype):
                out += sequence_scores(reward_model, batch["input_ids"], batch["attention_mask"]).tolist()
        return out
    return score, "--reward_model score" if independent else "score of the reward model PPO optimised (not independent)"


# ==== Diagnostics: what per-pair weights do to a DPO step (LD-Align's rho_* and cos_weighted_uniform) ======

def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rho: the Pearson correlation of the ranks of a and b (tied values share their mean rank).
    None where either is constant (SPIN's weights, all 1): no ranking to correlate."""
    def ranks(x):
        _, tie_group, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
        return (counts.cumsum(0) - (counts + 1) / 2)[tie_group]  # a tie group at ranks i..j gets (i + j) / 2
    ra, rb = (r - r.mean() for r in (ranks(a), ranks(b)))
    norm = ra.norm() * rb.norm()
    return (ra @ rb / norm).item() if norm > 0 else None

def margin_gradients(policy, pairs: list[dict], weights: list[float], *, pad_id: int, device, dtype):
    """g_i = grad of the margin log pi(y_gold|x) - log pi(y_gen|x) of each pair, at the iteration's start. There pi is
    the reference pi_{t-1}, every h_i = 0, and every pair's loss has the same slope in h (-beta/2 for -log sigmoid(beta h)):
    g_i is pair i's loss gradient up to one shared factor. Returns ||g_i|| (n,), sum_i w_i g_i and sum_i g_i (flat, float32):
    the first step's weighted (LD-Align) and uniform (SPIN) directions."""
    params = [p for p in policy.parameters() if p.requires_grad]
    norms, weighted, uniform = [], 0.0, 0.0
    for pair, weight in zip(pairs, weights):
        policy.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            gold_logps, sample_logps, _ = concatenated_logps(policy, to_device(collate_pairs([pair], pad_id), device))
        (gold_logps - sample_logps).sum().backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])
        norms.append(g.norm())
        weighted, uniform = weighted + weight * g, uniform + g
    policy.zero_grad(set_to_none=True)
    return torch.stack(norms), weighted, uniform

def weight_diagnostics(weights: torch.Tensor, reward_gaps: torch.Tensor | None, grad_norms: torch.Tensor,
                       weighted_update: torch.Tensor, uniform_update: torch.Tensor) -> dict[str, float]:
    """rho_w_gap: do the weights rank the pairs by how much worse the sample is (gold reward of the gold response minus
    the sample's)? rho_w_grad: by the size of the pair's own gradient? rho_grad_gap: does that size alone (SPIN's
    weighting) already rank them by the gap? cos_weighted_uniform: the weighted step's direction against SPIN's
    (1: the weights only rescale the step). Figures without meaning (constant weights: SPIN; no reward) are left out."""
    gaps = reward_gaps if reward_gaps is not None else torch.zeros_like(grad_norms)  # (constant: no rho)
    out = {"rho_w_gap": rank_correlation(weights, gaps), "rho_w_grad": rank_correlation(weights, grad_norms),
           "rho_grad_gap": rank_correlation(grad_norms, gaps)}
    if weights.min() < weights.max():
        out["cos_weighted_uniform"] = F.cosine_similarity(weighted_update, uniform_update, dim=0).item()
    return {k: v for k, v in out.items() if v is not None}


# ############################################################################################################
#   MACHINERY. You can stop reading here: what one training step computes is all above. Below: the built-in task,
#   loading models, reading data files and row formats into (prompt, response) text, the command line, and what
#   makes a run safe to start, stop, resume, and spread over processes.
# ############################################################################################################

# ==== The built-in task: a miniature of the papers' summarization setting ===================================
# A document states 2-3 facts "NAME VERB the OBJECT in the PLACE .", maybe one negated distractor ("NAME never
# VERB the OBJECT ...") and fillers; the summary is the facts, "NAME VERB OBJECT", joined into one response.
# - Instruction following (the SFT skill): half the SFT prompts end "summary as a list :", and their references
#   join every clause with " ; ". `instruction_score` checks that format. The preference data has no such
#   prompt, so it neither teaches nor rewards the skill, and preference-only training erodes it.
# - Human preference (the gold reward, behind the preference labels): the facts stated, nothing else (the
#   negated distractor left out), and, on plain "summary :" prompts, clauses joined by "and", a style the
#   references rarely use (1 join in 10). Content: both data sets agree; style: they partly conflict.
# The best policy on both axes (`oracle_summary`) lists on list prompts and says "and" elsewhere.

NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent victor wendy".split()
VERBS = "found painted sold bought moved cleaned fixed lost washed opened".split()
OBJECTS = "car boat lamp chair table book bike door clock piano kettle radio window ladder camera violin".split()
PLACES = "park garden kitchen school market office harbor library station museum".split()
FILLERS = ["the weather was calm .", "nothing else happened .", "it was a long day .", "everyone went home later .",
           "the news spread quickly .", "nobody saw it coming ."]
TASK_SPECIALS, STYLE_BONUS = ["<pad>", "<unk>", "<eos>"], 0.5  # the bonus for joining every pair of clauses with "and"
PROSE, LIST = " summary :", " summary as a list :"  # the two ways a prompt ends
_FACT = re.compile(r"(?:(?<=: )|(?<=\. ))(\w+) (\w+) the (\w+) in the (\w+) \.")  # a whole sentence: "x never ..." is not one
_NEGATED = re.compile(r"(\w+) never (\w+) the (\w+) in the \w+ \.")

def task_vocabulary() -> list[str]:
    words = {w for s in FILLERS + [PROSE, LIST] for w in s.split()} | {"summarize", ";", "and", "the", "in", ".", "never"}
    return TASK_SPECIALS + sorted(words | set(NAMES) | set(VERBS) | set(OBJECTS) | set(PLACES))

def make_document(rng: random.Random, negated_rate: float, list_rate: float):
    """(prompt, facts [(name, verb, object)], the negated fact or None, asks for a list): 2-3 facts with
    distinct names, a negated one with probability negated_rate, 0-2 fillers, the list directive with list_rate."""
    names = rng.sample(NAMES, rng.randint(2, 3) + 1)
    facts = [(name, rng.choice(VERBS), rng.choice(OBJECTS)) for name in names[:-1]]
    sentences = [f"{n} {v} the {o} in the {rng.choice(PLACES)} ." for n, v, o in facts]
    negated = (names[-1], rng.choice(VERBS), rng.choice(OBJECTS)) if rng.random() < negated_rate else None
    if negated:
        sentences.insert(rng.randint(0, len(sentences)), f"{negated[0]} never {negated[1]} the {negated[2]} in the {rng.choice(PLACES)} .")
    for filler in rng.sample(FILLERS, rng.randint(0, 2)):
        sentences.insert(rng.randint(0, len(sentences)), filler)
    as_list = rng.random() < list_rate
    return "summarize : " + " ".join(sentences) + (LIST if as_list else PROSE), facts, negated, as_list

def summary(facts, joins: Iterable[bool] | None = None) -> str:
    """'NAME VERB OBJECT' per fact; clauses i and i+1 joined by ' and ' where joins[i], else ' ; '."""
    clauses = [" ".join(fact) for fact in facts]
    joins = list(joins) if joins is not None else [False] * (len(clauses) - 1)
    return clauses[0] + "".join((" and " if j else " ; ") + c for j, c in zip(joins, clauses[1:]))

def _clauses(response: str) -> tuple[list[tuple], list[str]]:
    """The response split at its joins: the clauses (word tuples) and the joins (';' or 'and')."""
    clauses, joins, current = [], [], []
    for word in response.split() + [None]:
        if word in (";", "and", None):
            clauses.append(tuple(current))
            current = []
            joins += [word] if word else []
        else:
            current.append(word)
    return clauses, joins

def _prompt_facts(prompt: str) -> set:
    facts = {(n, v, o) for n, v, o, _ in _FACT.findall(prompt)}
    if not facts:
        raise ValueError(f"built-in task: no facts found in prompt {prompt!r}")
    return facts

def gold_reward(prompt: str, response: str) -> float:
    """(facts stated - clauses stating no fact of the document) / n_facts, plus on a plain prompt STYLE_BONUS
    (joins made with 'and') / (n_facts - 1). A reference scores 1.0; on a plain prompt with every join an 'and', 1.5."""
    facts = _prompt_facts(prompt)
    clauses, joins = _clauses(response)
    stated = set()
    for clause in clauses:  # a repeated, empty, negated or invented clause counts against
        if clause in facts and clause not in stated:
            stated.add(clause)
    styled = not prompt.endswith(LIST) and len(facts) > 1
    style = min(joins.count("and"), len(facts) - 1) / (len(facts) - 1) if styled else 0.0
    return (len(stated) - (len(clauses) - len(stated))) / len(facts) + STYLE_BONUS * style

def instruction_score(prompt: str, response: str) -> float | None:
    """On a prompt that asks for a list: the joins made with ' ; ', over max(joins made, n_facts - 1), in [0, 1]
    (a list of every fact scores 1; 'and' joins or missing clauses lose). None on other prompts: no instruction."""
    if not prompt.endswith(LIST):
        return None
    _, joins = _clauses(response)
    return joins.count(";") / max(len(joins), len(_prompt_facts(prompt)) - 1)

def oracle_summary(prompt: str) -> str:
    """The best response on both axes, written by hand: every fact, joined with ' ; ' on a list prompt, 'and' elsewhere."""
    facts = [(n, v, o) for n, v, o, _ in _FACT.findall(prompt)]
    return summary(facts, [not prompt.endswith(LIST)] * (len(facts) - 1))

def drifted_reference(prompt: str, reference: str, rng: random.Random, error_rate: float = 0.5) -> str:
    """The drift variant (ld_align.py --task drift): a reference as the starting model's weaker annotators wrote it.
    Its clauses in reverse order, a coherent drift that neither the gold reward nor the instruction score reads (ROUGE-L
    does), and, where the document has a negated fact, that fact stated as true with probability error_rate: a wrong
    fact the starting model then makes as often as not, a high-likelihood error (README, LD-Align)."""
    clauses, joins = _clauses(reference)
    clauses = clauses[::-1]
    negated = _NEGATED.search(prompt)
    if negated and joins and rng.random() < error_rate:
        clauses.insert(rng.randint(0, len(clauses)), negated.groups())
        joins.append(joins[0])
    return " ".join(clauses[0]) + "".join(f" {join} " + " ".join(clause) for join, clause in zip(joins, clauses[1:]))

def drifted_examples(examples: list[dict], tokenizer, cfg) -> list[dict]:
    """The SFT examples with drifted_reference's responses (seeded by cfg.seed), tokenized alike."""
    rng = random.Random(cfg.seed)
    return tokenize([(e["prompt"], drifted_reference(e["prompt"], e["reference"], rng)) for e in examples], tokenizer, cfg.max_length,
                    cfg.max_prompt_length)[0]

def _candidate_summary(rng: random.Random, facts, negated) -> str:
    """A plausible summary: one style throughout ('and' or ' ; '), now and then a fact dropped, a wrong object or
    name, or the negated fact stated as if true."""
    facts = list(facts)
    if rng.random() < 0.15:
        facts.pop(rng.randrange(len(facts)))
    if rng.random() < 0.15:
        i = rng.randrange(len(facts))
        n, v, o = facts[i]
        facts[i] = (n, v, rng.choice(OBJECTS)) if rng.random() < 0.5 else (rng.choice(NAMES), v, o)
    if negated and rng.random() < 0.5:
        facts.insert(rng.randint(0, len(facts)), negated)
    return summary(facts, [rng.random() < 0.5] * (len(facts) - 1))

def builtin_task(seed: int = 0, n_sft: int = 3000, n_pref: int = 2000, n_test: int = 100, bt_scale: float = 4.0,
                 and_rate: float = 0.1, avoid: Iterable[str] = ()) -> dict:
    """SFT rows (prompt, completion): half ask for a list, 1 in 5 has a negated distractor. Preference rows
    (prompt, chosen, rejected): plain prompts only, 3 in 5 with a distractor, labelled by the gold reward with
    Bradley-Terry noise, P(a preferred) = sigmoid(bt_scale (r_a - r_b)). Test rows: half lists, half with a
    distractor, prompts in neither training set (nor in `avoid`). Like real annotators, the reference writers
    use 'and' now and then on plain prompts (and_rate), so an SFT model keeps a little mass on that style."""
    rng, test, seen = random.Random(seed), [], set(avoid)
    reference = lambda facts, as_list: summary(facts, [not as_list and rng.random() < and_rate for _ in facts[1:]])  # noqa: E731
    while len(test) < n_test:
        prompt, facts, _, as_list = make_document(rng, 0.5, 0.5)
        if prompt not in seen:
            seen.add(prompt)
            test.append({"prompt": prompt, "completion": reference(facts, as_list)})

    def fresh_document(negated_rate, list_rate):  # a training document whose prompt is not a test prompt
        while (document := make_document(rng, negated_rate, list_rate))[0] in seen:
            pass
        return document

    sft = [{"prompt": p, "completion": reference(f, as_list)} for p, f, _, as_list in (fresh_document(0.2, 0.5) for _ in range(n_sft))]
    pref = []
    while len(pref) < n_pref:
        prompt, facts, negated, _ = fresh_document(0.6, 0.0)
        a, b = _candidate_summary(rng, facts, negated), _candidate_summary(rng, facts, negated)
        if a != b:
            p_a = 1.0 / (1.0 + math.exp(-bt_scale * (gold_reward(prompt, a) - gold_reward(prompt, b))))
            chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
            pref.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return {"sft": sft, "pref": pref, "test": test}


# ==== Models and tokenizers =================================================================================

TINY_MODELS, WARM_START_ROWS, WARM_START_EPOCHS = ("tiny", "tiny-random"), 1000, 3
_warm_started: dict[int, dict] = {}  # seed -> weights: hbat --compare's runs share one warm start

def build_tiny_tokenizer():
    """A word-level tokenizer over the task's words, as a transformers fast tokenizer; pad and EOS are distinct."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(task_vocabulary())}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by single spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")

def tiny_config(tokenizer, **overrides):
    """A 2-layer Llama for the built-in task (0.34M parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None), **overrides})

def quiet_libraries() -> None:
    """No progress bars or load reports from transformers and datasets: the scripts say what they load."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar(), transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars(), datasets.utils.logging.set_verbosity_error()

def from_pretrained(flag: str, name: str, load: Callable):
    """load(name); a failure is one message naming the flag. Pickle-only weights are refused (loading a pickle can run code),
    and so are weights that are not finite."""
    quiet_libraries()
    path, what = Path(name).expanduser(), f"{flag} {name}".strip()
    if not path.exists() and (name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1):
        raise ConfigError(f"{what}: no such folder")
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"{what}: not a Hugging Face model folder (it has no config.json)")
    if path.exists() and not list(path.glob("*.safetensors")) and list(path.glob("*.bin")) + list(path.glob("*.pt")):
        raise ConfigError(f"{what}: its weights are pickle files (.bin/.pt), which can run code when loaded; convert them to "
                          f"safetensors first (save_pretrained in a session you trust)")
    try:
        loaded = load(str(path) if path.exists() else name)
    except Exception as e:  # transformers, safetensors and the hub raise many types: all mean "cannot load this"
        where = "the folder" if path.exists() else f"the hub (offline? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')})"
        raise ConfigError(f"{what}: could not load it from {where}: {type(e).__name__}: {first_line(e)}") from e
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # (with output_loading_info)
    if isinstance(model, torch.nn.Module) and (bad := [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]):
        raise ConfigError(f"{what}: its weights are not finite: {len(bad)} tensors hold NaN or inf (first: {bad[0]}); "
                          f"the files are damaged or come from a diverged run")
    return loaded

def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else "no details"

def own_memory(model):
    """Every weight in memory torch allocated: loaded tensors can sit at addresses where some CPU kernels round differently, and a
    resumed run (which reloads its models) would end a few ulps from an uninterrupted one (which trained them in memory)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model

def load_tokenizer(name: str = "tiny", trust_remote_code: bool = False, flag: str = "--model"):
    """The tokenizer. Without a pad token, pad = EOS: masks come from labels and attention masks, never token ids."""
    from transformers import AutoTokenizer

    tokenizer = build_tiny_tokenizer() if name in TINY_MODELS else from_pretrained(
        flag, name, lambda n: AutoTokenizer.from_pretrained(n, trust_remote_code=trust_remote_code))
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{flag} {name}".strip() + ": the tokenizer has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

def load_model(name: str, tokenizer, trust_remote_code: bool = False, seed: int = 0):
    """The policy, seeded: tiny (warm-started), tiny-random, or a Hugging Face name or folder in float32. The tokenizer's EOS and
    pad go into the config, and the checkpoint's generation defaults are dropped: evaluation is greedy, PPO samples plain pi."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    set_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer)) if name in TINY_MODELS else own_memory(from_pretrained(
        "--model", name, lambda n: AutoModelForCausalLM.from_pretrained(n, dtype=torch.float32, trust_remote_code=trust_remote_code)))
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    disable_dropout(model)
    if name == "tiny":
        warm_start(model, tokenizer, seed)
    return model

def load_model_and_tokenizer(name: str = "tiny", trust_remote_code: bool = False, seed: int = 0):
    tokenizer = load_tokenizer(name, trust_remote_code)
    return load_model(name, tokenizer, trust_remote_code, seed), tokenizer

def warm_start(model, tokenizer, seed: int) -> None:
    """tiny's pretrained start: SFT on rows of another seed's stream of the task (no test prompt among them), outside the RNG stream."""
    if seed not in _warm_started:
        avoid = [row["prompt"] for row in builtin_task(seed, 0, 0, n_test=1000)["test"]]
        examples, _ = tokenize_sft(builtin_task(seed + 1000, WARM_START_ROWS, 0, 0, avoid=avoid)["sft"], tokenizer, 512, 256)
        with torch.random.fork_rng(devices=[]):
            train_sft(model, examples, TrainConfig(sft_epochs=WARM_START_EPOCHS), device=torch.device("cpu"), dtype=torch.float32,
                      seed=seed, desc="tiny: warm start", quiet=True)
        _warm_started[seed] = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_warm_started[seed])

def load_reward_model(path: str, tokenizer, trust_remote_code: bool = False, flag: str = "--reward_model", new_head: bool = False):
    """A scalar-head model (1 label) with the policy's tokenizer: a reward model, or (new_head) a causal LM with a fresh head."""
    from transformers import AutoModelForSequenceClassification

    what = f"{flag} {path}".strip()
    if load_tokenizer(path, trust_remote_code, flag).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{what}: its tokenizer differs from the policy's; it must score the same ids")
    model, info = from_pretrained(flag, path, lambda n: AutoModelForSequenceClassification.from_pretrained(
        n, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code, output_loading_info=True))
    if not hasattr(model, "score"):
        raise ConfigError(f"{what}: {type(model).__name__} has no `score` head; unsupported as a reward model")
    if any(key.startswith("score.") for key in info["missing_keys"]) and not new_head:
        raise ConfigError(f"{what}: has no trained scalar head (a causal LM?); give a reward model, such as a PPO run's reward_model/")
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    return own_memory(model)

def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off (modules and attention-dropout settings): log-ratios must be deterministic."""
    for module in [model, *model.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


# ==== Data: files and splits, row formats =================================================================

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
ROW_FORMATS = {"sft": ("prompt + completion", "messages (a conversation, every assistant turn trained; a 'prompt' beside it is ignored)",
                       "ShareGPT conversations of {from, value}", "alpaca instruction (+ input, history) + output (dolly: + context, response)",
                       "text (the whole text trained)"),
               "pref": ("prompt + chosen + rejected (strings without a prompt: their shared beginning is the prompt)",
                        "chosen + rejected conversations sharing all turns but the last (message lists, or Anthropic HH strings)")}
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # text no tokenizer or file system takes: JSON's "\\ud800", argv's undecodable bytes
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SPLIT, _HH_TURN = re.compile(r"([\w.-]+?)(?:\[(\d*):(\d*)\])?"), re.compile(r"\n\n(Human|Assistant): ")

def data_suffix(path: Path) -> str:
    return next((s for s in DATA_SUFFIXES if path.name.lower().endswith(s)), "")

def read_rows(spec: str, split: str = "train", limit: int = 0, flag: str = "--sft_data", config: str = "") -> SimpleNamespace:
    """One split (sliced as train_sft[:2000] if asked) of a file (.json/.jsonl/.parquet/.csv, optionally .gz: one split), a
    folder of such files (split into splits as datasets.load_dataset splits it: data_files), a save_to_disk folder or a hub name
    (`config`: datasets' name): rows (the first `limit` if > 0), source, split, files, repeated (rows that repeat a row of another
    file of the split: skipped, as a folder holding one data set twice would train on each row twice), and where(i) = "file: row
    k", as the file numbers it."""
    path, match, split_flag, files = Path(spec).expanduser(), _SPLIT.fullmatch(split), flag.replace("_data", "_split"), None
    if not match:
        raise ConfigError(f"{split_flag} {split!r}: expected a split name, or a slice of one: name[:N] or name[A:B]")
    name, start, stop = match.group(1), int(match.group(2) or 0), int(match.group(3)) if match.group(3) else None
    saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    if config and (path.is_file() or data_suffix(path) or saved):
        raise ConfigError(f"{flag.replace('_data', '_config')} {config}: picks a config of a data set folder or hub name; {spec} has none")
    if path.is_file() or data_suffix(path):
        parts, name = [(path, read_file(path, flag))], "(the whole file)"
    elif saved:
        parts, name, files = read_saved(path, name, flag)
    elif path.is_dir():
        splits = data_files(path, config, flag)
        if name not in splits:
            raise DataError(f"{flag} {spec}: no split '{name}' (it has: {', '.join(splits)}); choose one with {split_flag}")
        parts = [(f, read_file(f, flag)) for f in splits[name]]
    elif spec.startswith(("/", ".", "~")):
        raise DataError(f"{flag} {spec}: no such file or folder")
    else:  # a hub name: datasets reads it
        import datasets

        quiet_libraries()
        try:
            parts = [(f"{spec} ({name})", list(datasets.load_dataset(spec, config or None, split=name)))]
        except Exception as e:  # the hub, a missing split, a format: all mean "cannot read this"
            raise DataError(f"{flag} {spec}: could not load split '{name}' ({type(e).__name__}: {first_line(e)})") from e
    numbered, first = [(source, k, row) for source, part in parts for k, row in enumerate(part, start=1)], {}
    unique = [(source, k, row) for source, k, row in numbered if len(parts) == 1 or first.setdefault(  # (a row's hash -> its first file)
              hashlib.blake2b(json.dumps(row, sort_keys=True, default=str).encode(), digest_size=16).digest(), source) == source]
    kept = unique[start:stop][:limit] if limit > 0 else unique[start:stop]
    return SimpleNamespace(rows=[row for _, _, row in kept], source=spec, split=name, where=lambda i: f"{kept[i][0]}: row {kept[i][1]}",
                           repeated=len(numbered) - len(unique), files=files if files is not None else [p for p, _ in parts if isinstance(p, Path)])

def data_files(folder: Path, config: str, flag: str) -> dict[str, list[Path]]:
    """A folder's data files per split, as datasets.load_dataset finds them: its README's `configs:` (`config` picks one), else
    split names from the file names (data/test-00000-of-00001.parquet, train_0.jsonl, *_eval.jsonl: test; one file: train).
    Where datasets would merge files of different names into one split (train_sft.jsonl and train_gen.jsonl: train), every
    file's name is its split instead (the <split>.jsonl that Dataset.to_json writes per split)."""
    import datasets

    quiet_libraries()
    try:
        with tempfile.TemporaryDirectory() as cache:  # (the builder's lock file goes there, not into ~/.cache)
            found = datasets.load_dataset_builder(str(folder), config or None, cache_dir=cache).config.data_files
    except Exception as e:  # no config named, an unknown one, no data files, mixed formats: all mean "cannot read this folder"
        configs = []
        with contextlib.suppress(Exception):  # (it fails as the builder did)
            configs = datasets.get_dataset_config_names(str(folder))  # (the README's, or "default")
        if len(configs) > 1 or (config and configs):
            raise ConfigError(f"{flag.replace('_data', '_config')} {config or '(none)'}: {folder} has the configs {', '.join(configs)} "
                              f"(its README.md); choose one with {flag.replace('_data', '_config')}") from None
        raise DataError(f"{flag} {folder}: datasets cannot split this folder into splits ({type(e).__name__}: {first_line(e)})") from None
    base = folder.absolute()
    found = {str(split): [folder / Path(f).relative_to(base) if Path(f).is_relative_to(base) else Path(f) for f in names]
             for split, names in found.items()}  # (paths as the flag spells them)
    stems = {f: re.sub(r"-\d{5}-of-\d{5}.*$", "", f.name[:-len(data_suffix(f)) or None]) for fs in found.values() for f in fs}
    if config or all(len({re.sub(r"\d+", "0", stems[f]) for f in fs}) == 1 for fs in found.values()):  # (shards differ in numbers:
        return found                                                                                 # train_0, train_1; part-00000-c000)
    files = sorted(stems)
    return {stem: [f for f in files if stems[f] == stem] for stem in dict.fromkeys(stems[f] for f in files)}

def read_saved(folder: Path, name: str, flag: str) -> tuple[list, str, list[Path]]:
    """A save_to_disk folder: one split of a DatasetDict, or a Dataset folder's only split; its files are the split's arrow files."""
    import datasets

    quiet_libraries()
    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DataError(f"{flag} {folder}: not a readable save_to_disk folder ({type(e).__name__}: {first_line(e)})") from e
    if isinstance(saved, datasets.DatasetDict):
        if name not in saved:
            raise DataError(f"{flag} {folder}: no split '{name}' (it has: {', '.join(saved)}); choose one with {flag.replace('_data', '_split')}")
        part, label = saved[name], name
    elif saved.split and name != str(saved.split):  # (asked for another split: reading this one would mix them up)
        raise DataError(f"{flag} {folder}: holds one split, '{saved.split}'; give {flag.replace('_data', '_split')} {saved.split}")
    else:
        name = str(saved.split or folder.name)
        part, label = saved, f"{name} (the folder's only split)"
    return [(f"{folder} (split {name})", list(part))], label, [Path(f["filename"]) for f in part.cache_files]

def read_file(path: Path, flag: str) -> list[dict]:
    """A file's rows: JSON Lines (also in a .json, as Dataset.to_json writes), a JSON list, parquet or CSV (a header, then a row
    per record, every value the string written); .gz; UTF-8, BOM or not."""
    if not data_suffix(path):
        raise DataError(f"{flag} {path}: unsupported file type (supported: {', '.join(DATA_SUFFIXES)}, a data set folder, or a hub name)")
    if not path.is_file():
        raise DataError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'file not found'}")
    if data_suffix(path) == ".parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{path}: not readable UTF-8 text ({first_line(e)})") from None
    if ".csv" in data_suffix(path):
        import csv

        csv.field_size_limit(2**31 - 1)  # (a long document is one field: no 128 KiB cap)
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        try:
            rows = list(reader)
        except csv.Error as e:
            raise DataError(f"{path}: not valid CSV (line {reader.line_num + 1}: {e})") from None
        if (k := next((k for k, r in enumerate(rows) if None in r), None)) is not None:
            raise DataError(f"{path}: row {k + 1}: more values than the header's {len(reader.fieldnames)} columns")
        return rows
    if ".jsonl" not in data_suffix(path):
        try:
            data = json.loads(text)
            if not isinstance(data, (list, dict)):
                raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
            return data if isinstance(data, list) else [data]  # (one row of JSON Lines)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # more than one JSON value: JSON Lines
                raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    rows = []  # row N = the N-th non-blank line (lines end at "\n" only: JSON strings may hold a raw U+2028, as datasets reads them)
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {len(rows) + 1} (line {line_no}): not valid JSON ({e.msg})") from None
    return rows

def hh_messages(text: str) -> list[dict] | None:
    """An Anthropic HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as messages; None for other text."""
    if len(parts := _HH_TURN.split(text)) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]

def standard_row(row, where: str):
    """A ShareGPT or alpaca row in the columns row_parts reads: `conversations` of {from, value} become `messages` (roles
    human/user, gpt/assistant, system); alpaca's instruction (+ "\\n" + input) -> output (dolly's: context, response) becomes
    a user and an assistant turn, after its `history` pairs (as LLaMA-Factory reads it). Other columns (`system`) stay."""
    if not isinstance(row, dict) or "messages" in row:
        return row
    if "conversations" in row:
        turns = row["conversations"]
        for k, turn in enumerate(turns if isinstance(turns, list) else [turns], start=1):
            if not (isinstance(turn, dict) and turn.get("from") in SHAREGPT_ROLES and isinstance(turn.get("value"), str)):
                raise DataError(f"{where}: field 'conversations': turn {k} must be {{'from': one of {', '.join(SHAREGPT_ROLES)}; "
                                f"'value': text}}, got {str(turn)[:80]!r}")
        if len(turns) < 2 or SHAREGPT_ROLES[turns[-1]["from"]] != "assistant":
            raise DataError(f"{where}: field 'conversations' needs a human turn and must end with a gpt (assistant) turn")
        return {**{k: v for k, v in row.items() if k != "conversations"},
                "messages": [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]}
    if "instruction" in row and ("output" in row or "response" in row):  # (databricks-dolly's names: context, response)
        extra_name, answer = "context" if "context" in row else "input", "output" if "output" in row else "response"
        extra, history = row.get(extra_name) or "", row.get("history") or []
        for name, value in (("instruction", row["instruction"]), (extra_name, extra), (answer, row[answer])):
            if not isinstance(value, str) or (name != extra_name and not value.strip()):
                raise DataError(f"{where}: field '{name}' must be a{' non-empty' * (name != extra_name)} string, got {str(value)[:80]!r}")
        if not (isinstance(history, list) and all(isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(t, str) for t in p)
                                                  for p in history)):
            raise DataError(f"{where}: field 'history' must be a list of [instruction, response] string pairs")
        turns = [*(t for pair in history for t in pair), row["instruction"] + (f"\n{extra}" if extra.strip() else ""), row[answer]]
        return {**({"system": row["system"]} if "system" in row else {}),
                "messages": [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]}
    return row

def shared_prompt(chosen: str, rejected: str) -> str:
    """The prompt of an implicit-prompt string pair: the text both begin with, up to the whitespace before the word where they
    part (that whitespace begins each response, as TL;DR's completions begin with a space)."""
    same = os.path.commonprefix([chosen, rejected])
    return same[:m.start()] if (m := re.search(r"\s+\S*\Z", same)) else ""

def row_parts(row, where: str, kind: str) -> tuple:
    """The one place that decides a row's format (ROW_FORMATS): (prompt, [response]) for kind "sft", (prompt, [chosen, rejected])
    for "pref", strings or message lists. An SFT row may be a preference row: its chosen response is the demonstration. A
    'system' field makes the row a conversation that starts with that system message (never dropped)."""
    for name in ("prompt", "completion", "messages", "chosen", "rejected", "system", "text") if isinstance(row, dict) else ():
        if LONE_SURROGATE.search(json.dumps(row.get(name), ensure_ascii=False, default=str)):  # (JSON's unpaired "\\ud800" escapes)
            raise DataError(f"{where}: field '{name}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), not text: fix or drop the row")
    prompt, responses = format_parts(row, where, kind)
    if "system" not in row:
        return prompt, responses
    system = row["system"]
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}: {str(system)[:80]!r}")
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):  # the prompt a user turn, each response an assistant's
        prompt, responses = [{"role": "user", "content": prompt}], [[{"role": "assistant", "content": r}] for r in responses]
    if not isinstance(prompt, list):  # (a string prompt with message-list responses: row_texts refuses it)
        return prompt, responses
    if prompt[:1] and prompt[0]["role"] == "system":
        if system and prompt[0]["content"] != system:
            raise DataError(f"{where}: field 'system' differs from the conversation's own system turn; keep one of them")
        return prompt, responses
    return ([{"role": "system", "content": system}] if system and system.strip() else []) + prompt, responses

def format_parts(row, where: str, kind: str) -> tuple:
    """row_parts without the 'system' field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    if kind == "sft" and "messages" in row:  # a string 'prompt' beside it (H4's sets) repeats the first turn
        messages = field(row, where, "messages")
        if isinstance(messages, str) or len(messages) < 2:
            raise DataError(f"{where}: field 'messages' needs at least a user and an assistant message")
        return messages[:-1], [messages[-1:]]
    if kind == "pref" or ("completion" not in row and "chosen" in row):
        row = {k: (hh_messages(v) or v) if k in ("chosen", "rejected") and isinstance(v, str) else v for k, v in row.items()}
        responses = [field(row, where, "chosen")] + ([field(row, where, "rejected")] if kind == "pref" else [])
        if all(isinstance(r, list) and len(r) > 1 for r in responses):  # whole conversations: the prompt is their shared turns
            if any(r[:-1] != responses[0][:-1] for r in responses):
                raise DataError(f"{where}: 'chosen' and 'rejected' must share every turn but the last")
            return responses[0][:-1], [r[-1:] for r in responses]
        if "prompt" not in row and all(isinstance(row.get(k), str) for k in ("chosen", "rejected")):  # TRL's implicit prompt
            if (prompt := shared_prompt(row["chosen"], row["rejected"])).strip():
                return prompt, [r[len(prompt):] for r in responses]
        return field(row, where, "prompt", "(needed unless 'chosen' and 'rejected' are whole conversations, or strings that "
                                           "begin alike) "), responses
    if "prompt" in row or "completion" in row:
        return field(row, where, "prompt"), [field(row, where, "completion")]
    if kind == "sft" and "text" in row:  # TRL's language-modeling rows: no prompt, every token trained
        return "", [field(row, where, "text")]
    raise DataError(f"{where}: no row format we read (columns: {', '.join(map(str, row)) or 'none'}); accepted: "
                    + "; ".join(ROW_FORMATS["pref"] if kind == "pref" else ROW_FORMATS["sft"] + ROW_FORMATS["pref"]))

def field(row: dict, where: str, name: str, why: str = ""):
    """A non-empty string, or a list of {'role', 'content'} messages whose last is not empty."""
    if name not in row:
        raise DataError(f"{where}: missing field '{name}' {why}(has: {', '.join(map(str, row)) or 'nothing'}; row formats: "
                        f"{'; '.join(ROW_FORMATS['sft'] + ROW_FORMATS['pref'])})")
    value = row[name]
    if value is None:
        raise DataError(f"{where}: field '{name}' is null")
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str) and
                                                 isinstance(m.get("role"), str) for m in value):
        if not value[-1]["content"].strip():
            raise DataError(f"{where}: field '{name}': the last message is empty")
        return value
    if isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is empty")
    raise DataError(f"{where}: field '{name}' must be a non-empty string or a list of {{'role', 'content'}} messages, got "
                    f"{type(value).__name__}: {str(value)[:80]!r}")

def row_texts(row, tokenizer, where: str, kind: str, last_turn_only: bool = False) -> tuple:
    """(prompt, response text, ...): message lists through the chat template; the response is the last assistant turn. An SFT
    conversation with earlier assistant turns (unless last_turn_only) gives its prompt as (text, trained) segments instead."""
    row = standard_row(row, where)
    prompt, responses = row_parts(row, where, kind)
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):
        return (prompt, *responses)
    names = ("chosen", "rejected") if kind == "pref" else ("messages" if "messages" in row else "completion" if "completion" in row else "chosen",)
    for name, response in zip(names, responses):
        if not (isinstance(prompt, list) and isinstance(response, list)):
            raise DataError(f"{where}: fields 'prompt' and '{name}': the prompt and the response must both be strings or both be message lists")
        if response[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{name}': the last message of a response must be from the assistant")
    if not tokenizer.chat_template:
        raise DataError(f"{where}: the data is chat messages{' (a system field makes a row a conversation)' if 'system' in row else ''}"
                        f" but the tokenizer has no chat template")
    context = prompt + responses[0][:-1]
    if kind == "sft" and "messages" in row and not last_turn_only and any(m["role"] == "assistant" for m in context):
        return (conversation_segments(tokenizer, context, where), responses[0][-1]["content"])
    return (render_chat(tokenizer, context, where, True), *(r[-1]["content"] for r in responses))

def render_chat(tokenizer, messages: list[dict], where: str, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's own raise_exception, or a template error: name the row
        raise DataError(f"{where}: the chat template refused this row ({type(e).__name__}: {first_line(e)})") from None

def conversation_segments(tokenizer, context: list[dict], where: str) -> tuple[tuple[str, bool], ...]:
    """The context before a conversation's last assistant turn, rendered by the chat template, as (text, trained) segments:
    an earlier assistant turn is the text its message adds to the rendering (its content and end-of-turn markup: trained);
    the rest (system and user turns, the template's markup before each assistant turn) is not. The texts join into the
    rendering of the whole context. A template that changes earlier text when a turn is added is refused."""
    segments, rendered = [], ""
    for turn in [i for i, m in enumerate(context) if m["role"] == "assistant"] + [len(context)]:
        steps = [(context[:turn], True, False)] + ([(context[:turn + 1], False, True)] if turn < len(context) else [])
        for messages, generation_prompt, trained in steps:
            text = render_chat(tokenizer, messages, where, generation_prompt) if messages else ""
            if not text.startswith(rendered):
                raise DataError(f"{where}: field 'messages': the chat template renders message {len(messages)} so that the text "
                                f"before it changes, so its assistant turns cannot be trained apart; give --last_turn_only")
            if len(text) > len(rendered):
                segments.append((text[len(rendered):], trained))
            rendered = text
    return tuple(segments)

def tokenize_sft(rows: list, tokenizer, max_length: int, max_prompt_length: int, where=lambda i: f"data: row {i + 1}", last_turn_only=False):
    return tokenize([row_texts(r, tokenizer, where(i), "sft", last_turn_only) for i, r in enumerate(rows)], tokenizer, max_length,
                    max_prompt_length)

def tokenize_pref(rows: list, tokenizer, max_length: int, max_prompt_length: int, where=lambda i: f"data: row {i + 1}"):
    return tokenize([row_texts(r, tokenizer, where(i), "pref") for i, r in enumerate(rows)], tokenizer, max_length, max_prompt_length)

def load_data(cfg, tokenizer, need_pref: bool = True) -> dict:
    """SFT examples, preference pairs and test rows, every row checked in file order before any training (the built-in task
    when no data is given; without --eval_data the last --eval_size SFT rows are held out). data["report"]: per data set its
    source, split, rows read and used, the counts of `tokenize`, and the files' sha256 (--resume refuses changed data)."""
    kinds = ("sft", "pref", "test") if need_pref else ("sft", "test")
    if cfg.sft_data:
        held_out = 0 if cfg.eval_data else cfg.eval_size
        sets = {"sft": read_rows(cfg.sft_data, cfg.sft_split, cfg.n_sft + held_out if cfg.n_sft else 0, "--sft_data", cfg.sft_config),
                "pref": read_rows(cfg.pref_data, cfg.pref_split, cfg.n_pref, "--pref_data", cfg.pref_config) if need_pref else None,
                "test": read_rows(cfg.eval_data, cfg.eval_split, cfg.eval_size, "--eval_data", cfg.eval_config) if cfg.eval_data else None}
        texts = {kind: [row_texts(r, tokenizer, sets[kind].where(i), "pref" if kind == "pref" else "sft", cfg.last_turn_only or kind == "test")
                        for i, r in enumerate(sets[kind].rows)] for kind in kinds if sets[kind]}
        checks = [("test", 0, "evaluation answers prompts")] if cfg.eval_data else \
            [("sft", max(len(texts["sft"]) - held_out, 0), "the last --eval_size rows are held out as test prompts (or give --eval_data)")]
        for kind, start, why in checks + [("sft", 0, "LD-Align answers each SFT prompt itself")] * (not need_pref):
            if (k := next((k for k in range(start, len(texts[kind])) if not prompt_text(texts[kind][k][0])), None)) is not None:
                raise DataError(f"{sets[kind].where(k)}: a 'text' row has no prompt, and {why}; give rows with a prompt")
        if not cfg.eval_data:
            if len(texts["sft"]) <= held_out:
                raise DataError(f"{cfg.sft_data}: {len(texts['sft'])} rows leave nothing to train on after holding out --eval_size "
                                f"{held_out}; lower it or give --eval_data")
            texts["sft"], texts["test"] = texts["sft"][:-held_out], texts["sft"][-held_out:]
            sets["test"] = SimpleNamespace(source=f"{cfg.sft_data} (its last {held_out} rows)", split=sets["sft"].split, files=[],
                                           rows=texts["test"], repeated=0)
    else:
        task = builtin_task(cfg.seed, cfg.n_sft, cfg.n_pref if need_pref else 0, cfg.eval_size)
        sets = {kind: SimpleNamespace(source="built-in task", split=kind, files=[], rows=task[kind], repeated=0) for kind in kinds}
        texts = {kind: [(r["prompt"], *(r[k] for k in ("completion", "chosen", "rejected") if k in r)) for r in task[kind]] for kind in kinds}
    if empty := [kind for kind in kinds if not texts[kind]]:
        raise DataError(f"{sets[empty[0]].source}: no rows")
    sft, sft_counts = tokenize(texts["sft"], tokenizer, cfg.max_length, cfg.max_prompt_length)
    pref, pref_counts = tokenize(texts.get("pref", []), tokenizer, cfg.max_length, cfg.max_prompt_length)
    if need_pref and pref_counts["identical"] == len(texts["pref"]):
        raise DataError(f"{cfg.pref_data}: in every pair chosen and rejected are the same text; there is nothing to learn")
    if not sft or (need_pref and not pref):
        raise DataError("no training rows left after skipping overlong ones; raise --max_length")
    tests = [{"prompt": prompt_text(p), "reference": r} for p, r in texts["test"]]
    room = max(cfg.max_length - cfg.max_new_tokens, cfg.max_prompt_length)
    used = {"sft": (len(sft), sft_counts), "pref": (len(pref), pref_counts), "test": (len(tests), {
        "prompt_cut": sum(len(encode_prompt(tokenizer, t["prompt"])) > room for t in tests),
        "in_training": len({t["prompt"] for t in tests} & {e["prompt"] for e in sft + pref})})}
    report = {kind: {"source": sets[kind].source, "split": sets[kind].split, "rows_read": len(texts[kind]), "rows_used": used[kind][0],
                     **used[kind][1], "repeated": sets[kind].repeated, "sha256": files_sha256(sets[kind].files)} for kind in kinds}
    return {"sft": sft, "pref": pref, "test": tests, "builtin": not cfg.sft_data, "report": report}

def data_lines(report: dict, cfg) -> list[str]:
    """What each data set gave, a line each, and a warning when test prompts were trained on."""
    lines, cuts = [], {"prompt_cut": "prompts cut from the left", "response_cut": "responses cut from the right, losing their EOS",
                       "skipped": "rows skipped (no room for a response)", "identical": "pairs skipped (chosen == rejected)"}
    for kind, r in report.items():
        cut = "; ".join(f"{r[key]} {text}" for key, text in cuts.items() if r.get(key))
        lines.append(f"{dict(sft='SFT', pref='preference', test='test')[kind]} data: {r['source']}, split {r['split']}: "
                     f"{r['rows_used']} of {r['rows_read']} rows used" + (f" ({cut}; --max_length {cfg.max_length}, "
                                                                          f"--max_prompt_length {cfg.max_prompt_length})" if cut else "")
                     + (f"; {r['rows_used'] + r['earlier_turns']} assistant turns trained ({r['earlier_turns']} before a "
                        f"conversation's last)" if r.get("earlier_turns") else "")
                     + (f"; {r['repeated']} rows not read: each repeats a row of another file of the split" if r.get("repeated") else ""))
    if report["test"]["in_training"]:
        lines.append(f"warning: {report['test']['in_training']} of the {report['test']['rows_used']} test prompts are also "
                     f"training prompts: their scores measure memory, not generalisation")
    return lines

def files_sha256(files: list[Path]) -> str | None:
    """One sha256 over the files' names and bytes (None for none: a hub data set, the built-in task)."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest() if files else None


# ==== Settings and the command line =========================================================================

class UserError(Exception):
    """Bad input, or a run that had to stop: cli() prints the message alone (--debug: the traceback)."""

class ConfigError(UserError):
    """A bad flag, or flags that do not go together."""

class DataError(UserError, ValueError):
    """Bad data, named by file, row and field, before any training starts."""

class NonFiniteError(UserError):
    """A NaN or infinite loss, gradient norm or weight: stopped before the optimizer moved."""


PATH_FLAGS = ("model", "sft_data", "pref_data", "eval_data", "reward_model", "output_dir")

@functools.cache  # (reading a class's source is slow; it never changes in a run)
def setting_rules(cls) -> tuple[dict, dict, dict]:
    """({flag: help}, {flag: range}, {flag: choices}) from the comments of a config class and its bases."""
    import inspect

    helps = {}
    for klass in reversed(cls.__mro__[:-1]):
        helps.update(re.findall(r"^\s+(\w+): [^=\n]+= [^#\n]+#\s*(.+)$", inspect.getsource(klass), flags=re.M))
    ranges = {k: m.group(1) for k, h in helps.items() if (m := re.search(r" ([\[(][^\s,]+, [^\s,]+[\])])$", h))}
    choices = {k: tuple(m.group(1).split(", ")) for k, h in helps.items() if (m := re.search(r" \{([^}]+)\}$", h))}
    return helps, ranges, choices

def setting_problem(name: str, value, ranges: dict, choices: dict) -> str | None:
    """What is wrong with one setting's value ("must be in [1, inf); got 0"), or None."""
    if name in choices and value not in choices[name]:
        return f"must be one of {', '.join(choices[name])}; got {value!r}"
    if name in ranges and not in_range(value, ranges[name]):
        return f"must be in {ranges[name]}; got {value}"
    return None

def in_range(value, interval: str) -> bool:
    """value in an interval written "[1, inf)", "(0, 1]", ... (NaN is in none)."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    return bool((value >= low if interval[0] == "[" else value > low) and (value <= high if interval[-1] == "]" else value < high))

def parse_config(cls, argv=None):
    """argparse over a config dataclass, a --flag per field with its comment as help, and --config FILE (read_settings):
    the flags given win over the file. A bad flag or file is a ConfigError (one line). Paths get ~ expanded (the shell
    does not expand --output_dir=~/x)."""
    import argparse

    helps = setting_rules(cls)[0]
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(message):
        raise ConfigError(f"{message} (see --help)")
    parser.error = error
    parser.add_argument("--config", default="", help="a YAML or JSON file of settings named as the flags (README); flags given beside it win")
    for f in dataclasses.fields(cls):
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else dict(type=type(f.default))
        parser.add_argument(f"--{f.name}", default=f.default, help=helps.get(f.name, "").replace("%", "%%"), **kind)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if file := parser.parse_known_args(argv)[0].config:
        parser.set_defaults(**read_settings(cls, file))
    values = vars(parser.parse_args(argv))
    del values["config"]  # (results.json records the settings themselves)
    return cls(**{k: os.path.expanduser(v) if k in PATH_FLAGS else v for k, v in values.items()})

def read_settings(cls, file: str) -> dict:
    """--config FILE (.yaml, .yml or .json): {setting: value}, each checked as its flag would be (name, type, range,
    choices); a bad one is refused naming the file and key. A string for a number is read as the flag reads it (YAML
    takes 1e-3 for a string)."""
    import difflib

    import yaml

    where, path = f"--config {file}", Path(file).expanduser()
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{where}: give a .yaml, .yml or .json file of settings")
    try:
        text = path.read_text(encoding="utf-8")
        settings = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeError) as e:  # (UnicodeError: a file name or text that is not UTF-8)
        raise ConfigError(f"{where}: {getattr(e, 'strerror', None) or first_line(e)}") from None
    except (ValueError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{where}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          + (f"{e.problem} (line {mark.line + 1})" if mark else first_line(e))) from None
    if not isinstance(settings, dict | None):
        raise ConfigError(f"{where}: must hold a mapping of settings (setting: value), not a {type(settings).__name__}")
    fields, (_, ranges, choices) = {f.name: f for f in dataclasses.fields(cls)}, setting_rules(cls)
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    for key, value in (settings or {}).items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, 1)
            raise ConfigError(f"{where}: unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else " (see --help)"))
        kind = type(fields[key].default)
        if kind in (int, float) and type(value) is str or kind is float and type(value) is int:
            with contextlib.suppress(ValueError):
                value = settings[key] = kind(value)
        if type(value) is not kind:
            raise ConfigError(f"{where}: {key} must be {kinds[kind]}; got {value!r}")
        if problem := setting_problem(key, value, ranges, choices):
            raise ConfigError(f"{where}: {key} {problem}")
    return settings or {}

def check_config(cfg, need_pref: bool = True, problems: Iterable[str] = ()) -> None:
    """Every setting, before anything is loaded or written: ranges and choices, flags that must agree, the
    device and the output folder; `problems` are a script's own. need_pref=False (LD-Align): SFT data alone
    is real data, and --pref_data is refused."""
    problems, (_, ranges, choices) = list(problems), setting_rules(type(cfg))
    problems += [f"--{name} {problem}" for name, value in dataclasses.asdict(cfg).items() if (problem := setting_problem(name, value, ranges, choices))]
    unreadable = [name for name, value in dataclasses.asdict(cfg).items() if isinstance(value, str) and LONE_SURROGATE.search(value)]
    problems += [f"--{name} {getattr(cfg, name)!r} is not UTF-8 text (an undecodable byte or a lone surrogate): no library takes it; "
                 f"rename the file or folder, or give another" for name in unreadable]
    rules = [(cfg.grad_accum_steps >= 1 and cfg.batch_size % cfg.grad_accum_steps,
              f"--batch_size {cfg.batch_size} must be a multiple of --grad_accum_steps {cfg.grad_accum_steps}"),
             (cfg.ppo_minibatches > cfg.ppo_batch_size >= 1, f"--ppo_minibatches {cfg.ppo_minibatches} is more than --ppo_batch_size {cfg.ppo_batch_size}"),
             (cfg.max_prompt_length >= cfg.max_length, f"--max_prompt_length {cfg.max_prompt_length} must be below --max_length {cfg.max_length}"),
             (cfg.loss_type == "ipo" and cfg.label_smoothing, "--label_smoothing applies to --loss_type sigmoid only"),
             (need_pref and bool(cfg.sft_data) != bool(cfg.pref_data), "give both --sft_data and --pref_data, or neither (the built-in task)"),
             (not need_pref and cfg.pref_data, "--pref_data is not used by this script (it needs SFT data only); drop it"),
             *((getattr(cfg, f"{k}_config") and not getattr(cfg, f"{k}_data"), f"--{k}_config picks a config of --{k}_data; give both")
               for k in ("sft", "pref", "eval")),
             (not cfg.sft_data and (cfg.n_sft == 0 or (need_pref and cfg.n_pref == 0)),
              "the built-in task needs --n_sft and --n_pref of at least 1 (0 means 'all rows' of a file)"),
             (cfg.resume and cfg.overwrite, "--resume continues the run in --output_dir and --overwrite replaces it; give one"),
             (not cfg.output_dir.strip(), f"--output_dir {cfg.output_dir!r} is empty or blank; give the folder the run writes into"),
             (cfg.output_dir.strip() and "output_dir" not in unreadable and Path(cfg.output_dir).resolve() == Path.cwd().resolve(),
              f"--output_dir {cfg.output_dir} is the current folder; give the run a folder of its own (e.g. --output_dir runs/NAME)"),
             (cfg.fsdp and not dist.is_initialized(), "--fsdp shards the models over torchrun's processes: torchrun --nproc_per_node N script.py --fsdp")]
    problems += [message for broken, message in rules if broken]
    if not problems:  # the device, then the folder: only worth checking once the flags themselves are right
        try:
            pick_dtype(cfg.dtype, pick_device(cfg.device))
            if not cfg.show_examples:  # (it only prints: the folder is not used)
                check_output_dir(cfg)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "bad settings:\n  " + "\n  ".join(problems))

def stop_message(e: BaseException) -> str:
    """cli's one line for a run that stopped: what happened, and what to do."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted: every file in --output_dir is whole; --resume continues from the last checkpoint"
    if isinstance(e, torch.OutOfMemoryError):
        return "error: out of GPU memory; lower --batch_size (or raise --grad_accum_steps), --eval_batch_size, --ppo_batch_size or --max_length"
    if isinstance(e, MemoryError):
        return "error: out of memory; the checkpoints are kept: free some, then --resume continues"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"error: no space left on the device ({e.filename}); free some, then --resume"
    if isinstance(e, RuntimeError):  # (lost_peer)
        return f"error: another process of this torchrun run stopped ({first_line(e)[:120]}); the checkpoints are kept: --resume continues"
    if isinstance(e, OSError):
        return f"error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; the checkpoints are kept: fix it, then --resume continues"
    return f"error: {e}"

def lost_peer(e: BaseException) -> bool:
    """A collective failed because another torchrun process stopped (gloo and NCCL raise plain RuntimeErrors for it)."""
    return dist.is_initialized() and (isinstance(e, dist.DistError) or any(name in str(e) for name in ("gloo", "NCCL", "Connection closed")))

def cli(main: Callable, config_cls) -> None:
    """Every script's entry point: flags -> config -> (torchrun: join the process group) -> main(config). A
    UserError prints its message alone and exits 2 (bad input) or 1 (a stopped run); SIGINT and SIGTERM stop
    resumably (130), resource errors too (disk, file size, permission, memory: 1). Any failure leaves the run's
    checkpoints for --resume."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("ALIGN_DEBUG", "0") not in ("", "0")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops a run as SIGINT does
    code = None
    try:
        cfg = parse_config(config_cls)
        init_distributed(cfg)
        main(cfg)
        barrier()  # every rank done before any leaves
        code = 0
    except (UserError, KeyboardInterrupt, torch.OutOfMemoryError, MemoryError, OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and not lost_peer(e):
            raise  # a bug: its traceback
        code = 130 if isinstance(e, KeyboardInterrupt) else 2 if isinstance(e, (ConfigError, DataError)) else 1
        if debug:
            if dist.is_initialized():  # (os._exit below would swallow the traceback)
                traceback.print_exc()
            raise
        if is_main():  # every rank meets the same bad input: one message
            print(stop_message(e), file=sys.stderr)
    finally:  # (whatever stopped the run, its checkpoints stay for --resume)
        if dist.is_initialized() and code is not None:  # leave before gloo's threads can abort a rank in Python's clean-up
            dist.destroy_process_group()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    if code:
        sys.exit(code)


# ==== Output folder, checkpoints, logs ======================================================================
# Files are whole or absent (written under a temporary name, then renamed), never written through a symbolic link. One run
# holds a folder (a lock on <output_dir>/.lock). --overwrite removes the earlier run's files once every check has passed, its
# checkpoint first (what is left of a removal stopped half-way cannot be resumed); from then on every failure leaves the new
# run's checkpoints for --resume. Checkpoints are safetensors and JSON (loading them runs no code), with a
# sha256 of every file a resumed run will read.

RUN_FILES = ("results.json", "metrics.jsonl", "checkpoint", "sft", "reward_model", "final", "final_spin", "two_stage", "joint")
_held = SimpleNamespace(lock=None)  # this process's lock on its --output_dir

def run_files(out: Path) -> list[str]:
    """The earlier run's files and folders in `out`, leftovers of interrupted writes included."""
    return [p.name for name in RUN_FILES for p in (out / name, out / f"{name}.tmp", out / f"{name}.old") if os.path.lexists(p)]

def check_output_dir(cfg) -> None:
    """--output_dir: writable, without another run's files (unless --overwrite or --resume) or a symbolic link where a run writes."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out}: is a file, not a folder")
    parent = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {out}: {parent} is not writable")
    found = run_files(out) if out.is_dir() else []
    if links := [name for name in [*found, ".lock"] if (out / name).is_symlink()]:
        raise ConfigError(f"--output_dir {out}: {links[0]} is a symbolic link; a run writes only real files in its folder: remove it")
    # a run killed before its first checkpoint leaves only its log and half-written files: nothing to resume, so a rerun clears them
    if [n for n in found if n != "metrics.jsonl" and not n.endswith(".tmp")] and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--output_dir {out} holds another run's files ({', '.join(found)}); pass --overwrite to replace them, "
                          f"--resume to continue that run, or choose another --output_dir")

def take_folder(out: Path, cfg, resumed: bool, seen: list[str]) -> None:
    """After every check: lock `out` (the OS drops the lock with its holder), then remove the earlier run's files (--overwrite, or a run
    killed before its first checkpoint), or (resumed) the leftovers of interrupted writes and results.json."""
    out.mkdir(parents=True, exist_ok=True)
    release_lock()
    _held.lock = os.fdopen(os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    try:
        fcntl.flock(_held.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"--output_dir {out} is in use by another run (process {_held.lock.read().strip() or '?'}); wait for "
                          f"it to end, or choose another --output_dir") from None
    _held.lock.truncate(0), _held.lock.write(str(os.getpid())), _held.lock.flush()
    if run_files(out) != seen:
        raise ConfigError(f"--output_dir {out} changed while this run was starting (another run?); look at it and start again")
    if not resumed and cfg.resume and (out / "results.json").exists():
        raise ConfigError(f"--resume: {out} holds a finished run and no checkpoint; pass --overwrite to replace it")
    if resumed:  # only leftovers of interrupted writes, and the results the resumed run will write again
        seen = [name for name in seen if name.endswith(".tmp") or name == "results.json"]
    for name in sorted(seen, key=lambda name: not name.startswith("checkpoint")):  # the checkpoint first: no half-removed resume
        remove(out / name)

def release_lock() -> None:
    if _held.lock is not None:
        _held.lock.close()  # (the OS drops the lock with the file)
        _held.lock = None

def remove(path: Path) -> None:
    """A file, a link (not what it points to) or a folder."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

def write_folder(path, fill: Callable[[Path], object]) -> None:
    """fill(tmp) writes a folder that then replaces `path`: an interruption leaves the old or the new one (between the renames the
    old is <path>.old, which load_checkpoint reads too). A full disk is one message, and nothing half-written is left."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if os.path.lexists(tmp):
        remove(tmp)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except Exception as e:
        remove(tmp)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    if os.path.lexists(path):  # (if only <path>.old is left from an interruption, it stays until tmp is in place)
        if os.path.lexists(old):
            remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if os.path.lexists(old):
        remove(old)

def to_json(obj, where: str, indent: int | None = 1) -> str:
    """json.dumps that refuses NaN and inf (not JSON), naming the file."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:
        raise NonFiniteError(f"{where}: not written: it would hold a NaN or infinite value") from None

def write_text(path: Path, text: str, mode: int = os.O_TRUNC) -> None:
    """Write (or, mode os.O_APPEND, append to) a file, never through a symbolic link."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | mode, 0o644), "w") as f:
        f.write(text)

def write_json(path, obj) -> None:
    """A finite JSON file written whole (a temporary name, then renamed); on N ranks rank 0 writes."""
    path, text = Path(path), to_json(obj, str(path))
    if is_main():
        tmp = path.with_name(path.name + ".tmp")
        if os.path.lexists(tmp):
            tmp.unlink()
        write_text(tmp, text)
        os.replace(tmp, path)

def open_log(out: Path, keep_lines: int = 0) -> Callable[[dict], None]:
    """log(record) appends a line to out/metrics.jsonl, first cut to keep_lines lines (a checkpoint's). Rank 0 logs."""
    if not is_main():
        return lambda record: None
    path = out / "metrics.jsonl"
    write_text(out / "metrics.jsonl.tmp", "".join(metrics_lines(out)[:keep_lines]))
    os.replace(out / "metrics.jsonl.tmp", path)
    return lambda record: write_text(path, to_json(record, str(path), indent=None) + "\n", os.O_APPEND)

def metrics_lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines(keepends=True) if (out / "metrics.jsonl").is_file() else []

def load_state(path: Path):
    """A checkpoint's RNG or optimizer state, read by torch's weights-only unpickler: tensors and plain values only, no pickled
    code runs (a file holding any is refused)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(f"--resume: {path} holds pickled code, not plain state: refused unread; start again with --overwrite") from None

def save_checkpoint(run, state: dict, model=None, extra: dict | None = None, reads: Iterable[str] = ()) -> None:
    """out/checkpoint/, written whole: state.json (settings, position, results so far, metrics.jsonl's lines and sha256, the data's
    and every read file's sha256), rng.pt, and the model and extra.pt when given. `reads`: folders --resume loads."""
    lines = metrics_lines(run.out)
    state = {**state, "format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(run.cfg), "metrics_lines": len(lines),
             "metrics_sha256": hashlib.sha256("".join(lines).encode()).hexdigest(),
             "data_sha256": {kind: r["sha256"] for kind, r in run.data["report"].items()}, "inputs": run.inputs}
    if model is not None:
        check_finite_weights(model, run.out / "checkpoint")
    state_dict = full_state_dict(model) if model is not None else None

    def fill(tmp: Path) -> None:
        if model is not None:
            model.save_pretrained(tmp, state_dict=state_dict)
            run.tokenizer.save_pretrained(tmp)
        torch.save(rng_state(), tmp / "rng.pt")
        if extra is not None:
            torch.save(extra, tmp / "extra.pt")
        files = [f.name for f in tmp.glob("*.safetensors")] + ["rng.pt"] + ["extra.pt"] * (extra is not None) + [f"../{d}/{f.name}" for d in reads for f in (run.out / d).glob("*.safetensors")]
        state["sha256"] = {name: files_sha256([tmp / name]) for name in files}
        write_text(tmp / "state.json", to_json(state, str(run.out / "checkpoint" / "state.json")))

    if is_main():  # on N ranks rank 0 writes (the RNG state is the same on every rank); the others wait
        write_folder(run.out / "checkpoint", fill)
    barrier()

CHECKPOINT_FORMAT = 2  # raised when state.json's layout changes: an older checkpoint is refused as older, not misread

def load_checkpoint(out: Path, cfg) -> dict | None:
    """out/checkpoint's state (None: none), known to be this run's: the same settings (but --resume, --overwrite, --debug, --device,
    --output_dir), every file it reads unchanged, metrics.jsonl still holding its lines. Adds "folder", "rng" and "extra"."""
    folder = next((f for f in (out / "checkpoint", out / "checkpoint.old") if (f / "state.json").exists()), None)
    if folder is None:
        return None
    try:
        state = json.loads((folder / "state.json").read_text())
        state["config"], state["metrics_lines"], state["sha256"]["rng.pt"]  # noqa: B018 (a KeyError: not this version's)
        if state.get("format") != CHECKPOINT_FORMAT:  # (2: the --*_config settings, HBAT's state["drift"])
            raise KeyError("format")
    except Exception:
        raise ConfigError(f"--resume: {folder / 'state.json'} is damaged or from an older version; start again with --overwrite") from None
    now, skip = dataclasses.asdict(cfg), ("resume", "overwrite", "debug", "device", "output_dir")
    if changed := [k for k in now if k not in skip and state["config"].get(k) != now[k]]:
        raise ConfigError(f"--resume: {folder} was written with other settings: "
                          + ", ".join(f"--{k} {state['config'].get(k)} (now {now[k]})" for k in changed))
    for name, digest in state["sha256"].items():
        if not (folder / name).is_file() or files_sha256([folder / name]) != digest:
            raise ConfigError(f"--resume: {(folder / name).resolve()} is missing or changed since the checkpoint; start again with --overwrite")
    if hashlib.sha256("".join(metrics_lines(out)[:state["metrics_lines"]]).encode()).hexdigest() != state["metrics_sha256"]:
        raise ConfigError(f"--resume: {out / 'metrics.jsonl'} no longer holds the {state['metrics_lines']} lines the checkpoint logged; "
                          f"start again with --overwrite")
    return {**state, "folder": folder, "rng": load_state(folder / "rng.pt"),
            "extra": load_state(folder / "extra.pt") if "extra.pt" in state["sha256"] else None}  # (only the files it lists)

def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

def restore_rng(rng: dict) -> None:
    """After loading every model a resumed run needs (loading may draw numbers), before any work."""
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])

def check_finite_weights(model, path) -> None:
    bad = torch.tensor([not torch.isfinite(local(p)).all() for p in model.parameters()], dtype=torch.long)
    if bad := [name for (name, _), b in zip(model.named_parameters(), sum_over_ranks(bad).tolist()) if b]:  # any rank's shard
        raise NonFiniteError(f"{path}: not saved: {len(bad)} parameter tensors hold NaN or inf (first: {bad[0]})")

def save_model(model, tokenizer, path) -> None:
    """save_pretrained of model and tokenizer, written whole, finite weights only; rank 0 writes (FSDP shards gathered)."""
    check_finite_weights(model, path)
    state_dict = full_state_dict(model)
    quiet_libraries()
    if is_main():
        write_folder(path, lambda tmp: (model.save_pretrained(tmp, state_dict=state_dict), tokenizer.save_pretrained(tmp)))
    barrier()


# ==== Set-up and report, the same in every script ===========================================================

def prepare(cfg, *, need_pref: bool = True, problems: Iterable[str] = ()) -> SimpleNamespace:
    """Every check that needs no weights, before anything is written: flags, device, output folder and checkpoint, tokenizer, every
    data row, the judge (--reward_model). The script then loads its models and calls begin()."""
    check_config(cfg, need_pref=need_pref, problems=problems)
    device, out = pick_device(cfg.device), Path(cfg.output_dir)
    checkpoint = load_checkpoint(out, cfg) if cfg.resume else None
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    data, inputs = load_data(cfg, tokenizer, need_pref), input_prints(cfg)
    if cfg.show_examples:  # before any model is loaded or file written
        if is_main():
            print("\n\n".join(example_lines(data, tokenizer, cfg.show_examples)))
        raise SystemExit(0)
    sets = [("--sft_data", [e["input_ids"] for e in data["sft"]]), ("--pref_data", [e[k]["input_ids"] for e in data["pref"] for k in ("chosen", "rejected")]),
            ("--eval_data" if cfg.eval_data else "--sft_data", [encode_prompt(tokenizer, t["prompt"]) for t in data["test"]])]
    for flag, ids in sets if cfg.model in TINY_MODELS and cfg.sft_data else ():  # (tiny's vocabulary: the task's words)
        if (unknown := sum(row.count(tokenizer.unk_token_id) for row in ids) / max(sum(map(len, ids)), 1)) > 0.02:
            raise ConfigError(f"--model {cfg.model}: {unknown:.0%} of {flag}'s tokens are unknown to it (<unk>: it knows only the "
                              f"built-in task's {len(tokenizer)} words); give --model NAME_OR_PATH, a model whose tokenizer reads your data")
    check_inputs_unchanged(checkpoint, data, inputs)
    judge = load_reward_model(cfg.reward_model, tokenizer, cfg.trust_remote_code) if cfg.reward_model else None
    return SimpleNamespace(cfg=cfg, device=device, dtype=pick_dtype(cfg.dtype, device), out=out, checkpoint=checkpoint,
                           tokenizer=tokenizer, data=data, inputs=inputs, judge=judge, seen=run_files(out) if out.is_dir() else [])

def marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The text of a sequence as the model sees it, each run of tokens that carries the loss in [[ ]]."""
    ends = [t + 1 for t in range(len(labels)) if t + 1 == len(labels) or (labels[t] == IGNORE_INDEX) != (labels[t + 1] == IGNORE_INDEX)]
    pieces, done = [], ""
    for start, end in zip([0, *ends], ends):  # each run's text: what it adds to the decoded prefix (keeps the tokenizer's spacing)
        text = tokenizer.decode(input_ids[:end], skip_special_tokens=False)
        piece = text[len(done):] if text.startswith(done) else tokenizer.decode(input_ids[start:end], skip_special_tokens=False)
        pieces.append(f"[[{piece}]]" if labels[start] != IGNORE_INDEX else piece)
        done = text
    return "".join(pieces)

def example_lines(data: dict, tokenizer, n: int) -> list[str]:
    """--show_examples: the first n SFT examples and preference pairs, marked by marked_text."""
    lines = []
    for i, e in enumerate(data["sft"][:n]):
        lines.append(f"SFT example {i + 1} of {len(data['sft'])}:\n{marked_text(tokenizer, e['input_ids'], e['labels'])}")
    for i, pair in enumerate(data["pref"][:n]):
        lines += [f"preference pair {i + 1} of {len(data['pref'])}, {side}:\n{marked_text(tokenizer, **pair[side])}"
                  for side in ("chosen", "rejected")]
    return lines

def check_inputs_unchanged(checkpoint: dict | None, data: dict, inputs: dict) -> None:
    """--resume: the data and the model folders (input_prints) as they were when the run began, or one line naming what changed."""
    if changed := [k for k, digest in (checkpoint or {}).get("data_sha256", {}).items() if data["report"][k]["sha256"] != digest]:
        raise ConfigError(f"--resume: {data['report'][changed[0]]['source']} changed since the checkpoint; start again with --overwrite")
    for flag, then in (checkpoint or {}).get("inputs", {}).items():
        now = inputs.get(flag)
        if then != now:
            names = sorted({*(then or {}), *(now or {})})
            name = next(n for n in names if (then or {}).get(n) != (now or {}).get(n))
            raise ConfigError(f"--resume: --{flag} {checkpoint['config'][flag]}: {name} "
                              f"{'changed' if name in (then or {}) and name in (now or {}) else 'added' if name in (now or {}) else 'removed'}"
                              f" since the checkpoint; start again with --overwrite")

INPUT_FOLDERS = ("model", "reward_model")  # the flags naming model folders that shape a run's result
WHOLE_HASH_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones (weights) by size and modification time

def input_prints(cfg) -> dict:
    """{flag: {file: sha256, or "size bytes, mtime ns" above WHOLE_HASH_BYTES}} of each model folder the run reads (None for a hub
    name, the built-in model or no flag): --resume refuses a folder whose config, tokenizer or weights changed since the run began."""
    prints = {}
    for flag in INPUT_FOLDERS:
        folder = Path(getattr(cfg, flag, "")).expanduser()
        if not getattr(cfg, flag, "") or not folder.is_dir():
            prints[flag] = None
            continue
        files = [f for f in sorted(folder.rglob("*")) if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts)]
        prints[flag] = {str(f.relative_to(folder)): files_sha256([f]) if f.stat().st_size <= WHOLE_HASH_BYTES else
                        f"{f.stat().st_size} bytes, mtime {f.stat().st_mtime_ns}" for f in files}
    return prints

def begin(run, policy, *models, resumed: bool | None = None) -> Callable[[dict], None]:
    """The data's token ids against the model's embedding, its longest sequence against the model's positions, one model against
    the free disk; then the folder is taken
    (`resumed`: a checkpoint continues), the log opened, the models placed, a summary printed, the RNG restored. Returns log()."""
    cfg, data, tokenizer = run.cfg, run.data, run.tokenizer
    resumed = run.checkpoint is not None if resumed is None else resumed
    prompts = [generation_prompt(tokenizer, r["prompt"], cfg) for r in data["test"]]
    trained = [e["input_ids"] for e in data["sft"]] + [e[k]["input_ids"] for e in data["pref"] for k in ("chosen", "rejected")]
    embedded = min(m.get_input_embeddings().num_embeddings for m in (policy, run.judge) if m is not None)
    if (top := max(max(ids, default=0) for ids in trained + prompts)) >= embedded:
        raise ConfigError(f"--model {cfg.model}: its tokenizer gives token id {top} ({len(tokenizer)} tokens), but the model's embedding "
                          f"has {embedded} rows; give a model folder whose tokenizer belongs to its weights")
    longest = max([len(ids) for ids in trained] + [len(ids) + cfg.max_new_tokens for ids in prompts])
    positions = min(n for n in (getattr(policy.config.get_text_config(), "max_position_embeddings", None), tokenizer.model_max_length,
                                longest) if n)
    if longest > positions:  # the hint passes check_config: the prompt below --max_length, and room for --max_new_tokens
        prompt = min(cfg.max_prompt_length, positions - cfg.max_new_tokens)
        hint = f"--max_length {positions}" + (f" --max_prompt_length {prompt}" if prompt != cfg.max_prompt_length else "") if prompt >= 1 \
            else f"--max_length {positions} --max_prompt_length {positions // 2} --max_new_tokens {positions - positions // 2}"
        raise ConfigError(f"--max_length {cfg.max_length}: --model {cfg.model} takes at most {positions} tokens (its position "
                          f"embeddings or tokenizer), and the data need {longest}; give {hint}")
    need = sum(p.numel() * p.element_size() for p in policy.parameters())
    if (free := shutil.disk_usage(next(p for p in [run.out, *run.out.absolute().parents] if p.exists())).free) < need:
        raise ConfigError(f"--output_dir {run.out}: {free / 2**20:.0f} MiB free on its disk, and one saved model needs {need / 2**20:.0f} MiB")
    barrier()  # every rank has looked at the folder before rank 0 changes it
    if is_main():
        take_folder(run.out, cfg, resumed, run.seen)
    barrier()
    log = open_log(run.out, run.checkpoint["metrics_lines"] if run.checkpoint else 0)
    for model in (policy, run.judge, *models):
        if model is not None:
            place(model, cfg, run.device)
    print("\n".join(data_lines(data["report"], cfg)) + f"\nmodel {cfg.model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M "
          f"parameters) on {run.device}, {run.dtype}" + ((f"; --resume: continuing {run.out} from its checkpoint" if resumed else
                                                          f"; --resume: no checkpoint in {run.out}, starting from the beginning") if cfg.resume else ""))
    if run.checkpoint:
        restore_rng(run.checkpoint["rng"])
    return log

def finish(run, results: dict, columns: dict[str, dict], legend: str, examples: dict[str, list[str]], saved: list) -> dict:
    """results.json (settings, data report, `results`, examples), the lock released, the metrics printed."""
    results = {"config": dataclasses.asdict(run.cfg), "data": run.data["report"], **results,
               "examples": [{"prompt": t["prompt"], "reference": t["reference"], **{k: v[i] for k, v in examples.items()}}
                            for i, t in enumerate(run.data["test"][:5])]}
    write_json(run.out / "results.json", results)
    release_lock()
    meanings = ["instruction: the list format kept where the prompt asks for a list"] if not run.cfg.sft_data else []
    meanings += ["rougeL: F1 against the reference", f"reward: {results['reward_metric']}"]
    meanings += [f"*_sampled: over {run.cfg.eval_samples} responses per prompt at temperature 1"] if run.cfg.eval_samples else []
    meanings += ["length: response tokens", legend]
    print("\n" + format_table(columns) + "\n" + "; ".join(meanings) + f"\n\nexample prompt: {results['examples'][0]['prompt']}")
    for key in ("reference", *examples):
        print(f"  {key + ':':11}{results['examples'][0][key]}")
    print(f"\nsaved {', '.join(map(str, [*saved, run.out / 'results.json']))}")
    return results

def format_table(columns: dict[str, dict]) -> str:
    """Models side by side: one column per model, one row per metric."""
    width, metrics = max(12, *map(len, columns)), list(dict.fromkeys(k for c in columns.values() for k in c))
    first = max(12, *map(len, metrics))
    lines = ["metric".ljust(first) + "".join(n.rjust(width + 2) for n in columns)]
    for m in metrics:
        cells = [c.get(m) for c in columns.values()]
        lines.append(m.ljust(first) + "".join((f"{c:.3f}" if isinstance(c, float) else "n/a" if c is None else str(c)).rjust(width + 2) for c in cells))
    return "\n".join(lines)

class LogLines:
    """tqdm's output when stderr is a file or a pipe: plain lines (no carriage-return redraws), no repeats."""
    last = ""

    def write(self, text: str) -> None:
        if (text := text.strip("\r\n")) and text != self.last:
            self.last = text
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        pass

def progress(total: int, desc: str, disable: bool = False):
    """A tqdm bar on a terminal; in a log file, a plain line at the start, every 30 s and at the end."""
    if sys.stderr.isatty() or disable or not is_main():
        return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=disable or not is_main())
    return tqdm(total=total, desc=desc, file=LogLines(), mininterval=30, bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]{postfix}")


# ==== Device ================================================================================================

def pick_device(device: str = "auto") -> torch.device:
    """auto: CUDA when present, else CPU. A CUDA device this machine does not have is refused."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size() > 1 and device.startswith("cuda"):  # torchrun: one GPU per rank
        if device != "cuda":
            raise ConfigError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda or auto")
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                          f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu or auto")
    if device.startswith("cuda") and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(device)




# ==== More than one process (torchrun): a thin layer; with one process every function here does nothing =====
# Every rank draws the same batches and runs its slice, each loss divided by the whole batch's count, so the gradients summed
# over ranks are one process's. DDP (default): whole models, gradients summed by sync_gradients. --fsdp: FSDP2 shards each
# transformer layer (fully_shard sums their gradients); embeddings, final norm and heads stay whole. Rank 0 prints and saves.

def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0

def is_main() -> bool:
    return rank() == 0

def init_distributed(cfg) -> None:
    """Under torchrun (LOCAL_RANK set): join the process group (nccl with a GPU per rank, else gloo); only rank 0 prints."""
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():
        cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
        if rank() > 0:
            sys.stdout = open(os.devnull, "w")

def barrier() -> None:
    if world_size() > 1:
        dist.barrier()

def my_share(items: list) -> list:
    """This rank's contiguous slice of a global batch (all of it with one process)."""
    return split(items, world_size())[rank()] if world_size() > 1 else items

def gather(items: list) -> list:
    """Every rank's list (its my_share of something), concatenated in rank order, on every rank."""
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]

def gather_rows(t: torch.Tensor) -> torch.Tensor:
    return t if world_size() == 1 else torch.cat(gather([t.cpu()])).to(t.device)

def sum_over_ranks(t: torch.Tensor, op=None) -> torch.Tensor:
    """All ranks' t summed (or reduced by `op`), in place, on every rank."""
    if world_size() > 1:
        on = t.cuda() if dist.get_backend() == "nccl" else t  # nccl reduces GPU tensors only
        dist.all_reduce(on, op=op or dist.ReduceOp.SUM)
        t.copy_(on)
    return t

def is_sharded(t) -> bool:
    return isinstance(t, DTensor)

def local(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP) tensor's part on this rank; any other tensor itself."""
    return t.to_local() if is_sharded(t) else t

def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (every rank takes part); any other tensor itself."""
    return t.full_tensor() if is_sharded(t) else t

def my_part(params: dict) -> dict:
    """This rank's part of some weights for the EWC math: its FSDP shards, and the whole tensors on rank 0 only."""
    return {n: local(p) for n, p in params.items() if is_sharded(p) or is_main()}

def sync_gradients(params: list) -> None:
    """DDP's gradient sum for the tensors every rank holds whole: one all_reduce of a flat buffer."""
    if world_size() > 1 and (grads := [p.grad for p in params if not is_sharded(p) and p.grad is not None]):
        flat = sum_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
        for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(summed.view_as(g))

def lockstep(batches: list, filler) -> list:
    """Every rank runs as many passes as the busiest: `filler`s, losses times 0 (FSDP's forward gathers from all ranks at once,
    and DDP's gradient sum needs every rank's gradients)."""
    if world_size() == 1:
        return batches
    return batches + [filler] * (sum_over_ranks(torch.tensor([len(batches)]), dist.ReduceOp.MAX).item() - len(batches))

@contextlib.contextmanager
def rank_sampling(device):
    """Each rank samples from its own generator, seeded from the shared one (which stays in step on every rank)."""
    if world_size() == 1:
        yield
        return
    seed = int(torch.randint(2 ** 62, ()).item()) + rank()
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def set_checkpointing(model, cfg) -> None:
    """--gradient_checkpointing: the transformer layers keep only their inputs and recompute the rest."""
    if cfg.gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5's name
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

def place(model, cfg, device):
    """A model on its device; --fsdp: fully_shard on each transformer layer (bf16 in the forward, float32 gradient sums), then on
    the body as their root, its own weights (embeddings, final norm) left whole like the output layer."""
    model.to(device)
    if cfg.fsdp:
        shard(model, pick_dtype(cfg.dtype, device))
    return model

def shard(model, dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = [m for m in model.modules() if type(m).__name__ in (getattr(model, "_no_split_modules", None) or [])]
    if not layers:
        raise ConfigError(f"--fsdp: {type(model).__name__} names no transformer layer class (_no_split_modules) to shard")
    model.fsdp_dtype = dtype
    for layer in layers:
        fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
        layer.set_gradient_divide_factor(1.0)  # each rank's loss is already divided by the global count: sum
        layer.set_force_sum_reduction_for_comms(True)  # (gloo has no pre-scaled sum)
    body = getattr(model, model.base_model_prefix)
    in_layers = {p for layer in layers for p in layer.parameters()}
    fully_shard(body, ignored_params={p for p in body.parameters() if p not in in_layers})
    return model

def clone_model(model):
    """copy.deepcopy, also of a sharded model: the class built on the meta device, sharded alike, then every tensor copied."""
    if not any(is_sharded(p) for p in model.parameters()):
        return copy.deepcopy(model)
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    shard(twin, model.fsdp_dtype).to_empty(device=next(model.parameters()).device)
    twin.tie_weights()  # to_empty made new tensors, untying a tied output layer
    with torch.no_grad():
        for p, twin_p in zip(model.parameters(), twin.parameters(), strict=True):
            local(twin_p).copy_(local(p))
            twin_p.requires_grad_(p.requires_grad)
        for b, twin_b in zip(model.buffers(), twin.buffers(), strict=True):
            twin_b.copy_(b)
    if hasattr(model, "generation_config"):  # (a reward or value model has none)
        twin.generation_config = copy.deepcopy(model.generation_config)
    return twin.train(model.training)

def frozen_copy(model):
    """A frozen copy (no gradients, eval mode): a DPO or PPO reference."""
    return clone_model(model).requires_grad_(False).eval()

def full_state_dict(model) -> dict | None:
    """FSDP: the whole weights, gathered onto rank 0's CPU (every rank takes part); None otherwise."""
    if not any(is_sharded(p) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
