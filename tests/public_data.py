"""Small local copies of public Hugging Face data sets, with their public schemas, for offline tests.

Each copy has the public column names, nested types, split names and file layout, and 4-8 rows per
split of short English text written for these tests. Where each schema comes from:

- HuggingFaceH4/ultrachat_200k (https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k, README.md
  YAML): prompt str, prompt_id str, messages [{content, role}]; splits train_sft/test_sft/train_gen/test_gen;
  data/<split>-NNNNN-of-NNNNN.parquet; README has `configs:` (data/<split>-*) and `dataset_info:`.
- HuggingFaceH4/ultrafeedback_binarized (https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized):
  prompt, prompt_id, chosen [msgs], rejected [msgs], messages [msgs], score_chosen float64, score_rejected
  float64; splits train_prefs/train_sft/test_prefs/test_sft/train_gen/test_gen; README as ultrachat's.
- Anthropic/hh-rlhf (https://huggingface.co/datasets/Anthropic/hh-rlhf): chosen str, rejected str, each a
  "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript; <subset>/train.jsonl.gz and <subset>/test.jsonl.gz
  (subsets helpful-base, harmless-base, helpful-online, helpful-rejection-sampled; here the first two);
  README has no `configs:` (only license and tags).
- trl-lib/hh-rlhf-helpful-base (https://huggingface.co/datasets/trl-lib/hh-rlhf-helpful-base, built by TRL's
  hh-rlhf-helpful-base.py generation script): explicit-prompt conversational preference, columns in the
  order chosen [msgs], rejected [msgs], prompt [msgs]; chosen/rejected hold one assistant message; splits
  train/test; data/<split>-00000-of-00001.parquet; README is TRL's card (`tags: [trl]`, no `configs:`).
- trl-lib/tldr (https://huggingface.co/datasets/trl-lib/tldr, TRL's tldr.py): prompt str
  ("SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:"), completion str (leading space); splits
  train/validation/test; README `tags: [trl]` only.
- trl-lib/tldr-preference (https://huggingface.co/datasets/trl-lib/tldr-preference, TRL's
  tldr_preference.py): prompt str, chosen str, rejected str; splits train/validation; README `tags: [trl]`.
- trl-lib/Capybara (https://huggingface.co/datasets/trl-lib/Capybara): source str, messages [msgs],
  num_turns int64; splits train/test; README has `dataset_info:` and `configs:` (data/<split>-*).
  (num_turns is written here as the number of messages; the public value was not checked.)

The formats other tools read (single-file repositories: load_dataset calls their one split "train"):
- Open-Orca/SlimOrca (https://huggingface.co/datasets/Open-Orca/SlimOrca): ShareGPT, one file
  oo-labeled_correct.gpt4.sharegpt.jsonl; conversations [{from, value, weight}] with from system/human/gpt
  (weight null, 0.0, 1.0).
- teknium/OpenHermes-2.5 (https://huggingface.co/datasets/teknium/OpenHermes-2.5): ShareGPT in one JSON list,
  openhermes2_5.json; conversations [{from, value, weight: null}] (a system turn on some rows) beside mostly
  null metadata columns (custom_instruction, topic, model_name, model, skip_prompt_formatting, category, views,
  language, id, title, idx, hash, avatarUrl, system_prompt, source).
- tatsu-lab/alpaca (https://huggingface.co/datasets/tatsu-lab/alpaca): instruction, input (empty on most
  rows), output, text (the Stanford prompt rendered); data/train-00000-of-00001-a09b74b3ef9c3b56.parquet.
- timdettmers/openassistant-guanaco (https://huggingface.co/datasets/timdettmers/openassistant-guanaco): text
  ("### Human: ...### Assistant: ...", more turns on some rows); openassistant_best_replies_train.jsonl and
  openassistant_best_replies_eval.jsonl (load_dataset: train and test).
- databricks/databricks-dolly-15k (https://huggingface.co/datasets/databricks/databricks-dolly-15k): instruction,
  context (often empty), response, category; one file databricks-dolly-15k.jsonl.

A repository of several configs:
- HuggingFaceTB/smoltalk (https://huggingface.co/datasets/HuggingFaceTB/smoltalk): messages [msgs], source str;
  data/<config>/<split>-00000-of-00001.parquet for configs all, smol-magpie-ultra, smol-rewrite, ... (here those
  three), splits train/test; `all` is the union of the others; README `configs:` lists each config's data_files.
  Layouts "hub" and "hub-noreadme" only.

Layouts (make_copy): "hub" (the repository's files, README.md included), "hub-noreadme" (the same
without README.md), "disk" (DatasetDict.save_to_disk), "disk-split" (one split, Dataset.save_to_disk),
"jsonl" (<split>.jsonl per split; <split>.jsonl.gz for Anthropic/hh-rlhf). The rows come from small text
banks, so two splits may share a row: a test tells the splits apart by the rows only one of them holds.
"""
import gzip
import hashlib
import json
from pathlib import Path

