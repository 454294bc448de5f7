"""The papers' own data sets work as published. Local copies of the public Hugging Face data sets
(tests/public_data.py: the public columns, nested types, split names and file layouts) are read by
common.read_rows one split at a time, turned into (prompt, response(s)) by common.row_parts / row_texts,
reported by common.load_data, and trained on by the scripts.

Expected rows come from public_data.rows (what was written), expected parts and texts are worked out by
hand from each schema, never from the implementation's helpers."""
import gzip
import json
import re
import shutil

import datasets
import pyarrow.parquet
import pytest

import common as C
import hbat
import ld_align
import public_data as P
import two_stage_baseline
from common import DataError

UC, UF, HH = "HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrafeedback_binarized", "Anthropic/hh-rlhf"
TRL_HH, TLDR, TLDR_PREF, CAPY = "trl-lib/hh-rlhf-helpful-base", "trl-lib/tldr", "trl-lib/tldr-preference", "trl-lib/Capybara"
SLIM, HERMES, ALPACA, GUANACO, DOLLY = ("Open-Orca/SlimOrca", "teknium/OpenHermes-2.5", "tatsu-lab/alpaca", "timdettmers/openassistant-guanaco",
                                        "databricks/databricks-dolly-15k")
NAMES = [UC, UF, HH, TRL_HH, TLDR, TLDR_PREF, CAPY, SLIM, HERMES, ALPACA, GUANACO, DOLLY]
SHAREGPT = {"system": "system", "human": "user", "gpt": "assistant"}
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat(messages):
    """TEMPLATE rendered by hand, with the generation prompt."""
    return "".join(f"{m['role']} : {m['content']} ; " for m in messages) + "assistant : "


def user(text):
    return {"content": text, "role": "user"}


def assistant(text):
    return {"content": text, "role": "assistant"}


def hh_by_hand(text):
    """An HH transcript's turns, split by hand: "\\n\\nHuman: a\\n\\nAssistant: b" -> [user a, assistant b]."""
    turns = text.split("\n\nHuman: ")[1:]
    messages = []
    for turn in turns:
        said = turn.split("\n\nAssistant: ")
        messages += [user(said[0])] + [assistant(s) for s in said[1:]]
    return messages


def messages_by_hand(name, row):
    """A conversation of the other tools' formats as messages: ShareGPT's turns; alpaca's or dolly's one exchange."""
    if name in (SLIM, HERMES):
        return [{"content": t["value"], "role": SHAREGPT[t["from"]]} for t in row["conversations"]]
    extra = row["input" if name == ALPACA else "context"]
    return [user(row["instruction"] + (f"\n{extra}" if extra else "")), assistant(row["output" if name == ALPACA else "response"])]


def prompt_by_hand(name, row, kind):
    """The prompt of a row of data set `name`, from its schema: a string or the turns before the response."""
    if name in (SLIM, HERMES, ALPACA, DOLLY):
        return messages_by_hand(name, row)[:-1]
    if name == GUANACO:
        return ""  # language-modeling text: no prompt
    if name in (UC, CAPY) or (name == UF and kind == "sft"):
        return row["messages"][:-1]
    if name == UF:
        return row["chosen"][:-1]
    if name == HH:
        return hh_by_hand(row["chosen"])[:-1]
    return row["prompt"]  # trl-lib: an explicit prompt (messages or a string)


def reference_by_hand(name, row):
    """The SFT response of a row (for a preference row: the chosen one)."""
    if name in (SLIM, HERMES, ALPACA, DOLLY):
        return messages_by_hand(name, row)[-1]["content"]
    if name == GUANACO:
        return row["text"]
    if name in (UC, CAPY, UF):
        return row["messages"][-1]["content"]
    if name == HH:
        return row["chosen"].rsplit("\n\nAssistant: ", 1)[1]
    if name == TRL_HH:
        return row["chosen"][-1]["content"]
    return row["completion"] if name == TLDR else row["chosen"]


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """copy(name, layout, split=None): the folder of a local copy, written once per module."""
    root, made = tmp_path_factory.mktemp("public"), {}

    def copy(name, layout, split=None):
        key = (name, layout, split)
        if key not in made:
            made[key] = P.make_copy(name, layout, root / f"{layout}-{split}" if split else root, split)
        return made[key]
    return copy


@pytest.fixture
def chat_tokenizer():
    tokenizer = C.build_tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


# ------------------------------------------------------------------------------------------------
# Files and splits: each split alone, as written, in every layout
# ------------------------------------------------------------------------------------------------


