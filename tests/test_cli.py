"""The command line as a user meets it. In subprocesses: --help of every script; the bad-input matrix
(each case: a non-zero exit, one message that names what is wrong, no traceback, and an earlier run's
files in the output folder byte-identical afterwards); a NaN gradient stopping the run. In-process: the
range and choice rules, the output-folder rules, and whole-or-nothing writes."""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import common as C
import hbat
import ld_align
import two_stage_baseline

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"two_stage_baseline.py": two_stage_baseline, "hbat.py": hbat, "ld_align.py": ld_align}
# the same small run for every script: if a check were missing, the case would train quickly and exit 0
TINY = dict(n_sft=16, n_pref=16, eval_size=4, sft_epochs=1, batch_size=8, ppo_batch_size=8, max_new_tokens=6,
            eval_batch_size=8, rounds=2, iterations=1, guide_dim=16, latent_dim=8)


def tiny_args(script: str) -> list[str]:
    fields = {f.name for f in dataclasses.fields(SCRIPTS[script].Config)}
    return [x for k, v in TINY.items() if k in fields for x in (f"--{k}", str(v))]


def run(script: str, args: list, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}  # two at a time on two cores
    env.pop("ALIGN_DEBUG", None)
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ============================================================================================
# --help
# ============================================================================================


def test_help_of_every_script_lists_every_flag_with_its_range():
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(SCRIPTS, pool.map(lambda s: run(s, ["--help"]), SCRIPTS)))
    for script, proc in procs.items():
        assert proc.returncode == 0, f"{script}:\n{proc.stderr[-2000:]}"
        assert proc.stdout.startswith(f"usage: {script}") and proc.stderr == ""
        helps, ranges, choices = C.setting_rules(SCRIPTS[script].Config)
        squeezed = "".join(proc.stdout.split())  # argparse wraps lines (and may break at a hyphen)
        for f in dataclasses.fields(SCRIPTS[script].Config):
            assert f"--{f.name}" in proc.stdout, (script, f.name)
            assert f.name in helps, f"{script}: --{f.name} has no help comment"
            assert "".join(helps[f.name].split()) in squeezed, (script, f.name)  # the whole comment, range or choices included
        help_text = " ".join(proc.stdout.split())
        assert "--batch_size BATCH_SIZE examples or pairs per optimizer step [1, inf)" in help_text
        assert "--loss_type LOSS_TYPE DPO loss {sigmoid, ipo}" in help_text
        assert ranges["batch_size"] == "[1, inf)" and choices["loss_type"] == ("sigmoid", "ipo")


@dataclasses.dataclass
class PercentConfig(C.TrainConfig):
    """A config whose help holds a % sign."""
    keep: float = 0.2  # keep the top 20% of tensors [0, 1]


def test_a_percent_sign_in_a_help_comment_does_not_break_help(capsys):
    """argparse reads % in help as a format: a % in a comment once crashed --help."""
    assert C.setting_rules(PercentConfig)[1]["keep"] == "[0, 1]"
    with pytest.raises(SystemExit) as info:
        C.parse_config(PercentConfig, ["--help"])
    assert info.value.code == 0
    assert "keep the top 20% of tensors [0, 1]" in " ".join(capsys.readouterr().out.split())


# ============================================================================================
# The bad-input matrix
# ============================================================================================
# (id, script, extra arguments, what the message must contain). Every case runs in-process through
# common.cli (the scripts' entry point); those marked SUB also run as a real subprocess (the issue's
# cases, and one per script). Placeholders: {data} = the folder of data files below, {out} = a copy of
# an earlier run's output folder (passed with --overwrite unless the case sets --output_dir or --resume
# itself: even --overwrite must not touch it when a check fails), {model} = a saved tiny model.