import datasets
from datasets import Features, Value

LAYOUTS = ("hub", "hub-noreadme", "disk", "disk-split", "jsonl")
MSGS = [{"content": Value("string"), "role": Value("string")}]
S = Value("string")

# (question, good answer, weak answer, follow-up question, follow-up answer)
CHATS = [
    ('How do I keep basil alive indoors?', 'Give it six hours of sun, water when the top inch of soil is dry, and pinch off flower buds.', 'Just water it every day.',
     'Can I grow it from a cutting?', 'Yes. Put a 10 cm stem in water; roots appear in about a week.'),
    ('What is the difference between weather and climate?', 'Weather is the state of the air over hours or days; climate is the average weather of a region over decades.', 'They are the same thing.',
     'Is a cold winter proof that the climate is not warming?', 'No. One season is weather; climate trends show up over thirty years or more.'),
    ('Can you suggest a quick vegetarian dinner?', 'Try a chickpea curry: fry onion and garlic, add curry paste, a can of chickpeas and coconut milk, and simmer for 15 minutes.', 'Eat a salad.',
     'What can I serve it with?', 'Rice or warm flatbread, with a spoonful of yogurt on top.'),
    ('How should I prepare for a job interview?', 'Read about the company, practise short stories about your past work, and prepare two questions to ask them.', 'Wing it, interviews are random.',
     'What should I wear?', 'Dress one step more formal than the people who already work there.'),
    ('Why is the sky blue?', 'Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue light reaches us from every direction.', 'Because it reflects the ocean.',
     'Then why are sunsets red?', 'At sunset light crosses more air, so most blue is scattered away before it reaches you.'),
    ('How do I start running as a beginner?', 'Alternate one minute of jogging with two of walking for 20 minutes, three times a week.', 'Run as far as you can on day one.',
     'How do I avoid sore knees?', 'Wear cushioned shoes, keep your stride short, and increase distance by no more than ten percent a week.'),
    ('What is a good way to learn new vocabulary?', 'Use spaced repetition: review new words after one day, three days and a week, and use each in a sentence.', 'Read the dictionary.',
     'How many words a day is realistic?', 'Ten to twenty new words a day is sustainable for most learners.'),
    ('How can I make my phone battery last longer?', 'Lower the screen brightness, turn off background refresh for apps you rarely use, and avoid full drains.', 'Buy a new phone.',
     'Is it bad to charge overnight?', 'Modern phones stop charging at full, so overnight charging is fine.'),
    ('Explain what a budget is in simple terms.', 'A budget is a plan that lists the money you expect to earn and decides in advance how you will spend or save it.', 'It is a spreadsheet.',
     'What is the 50/30/20 rule?', 'Spend half your income on needs, thirty percent on wants and save twenty percent.'),
    ('How do vaccines work?', 'They show the immune system a harmless piece or copy of a germ, so it learns to recognise and fight the real one quickly.', 'They kill all germs in your body.',
     'Why do some need boosters?', 'Immune memory can fade over time, and a booster reminds the body to keep its defences ready.'),
    ('What should I pack for a weekend hike?', 'Water, snacks, a rain jacket, a map, a first aid kit, sun cream and a warm layer.', 'Nothing, travel light.',
     'How much water do I need?', 'About half a litre per hour of walking, more in hot weather.'),
    ('How do I remove a coffee stain from a shirt?', 'Rinse the back of the stain with cold water, rub in a little liquid detergent, wait ten minutes and wash as usual.', 'Throw the shirt away.',
     'What if the stain is old?', 'Soak it for an hour in warm water with an oxygen-based stain remover before washing.'),
]
# (subreddit, title, post, the author's TL;DR, a weaker summary)
POSTS = [
    ('relationships', 'My roommate never does the dishes', 'We agreed to split chores when we moved in. For two months I have done every dish while he says he will do them later.',
     'roommate never does his share of the dishes, how do I bring it up without a fight?', 'dishes are annoying.'),
    ('personalfinance', 'Should I pay off my car loan early?', 'I have a car loan at 3% with two years left and about 5k in savings. I am not sure if I should pay it off or keep the cash.',
     'low-interest car loan and small savings; pay it off early or keep an emergency fund?', 'I have a car.'),
    ('AskCulinary', 'My bread never rises properly', 'I follow the recipe exactly but my loaves come out dense. The yeast is new and my kitchen is quite cold in winter.',
     'bread comes out dense, could my cold kitchen be the problem?', 'bread bad.'),
    ('running', 'First half marathon in six weeks', 'I signed up for a half marathon and my longest run so far is 10 km. I run three times a week. Is six weeks enough to get ready?',
     'longest run is 10 km and the half marathon is in six weeks, can I be ready?', 'running a race soon.'),
    ('cats', 'Cat keeps knocking things off the table', 'My two-year-old cat pushes cups off the table every morning at 6 am until I get up. I have tried ignoring her but she keeps going.',
     'cat knocks things over at 6 am to wake me up, how do I stop it?', 'my cat is weird.'),
    ('careerguidance', 'Offered a promotion I am not sure I want', 'My manager offered me a team lead role. It pays more but I would code much less, and coding is the part of the job I enjoy most.',
     'promotion means more money but less coding, which I love; should I take it?', 'got a job offer.'),
    ('gardening', 'Tomato leaves turning yellow', 'The lower leaves on my tomato plants are turning yellow with brown spots. I water them every evening and they get full sun.',
     'lower tomato leaves yellow with brown spots despite sun and daily water, what is wrong?', 'plants are yellow.'),
    ('travel', 'Lost my passport two days before a flight', 'I cannot find my passport and I fly abroad in two days for a wedding. The nearest passport office is three hours away.',
     'lost passport two days before flying to a wedding, can I get an emergency one in time?', 'passport problem.'),
]
SOURCES = ["Dove", "Know-Logic", "GPT4LLM", "EverythingLM", "General-Instruct", "Airoboros", "TaskSource", "SuperCOT"]


