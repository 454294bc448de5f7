"""Shared pieces of the three alignment scripts (two_stage_baseline.py, hbat.py, ld_align.py).

Read top to bottom, this file is: device and seeding; more than one process (torchrun); the built-in
task; model and tokenizer loading; data loading, validation and tokenization; log-probs; the losses
(SFT, DPO, Bradley-Terry, PPO); the Fisher/EWC math; the training loops (one SFT stage, one DPO
stage, reward-model training, one PPO rollout/update step); generation; evaluation; configuration.
Functions are small; tests/ checks them. Conventions (../shared/METHODS.md section 4): labels are built before padding, prompt and padding
labels are IGNORE_INDEX, EOS is appended to every response and labelled (only truncation can cut it),
log-probs are float32.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

IGNORE_INDEX = -100

# ============================================================================================
# Errors: what the user can fix is reported as one message, with no traceback (see cli())
# ============================================================================================


class UserError(Exception):
    """Bad input (a flag, a file, a row) or a run that had to stop (a non-finite value). cli() prints the
    message alone and exits non-zero; --debug shows the traceback."""


class ConfigError(UserError):
    """A bad flag, or flags that do not go together."""


class DataError(UserError, ValueError):
    """Bad input data, reported with the file, row and field before any training starts."""


class NonFiniteError(UserError):
    """A NaN or infinite loss, gradient norm or weight: the step stopped before the optimizer moved."""


# ============================================================================================
# Device, precision, seeding
# ============================================================================================


def pick_device(device: str = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU. A CUDA device this machine does not have is refused."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size() > 1 and device.startswith("cuda"):  # torchrun: one GPU per rank
        if device != "cuda":
            raise ConfigError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda or auto")
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise ConfigError(f"--device {device}: CUDA is not available (torch {torch.__version__}, {build}); "
                              f"use --device cpu or auto")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast. `auto` -> bfloat16 on CUDA, float32 on CPU. Weights stay float32
    (mixed precision), so optimizer state and small updates are not lost to bf16 rounding."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype in ("bfloat16", "bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype {dtype}: this GPU has no bfloat16 support; use --dtype float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast where asked for; a no-op context in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Same seed, same numbers on CPU (GPU kernels may still be nondeterministic)."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# ============================================================================================
# More than one process (torchrun): a thin layer; with one process every function here does nothing
# ============================================================================================
# `torchrun --nproc_per_node N script.py ...` starts N copies ("ranks") of a script. Every rank holds
# the whole data set and draws the same global batches from the same seeds; each runs its slice of a
# batch (shards) with the loss already divided by the global batch's count, so the gradients summed
# over ranks are the one-process gradients. DDP (the default): whole models on every rank, gradients
# summed by sync_gradients after the backward. --fsdp: FSDP2 shards each transformer layer's weights
# over the ranks (fully_shard sums their gradients in the backward); the embeddings, final norm and
# output heads stay whole on every rank and are summed like DDP's. Rank 0 prints, logs and saves.

def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_distributed(cfg) -> None:
    """Under torchrun (LOCAL_RANK set): join the process group, nccl with one GPU per rank when CUDA is
    used, else gloo. Ranks other than 0 print nothing to stdout. Without torchrun: nothing."""
    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shards(items: list, k: int) -> list[list]:
    """K contiguous shards in order, sizes differing by at most one (K = 1: the whole list)."""
    bounds = [round(i * len(items) / k) for i in range(k + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(k)]


def my_share(items: list) -> list:
    """This rank's contiguous slice of a global batch (all of it with one process)."""
    return shards(items, world_size())[rank()] if world_size() > 1 else items


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a tensor (its my_share), concatenated in rank order, on every rank."""
    if world_size() == 1:
        return t
    return torch.cat(gather([t.cpu()])).to(t.device)


def gather(items: list) -> list:
    """Every rank's list (its my_share of something), concatenated in rank order, on every rank."""
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


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


def rank_part(t) -> float:
    """The share of a tensor's sum that this rank adds, so that sum_over_ranks gives the whole: 1 for
    its local shard of a sharded tensor, 1/N for a tensor every rank holds whole."""
    return 1.0 if is_sharded(t) else 1.0 / world_size()


def sum_tensors_over_ranks(tensors: list) -> None:
    """Each tensor replaced, in place, by its sum over ranks: one all_reduce of a flat buffer."""
    if world_size() == 1 or not tensors:
        return
    flat = sum_over_ranks(torch._utils._flatten_dense_tensors(tensors))
    for t, summed in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(summed)


def sync_gradients(params: list) -> None:
    """DDP's gradient sum, for the tensors every rank holds whole (FSDP sums its shards itself)."""
    sum_tensors_over_ranks([p.grad for p in params if not is_sharded(p) and p.grad is not None])


def lockstep(batches: list, filler) -> list:
    """On N ranks every rank runs as many passes as the busiest one (FSDP's forward gathers the sharded
    weights from all ranks at once): a rank with fewer batches adds `filler` batches, whose results the
    caller drops (and whose losses it multiplies by 0). One process: `batches` as they are."""
    if world_size() == 1:
        return batches
    most = sum_over_ranks(torch.tensor([len(batches)]), dist.ReduceOp.MAX).item()
    return batches + [filler] * (most - len(batches))


@contextlib.contextmanager
def rank_sampling(device):
    """Sampling on N ranks: each rank draws from its own generator, seeded from the shared global one
    (which then advances alike on every rank, so later shuffles stay in step). One process: unchanged."""
    if world_size() == 1:
        yield
        return
    seed = int(torch.randint(2 ** 62, ()).item()) + rank()
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# ============================================================================================
# The built-in task: a miniature of the papers' summarization setting
# ============================================================================================
# A document is a few facts "NAME VERB the OBJECT in the PLACE ." mixed with filler sentences.
# The SFT reference summary lists the facts as "NAME VERB OBJECT" in document order, joined by
# " ; " (9 times in 10). The gold reward (standing in for human preference) pays for correct content
# and also for a style the references mostly lack: clauses joined by " and ", read as a sentence,
# rather than the references' terse " ; " list. So instruction following (ROUGE-L against the
# reference, on words) and preference (gold reward) partly conflict, as in the HBAT paper: every
# "and" is a word the reference does not have.

NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent victor wendy".split()
VERBS = "found painted sold bought moved cleaned fixed lost washed opened".split()
OBJECTS = "car boat lamp chair table book bike door clock piano kettle radio window ladder camera violin".split()
PLACES = "park garden kitchen school market office harbor library station museum".split()
FILLERS = [
    "the weather was calm .",
    "nothing else happened .",
    "it was a long day .",
    "everyone went home later .",
    "the news spread quickly .",
    "nobody saw it coming .",
]
TASK_SPECIALS = ["<pad>", "<unk>", "<eos>"]
STYLE_BONUS = 0.5  # gold reward for joining every pair of clauses with "and" (pro rata)
_FACT_RE = re.compile(r"(\w+) (\w+) the (\w+) in the (\w+) \.")


def task_vocabulary() -> list[str]:
    words = {w for s in FILLERS for w in s.split()} | {"summarize", "summary", ":", ";", "and", "the", "in", "."}
    words |= set(NAMES) | set(VERBS) | set(OBJECTS) | set(PLACES)
    return TASK_SPECIALS + sorted(words)


def make_document(rng: random.Random) -> tuple[str, list[tuple[str, str, str]]]:
    """One prompt and its facts (name, verb, object). 1-3 facts with distinct names, 0-2 fillers."""
    n_facts = rng.randint(1, 3)
    facts = [(name, rng.choice(VERBS), rng.choice(OBJECTS)) for name in rng.sample(NAMES, n_facts)]
    sentences = [f"{n} {v} the {o} in the {rng.choice(PLACES)} ." for n, v, o in facts]
    for filler in rng.sample(FILLERS, rng.randint(0, 2)):
        sentences.insert(rng.randint(0, len(sentences)), filler)
    return "summarize : " + " ".join(sentences) + " summary :", facts


def summary(facts, joins: Iterable[bool] | None = None) -> str:
    """'NAME VERB OBJECT' per fact; clause i and i+1 joined by ' and ' where joins[i], else ' ; '."""
    clauses = [" ".join(fact) for fact in facts]
    joins = list(joins) if joins is not None else [False] * (len(clauses) - 1)
    return clauses[0] + "".join((" and " if j else " ; ") + c for j, c in zip(joins, clauses[1:]))


def gold_reward(prompt: str, response: str) -> float:
    """The built-in task's programmatic preference, from the facts in the prompt:
    (facts stated - clauses stating no fact of the document) / n_facts
    + STYLE_BONUS * (joins made with 'and') / (n_facts - 1).
    Reference summaries score 1.0; with every join an 'and', 1.5 (1.0 for one-fact documents)."""
    facts = {(n, v, o) for n, v, o, _ in _FACT_RE.findall(prompt)}
    if not facts:
        raise ValueError(f"gold_reward: no facts found in prompt {prompt!r}")
    words = response.split()
    clauses, joins_with_and, current = [], 0, []
    for word in words + [";"]:
        if word in (";", "and"):
            clauses.append(tuple(current))
            current = []
            joins_with_and += word == "and"
        else:
            current.append(word)
    stated, wrong = set(), 0
    for clause in clauses:  # a repeated, empty or invented clause counts against
        if clause in facts and clause not in stated:
            stated.add(clause)
        else:
            wrong += 1
    content = (len(stated) - wrong) / len(facts)
    style = min(joins_with_and, len(facts) - 1) / (len(facts) - 1) if len(facts) > 1 else 0.0
    return content + STYLE_BONUS * style


def _candidate_summary(rng: random.Random, prompt_facts) -> str:
    """A plausible summary with random joins and, now and then, a mistake, for preference pairs."""
    facts = list(prompt_facts)
    if len(facts) > 1 and rng.random() < 0.15:  # drop a fact
        facts.pop(rng.randrange(len(facts)))
    if rng.random() < 0.15:  # swap in a wrong object or name
        i = rng.randrange(len(facts))
        n, v, o = facts[i]
        facts[i] = (n, v, rng.choice(OBJECTS)) if rng.random() < 0.5 else (rng.choice(NAMES), v, o)
    return summary(facts, [rng.random() < 0.5 for _ in facts[1:]])


def builtin_task(seed: int = 0, n_sft: int = 3000, n_pref: int = 2000, n_test: int = 100, bt_scale: float = 4.0,
                 and_rate: float = 0.1, avoid: Iterable[str] = ()):
    """SFT rows (prompt, completion), preference rows (prompt, chosen, rejected) labelled by the gold
    reward with Bradley-Terry noise (P(a preferred) = sigmoid(bt_scale * (r_a - r_b))), and test rows
    (prompt, completion) whose prompts appear in neither training set (nor in `avoid`). Like real
    annotators, the reference writers are not perfectly consistent: each join is 'and' with probability
    and_rate (so the SFT model keeps a little mass on the preferred style for DPO and PPO to find)."""
    rng = random.Random(seed)

    def reference(facts):
        return summary(facts, [rng.random() < and_rate for _ in facts[1:]])

    test, seen = [], set(avoid)
    while len(test) < n_test:
        prompt, facts = make_document(rng)
        if prompt not in seen:
            seen.add(prompt)
            test.append({"prompt": prompt, "completion": reference(facts)})

    def fresh_document():  # a training document whose prompt is not a test prompt
        while True:
            prompt, facts = make_document(rng)
            if prompt not in seen:
                return prompt, facts

    sft = []
    for _ in range(n_sft):
        prompt, facts = fresh_document()
        sft.append({"prompt": prompt, "completion": reference(facts)})
    pref = []
    while len(pref) < n_pref:
        prompt, facts = fresh_document()
        a, b = _candidate_summary(rng, facts), _candidate_summary(rng, facts)
        if a == b:
            continue
        p_a = 1.0 / (1.0 + math.exp(-bt_scale * (gold_reward(prompt, a) - gold_reward(prompt, b))))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        pref.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return {"sft": sft, "pref": pref, "test": test}


