"""Tokenization (labels, EOS, padding, truncation) and data validation (files, rows, fields, chat rows).

Expected token ids are built from the tiny tokenizer's vocabulary by hand (word -> id), not with the
implementation's encode helpers.
"""
import dataclasses
import hashlib
import json
import re
from types import SimpleNamespace

import pytest

import common
from common import IGNORE_INDEX, DataError

PROMPT = "summarize : alice found the car in the park . :"
RESPONSE = "alice found car"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


def ids_of(tokenizer, text):
    """Ids of a whitespace-separated text, looked up word by word in the vocabulary."""
    return tokenizer.convert_tokens_to_ids(text.split())


def assert_names(message, path, row=None, field=None):
    assert str(path) in message, message
    if row is not None:
        assert re.search(rf"\brow {row}\b", message), message
    if field is not None:
        assert f"'{field}'" in message, message


def write(path, rows, fmt=None):
    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        raise ValueError(fmt)
    return path


def numbered(source):
    """where(i) for rows that come from no file: "<source>: row i+1"."""
    return lambda i: f"{source}: row {i + 1}"


def tokenize_file(path, tok, kind):
    """read_rows, then tokenize_sft / tokenize_pref with the file's own row numbering."""
    got = common.read_rows(str(path))
    return (common.tokenize_sft if kind == "sft" else common.tokenize_pref)(got.rows, tok, 64, 48, where=got.where)


def make_cfg(**overrides):
    base = dict(eval_size=2, max_length=64, max_prompt_length=48, seed=0, eval_data="")
    base.update(overrides)
    return dataclasses.replace(common.TrainConfig(), **base)


SFT_ROWS = [
    {"prompt": "summarize : alice found the car in the park . :", "completion": "alice found car"},
    {"prompt": "summarize : bob sold the lamp in the market . nothing else happened . :", "completion": "bob sold lamp"},
    {"prompt": "summarize : carol fixed the door in the school . :", "completion": "carol fixed door and dave lost book"},
    {"prompt": "summarize : dave lost the book in the office . :", "completion": "dave lost book"},
    {"prompt": "summarize : erin moved the boat in the harbor . :", "completion": "erin moved boat"},
]
PREF_ROWS = [
    {"prompt": "summarize : alice found the car in the park . :", "chosen": "alice found car", "rejected": "alice lost lamp ; the weather"},
    {"prompt": "summarize : bob sold the lamp in the market . :", "chosen": "bob sold lamp and carol fixed door", "rejected": "bob"},
    {"prompt": "summarize : carol fixed the door in the school . :", "chosen": "carol fixed door", "rejected": "carol fixed car"},
]


# ------------------------------------------------------------------------------------------------
# tokenization
# ------------------------------------------------------------------------------------------------


def test_tokenize_sft_labels_prompt_ignored_response_and_eos_labelled(tiny):
    _, tok = tiny
    examples, counts = common.tokenize_sft([{"prompt": PROMPT, "completion": RESPONSE}], tok, 64, 48)
    assert counts["skipped"] == 0 and len(examples) == 1
    p, r = ids_of(tok, PROMPT), ids_of(tok, RESPONSE)
    assert tok.unk_token_id not in p + r
    e = examples[0]
    assert e["input_ids"] == p + r + [tok.eos_token_id]
    assert e["labels"] == [IGNORE_INDEX] * len(p) + r + [tok.eos_token_id]
    assert (e["prompt"], e["reference"]) == (PROMPT, RESPONSE)


def test_tokenize_pref_shares_prompt_and_labels_both_responses(tiny):
    _, tok = tiny
    row = {"prompt": PROMPT, "chosen": "alice found car and bob sold lamp", "rejected": "the weather was calm ."}
    examples, counts = common.tokenize_pref([row], tok, 64, 48)
    assert (counts["prompt_cut"], counts["response_cut"], counts["skipped"]) == (0, 0, 0)
    e = examples[0]
    p = ids_of(tok, PROMPT)
    assert e["prompt_ids"] == p and e["prompt"] == PROMPT
    for key in ("chosen", "rejected"):
        r = ids_of(tok, row[key]) + [tok.eos_token_id]
        assert e[key]["input_ids"] == p + r
        assert e[key]["labels"] == [IGNORE_INDEX] * len(p) + r


