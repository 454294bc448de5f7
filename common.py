"""Shared pieces of the three alignment scripts (two_stage_baseline.py, hbat.py, ld_align.py).

Read top to bottom, this file is: device and seeding; the built-in task; model and tokenizer loading;
data loading, validation and tokenization; log-probs; the losses (SFT, DPO, Bradley-Terry, PPO); the
Fisher/EWC math; the training loops (one SFT stage, one DPO stage, reward-model training, one PPO
rollout/update step); generation; evaluation; configuration. Functions are small; tests/ checks them.
Conventions (../shared/METHODS.md section 4): labels are built before padding, prompt and padding
labels are IGNORE_INDEX, EOS is appended to every response and labelled (only truncation can cut it),
log-probs are float32.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

IGNORE_INDEX = -100

# ============================================================================================
# Device, precision, seeding
# ============================================================================================


def pick_device(device: str = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast. `auto` -> bfloat16 on CUDA, float32 on CPU. Weights stay float32
    (mixed precision), so optimizer state and small updates are not lost to bf16 rounding."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
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
                 and_rate: float = 0.1):
    """SFT rows (prompt, completion), preference rows (prompt, chosen, rejected) labelled by the gold
    reward with Bradley-Terry noise (P(a preferred) = sigmoid(bt_scale * (r_a - r_b))), and test rows
    (prompt, completion) whose prompts appear in neither training set. Like real annotators, the
    reference writers are not perfectly consistent: each join is 'and' with probability and_rate
    (so the SFT model keeps a little mass on the preferred style for DPO and PPO to find)."""
    rng = random.Random(seed)

    def reference(facts):
        return summary(facts, [rng.random() < and_rate for _ in facts[1:]])

    test, seen = [], set()
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


def load_tokenizer(name: str = "tiny", trust_remote_code: bool = False):
    """The tokenizer alone (`tiny`: the built-in task's word-level tokenizer). A tokenizer without a pad
    token gets pad = EOS: every mask here is built from labels and attention masks, never from token
    ids, so the real EOS is still learned."""
    from transformers import AutoTokenizer

    tokenizer = build_tiny_tokenizer() if name == "tiny" else AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name}: the tokenizer has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(name: str = "tiny", trust_remote_code: bool = False, seed: int = 0):
    """`tiny` builds the built-in task's model from tiny_config (random init, seeded); anything else is
    a Hugging Face model name or local folder. Weights are loaded in float32 (see pick_dtype)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = load_tokenizer(name, trust_remote_code)
    if name == "tiny":
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(tokenizer))
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=trust_remote_code)
    # One EOS and one pad everywhere: the tokenizer's. A checkpoint's config may list several EOS ids,
    # and its generation_config may carry sampling defaults (repetition penalty, min_p, ...) that
    # transformers would silently merge into every generate() call: evaluation must be plain greedy
    # and PPO rollouts plain samples from pi.
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    disable_dropout(model)
    return model, tokenizer


def load_reward_model(path: str, tokenizer, trust_remote_code: bool = False):
    """A checkpoint with a scalar head (AutoModelForSequenceClassification, 1 label; a causal LM
    checkpoint gets a fresh head): the reward model, and the PPO value model initialised from it.
    It must share the policy's tokenizer, since it scores the policy's token ids. We read the head
    ourselves at every token (score_tokens), so pad == EOS does not confuse the last-token lookup."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{path}: the reward model's tokenizer differs from the policy's; it must score the same ids")

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                               trust_remote_code=trust_remote_code)
    if not hasattr(model, "score"):
        raise ValueError(f"{path}: {type(model).__name__} has no `score` head; unsupported as a reward model")
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


def save_model(model, tokenizer, path: str | Path) -> None:
    """save_pretrained for model and tokenizer, so AutoModel*/AutoTokenizer.from_pretrained reload it."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# ============================================================================================
# Data: loading, validation, tokenization, collation
# ============================================================================================
# Accepted rows (TRL's column names):
#   SFT:        {"prompt": str, "completion": str} | {"prompt": [msgs], "completion": [msgs]} | {"messages": [msgs]}
#   preference: {"prompt": str|[msgs], "chosen": str|[msgs], "rejected": str|[msgs]}
#               | {"chosen": [msgs], "rejected": [msgs]} (implicit prompt: the shared leading turns)
# Chat rows go through the tokenizer's chat template; the response is the last assistant turn.