# ============================================================================================
# Models and tokenizers
# ============================================================================================


def build_tiny_tokenizer():
    """Word-level tokenizer over the built-in task's vocabulary, wrapped as a transformers fast
    tokenizer (so save_pretrained / AutoTokenizer work). pad and EOS are distinct tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(task_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by single spaces, nothing else
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_config(tokenizer, **overrides):
    """A small Llama-style config for the built-in task (0.34M parameters): SFT takes ~12 s on 2 CPU cores."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def quiet_transformers() -> None:
    """No per-load/per-save progress bars and no load-report tables from transformers: the scripts say
    what they load and save themselves (errors still come through)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def from_pretrained(flag: str, name: str, load: Callable):
    """load(name), with a failure turned into one message naming the flag. A name that is not an
    existing folder is a hub id; one that looks like a path (/, ./, ~) must exist."""
    quiet_transformers()
    path, what = Path(name).expanduser(), f"{flag} {name}".strip()
    if not path.exists() and (name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1):
        raise ConfigError(f"{what}: no such folder")
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"{what}: not a Hugging Face model folder (it has no config.json)")
    try:
        return load(str(path) if path.exists() else name)
    except (OSError, ValueError, KeyError) as e:
        where = "the folder" if path.exists() else "the Hugging Face hub (offline? HF_HUB_OFFLINE is " \
                                                   f"{os.environ.get('HF_HUB_OFFLINE', 'unset')})"
        raise ConfigError(f"{what}: could not load it from {where}: {str(e).strip().splitlines()[0]}") from e


def load_tokenizer(name: str = "tiny", trust_remote_code: bool = False, flag: str = "--model"):
    """The tokenizer alone (`tiny`, `tiny-random`: the built-in task's word-level tokenizer). A tokenizer without a pad
    token gets pad = EOS: every mask here is built from labels and attention masks, never from token
    ids, so the real EOS is still learned."""
    from transformers import AutoTokenizer

    tokenizer = build_tiny_tokenizer() if name in TINY_MODELS else from_pretrained(
        flag, name, lambda n: AutoTokenizer.from_pretrained(n, trust_remote_code=trust_remote_code))
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{flag} {name}".strip() + ": the tokenizer has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TINY_MODELS = ("tiny", "tiny-random")
WARM_START_ROWS, WARM_START_EPOCHS = 1000, 3  # `tiny`'s pretrained start: rougeL ~0.8 on the built-in task (README)
_warm_started: dict[int, dict] = {}  # seed -> weights: hbat --compare's two runs share one warm start


def warm_start(model, tokenizer, seed: int) -> None:
    """`--model tiny`'s pretrained start. Every method in the papers starts from a pretrained model that
    can already partly follow instructions; the tiny model gets one by SFT on WARM_START_ROWS held-out
    rows of the built-in task (another seed's stream; no prompt among the run's first 1000 possible
    test rows) for WARM_START_EPOCHS epochs. Measured (seed 0-2): rougeL 0.76-0.83, gold reward
    -0.14-0.22 (a full SFT reaches ~0.99 / 1.0): right form, facts often wrong. ~3 s on CPU, silent
    (it is part of loading the model, which comes before the data are checked); the same in every
    process that loads it, and outside the global random stream."""
    if seed not in _warm_started:
        avoid = [row["prompt"] for row in builtin_task(seed, 0, 0, n_test=1000)["test"]]
        rows = builtin_task(seed + 1000, WARM_START_ROWS, 0, 0, avoid=avoid)["sft"]
        examples, _ = tokenize_sft(rows, tokenizer, 512, 256, "warm start")
        cfg = TrainConfig(sft_epochs=WARM_START_EPOCHS)
        with torch.random.fork_rng(devices=[]):
            train_sft(model, examples, cfg, device=torch.device("cpu"), dtype=torch.float32, seed=seed,
                      desc="tiny: warm start", quiet=True)
        _warm_started[seed] = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_warm_started[seed])


def load_model_and_tokenizer(name: str = "tiny", trust_remote_code: bool = False, seed: int = 0):
    """`tiny` builds the built-in task's model from tiny_config (seeded random init, then warm_start:
    the pretrained start every method shares); `tiny-random` skips the warm start. Anything else is a
    Hugging Face model name or local folder. Weights are loaded in float32 (see pick_dtype)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = load_tokenizer(name, trust_remote_code)
    if name in TINY_MODELS:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(tokenizer))
    else:
        model = from_pretrained("--model", name, lambda n: AutoModelForCausalLM.from_pretrained(
            n, dtype=torch.float32, trust_remote_code=trust_remote_code))
    # One EOS and one pad everywhere: the tokenizer's. A checkpoint's config may list several EOS ids,
    # and its generation_config may carry sampling defaults (repetition penalty, min_p, ...) that
    # transformers would silently merge into every generate() call: evaluation must be plain greedy
    # and PPO rollouts plain samples from pi.
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    disable_dropout(model)
    if name == "tiny":
        warm_start(model, tokenizer, seed)
    return model, tokenizer


def load_reward_model(path: str, tokenizer, trust_remote_code: bool = False, flag: str = "--reward_model",
                      new_head: bool = False):
    """A checkpoint with a scalar head (AutoModelForSequenceClassification, 1 label): the reward model,
    and the PPO value model initialised from it. new_head=True: a causal LM checkpoint (the SFT model)
    that gets a fresh head, to be trained; otherwise a missing head is an error (it would score noise).
    It must share the policy's tokenizer, since it scores the policy's token ids. We read the head
    ourselves at every token (score_tokens), so pad == EOS does not confuse the last-token lookup."""
    from transformers import AutoModelForSequenceClassification

    if load_tokenizer(path, trust_remote_code, flag).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{flag} {path}".strip() + ": its tokenizer differs from the policy's; it must score the same ids")
    model, info = from_pretrained(flag, path, lambda n: AutoModelForSequenceClassification.from_pretrained(
        n, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code, output_loading_info=True))
    if not hasattr(model, "score"):
        raise ConfigError(f"{flag} {path}".strip() + f": {type(model).__name__} has no `score` head; unsupported as a reward model")
    fresh = any(key.startswith("score.") for key in info["missing_keys"])
    if fresh and not new_head:
        raise ConfigError(f"{flag} {path}".strip() + ": has no trained scalar head (a causal LM checkpoint?); give a "
                          "reward model, such as the reward_model/ folder of a PPO run")
    if fresh:
        print(f"reward model: a fresh scalar head on {path}, trained next")
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in policy, reference, reward and value models: log-ratios must be deterministic.
    Attention dropout in most HF models is a float read at run time, not an nn.Dropout module."""
    for module in [model, *model.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


def check_finite_weights(model, path) -> None:
    names = [name for name, _ in model.named_parameters()]
    bad = torch.tensor([not torch.isfinite(local(p)).all() for _, p in model.named_parameters()], dtype=torch.long)
    bad = [name for name, b in zip(names, sum_over_ranks(bad).tolist()) if b]  # FSDP: any rank's shard
    if bad:
        raise NonFiniteError(f"{path}: not saved: {len(bad)} parameter tensors hold NaN or inf (first: {bad[0]})")


def full_state_dict(model) -> dict | None:
    """FSDP: the whole weights, gathered onto rank 0's CPU (every rank takes part); None otherwise
    (save_pretrained then reads the model itself)."""
    if not any(is_sharded(p) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(model, tokenizer, path: str | Path) -> None:
    """save_pretrained for model and tokenizer, so AutoModel*/AutoTokenizer.from_pretrained reload it.
    Written whole or not at all (write_folder); weights that are not all finite are refused. On N ranks
    rank 0 writes (FSDP's shards gathered first) and the others wait until the folder is there."""
    check_finite_weights(model, path)
    state_dict = full_state_dict(model)
    quiet_transformers()
    if is_main():
        write_folder(path, lambda tmp: (model.save_pretrained(tmp, state_dict=state_dict), tokenizer.save_pretrained(tmp)))
    barrier()


# ============================================================================================
# Data: loading, validation, tokenization, collation
# ============================================================================================
# Accepted rows (TRL's column names):
#   SFT:        {"prompt": str, "completion": str} | {"prompt": [msgs], "completion": [msgs]} | {"messages": [msgs]}
#   preference: {"prompt": str|[msgs], "chosen": str|[msgs], "rejected": str|[msgs]}
#               | {"chosen": [msgs], "rejected": [msgs]} (implicit prompt: the shared leading turns)
# Chat rows go through the tokenizer's chat template; the response is the last assistant turn.


DATA_FILES = (".json", ".jsonl", ".parquet")


def read_rows(spec: str, split: str = "train", limit: int = 0, flag: str = "--sft_data") -> list[dict]:
    """Rows of a local .json/.jsonl/.parquet file, or of a hub data set by name or a local data set
    folder (via `datasets`); only the first `limit` rows when limit > 0."""
    path = Path(spec).expanduser()
    if path.is_file() or path.suffix in DATA_FILES:
        if path.suffix not in DATA_FILES:
            raise DataError(f"{flag} {spec}: unsupported file type '{path.suffix}' (supported: "
                            f"{', '.join(DATA_FILES)}, a data set folder, or a hub data set name)")
        rows = _read_file(path)
    elif not path.exists() and spec.startswith(("/", ".", "~")):
        raise DataError(f"{flag} {spec}: no such file or folder")
    else:  # a data set folder, or a hub data set name
        import datasets

        try:
            rows = list(datasets.load_dataset(spec, split=f"{split}[:{limit}]" if limit > 0 else split))
        except Exception as e:  # datasets raises many types (hub, split, format); all mean "cannot read this"
            raise DataError(f"{flag} {spec}: could not load it as a data set ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no details'})") from e
    return rows[:limit] if limit > 0 else rows


def _read_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'file not found'}")
    if path.suffix in (".json", ".jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); JSON files must be UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []  # row N = the N-th non-blank line, as in every other message
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {len(rows) + 1} (line {line_no}): not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
        return data
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _text_or_messages(value, where: str, field: str):
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and isinstance(m.get("role"), str) for m in value):
        if not value[-1]["content"].strip():
            raise DataError(f"{where}: field '{field}': the last message is empty")
        return value
    raise DataError(f"{where}: field '{field}' must be a non-empty string or a list of "
                    f"{{'role', 'content'}} messages, got {type(value).__name__}: {str(value)[:80]!r}")


def _field(row, where: str, field: str):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    if field not in row:
        raise DataError(f"{where}: missing field '{field}' (has: {', '.join(map(str, row)) or 'nothing'})")
    if row[field] is None:
        raise DataError(f"{where}: field '{field}' is null")
    return _text_or_messages(row[field], where, field)