def test_collate_right_pads_and_ignores_padding_labels(tiny):
    _, tok = tiny
    examples, _ = common.tokenize_sft(SFT_ROWS[:2], tok, 64, 48)
    batch = common.collate(examples, tok.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        assert batch["input_ids"][i, :n].tolist() == e["input_ids"]
        assert batch["labels"][i, :n].tolist() == e["labels"]
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert lengths[0] != lengths[1]  # some padding happened


def test_pad_equal_to_eos_keeps_eos_label(tiny):
    _, tok = tiny
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    sft, _ = common.tokenize_sft(SFT_ROWS[:3], tok, 64, 48)
    pref, _ = common.tokenize_pref(PREF_ROWS[:2], tok, 64, 48)
    for batch, seqs in ((common.collate(sft, tok.pad_token_id), sft),
                        (common.collate_pairs(pref, tok.pad_token_id),
                         [p["chosen"] for p in pref] + [p["rejected"] for p in pref])):
        width = batch["input_ids"].shape[1]
        for i, s in enumerate(seqs):
            n = len(s["input_ids"])
            labels = batch["labels"][i].tolist()
            assert labels[n - 1] == eos  # the real EOS is still a label
            assert labels.count(eos) == 1  # ... and the only EOS label, although padding is EOS too
            assert labels[n:] == [IGNORE_INDEX] * (width - n)
            assert batch["input_ids"][i, n:].tolist() == [eos] * (width - n)
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"] == eos).sum() > len(seqs)  # padding really used the EOS id


def test_tokenizer_without_pad_token_gets_eos_as_pad(tiny, tmp_path):
    model, tok = tiny
    tok.pad_token = None
    assert tok.pad_token_id is None
    common.save_model(model, tok, tmp_path)
    model2, tok2 = common.load_model_and_tokenizer(str(tmp_path))
    assert tok2.pad_token_id == tok2.eos_token_id == tok.eos_token_id
    assert model2.config.pad_token_id == tok2.eos_token_id


# ------------------------------------------------------------------------------------------------
# truncation
# ------------------------------------------------------------------------------------------------


def test_truncate_fits_unchanged():
    prompt, response = list(range(1, 6)), [20, 21, 22]
    assert common.truncate(prompt, [response], 8, 4) == (prompt, [response])


def test_truncate_prompt_loses_left_side_first():
    prompt, response = list(range(1, 11)), [20, 21]  # 10 + 2 > 8
    got_prompt, (got_response,) = common.truncate(prompt, [response], 8, 6)
    assert got_prompt == [5, 6, 7, 8, 9, 10]  # the last 6 prompt tokens
    assert got_response == [20, 21]  # untouched: it fits after the prompt was cut


def test_truncate_response_then_loses_right_side():
    prompt, response = list(range(1, 11)), list(range(20, 26))  # 10 + 6 > 12
    got_prompt, (got_response,) = common.truncate(prompt, [response], 12, 8)
    assert got_prompt == list(range(3, 11))
    assert got_response == [20, 21, 22, 23]  # its first 12 - 8 tokens
    # a prompt already shorter than max_prompt_length is kept whole; the response is cut to fit
    got_prompt, (got_response,) = common.truncate([1, 2, 3], [list(range(20, 35))], 10, 5)
    assert got_prompt == [1, 2, 3] and got_response == list(range(20, 27))


def test_truncate_pairs_cut_both_responses_to_the_same_budget():
    prompt, chosen, rejected = list(range(1, 9)), list(range(20, 27)), [30, 31]
    got_prompt, (got_chosen, got_rejected) = common.truncate(prompt, [chosen, rejected], 9, 5)
    assert got_prompt == [4, 5, 6, 7, 8]
    assert got_chosen == [20, 21, 22, 23]
    assert got_rejected == [30, 31]


def test_truncate_returns_none_when_no_response_token_fits():
    assert common.truncate(list(range(10)), [[20, 21]], 5, 5) is None
    assert common.truncate(list(range(10)), [[20, 21], [30]], 6, 6) is None


def test_truncate_cuts_prompt_only_as_needed_with_floor_and_bos():
    # only as much as needed: 10 + 4 > 13, so the prompt keeps its last 13 - 4 = 9 tokens (not 5)
    prompt, response = list(range(1, 11)), [20, 21, 22, 23]
    assert common.truncate(prompt, [response], 13, 5) == (list(range(2, 11)), [response])
    # the floor applies: 13 - 10 = 3 < 6, so the prompt keeps 6 and the response loses its right side
    got_prompt, (got_response,) = common.truncate(prompt, [list(range(20, 30))], 13, 6)
    assert got_prompt == list(range(5, 11)) and got_response == list(range(20, 27))
    # a leading BOS survives the cut and counts: 9 - 4 = 5 tokens = BOS + the last 4
    bos = 99
    assert common.truncate([bos] + list(range(1, 10)), [[20, 21, 22, 23]], 9, 3, bos_id=bos) == (
        [bos, 6, 7, 8, 9], [[20, 21, 22, 23]])

    # keep_last: BOS kept and counted in n; without bos_id (or without a leading BOS) a plain cut
    ids = [bos] + list(range(1, 10))
    assert common.keep_last(ids, 5, bos_id=bos) == [bos, 6, 7, 8, 9]
    assert common.keep_last(ids, 1, bos_id=bos) == [bos]
    assert common.keep_last(ids, 5) == [5, 6, 7, 8, 9]
    assert common.keep_last(list(range(1, 10)), 5, bos_id=bos) == [5, 6, 7, 8, 9]
    assert common.keep_last(ids, 10, bos_id=bos) == ids and common.keep_last(ids, 0, bos_id=bos) == []

    # generation_prompt: room for max_new_tokens by the same rule (tiny tokenizer: no BOS)
    tok = common.build_tiny_tokenizer()
    text = "summarize : alice found the car in the park . summary :"  # 12 words
    words = ids_of(tok, text)
    def gen(max_length, max_prompt_length, max_new_tokens):
        cfg = SimpleNamespace(max_length=max_length, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens)
        return common.generation_prompt(tok, text, cfg)
    assert gen(16, 4, 6) == words[-10:]  # max(16 - 6, 4) = 10
    assert gen(16, 5, 14) == words[-5:]  # floor: max(16 - 14, 5) = 5
    assert gen(20, 4, 8) == words  # 12 <= 20 - 8: whole


def test_tokenize_counts_skipped_rows(tiny):
    _, tok = tiny
    long_prompt = "summarize : " + " ".join(["the weather was calm ."] * 6) + " :"
    rows = [SFT_ROWS[0], {"prompt": long_prompt, "completion": "alice found car"}, SFT_ROWS[1]]
    # max_prompt_length == max_length (check_config refuses it; truncate still guards): no room for a response
    examples, counts = common.tokenize_sft(rows, tok, 20, 20)
    assert counts == {"prompt_cut": 0, "response_cut": 0, "skipped": 1, "identical": 0, "earlier_turns": 0}
    assert [e["prompt"] for e in examples] == [SFT_ROWS[0]["prompt"], SFT_ROWS[1]["prompt"]]
    pref_rows = [PREF_ROWS[0], {"prompt": long_prompt, "chosen": "a", "rejected": "bob"}]
    examples, counts = common.tokenize_pref(pref_rows, tok, 20, 20)
    assert counts["skipped"] == 1 and len(examples) == 1


def test_tokenize_counts_cut_prompts_and_responses_by_hand(tiny):
    """max_length 14, max_prompt_length 8. Word counts: prompt + response (+ EOS)."""
    _, tok = tiny
    rows = [{"prompt": "summarize : alice found the car in the park . :", "completion": "alice found car"},  # 11 + 4: prompt cut to 10
            {"prompt": "summarize : bob sold it . :", "completion": "bob sold lamp ; carol fixed door ; dave lost book"},  # 7 + 12: response cut to 7
            {"prompt": "summarize : a . :", "completion": "alice found car"}]  # 5 + 4: fits
    examples, counts = common.tokenize_sft(rows, tok, 14, 8)
    assert counts == {"prompt_cut": 1, "response_cut": 1, "skipped": 0, "identical": 0, "earlier_turns": 0}
    assert [len(e["input_ids"]) for e in examples] == [14, 14, 9]
    assert examples[1]["input_ids"][-1] != tok.eos_token_id  # the cut response lost its EOS
    pref = [{"prompt": rows[1]["prompt"], "chosen": "bob sold lamp", "rejected": rows[1]["completion"]}]  # only rejected is cut
    assert common.tokenize_pref(pref, tok, 14, 8)[1] == {"prompt_cut": 0, "response_cut": 1, "skipped": 0, "identical": 0, "earlier_turns": 0}


def test_load_data_reports_truncation_per_data_set(tiny, tmp_path):
    _, tok = tiny
    sft = write(tmp_path / "sft.jsonl", SFT_ROWS)
    pref = write(tmp_path / "pref.jsonl", PREF_ROWS)
    cfg = make_cfg(sft_data=str(sft), pref_data=str(pref), max_length=14, max_prompt_length=8, max_new_tokens=4)
    report = common.load_data(cfg, tok)["report"]
    counts = lambda r: {k: r[k] for k in ("rows_read", "rows_used", "prompt_cut", "response_cut", "skipped", "identical", "earlier_turns")}  # noqa: E731
    # SFT: 5 rows read, rows 1-3 train (2 held out). Prompt + response words (+ EOS): 11 + 4, 15 + 4 and 11 + 8 all
    # exceed 14, so every prompt is cut (down to 10, 10 and the floor of 8); row 3's response then keeps 14 - 8 = 6 of its 8
    assert (report["sft"]["source"], report["sft"]["split"]) == (str(sft), "(the whole file)")
    assert counts(report["sft"]) == {"rows_read": 3, "rows_used": 3, "prompt_cut": 3, "response_cut": 1, "skipped": 0, "identical": 0, "earlier_turns": 0}
    # preference: 11 + max(4, 7), 11 + max(8, 2), 11 + max(4, 4) words: prompts cut to max(14 - 7, 8) = 8, 8 and 14 - 4 = 10;
    # then 14 - 8 = 6 tokens are left for the responses: rows 1 (rejected, 7) and 2 (chosen, 8) lose their right side
    assert counts(report["pref"]) == {"rows_read": 3, "rows_used": 3, "prompt_cut": 3, "response_cut": 2, "skipped": 0, "identical": 0, "earlier_turns": 0}
    # test: the 2 held-out rows; both prompts (11 words) exceed max(14 - 4, 8) = 10 tokens of room; neither is a training prompt
    assert report["test"]["source"] == f"{sft} (its last 2 rows)"
    assert (report["test"]["rows_read"], report["test"]["rows_used"], report["test"]["prompt_cut"], report["test"]["in_training"]) == (2, 2, 2, 0)
    for kind, path in (("sft", sft), ("pref", pref)):  # the sha256 that --resume compares: the file's name and bytes
        assert report[kind]["sha256"] == hashlib.sha256(path.name.encode() + b"\0" + path.read_bytes()).hexdigest()
    lines = common.data_lines(report, cfg)
    assert len(lines) == 3 and not any("warning" in line for line in lines)
    assert lines[0].startswith(f"SFT data: {sft}, split (the whole file): 3 of 3 rows used (") and "3 prompts cut from the left" in lines[0] \
        and "1 responses cut from the right" in lines[0] and "--max_length 14" in lines[0], lines[0]
    assert lines[1].startswith(f"preference data: {pref}, split (the whole file): 3 of 3 rows used (") and "2 responses cut" in lines[1], lines[1]
    assert "2 prompts cut from the left" in lines[2], lines[2]


def test_tokenize_truncates_long_prompt_from_the_left(tiny):
    _, tok = tiny
    row = {"prompt": "summarize : the weather was calm . alice found the car in the park . :", "completion": "alice found car"}
    examples, counts = common.tokenize_sft([row], tok, 12, 8)
    assert counts == {"prompt_cut": 1, "response_cut": 0, "skipped": 0, "identical": 0, "earlier_turns": 0}
    e = examples[0]
    prompt_ids = ids_of(tok, row["prompt"])
    response_ids = ids_of(tok, "alice found car") + [tok.eos_token_id]
    assert e["input_ids"] == prompt_ids[-8:] + response_ids
    assert e["labels"] == [IGNORE_INDEX] * 8 + response_ids


# ------------------------------------------------------------------------------------------------
# reading files and validating rows
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_missing_file(tmp_path, suffix):
    path = tmp_path / f"nothing{suffix}"
    with pytest.raises(DataError) as err:
        common.read_rows(str(path))
    assert_names(str(err.value), path)
    assert "not found" in str(err.value)


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SFT_ROWS[0]) + "\n" + json.dumps(SFT_ROWS[1]) + "\n" + '{"prompt": "x", "completion": \n')
    with pytest.raises(DataError) as err:
        common.read_rows(str(path))
    assert_names(str(err.value), path, row=3)
    assert "JSON" in str(err.value)