class DataError(ValueError):
    """Bad input, reported with the file, row and field before any training starts."""


def read_rows(spec: str, split: str = "train", limit: int = 0) -> list[dict]:
    """Rows of a local .json/.jsonl/.parquet file, or of a hub data set by name (via `datasets`);
    only the first `limit` rows when limit > 0."""
    path = Path(spec)
    if path.suffix in (".json", ".jsonl", ".parquet") or path.is_file():
        rows = _read_file(path)
    else:  # a hub data set name, or a local data set folder
        import datasets

        rows = list(datasets.load_dataset(spec, split=f"{split}[:{limit}]" if limit > 0 else split))
    return rows[:limit] if limit > 0 else rows


def _read_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows = []  # row N = the N-th non-blank line, as in every other message
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {len(rows) + 1} (line {line_no}): not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
        return data
    import datasets

    return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))


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
    if field not in row or row[field] is None:
        raise DataError(f"{where}: missing field '{field}' (has: {', '.join(map(str, row)) or 'nothing'})")
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


def tokenize_sft(rows, tokenizer, max_length: int, max_prompt_length: int, source: str = "data"):
    """Validate every row (errors name file, row, field), then tokenize. Returns (examples, n_skipped)."""
    texts = [sft_texts(row, tokenizer, f"{source}: row {i}") for i, row in enumerate(rows, start=1)]
    examples, skipped = [], 0
    for prompt, response in texts:
        cut = truncate(encode_prompt(tokenizer, prompt), [encode_response(tokenizer, response)], max_length,
                       max_prompt_length, tokenizer.bos_token_id)
        if cut is None:
            skipped += 1
            continue
        examples.append({**sequence(cut[0], cut[1][0]), "prompt": prompt, "reference": response})
    return examples, skipped


def tokenize_pref(rows, tokenizer, max_length: int, max_prompt_length: int, source: str = "data"):
    """Validate every preference row, then tokenize chosen and rejected. Returns (examples, n_skipped)."""
    texts = [pref_texts(row, tokenizer, f"{source}: row {i}") for i, row in enumerate(rows, start=1)]
    examples, skipped = [], 0
    for prompt, chosen, rejected in texts:
        cut = truncate(encode_prompt(tokenizer, prompt), [encode_response(tokenizer, chosen), encode_response(tokenizer, rejected)],
                       max_length, max_prompt_length, tokenizer.bos_token_id)
        if cut is None:
            skipped += 1
            continue
        prompt_ids, (chosen_ids, rejected_ids) = cut
        examples.append({"chosen": sequence(prompt_ids, chosen_ids), "rejected": sequence(prompt_ids, rejected_ids),
                         "prompt": prompt, "prompt_ids": prompt_ids})
    return examples, skipped


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
    return {k: v.to(device) for k, v in batch.items()}


# ============================================================================================
# Log-probs
# ============================================================================================


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions follow the mask, so left-padded rows start at 0 like right-padded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) in float32 and the mask of labelled tokens. logits[:, t] predicts
    labels[:, t+1]; IGNORE_INDEX positions get log-prob 0 and mask 0."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits, 2, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked - torch.logsumexp(logits, dim=-1), 0.0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed response log-prob (float32) and its number of response tokens."""
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def forward_logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits


def concatenated_logps(model, pair_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of chosen and rejected from one forward over collate_pairs' batch."""
    logps, _ = sequence_logps(forward_logits(model, pair_batch), pair_batch["labels"])
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
    the data's own labels. (Squaring the gradient of a batch mean, or using argmax labels, is wrong.)"""
    params = trainable(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for example in examples:
        model.zero_grad(set_to_none=True)
        batch = to_device(collate([example], model.config.pad_token_id), device)
        with autocast(device, dtype):
            logps, _ = sequence_logps(forward_logits(model, batch), batch["labels"])
        logps.sum().backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    return {name: f / len(examples) for name, f in fisher.items()}


def ewc_penalty(model, fisher: dict, anchor: dict, lam: float) -> torch.Tensor:
    """Textbook EWC: (lambda / 2) * sum_j F_j (theta_j - anchor_j)^2."""
    params = trainable(model)
    return 0.5 * lam * sum(((fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher), torch.zeros(()))


def drift_importance(before: dict, after: dict, mse_factor: float = 1e10) -> dict[str, float]:
    """HBAT's raw importance of each tensor n: F_n = mean(((theta_after - theta_before) * s)^2),
    the drift the other objective's most recent stage made (float64: s = 1e10 squares to 1e20)."""
    return {n: (((after[n].double() - before[n].double()) * mse_factor) ** 2).mean().item() for n in before}


def accumulate_importance(previous: dict | None, new: dict) -> dict[str, float]:
    """Raw importance is carried across rounds by addition (one accumulator per stage type)."""
    return dict(new) if previous is None else {n: previous[n] + new[n] for n in new}


def softmax_importance(raw: dict) -> dict[str, float]:
    """w = softmax over all tensors of the raw importance. With s = 1e10 this is one-hot."""
    names = list(raw)
    weights = torch.softmax(torch.tensor([raw[n] for n in names], dtype=torch.float64), dim=0)
    return dict(zip(names, weights.tolist()))


def hbat_penalty(model, weights: dict, anchor: dict, lam: float = 1.0, max_weight: float = 100.0) -> torch.Tensor:
    """HBAT's modified EWC: M * sum_n w_n * sum_j (lambda * (theta_nj - anchor_nj))^2.
    Tensors with w_n == 0 exactly are skipped (they add exactly nothing)."""
    params = trainable(model)
    terms = [w * ((lam * (params[n] - anchor[n])) ** 2).sum() for n, w in weights.items() if w != 0.0]
    return max_weight * sum(terms) if terms else torch.zeros((), device=next(iter(params.values())).device)


# ============================================================================================
# Training loops: one SFT stage, one DPO stage, reward-model training, one PPO rollout/update step
# ============================================================================================
# Every loop takes `penalty`: a function of no arguments returning a scalar added to the loss at
# every optimizer step (HBAT's EWC). Each stage gets fresh AdamW optimizers, like the authors'
# stage-level scripts (SFT, DPO and reward-model stages also warm up linearly). A non-finite loss
# stops the run before the optimizer step, so the weights in memory and every file already written
# stay as they were.


class NonFiniteLoss(RuntimeError):
    pass


def chunks(items: list, n_chunks: int) -> list[list]:
    """Contiguous micro-batches of ceil(len / n_chunks) items (n_chunks of them for a full batch)."""
    size = math.ceil(len(items) / n_chunks)
    return [items[i:i + size] for i in range(0, len(items), size)]


def check_finite(metrics: dict[str, float], where: str) -> None:
    for name, value in metrics.items():
        if name.startswith("loss") and not math.isfinite(value):
            raise NonFiniteLoss(f"{where}: {name} is {value}. Stopped before the optimizer step; nothing "
                                f"was saved from this stage and files already written are intact. Common "
                                f"causes: fp16 overflow, a learning rate too high, an empty response.")


def optimizer_step(params, optimizer, max_grad_norm: float) -> float:
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_epochs(model, examples: list, step_fn: Callable, cfg, *, lr: float, epochs: int, seed: int,
                 desc: str, log: Callable | None = None, penalty: Callable | None = None) -> None:
    """The loop every supervised stage shares. step_fn(micro_batches) runs forward and backward on
    each micro-batch (normalised over the whole accumulated batch) and returns {name: 0-dim tensor}."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(examples), generator=order_rng).tolist()
            for start in range(0, len(order), cfg.batch_size):
                batch = [examples[i] for i in order[start:start + cfg.batch_size]]
                metrics = step_fn(chunks(batch, cfg.grad_accum_steps))
                if penalty is not None:
                    ewc = penalty()
                    if ewc.requires_grad:  # an all-zero penalty (every weight 0) has nothing to add
                        ewc.backward()
                    metrics["loss/ewc"] = ewc.detach()
                values = dict(zip(metrics, torch.stack([v.float() for v in metrics.values()]).tolist()))
                check_finite(values, f"{desc}, epoch {epoch + 1}, step {bar.n + 1}")
                values["grad_norm"] = float(optimizer_step(params, optimizer, cfg.max_grad_norm))
                warmup.step()
                bar.update()
                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k.startswith("loss")})
                if log is not None:
                    log({"stage": desc, "step": bar.n, "epoch": epoch + 1, **values})


def train_sft(model, examples: list, cfg, *, device, dtype, seed: int, desc: str = "sft", log=None, penalty=None):
    """SFT: -(1/N) sum log pi(y_t | x, y_<t) over response tokens, N = response tokens in the whole
    accumulated batch (not a mean of micro-batch means)."""
    pad_id = model.config.pad_token_id

    def step(micro_batches):
        batches = [collate(m, pad_id) for m in micro_batches]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        total = torch.zeros((), device=device)
        for batch in batches:
            batch = to_device(batch, device)
            with autocast(device, dtype):
                logits = forward_logits(model, batch)
            logps, _ = token_logps(logits, batch["labels"])
            loss = -logps.sum() / n_tokens
            loss.backward()
            total += loss.detach()
        return {"loss/sft": total}

    train_epochs(model, examples, step, cfg, lr=cfg.sft_lr, epochs=cfg.sft_epochs, seed=seed, desc=desc, log=log, penalty=penalty)


def train_dpo(policy, ref_model, examples: list, cfg, *, device, dtype, seed: int, desc: str = "dpo", log=None, penalty=None):
    """DPO against a frozen reference (eval mode, no_grad). A pair with a "weight" key has its loss
    scaled by it (LD-Align). Chosen and rejected share one forward pass per model."""
    pad_id = policy.config.pad_token_id
    ref_model.eval()

    def step(micro_batches):
        n_pairs = sum(map(len, micro_batches))
        sums = {}
        for pairs in micro_batches:
            batch = to_device(collate_pairs(pairs, pad_id), device)
            weights = torch.tensor([p["weight"] for p in pairs], device=device) if "weight" in pairs[0] else None
            with torch.no_grad(), autocast(device, dtype):
                ref_chosen_logps, ref_rejected_logps = concatenated_logps(ref_model, batch)
            with autocast(device, dtype):
                policy_chosen_logps, policy_rejected_logps = concatenated_logps(policy, batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, weights=weights)
            (losses.sum() / n_pairs).backward()
            for name, value in {"loss/dpo": losses.detach(), "rewards/chosen": chosen_rewards,
                                "rewards/rejected": rejected_rewards, "rewards/margins": chosen_rewards - rejected_rewards,
                                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                                "logps/chosen": policy_chosen_logps.detach(), "logps/rejected": policy_rejected_logps.detach()}.items():
                sums[name] = sums.get(name, 0) + value.sum() / n_pairs
        return sums

    train_epochs(policy, examples, step, cfg, lr=cfg.pref_lr, epochs=cfg.pref_epochs, seed=seed, desc=desc, log=log, penalty=penalty)


def train_reward_model(reward_model, examples: list, cfg, *, device, dtype, seed: int, desc: str = "reward model", log=None):
    """Bradley-Terry reward model on the preference pairs: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    pad_id = reward_model.config.pad_token_id

    def step(micro_batches):
        n_pairs = sum(map(len, micro_batches))
        loss_sum, accuracy_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        for pairs in micro_batches:
            batch = to_device(collate_pairs(pairs, pad_id), device)
            with autocast(device, dtype):
                scores = sequence_scores(reward_model, batch["input_ids"], batch["attention_mask"])
            chosen_scores, rejected_scores = scores[: len(pairs)], scores[len(pairs):]
            loss = bradley_terry_loss(chosen_scores, rejected_scores).sum() / n_pairs
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
    logps, _ = token_logps(forward_logits(model, batch) / temperature, batch["labels"])
    return logps[:, batch["query_width"] - 1:]


def response_values(value_model, batch: dict) -> torch.Tensor:
    """V(s_t) for each response token t: the value head on the token just before it (B, R)."""
    values = score_tokens(value_model, batch["input_ids"], batch["attention_mask"])
    return values[:, batch["query_width"] - 1:-1]


def ppo_step(policy, ref_model, reward_model, value_model, prompts: list[list[int]], policy_optimizer,
             value_optimizer, cfg, *, device, dtype, penalty: Callable | None = None) -> dict[str, float]:
    """One PPO iteration on a batch of prompts: sample responses, score them, per-token rewards
    (-kl_coef * KL + RM score on the last token), GAE with whitened advantages, then `ppo_epochs`
    passes of clipped policy and clipped value updates over `ppo_minibatches` minibatches (each one
    forward pass: grad_accum_steps does not apply here)."""
    pad_id, eos_id = policy.config.pad_token_id, policy.config.eos_token_id
    policy.eval()
    responses = generate(policy, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=cfg.max_new_tokens,
                         batch_size=len(prompts), device=device, dtype=dtype, do_sample=True,
                         temperature=cfg.temperature)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in rollout_batch(prompts, responses, pad_id).items()}
    mask = (batch["labels"][:, batch["query_width"]:] != IGNORE_INDEX).float()
    with torch.no_grad(), autocast(device, dtype):
        old_logps = response_logps(policy, batch, cfg.temperature)
        ref_logps = response_logps(ref_model, batch, cfg.temperature)
        old_values = response_values(value_model, batch)
        scores = sequence_scores(reward_model, batch["input_ids"], batch["attention_mask"])
    rewards = ppo_rewards(scores, old_logps, ref_logps, mask, cfg.kl_coef)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask)

    policy.train(), value_model.train()
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    sums = {"loss/policy": 0.0, "loss/value": 0.0, "clipfrac": 0.0} | ({"loss/ewc": 0.0} if penalty else {})
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        for rows in chunks(torch.randperm(len(prompts)).tolist(), cfg.ppo_minibatches):
            sub = {k: v[rows] if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast(device, dtype):
                logps = response_logps(policy, sub, cfg.temperature)
            policy_loss, clipfrac = ppo_policy_loss(logps, old_logps[rows], advantages[rows], mask[rows], cfg.clip)
            ewc = penalty() if penalty is not None else torch.zeros((), device=device)
            with autocast(device, dtype):
                values = response_values(value_model, sub)
            value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], cfg.value_clip)
            step_values = dict(zip(sums, torch.stack([policy_loss.detach(), value_loss.detach(), clipfrac, ewc.detach()]).tolist()))
            check_finite(step_values, "ppo step")
            (policy_loss + ewc).backward()
            optimizer_step(policy_params, policy_optimizer, cfg.max_grad_norm)
            value_loss.backward()
            optimizer_step(value_params, value_optimizer, cfg.max_grad_norm)
            sums = {k: sums[k] + step_values[k] for k in sums}
            n_updates += 1
    kl = (kl_estimate(old_logps, ref_logps) * mask).sum(1)
    summary_stats = torch.stack([scores.mean(), kl.mean(), mask.sum(1).mean(), rewards.sum(1).mean()]).tolist()
    return {**{k: v / n_updates for k, v in sums.items()},
            **dict(zip(["score", "kl", "response_tokens", "total_reward"], summary_stats))}