def _chat_prompt(tokenizer, messages, where: str) -> str:
    if not tokenizer.chat_template:
        raise DataError(f"{where}: the data is chat messages but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _prompt_response(tokenizer, prompt, response, where: str, field: str) -> tuple[str, str]:
    """(prompt text, response text) from a plain or chat row."""
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    if isinstance(prompt, list) and isinstance(response, list):
        if response[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{field}': the last message must be from the assistant")
        return _chat_prompt(tokenizer, prompt + response[:-1], where), response[-1]["content"]
    raise DataError(f"{where}: fields 'prompt' and '{field}' must both be strings or both be message lists")


def sft_texts(row, tokenizer, where: str) -> tuple[str, str]:
    """(prompt text, response text) of one SFT row."""
    if isinstance(row, dict) and "messages" in row and "prompt" not in row:
        messages = _field(row, where, "messages")
        if isinstance(messages, str) or len(messages) < 2:
            raise DataError(f"{where}: field 'messages' needs at least a user and an assistant message")
        return _prompt_response(tokenizer, messages[:-1], messages[-1:], where, "messages")
    return _prompt_response(tokenizer, _field(row, where, "prompt"), _field(row, where, "completion"), where, "completion")


def pref_texts(row, tokenizer, where: str) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text) of one preference row."""
    chosen, rejected = _field(row, where, "chosen"), _field(row, where, "rejected")
    if "prompt" in row:
        prompt = _field(row, where, "prompt")
    else:  # implicit prompt: chosen and rejected are whole conversations sharing all but the last turn
        if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1 and chosen[:-1] == rejected[:-1]):
            raise DataError(f"{where}: missing field 'prompt' (needed unless 'chosen' and 'rejected' are "
                            f"conversations that share every turn but the last)")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    prompt_text, chosen_text = _prompt_response(tokenizer, prompt, chosen, where, "chosen")
    return prompt_text, chosen_text, _prompt_response(tokenizer, prompt, rejected, where, "rejected")[1]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt token ids, with BOS where the tokenizer normally adds it (chat templates carry their own)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and tokenizer("a").input_ids[:1] == [bos]:
        ids = [bos] + ids
    return ids


def encode_response(tokenizer, text: str) -> list[int]:
    """Response token ids + EOS. Tokenized apart from the prompt, so the boundary never drifts."""
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def keep_last(ids: list[int], n: int, bos_id: int | None = None) -> list[int]:
    """The last n tokens of ids; a leading BOS survives the cut (it still counts towards n)."""
    if len(ids) <= n:
        return ids
    if n > 0 and bos_id is not None and ids[:1] == [bos_id]:
        return [bos_id] + ids[len(ids) - n + 1:]
    return ids[len(ids) - n:] if n > 0 else []


def truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
             bos_id: int | None = None):
    """If prompt + longest response exceeds max_length, the prompt loses its left side first, as much
    as needed but never below max_prompt_length tokens; then responses lose their right side (and so
    their EOS). None if no response token is left."""
    longest = max(map(len, responses))
    if len(prompt_ids) + longest > max_length:
        prompt_ids = keep_last(prompt_ids, max(max_length - longest, max_prompt_length), bos_id)
        responses = [r[: max(max_length - len(prompt_ids), 0)] for r in responses]
    if min(map(len, responses)) == 0:
        return None
    return prompt_ids, responses


def generation_prompt(tokenizer, text: str, max_length: int, max_prompt_length: int, max_new_tokens: int) -> list[int]:
    """Prompt ids for generation, cut by the same rule as training rows, leaving max_new_tokens room."""
    ids = encode_prompt(tokenizer, text)
    return keep_last(ids, max(max_length - max_new_tokens, max_prompt_length), tokenizer.bos_token_id)


def sequence(prompt_ids: list[int], response_ids: list[int]) -> dict:
    """Input ids and labels, built before any padding: prompt labels are IGNORE_INDEX."""
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def count_cut(counts: dict, prompt_ids: list[int], responses: list[list[int]], cut) -> None:
    """Tally one row's fate under truncate(): skipped (None), its prompt cut, or a response cut."""
    if cut is None:
        counts["skipped"] += 1
        return
    counts["prompt_cut"] += len(cut[0]) < len(prompt_ids)
    counts["response_cut"] += any(len(a) < len(b) for a, b in zip(cut[1], responses))


def new_counts(n_rows: int) -> dict:
    return {"rows": n_rows, "prompt_cut": 0, "response_cut": 0, "skipped": 0}


def tokenize_sft(rows, tokenizer, max_length: int, max_prompt_length: int, source: str = "data"):
    """Validate every row (errors name file, row, field), then tokenize. Returns (examples, counts):
    counts = {rows, prompt_cut, response_cut, skipped} (see truncate)."""
    texts = [sft_texts(row, tokenizer, f"{source}: row {i}") for i, row in enumerate(rows, start=1)]
    examples, counts = [], new_counts(len(rows))
    for prompt, response in texts:
        prompt_ids, response_ids = encode_prompt(tokenizer, prompt), encode_response(tokenizer, response)
        cut = truncate(prompt_ids, [response_ids], max_length, max_prompt_length, tokenizer.bos_token_id)
        count_cut(counts, prompt_ids, [response_ids], cut)
        if cut is not None:
            examples.append({**sequence(cut[0], cut[1][0]), "prompt": prompt, "reference": response})
    return examples, counts


def tokenize_pref(rows, tokenizer, max_length: int, max_prompt_length: int, source: str = "data"):
    """Validate every preference row, then tokenize chosen and rejected. Returns (examples, counts)."""
    texts = [pref_texts(row, tokenizer, f"{source}: row {i}") for i, row in enumerate(rows, start=1)]
    examples, counts = [], new_counts(len(rows))
    for prompt, chosen, rejected in texts:
        prompt_ids = encode_prompt(tokenizer, prompt)
        responses = [encode_response(tokenizer, chosen), encode_response(tokenizer, rejected)]
        cut = truncate(prompt_ids, responses, max_length, max_prompt_length, tokenizer.bos_token_id)
        count_cut(counts, prompt_ids, responses, cut)
        if cut is not None:
            prompt_ids, (chosen_ids, rejected_ids) = cut
            examples.append({"chosen": sequence(prompt_ids, chosen_ids), "rejected": sequence(prompt_ids, rejected_ids),
                             "prompt": prompt, "prompt_ids": prompt_ids})
    return examples, counts


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(map(len, seqs))
    fill = [[value] * (width - len(s)) for s in seqs]
    return torch.tensor([s + f if side == "right" else f + s for s, f in zip(seqs, fill)], dtype=torch.long)


def collate(seqs: list[dict], pad_id: int) -> dict:
    """Right-padded training batch. Labels are padded with IGNORE_INDEX, never with the pad id."""
    return {"input_ids": pad([s["input_ids"] for s in seqs], pad_id),
            "attention_mask": pad([[1] * len(s["input_ids"]) for s in seqs], 0),
            "labels": pad([s["labels"] for s in seqs], IGNORE_INDEX)}


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """Chosen then rejected in one batch (one concatenated forward): rows [:n] chosen, [n:] rejected."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def to_device(batch: dict, device) -> dict:
    """The batch on the device, with "label_positions" (token_logps) computed on the host first."""
    out = {k: v.to(device) for k, v in batch.items()}
    if "labels" in batch and batch["labels"].device.type == "cpu":
        out["label_positions"] = label_positions(batch["labels"]).to(device)
    return out


# ============================================================================================
# Log-probs
# ============================================================================================


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions follow the mask, so left-padded rows start at 0 like right-padded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Only labelled (response) positions go through the output layer: the prompt's positions never
# reach the vocabulary. LinearLogProbs computes log softmax(h W^T / t)[y] for those rows with a
# hand-written backward (d log p_y / dz = onehot(y) - softmax(z)), so no [batch, length, vocabulary]
# tensor, and no float32 copy of one, is ever made. Its results equal the full-logits computation's
# (tests/test_losses.py, values and gradients, left- and right-padded).

KEEP_LOGITS_BYTES = 1 << 30  # keep exp(logits - max) for the backward while it fits in 1 GiB; else recompute
CHUNK_BYTES = 1 << 28  # rows of logits made at once: at most 256 MiB of float32


def output_head_is_plain(model) -> bool:
    """True when the model's logits are exactly lm_head(last hidden state), as for Llama, Qwen, GPT-2,
    SmolLM and most causal LMs; not for models that scale or soft-cap them (Gemma 2, Cohere, Granite)."""
    config = model.config.get_text_config()
    scaled = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return isinstance(model.get_output_embeddings(), torch.nn.Linear) and all(getattr(config, k, None) is None for k in scaled)


def last_hidden_state(model, batch: dict) -> torch.Tensor:
    """The transformer body's output (B, T, H), without the output layer."""
    body = getattr(model, model.base_model_prefix)
    return body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).last_hidden_state


def exp_logits(z, row_max, temperature: float):
    """e = exp(z / t - row_max) in (at least) float32, made in place of z when z is already float32 (z
    is always a fresh matmul output here)."""
    e = z.to(torch.promote_types(z.dtype, torch.float32))
    if temperature != 1.0:
        e /= temperature
    return e.sub_(row_max[:, None]).exp_()


def softmax_stats(z, targets, temperature: float, keep: bool):
    """Of logits z (rows) / t: (e = exp(z / t - m) if keep else None, the row max m, the row sum of e,
    z_y / t - m). Then log softmax(z / t)_y = (z_y / t - m) - log(sum e), and softmax = e / sum e."""
    row_max = z.amax(dim=-1).to(torch.promote_types(z.dtype, torch.float32)) / temperature
    target = z.gather(1, targets[:, None]).squeeze(1).to(row_max.dtype) / temperature - row_max
    e = exp_logits(z, row_max, temperature)
    return e if keep else None, row_max, e.sum(-1), target


def logit_grad(e, targets, row_sum, grad_logps, temperature: float, dtype):
    """The gradient on the logits z of a loss whose gradient on log softmax(z / t)_y is g:
    g (onehot(y) - softmax(z / t)) / t, built in place of e = exp(z / t - m), returned in `dtype`."""
    g = grad_logps.to(e.dtype) / temperature
    e *= (-g / row_sum)[:, None]
    return e.scatter_add_(1, targets[:, None], g[:, None]).to(dtype)