def test_jsonl_rows_are_counted_without_blank_lines(tiny, tmp_path):
    """Row N is the N-th non-blank line in every message; a JSON error also gives the line number."""
    _, tok = tiny
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(SFT_ROWS[0]) + "\n\n" + json.dumps(SFT_ROWS[1]) + "\n" + "{oops\n")
    with pytest.raises(DataError) as err:
        common.read_rows(str(path))
    assert_names(str(err.value), path, row=3)
    assert re.search(r"\bline 4\b", str(err.value)), str(err.value)
    path.write_text(json.dumps(SFT_ROWS[0]) + "\n\n" + json.dumps({"prompt": PROMPT}) + "\n")
    got = common.read_rows(str(path))
    assert got.rows == [SFT_ROWS[0], {"prompt": PROMPT}]
    assert [got.where(i) for i in range(2)] == [f"{path}: row 1", f"{path}: row 2"]
    with pytest.raises(DataError) as err:
        common.tokenize_sft(got.rows, tok, 64, 48, where=got.where)
    assert_names(str(err.value), path, row=2, field="completion")


def test_invalid_json_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}\n]')
    with pytest.raises(DataError) as err:
        common.read_rows(str(path))
    assert_names(str(err.value), path)
    assert re.search(r"\bline 3\b", str(err.value)), str(err.value)


def test_json_file_must_hold_rows(tmp_path):
    """A JSON list of rows, or JSON Lines: one object alone is one row (Dataset.to_json writes one row so); a number or a
    string is refused, naming the file."""
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}))
    assert common.read_rows(str(path)).rows == [{"prompt": "a", "completion": "b"}]
    path.write_text(json.dumps("a string"))
    with pytest.raises(DataError) as err:
        common.read_rows(str(path))
    assert_names(str(err.value), path)
    assert "expected a JSON list of row objects, got str" in str(err.value)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_missing_column_names_file_row_and_field(tiny, tmp_path, fmt):
    _, tok = tiny
    rows = [dict(SFT_ROWS[0]), {"prompt": SFT_ROWS[1]["prompt"], "response": "bob sold lamp"}]
    if fmt == "parquet":  # one schema per file: every row has the misnamed column
        rows = [{"prompt": r["prompt"], "response": "alice found car"} for r in SFT_ROWS[:2]]
    path = write(tmp_path / f"sft.{fmt}", rows)
    with pytest.raises(DataError) as err:
        tokenize_file(path, tok, "sft")
    assert_names(str(err.value), path, row=1 if fmt == "parquet" else 2, field="completion")
    assert "missing" in str(err.value)


@pytest.mark.parametrize("bad,field", [({"prompt": "   ", "completion": "alice found car"}, "prompt"),
                                       ({"prompt": "", "completion": "alice found car"}, "prompt"),
                                       ({"prompt": PROMPT, "completion": ""}, "completion"),
                                       ({"prompt": PROMPT, "completion": None}, "completion")])
def test_empty_field_names_file_row_and_field(tiny, tmp_path, bad, field):
    _, tok = tiny
    path = write(tmp_path / "sft.jsonl", [SFT_ROWS[0], SFT_ROWS[1], bad])
    with pytest.raises(DataError) as err:
        tokenize_file(path, tok, "sft")
    assert_names(str(err.value), path, row=3, field=field)


@pytest.mark.parametrize("bad,field,type_name", [({"prompt": 5, "completion": "alice found car"}, "prompt", "int"),
                                                 ({"prompt": PROMPT, "completion": ["alice"]}, "completion", "list"),
                                                 ({"prompt": PROMPT, "completion": {"text": "a"}}, "completion", "dict")])
def test_wrong_type_names_file_row_field_and_type(tiny, tmp_path, bad, field, type_name):
    _, tok = tiny
    path = write(tmp_path / "sft.json", [SFT_ROWS[0], bad])
    with pytest.raises(DataError) as err:
        tokenize_file(path, tok, "sft")
    assert_names(str(err.value), path, row=2, field=field)
    assert type_name in str(err.value)


def test_row_that_is_not_an_object(tiny, tmp_path):
    _, tok = tiny
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(SFT_ROWS[0]) + "\n" + json.dumps(["a", "b"]) + "\n")
    with pytest.raises(DataError) as err:
        tokenize_file(path, tok, "sft")
    assert_names(str(err.value), path, row=2)


def test_pref_missing_or_bad_fields(tiny, tmp_path):
    _, tok = tiny
    cases = [({"prompt": PROMPT, "chosen": "alice found car"}, "rejected"),
             ({"prompt": PROMPT, "chosen": 3.5, "rejected": "bob"}, "chosen"),
             ({"chosen": "alice found car", "rejected": "bob"}, "prompt")]  # strings need an explicit prompt
    for bad, field in cases:
        path = write(tmp_path / "pref.jsonl", [PREF_ROWS[0], PREF_ROWS[1], bad])
        with pytest.raises(DataError) as err:
            tokenize_file(path, tok, "pref")
        assert_names(str(err.value), path, row=3, field=field)