def train_ppo(policy, ref_model, reward_model, value_model, prompts: list[list[int]], cfg, *, device, dtype,
              seed: int, desc: str = "ppo", log=None, penalty=None) -> None:
    """`pref_epochs` passes over the prompts in batches of `ppo_batch_size`, one ppo_step each. The
    reference and reward models stay frozen in eval mode."""
    ref_model.eval(), reward_model.eval()
    policy_optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.pref_lr, weight_decay=0.0)
    value_optimizer = torch.optim.AdamW([p for p in value_model.parameters() if p.requires_grad], lr=cfg.value_lr, weight_decay=0.0)
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(prompts) / cfg.ppo_batch_size)
    with tqdm(total=cfg.pref_epochs * steps_per_epoch, desc=desc, dynamic_ncols=True) as bar:
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
    first EOS (kept, so it is scored and trained on like a data response)."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
    was_training = model.training
    model.eval()
    responses = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 2, dynamic_ncols=True):
        chunk = prompts[start:start + batch_size]
        input_ids = pad(chunk, pad_id, "left").to(device)
        attention_mask = pad([[1] * len(p) for p in chunk], 0, "left").to(device)
        with autocast(device, dtype):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        for row in out[:, input_ids.shape[1]:].tolist():
            responses.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    model.train(was_training)
    return responses


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
# Configuration, data set-up, reporting
# ============================================================================================


