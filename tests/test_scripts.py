"""End-to-end checks of two_stage_baseline.py: smoke runs (DPO and PPO) in a subprocess, reproducibility,
bad input rejected before anything is written, and a non-finite loss stopping the run cleanly. (The
bad-input matrix of all three scripts is in test_cli.py.)"""
import hashlib
import json
from pathlib import Path

import pytest
import torch

import common as C
import two_stage_baseline

TINY_ARGS = ["--n_sft", "64", "--n_pref", "64", "--eval_size", "8", "--sft_epochs", "1", "--batch_size", "16",
             "--ppo_batch_size", "16", "--max_new_tokens", "12"]


def tiny_config(output_dir, **overrides) -> two_stage_baseline.Config:
    """The smallest run that still trains every stage (2 SFT steps, 2 DPO steps / 1 PPO step)."""
    kwargs = dict(n_sft=16, n_pref=16, eval_size=4, sft_epochs=1, batch_size=8, ppo_batch_size=16,
                  max_new_tokens=6, eval_batch_size=8, device="cpu", output_dir=str(output_dir))
    kwargs.update(overrides)
    return two_stage_baseline.Config(**kwargs)


def state_dict_of(path, cls=None):
    from transformers import AutoModelForCausalLM

    return (cls or AutoModelForCausalLM).from_pretrained(path).state_dict()


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_reloads(path: Path, cls_name: str = "AutoModelForCausalLM"):
    """The folder reloads with the plain transformers Auto classes; the tokenizer encodes and decodes
    like the one the script trained with; the model gives finite logits."""
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    original = C.build_tiny_tokenizer()
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (original.eos_token_id, original.pad_token_id)
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    row = C.builtin_task(seed=1, n_sft=1, n_pref=1, n_test=1)["sft"][0]
    ids = C.encode_prompt(tokenizer, row["prompt"]) + C.encode_response(tokenizer, row["completion"])
    assert ids == C.encode_prompt(original, row["prompt"]) + C.encode_response(original, row["completion"])
    assert tokenizer.decode(C.encode_response(tokenizer, row["completion"]), skip_special_tokens=True) == row["completion"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits
    assert torch.isfinite(out).all()
    return model, tokenizer


# ============================================================================================
# 4. smoke tests (subprocess, built-in task)
# ============================================================================================

@pytest.mark.parametrize("pref", ["dpo", "ppo"])
def test_smoke_two_stage_baseline_end_to_end(script_run, pref):
    proc, out = script_run("two_stage_baseline.py", *TINY_ARGS, "--pref", pref)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    # output meant for a log file: progress as plain lines, no transformers bars or load-report tables
    assert "\r" not in proc.stdout + proc.stderr and max(map(len, (proc.stdout + proc.stderr).splitlines())) < 400
    assert "Writing model shards" not in proc.stderr and "Loading weights" not in proc.stderr and "LOAD REPORT" not in proc.stderr
    assert "sft: 4/4 [" in proc.stderr and f"{pref}: " in proc.stderr

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "reward_metric", "data", "sft", f"sft+{pref}", "examples"}
    assert results["data"]["sft"] == {"source": "built-in task", "split": "sft", "rows_read": 64, "rows_used": 64, "prompt_cut": 0,
                                      "response_cut": 0, "skipped": 0, "identical": 0, "earlier_turns": 0, "repeated": 0,
                                      "sha256": None}
    assert results["data"]["test"]["in_training"] == 0  # the built-in task's test prompts are in no training set
    assert results["reward_metric"] == "gold reward"
    assert results["config"]["pref"] == pref and results["config"]["output_dir"] == str(out)
    sampled = {"instruction_sampled", "reward_sampled"}
    assert set(results["sft"]) == {"instruction", "rougeL", "length", "reward", *sampled}  # built-in task: gold reward
    assert set(results[f"sft+{pref}"]) == {"instruction", "rougeL", "length", "reward", "win_rate", *sampled}
    for metrics in (results["sft"], results[f"sft+{pref}"]):
        assert all(isinstance(v, float) for v in metrics.values())
        assert 0.0 <= metrics["rougeL"] <= 1.0 and 0.0 <= metrics["instruction"] <= 1.0 and 0.0 <= metrics["instruction_sampled"] <= 1.0
    assert 0.0 <= results[f"sft+{pref}"]["win_rate"] <= 1.0
    assert len(results["examples"]) == 5
    assert all(set(e) == {"prompt", "reference", "sft", f"sft+{pref}"} for e in results["examples"])

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in records}
    assert {"sft", pref, "eval sft", "eval final"} <= stages
    assert all(all(v == v for v in r.values() if isinstance(v, float)) for r in records)  # no NaN logged

    sft_model, _ = assert_reloads(out / "sft")
    final_model, _ = assert_reloads(out / "final")
    # the preference stage changed the policy (and sft/ was not overwritten by the final model)
    sft_sd, final_sd = sft_model.state_dict(), final_model.state_dict()
    assert sft_sd.keys() == final_sd.keys()
    assert any(not torch.equal(sft_sd[k], final_sd[k]) for k in sft_sd)
    if pref == "ppo":
        reward_model, _ = assert_reloads(out / "reward_model", "AutoModelForSequenceClassification")
        assert reward_model.config.num_labels == 1
        assert reward_model.score.weight.shape[0] == 1
    else:
        assert not (out / "reward_model").exists()