def test_mixed_plain_and_chat_fields_are_rejected(tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    row = {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "alice found car"}]}
    with pytest.raises(DataError) as err:
        common.tokenize_sft([row], tok, 64, 48, where=numbered("mixed.jsonl"))
    assert_names(str(err.value), "mixed.jsonl", row=1, field="completion")


# ------------------------------------------------------------------------------------------------
# chat rows
# ------------------------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "summarize : alice found the car in the park ."},
        {"role": "assistant", "content": "alice found car"}]


def test_chat_messages_rows_use_the_chat_template(tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    expected_prompt = "user : summarize : alice found the car in the park . ; assistant : "
    assert common.row_texts({"messages": CHAT}, tok, "x", "sft") == (expected_prompt, "alice found car")
    examples, counts = common.tokenize_sft([{"messages": CHAT}], tok, 64, 48, where=numbered("chat.jsonl"))
    assert (counts["prompt_cut"], counts["response_cut"], counts["skipped"]) == (0, 0, 0)
    p = tok(expected_prompt, add_special_tokens=False).input_ids
    r = ids_of(tok, "alice found car") + [tok.eos_token_id]
    assert examples[0]["input_ids"] == p + r
    assert examples[0]["labels"] == [IGNORE_INDEX] * len(p) + r
    # prompt/completion given as message lists work the same way
    row = {"prompt": CHAT[:1], "completion": CHAT[1:]}
    assert common.tokenize_sft([row], tok, 64, 48)[0][0]["input_ids"] == p + r


# a 3-turn conversation with a system turn: every assistant turn is trained; system and user turns and the template's
# markup before each assistant turn are not
CONVERSATION = [{"role": "system", "content": "be brief ."},
                {"role": "user", "content": "summarize : bob sold the lamp in the market ."},
                {"role": "assistant", "content": "bob sold lamp"},
                {"role": "user", "content": "summarize : alice found the car in the park ."},
                {"role": "assistant", "content": "alice found car"},
                {"role": "user", "content": "and the weather ?"},
                {"role": "assistant", "content": "the weather was calm ."}]
# (word, trained) in the order the template renders them: the earlier assistant turns with their " ; "
RENDERED = [*[(w, False) for w in "system : be brief . ; user : summarize : bob sold the lamp in the market . ; assistant :".split()],
            *[(w, True) for w in "bob sold lamp ;".split()],
            *[(w, False) for w in "user : summarize : alice found the car in the park . ; assistant :".split()],
            *[(w, True) for w in "alice found car ;".split()],
            *[(w, False) for w in "user : and the weather ? ; assistant :".split()]]


def test_every_assistant_turn_of_a_conversation_carries_the_loss(tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    examples, counts = common.tokenize_sft([{"messages": CONVERSATION}], tok, 128, 64)
    context = tok.convert_tokens_to_ids([w for w, _ in RENDERED])
    last = ids_of(tok, "the weather was calm .") + [tok.eos_token_id]
    e = examples[0]
    assert e["input_ids"] == context + last and e["prompt_ids"] == context
    assert e["labels"] == [i if trained else IGNORE_INDEX for i, (_, trained) in zip(context, RENDERED)] + last
    assert counts["earlier_turns"] == 2 and e["reference"] == "the weather was calm ."
    assert e["prompt"] == tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    # --last_turn_only: the same tokens, only the last turn labelled (the behaviour before every turn was trained)
    examples, counts = common.tokenize_sft([{"messages": CONVERSATION}], tok, 128, 64, last_turn_only=True)
    assert examples[0]["input_ids"] == context + last and counts["earlier_turns"] == 0
    assert examples[0]["labels"] == [IGNORE_INDEX] * len(context) + last


def test_a_cut_conversation_keeps_the_labels_of_the_tokens_it_keeps(tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    context = tok.convert_tokens_to_ids([w for w, _ in RENDERED])
    last = ids_of(tok, "the weather was calm .") + [tok.eos_token_id]
    keep = 30 - len(last)  # max_length 30: the prompt loses its left side (no BOS in this tokenizer's prompts)
    assert tok("a").input_ids[:1] != [tok.bos_token_id] and len(context) > keep
    examples, counts = common.tokenize_sft([{"messages": CONVERSATION}], tok, 30, 8)
    labels = [i if trained else IGNORE_INDEX for i, (_, trained) in zip(context, RENDERED)][-keep:]
    assert examples[0]["input_ids"] == context[-keep:] + last and examples[0]["labels"] == labels + last
    assert counts["prompt_cut"] == 1 and counts["earlier_turns"] == 1  # the first assistant turn was cut away, the second kept
    assert common.kept_labels([IGNORE_INDEX, 5, 6, 7], [1, 5, 6, 7], [1, 7], bos_id=1) == [IGNORE_INDEX, 7]  # a kept BOS


def test_conversation_turn_counts_reach_the_data_report(tmp_path, tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    sft = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3 + [{"messages": CHAT}] * 2)
    cfg = make_cfg(sft_data=str(sft), pref_data=str(write(tmp_path / "p.jsonl", PREF_ROWS)), max_length=128)
    data = common.load_data(cfg, tok)
    assert data["report"]["sft"]["earlier_turns"] == 6 and data["report"]["sft"]["rows_used"] == 3  # (2 rows held out)
    assert "3 of 3 rows used; 9 assistant turns trained (6 before a conversation's last)" in common.data_lines(data["report"], cfg)[0]
    assert data["test"][0]["prompt"] == common.render_chat(tok, CHAT[:1], "x", True)


def test_a_template_that_rewrites_earlier_turns_is_refused_unless_last_turn_only(tiny):
    _, tok = tiny
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}{{ m['role'] }} ! {% else %}{{ m['role'] }} : {% endif %}"
                         "{{ m['content'] }} ; {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    with pytest.raises(DataError) as err:
        common.tokenize_sft([SFT_ROWS[0], {"messages": CONVERSATION}], tok, 128, 64, where=numbered("chat.jsonl"))
    assert_names(str(err.value), "chat.jsonl", row=2, field="messages")
    assert "--last_turn_only" in str(err.value)
    examples, _ = common.tokenize_sft([{"messages": CONVERSATION}], tok, 128, 64, last_turn_only=True)
    assert examples[0]["labels"].count(IGNORE_INDEX) == len(examples[0]["prompt_ids"])


def test_a_template_that_raises_names_the_row(tiny):
    _, tok = tiny
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" + TEMPLATE
    with pytest.raises(DataError) as err:
        common.tokenize_sft([{"messages": CHAT}, {"messages": CONVERSATION}], tok, 128, 64, where=numbered("chat.jsonl"))
    assert_names(str(err.value), "chat.jsonl", row=2)
    assert "no system turns" in str(err.value)


def test_a_system_field_reaches_the_chat_template_in_every_format(tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    question, sys_turn = "summarize : alice found the car in the park .", {"role": "system", "content": "be brief ."}
    rendered = f"system : be brief . ; user : {question} ; assistant : "
    # strings (jondurbin/truthy-dpo's layout): the prompt becomes the user turn, each response an assistant turn
    pref = {"system": "be brief .", "prompt": question, "chosen": "alice found car", "rejected": "the weather was calm ."}
    assert common.row_texts(pref, tok, "x", "pref") == (rendered, "alice found car", "the weather was calm .")
    sft = {"system": "be brief .", "prompt": question, "completion": "alice found car"}
    assert common.row_texts(sft, tok, "x", "sft") == (rendered, "alice found car")
    # message lists, a conversation, Anthropic HH strings: the system turn goes first
    assert common.row_texts({"system": "be brief .", "messages": CHAT}, tok, "x", "sft") == (rendered, "alice found car")
    assert common.row_texts({"system": "be brief .", "prompt": CHAT[:1], "completion": CHAT[1:]}, tok, "x", "sft") == (rendered, "alice found car")
    hh = {"system": "be brief .", "chosen": f"\n\nHuman: {question}\n\nAssistant: alice found car",
          "rejected": f"\n\nHuman: {question}\n\nAssistant: the weather was calm ."}
    assert common.row_texts(hh, tok, "x", "pref") == (rendered, "alice found car", "the weather was calm .")
    # the same system turn already in the conversation: kept once; an empty or null field adds none
    assert common.row_texts({"system": "be brief .", "messages": [sys_turn, *CHAT]}, tok, "x", "sft") == (rendered, "alice found car")
    for empty in ("", None):
        assert common.row_texts({**sft, "system": empty}, tok, "x", "sft") == (f"user : {question} ; assistant : ", "alice found car")
    # examples tokenize the rendered prompt
    assert common.tokenize_sft([sft], tok, 64, 48)[0][0]["prompt"] == rendered


def test_a_system_field_that_cannot_reach_the_template_is_refused_naming_the_row(tiny):
    _, tok = tiny
    sft = {"system": "be brief .", "prompt": "summarize : alice found the car .", "completion": "alice found car"}
    cases = [(None, sft, "no chat template"),
             (TEMPLATE, {**sft, "system": 3}, "field 'system' must be a string"),
             (TEMPLATE, {"system": "be long .", "messages": [{"role": "system", "content": "be brief ."}, *CHAT]}, "differs"),
             ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + TEMPLATE,
              sft, "System role not supported")]
    for template, row, says in cases:
        tok.chat_template = template
        with pytest.raises(DataError) as err:
            common.tokenize_sft([SFT_ROWS[0], row], tok, 64, 48, where=numbered("sys.jsonl"))
        assert_names(str(err.value), "sys.jsonl", row=2)
        assert says in str(err.value) and "system" in str(err.value).lower(), str(err.value)


def test_chat_rows_without_chat_template_fail_clearly(tiny):
    _, tok = tiny
    assert not tok.chat_template
    with pytest.raises(DataError) as err:
        common.tokenize_sft([SFT_ROWS[0], {"messages": CHAT}], tok, 64, 48, where=numbered("chat.jsonl"))
    assert_names(str(err.value), "chat.jsonl", row=2)
    assert "chat template" in str(err.value)


def test_chat_messages_must_end_with_assistant(tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    with pytest.raises(DataError) as err:
        common.tokenize_sft([{"messages": CHAT[:1]}], tok, 64, 48, where=numbered("c.jsonl"))
    assert_names(str(err.value), "c.jsonl", row=1, field="messages")
    with pytest.raises(DataError) as err:
        common.tokenize_sft([{"messages": CHAT[:1] + [{"role": "user", "content": "more"}]}], tok, 64, 48, where=numbered("c.jsonl"))
    assert "must be from the assistant" in str(err.value)
    assert_names(str(err.value), "c.jsonl", row=1, field="messages")
    # a preference row: the message says which of the two responses is wrong
    bad = {"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": [{"role": "user", "content": "more"}]}
    with pytest.raises(DataError) as err:
        common.tokenize_pref([bad], tok, 64, 48, where=numbered("p.jsonl"))
    assert "must be from the assistant" in str(err.value)
    assert_names(str(err.value), "p.jsonl", row=1, field="rejected")


def test_implicit_prompt_preference_rows_are_split(tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    shared = [{"role": "user", "content": "summarize : bob sold the lamp in the market ."},
              {"role": "assistant", "content": "bob sold lamp"},
              {"role": "user", "content": "summarize : alice found the car in the park ."}]
    row = {"chosen": shared + [{"role": "assistant", "content": "alice found car"}],
           "rejected": shared + [{"role": "assistant", "content": "the weather was calm ."}]}
    expected_prompt = ("user : summarize : bob sold the lamp in the market . ; assistant : bob sold lamp ; "
                       "user : summarize : alice found the car in the park . ; assistant : ")
    assert common.row_texts(row, tok, "x", "pref") == (expected_prompt, "alice found car", "the weather was calm .")
    examples, counts = common.tokenize_pref([row], tok, 64, 48, where=numbered("pref.jsonl"))
    assert (counts["prompt_cut"], counts["response_cut"], counts["skipped"]) == (0, 0, 0)
    e = examples[0]
    p = tok(expected_prompt, add_special_tokens=False).input_ids
    assert e["prompt_ids"] == p
    for key, text in (("chosen", "alice found car"), ("rejected", "the weather was calm .")):
        r = ids_of(tok, text) + [tok.eos_token_id]
        assert e[key]["input_ids"] == p + r
        assert e[key]["labels"] == [IGNORE_INDEX] * len(p) + r
    # an explicit conversational prompt gives the same split
    explicit = {"prompt": shared, "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}
    assert common.row_texts(explicit, tok, "x", "pref") == common.row_texts(row, tok, "x", "pref")


def test_implicit_prompt_rows_must_share_all_but_last_turn(tiny):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    row = {"chosen": CHAT, "rejected": [{"role": "user", "content": "something else"}, CHAT[1]]}
    with pytest.raises(DataError) as err:
        common.tokenize_pref([PREF_ROWS[0], row], tok, 64, 48, where=numbered("pref.jsonl"))
    assert_names(str(err.value), "pref.jsonl", row=2, field="chosen")
    assert_names(str(err.value), "pref.jsonl", row=2, field="rejected")
    assert "share every turn but the last" in str(err.value)


# ------------------------------------------------------------------------------------------------
# formats and load_data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [SFT_ROWS, PREF_ROWS, [{"messages": CHAT}, {"messages": CHAT[:1] + [{"role": "assistant", "content": "bob"}]}]],
                         ids=["sft", "pref", "chat"])
def test_json_jsonl_parquet_read_the_same_rows(tmp_path, rows):
    got = {fmt: common.read_rows(str(write(tmp_path / f"data.{fmt}", rows))) for fmt in ("jsonl", "json", "parquet")}
    for fmt, read in got.items():
        assert read.rows == rows, fmt
        assert read.split == "(the whole file)" and read.files == [tmp_path / f"data.{fmt}"]
        assert read.where(len(rows) - 1) == f"{tmp_path / f'data.{fmt}'}: row {len(rows)}"


def test_load_data_same_from_every_format(tiny, tmp_path):
    _, tok = tiny
    results = {}
    for fmt in ("jsonl", "json", "parquet"):
        sft = write(tmp_path / f"sft.{fmt}", SFT_ROWS)
        pref = write(tmp_path / f"pref.{fmt}", PREF_ROWS)
        results[fmt] = common.load_data(make_cfg(sft_data=str(sft), pref_data=str(pref)), tok)
    reports = {fmt: r.pop("report") for fmt, r in results.items()}
    data = results["jsonl"]
    assert results["json"] == data and results["parquet"] == data
    for fmt, report in reports.items():  # the same counts; each names its own file
        for kind, source in (("sft", tmp_path / f"sft.{fmt}"), ("pref", tmp_path / f"pref.{fmt}"), ("test", f"{tmp_path / f'sft.{fmt}'} (its last 2 rows)")):
            assert report[kind]["source"] == str(source)
            assert {k: v for k, v in report[kind].items() if k not in ("source", "sha256")} == \
                {k: v for k, v in reports["jsonl"][kind].items() if k not in ("source", "sha256")}
    assert (reports["jsonl"]["sft"]["rows_read"], reports["jsonl"]["sft"]["rows_used"], reports["jsonl"]["pref"]["rows_used"]) == (3, 3, 3)
    assert not data["builtin"]
    assert [e["prompt"] for e in data["sft"]] == [r["prompt"] for r in SFT_ROWS[:3]]  # last eval_size=2 held out
    assert data["test"] == [{"prompt": r["prompt"], "reference": r["completion"]} for r in SFT_ROWS[3:]]
    assert [e["prompt"] for e in data["pref"]] == [r["prompt"] for r in PREF_ROWS]
    first = data["sft"][0]
    assert first["labels"] == [IGNORE_INDEX] * len(ids_of(tok, SFT_ROWS[0]["prompt"])) + \
        ids_of(tok, SFT_ROWS[0]["completion"]) + [tok.eos_token_id]


def test_load_data_with_eval_file(tiny, tmp_path):
    _, tok = tiny
    sft = write(tmp_path / "sft.jsonl", SFT_ROWS)
    pref = write(tmp_path / "pref.jsonl", PREF_ROWS)
    test = write(tmp_path / "test.jsonl", SFT_ROWS[:1])
    data = common.load_data(make_cfg(sft_data=str(sft), pref_data=str(pref), eval_data=str(test)), tok)
    assert len(data["sft"]) == len(SFT_ROWS)
    assert data["test"] == [{"prompt": SFT_ROWS[0]["prompt"], "reference": SFT_ROWS[0]["completion"]}]


def test_load_data_builtin_task(tiny):
    _, tok = tiny
    data = common.load_data(make_cfg(n_sft=20, n_pref=10, eval_size=5, max_length=128, max_prompt_length=100), tok)
    assert data["builtin"]
    assert (len(data["sft"]), len(data["pref"]), len(data["test"])) == (20, 10, 5)
    for e in data["sft"]:
        assert e["labels"][-1] == tok.eos_token_id and e["input_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_load_data_bad_training_row(tiny, tmp_path, fmt):
    _, tok = tiny
    rows = [dict(r) for r in SFT_ROWS]
    rows[1]["prompt"] = " "  # row 2 of the file, in the training part
    sft = write(tmp_path / f"sft.{fmt}", rows)
    pref = write(tmp_path / f"pref.{fmt}", PREF_ROWS)
    with pytest.raises(DataError) as err:
        common.load_data(make_cfg(sft_data=str(sft), pref_data=str(pref)), tok)
    assert_names(str(err.value), sft, row=2, field="prompt")


def test_load_data_bad_preference_row(tiny, tmp_path):
    _, tok = tiny
    rows = [dict(r) for r in PREF_ROWS]
    rows[2]["rejected"] = ""
    sft = write(tmp_path / "sft.jsonl", SFT_ROWS)
    pref = write(tmp_path / "pref.jsonl", rows)
    with pytest.raises(DataError) as err:
        common.load_data(make_cfg(sft_data=str(sft), pref_data=str(pref)), tok)
    assert_names(str(err.value), pref, row=3, field="rejected")


def test_load_data_bad_held_out_row_names_its_row_in_the_file(tiny, tmp_path):
    """The held-out evaluation rows are the file's last eval_size rows: an error in one of them must
    name its row number in the file (row 5 here), not its position among the held-out rows."""
    _, tok = tiny
    rows = [dict(r) for r in SFT_ROWS]
    rows[4]["completion"] = ""  # file row 5 of 5; eval_size 2 holds out rows 4 and 5
    sft = write(tmp_path / "sft.jsonl", rows)
    pref = write(tmp_path / "pref.jsonl", PREF_ROWS)
    with pytest.raises(DataError) as err:
        common.load_data(make_cfg(sft_data=str(sft), pref_data=str(pref)), tok)
    assert_names(str(err.value), sft, row=5, field="completion")


def test_load_data_too_few_rows_for_eval(tiny, tmp_path):
    _, tok = tiny
    sft = write(tmp_path / "sft.jsonl", SFT_ROWS[:2])
    pref = write(tmp_path / "pref.jsonl", PREF_ROWS)
    with pytest.raises(DataError) as err:
        common.load_data(make_cfg(sft_data=str(sft), pref_data=str(pref)), tok)
    assert_names(str(err.value), sft)
    assert "eval_size" in str(err.value)


def test_load_data_missing_file(tiny, tmp_path):
    _, tok = tiny
    sft = write(tmp_path / "sft.jsonl", SFT_ROWS)
    with pytest.raises(DataError) as err:
        common.load_data(make_cfg(sft_data=str(sft), pref_data=str(tmp_path / "missing.parquet")), tok)
    assert_names(str(err.value), tmp_path / "missing.parquet")


# ------------------------------------------------------------------------------------------------
# the other formats users bring: ShareGPT, alpaca, TRL text and implicit prompts, CSV
# ------------------------------------------------------------------------------------------------

QUESTION = "summarize : alice found the car in the park ."
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(messages):
    return [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"], "weight": None} for m in messages]  # (SlimOrca's weight)


@pytest.mark.parametrize("row,standard", [
    ({"conversations": as_sharegpt(CONVERSATION)}, {"messages": CONVERSATION}),
    ({"conversations": as_sharegpt(CHAT)[:1] + [{"from": "assistant", "value": "alice found car"}]}, {"messages": CHAT}),  # user/assistant spellings
    ({"instruction": "summarize :", "input": "alice found the car in the park .", "output": "alice found car", "text": "ignored"},
     {"messages": [{"role": "user", "content": "summarize :\nalice found the car in the park ."}, CHAT[1]]}),
    ({"instruction": QUESTION, "input": "", "output": "alice found car", "system": "be brief ."},
     {"system": "be brief .", "messages": CHAT}),
    ({"instruction": QUESTION, "output": "alice found car", "history": [["summarize : bob sold the lamp in the market .", "bob sold lamp"]]},
     {"messages": CONVERSATION[1:5]}),
    ({"instruction": "summarize :", "context": "alice found the car in the park .", "response": "alice found car", "category": "summarization"},
     {"messages": [{"role": "user", "content": "summarize :\nalice found the car in the park ."}, CHAT[1]]}),
    ({"instruction": QUESTION, "context": "", "response": "alice found car"}, {"messages": CHAT}),
], ids=["sharegpt", "sharegpt-user-assistant", "alpaca-input", "alpaca-system", "alpaca-history", "dolly-context", "dolly"])
def test_sharegpt_and_alpaca_rows_train_exactly_as_their_messages(tiny, row, standard):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    assert common.row_texts(row, tok, "x", "sft") == common.row_texts(standard, tok, "x", "sft")
    assert common.tokenize_sft([row], tok, 128, 64) == common.tokenize_sft([standard], tok, 128, 64)
    if len(standard["messages"]) > 2:  # the earlier assistant turns carry the loss, as in a messages row
        assert common.tokenize_sft([row], tok, 128, 64)[1]["earlier_turns"] == sum(m["role"] == "assistant" for m in standard["messages"]) - 1


def test_a_text_row_trains_every_token_of_its_text(tiny, tmp_path):
    _, tok = tiny
    text = "user : summarize : alice found the car in the park . ; assistant : alice found car"
    assert common.row_texts({"text": text}, tok, "x", "sft") == ("", text)
    (e,), counts = common.tokenize_sft([{"text": text, "id": 7}], tok, 64, 48)
    whole = ids_of(tok, text) + [tok.eos_token_id]  # (this tokenizer adds no BOS: no prompt token at all)
    assert e["input_ids"] == e["labels"] == whole and e["prompt_ids"] == [] and counts["skipped"] == 0
    bos = dict(tok.get_vocab())["<unk>"]  # a tokenizer that adds BOS: the text is trained after it
    tok.bos_token = "<unk>"
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", bos)])
    (e,), _ = common.tokenize_sft([{"text": text}], tok, 64, 48)
    assert e["input_ids"] == [bos] + whole and e["labels"] == [IGNORE_INDEX] + whole


def test_implicit_prompt_string_pairs_split_at_the_word_where_they_part(tiny):
    _, tok = tiny
    prompt = "summarize : carol fixed the door in the school . :"
    row = {"chosen": prompt + " carol fixed door", "rejected": prompt + " car lost"}  # they part inside a word: "car|ol" / "car| "
    explicit = {"prompt": prompt, "chosen": " carol fixed door", "rejected": " car lost"}
    assert common.shared_prompt(row["chosen"], row["rejected"]) == prompt
    assert common.row_texts(row, tok, "x", "pref") == (prompt, " carol fixed door", " car lost") == common.row_texts(explicit, tok, "x", "pref")
    assert common.tokenize_pref([row], tok, 64, 48) == common.tokenize_pref([explicit], tok, 64, 48)
    assert common.row_texts(row, tok, "x", "sft") == (prompt, " carol fixed door")  # SFT data: the chosen response
    assert common.shared_prompt("a :\n\nyes", "a :\n\nyes please") == "a :"  # one is the other's beginning; whitespace runs stay whole
    for no_prompt in ({"chosen": "alice found car", "rejected": "bob sold lamp"}, {"chosen": "alice", "rejected": "alice ."}):
        with pytest.raises(DataError, match="row 1: missing field 'prompt'.*strings that begin alike"):
            common.tokenize_pref([no_prompt], tok, 64, 48, where=numbered("pref.jsonl"))


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_files_read_the_same_rows_and_examples_as_json_lines(tiny, tmp_path):
    _, tok = tiny
    tricky = [*SFT_ROWS[:4], {"prompt": 'summarize : erin moved the boat , "twice" ,\nin the harbor . :', "completion": "erin moved boat"}]
    for rows, kind in ((tricky, "sft"), (PREF_ROWS, "pref")):
        got = common.read_rows(str(write_csv(tmp_path / f"{kind}.csv", rows)))
        assert got.rows == rows and got.where(len(rows) - 1) == f"{tmp_path / f'{kind}.csv'}: row {len(rows)}"
    write(tmp_path / "sft.jsonl", tricky), write(tmp_path / "pref.jsonl", PREF_ROWS)
    data = {fmt: common.load_data(make_cfg(sft_data=str(tmp_path / f"sft.{fmt}"), pref_data=str(tmp_path / f"pref.{fmt}")), tok)
            for fmt in ("csv", "jsonl")}
    reports = {fmt: d.pop("report") for fmt, d in data.items()}
    assert data["csv"] == data["jsonl"]
    assert [(r["rows_read"], r["rows_used"]) for r in reports["csv"].values()] == [(3, 3), (3, 3), (2, 2)]
    gz = tmp_path / "sft.csv.gz"
    gz.write_bytes(__import__("gzip").compress((tmp_path / "sft.csv").read_bytes()))
    assert common.read_rows(str(gz)).rows == tricky
    long = [{"prompt": "summarize : " + "alice found the car . " * 10_000, "completion": "alice found car"}]  # 220 kB: one field
    assert common.read_rows(str(write_csv(tmp_path / "long.csv", long))).rows == long


@pytest.mark.parametrize("text,message", [
    ("prompt,completion\nsummarize : a,alice\nsummarize : b,bob,extra\n", "row 2: more values than the header's 2 columns"),
    ('prompt,completion\n"summarize :\na",alice\n"summarize" b,bob\n', "not valid CSV (line 4: ',' expected after '\"')"),
])
def test_bad_csv_names_file_and_row_or_line(tmp_path, text, message):
    path = tmp_path / "sft.csv"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        common.read_rows(str(path))
    assert str(err.value).startswith(f"{path}: {message}"), err.value


def test_json_lines_with_a_raw_line_separator_inside_a_string(tmp_path):
    rows = [{"prompt": "summarize : alice\u2028found the car . :", "completion": "alice\u2029found car"}, SFT_ROWS[1]]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # raw, not escaped
    got = common.read_rows(str(path))
    assert got.rows == rows and got.where(1) == f"{path}: row 2"


@pytest.mark.parametrize("row,message", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "hello"}]},
     "row 1: field 'conversations': turn 2 must be {'from': one of system, human, user, gpt, assistant; 'value': text}"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 5}]}, "row 1: field 'conversations': turn 2 must be"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "bye"}]}, "row 1: field 'conversations' needs a human turn and must end"),
    ({"instruction": "", "output": "alice"}, "row 1: field 'instruction' must be a non-empty string"),
    ({"instruction": "summarize :", "input": 3, "output": "alice"}, "row 1: field 'input' must be a string"),
    ({"instruction": "summarize :", "context": None, "response": " "}, "row 1: field 'response' must be a non-empty string"),
    ({"instruction": "summarize :", "output": "alice", "history": [["only one"]]}, "row 1: field 'history' must be a list of [instruction, response]"),
    ({"question": "q", "answer": "a"}, "row 1: no row format we read (columns: question, answer); accepted: prompt + completion; messages"),
])
def test_bad_rows_of_the_other_formats_name_row_and_field(tiny, row, message):
    _, tok = tiny
    tok.chat_template = TEMPLATE
    with pytest.raises(DataError) as err:
        common.tokenize_sft([row], tok, 64, 48, where=numbered("sft.jsonl"))
    assert str(err.value).startswith(f"sft.jsonl: {message}"), err.value
    if "no row format" in message:
        assert all(f in str(err.value) for f in ("ShareGPT", "alpaca", "text (the whole text trained)", "shared beginning"))