def split_files(name, layout, folder, split):
    """The files a split is read from, listed by hand from the layout."""
    if layout == "jsonl":
        return [folder / f"{split}.jsonl{'.gz' if name == HH else ''}"]
    if "hub_files" in P.SPECS[name]:
        return [folder / P.SPECS[name]["hub_files"][split]]
    if name == HH:  # <subset>/<split>.jsonl.gz, subsets in folder order
        return [folder / subset / f"{split}.jsonl.gz" for subset in sorted(P.SPECS[HH]["subsets"])]
    n = P.SPECS[name].get("shards", {}).get(split, 1)
    return [folder / "data" / f"{split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


@pytest.mark.parametrize("layout", ["hub", "hub-noreadme", "disk", "jsonl"])
@pytest.mark.parametrize("name", NAMES)
def test_every_split_is_read_alone_and_whole(copies, name, layout):
    folder = copies(name, layout)
    splits = P.SPECS[name]["splits"]
    for split in splits:
        got = C.read_rows(str(folder), split)
        assert got.rows == P.rows(name, split), split  # every row, in file order, nothing else
        assert (got.source, got.split) == (str(folder), split)
        for other in splits:  # no row of another split that this one lacks (a few rows are in two splits of a copy)
            if other != split:
                assert not [r for r in P.rows(name, other) if r not in P.rows(name, split) and r in got.rows], (split, other)
        if layout == "disk":
            continue
        files = split_files(name, layout, folder, split)
        assert got.files == files
        # where(i) numbers rows as each file does: brute force over the files' own row counts
        expected = [f"{f}: row {k + 1}" for f in files for k in range(pyarrow.parquet.read_metadata(f).num_rows if f.suffix == ".parquet"
                                                                     else len(gzip.open(f).read().splitlines() if f.suffix == ".gz"
                                                                              else json.loads(f.read_text()) if f.suffix == ".json"
                                                                              else f.read_text().splitlines()))]
        assert [got.where(i) for i in range(len(got.rows))] == expected


def test_ultrachat_train_sft_is_two_parquet_shards_read_in_order(copies):
    folder = copies(UC, "hub")
    got = C.read_rows(str(folder), "train_sft")
    shards = sorted((folder / "data").glob("train_sft-*.parquet"))
    assert [s.name for s in shards] == ["train_sft-00000-of-00002.parquet", "train_sft-00001-of-00002.parquet"]
    assert got.rows == [r for s in shards for r in pyarrow.parquet.read_table(s).to_pylist()] == P.rows(UC, "train_sft")
    assert got.where(3) == f"{shards[1]}: row 1"  # the 4th row is the second shard's first


def test_hh_rlhf_subset_folders(copies):
    """Anthropic/hh-rlhf: the root reads every subset's split (as load_dataset does); a subset folder, its own."""
    folder = copies(HH, "hub")
    for split in ("train", "test"):
        for subset in P.SPECS[HH]["subsets"]:
            got = C.read_rows(str(folder / subset), split)
            assert got.rows == P.rows(HH, split, subset)
            assert got.files == [folder / subset / f"{split}.jsonl.gz"]
        assert C.read_rows(str(folder), split).rows == P.rows(HH, split, "harmless-base") + P.rows(HH, split, "helpful-base")


@pytest.mark.parametrize("name", NAMES)
def test_a_one_split_save_to_disk_folder_is_read_as_its_split(copies, name):
    """The folder records its split: asked for it, it is read; asked for another, it is refused (reading it would
    evaluate on training rows, say), naming the split it holds and the flag to give."""
    for split in list(P.SPECS[name]["splits"])[:2]:
        folder = copies(name, "disk-split", split)
        got = C.read_rows(str(folder), split)
        assert got.rows == P.rows(name, split) and got.split.startswith(split), split
        other = next(s for s in ("train", "test", "validation") if s != split)
        with pytest.raises(DataError, match=rf"holds one split, '{split}'; give --eval_split {split}"):
            C.read_rows(str(folder), other, flag="--eval_data")


@pytest.mark.parametrize("layout", ["hub", "disk", "jsonl"])
def test_a_missing_split_is_refused_with_the_splits_the_data_set_has(copies, layout):
    for name, missing, flag in ((UC, "train", "--sft_data"), (UF, "test", "--pref_data"), (HH, "validation", "--eval_data")):
        with pytest.raises(DataError) as err:
            C.read_rows(str(copies(name, layout)), missing, flag=flag)
        message = str(err.value)
        assert f"{flag} {copies(name, layout)}: no split '{missing}'" in message, message
        listed = re.search(r"\(it has: ([^)]*)\)", message).group(1).split(", ")
        assert sorted(listed) == sorted(P.SPECS[name]["splits"]), message
        assert flag.replace("_data", "_split") in message, message


@pytest.mark.parametrize("layout", ["hub", "disk", "jsonl"])
def test_a_split_can_be_sliced(copies, layout):
    folder, rows = copies(UC, layout), P.rows(UC, "train_sft")
    assert C.read_rows(str(folder), "train_sft[:2]").rows == rows[:2]
    assert C.read_rows(str(folder), "train_sft[4:]").rows == rows[4:]
    assert C.read_rows(str(folder), "train_sft[1:5]", limit=2).rows == rows[1:3]
    got = C.read_rows(str(folder), "train_sft[2:5]")
    assert got.rows == rows[2:5] and got.split == "train_sft"
    if layout == "hub":  # rows 3-5 of the split: the first shard's row 3, then the second shard's rows 1 and 2 (3 rows a shard)
        shards = split_files(UC, layout, folder, "train_sft")
        assert [got.where(i) for i in range(3)] == [f"{shards[0]}: row 3", f"{shards[1]}: row 1", f"{shards[1]}: row 2"]
    if layout == "jsonl":
        assert got.where(0) == f"{folder / 'train_sft.jsonl'}: row 3"
    with pytest.raises(C.ConfigError, match=r"--sft_split 'train_sft\[:x\]'"):
        C.read_rows(str(folder), "train_sft[:x]")


def test_json_lines_in_a_json_file_gzip_and_a_byte_order_mark(tmp_path):
    rows = P.rows(TLDR, "train")
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "to_json.json"))  # Dataset.to_json: JSON Lines in a .json
    assert (tmp_path / "to_json.json").read_text().count("\n") == len(rows)
    (tmp_path / "lines.json").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    with gzip.open(tmp_path / "list.json.gz", "wt", encoding="utf-8") as f:
        json.dump(rows, f)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for name in ("to_json.json", "lines.json", "rows.jsonl.gz", "list.json.gz", "bom.jsonl", "bom.json"):
        got = C.read_rows(str(tmp_path / name))
        assert got.rows == rows and got.files == [tmp_path / name], name
    # a broken line in a .jsonl.gz: the file, the row and the line
    with gzip.open(tmp_path / "broken.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines.splitlines(keepends=True)[0] + "\n" + lines.splitlines(keepends=True)[1] + "{oops\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'broken.jsonl.gz'}: row 3 (line 4): not valid JSON")):
        C.read_rows(str(tmp_path / "broken.jsonl.gz"))


# ------------------------------------------------------------------------------------------------
# Row formats: (prompt, response(s)) of one row of each public schema, by hand
# ------------------------------------------------------------------------------------------------

Q, GOOD, WEAK, FOLLOW, ANSWER = P.CHATS[0]


def test_hh_messages_by_hand():
    two = f"\n\nHuman: {Q}\n\nAssistant: {GOOD}\n\nHuman: {FOLLOW}\n\nAssistant: {ANSWER}"
    assert C.hh_messages(two) == [user(Q), assistant(GOOD), user(FOLLOW), assistant(ANSWER)]
    assert C.hh_messages(f"\n\nHuman: {Q}\n\nAssistant: {GOOD}") == [user(Q), assistant(GOOD)]
    assert C.hh_messages(f"\n\nHuman:  {Q} \n\nAssistant: {GOOD}\n") == [user(Q), assistant(GOOD)]  # spaces around a turn go
    for text in (P.rows(TLDR, "train")[0]["prompt"], "a plain answer", f"preamble\n\nHuman: {Q}\n\nAssistant: {GOOD}"):
        assert C.hh_messages(text) is None, text  # not a transcript: the string stays a string


def test_ultrachat_row_sft(chat_tokenizer):
    row = P.rows(UC, "train_sft")[1]  # a two-exchange conversation, with H4's 'prompt' and 'prompt_id' beside it
    assert set(row) == {"prompt", "prompt_id", "messages"} and len(row["messages"]) == 4
    q, good, _, follow, answer = P.CHATS[1]
    assert C.row_parts(row, "x", "sft") == ([user(q), assistant(good), user(follow)], [[assistant(answer)]])
    # both assistant turns are trained: the first as the text its message adds to the rendering, the last as the response
    segments = ((f"user : {q} ; assistant : ", False), (f"{good} ; ", True), (f"user : {follow} ; assistant : ", False))
    assert C.row_texts(row, chat_tokenizer, "x", "sft") == (segments, answer)
    assert C.prompt_text(segments) == chat([user(q), assistant(good), user(follow)])
    assert C.row_texts(row, chat_tokenizer, "x", "sft", last_turn_only=True) == (chat([user(q), assistant(good), user(follow)]), answer)


def test_ultrafeedback_row_pref_and_sft(chat_tokenizer):
    row = P.rows(UF, "train_prefs")[0]
    assert set(row) == {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
    # preference: chosen and rejected are whole conversations; the prompt is their shared first user turn
    assert C.row_parts(row, "x", "pref") == ([user(Q)], [[assistant(GOOD)], [assistant(WEAK)]])
    assert C.row_texts(row, chat_tokenizer, "x", "pref") == (chat([user(Q)]), GOOD, WEAK)
    # as SFT data (train_sft has the same columns): the 'messages' conversation
    assert C.row_texts(P.rows(UF, "train_sft")[0], chat_tokenizer, "x", "sft") == (chat([user(P.CHATS[5][0])]), P.CHATS[5][1])


def test_anthropic_hh_rows(chat_tokenizer):
    one, two = P.rows(HH, "train", "harmless-base")[:2]  # one exchange; two exchanges that differ in the last reply only
    q, good, weak, _, _ = P.CHATS[0]
    assert C.row_parts(one, "x", "pref") == ([user(q)], [[assistant(good)], [assistant(weak)]])
    q, good, _, follow, answer = P.CHATS[1]
    assert two["chosen"] == f"\n\nHuman: {q}\n\nAssistant: {good}\n\nHuman: {follow}\n\nAssistant: {answer}"
    shared = [user(q), assistant(good), user(follow)]
    assert C.row_parts(two, "x", "pref") == (shared, [[assistant(answer)], [assistant("I am not sure.")]])
    assert C.row_texts(two, chat_tokenizer, "x", "pref") == (chat(shared), answer, "I am not sure.")
    assert C.row_texts(two, chat_tokenizer, "x", "sft") == (chat(shared), answer)  # SFT data: the chosen conversation


def test_trl_explicit_conversational_preference_is_the_same_pair_as_hh(chat_tokenizer):
    """trl-lib/hh-rlhf-helpful-base holds Anthropic's helpful-base pairs as prompt + one-message replies: every row
    gives the same parts and texts as the HH transcript it came from."""
    for split in ("train", "test"):
        for trl, hh in zip(P.rows(TRL_HH, split), P.rows(HH, split, "helpful-base"), strict=True):
            assert list(trl) == ["chosen", "rejected", "prompt"]
            assert C.row_parts(trl, "x", "pref") == (trl["prompt"], [trl["chosen"], trl["rejected"]]) == C.row_parts(hh, "x", "pref")
            assert C.row_texts(trl, chat_tokenizer, "x", "pref") == C.row_texts(hh, chat_tokenizer, "x", "pref")
            assert C.row_texts(trl, chat_tokenizer, "x", "sft") == (chat(trl["prompt"]), trl["chosen"][0]["content"])


def test_tldr_strings(chat_tokenizer):
    row = P.rows(TLDR, "train")[0]
    sub, title, post, tldr, weak = P.POSTS[0]
    prompt = f"SUBREDDIT: r/{sub}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    assert C.row_parts(row, "x", "sft") == (prompt, [" " + tldr])
    assert C.row_texts(row, chat_tokenizer, "x", "sft") == (prompt, " " + tldr)  # strings: no template, the space kept
    pref = P.rows(TLDR_PREF, "train")[0]
    assert C.row_texts(pref, chat_tokenizer, "x", "pref") == (prompt, " " + tldr, " " + weak)
    assert C.row_texts(pref, chat_tokenizer, "x", "sft") == (prompt, " " + tldr)


def test_capybara_messages(chat_tokenizer):
    row = P.rows(CAPY, "train")[1]
    assert set(row) == {"source", "messages", "num_turns"}
    q, good, _, follow, answer = P.CHATS[1]
    # both assistant turns are trained: the first as the text its message adds to the rendering, the last as the response
    segments = ((f"user : {q} ; assistant : ", False), (f"{good} ; ", True), (f"user : {follow} ; assistant : ", False))
    assert C.row_texts(row, chat_tokenizer, "x", "sft") == (segments, answer)
    assert C.prompt_text(segments) == chat([user(q), assistant(good), user(follow)])
    assert C.row_texts(row, chat_tokenizer, "x", "sft", last_turn_only=True) == (chat([user(q), assistant(good), user(follow)]), answer)


@pytest.mark.parametrize("kind", ["sft", "pref"])
def test_a_row_of_an_unknown_schema_is_one_error_naming_its_columns_and_the_formats(kind):
    row = {"question": Q, "answer": GOOD, "id": 7}
    with pytest.raises(DataError) as err:
        C.row_parts(row, "data.jsonl: row 4", kind)
    message = str(err.value)
    assert message.startswith("data.jsonl: row 4: ") and "\n" not in message
    assert "question, answer, id" in message, message
    for accepted in ("prompt + completion", "messages", "prompt + chosen + rejected", "chosen + rejected conversations"):
        assert accepted in message or (kind == "pref" and accepted in ("prompt + completion", "messages")), (accepted, message)


# ------------------------------------------------------------------------------------------------
# load_data: errors by file, split and row; the report; overlaps; identical pairs
# ------------------------------------------------------------------------------------------------


def cfg_for(**overrides):
    base = dict(eval_size=100, n_sft=0, n_pref=0, max_length=512, max_prompt_length=256, max_new_tokens=4)
    return C.TrainConfig(**{**base, **overrides})


def bad_copy(copies, tmp_path, layout, split, index, change):
    """A copy of ultrachat_200k whose row `index` of `split` is changed; returns (folder, the file or folder
    that holds the row, the row's number there)."""
    folder = tmp_path / layout
    shutil.copytree(copies(UC, layout), folder)
    if layout == "disk":
        saved = datasets.load_from_disk(str(copies(UC, layout)))
        splits = {s: [change(r) if s == split and i == index else r for i, r in enumerate(saved[s])] for s in saved}
        shutil.rmtree(folder)
        datasets.DatasetDict({s: datasets.Dataset.from_list(r, features=P.SPECS[UC]["features"]) for s, r in splits.items()}).save_to_disk(str(folder))
        return folder, folder, index + 1
    offset = 0
    for f in split_files(UC, layout, folder, split):
        rows = pyarrow.parquet.read_table(f).to_pylist() if f.suffix == ".parquet" else [json.loads(line) for line in f.read_text().splitlines()]
        if offset <= index < offset + len(rows):
            rows[index - offset] = change(rows[index - offset])
            if f.suffix == ".parquet":
                datasets.Dataset.from_list(rows, features=P.SPECS[UC]["features"]).to_parquet(str(f))
            else:
                f.write_text("".join(json.dumps(r) + "\n" for r in rows))
            return folder, f, index - offset + 1
        offset += len(rows)
    raise IndexError(index)


def empty_last_message(row):
    return {**row, "messages": row["messages"][:-1] + [{**row["messages"][-1], "content": ""}]}


@pytest.mark.parametrize("layout", ["hub", "jsonl", "disk"])
def test_errors_name_the_file_the_split_and_the_row_as_the_file_numbers_it(copies, tmp_path, chat_tokenizer, layout):
    """Row 6 of train_sft is the second parquet shard's row 3 (hub), train_sft.jsonl's row 6, or row 6 of the
    save_to_disk folder's split train_sft; test_sft's row 2 likewise. Each error names that place and the field."""
    for split, index, flag in (("train_sft", 5, "sft_data"), ("test_sft", 1, "eval_data")):
        folder, holder, row = bad_copy(copies, tmp_path / split, layout, split, index, empty_last_message)
        cfg = cfg_for(sft_data=str(folder), sft_split="train_sft", eval_data=str(folder), eval_split="test_sft")
        with pytest.raises(DataError) as err:
            C.load_data(cfg, chat_tokenizer, need_pref=False)
        message = str(err.value)
        assert "field 'messages': the last message is empty" in message, message
        if layout == "hub" and split == "train_sft":
            assert holder.name == "train_sft-00001-of-00002.parquet" and row == 3
        if layout == "disk":
            assert str(folder) in message and split in message.replace(str(folder), ""), message  # the folder, and the split in it
            assert re.search(rf"\brow {row}\b", message), message
        else:
            assert f"{holder}: row {row}: " in message and split in holder.name, message


@pytest.mark.parametrize("layout", ["hub", "hub-noreadme", "disk", "disk-split", "jsonl"])
def test_load_data_reads_every_layout_and_reports_each_data_set(copies, chat_tokenizer, layout):
    """ultrafeedback_binarized: SFT from train_sft, pairs from train_prefs, evaluation on test_prefs (a
    one-split folder: three copies of it, each holding the split asked for)."""
    folders = {s: copies(UF, layout, s if layout == "disk-split" else None) for s in ("train_sft", "train_prefs", "test_prefs")}
    cfg = cfg_for(sft_data=str(folders["train_sft"]), sft_split="train_sft", pref_data=str(folders["train_prefs"]),
                  pref_split="train_prefs", eval_data=str(folders["test_prefs"]), eval_split="test_prefs", n_pref=4)
    data = C.load_data(cfg, chat_tokenizer)
    report = data["report"]
    for kind, split, n in (("sft", "train_sft", 5), ("pref", "train_prefs", 4), ("test", "test_prefs", 4)):
        assert report[kind]["source"] == str(folders[split]) and report[kind]["split"].startswith(split)
        assert (report[kind]["rows_read"], report[kind]["rows_used"]) == (n, n), kind
        assert report[kind]["sha256"] is not None, kind  # every layout is files: --resume can tell when they change
    assert [e["reference"] for e in data["sft"]] == [reference_by_hand(UF, r) for r in P.rows(UF, "train_sft")]
    assert data["test"] == [{"prompt": chat(prompt_by_hand(UF, r, "sft")), "reference": reference_by_hand(UF, r)} for r in P.rows(UF, "test_prefs")]
    assert [e["prompt"] for e in data["pref"]] == [chat(prompt_by_hand(UF, r, "pref")) for r in P.rows(UF, "train_prefs")[:4]]


def expected_in_training(name_sft, sft_rows, name_pref, pref_rows, name_test, test_rows):
    """Test prompts that are also training prompts, by brute force over the rows' prompts (by hand)."""
    training = {json.dumps(prompt_by_hand(name_sft, r, "sft")) for r in sft_rows} | \
        {json.dumps(prompt_by_hand(name_pref, r, "pref")) for r in pref_rows}
    return len({json.dumps(prompt_by_hand(name_test, r, "sft")) for r in test_rows} & training)


def test_load_data_warns_when_test_prompts_are_training_prompts(copies, chat_tokenizer):
    """ultrafeedback's copy: test_prefs shares two prompts with train_prefs, test_sft four. Evaluating on
    train_prefs itself shares all of them."""
    folder = copies(UF, "hub")
    for eval_split in ("test_prefs", "train_prefs[:3]", "test_sft"):
        cfg = cfg_for(sft_data=str(folder), sft_split="train_sft", pref_data=str(folder), pref_split="train_prefs",
                      eval_data=str(folder), eval_split=eval_split)
        report = C.load_data(cfg, chat_tokenizer)["report"]
        test_rows = C.read_rows(str(folder), eval_split).rows
        shared = expected_in_training(UF, P.rows(UF, "train_sft"), UF, P.rows(UF, "train_prefs"), UF, test_rows)
        assert report["test"]["in_training"] == shared, eval_split
        warnings = [line for line in C.data_lines(report, cfg) if line.startswith("warning:")]
        assert warnings == ([f"warning: {shared} of the {len(test_rows)} test prompts are also training prompts: their scores "
                             f"measure memory, not generalisation"] if shared else []), eval_split
        # by hand: the copy's rows are CHATS[i % 12] with i from 0 (train_prefs, 6 rows), 5 (train_sft, 5), 10 (test_prefs, 4)
        # and 15 (test_sft, 4): training prompts are CHATS 0-9; test_prefs holds 10, 11, 0, 1 and test_sft 3-6
        assert shared == {"test_prefs": 2, "train_prefs[:3]": 3, "test_sft": 4}[eval_split]


def test_identical_pairs_are_skipped_and_counted_and_all_identical_is_refused(tmp_path, chat_tokenizer):
    """Anthropic HH has pairs whose two transcripts are the same text: they teach nothing. Rows 2 and 4 here."""
    rows = P.rows(HH, "train", "helpful-base")
    same = [{**r, "rejected": r["chosen"]} if i in (1, 3) else r for i, r in enumerate(rows)]
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in same)
    sft = P.make_copy(TLDR, "jsonl", tmp_path)
    cfg = cfg_for(sft_data=str(sft), pref_data=str(path), eval_size=2)
    data = C.load_data(cfg, chat_tokenizer)
    pref = data["report"]["pref"]
    assert (pref["rows_read"], pref["rows_used"], pref["identical"], pref["skipped"]) == (5, 3, 2, 0)
    assert [e["prompt"] for e in data["pref"]] == [chat(hh_by_hand(r["chosen"])[:-1]) for i, r in enumerate(rows) if i not in (1, 3)]
    assert any(line.startswith(f"preference data: {path}, split (the whole file): 3 of 5 rows used (2 pairs skipped (chosen == rejected)")
               for line in C.data_lines(data["report"], cfg)), C.data_lines(data["report"], cfg)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows)
    with pytest.raises(DataError, match=re.escape(f"{path}: in every pair chosen and rejected are the same text")):
        C.load_data(cfg, chat_tokenizer)