# ============================================================================================
# 5. reproducibility (in-process)
# ============================================================================================


@pytest.mark.parametrize("pref", ["dpo", "ppo"])
def test_same_seed_gives_identical_weights(tmp_path, pref):
    a = two_stage_baseline.main(tiny_config(tmp_path / "a", pref=pref, seed=3))
    b = two_stage_baseline.main(tiny_config(tmp_path / "b", pref=pref, seed=3))
    for folder in ("sft", "final"):
        sd_a, sd_b = state_dict_of(tmp_path / "a" / folder), state_dict_of(tmp_path / "b" / folder)
        assert sd_a.keys() == sd_b.keys()
        different = [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]
        assert not different, f"{folder}: tensors differ between identical runs: {different[:5]}"
    # the runs did train (identical weights are not just two untouched copies of the init)
    sd_sft, sd_final = state_dict_of(tmp_path / "a" / "sft"), state_dict_of(tmp_path / "a" / "final")
    assert any(not torch.equal(sd_sft[k], sd_final[k]) for k in sd_sft)
    assert a["sft"] == b["sft"] and a[f"sft+{pref}"] == b[f"sft+{pref}"] and a["examples"] == b["examples"]


# ============================================================================================
# 6. bad input: refused before anything is trained or written
# ============================================================================================


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_files(tmp_path):
    task = C.builtin_task(seed=0, n_sft=12, n_pref=8, n_test=1)
    sft = write_jsonl(tmp_path / "sft.jsonl", task["sft"])
    pref = write_jsonl(tmp_path / "pref.jsonl", task["pref"])
    return task, sft, pref


@pytest.fixture
def sentinel_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("keep me")
    return out


def assert_untouched(out: Path):
    assert sorted(p.name for p in out.iterdir()) == ["sentinel.txt"]
    assert (out / "sentinel.txt").read_text() == "keep me"


def test_pref_data_without_sft_data_is_refused(data_files, tmp_path):
    _, _, pref = data_files
    out = tmp_path / "never_created"
    with pytest.raises(C.ConfigError, match="give both --sft_data and --pref_data"):
        two_stage_baseline.main(tiny_config(out, pref_data=str(pref)))
    assert not out.exists()


def test_bad_preference_row_is_named(tmp_path, data_files):
    task, sft, _ = data_files
    rows = [dict(r) for r in task["pref"]]
    rows[1]["rejected"] = ""  # row 2: empty field
    bad = write_jsonl(tmp_path / "bad_pref.jsonl", rows)
    out = tmp_path / "never_created"
    with pytest.raises(C.DataError) as info:
        two_stage_baseline.main(tiny_config(out, sft_data=str(sft), pref_data=str(bad)))
    message = str(info.value)
    assert str(bad) in message and "row 2" in message and "'rejected'" in message
    assert not out.exists()  # a missing output folder is not created for a run that cannot start