def test_text_rows_are_refused_where_a_prompt_must_be_answered(tiny, tmp_path):
    _, tok = tiny
    text_rows = write(tmp_path / "text.jsonl", [{"text": f"{r['prompt']} {r['completion']}"} for r in SFT_ROWS])
    pref = write(tmp_path / "pref.jsonl", PREF_ROWS)
    sft = write(tmp_path / "sft.jsonl", SFT_ROWS)
    cases = [(make_cfg(sft_data=str(text_rows), pref_data=str(pref)), True, f"{text_rows}: row 4: a 'text' row has no prompt, "
              "and the last --eval_size rows are held out as test prompts (or give --eval_data)"),
             (make_cfg(sft_data=str(sft), pref_data=str(pref), eval_data=str(text_rows)), True,
              f"{text_rows}: row 1: a 'text' row has no prompt, and evaluation answers prompts"),
             (make_cfg(sft_data=str(text_rows), eval_data=str(sft)), False,
              f"{text_rows}: row 1: a 'text' row has no prompt, and LD-Align answers each SFT prompt itself")]
    for cfg, need_pref, message in cases:
        with pytest.raises(DataError) as err:
            common.load_data(cfg, tok, need_pref=need_pref)
        assert str(err.value).startswith(message), err.value
    data = common.load_data(make_cfg(sft_data=str(text_rows), pref_data=str(pref), eval_data=str(sft)), tok)  # HBAT, two-stage: fine
    assert [(r["rows_read"], r["rows_used"]) for r in data["report"].values()] == [(5, 5), (3, 3), (2, 2)]
    assert all(e["labels"] == e["input_ids"] for e in data["sft"])