def _msg(role, content):
    return {"content": content, "role": role}


def _conv(i, multi):
    q, good, _, f, fa = CHATS[i % len(CHATS)]
    return [_msg("user", q), _msg("assistant", good)] + ([_msg("user", f), _msg("assistant", fa)] if multi else [])


def _hh_row(i):  # every other row has two exchanges; the two replies differ only in the last turn
    q, good, weak, f, fa = CHATS[i % len(CHATS)]
    ctx = f"\n\nHuman: {q}" + (f"\n\nAssistant: {good}\n\nHuman: {f}" if i % 2 else "")
    return {"chosen": f"{ctx}\n\nAssistant: {fa if i % 2 else good}",
            "rejected": f"{ctx}\n\nAssistant: {'I am not sure.' if i % 2 else weak}"}


def _trl_from_hh(row):
    """An hh-rlhf pair as TRL's explicit-prompt conversation: shared turns, then one reply each."""
    def turns(text):
        parts = text.split("\n\n")[1:]
        return [_msg("user" if p.startswith("Human: ") else "assistant", p.split(": ", 1)[1]) for p in parts]
    chosen, rejected = turns(row["chosen"]), turns(row["rejected"])
    return {"chosen": chosen[-1:], "rejected": rejected[-1:], "prompt": chosen[:-1]}


def _tldr_prompt(i):
    sub, title, post, _, _ = POSTS[i % len(POSTS)]
    return f"SUBREDDIT: r/{sub}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def _ultra(i, prefs):
    q, good, weak, _, _ = CHATS[i % len(CHATS)]
    row = {"prompt": q, "prompt_id": hashlib.sha256(q.encode()).hexdigest()}
    if not prefs:  # ultrachat: a multi-turn conversation on every other row
        return {**row, "messages": _conv(i, i % 2)}
    chosen, rejected = [_msg("user", q), _msg("assistant", good)], [_msg("user", q), _msg("assistant", weak)]
    return {**row, "chosen": chosen, "rejected": rejected, "messages": chosen,
            "score_chosen": 7.0 + i % 3, "score_rejected": 2.5 + i % 4}


def _capybara(i):
    msgs = _conv(i, i % 2)
    return {"source": SOURCES[i % len(SOURCES)], "messages": msgs, "num_turns": len(msgs)}