def test_bad_held_out_row_is_named_by_its_row_in_the_file(tmp_path, data_files, sentinel_dir):
    """Without --eval_data the last --eval_size SFT rows are the test set; a bad row there must still be
    reported by its row number in the file the user gave, or they look at the wrong row."""
    task, _, pref = data_files
    rows = [dict(r) for r in task["sft"]]  # 12 rows; with eval_size 4, rows 9-12 are held out
    del rows[10]["completion"]  # row 11 of the file
    bad = write_jsonl(tmp_path / "bad_heldout.jsonl", rows)
    with pytest.raises(C.DataError) as info:
        two_stage_baseline.main(tiny_config(sentinel_dir, sft_data=str(bad), pref_data=str(pref)))
    message = str(info.value)
    assert str(bad) in message and "'completion'" in message
    assert "row 11" in message, message
    assert_untouched(sentinel_dir)


# ============================================================================================
# 6b. a non-finite loss stops the run; files already written stay intact
# ============================================================================================


@pytest.fixture
def record_saves(monkeypatch):
    """Digest of every folder right after common.save_model wrote it."""
    saved = {}
    real_save = C.save_model

    def save(model, tokenizer, path):
        real_save(model, tokenizer, path)
        saved[Path(path).name] = files_digest(Path(path))

    monkeypatch.setattr(C, "save_model", save)
    return saved


def test_nan_dpo_loss_raises_and_keeps_sft(tmp_path, monkeypatch, record_saves):
    real_dpo_loss = C.dpo_loss

    def nan_dpo_loss(*args, **kwargs):
        losses, chosen, rejected = real_dpo_loss(*args, **kwargs)
        return losses * float("nan"), chosen, rejected

    monkeypatch.setattr(C, "dpo_loss", nan_dpo_loss)
    out = tmp_path / "run"
    with pytest.raises(C.NonFiniteError) as info:
        two_stage_baseline.main(tiny_config(out))
    message = str(info.value)
    assert "dpo" in message and "loss/dpo is nan" in message and "step 1" in message
    assert "intact" in message  # tells the user what state the files are in

    assert list(record_saves) == ["sft"]
    assert files_digest(out / "sft") == record_saves["sft"]  # byte for byte as saved
    model, _ = assert_reloads(out / "sft")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not (out / "final").exists() and not (out / "results.json").exists()


def test_nan_sft_loss_raises_before_saving(tmp_path, monkeypatch, record_saves):
    real_token_logps = C.token_logps

    def nan_token_logps(model, batch, temperature=1.0):
        logps, mask = real_token_logps(model, batch, temperature)
        return logps * float("nan"), mask

    monkeypatch.setattr(C, "token_logps", nan_token_logps)
    out = tmp_path / "run"
    with pytest.raises(C.NonFiniteError, match=r"sft, epoch 1, step 1: loss/sft is nan"):
        two_stage_baseline.main(tiny_config(out))
    assert record_saves == {}
    assert not (out / "sft").exists() and not (out / "final").exists() and not (out / "results.json").exists()


def test_huge_ppo_learning_rate_raises_and_keeps_earlier_models(tmp_path, record_saves):
    out = tmp_path / "run"
    with pytest.raises(C.NonFiniteError, match=r"ppo step: (loss|grad_norm)/policy is (nan|inf|-inf)\b"):
        two_stage_baseline.main(tiny_config(out, pref="ppo", pref_lr=1e30))
    assert list(record_saves) == ["sft", "reward_model"]
    for folder, cls in (("sft", "AutoModelForCausalLM"), ("reward_model", "AutoModelForSequenceClassification")):
        assert files_digest(out / folder) == record_saves[folder]
        assert_reloads(out / folder, cls)
    assert not (out / "final").exists() and not (out / "results.json").exists()


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_ends_as_an_uninterrupted_run(script_run, kill_and_resume):
    """PPO: the checkpoints after SFT and after the reward model, and the RNG state they restore."""
    args = [*TINY_ARGS, "--pref", "ppo"]
    proc, whole = script_run("two_stage_baseline.py", *args)
    assert proc.returncode == 0
    kill_and_resume("two_stage_baseline.py", args, whole)