# ------------------------------------------------------------------------------------------------
# folders, read the way datasets.load_dataset reads them
# ------------------------------------------------------------------------------------------------

CONFIGS_README = """---
configs:
- config_name: all
  data_files:
  - split: train
    path: data/all/train-*
  - split: test
    path: data/all/test-*
- config_name: magpie
  data_files:
  - split: train
    path: data/magpie/train-*
---
# a smoltalk-like repository: `all` is the union of the other configs
"""


def smoltalk_like(root, readme=True):
    """data/<config>/<split>-*.parquet; all = magpie + rewrite (every row of those is also in all)."""
    magpie, rewrite = SFT_ROWS[:3], SFT_ROWS[3:]
    for config, split, rows in (("all", "train", magpie + rewrite), ("all", "test", SFT_ROWS[:1]), ("magpie", "train", magpie),
                                ("rewrite", "train", rewrite)):
        (root / "data" / config).mkdir(parents=True, exist_ok=True)
        write(root / "data" / config / f"{split}-00000-of-00001.parquet", rows)
    if readme:
        (root / "README.md").write_text(CONFIGS_README)
    return root


def test_a_readme_configs_entry_is_read_alone_and_picked_by_flag(tmp_path):
    folder = smoltalk_like(tmp_path / "smoltalk")
    got = common.read_rows(str(folder), "train", config="all")
    assert got.rows == SFT_ROWS and got.repeated == 0 and got.files == [folder / "data/all/train-00000-of-00001.parquet"]
    assert got.where(4) == f"{folder}/data/all/train-00000-of-00001.parquet: row 5"
    assert common.read_rows(str(folder), "train", config="magpie").rows == SFT_ROWS[:3]
    assert common.read_rows(str(folder), "test", config="all").rows == SFT_ROWS[:1]
    for config in ("", "rewrite"):  # no config, or one the README does not list: refused, naming the configs
        with pytest.raises(common.ConfigError) as err:
            common.read_rows(str(folder), "train", config=config)
        assert str(err.value) == (f"--sft_config {config or '(none)'}: {folder} has the configs all, magpie (its README.md); "
                                  f"choose one with --sft_config")
    with pytest.raises(common.ConfigError, match="--pref_config all: picks a config of a data set folder or hub name"):
        common.read_rows(str(write(tmp_path / "p.jsonl", PREF_ROWS)), "train", flag="--pref_data", config="all")
    assert "--eval_config picks a config of --eval_data; give both" in str(pytest.raises(common.ConfigError, common.check_config,
                                                                                          make_cfg(eval_config="all")).value)