def _sharegpt(i, hermes):
    q, good, _, f, fa = CHATS[i % len(CHATS)]
    turns = [("human", q), ("gpt", good)] + ([("human", f), ("gpt", fa)] if hermes and i % 2 else [])
    if not hermes or i % 3 == 0:
        turns.insert(0, ("system", "You are an AI assistant. Answer helpfully and briefly."))
    weight = {"system": None, "human": 0.0, "gpt": 1.0}
    conversations = [{"from": who, "value": said, "weight": None if hermes else weight[who]} for who, said in turns]
    if not hermes:
        return {"conversations": conversations}
    meta = dict.fromkeys(("custom_instruction", "topic", "model_name", "model", "skip_prompt_formatting", "category", "views",
                          "language", "id", "title", "idx", "hash", "avatarUrl", "system_prompt"))
    return {**meta, "conversations": conversations, "source": SOURCES[i % len(SOURCES)]}


def _alpaca(i):
    q, good, _, f, _ = CHATS[i % len(CHATS)]
    extra = f"Context: {f}" if i % 3 == 1 else ""
    prompt = (f"Below is an instruction that describes a task, paired with an input that provides further context. Write a response "
              f"that appropriately completes the request.\n\n### Instruction:\n{q}\n\n### Input:\n{extra}\n\n### Response:\n") if extra else \
        (f"Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
         f"### Instruction:\n{q}\n\n### Response:\n")
    return {"instruction": q, "input": extra, "output": good, "text": prompt + good}


def _guanaco(i):
    q, good, _, f, fa = CHATS[i % len(CHATS)]
    return {"text": f"### Human: {q}### Assistant: {good}" + (f"### Human: {f}### Assistant: {fa}" if i % 2 else "")}


def _dolly(i):
    q, good, _, f, _ = CHATS[i % len(CHATS)]
    return {"instruction": q, "context": f if i % 2 else "", "response": good, "category": ("open_qa", "closed_qa")[i % 2]}