class LinearLogProbs(torch.autograd.Function):
    """For each row i of hidden (N, H): log softmax((hidden_i W^T + b) / t)[target_i], float32 (N,)
    (float64 for float64 inputs), through the output layer in row chunks of CHUNK_BYTES of logits. The
    backward needs exp(z / t - max): the forward keeps it when all chunks fit in KEEP_LOGITS_BYTES, else
    the backward recomputes the chunk's logits (a matmul). Under autocast the matmuls run in the
    autocast dtype and the softmax in float32, as in the model's own output layer then log_softmax."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float):
        device, (n_rows, vocab) = hidden.device, (hidden.shape[0], weight.shape[0])
        compute = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        keep = any(ctx.needs_input_grad[:3]) and n_rows * vocab * 4 <= KEEP_LOGITS_BYTES
        step = max(1, CHUNK_BYTES // (4 * vocab))
        kept, parts = [], []
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            e, *chunk_stats = softmax_stats(LinearLogProbs.logits(hidden[rows], weight, bias, compute), targets[rows], temperature, keep)
            kept.append(e)
            parts.append(chunk_stats)
        row_max, row_sum, target = (torch.cat(p) for p in zip(*parts)) if parts else \
            (hidden.new_zeros(0, dtype=torch.promote_types(compute, torch.float32)) for _ in range(3))
        ctx.save_for_backward(hidden, weight, bias, targets, row_max, row_sum)
        ctx.kept, ctx.step, ctx.temperature, ctx.compute = kept if keep else None, step, temperature, compute
        return target - torch.log(row_sum)

    @staticmethod
    def logits(hidden, weight, bias, compute) -> torch.Tensor:
        z = hidden.to(compute) @ weight.to(compute).t()
        return z if bias is None else z + bias.to(compute)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, row_max, row_sum = ctx.saved_tensors
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # weight gradients summed over chunks in float32
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        for i, start in enumerate(range(0, hidden.shape[0], ctx.step)):
            rows = slice(start, start + ctx.step)
            e = ctx.kept[i] if ctx.kept else exp_logits(LinearLogProbs.logits(hidden[rows], weight, bias, ctx.compute),
                                                        row_max[rows], ctx.temperature)
            grad_z = logit_grad(e, targets[rows], row_sum[rows], grad_logps[rows], ctx.temperature, ctx.compute)
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


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into (B, T-1) of the positions that predict a label (labels[:, t+1] not ignored)."""
    return (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def token_logps(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) in float32 (B, T-1) and the mask of labelled tokens: position t predicts
    labels[:, t+1]; IGNORE_INDEX positions get log-prob 0 and mask 0. `temperature` divides the logits
    (PPO's rollout temperature). Only labelled positions reach the output layer (LinearLogProbs); their
    indices come from the batch when to_device computed them on the host (else the device would stop
    here until it knew how many there are). A model whose logits are not plain lm_head(h)
    (output_head_is_plain) goes through its own forward."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    positions = batch["label_positions"] if "label_positions" in batch else label_positions(batch["labels"])
    targets = labels.flatten().index_select(0, positions)
    if output_head_is_plain(model):
        head = model.get_output_embeddings()
        hidden = last_hidden_state(model, batch)[:, :-1].flatten(0, 1).index_select(0, positions)
        rows = LinearLogProbs.apply(hidden, head.weight, head.bias, targets, temperature)
    else:
        logits = forward_logits(model, batch)[:, :-1].flatten(0, 1).index_select(0, positions).float() / temperature
        rows = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    logps = torch.zeros(mask.numel(), dtype=torch.float32, device=rows.device).index_copy(0, positions, rows.float())
    return logps.view(mask.shape), mask


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed response log-prob (float32) and its number of response tokens."""
    logps, mask = token_logps(model, batch)
    return logps.sum(-1), mask.sum(-1)


def forward_logits(model, batch: dict) -> torch.Tensor:
    """The model's own full logits (B, T, V): only for models whose output layer is not plain."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits


def concatenated_logps(model, pair_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of chosen and rejected from one forward over collate_pairs' batch."""
    logps, _ = sequence_logps(model, pair_batch)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def score_tokens(model, input_ids, attention_mask) -> torch.Tensor:
    """A scalar-head model's output at every token (float32): the value model's V(s_t), and the
    reward model's score when read at the last real token."""
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.long().flip(1).argmax(1)


def sequence_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Reward-model score r(x, y): the head's output at the last real token (the EOS)."""
    scores = score_tokens(model, input_ids, attention_mask)
    return scores.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


# ============================================================================================
# Losses
# ============================================================================================


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, weights=None):
    """Per-pair DPO losses and implicit rewards.
    sigmoid: -(1-eps) log s(beta*h) - eps log s(-beta*h)   (eps = label_smoothing: conservative DPO)
    ipo:     (h - 1/(2 beta))^2                              (Azar et al.; h from summed log-probs)
    where h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)].
    `weights` multiplies each pair's loss (LD-Align's latent-distance weights; all ones = plain DPO)."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
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


def bradley_terry_loss(chosen_scores, rejected_scores):
    """Reward-model loss per pair: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def masked_mean(x, mask):
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask):
    """(x - mean) / std over the masked entries (unbiased variance); padding stays as it was."""
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    return torch.where(mask.bool(), centered * torch.rsqrt(var + 1e-8), x)


def kl_estimate(logps, ref_logps):
    """Per-token KL estimate log pi(y_t) - log ref(y_t) (k1: unbiased, what the PPO reward uses)."""
    return logps - ref_logps


def ppo_rewards(scores, logps, ref_logps, mask, kl_coef: float):
    """Per-token reward: -kl_coef * KL estimate at every response token, plus the reward model's
    score on the last response token."""
    rewards = -kl_coef * kl_estimate(logps, ref_logps) * mask
    last = mask.long().sum(1) - 1  # responses are right-padded: the last real token is len - 1
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def critic_free_rewards(scores, logps, ref_logps, mask, kl_coef: float = 0.1, gamma: float = 0.95, reward_clip: float = 10.0):
    """The HBAT authors' critic-free PPO reward (their --remove_critic_model --reward_type seq), per
    response token t of a T-token response: clip(r, -10, 10) * gamma^(T-1-t) - kl_coef * max(log pi -
    log ref, 0). Whitened, these are the advantages (no value model, no GAE)."""
    lengths = mask.sum(1, keepdim=True)
    steps_to_end = (lengths - 1 - torch.arange(mask.shape[1], device=mask.device)).clamp(min=0)
    sequence = scores.clamp(-reward_clip, reward_clip)[:, None] * gamma ** steps_to_end
    return (sequence - kl_coef * (logps - ref_logps).clamp(min=0)) * mask


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over right-padded response tokens (mask a prefix of each row):
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns = A + V.
    V beyond the last token is 0 (the episode ends with the response)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, advantages + values


def ppo_policy_loss(logps, old_logps, advantages, mask, clip: float = 0.2):
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi/pi_old.
    Returns (loss, fraction of tokens clipped)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss: 0.5 * mean max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)


# ============================================================================================
# Fisher information and elastic weight consolidation
# ============================================================================================


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(model) -> dict[str, torch.Tensor]:
    """Detached copy of the trainable parameters (an EWC anchor, or 'before' for drift)."""
    return {name: p.detach().clone() for name, p in trainable(model).items()}


def empirical_fisher(model, examples: list[dict], device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher F = mean_i (d log p(y_i|x_i) / d theta)^2, one sample at a time, with
    the data's own labels. (Squaring the gradient of a batch mean, or using argmax labels, is wrong.)
    On N ranks (whole models) each squares its share of the samples' gradients, and the sums are added."""
    params = trainable(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for example in my_share(examples):
        model.zero_grad(set_to_none=True)
        batch = to_device(collate([example], model.config.pad_token_id), device)
        with autocast(device, dtype):
            logps, _ = sequence_logps(model, batch)
        logps.sum().backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    sum_tensors_over_ranks(list(fisher.values()))
    return {name: f / len(examples) for name, f in fisher.items()}


def ewc_penalty(model, fisher: dict, anchor: dict, lam: float) -> torch.Tensor:
    """Textbook EWC: (lambda / 2) * sum_j F_j (theta_j - anchor_j)^2 (on N ranks, this rank's part: rank_part)."""
    params = trainable(model)
    terms = ((fisher[n] * (params[n] - anchor[n]) ** 2).sum() * rank_part(params[n]) for n in fisher)
    return 0.5 * lam * sum(terms, torch.zeros(()))


def drift_importance(before: dict, after: dict, mse_factor: float = 1e10) -> dict[str, float]:
    """HBAT's raw importance of each tensor n: F_n = mean(((theta_after - theta_before) * s)^2),
    the drift the other objective's most recent stage made (float64: s = 1e10 squares to 1e20). Under
    FSDP each rank squares its shards, and the sums are added over ranks."""
    if not any(map(is_sharded, after.values())):
        return {n: (((after[n].double() - before[n].double()) * mse_factor) ** 2).mean().item() for n in before}
    sums = torch.stack([(((local(after[n]).double() - local(before[n]).double()) * mse_factor) ** 2).sum() * rank_part(after[n])
                        for n in before])
    return dict(zip(before, (sum_over_ranks(sums.cpu()) / torch.tensor([after[n].numel() for n in before])).tolist()))


def accumulate_importance(previous: dict | None, new: dict) -> dict[str, float]:
    """Raw importance is carried across rounds by addition (one accumulator per stage type)."""
    return dict(new) if previous is None else {n: previous[n] + new[n] for n in new}


def softmax_importance(raw: dict) -> dict[str, float]:
    """w = softmax over all tensors of the raw importance. With s = 1e10 this is one-hot."""
    names = list(raw)
    weights = torch.softmax(torch.tensor([raw[n] for n in names], dtype=torch.float64), dim=0)
    return dict(zip(names, weights.tolist()))


def sum_importance(raw: dict) -> dict[str, float]:
    """w = raw / sum(raw): each tensor weighted in proportion to its raw importance (any scale s gives
    the same weights), so the penalty spreads over the tensors the other objective moved."""
    total = math.fsum(raw.values())
    return {n: (v / total if total > 0 else 1.0 / len(raw)) for n, v in raw.items()}


def weight_spread(weights: dict) -> tuple[float, float]:
    """(entropy in nats, largest weight) of normalised tensor weights: (0, 1) when one-hot, (ln n, 1/n)
    when uniform over n tensors."""
    entropy = max(0.0, -math.fsum(w * math.log(w) for w in weights.values() if w > 0))  # (never -0.0)
    return entropy, max(weights.values())


def hbat_penalty(model, weights: dict, anchor: dict, lam: float = 1.0, max_weight: float = 100.0) -> torch.Tensor:
    """HBAT's modified EWC: M * sum_n w_n * sum_j (lambda * (theta_nj - anchor_nj))^2.
    Tensors with w_n == 0 exactly are skipped (they add exactly nothing). On N ranks, this rank's part
    (rank_part: its FSDP shards, 1/N of whole tensors), so the parts add up to the penalty."""
    params = trainable(model)
    terms = [w * rank_part(params[n]) * ((lam * (local(params[n]) - local(anchor[n]))) ** 2).sum()
             for n, w in weights.items() if w != 0.0]
    return max_weight * sum(terms) if terms else torch.zeros((), device=next(iter(params.values())).device)


# ============================================================================================
# Training loops: one SFT stage, one DPO stage, reward-model training, one PPO rollout/update step
# ============================================================================================
# Every loop takes `penalty`: a function of no arguments returning a scalar added to the loss at
# every optimizer step (HBAT's EWC). Each stage gets fresh AdamW optimizers, like the authors'
# stage-level scripts (SFT, DPO and reward-model stages also warm up linearly). A non-finite loss,
# metric or gradient norm stops the run before the optimizer step, so the weights in memory and every
# file already written stay as they were.


def chunks(items: list, n_chunks: int) -> list[list]:
    """Contiguous micro-batches of ceil(len / n_chunks) items (n_chunks of them for a full batch)."""
    size = math.ceil(len(items) / n_chunks)
    return [items[i:i + size] for i in range(0, len(items), size)]


def check_finite(metrics: dict[str, float], where: str) -> None:
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"{where}: {name} is {value}. Stopped before the optimizer step: the weights "
                                 f"were not updated, and files already written are intact. Common causes: a "
                                 f"learning rate too high, fp16 overflow, an empty response.")


def clip_gradients(params: list, max_norm: float) -> float:
    """torch's clip_grad_norm_ (returns the norm before clipping). With FSDP shards among the tensors, the
    same formula by hand: the shards' squared norms summed over ranks, plus the whole tensors' once."""
    if not any(is_sharded(p) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [(local(p.grad), is_sharded(p)) for p in params if p.grad is not None]
    sharded = sum_over_ranks(sum(((g.float() ** 2).sum() for g, s in grads if s), torch.zeros((), device=grads[0][0].device)))
    norm = (sharded + sum((g.float() ** 2).sum() for g, s in grads if not s)).sqrt()
    for g, _ in grads:
        g.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm.item()


def optimizer_step(params, optimizer, max_grad_norm: float, where: str = "step") -> float:
    """Clip, then step, unless the gradient norm is not finite (clipping would spread NaN into every
    weight): then stop with NonFiniteError, weights untouched."""
    grad_norm = clip_gradients(params, max_grad_norm)
    check_finite({"grad_norm": grad_norm}, where)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class LineProgress:
    """tqdm's interface (update, set_postfix, n, context manager) for a log file: one plain line at
    most every `interval` seconds and one at the end, instead of carriage-return redraws."""

    def __init__(self, total: int, desc: str, interval: float = 30.0):
        self.total, self.desc, self.interval, self.n, self.postfix = total, desc, interval, 0, ""
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.interval:
            self.last = time.perf_counter()
            self.write()

    def set_postfix(self, values: dict) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self) -> None:
        print(f"{self.desc}: {self.n}/{self.total} ({time.perf_counter() - self.start:.0f} s)"
              + (f" {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.total > 0:
            self.write()


def progress(total: int, desc: str, disable: bool = False):
    """A tqdm bar on a terminal; LineProgress when stderr is a file or a pipe."""
    if disable or not is_main() or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=disable or not is_main())
    return LineProgress(total, desc)


def adamw(params: list, lr: float):
    """AdamW without weight decay, as in the authors' scripts, with torch's fused kernel (CPU and CUDA:
    the same update to rounding, in one pass over the weights instead of one per operation and tensor).
    FSDP shards and whole tensors go in separate groups (one fused call may not mix them)."""
    groups = [g for g in ([p for p in params if not is_sharded(p)], [p for p in params if is_sharded(p)]) if g]
    return torch.optim.AdamW([{"params": g} for g in groups], lr=lr, weight_decay=0.0, fused=True)


def set_checkpointing(model, cfg) -> None:
    """--gradient_checkpointing: the transformer layers keep only their inputs and recompute the rest
    in the backward (same gradients: tests/test_losses.py)."""
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train_epochs(model, examples: list, step_fn: Callable, cfg, *, lr: float, epochs: int, seed: int,
                 desc: str, log: Callable | None = None, penalty: Callable | None = None, quiet: bool = False) -> None:
    """The loop every supervised stage shares (quiet: no progress bar). step_fn(micro_batches, batch, scale=1.0) runs forward and
    backward on each micro-batch (this rank's share of `batch`), its loss normalised over the whole of
    `batch` and times `scale`, and returns {name: 0-dim tensor}: its share of each metric. (FSDP runs
    scale-0 filler micro-batches on a rank with fewer: see lockstep.) The penalty's backward comes
    before the gradient sum over ranks, each rank adding its part of it (hbat_penalty)."""
    params = [p for p in model.parameters() if p.requires_grad]
    set_checkpointing(model, cfg)
    optimizer = adamw(params, lr)
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    warmup_steps = warmup_length(cfg.warmup_steps, epochs * steps_per_epoch)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)))
    model.train()
    with progress(epochs * steps_per_epoch, desc, disable=quiet) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(examples), generator=order_rng).tolist()
            for start in range(0, len(order), cfg.batch_size):
                batch = [examples[i] for i in order[start:start + cfg.batch_size]]
                mine = my_share(batch)
                micro = chunks(mine, cfg.grad_accum_steps) if mine else []
                fillers = lockstep(micro, batch[:1])[len(micro):]
                metrics = step_fn(micro, batch)
                if fillers:
                    step_fn(fillers, batch, 0.0)
                if penalty is not None:
                    ewc = penalty()
                    if ewc.requires_grad:  # an all-zero penalty (every weight 0) has nothing to add
                        ewc.backward()
                    metrics["loss/ewc"] = ewc.detach()
                sync_gradients(params)
                values = dict(zip(metrics, sum_over_ranks(torch.stack([v.float() for v in metrics.values()])).tolist()))
                where = f"{desc}, epoch {epoch + 1}, step {bar.n + 1}"
                check_finite(values, where)
                values["lr"] = optimizer.param_groups[0]["lr"]
                values["grad_norm"] = optimizer_step(params, optimizer, cfg.max_grad_norm, where)
                warmup.step()
                bar.update()
                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k.startswith("loss")})
                if log is not None:
                    log({"stage": desc, "step": bar.n, "epoch": epoch + 1, **values})