@dataclass
class TrainConfig:
    """Settings every script shares. Defaults fit the built-in task on the `tiny` model; for a real
    model lower the learning rates (see README)."""
    # --- model and data
    model: str = "tiny"  # Hugging Face model name or local folder; `tiny` = the built-in task's small Llama
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


def parse_config(cls, argv=None):
    """argparse over a config dataclass: one --flag per field, help text from the field's comment."""
    import argparse
    import dataclasses
    import inspect

    helps = {}
    for klass in reversed(cls.__mro__[:-1]):
        helps.update(re.findall(r"^\s+(\w+): [^=\n]+= [^#\n]+#\s*(.+)$", inspect.getsource(klass), flags=re.M))
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name))
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=helps.get(f.name))
    return cls(**vars(parser.parse_args(argv)))


def check_config(cfg, need_pref: bool = True) -> None:
    """Reject settings that would fail later, before anything is loaded or written. need_pref=False:
    the script uses SFT data only (LD-Align), so --sft_data alone is real data and --pref_data is refused."""
    problems = []
    if cfg.batch_size % cfg.grad_accum_steps:
        problems.append(f"--batch_size {cfg.batch_size} must be a multiple of --grad_accum_steps {cfg.grad_accum_steps}")
    if cfg.loss_type not in ("sigmoid", "ipo"):
        problems.append(f"--loss_type must be sigmoid or ipo, got {cfg.loss_type!r}")
    if getattr(cfg, "pref", "dpo") not in ("dpo", "ppo"):
        problems.append(f"--pref must be dpo or ppo, got {cfg.pref!r}")
    for name in ("sft_lr", "pref_lr", "rm_lr", "value_lr", "beta", "temperature"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            problems.append(f"--{name} must be a positive finite number, got {getattr(cfg, name)}")
    if cfg.max_prompt_length >= cfg.max_length:
        problems.append(f"--max_prompt_length {cfg.max_prompt_length} must be below --max_length {cfg.max_length}")
    if need_pref and bool(cfg.sft_data) != bool(cfg.pref_data):
        problems.append("give both --sft_data and --pref_data, or neither (the built-in task)")
    if not need_pref and cfg.pref_data:
        problems.append("--pref_data is not used by this script (it needs SFT data only); drop it")
    if problems:
        raise SystemExit("bad settings:\n  " + "\n  ".join(problems))


def load_data(cfg, tokenizer, need_pref: bool = True) -> dict:
    """Tokenized SFT examples, preference examples and test rows, every row validated before any
    training. Built-in task when no data is given. Overlong rows are skipped, counted and reported.
    need_pref=False (LD-Align): no preference rows are read or generated, and "pref" is []."""
    first_test_row = 1
    if cfg.sft_data:
        sft_limit = cfg.n_sft + (0 if cfg.eval_data else cfg.eval_size) if cfg.n_sft > 0 else 0  # + held-out rows
        sft_rows, sft_source = read_rows(cfg.sft_data, limit=sft_limit), cfg.sft_data
        pref_rows, pref_source = read_rows(cfg.pref_data, limit=cfg.n_pref) if need_pref else [], cfg.pref_data
        if cfg.eval_data:
            test_rows, test_source = read_rows(cfg.eval_data, split="test"), cfg.eval_data
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
    sft, sft_skipped = tokenize_sft(sft_rows, tokenizer, cfg.max_length, cfg.max_prompt_length, sft_source)
    pref, pref_skipped = tokenize_pref(pref_rows, tokenizer, cfg.max_length, cfg.max_prompt_length, pref_source)
    for skipped, total, source in ((sft_skipped, len(sft_rows), sft_source), (pref_skipped, len(pref_rows), pref_source)):
        if skipped:
            print(f"{source}: skipped {skipped} of {total} rows whose prompt leaves no room for a response "
                  f"(--max_length {cfg.max_length}, --max_prompt_length {cfg.max_prompt_length})")
    if not sft or (need_pref and not pref):
        raise DataError("no training rows left after skipping overlong ones; raise --max_length")
    return {"sft": sft, "pref": pref, "test": tests, "builtin": not cfg.sft_data}


def jsonl_logger(path: str | Path) -> Callable[[dict], None]:
    """log(record) appends one JSON line to path (per-step metrics)."""
    def log(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return log


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