def test_without_its_readme_a_folder_holding_rows_twice_trains_on_each_once(tiny, tmp_path):
    folder = smoltalk_like(tmp_path / "smoltalk", readme=False)  # datasets would read all three configs' train files as one split
    got = common.read_rows(str(folder), "train")
    assert sorted(map(json.dumps, got.rows)) == sorted(map(json.dumps, SFT_ROWS)) and got.repeated == 5
    assert len({json.dumps(r) for r in got.rows}) == len(got.rows)  # no row twice
    _, tok = tiny
    cfg = make_cfg(sft_data=str(folder), pref_data=str(write(tmp_path / "p.jsonl", PREF_ROWS)), eval_data=str(folder), eval_split="test")
    report = common.load_data(cfg, tok)["report"]
    assert (report["sft"]["rows_read"], report["sft"]["rows_used"], report["sft"]["repeated"]) == (5, 5, 5)
    assert common.data_lines(report, cfg)[0].endswith(": 5 of 5 rows used; 5 rows not read: each repeats a row of another file of the split")
    shards = tmp_path / "shards"  # a row repeated inside one file is the data's own: kept
    shards.mkdir()
    write(shards / "train_0.jsonl", SFT_ROWS[:2] + SFT_ROWS[:1]), write(shards / "train_1.jsonl", SFT_ROWS[2:] + SFT_ROWS[:1])
    got = common.read_rows(str(shards), "train")
    assert got.rows == SFT_ROWS[:2] + SFT_ROWS[:1] + SFT_ROWS[2:] and got.repeated == 1
    assert got.where(5) == f"{shards}/train_1.jsonl: row 3"  # rows keep their numbers in their files