BASELINE, SUB = "two_stage_baseline.py", True
REAL = ["--sft_data", "{data}/sft.jsonl", "--pref_data", "{data}/pref.jsonl"]
CASES = [
    # settings: ranges, choices, flags that must agree (every numeric flag's range: test_every_range_is_enforced)
    ("batch_size_negative", BASELINE, ["--batch_size", "-4"], ["--batch_size must be in [1, inf); got -4"], SUB),
    ("batch_size_zero", BASELINE, ["--batch_size", "0"], ["--batch_size must be in [1, inf); got 0"], SUB),
    ("grad_accum_zero", BASELINE, ["--grad_accum_steps", "0"], ["--grad_accum_steps must be in [1, inf)"], SUB),
    ("grad_accum_not_a_divisor", BASELINE, ["--grad_accum_steps", "3"], ["--batch_size 8 must be a multiple of --grad_accum_steps 3"], False),
    ("sft_epochs_negative", BASELINE, ["--sft_epochs", "-1"], ["--sft_epochs must be in [0, inf); got -1"], SUB),
    ("n_sft_negative", BASELINE, ["--n_sft", "-5"], ["--n_sft must be in [0, inf); got -5"], SUB),
    ("builtin_n_sft_zero", BASELINE, ["--n_sft", "0"], ["the built-in task needs --n_sft and --n_pref of at least 1"], False),
    ("label_smoothing_2", BASELINE, ["--label_smoothing", "2"], ["--label_smoothing must be in [0, 0.5); got 2.0"], SUB),
    ("ipo_with_label_smoothing", BASELINE, ["--loss_type", "ipo", "--label_smoothing", "0.1"], ["--label_smoothing applies to --loss_type sigmoid"], False),
    ("lr_nan", BASELINE, ["--pref_lr", "nan"], ["--pref_lr must be in (0, inf); got nan"], False),
    ("gamma_above_one", BASELINE, ["--gamma", "1.5"], ["--gamma must be in [0, 1]; got 1.5"], False),
    ("max_new_tokens_zero", BASELINE, ["--max_new_tokens", "0"], ["--max_new_tokens must be in [1, inf); got 0"], SUB),
    ("prompt_length_too_long", BASELINE, ["--max_prompt_length", "512"], ["--max_prompt_length 512 must be below --max_length 512"], False),
    ("dtype_unknown", BASELINE, ["--dtype", "foo"], ["--dtype must be one of auto, float32, bfloat16, bf16; got 'foo'"], SUB),
    ("pref_unknown", BASELINE, ["--pref", "kto"], ["--pref must be one of dpo, ppo; got 'kto'"], False),
    ("device_missing", BASELINE, ["--device", "cuda:99"], ["--device cuda:99:"], SUB),
    ("device_unknown", BASELINE, ["--device", "gpu0"], ["--device must be auto, cpu, cuda or cuda:N; got 'gpu0'"], False),
    ("not_an_int", BASELINE, ["--batch_size", "abc"], ["argument --batch_size: invalid int value: 'abc'"], False),
    ("unknown_flag", BASELINE, ["--bogus", "1"], ["unrecognized arguments: --bogus 1"], SUB),
    ("resume_and_overwrite", BASELINE, ["--resume", "--overwrite", "--output_dir", "{out}"], ["give one"], False),
    ("fsdp_without_torchrun", BASELINE, ["--fsdp"], ["--fsdp shards the models over torchrun's processes"], False),
    # --config files: each bad key or value names the file and the key
    ("config_unknown_key", BASELINE, ["--config", "{data}/typo.yaml"], ["--config {data}/typo.yaml: unknown setting 'bta'; did you mean 'beta'?"], SUB),
    ("config_out_of_range", BASELINE, ["--config", "{data}/range.yaml"], ["--config {data}/range.yaml: batch_size must be in [1, inf); got 0"], False),
    ("config_wrong_type", BASELINE, ["--config", "{data}/type.yaml"], ["--config {data}/type.yaml: batch_size must be an integer; got 'eight'"], SUB),
    ("config_bool_as_number", BASELINE, ["--config", "{data}/bool.json"], ["--config {data}/bool.json: critic must be true or false; got 0"], False),
    ("config_bad_choice", BASELINE, ["--config", "{data}/choice.json"], ["--config {data}/choice.json: loss_type must be one of sigmoid, ipo; got 'hinge'"], False),
    ("config_not_yaml", BASELINE, ["--config", "{data}/broken.yaml"], ["--config {data}/broken.yaml: not valid YAML: ", "(line 2)"], False),
    ("config_not_json", BASELINE, ["--config", "{data}/broken.json"], ["--config {data}/broken.json: not valid JSON: "], False),
    ("config_not_a_mapping", BASELINE, ["--config", "{data}/list.yaml"], ["--config {data}/list.yaml: must hold a mapping of settings"], False),
    ("config_missing", BASELINE, ["--config", "{data}/nope.yaml"], ["--config {data}/nope.yaml: No such file or directory"], False),
    ("config_other_suffix", BASELINE, ["--config", "{data}/sft.csv"], ["--config {data}/sft.csv: give a .yaml, .yml or .json file"], False),
    ("config_key_of_another_script", BASELINE, ["--config", "{data}/hbat.yaml"], ["--config {data}/hbat.yaml: unknown setting 'rounds'"], False),
    # models
    ("model_missing_folder", BASELINE, ["--model", "/missing/dir"], ["--model /missing/dir: no such folder"], SUB),
    ("model_folder_not_a_model", BASELINE, ["--model", "{data}"], ["--model {data}: not a Hugging Face model folder"], False),
    ("model_weights_nan", BASELINE, ["--model", "{data}/nan_model"], ["--model {data}/nan_model: its weights are not finite: 1 tensors hold "
                                                                      "NaN or inf (first: model.embed_tokens.weight)"], SUB),
    ("model_hub_offline", BASELINE, ["--model", "nobody/no-such-model"], ["--model nobody/no-such-model: could not load it from the hub"], False),
    ("reward_model_missing", BASELINE, ["--reward_model", "/missing/rm"], ["--reward_model /missing/rm: no such folder"], False),
    ("reward_model_without_head", BASELINE, ["--reward_model", "{model}"], ["--reward_model {model}: has no trained scalar head"], False),
    ("hbat_model_without_weights", "hbat.py", ["--model", "{data}/tokenizer_only"], ["--model {data}/tokenizer_only: could not load it from the folder"], False),
    # data files, rows and fields
    ("excel_file", BASELINE, ["--sft_data", "{data}/sft.xlsx", "--pref_data", "{data}/pref.jsonl"],
     ["--sft_data {data}/sft.xlsx: unsupported file type (supported: ", ".jsonl, .json, .parquet, .csv, .jsonl.gz, .json.gz, .csv.gz"], SUB),
    ("csv_extra_value", BASELINE, ["--sft_data", "{data}/extra.csv", "--pref_data", "{data}/pref.jsonl"],
     ["{data}/extra.csv: row 2: more values than the header's 2 columns"], False),
    ("text_rows_as_test_prompts", BASELINE, ["--sft_data", "{data}/text.jsonl", "--pref_data", "{data}/pref.jsonl"],
     ["{data}/text.jsonl: row ", ": a 'text' row has no prompt, and the last --eval_size rows are held out as test prompts"], False),
    ("sharegpt_unknown_role", BASELINE, ["--sft_data", "{data}/sharegpt.jsonl", "--pref_data", "{data}/pref.jsonl"],
     ["{data}/sharegpt.jsonl: row 1: field 'conversations': turn 2 must be {'from': one of system, human, user, gpt, assistant"], False),
    ("config_not_picked", BASELINE, ["--sft_data", "{data}/configs", "--pref_data", "{data}/pref.jsonl"],
     ["--sft_config (none): {data}/configs has the configs all, one (its README.md); choose one with --sft_config"], False),
    ("config_unknown", BASELINE, ["--sft_data", "{data}/configs", "--sft_config", "two", "--pref_data", "{data}/pref.jsonl"],
     ["--sft_config two: {data}/configs has the configs all, one (its README.md)"], False),
    ("file_missing", BASELINE, ["--sft_data", "{data}/nope.jsonl", "--pref_data", "{data}/pref.jsonl"], ["{data}/nope.jsonl: file not found"], False),
    ("path_missing", BASELINE, ["--sft_data", "{data}/nope", "--pref_data", "{data}/pref.jsonl"], ["--sft_data {data}/nope: no such file or folder"], False),
    ("folder_named_json", BASELINE, ["--sft_data", "{data}/folder.json", "--pref_data", "{data}/pref.jsonl"], ["{data}/folder.json: is a folder, not a file"], False),
    ("not_utf8", BASELINE, ["--sft_data", "{data}/latin1.jsonl", "--pref_data", "{data}/pref.jsonl"], ["{data}/latin1.jsonl: not readable UTF-8 text"], False),
    ("missing_field", BASELINE, ["--sft_data", "{data}/missing_field.jsonl", "--pref_data", "{data}/pref.jsonl"],
     ["{data}/missing_field.jsonl: row 3: missing field 'completion' (has: prompt, response;"], SUB),
    ("null_field", BASELINE, ["--sft_data", "{data}/null_field.jsonl", "--pref_data", "{data}/pref.jsonl"],
     ["{data}/null_field.jsonl: row 3: field 'completion' is null"], SUB),
    ("lone_surrogate", BASELINE, ["--sft_data", "{data}/surrogate.jsonl", "--pref_data", "{data}/pref.jsonl"],
     ["{data}/surrogate.jsonl: row 4: field 'prompt' holds a lone surrogate (an unpaired \\ud800-\\udfff escape)"], SUB),
    ("lone_surrogate_in_a_message", "ld_align.py", ["--sft_data", "{data}/surrogate_messages.jsonl"],
     ["{data}/surrogate_messages.jsonl: row 1: field 'messages' holds a lone surrogate"], False),
    ("tiny_on_unknown_words", BASELINE, ["--sft_data", "{data}/words.jsonl", "--pref_data", "{data}/pref.jsonl"],
     ["--model tiny: ", "% of --sft_data's tokens are unknown to it", "give --model NAME_OR_PATH"], SUB),
    ("empty_field", BASELINE, ["--sft_data", "{data}/sft.jsonl", "--pref_data", "{data}/empty_rejected.jsonl"],
     ["{data}/empty_rejected.jsonl: row 2: field 'rejected' is empty"], False),
    ("broken_json_line", BASELINE, ["--sft_data", "{data}/broken.jsonl", "--pref_data", "{data}/pref.jsonl"],
     ["{data}/broken.jsonl: row 5 (line 5): not valid JSON"], False),
    ("too_few_rows_for_eval", BASELINE, REAL + ["--eval_size", "30"], ["rows leave nothing to train on after holding out --eval_size 30"], False),
    ("sft_data_alone", BASELINE, ["--sft_data", "{data}/sft.jsonl"], ["give both --sft_data and --pref_data, or neither"], False),
    ("hub_data_set_offline", BASELINE, ["--sft_data", "nobody/no-such-data", "--pref_data", "{data}/pref.jsonl"],
     ["--sft_data nobody/no-such-data: could not load split 'train'"], False),
    ("hub_data_set_with_a_dot", BASELINE, ["--sft_data", "nobody/data-2.5", "--pref_data", "{data}/pref.jsonl"],
     ["--sft_data nobody/data-2.5: could not load split 'train'"], False),
    # the output folder
    ("output_dir_empty", BASELINE, ["--output_dir", ""], ["--output_dir '' is empty or blank; give the folder the run writes into"], SUB),
    ("output_dir_blank", BASELINE, ["--output_dir", "  "], ["--output_dir '  ' is empty or blank"], False),
    ("output_dir_not_utf8", BASELINE, ["--output_dir", "runs/\udcff"], ["--output_dir 'runs/\\udcff' is not UTF-8 text"], False),  # (argv's byte 0xff)
    ("config_path_lone_surrogate", BASELINE, ["--config", "{data}/surrogate_path.json"], ["--sft_data '/data/\\ud800.jsonl' is not UTF-8 text"], False),
    ("output_dir_current", BASELINE, ["--output_dir", "."], ["--output_dir . is the current folder; give the run a folder of its own"], False),
    ("tiny_on_unknown_pref_words", BASELINE, ["--sft_data", "{data}/sft.jsonl", "--pref_data", "{data}/pref_words.jsonl"],
     ["--model tiny: ", "% of --pref_data's tokens are unknown to it"], False),
    ("folder_of_mixed_formats", BASELINE, ["--sft_data", "{data}/mixed", "--pref_data", "{data}/pref.jsonl"],
     ["--sft_data {data}/mixed: datasets cannot split this folder into splits (ValueError: Couldn't infer the same data file format"], False),
    ("output_dir_is_a_file", BASELINE, ["--output_dir", "{data}/sft.jsonl"], ["--output_dir {data}/sft.jsonl: is a file, not a folder"], SUB),
    ("output_dir_holds_a_run", BASELINE, ["--output_dir", "{out}"], ["holds another run's files", "--overwrite", "--resume"], SUB),
    ("resume_with_other_settings", BASELINE, ["--resume", "--beta", "0.2", "--output_dir", "{out}"],
     ["--resume: ", "was written with other settings: --beta 0.1 (now 0.2)"], False),
    ("resume_without_checkpoint", BASELINE, ["--resume", "--output_dir", "{out_without_checkpoint}"],
     ["--resume: ", "holds a finished run and no checkpoint; pass --overwrite to replace it"], False),
    ("resume_old_checkpoint", BASELINE, ["--resume", "--output_dir", "{out_old_checkpoint}"],
     ["checkpoint/state.json is damaged or from an older version; start again with --overwrite"], False),
    # the other two scripts: their own checks, and the shared path
    ("hbat_ewc_unknown", "hbat.py", ["--ewc", "l2"], ["--ewc must be one of hbat, released, fisher, freeze, random, none; got 'l2'"], False),
    ("hbat_rounds_zero", "hbat.py", ["--rounds", "0"], ["--rounds must be in [1, inf); got 0"], False),
    ("hbat_empty_shard", "hbat.py", ["--rounds", "17"], ["--rounds 17 leaves an empty shard (16 SFT rows, 16 preference pairs)"], False),
    ("hbat_freeze_fraction", "hbat.py", ["--freeze_fraction", "1.5"], ["--freeze_fraction must be in [0, 1]; got 1.5"], False),
    ("hbat_bad_row", "hbat.py", ["--sft_data", "{data}/null_field.jsonl", "--pref_data", "{data}/pref.jsonl"],
     ["row 3: field 'completion' is null"], SUB),
    ("ld_align_weighting_unknown", "ld_align.py", ["--weighting", "cosine"], ["--weighting must be one of latent, uniform; got 'cosine'"], SUB),
    ("ld_align_pref_data", "ld_align.py", ["--pref_data", "{data}/pref.jsonl"], ["--pref_data is not used by this script"], False),
    ("ld_align_guide_heads", "ld_align.py", ["--guide_dim", "30", "--guide_heads", "4"], ["--guide_dim 30 must be a multiple of --guide_heads 4"], False),
    ("ld_align_w_max", "ld_align.py", ["--w_max", "0"], ["--w_max must be in (0, inf); got 0.0"], False),
    ("ld_align_excel", "ld_align.py", ["--sft_data", "{data}/sft.xlsx"], ["--sft_data {data}/sft.xlsx: unsupported file type"], False),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The data files the cases name, a saved tiny model, and an earlier run's output folder."""
    root = tmp_path_factory.mktemp("matrix")
    data = root / "data"
    data.mkdir()
    task = C.builtin_task(seed=0, n_sft=20, n_pref=12, n_test=1)

    def jsonl(name, rows):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("sft.jsonl", task["sft"])
    jsonl("words.jsonl", [{"prompt": f"What is {n} plus {n}?", "completion": f"{n} plus {n} is {2 * n}."} for n in range(20)])
    jsonl("pref.jsonl", task["pref"])
    (data / "sft.csv").write_text("prompt,completion\na,b\n")
    (data / "sft.xlsx").write_bytes(b"PK\x03\x04 not read")
    (data / "extra.csv").write_text("prompt,completion\nsummarize : a,alice\nsummarize : b,bob,carol\n")
    for config in ("all", "one"):
        (data / "configs" / config).mkdir(parents=True)
        jsonl(f"configs/{config}/train-00000-of-00001.jsonl", task["sft"])
    (data / "configs" / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n" for c in ("all", "one")) + "---\n")
    (data / "surrogate_path.json").write_text('{"sft_data": "/data/\\ud800.jsonl", "pref_data": "/data/pref.jsonl"}')
    jsonl("pref_words.jsonl", [{"prompt": f"What is {n} plus {n}?", "chosen": f"It is {2 * n}.", "rejected": "No idea."} for n in range(12)])
    (data / "mixed").mkdir()
    jsonl("mixed/train.jsonl", task["sft"])
    (data / "mixed" / "test.csv").write_text("prompt,completion\na,b\n")
    jsonl("text.jsonl", [{"text": r["prompt"] + " " + r["completion"]} for r in task["sft"]])
    jsonl("sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "bard", "value": "hello"}]}])
    jsonl("missing_field.jsonl", [r if i != 2 else {"prompt": r["prompt"], "response": "x"} for i, r in enumerate(task["sft"])])
    jsonl("null_field.jsonl", [r if i != 2 else {**r, "completion": None} for i, r in enumerate(task["sft"])])
    jsonl("empty_rejected.jsonl", [r if i != 1 else {**r, "rejected": ""} for i, r in enumerate(task["pref"])])
    lines = [json.dumps(r) for r in task["sft"]]
    (data / "surrogate.jsonl").write_text("\n".join(lines[:3] + [lines[3].replace('"prompt": "', '"prompt": "\\udc80', 1)] + lines[4:]) + "\n")
    jsonl("surrogate_messages.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["completion"] + ("\ud800" if i == 0 else "")}]}
                                       for i, r in enumerate(task["sft"])])
    lines[4] = lines[4][:-1]
    (data / "broken.jsonl").write_text("\n".join(lines) + "\n")
    (data / "folder.json").mkdir()
    for name, text in {"typo.yaml": "beta: 0.2\nbta: 0.3\n", "range.yaml": "batch_size: 0\n", "type.yaml": "batch_size: eight\n",
                       "bool.json": '{"critic": 0}', "choice.json": '{"loss_type": "hinge"}', "broken.yaml": "beta: [0.1\n",
                       "broken.json": '{"beta": 0.1,}', "list.yaml": "- beta\n- 0.1\n", "hbat.yaml": "rounds: 2\n"}.items():
        (data / name).write_text(text)
    (data / "latin1.jsonl").write_bytes(json.dumps(task["sft"][0], ensure_ascii=False).replace("summarize", "r\xe9sum\xe9").encode("latin-1") + b"\n")
    model, tokenizer = C.load_model_and_tokenizer("tiny")
    C.save_model(model, tokenizer, root / "model")
    shutil.copytree(root / "model", data / "nan_model")  # (save_model refuses non-finite weights: written past it)
    weights = load_file(data / "nan_model" / "model.safetensors")
    weights["model.embed_tokens.weight"][0, 0] = float("nan")
    save_file(weights, data / "nan_model" / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(data / "tokenizer_only")  # a model folder without weights
    tokenizer.save_pretrained(data / "tokenizer_only")
    earlier = root / "earlier"
    two_stage_baseline.main(small(earlier))
    (earlier / "notes.txt").write_text("the user's own file")
    return {"root": root, "data": data, "model": root / "model", "earlier": earlier, "before": digest(earlier)}


def case_args(case, places, out: Path) -> list[str]:
    """The case's command line (after the script name), with a fresh copy of the earlier run at `out`
    (without its checkpoint, or with a checkpoint from before metrics_lines, for the cases that say so)."""
    _, script, args, _, _ = case
    shutil.copytree(places["earlier"], out)
    if "{out_without_checkpoint}" in args:
        shutil.rmtree(out / "checkpoint")
    if "{out_old_checkpoint}" in args:
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        del state["metrics_lines"]
        (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    if "--output_dir" not in args and "--resume" not in args:
        args = [*args, "--output_dir", "{out}", "--overwrite"]
    args = [a.replace("{out_without_checkpoint}", "{out}").replace("{out_old_checkpoint}", "{out}") for a in args]
    return tiny_args(script) + [a.replace("{data}", str(places["data"])).replace("{out}", str(out))
                                .replace("{model}", str(places["model"])) for a in args]


def assert_one_clear_message(case, places, code: int, stdout: str, stderr: str, out: Path):
    name, _, _, expected, _ = case
    assert code == 2, f"exit {code}\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr
    message = stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message  # one message, one line
    for text in expected:
        assert text.replace("{data}", str(places["data"])).replace("{model}", str(places["model"])) in message, message
    changed = {"resume_without_checkpoint": "checkpoint/", "resume_old_checkpoint": "checkpoint/state.json"}.get(name)
    after, before = digest(out), places["before"]
    if changed:  # the case changed these itself
        after, before = ({k: v for k, v in d.items() if not k.startswith(changed)} for d in (after, before))
    assert after == before  # an earlier run's files, and the user's own, untouched (even with --overwrite)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_message_before_anything_is_touched(case, places, tmp_path, monkeypatch, capsys):
    script = case[1]
    monkeypatch.setattr(sys, "argv", [script, *case_args(case, places, tmp_path / "out")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        C.cli(SCRIPTS[script].main, SCRIPTS[script].Config)
    captured = capsys.readouterr()
    assert_one_clear_message(case, places, info.value.code, captured.out, captured.err, tmp_path / "out")


@pytest.fixture(scope="module")
def in_subprocesses(places):
    """The SUB cases as real processes, two at a time: {case id: (completed process, output folder)}."""
    def one(case):
        out = places["root"] / f"sub_{case[0]}"
        return case[0], (run(case[1], case_args(case, places, out)), out)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, [c for c in CASES if c[4]]))


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]])
def test_bad_input_in_a_real_process(case, places, in_subprocesses):
    proc, out = in_subprocesses[case[0]]
    assert_one_clear_message(case, places, proc.returncode, proc.stdout, proc.stderr, out)


def test_debug_shows_the_traceback(tmp_path):
    proc = run(BASELINE, ["--batch_size", "0", "--debug", "--output_dir", tmp_path / "out"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError: --batch_size" in proc.stderr
    assert not (tmp_path / "out").exists()


# ============================================================================================
# A NaN gradient stops the run; nothing non-finite is written
# ============================================================================================


def test_nan_gradient_stops_the_run_and_saves_no_broken_model(tmp_path):
    """The issue's case: --pref_lr 1e30 moves the weights to ~1e30 after one step, and the next step's
    gradient norm (or loss) is not finite. The step must stop before the optimizer touches the weights."""
    out = tmp_path / "run"
    proc = run(BASELINE, tiny_args(BASELINE) + ["--pref_lr", "1e30", "--output_dir", out])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: dpo, epoch 1, step 2: ") and " is nan" in message or " is inf" in message, message
    assert not (out / "final").exists() and not (out / "results.json").exists()
    sft = C.load_model_and_tokenizer(str(out / "sft"))[0]  # the stage before is whole and finite
    assert all(torch.isfinite(p).all() for p in sft.parameters())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))


def test_save_model_refuses_non_finite_weights(tiny, tmp_path):
    model, tokenizer = tiny
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(C.NonFiniteError, match="parameter tensors hold NaN or inf"):
        C.save_model(model, tokenizer, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def test_json_writers_refuse_non_finite_values(tmp_path):
    with pytest.raises(C.NonFiniteError, match="results.json: not written"):
        C.write_json(tmp_path / "results.json", {"reward": float("nan")})
    assert not (tmp_path / "results.json").exists()
    log = C.open_log(tmp_path)
    log({"loss": 1.5})
    with pytest.raises(C.NonFiniteError):
        log({"loss": float("inf")})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"loss": 1.5}\n'


# ============================================================================================
# Settings rules (in-process)
# ============================================================================================


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_has_a_range_and_the_defaults_are_in_it(script):
    cls = SCRIPTS[script].Config
    _, ranges, choices = C.setting_rules(cls)
    for f in dataclasses.fields(cls):
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            assert f.name in ranges, f"--{f.name} has no range"
            assert C.in_range(f.default, ranges[f.name]), f.name
        if f.name in choices:
            assert f.default in choices[f.name]
    C.check_config(cls(output_dir="runs/never_created"), need_pref=script != "ld_align.py")


def test_in_range_by_hand():
    assert C.in_range(1, "[1, inf)") and not C.in_range(0, "[1, inf)")
    assert not C.in_range(0, "(0, 1]") and C.in_range(1, "(0, 1]") and not C.in_range(1, "[0, 1)")
    assert not C.in_range(float("nan"), "[0, inf)") and not C.in_range(float("inf"), "(0, inf)")
    assert C.in_range(4294967295, "[0, 4294967295]") and not C.in_range(-1, "[0, 4294967295]")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_range_is_enforced(script, tmp_path):
    """Each numeric flag just outside its range (and NaN for floats) is refused, naming the flag."""
    cls = SCRIPTS[script].Config
    _, ranges, _ = C.setting_rules(cls)
    for name, interval in ranges.items():
        low, high = (float(x) for x in interval[1:-1].split(","))
        default = getattr(cls, name)
        bad = [low - 1 if interval[0] == "[" else low] + ([high + 1 if interval[-1] == "]" else high] if high != float("inf") else [])
        bad += [float("nan")] if isinstance(default, float) else []
        for value in bad:
            value = type(default)(value) if value == value and abs(value) != float("inf") else value
            with pytest.raises(C.ConfigError, match=f"--{name} must be in "):
                C.check_config(cls(output_dir=str(tmp_path / "never"), **{name: value}), need_pref=script != "ld_align.py")
    assert not (tmp_path / "never").exists()


def test_parse_config_errors_are_config_errors():
    with pytest.raises(C.ConfigError, match=r"argument --beta: invalid float value: 'x' \(see --help\)"):
        C.parse_config(two_stage_baseline.Config, ["--beta", "x"])
    cfg = C.parse_config(hbat.Config, ["--pref_ewc_max_weight", "1e3", "--no-compare", "--rounds", "3"])
    assert (cfg.pref_ewc_max_weight, cfg.compare, cfg.rounds) == (1e3, False, 3)


# ============================================================================================
# --config files
# ============================================================================================


def test_a_config_file_sets_what_its_flags_set_and_flags_beside_it_win(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    flags = ["--beta", "0.2", "--sft_lr", "2e-3", "--rounds", "3", "--compare", "--no-critic", "--ewc", "released",
             "--output_dir", "~/runs/x"]
    (tmp_path / "run.yaml").write_text("beta: 0.2\nsft_lr: 2e-3\nrounds: 3\ncompare: true\ncritic: false\newc: released\n"
                                      "output_dir: ~/runs/x\n")  # (YAML reads 2e-3 as a string: taken as the flag takes it)
    (tmp_path / "run.json").write_text(json.dumps({"beta": 0.2, "sft_lr": 0.002, "rounds": 3, "compare": True, "critic": False,
                                                   "ewc": "released", "output_dir": "~/runs/x"}))
    (tmp_path / "empty.yaml").write_text("")
    from_flags = C.parse_config(hbat.Config, flags)
    assert from_flags.output_dir == str(tmp_path / "runs" / "x") and from_flags.sft_lr == 2e-3 and not from_flags.critic
    for file in ("run.yaml", "run.json"):
        assert C.parse_config(hbat.Config, ["--config", tmp_path / file]) == from_flags
        beside = C.parse_config(hbat.Config, ["--rounds", "4", "--config", tmp_path / file, "--critic"])
        assert beside == dataclasses.replace(from_flags, rounds=4, critic=True)  # flags win wherever they stand
    assert C.parse_config(hbat.Config, ["--config", tmp_path / "empty.yaml"]) == hbat.Config()


def readme_configs() -> list[tuple[str, str]]:
    """(script, YAML text) of each README example whose first line reads '# FILE: python SCRIPT --config FILE'."""
    blocks = re.findall(r"```yaml\n(# \S+: python (\S+) --config \S+\n.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [(script, text) for text, script in blocks]


def test_the_readme_config_examples_are_valid_settings_of_their_scripts(tmp_path):
    import yaml

    examples = readme_configs()
    assert sorted(script for script, _ in examples) == sorted(SCRIPTS)  # one per script
    for script, text in examples:
        (tmp_path / "run.yaml").write_text(text)
        cfg = C.parse_config(SCRIPTS[script].Config, ["--config", tmp_path / "run.yaml"])
        settings = yaml.safe_load(text)
        assert {k: getattr(cfg, k) for k in settings} == {k: float(v) if isinstance(getattr(cfg, k), float) else v
                                                         for k, v in settings.items()}, script


def test_a_run_from_a_config_file_writes_the_results_its_flags_write(tmp_path, monkeypatch, capsys):
    """results.json from --config FILE (plus a flag beside it) equals the one from the same settings as flags, but --output_dir."""
    settings = {"beta": 0.2, "sft_lr": 0.002, "seed": 3, "loss_type": "ipo", "eval_samples": 2}
    (tmp_path / "run.json").write_text(json.dumps({**settings, "seed": 5}))
    flags = [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    results = []
    for out, args in (("flags", flags), ("file", ["--config", tmp_path / "run.json", "--seed", "3"])):
        monkeypatch.setattr(sys, "argv", [BASELINE, *tiny_args(BASELINE), *map(str, args), "--output_dir", str(tmp_path / out)])
        C.cli(two_stage_baseline.main, two_stage_baseline.Config)
        results.append(json.loads((tmp_path / out / "results.json").read_text()))
        assert results[-1]["config"].pop("output_dir") == str(tmp_path / out)
    assert results[0] == results[1] and results[0]["config"]["seed"] == 3 and results[0]["config"]["loss_type"] == "ipo"


# ============================================================================================
# Output folders: the rules, and whole-or-nothing writes
# ============================================================================================


def small(out, **overrides):
    return two_stage_baseline.Config(**{**{k: v for k, v in TINY.items() if k in two_stage_baseline.Config.__dataclass_fields__},
                                        "output_dir": str(out), **overrides})


def test_a_data_set_folder_is_read_by_its_split_files(tmp_path):
    rows = C.builtin_task(seed=0, n_sft=5, n_pref=0, n_test=1)["sft"]
    (tmp_path / "my_data").mkdir()
    (tmp_path / "my_data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = C.read_rows(str(tmp_path / "my_data"))
    assert got.rows == rows and got.split == "train" and got.files == [tmp_path / "my_data" / "train.jsonl"]
    assert got.where(4) == f"{tmp_path / 'my_data' / 'train.jsonl'}: row 5"


def test_a_resumed_run_has_no_results_json_until_it_finishes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    two_stage_baseline.main(small(out))
    monkeypatch.setattr(C, "train_dpo", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # resumed before the DPO stage, stopped in it
        two_stage_baseline.main(small(out, resume=True))
    assert not (out / "results.json").exists() and (out / "final").exists()


def test_overwrite_replaces_only_the_earlier_runs_files(tmp_path):
    out = tmp_path / "run"
    two_stage_baseline.main(small(out, seed=1))
    (out / "notes.txt").write_text("mine")
    (out / "final.tmp").mkdir()  # a leftover of a killed save
    with pytest.raises(C.ConfigError, match="holds another run's files .*final.tmp"):
        two_stage_baseline.main(small(out))
    two_stage_baseline.main(small(out, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and not (out / "final.tmp").exists()
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "final", "metrics.jsonl", "notes.txt", "results.json", "sft"]
    assert not (out / ".replaced").exists()  # (nothing is kept aside)


def without_lock(folder: Path) -> dict[str, str]:
    return {k: v for k, v in digest(folder).items() if k != ".lock"}


def test_a_failed_overwrite_keeps_the_new_runs_checkpoint_and_the_users_files(tmp_path, monkeypatch, capsys):
    """--overwrite removes the earlier run's files once every check has passed; the new run then stops in its DPO stage
    (a NaN): what stays is the user's file and the new run's SFT model and checkpoint. Nothing is put back."""
    out = tmp_path / "run"
    two_stage_baseline.main(small(out, seed=1))
    (out / "notes.txt").write_text("mine")
    seen = {}

    def stopped(*args, **kwargs):
        seen["out"] = sorted(p.name for p in out.iterdir())
        raise C.NonFiniteError("dpo, epoch 1, step 1: loss/dpo is nan")

    monkeypatch.setattr(C, "train_dpo", stopped)
    monkeypatch.setattr(sys, "argv", [BASELINE, *tiny_args(BASELINE), "--overwrite", "--output_dir", str(out)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        C.cli(two_stage_baseline.main, two_stage_baseline.Config)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "error: dpo, epoch 1, step 1: loss/dpo is nan" in err and "back in place" not in err, err
    assert seen["out"] == [".lock", "checkpoint", "metrics.jsonl", "notes.txt", "sft"]  # the earlier final/ and results.json: gone
    assert sorted(p.name for p in out.iterdir()) == seen["out"] and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["config"]["seed"] == 0  # the new run's


def test_a_folder_in_use_by_another_run_is_refused(tmp_path):
    """Another run holds <out>/.lock: this one stops before writing anything, naming that run's process."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(C.ConfigError, match=r"--output_dir .* is in use by another run \(process 4242\)"):
            two_stage_baseline.main(small(out))
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_resume_without_a_checkpoint_starts_from_the_beginning(places, tmp_path, capsys):
    """A run killed before its first checkpoint leaves files but no checkpoint: --resume starts that run over,
    clearing its files (not the user's), and ends as a run in a fresh folder does (places' earlier run)."""
    out, earlier = tmp_path / "run", places["earlier"]
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": "the killed run", "loss/sft": 9.0}\n')
    (out / "sft.tmp").mkdir()
    (out / "sft.tmp" / "model.safetensors").write_bytes(b"half written")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    two_stage_baseline.main(small(out, resume=True))
    assert f"--resume: no checkpoint in {out}, starting from the beginning" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine" and not (out / "sft.tmp").exists()
    assert (out / "metrics.jsonl").read_text() == (earlier / "metrics.jsonl").read_text()
    results = [json.loads((folder / "results.json").read_text()) for folder in (earlier, out)]
    for r in results:
        r["config"].pop("output_dir"), r["config"].pop("resume")
    assert results[0] == results[1]


def test_write_folder_is_whole_or_nothing(tmp_path):
    path = tmp_path / "model"
    C.write_folder(path, lambda tmp: (tmp / "a.txt").write_text("first"))
    assert digest(path) == {"a.txt": hashlib.sha256(b"first").hexdigest()}

    def fails(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        C.write_folder(path, fails)
    assert (path / "a.txt").read_text() == "first"  # the old folder, whole
    C.write_folder(path, lambda tmp: (tmp / "b.txt").write_text("second"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and [p.name for p in path.iterdir()] == ["b.txt"]


def test_checkpoint_survives_a_stop_between_the_two_renames(tmp_path, monkeypatch):
    """write_folder renames checkpoint -> checkpoint.old, then checkpoint.tmp -> checkpoint. Stopped in
    between, only checkpoint.old is there, and load_checkpoint reads it."""
    cfg = small(tmp_path)
    run = SimpleNamespace(out=tmp_path, cfg=cfg, tokenizer=None, data={"report": {}}, inputs={})  # what save_checkpoint reads of C.prepare's run
    C.save_checkpoint(run, {"next_stage": 1})
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    state = C.load_checkpoint(tmp_path, dataclasses.replace(cfg, resume=True, output_dir=str(tmp_path / "moved")))
    assert state["next_stage"] == 1 and state["folder"].name == "checkpoint.old"
    assert set(state["rng"]) == {"torch", "python", "cuda"}
    # the next save keeps checkpoint.old until the new checkpoint is in place: stopped at that rename, it is still there
    real_replace = os.replace

    def stopped(src, dst):
        raise OSError("killed") if Path(src).name == "checkpoint.tmp" else real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", stopped)
    with pytest.raises(OSError):
        C.save_checkpoint(run, {"next_stage": 2})
    monkeypatch.setattr(C.os, "replace", real_replace)
    assert C.load_checkpoint(tmp_path, cfg)["next_stage"] == 1
    C.save_checkpoint(run, {"next_stage": 2})
    assert C.load_checkpoint(tmp_path, cfg)["next_stage"] == 2 and not (tmp_path / "checkpoint.old").exists()