# ------------------------------------------------------------------------------------------------
# The scripts, one tiny run per format
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny GPT-2 and a byte-level BPE tokenizer (trained on the copies' text) with a chat template, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [" ".join(c) for c in P.CHATS] + [" ".join(p) for p in P.POSTS]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    path = tmp_path_factory.mktemp("chat_model") / "model"
    C.save_model(model, tokenizer, path)
    return path


TINY = ["--n_sft", "8", "--n_pref", "8", "--eval_size", "2", "--sft_epochs", "1", "--batch_size", "4", "--max_new_tokens", "4",
        "--eval_batch_size", "4", "--max_length", "128", "--max_prompt_length", "96"]
SCRIPT = {"two_stage_baseline.py": (two_stage_baseline, []), "hbat.py": (hbat, ["--rounds", "2"]),
          "ld_align.py": (ld_align, ["--iterations", "1", "--latent_dim", "8", "--sft_first"])}
# (id, script, {kind: (data set, layout, split)}): every format, each through the scripts that train on it
RUNS = [
    ("ultrachat_ld_align", "ld_align.py", {"sft": (UC, "hub", "train_sft"), "test": (UC, "hub", "test_sft")}),
    ("ultrafeedback_two_stage", "two_stage_baseline.py", {"sft": (UF, "hub", "train_sft"), "pref": (UF, "hub", "train_prefs"),
                                                          "test": (UF, "hub", "test_prefs")}),
    ("hh_rlhf_two_stage", "two_stage_baseline.py", {"sft": (HH, "hub", "train"), "pref": (HH, "hub", "train"), "test": (HH, "hub", "test")}),
    ("hh_rlhf_hbat", "hbat.py", {"sft": (HH, "jsonl", "train"), "pref": (HH, "jsonl", "train"), "test": (HH, "jsonl", "test")}),
    ("trl_hh_two_stage", "two_stage_baseline.py", {"sft": (TRL_HH, "hub", "train"), "pref": (TRL_HH, "hub", "train"),
                                                   "test": (TRL_HH, "hub", "test")}),
    ("trl_hh_hbat", "hbat.py", {"sft": (TRL_HH, "jsonl", "train"), "pref": (TRL_HH, "jsonl", "train"), "test": (TRL_HH, "jsonl", "test")}),
    ("tldr_hbat", "hbat.py", {"sft": (TLDR, "hub", "train"), "pref": (TLDR_PREF, "hub", "train"), "test": (TLDR, "hub", "validation")}),
    ("capybara_ld_align", "ld_align.py", {"sft": (CAPY, "hub", "train"), "test": (CAPY, "hub", "test")}),
    # the other tools' formats, in their repositories' own single-file layouts (split train, as load_dataset names it)
    ("slimorca_two_stage", "two_stage_baseline.py", {"sft": (SLIM, "hub", "train"), "pref": (TLDR_PREF, "hub", "train"),
                                                     "test": (DOLLY, "hub", "train")}),
    ("openhermes_hbat", "hbat.py", {"sft": (HERMES, "hub", "train"), "pref": (TRL_HH, "hub", "train"), "test": (ALPACA, "hub", "train")}),
    ("alpaca_ld_align", "ld_align.py", {"sft": (ALPACA, "hub", "train"), "test": (DOLLY, "hub", "train")}),
    ("guanaco_two_stage", "two_stage_baseline.py", {"sft": (GUANACO, "hub", "train"), "pref": (TLDR_PREF, "hub", "train"),
                                                    "test": (SLIM, "hub", "train")}),
    ("dolly_hbat", "hbat.py", {"sft": (DOLLY, "hub", "train"), "pref": (TLDR_PREF, "hub", "validation"), "test": (HERMES, "hub", "train")}),
]


def turns_by_hand(name, row):
    """The assistant turns an SFT row trains."""
    messages = row.get("messages") or (messages_by_hand(name, row) if name in (SLIM, HERMES, ALPACA, DOLLY) else [])
    return sum(m["role"] == "assistant" for m in messages) or 1


@pytest.mark.parametrize("case", RUNS, ids=[r[0] for r in RUNS])
def test_a_tiny_script_run_on_each_public_format(case, copies, chat_model, tmp_path, capsys):
    _, script, sets = case
    module, extra = SCRIPT[script]
    flags = {"sft": "sft", "pref": "pref", "test": "eval"}
    argv = [x for kind, (name, layout, split) in sets.items() for x in (f"--{flags[kind]}_data", str(copies(name, layout)),
                                                                           f"--{flags[kind]}_split", split)]
    out = tmp_path / "run"
    cfg = C.parse_config(module.Config, [*TINY, *extra, *argv, "--model", str(chat_model), "--output_dir", str(out)])
    capsys.readouterr()
    module.main(cfg)
    stdout = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())["data"]
    assert set(report) == set(sets)
    rows = {}
    for kind, (name, layout, split) in sets.items():
        limit = {"sft": 8, "pref": 8, "test": 2}[kind]
        rows[kind] = P.rows(name, split)[:limit]
        r = report[kind]
        assert (r["source"], r["split"], r["rows_read"], r["rows_used"]) == (str(copies(name, layout)), split, len(rows[kind]), len(rows[kind]))
        if kind != "test":
            assert (r["skipped"], r["identical"]) == (0, 0), kind
        label = {"sft": "SFT", "pref": "preference", "test": "test"}[kind]
        assert f"{label} data: {copies(name, layout)}, split {split}: {len(rows[kind])} of {len(rows[kind])} rows used" in stdout
        if kind == "sft":  # every assistant turn of a conversation trained; one response per row of the other formats
            turns = sum(turns_by_hand(name, row) for row in rows[kind])
            assert r["rows_used"] + r["earlier_turns"] == turns
    # evaluation used the test split's rows, in order; its overlap with the training prompts is reported and warned about
    results = json.loads((out / "results.json").read_text())
    test_name = sets["test"][0]
    assert [e["reference"] for e in results["examples"]] == [reference_by_hand(test_name, r) for r in rows["test"]]
    shared = expected_in_training(sets["sft"][0], rows["sft"], sets.get("pref", sets["sft"])[0], rows.get("pref", []), test_name, rows["test"])
    assert report["test"]["in_training"] == shared
    assert (f"warning: {shared} of the 2 test prompts are also training prompts" in stdout) == (shared > 0)
    # and trained on those rows: one SFT (and DPO) step per batch of 4, per shard (HBAT: --rounds 2 shards, sizes within one)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    k = cfg.rounds if script == "hbat.py" else 1
    steps = lambda n: sum(-(-(n // k + (i < n % k)) // 4) for i in range(k))  # noqa: E731
    assert sum("loss/sft" in r for r in logged) == steps(len(rows["sft"]))
    if "pref" in sets:
        assert sum("loss/dpo" in r for r in logged) == steps(len(rows["pref"]))
    assert (out / "final").is_dir()


# ------------------------------------------------------------------------------------------------
# Multi-turn conversations with a real (ChatML) template: every assistant turn carries the loss
# ------------------------------------------------------------------------------------------------

SYSTEM = "You are a careful gardener."


def conversations():
    """Rows of 2, 3 and 4 assistant turns, with and without a system turn (or a system column), from P.CHATS."""
    first = [[user(q), assistant(good)] for q, good, _, _, _ in P.CHATS]
    follow = [[user(f), assistant(fa)] for _, _, _, f, fa in P.CHATS]  # (the short exchanges: every row fits 256 positions)
    return [{"messages": first[0] + follow[0]},                                                         # 2 turns
            {"messages": [{"role": "system", "content": SYSTEM}, *first[1], *follow[1], *follow[2]]},  # 3, a system turn
            {"system": SYSTEM, "messages": [*follow[0], *follow[2], *follow[3], *follow[10]]}]           # 4, a system column


def test_every_assistant_turn_of_a_chatml_conversation_carries_the_loss(chat_model, tmp_path):
    import torch

    model, tok = C.load_model_and_tokenizer(str(chat_model))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    got = C.read_rows(str(path))
    examples, counts = C.tokenize_sft(got.rows, tok, 256, 128, where=got.where)
    assert counts["earlier_turns"] == 1 + 2 + 3
    for row, e in zip(got.rows, examples):
        messages = row["messages"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # the labelled runs, turn by turn: each earlier answer with its "<|im_end|>\n", the last with EOS
        runs, run = [], []
        for token, label in zip(e["input_ids"], e["labels"]):
            if label != C.IGNORE_INDEX:
                run.append(token)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        expected = [tok(a + "<|im_end|>\n", add_special_tokens=False).input_ids for a in answers[:-1]]
        expected.append(tok(answers[-1], add_special_tokens=False).input_ids + [tok.eos_token_id])
        assert runs == expected
        # no system or user text carries the loss; all of it is in the input
        trained = tok.decode([t for t, label in zip(e["input_ids"], e["labels"]) if label != C.IGNORE_INDEX])
        context = tok.decode([t for t, label in zip(e["input_ids"], e["labels"]) if label == C.IGNORE_INDEX])
        for m in ([{"role": "system", "content": SYSTEM}] if "system" in row else []) + messages:
            assert (m["content"] in trained) == (m["role"] == "assistant") and (m["content"] in context) == (m["role"] != "assistant")
        # the SFT loss equals a brute-force mean over the assistant turns' tokens, found by searching the input for each run
        positions, start = [], 0
        for run in expected:
            at = next(i for i in range(start, len(e["input_ids"])) if e["input_ids"][i:i + len(run)] == run)
            positions, start = positions + list(range(at, at + len(run))), at + len(run)
        with torch.no_grad():
            logits = model(torch.tensor([e["input_ids"]])).logits[0].float()
        brute = -sum(torch.log_softmax(logits[t - 1], -1)[e["input_ids"][t]] for t in positions) / len(positions)
        loss = C.sft_backward(model, [[e]], [e], device=torch.device("cpu"), dtype=torch.float32)
        assert loss.item() == pytest.approx(brute.item(), rel=1e-5)


def test_show_examples_marks_every_assistant_turn_and_touches_no_folder(chat_model, tmp_path):
    import subprocess
    import sys

    from conftest import script_env

    sft, pref = tmp_path / "chat.jsonl", tmp_path / "pref.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    q, good, weak, _, _ = P.CHATS[5]
    pref.write_text(json.dumps({"system": SYSTEM, "prompt": q, "chosen": good, "rejected": weak}) + "\n")
    out = tmp_path / "earlier_run"
    out.mkdir()
    (out / "results.json").write_text("{}")  # another run's files: --show_examples neither refuses nor touches them
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    proc = subprocess.run([sys.executable, "two_stage_baseline.py", "--model", str(chat_model), "--sft_data", str(sft), "--pref_data",
                           str(pref), "--eval_size", "1", "--max_length", "256", "--max_prompt_length", "128", "--show_examples", "1",
                           "--output_dir", str(out)], cwd=C.Path(C.__file__).parent, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert "SFT example 1 of 2:" in proc.stdout and "SFT example 2" not in proc.stdout  # (the last row is held out for tests)
    sft_text = proc.stdout.split("SFT example 1 of 2:\n")[1].split("preference pair")[0]
    trained = re.findall(r"\[\[(.*?)\]\]", sft_text, re.S)
    assert trained == [m["content"] + "<|im_end|>\n" for m in conversations()[0]["messages"][1:-1:2]] + \
        [conversations()[0]["messages"][-1]["content"] + "<|im_end|>"]
    for side, answer in (("chosen", good), ("rejected", weak)):  # the system column is in the prompt, untrained
        text = proc.stdout.split(f"preference pair 1 of 1, {side}:\n")[1]
        assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
        assert re.findall(r"\[\[(.*?)\]\]", text.split("preference pair")[0], re.S) == [answer + "<|im_end|>"]


# ------------------------------------------------------------------------------------------------
# A repository of several configs (smoltalk): one config at a time, never every config's rows at once
# ------------------------------------------------------------------------------------------------

SMOL = "HuggingFaceTB/smoltalk"


def test_smoltalk_is_read_one_config_at_a_time_and_without_its_readme_never_twice(copies):
    folder = copies(SMOL, "hub")
    for config in ("all", "smol-magpie-ultra", "smol-rewrite"):
        for split in ("train", "test"):
            got = C.read_rows(str(folder), split, config=config)
            assert got.rows == P.rows(SMOL, split, config) and got.repeated == 0, (config, split)
            assert got.files == [folder / "data" / config / f"{split}-00000-of-00001.parquet"]
    assert len(P.rows(SMOL, "train", "all")) == 6 and len({json.dumps(r) for r in P.rows(SMOL, "train", "all")}) == 6
    with pytest.raises(C.ConfigError, match="--sft_config \\(none\\): .* has the configs all, smol-magpie-ultra, smol-rewrite"):
        C.read_rows(str(folder), "train")
    bare = copies(SMOL, "hub-noreadme")  # datasets would read data/*/train-* as one split: each row twice
    got = C.read_rows(str(bare), "train")
    assert sorted(map(json.dumps, got.rows)) == sorted(map(json.dumps, P.rows(SMOL, "train", "all"))) and got.repeated == 6


def test_a_tiny_run_on_a_config_of_smoltalk(copies, chat_model, tmp_path, capsys):
    folder, out = copies(SMOL, "hub"), tmp_path / "run"
    cfg = C.parse_config(two_stage_baseline.Config, [*TINY, "--sft_data", str(folder), "--sft_config", "smol-rewrite", "--eval_data", str(folder),
                                                     "--eval_config", "all", "--pref_data", str(copies(TLDR_PREF, "hub")),
                                                     "--model", str(chat_model), "--output_dir", str(out)])
    two_stage_baseline.main(cfg)
    report = json.loads((out / "results.json").read_text())["data"]
    rows = P.rows(SMOL, "train", "smol-rewrite")
    turns = sum(m["role"] == "assistant" for r in rows for m in r["messages"])
    assert (report["sft"]["rows_read"], report["sft"]["rows_used"], report["sft"]["rows_used"] + report["sft"]["earlier_turns"]) == (3, 3, turns)
    assert (report["test"]["split"], report["test"]["rows_used"]) == ("test", 2)
    assert json.loads((out / "results.json").read_text())["config"]["sft_config"] == "smol-rewrite"
    assert "SFT data: " + str(folder) + ", split train: 3 of 3 rows used" in capsys.readouterr().out