SHAREGPT_TURNS = [{"from": S, "value": S, "weight": Value("float64")}]
TAGS_CARD = "---\ntags:\n- trl\n---\n\n# {title}\n\nA TRL data set (local test copy).\n"
SPECS = {  # name: splits (rows each), features, row builder (row index -> row), README, parquet shards
    "HuggingFaceH4/ultrachat_200k": dict(
        splits={"train_sft": 6, "test_sft": 4, "train_gen": 5, "test_gen": 4}, shards={"train_sft": 2},
        features=Features({"prompt": S, "prompt_id": S, "messages": MSGS}),
        row=lambda i: _ultra(i, prefs=False), readme="configs"),
    "HuggingFaceH4/ultrafeedback_binarized": dict(
        splits={"train_prefs": 6, "train_sft": 5, "test_prefs": 4, "test_sft": 4, "train_gen": 4, "test_gen": 4},
        features=Features({"prompt": S, "prompt_id": S, "chosen": MSGS, "rejected": MSGS, "messages": MSGS,
                           "score_chosen": Value("float64"), "score_rejected": Value("float64")}),
        row=lambda i: _ultra(i, prefs=True), readme="configs"),
    "Anthropic/hh-rlhf": dict(
        splits={"train": 5, "test": 4}, subsets=("harmless-base", "helpful-base"),
        features=Features({"chosen": S, "rejected": S}), row=_hh_row,
        readme="---\nlicense: mit\ntags:\n- human-feedback\n---\n\n# Dataset Card for HH-RLHF\n"),
    "trl-lib/hh-rlhf-helpful-base": dict(
        splits={"train": 5, "test": 4}, features=Features({"chosen": MSGS, "rejected": MSGS, "prompt": MSGS}),
        row=None, readme=TAGS_CARD.format(title="HH-RLHF-Helpful-Base Dataset")),
    "trl-lib/tldr": dict(
        splits={"train": 5, "validation": 4, "test": 4}, features=Features({"prompt": S, "completion": S}),
        row=lambda i: {"prompt": _tldr_prompt(i), "completion": " " + POSTS[i % len(POSTS)][3]},
        readme=TAGS_CARD.format(title="TL;DR Dataset")),
    "trl-lib/tldr-preference": dict(
        splits={"train": 5, "validation": 4}, features=Features({"prompt": S, "chosen": S, "rejected": S}),
        row=lambda i: {"prompt": _tldr_prompt(i), "chosen": " " + POSTS[i % len(POSTS)][3],
                       "rejected": " " + POSTS[i % len(POSTS)][4]},
        readme=TAGS_CARD.format(title="TL;DR Dataset for Preference Learning")),
    "trl-lib/Capybara": dict(
        splits={"train": 6, "test": 4}, features=Features({"source": S, "messages": MSGS, "num_turns": Value("int64")}),
        row=_capybara, readme="configs"),
    # hub_files: split -> the repository's one file for it (as the public repository names it)
    "Open-Orca/SlimOrca": dict(
        splits={"train": 6}, features=Features({"conversations": SHAREGPT_TURNS}), row=lambda i: _sharegpt(i, hermes=False),
        hub_files={"train": "oo-labeled_correct.gpt4.sharegpt.jsonl"}, readme="---\nlicense: mit\ntask_categories:\n- conversational\n---\n"),
    "teknium/OpenHermes-2.5": dict(
        splits={"train": 6}, features=Features({**{k: S for k in ("custom_instruction", "topic", "model_name", "model", "category", "views",
                                                                  "language", "id", "title", "idx", "hash", "avatarUrl", "system_prompt")},
                                                "skip_prompt_formatting": Value("bool"), "conversations": SHAREGPT_TURNS, "source": S}),
        row=lambda i: _sharegpt(i, hermes=True), hub_files={"train": "openhermes2_5.json"},
        readme="---\nlicense: other\nlanguage:\n- eng\n---\n"),
    "tatsu-lab/alpaca": dict(
        splits={"train": 6}, features=Features({"instruction": S, "input": S, "output": S, "text": S}), row=_alpaca,
        hub_files={"train": "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet"}, readme="---\nlicense: cc-by-nc-4.0\n---\n"),
    "timdettmers/openassistant-guanaco": dict(
        splits={"train": 5, "test": 4}, features=Features({"text": S}), row=_guanaco,
        hub_files={"train": "openassistant_best_replies_train.jsonl", "test": "openassistant_best_replies_eval.jsonl"},
        readme="---\nlicense: apache-2.0\n---\n"),
    "HuggingFaceTB/smoltalk": dict(  # configs: the parts; "all" is their union, in this order
        splits={"train": 3, "test": 2}, configs=("smol-magpie-ultra", "smol-rewrite"), features=Features({"messages": MSGS, "source": S}),
        row=lambda i: {"messages": _conv(i, i % 2), "source": ("smol-magpie-ultra", "smol-rewrite")[i // 20]}, readme="configs"),
    "databricks/databricks-dolly-15k": dict(
        splits={"train": 6}, features=Features({"instruction": S, "context": S, "response": S, "category": S}), row=_dolly,
        hub_files={"train": "databricks-dolly-15k.jsonl"}, readme="---\nlicense: cc-by-sa-3.0\n---\n"),
}


def rows(name: str, split: str, subset: str | None = None) -> list[dict]:
    """The rows written for `split` of data set `name`, in file order. For Anthropic/hh-rlhf: those of
    `subset`, or with no subset every subset's in sorted folder order (as load_dataset reads the root)."""
    spec = SPECS[name]
    if split not in spec["splits"]:
        raise KeyError(f"{name} has no split {split!r} (splits: {', '.join(spec['splits'])})")
    if name == "trl-lib/hh-rlhf-helpful-base":
        return [_trl_from_hh(r) for r in rows("Anthropic/hh-rlhf", split, "helpful-base")]
    if "subsets" in spec and subset is None:
        return [r for s in spec["subsets"] for r in rows(name, split, s)]
    if "configs" in spec:  # smoltalk: config k's rows start at 20 k; "all" (or none) is every config's
        if subset in (None, "all"):
            return [r for c in spec["configs"] for r in rows(name, split, c)]
        return [spec["row"](20 * spec["configs"].index(subset) + 5 * list(spec["splits"]).index(split) + i) for i in range(spec["splits"][split])]
    # each split (and hh-rlhf subset) starts at its own place in the text banks
    start = 5 * list(spec["splits"]).index(split) + (6 * spec["subsets"].index(subset) if subset else 0)
    return [spec["row"](start + i) for i in range(spec["splits"][split])]


def _yaml_feature(name, ftype, indent):
    pad = " " * indent
    if isinstance(ftype, (list, datasets.List)):  # a list of {content, role} structs
        inner = ftype[0] if isinstance(ftype, list) else ftype.feature
        return [f"{pad}- name: {name}", f"{pad}  list:"] + [
            line for k, v in inner.items() for line in _yaml_feature(k, v, indent + 2)]
    return [f"{pad}- name: {name}", f"{pad}  dtype: {ftype.dtype}"]


def _configs_readme(name):
    """The README.md YAML header that `push_to_hub` writes: `configs:` data_files, then `dataset_info:`."""
    spec = SPECS[name]
    lines = ["---", "configs:"]
    for config in ("all", *spec["configs"]) if "configs" in spec else ("default",):
        lines += [f"- config_name: {config}", "  data_files:"] + [f"  - split: {s}\n    path: data/{config + '/' if 'configs' in spec else ''}{s}-*"
                                                                  for s in spec["splits"]]
    if "configs" in spec:  # (smoltalk's card: a dataset_info per config, left out here)
        return "\n".join(lines + ["---", "", f"# Dataset Card for {name.split('/')[1]} (local test copy)", ""])
    lines += ["dataset_info:", "  features:"]
    lines += [line for k, v in spec["features"].items() for line in _yaml_feature(k, v, 2)]
    lines += ["  splits:"] + [f"  - name: {s}\n    num_bytes: {_dataset(name, s).data.nbytes}\n    num_examples: {n}"
                              for s, n in spec["splits"].items()]
    return "\n".join(lines + ["---", "", f"# Dataset Card for {name.split('/')[1]} (local test copy)", ""])


def _dataset(name, split, subset=None):
    return datasets.Dataset.from_list(rows(name, split, subset), features=SPECS[name]["features"], split=split)


def _write_jsonl(path: Path, data: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in data)


def make_copy(name: str, layout: str, root: Path, split: str | None = None) -> Path:
    """Write data set `name` in `layout` (see LAYOUTS) under `root`; return the folder to pass as a data
    flag. `split` picks the split of "disk-split" (default: the first split)."""
    spec = SPECS[name]
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (layouts: {', '.join(LAYOUTS)})")
    split = split or next(iter(spec["splits"]))
    out = Path(root) / f"{name.replace('/', '--')}-{layout}" / (split if layout == "disk-split" else "")
    out.mkdir(parents=True, exist_ok=True)
    if layout == "disk":
        datasets.DatasetDict({s: _dataset(name, s) for s in spec["splits"]}).save_to_disk(str(out))
    elif layout == "disk-split":
        _dataset(name, split).save_to_disk(str(out))
    elif layout == "jsonl":
        ext = ".jsonl.gz" if "subsets" in spec else ".jsonl"
        for s in spec["splits"]:
            _write_jsonl(out / f"{s}{ext}", rows(name, s))
    elif "hub_files" in spec:  # the repository's own file per split: JSON Lines, one JSON list (.json) or parquet
        for s, path in spec["hub_files"].items():
            if path.endswith(".parquet"):
                (out / path).parent.mkdir(parents=True, exist_ok=True)
                _dataset(name, s).to_parquet(str(out / path))
            elif path.endswith(".json"):
                (out / path).write_text(json.dumps(rows(name, s), ensure_ascii=False, indent=1), encoding="utf-8")
            else:
                _write_jsonl(out / path, rows(name, s))
    elif "configs" in spec:  # smoltalk: data/<config>/<split>-00000-of-00001.parquet, "all" included
        for config in ("all", *spec["configs"]):
            (out / "data" / config).mkdir(parents=True, exist_ok=True)
            for s in spec["splits"]:
                datasets.Dataset.from_list(rows(name, s, config), features=spec["features"]).to_parquet(
                    str(out / "data" / config / f"{s}-00000-of-00001.parquet"))
    elif "subsets" in spec:  # hh-rlhf: <subset>/<split>.jsonl.gz
        for sub in spec["subsets"]:
            for s in spec["splits"]:
                _write_jsonl(out / sub / f"{s}.jsonl.gz", rows(name, s, sub))
    else:  # data/<split>-0000i-of-0000n.parquet
        (out / "data").mkdir(exist_ok=True)
        for s in spec["splits"]:
            ds, n = _dataset(name, s), spec.get("shards", {}).get(s, 1)
            for i in range(n):
                ds.shard(n, i, contiguous=True).to_parquet(str(out / "data" / f"{s}-{i:05d}-of-{n:05d}.parquet"))
    if layout == "hub":
        readme = spec["readme"]
        (out / "README.md").write_text(_configs_readme(name) if readme == "configs" else readme, encoding="utf-8")
    return out