@pytest.mark.parametrize("files,splits", [
    ({"databricks-dolly-15k.jsonl": 5}, {"train": ["databricks-dolly-15k.jsonl"]}),  # a single-file repository: split train
    ({"train_0.jsonl": 2, "train_1.jsonl": 3, "test_0.jsonl": 1}, {"train": ["train_0.jsonl", "train_1.jsonl"], "test": ["test_0.jsonl"]}),
    ({"part-00000-6b1c-c000.json": 2, "part-00001-6b1c-c000.json": 3}, {"train": ["part-00000-6b1c-c000.json", "part-00001-6b1c-c000.json"]}),
    ({"best_replies_train.jsonl": 4, "best_replies_eval.jsonl": 1}, {"train": ["best_replies_train.jsonl"], "test": ["best_replies_eval.jsonl"]}),
    ({"train_sft.jsonl": 3, "train_gen.jsonl": 2, "test_sft.jsonl": 1}, {"train_gen": ["train_gen.jsonl"], "train_sft": ["train_sft.jsonl"],
                                                                         "test_sft": ["test_sft.jsonl"]}),  # names, not merged into train
    ({"data/train-00000-of-00002.parquet": 2, "data/train-00001-of-00002.parquet": 3, "data/test-00000-of-00001.parquet": 1},
     {"train": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"], "test": ["data/test-00000-of-00001.parquet"]}),
], ids=["single-file", "numbered-shards", "spark-parts", "named-train-eval", "split-named-files", "hub-shards"])
def test_a_folder_splits_as_datasets_splits_it_and_reads_a_split_s_shards_together(tmp_path, files, splits):
    rows, at = {}, 0
    for name, n in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        rows[name], at = [{**SFT_ROWS[(at + k) % 5], "id": at + k} for k in range(n)], at + n
        write(tmp_path / name, rows[name], "parquet" if name.endswith(".parquet") else "jsonl")
    assert {s: [f.relative_to(tmp_path).as_posix() for f in fs] for s, fs in common.data_files(tmp_path, "", "--sft_data").items()} == splits
    for split, names in splits.items():
        got = common.read_rows(str(tmp_path), split)
        assert got.rows == [r for name in names for r in rows[name]] and got.repeated == 0
    with pytest.raises(DataError, match=r"no split 'validation' \(it has: "):
        common.read_rows(str(tmp_path), "validation")