def warmup_length(warmup_steps: int, stage_steps: int) -> int:
    """--warmup_steps, but at most half the stage's steps: a short stage (an HBAT shard, a small data
    set) still reaches its learning rate, and trains at it for at least its second half."""
    return min(warmup_steps, stage_steps // 2)


def train_sft(model, examples: list, cfg, *, device, dtype, seed: int, desc: str = "sft", log=None, penalty=None,
              quiet: bool = False):
    """SFT: -(1/N) sum log pi(y_t | x, y_<t) over response tokens, N = response tokens in the whole
    accumulated batch (not a mean of micro-batch means)."""
    pad_id = model.config.pad_token_id

    def step(micro_batches, whole_batch, scale=1.0):
        n_tokens = sum(response_tokens(e) for e in whole_batch)
        total = torch.zeros((), device=device)
        for examples_ in micro_batches:
            batch = to_device(collate(examples_, pad_id), device)
            with autocast(device, dtype):
                logps, _ = token_logps(model, batch)
            loss = -logps.sum() / n_tokens * scale
            loss.backward()
            total += loss.detach()
        return {"loss/sft": total}

    train_epochs(model, examples, step, cfg, lr=cfg.sft_lr, epochs=cfg.sft_epochs, seed=seed, desc=desc, log=log, penalty=penalty,
                 quiet=quiet)


def response_tokens(example: dict) -> int:
    """Tokens an example's loss is taken over: labelled positions after the first (the first token is
    never predicted)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def place(model, cfg, device):
    """A model on its device, and with --fsdp, sharded: FSDP2's fully_shard on each transformer layer
    (the model's _no_split_modules: LlamaDecoderLayer, ...), with the layers' weights in the compute
    dtype inside the forward (bf16 on GPU) and gradients summed in float32. The rest stays whole."""
    model.to(device)
    return shard(model, pick_dtype(cfg.dtype, device)) if cfg.fsdp else model


def shard(model, dtype):
    """fully_shard on each transformer layer, then on the transformer body as their root (so a layer
    frees its gathered weights after its forward), the body's own weights (embeddings, final norm) left
    whole like the output layer: token_logps and the scalar heads read those directly."""
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
    """copy.deepcopy, also of an FSDP-sharded model (which deepcopy refuses): the same class built on
    the meta device, sharded alike, then this rank's shards, the whole tensors and the buffers copied."""
    if not any(is_sharded(p) for p in model.parameters()):
        return copy.deepcopy(model)
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    shard(twin, model.fsdp_dtype).to_empty(device=next(model.parameters()).device)
    twin.tie_weights()  # to_empty made new tensors, untying a tied output layer
    with torch.no_grad():
        for (_, p), (_, twin_p) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
            local(twin_p).copy_(local(p))
            twin_p.requires_grad_(p.requires_grad)
        for (_, b), (_, twin_b) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
            twin_b.copy_(b)
    if hasattr(model, "generation_config"):
        twin.generation_config = copy.deepcopy(model.generation_config)
    return twin.train(model.training)


def frozen_copy(model):
    """A frozen copy (no gradients, eval mode): a DPO or PPO reference."""
    return clone_model(model).requires_grad_(False).eval()


@torch.no_grad()
def with_reference_logps(reference, pairs: list[dict], cfg, *, device, dtype) -> list[dict]:
    """Copies of the pairs with "ref_logps": (chosen, rejected) summed log-probs under `reference`, in
    eval mode, --batch_size / --grad_accum_steps pairs per forward (training's micro-batch); each rank
    computes its share of the pairs, and every rank gets them all."""
    was_training, pad_id = reference.training, reference.config.pad_token_id
    reference.eval()
    mine, logps = my_share(pairs), []
    for chunk in lockstep(micro_batches(mine, math.ceil(cfg.batch_size / cfg.grad_accum_steps)), pairs[:1]):
        with autocast(device, dtype):
            chosen, rejected = concatenated_logps(reference, to_device(collate_pairs(chunk, pad_id), device))
        logps += zip(chosen.tolist(), rejected.tolist())
    reference.train(was_training)
    return [{**p, "ref_logps": r} for p, r in zip(pairs, gather(logps[:len(mine)]))]


def train_dpo(policy, examples: list, cfg, *, device, dtype, seed: int, desc: str = "dpo", log=None, penalty=None):
    """DPO against a frozen reference: the policy as it is now, at the start of the stage (the SFT model
    of the two-stage baseline, the stage start in HBAT, the previous iterate in LD-Align). By default a
    frozen copy of it (eval mode, no_grad) runs beside the policy; with --precompute_ref_logps its
    log-probs are computed once, before the first update, and no copy is held. Pairs that already
    carry "ref_logps" (with_reference_logps) use those. A pair with a "weight" key has its loss scaled
    by it (LD-Align). Chosen and rejected share one forward pass per model."""
    pad_id, reference = policy.config.pad_token_id, None
    if "ref_logps" not in examples[0]:
        if cfg.precompute_ref_logps:
            examples = with_reference_logps(policy, examples, cfg, device=device, dtype=dtype)
        else:
            reference = frozen_copy(policy)

    names = ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected")

    def step(micro_batches, whole_batch, scale=1.0):
        n_pairs = len(whole_batch)
        sums = dict.fromkeys(names, torch.zeros((), device=device))
        for pairs in micro_batches:
            batch = to_device(collate_pairs(pairs, pad_id), device)
            weights = torch.tensor([p["weight"] for p in pairs], device=device) if "weight" in pairs[0] else None
            if reference is None:
                ref_chosen_logps, ref_rejected_logps = torch.tensor([p["ref_logps"] for p in pairs], device=device).T
            else:
                with torch.no_grad(), autocast(device, dtype):
                    ref_chosen_logps, ref_rejected_logps = concatenated_logps(reference, batch)
            with autocast(device, dtype):
                policy_chosen_logps, policy_rejected_logps = concatenated_logps(policy, batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, weights=weights)
            (losses.sum() / n_pairs * scale).backward()
            values = (losses.detach(), chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                      (chosen_rewards > rejected_rewards).float(), policy_chosen_logps.detach(), policy_rejected_logps.detach())
            sums = {name: sums[name] + value.sum() / n_pairs for name, value in zip(names, values)}
        return sums

    train_epochs(policy, examples, step, cfg, lr=cfg.pref_lr, epochs=cfg.pref_epochs, seed=seed, desc=desc, log=log, penalty=penalty)


def train_reward_model(reward_model, examples: list, cfg, *, device, dtype, seed: int, desc: str = "reward model", log=None):
    """Bradley-Terry reward model on the preference pairs: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    pad_id = reward_model.config.pad_token_id

    def step(micro_batches, whole_batch, scale=1.0):
        n_pairs = len(whole_batch)
        loss_sum, accuracy_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        for pairs in micro_batches:
            batch = to_device(collate_pairs(pairs, pad_id), device)
            with autocast(device, dtype):
                scores = sequence_scores(reward_model, batch["input_ids"], batch["attention_mask"])
            chosen_scores, rejected_scores = scores[: len(pairs)], scores[len(pairs):]
            loss = bradley_terry_loss(chosen_scores, rejected_scores).sum() / n_pairs * scale
            loss.backward()
            loss_sum += loss.detach()
            accuracy_sum += (chosen_scores > rejected_scores).float().sum().detach() / n_pairs
        return {"loss/reward_model": loss_sum, "accuracy": accuracy_sum}

    train_epochs(reward_model, examples, step, cfg, lr=cfg.rm_lr, epochs=cfg.rm_epochs, seed=seed, desc=desc, log=log)


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Left-padded prompts followed by right-padded responses, and labels on response tokens only.
    Response token t sits at column Q + t, where Q is the padded prompt width."""
    query, response = pad(prompts, pad_id, "left"), pad(responses, pad_id, "right")
    query_mask = pad([[1] * len(p) for p in prompts], 0, "left")
    response_mask = pad([[1] * len(r) for r in responses], 0, "right")
    labels = torch.cat([torch.full_like(query, IGNORE_INDEX), response.masked_fill(response_mask == 0, IGNORE_INDEX)], 1)
    return {"input_ids": torch.cat([query, response], 1), "attention_mask": torch.cat([query_mask, response_mask], 1),
            "labels": labels, "query_width": query.shape[1]}


def response_logps(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for each response token, aligned to the response columns (B, R), under
    the sampling temperature the rollout used (so the policy-gradient ratios are on-policy)."""
    logps, _ = token_logps(model, batch, temperature)
    return logps[:, batch["query_width"] - 1:]


def response_values(value_model, batch: dict) -> torch.Tensor:
    """V(s_t) for each response token t: the value head on the token just before it (B, R)."""
    values = score_tokens(value_model, batch["input_ids"], batch["attention_mask"])
    return values[:, batch["query_width"] - 1:-1]


def select(batch: dict, rows) -> dict:
    """The given rows of a rollout batch (tensors indexed, other entries kept)."""
    return {k: v[rows] if torch.is_tensor(v) else v for k, v in batch.items()}


def micro_batches(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def ppo_step(policy, ref_model, reward_model, value_model, prompts: list[list[int]], policy_optimizer,
             value_optimizer, cfg, *, device, dtype, penalty: Callable | None = None) -> dict[str, float]:
    """One PPO iteration on a batch of prompts: sample and score responses (--eval_batch_size prompts at
    a time), per-token rewards (-kl_coef * KL + RM score on the last token), GAE with whitened
    advantages, then `ppo_epochs` passes of clipped policy and clipped value updates over
    `ppo_minibatches` minibatches. Without a value model (value_model None: --no-critic), the
    advantages are the whitened critic_free_rewards and only the policy is updated. Every forward
    runs at most --ppo_micro_batch_size sequences: a minibatch's loss is accumulated over its
    micro-batches, each weighted by its share of the minibatch's tokens (so the update equals one big
    forward's), and the policy's graph is freed before the critic's is built. Memory is bounded by
    the micro-batch, not the rollout."""
    pad_id, eos_id = policy.config.pad_token_id, policy.config.eos_token_id
    policy.eval()
    responses = generate(policy, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.eval_batch_size, device=device, dtype=dtype, do_sample=True,
                         temperature=cfg.temperature)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in rollout_batch(prompts, responses, pad_id).items()}
    mask = (batch["labels"][:, batch["query_width"]:] != IGNORE_INDEX).float()
    scored, mine = [], my_share(list(range(len(prompts))))  # no gradients, no activations kept: generation batches
    with torch.no_grad(), autocast(device, dtype):
        for rows in lockstep(micro_batches(mine, cfg.eval_batch_size), [0]):
            sub = select(batch, rows)
            logps = response_logps(policy, sub, cfg.temperature)
            scored.append((logps, response_logps(ref_model, sub, cfg.temperature),
                           response_values(value_model, sub) if value_model is not None else torch.zeros_like(logps),
                           sequence_scores(reward_model, sub["input_ids"], sub["attention_mask"])))
    old_logps, ref_logps, old_values, scores = (gather_rows(torch.cat(parts)[:len(mine)]) for parts in zip(*scored))
    if value_model is None:  # the HBAT authors' critic-free stage
        rewards = critic_free_rewards(scores, old_logps, ref_logps, mask, cfg.kl_coef, cfg.gamma)
        advantages, returns = masked_whiten(rewards, mask), None
    else:
        rewards = ppo_rewards(scores, old_logps, ref_logps, mask, cfg.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

    critics = [value_model] if value_model is not None else []
    policy.train(), [critic.train() for critic in critics]
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    value_params = [p for critic in critics for p in critic.parameters() if p.requires_grad]
    sums = {"loss/policy": 0.0, "loss/value": 0.0, "clipfrac": 0.0} | ({"loss/ewc": 0.0} if penalty else {})
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        for minibatch in chunks(torch.randperm(len(prompts)).tolist(), cfg.ppo_minibatches):
            n_tokens = mask[minibatch].sum()
            totals = torch.zeros(3, device=device)  # policy loss, value loss, clipped fraction: minibatch means
            mine = micro_batches(my_share(minibatch), cfg.ppo_micro_batch_size)
            for i, rows in enumerate(lockstep(mine, minibatch[:1])):
                sub, share = select(batch, rows), mask[rows].sum() / n_tokens * (1.0 if i < len(mine) else 0.0)
                with autocast(device, dtype):
                    logps = response_logps(policy, sub, cfg.temperature)
                policy_loss, clipfrac = ppo_policy_loss(logps, old_logps[rows], advantages[rows], mask[rows], cfg.clip)
                (policy_loss * share).backward()
                value_loss = torch.zeros((), device=device)
                for critic in critics:
                    with autocast(device, dtype):
                        values = response_values(critic, sub)
                    value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], cfg.value_clip)
                    (value_loss * share).backward()
                totals += torch.stack([policy_loss.detach(), value_loss.detach(), clipfrac]) * share
            ewc = penalty() if penalty is not None else torch.zeros((), device=device)
            if ewc.requires_grad:
                ewc.backward()
            sync_gradients(policy_params), sync_gradients(value_params)
            step_values = dict(zip(sums, sum_over_ranks(torch.cat([totals, ewc.detach().reshape(1)])).tolist()))
            check_finite(step_values, "ppo step")
            # both gradient norms are checked before either model steps, so a failure leaves both untouched
            policy_norm, value_norm = clip_gradients(policy_params, cfg.max_grad_norm), clip_gradients(value_params, cfg.max_grad_norm)
            check_finite({"grad_norm/policy": policy_norm, "grad_norm/value": value_norm}, "ppo step")
            for optimizer in [policy_optimizer] + ([value_optimizer] if critics else []):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums = {k: sums[k] + step_values[k] for k in sums}
            n_updates += 1
    kl = (kl_estimate(old_logps, ref_logps) * mask).sum(1)
    summary_stats = torch.stack([scores.mean(), kl.mean(), mask.sum(1).mean(), rewards.sum(1).mean()]).tolist()
    if not critics:
        del sums["loss/value"]
    return {**{k: v / n_updates for k, v in sums.items()},
            **dict(zip(["score", "kl", "response_tokens", "total_reward"], summary_stats))}


def train_ppo(policy, ref_model, reward_model, value_model, prompts: list[list[int]], cfg, *, device, dtype,
              seed: int, desc: str = "ppo", log=None, penalty=None) -> None:
    """`pref_epochs` passes over the prompts in batches of `ppo_batch_size`, one ppo_step each. The
    reference and reward models stay frozen in eval mode. value_model None: critic-free (--no-critic)."""
    ref_model.eval(), reward_model.eval()
    set_checkpointing(policy, cfg)
    policy_optimizer = adamw([p for p in policy.parameters() if p.requires_grad], cfg.pref_lr)
    value_optimizer = None
    if value_model is not None:
        set_checkpointing(value_model, cfg)
        value_optimizer = adamw([p for p in value_model.parameters() if p.requires_grad], cfg.value_lr)
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(prompts) / cfg.ppo_batch_size)
    with progress(cfg.pref_epochs * steps_per_epoch, desc) as bar:
        for epoch in range(cfg.pref_epochs):
            order = torch.randperm(len(prompts), generator=order_rng).tolist()
            for start in range(0, len(order), cfg.ppo_batch_size):
                batch_prompts = [prompts[i] for i in order[start:start + cfg.ppo_batch_size]]
                stats = ppo_step(policy, ref_model, reward_model, value_model, batch_prompts, policy_optimizer,
                                 value_optimizer, cfg, device=device, dtype=dtype, penalty=penalty)
                bar.update()
                bar.set_postfix({k: f"{stats[k]:.3g}" for k in ("score", "kl", "loss/policy")})
                if log is not None:
                    log({"stage": desc, "step": bar.n, "epoch": epoch + 1, **stats})


# ============================================================================================
# Generation and evaluation
# ============================================================================================


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int, batch_size: int,
             device, dtype=torch.float32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             desc: str | None = None) -> list[list[int]]:
    """Batched generation with left-padded prompts and the KV cache. Each response is cut after its
    first EOS (kept, so it is scored and trained on like a data response). On N ranks each generates
    its share of the prompts (sampling from its own seed: rank_sampling) and every rank gets them all."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
    was_training = model.training
    model.eval()
    responses, mine = [], my_share(prompts)
    batches = micro_batches(mine, batch_size)
    synced = any(is_sharded(p) for p in model.parameters())  # FSDP: ranks that finish early keep stepping with the rest
    with progress(len(batches), desc or "generate", disable=desc is None or len(batches) < 2) as bar, rank_sampling(device):
        for chunk in lockstep(batches, prompts[:1]):
            input_ids = pad(chunk, pad_id, "left").to(device)
            attention_mask = pad([[1] * len(p) for p in chunk], 0, "left").to(device)
            with autocast(device, dtype):
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                     synced_gpus=synced)
            for row in out[:, input_ids.shape[1]:].tolist():
                responses.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
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
    """Fraction of prompts where our response scores higher than the other model's (ties count 1/2)."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, other_scores)) / len(scores)


def reward_model_scorer(reward_model, pad_id: int, batch_size: int, device, dtype) -> Callable:
    """score_fn from a trained reward model: r(x, y) on the generated token ids themselves (a response
    cut at max_new_tokens is scored as the unfinished response it is)."""
    @torch.no_grad()
    def score(prompts, responses, prompt_ids, response_ids) -> list[float]:
        reward_model.eval()
        out = []
        for start in range(0, len(prompt_ids), batch_size):
            seqs = [sequence(p, r) for p, r in zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size])]
            batch = to_device(collate(seqs, pad_id), device)
            with autocast(device, dtype):
                out += sequence_scores(reward_model, batch["input_ids"], batch["attention_mask"]).tolist()
        return out
    return score


def preference_scorer(builtin: bool, reward_model, independent: bool, tokenizer, cfg, device, dtype):
    """(score_fn, its name) for evaluation: the gold reward on the built-in task; on real data a
    reward model's score, flagged when it is the one PPO optimised (then not an independent judge)."""
    if builtin:
        return gold_scorer, "gold reward"
    if reward_model is None:
        return None, "n/a (give --reward_model)"
    name = "--reward_model score" if independent else "score of the reward model PPO optimised (not independent)"
    return reward_model_scorer(reward_model, tokenizer.pad_token_id, cfg.eval_batch_size, device, dtype), name


def gold_scorer(prompts, responses, prompt_ids=None, response_ids=None) -> list[float]:
    """score_fn for the built-in task: its programmatic gold reward, on the decoded text."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def evaluate(model, tokenizer, test_rows: list[dict], cfg, *, device, dtype, score_fn: Callable | None = None,
             against: dict | None = None, desc: str = "eval") -> tuple[dict, dict]:
    """Greedy responses to the test prompts. Metrics: rougeL (F1 against the reference: instruction
    following), reward (score_fn: gold reward or a reward model: preference), win_rate (by score_fn,
    against `against`, another evaluate() output on the same rows), length (response tokens, no EOS)."""
    prompt_ids = [generation_prompt(tokenizer, r["prompt"], cfg.max_length, cfg.max_prompt_length, cfg.max_new_tokens)
                  for r in test_rows]
    response_ids = generate(model, prompt_ids, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, device=device,
                            dtype=dtype, desc=desc)
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    n = len(test_rows)
    metrics = {"rougeL": sum(rouge_l_f1(y, r["reference"]) for y, r in zip(responses, test_rows)) / n,
               "length": sum(len(ids) - (ids[-1:] == [tokenizer.eos_token_id]) for ids in response_ids) / n}
    outputs = {"responses": responses, "scores": None}
    if score_fn is not None:
        outputs["scores"] = score_fn([r["prompt"] for r in test_rows], responses, prompt_ids, response_ids)
        metrics["reward"] = sum(outputs["scores"]) / n
        if against is not None:
            metrics["win_rate"] = win_rate(outputs["scores"], against["scores"])
    return metrics, outputs


# ============================================================================================
# Configuration and the command line
# ============================================================================================


@dataclass
class TrainConfig:
    """Settings every script shares. Defaults fit the built-in task on the `tiny` model; for a real
    model lower the learning rates (see README)."""
    # --- model and data
    model: str = "tiny"  # Hugging Face model name or local folder; `tiny` = the built-in task's small Llama, warm-started (tiny-random: not)
    trust_remote_code: bool = False  # allow a hub model's own Python code (only for models you trust)
    sft_data: str = ""  # SFT rows (prompt/completion or messages): .json/.jsonl/.parquet or hub name; empty = built-in task
    pref_data: str = ""  # preference rows (prompt/chosen/rejected): file or hub name; empty = built-in task
    eval_data: str = ""  # held-out SFT-format rows for evaluation; empty = the last `eval_size` SFT rows
    eval_size: int = 100  # number of test prompts
    n_sft: int = 3000  # SFT rows: generated (built-in task) or the first n_sft of --sft_data (0 = all)
    n_pref: int = 2000  # preference pairs: generated, or the first n_pref of --pref_data (0 = all)
    max_length: int = 512  # prompt + response tokens; longer rows are truncated
    max_prompt_length: int = 256  # a truncated prompt keeps its last this-many tokens
    # --- optimisation
    seed: int = 0  # seeds data generation, initialisation, shuffling and sampling
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    batch_size: int = 32  # examples or pairs per optimizer step
    grad_accum_steps: int = 1  # micro-batches per optimizer step (same update, less memory)
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~1/3 more compute
    precompute_ref_logps: bool = False  # DPO: the reference's log-probs computed once before training; no reference model held
    fsdp: bool = False  # under torchrun: shard each transformer layer over the processes with FSDP2 (default: DDP, whole models)
    sft_epochs: int = 3  # passes over the SFT data (3 per stage in the HBAT authors' script)
    sft_lr: float = 1e-3  # SFT learning rate (tiny model; ~2e-5 for a real one)
    pref_epochs: int = 1  # passes over the preference data (DPO pairs or PPO prompts)
    pref_lr: float = 2e-4  # DPO / PPO policy learning rate (tiny model; ~5e-7 to 1e-6 for a real one)
    warmup_steps: int = 10  # linear learning-rate warm-up at the start of every stage
    max_grad_norm: float = 1.0  # gradient clipping
    # --- DPO
    beta: float = 0.1  # DPO temperature on the log-ratios
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # conservative DPO: assumed fraction of flipped labels
    # --- reward model and PPO
    rm_epochs: int = 1  # reward-model passes over the preference pairs
    rm_lr: float = 1e-4  # reward-model learning rate
    value_lr: float = 1e-4  # value-model learning rate (initialised from the reward model)
    ppo_batch_size: int = 64  # prompts per rollout
    ppo_epochs: int = 2  # optimisation passes over each rollout
    ppo_minibatches: int = 2  # minibatches (optimizer steps) per pass
    ppo_micro_batch_size: int = 4  # sequences per PPO forward/backward (gradients accumulated): bounds PPO's memory
    critic: bool = True  # PPO with a value model and GAE; --no-critic: the HBAT authors' critic-free stage (see README)
    kl_coef: float = 0.05  # per-token KL penalty to the reference
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value clip
    temperature: float = 1.0  # rollout sampling temperature (PPO log-probs use the same temperature)
    # --- evaluation and output
    max_new_tokens: int = 32  # generation limit (evaluation and rollouts)
    eval_batch_size: int = 64  # prompts per generation batch
    reward_model: str = ""  # real data: a reward model folder (same tokenizer) that scores evaluations
    output_dir: str = "runs/out"  # models, metrics.jsonl and results.json go here
    overwrite: bool = False  # replace the results of an earlier run in --output_dir (refused without it)
    resume: bool = False  # continue the interrupted run in --output_dir from its last checkpoint
    debug: bool = False  # on an error, show the Python traceback too (or set ALIGN_DEBUG=1)

    # What every numeric flag may be (interval notation) and what every choice flag may be; a script's
    # Config adds its own. check_config() enforces them and --help shows them.
    RANGES = {"eval_size": "[1, inf)", "n_sft": "[0, inf)", "n_pref": "[0, inf)", "max_length": "[2, inf)",
              "max_prompt_length": "[1, inf)", "seed": "[0, 4294967295]", "batch_size": "[1, inf)",
              "grad_accum_steps": "[1, inf)", "sft_epochs": "[0, inf)", "sft_lr": "(0, inf)", "pref_epochs": "[1, inf)",
              "pref_lr": "(0, inf)", "warmup_steps": "[0, inf)", "max_grad_norm": "(0, inf)", "beta": "(0, inf)",
              "label_smoothing": "[0, 0.5)", "rm_epochs": "[1, inf)", "rm_lr": "(0, inf)", "value_lr": "(0, inf)",
              "ppo_batch_size": "[1, inf)", "ppo_epochs": "[1, inf)", "ppo_minibatches": "[1, inf)",
              "ppo_micro_batch_size": "[1, inf)", "kl_coef": "[0, inf)",
              "gamma": "[0, 1]", "lam": "[0, 1]", "clip": "(0, inf)", "value_clip": "(0, inf)", "temperature": "(0, inf)",
              "max_new_tokens": "[1, inf)", "eval_batch_size": "[1, inf)"}
    CHOICES = {"dtype": ("auto", "float32", "bfloat16", "bf16"), "loss_type": ("sigmoid", "ipo")}


def setting_rules(cls) -> tuple[dict, dict]:
    """(RANGES, CHOICES) of a config class, its own over its bases'."""
    ranges, choices = {}, {}
    for klass in reversed(cls.__mro__):
        ranges.update(vars(klass).get("RANGES", {}))
        choices.update(vars(klass).get("CHOICES", {}))
    return ranges, choices


def in_range(value, interval: str) -> bool:
    """value in an interval written "[1, inf)", "(0, 1]", ... (NaN is in none)."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return bool(above and below)


def parse_config(cls, argv=None):
    """argparse over a config dataclass: one --flag per field, help text from the field's comment, with
    its range or choices. A bad flag raises ConfigError (one line) instead of printing the usage."""
    import argparse
    import inspect

    helps = {}
    for klass in reversed(cls.__mro__[:-1]):
        helps.update(re.findall(r"^\s+(\w+): [^=\n]+= [^#\n]+#\s*(.+)$", inspect.getsource(klass), flags=re.M))
    ranges, choices = setting_rules(cls)
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(message):
        raise ConfigError(f"{message} (see --help)")

    parser.error = error
    for f in dataclasses.fields(cls):
        text = helps.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        text += f" [one of: {', '.join(choices[f.name])}]" if f.name in choices else ""
        text += f" [range {ranges[f.name]}]" if f.name in ranges else ""
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=text)
    return cls(**vars(parser.parse_args(argv)))


def check_config(cfg, need_pref: bool = True, problems: list[str] | None = None) -> None:
    """Every setting checked before anything is loaded or written: ranges and choices, flags that must
    agree, the device and precision, and the output folder (check_output_dir). `problems` are a script's
    own findings, reported in the same message. need_pref=False: the script uses SFT data only
    (LD-Align), so --sft_data alone is real data and --pref_data is refused."""
    problems = list(problems or [])
    ranges, choices = setting_rules(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in choices and value not in choices[f.name]:
            problems.append(f"--{f.name} must be one of {', '.join(choices[f.name])}; got {value!r}")
        if f.name in ranges and not in_range(value, ranges[f.name]):
            problems.append(f"--{f.name} must be in {ranges[f.name]}; got {value}")
    if cfg.grad_accum_steps >= 1 and cfg.batch_size % cfg.grad_accum_steps:
        problems.append(f"--batch_size {cfg.batch_size} must be a multiple of --grad_accum_steps {cfg.grad_accum_steps}")
    if cfg.ppo_minibatches > cfg.ppo_batch_size >= 1:
        problems.append(f"--ppo_minibatches {cfg.ppo_minibatches} is more than --ppo_batch_size {cfg.ppo_batch_size}")
    if cfg.max_prompt_length >= cfg.max_length:
        problems.append(f"--max_prompt_length {cfg.max_prompt_length} must be below --max_length {cfg.max_length}")
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        problems.append("--label_smoothing applies to --loss_type sigmoid only")
    if need_pref and bool(cfg.sft_data) != bool(cfg.pref_data):
        problems.append("give both --sft_data and --pref_data, or neither (the built-in task)")
    if not need_pref and cfg.pref_data:
        problems.append("--pref_data is not used by this script (it needs SFT data only); drop it")
    if not cfg.sft_data and (cfg.n_sft == 0 or (need_pref and cfg.n_pref == 0)):
        problems.append("the built-in task needs --n_sft and --n_pref of at least 1 (0 means 'all rows' of a file)")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume continues the run in --output_dir and --overwrite replaces it; give one")
    if cfg.fsdp and not dist.is_initialized():
        problems.append("--fsdp shards the models over torchrun's processes: run torchrun --nproc_per_node N script.py --fsdp ...")
    if not problems:  # the device, then the folder: only worth checking once the flags themselves are right
        try:
            pick_dtype(cfg.dtype, pick_device(cfg.device))
            check_output_dir(cfg)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "bad settings:\n  " + "\n  ".join(problems))


def cli(main: Callable, config_cls) -> None:
    """Every script's entry point: flags -> config -> (under torchrun, join the process group) ->
    main(config). A UserError (a bad flag, file or row, or a run stopped by a non-finite value) prints
    its message alone, with no traceback, and exits 2 for bad input, 1 for a stopped run; --debug or
    ALIGN_DEBUG=1 shows the traceback instead."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("ALIGN_DEBUG", "0") not in ("", "0")
    code = None  # set once the run has ended, well or with a reported error
    try:
        cfg = parse_config(config_cls)
        init_distributed(cfg)  # under torchrun; see "More than one process"
        main(cfg)
        barrier()  # every rank done before any leaves
        code = 0
    except UserError as e:
        if debug:
            raise
        if is_main():  # every rank meets the same bad input: one message
            print(f"error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, NonFiniteError) else 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: every file in --output_dir is whole; --resume continues from the last checkpoint", file=sys.stderr)
        code = 130
    except torch.OutOfMemoryError:
        if debug:
            raise
        print("error: out of GPU memory; lower --batch_size (or raise --grad_accum_steps), --eval_batch_size, "
              "--ppo_batch_size or --max_length", file=sys.stderr)
        code = 1
    finally:
        if dist.is_initialized() and code is not None:
            # Under torchrun, leave without the interpreter's final clean-up: there, gloo's worker threads
            # can still be torn down after Python, which aborts the process now and then (SIGABRT,
            # "terminate called without an active exception"; seen about once in 50 runs on CPU).
            dist.destroy_process_group()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    if code:
        sys.exit(code)


# ============================================================================================
# Data set-up
# ============================================================================================


def load_data(cfg, tokenizer, need_pref: bool = True) -> dict:
    """Tokenized SFT examples, preference examples and test rows, every row validated before any
    training. Built-in task when no data is given. Rows longer than --max_length are truncated (see
    truncate), counted and reported per data set; data["counts"] holds the counts.
    need_pref=False (LD-Align): no preference rows are read or generated, and "pref" is []."""
    first_test_row = 1
    if cfg.sft_data:
        sft_limit = cfg.n_sft + (0 if cfg.eval_data else cfg.eval_size) if cfg.n_sft > 0 else 0  # + held-out rows
        sft_rows, sft_source = read_rows(cfg.sft_data, limit=sft_limit, flag="--sft_data"), cfg.sft_data
        pref_rows = read_rows(cfg.pref_data, limit=cfg.n_pref, flag="--pref_data") if need_pref else []
        pref_source = cfg.pref_data
        if cfg.eval_data:
            test_rows, test_source = read_rows(cfg.eval_data, split="test", flag="--eval_data"), cfg.eval_data
        else:
            if len(sft_rows) <= cfg.eval_size:
                raise DataError(f"{cfg.sft_data}: {len(sft_rows)} rows leave nothing to train on after holding "
                                f"out --eval_size {cfg.eval_size}; lower it or give --eval_data")
            sft_rows, test_rows, test_source = sft_rows[:-cfg.eval_size], sft_rows[-cfg.eval_size:], cfg.sft_data
            first_test_row = len(sft_rows) + 1  # held-out rows keep their row numbers in the file
        test_rows = test_rows[: cfg.eval_size]
    else:
        task = builtin_task(cfg.seed, cfg.n_sft, cfg.n_pref if need_pref else 0, cfg.eval_size)  # same SFT/test rows
        sft_rows, pref_rows, test_rows = task["sft"], task["pref"], task["test"]
        sft_source = pref_source = test_source = "built-in task"
    for rows, source, needed in ((sft_rows, sft_source, True), (pref_rows, pref_source, need_pref), (test_rows, test_source, True)):
        if needed and not rows:
            raise DataError(f"{source}: no rows")
    tests = [dict(zip(("prompt", "reference"), sft_texts(row, tokenizer, f"{test_source}: row {i}")))
             for i, row in enumerate(test_rows, start=first_test_row)]
    sft, sft_counts = tokenize_sft(sft_rows, tokenizer, cfg.max_length, cfg.max_prompt_length, sft_source)
    pref, pref_counts = tokenize_pref(pref_rows, tokenizer, cfg.max_length, cfg.max_prompt_length, pref_source)
    room = max(cfg.max_length - cfg.max_new_tokens, cfg.max_prompt_length)  # generation_prompt's rule
    test_counts = new_counts(len(tests))
    test_counts["prompt_cut"] = sum(len(encode_prompt(tokenizer, t["prompt"])) > room for t in tests)
    counts = {"sft": sft_counts, "test": test_counts} | ({"pref": pref_counts} if need_pref else {})
    for kind, source in (("sft", sft_source), ("pref", pref_source), ("test", test_source)):
        if kind in counts and (line := truncation_report(counts[kind], cfg)):
            print(f"{source} ({'SFT' if kind == 'sft' else 'preference' if kind == 'pref' else 'test'} rows): {line}")
    if not sft or (need_pref and not pref):
        raise DataError("no training rows left after skipping overlong ones; raise --max_length")
    return {"sft": sft, "pref": pref, "test": tests, "builtin": not cfg.sft_data, "counts": counts}


def truncation_report(counts: dict, cfg) -> str:
    """One line on what truncation did to a data set ("" when it did nothing)."""
    parts = [f"{counts['prompt_cut']} prompts cut from the left" if counts["prompt_cut"] else "",
             f"{counts['response_cut']} responses cut from the right, losing their EOS" if counts["response_cut"] else "",
             f"{counts['skipped']} rows skipped (no room left for a response)" if counts["skipped"] else ""]
    parts = [p for p in parts if p]
    if not parts:
        return ""
    return f"of {counts['rows']} rows, " + "; ".join(parts) + f" (--max_length {cfg.max_length}, " \
           f"--max_prompt_length {cfg.max_prompt_length}, --max_new_tokens {cfg.max_new_tokens} for test prompts)"


# ============================================================================================
# Output folders, checkpoints, logs
# ============================================================================================
# The rule: a folder holds whole artefacts or none. Model folders and checkpoints are written under
# a temporary name and renamed into place (write_folder), JSON files likewise (write_json). A run
# refuses an --output_dir that holds another run's files unless told --overwrite (cleared only after
# every check has passed) or --resume (continued from its checkpoint). Nothing non-finite is written.

RUN_FILES = ("results.json", "metrics.jsonl", "checkpoint", "sft", "reward_model", "final", "final_spin", "two_stage")


def run_files(out: Path) -> list[str]:
    """The files and folders of an earlier run in `out` (temporary and replaced copies included)."""
    return [p.name for name in RUN_FILES for p in (out / name, out / f"{name}.tmp", out / f"{name}.old") if p.exists()]


def check_output_dir(cfg) -> None:
    """--output_dir must be a folder (or not exist yet) we can write, and hold no other run's files
    unless --overwrite or --resume says what to do with them. Touches nothing."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out}: is a file, not a folder")
    parent = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {out}: {parent} is not writable")
    found = run_files(out) if out.is_dir() else []
    if found and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--output_dir {out} holds another run's files ({', '.join(found)}); pass --overwrite "
                          f"to replace them, --resume to continue that run, or choose another --output_dir")


def start_output(cfg, fresh: bool) -> Path:
    """After every check has passed: create --output_dir. A fresh start (no checkpoint to continue)
    clears an earlier run's files (only those: anything else in the folder is left alone), which
    --resume with nothing to resume refuses to do. A resumed run removes leftovers of interrupted
    writes, and results.json (written again at the end): results.json always means a finished run."""
    out = Path(cfg.output_dir)
    if fresh and cfg.resume and out.is_dir() and run_files(out):
        raise ConfigError(f"--resume: no checkpoint in {out} to continue, but it holds another run's files "
                          f"({', '.join(run_files(out))}); pass --overwrite instead to replace them")
    barrier()  # every rank has looked at the folder before rank 0 changes it
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        for name in run_files(out) if fresh else [n for n in run_files(out) if n.endswith(".tmp") or n == "results.json"]:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    barrier()
    return out


def write_folder(path, fill: Callable[[Path], object]) -> None:
    """fill(tmp) writes a folder under a temporary name, which then replaces `path`. An interruption
    leaves the old folder or the new one, never half of one (between the two renames, the old one
    survives as <path>.old, which load_checkpoint also reads)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if path.exists():  # (if only <path>.old is left from an earlier interruption, it stays until tmp is in place)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def to_json(obj, where: str, indent: int | None = 1) -> str:
    """json.dumps that refuses NaN and inf (they are not JSON) with a message naming the file."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:
        raise NonFiniteError(f"{where}: not written: it would hold a NaN or infinite value") from None


def write_json(path, obj) -> None:
    """A JSON file written whole (temporary name, then renamed) and finite."""
    path, text = Path(path), to_json(obj, str(path))
    if is_main():  # on N ranks, rank 0 writes
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def open_log(out: Path, keep_lines: int = 0) -> Callable[[dict], None]:
    """log(record) appends one JSON line to out/metrics.jsonl. The file is first cut to its first
    `keep_lines` lines: 0 for a fresh run, a checkpoint's count on --resume (so no step is logged twice).
    On N ranks, rank 0 logs (every rank holds the same summed metrics)."""
    if not is_main():
        return lambda record: None
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)[:keep_lines] if keep_lines and path.exists() else []
    path.write_text("".join(lines))

    def log(record: dict) -> None:
        line = to_json(record, str(path), indent=None)
        with open(path, "a") as f:
            f.write(line + "\n")
    return log


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    """Call after loading every model a resumed run needs (loading may draw numbers), before any work."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(out: Path, cfg, state: dict, model=None, tokenizer=None, extra: dict | None = None) -> None:
    """out/checkpoint/, written whole: state.json (the settings, where the run is, what it measured so
    far, and how many metrics.jsonl lines belong to it), rng.pt (the RNG state now), and, when given,
    the model (a Hugging Face folder) and extra.pt (other tensors: a guiding model, an optimizer)."""
    path = out / "metrics.jsonl"
    state = {**state, "config": dataclasses.asdict(cfg),
             "metrics_lines": len(path.read_text().splitlines()) if path.exists() else 0}

    state_dict = None
    if model is not None:
        check_finite_weights(model, out / "checkpoint")
        state_dict = full_state_dict(model)

    def fill(tmp: Path) -> None:
        if model is not None:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
        (tmp / "state.json").write_text(to_json(state, str(out / "checkpoint" / "state.json")))
        torch.save(rng_state(), tmp / "rng.pt")
        if extra is not None:
            torch.save(extra, tmp / "extra.pt")

    quiet_transformers()
    if is_main():  # on N ranks rank 0 writes (the RNG state is the same on every rank), the others wait
        write_folder(out / "checkpoint", fill)
    barrier()


def load_checkpoint(out: Path, cfg) -> dict | None:
    """The state of out/checkpoint, or None when there is none, after checking the run's settings are
    the ones it was written with (all but --resume, --overwrite, --debug, --device and --output_dir: the
    folder may have moved).
    state["folder"] is the checkpoint folder; state["rng"] and state["extra"] hold its tensors."""
    folder = next((f for f in (out / "checkpoint", out / "checkpoint.old") if (f / "state.json").exists()), None)
    if folder is None:
        return None
    state = json.loads((folder / "state.json").read_text())
    if not {"config", "metrics_lines"} <= set(state):
        raise ConfigError(f"--resume: {folder} was written by an older version of this script; use --overwrite")
    saved, now = state["config"], dataclasses.asdict(cfg)
    skip = ("resume", "overwrite", "debug", "device", "output_dir")
    changed = [k for k in now if k not in skip and saved.get(k) != now[k]]
    if changed:
        raise ConfigError(f"--resume: {folder} was written with other settings: "
                          + ", ".join(f"--{k} {saved.get(k)} (now {now[k]})" for k in changed))
    state["folder"] = folder
    state["rng"] = torch.load(folder / "rng.pt", weights_only=False)
    state["extra"] = torch.load(folder / "extra.pt", weights_only=False) if (folder / "extra.pt").exists() else None
    return state


def format_table(columns: dict[str, dict]) -> str:
    """Models side by side: one column per model, one row per metric."""
    names = list(columns)
    metrics = list(dict.fromkeys(k for c in columns.values() for k in c))
    width = max(12, *map(len, names))
    lines = ["metric".ljust(12) + "".join(n.rjust(width + 2) for n in names)]
    for m in metrics:
        cells = [columns[n].get(m) for n in names]
        lines.append(m.ljust(12) + "".join((f"{c:.3f}" if isinstance(c, float) else "n/a" if c is None else str(c)).rjust(width + 2) for c in cells))
    return "\n".join(lines)
