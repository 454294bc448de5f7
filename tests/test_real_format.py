"""The real-model path, offline: a GPT-2 architecture (dropout modules, a `transformer` base, not
Llama), a byte-level BPE tokenizer with a chat template and no pad token (so pad == EOS), and
TRL-style chat files (`messages` SFT rows, implicit-prompt preference conversations), all saved to
a temp folder and given to two_stage_baseline.py by path, as a user would."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def real_like(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tmp = tmp_path_factory.mktemp("real_like")
    task = common.builtin_task(seed=1, n_sft=40, n_pref=24, n_test=8)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [r["prompt"] + " " + r["completion"] for r in task["sft"]] + [r["chosen"] for r in task["pref"]]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    assert tok.pad_token is None  # loading must fall back to pad == EOS
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=256,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    model.generation_config.repetition_penalty = 1.3  # a checkpoint default that must not leak into eval
    common.save_model(model, tok, tmp / "model")

    def chat(user, assistant=None):
        return [{"role": "user", "content": user}] + ([{"role": "assistant", "content": assistant}] if assistant else [])

    rows = [{"messages": chat(r["prompt"], r["completion"])} for r in task["sft"] + task["test"]]
    (tmp / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pref = [{"chosen": chat(r["prompt"], r["chosen"]), "rejected": chat(r["prompt"], r["rejected"])} for r in task["pref"]]
    (tmp / "pref.jsonl").write_text("\n".join(json.dumps(r) for r in pref) + "\n")
    return tmp


def run_baseline(tmp, *args):
    cmd = [sys.executable, str(ROOT / "two_stage_baseline.py"), "--model", str(tmp / "model"),
           "--sft_data", str(tmp / "sft.jsonl"), "--pref_data", str(tmp / "pref.jsonl"), "--eval_size", "8",
           "--sft_epochs", "1", "--batch_size", "8", "--ppo_batch_size", "8", "--max_new_tokens", "8",
           "--sft_lr", "1e-3", "--max_length", "192", "--max_prompt_length", "160", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_smoke_chat_data_gpt2_bpe_ppo_then_dpo_judged_by_its_reward_model(real_like):
    ppo_out = real_like / "ppo"
    run_baseline(real_like, "--pref", "ppo", "--output_dir", str(ppo_out))
    ppo = json.loads((ppo_out / "results.json").read_text())
    assert ppo["reward_metric"] == "score of the reward model PPO optimised (not independent)"
    assert set(ppo["sft+ppo"]) == {"rougeL", "length", "reward", "reward_sampled", "win_rate"}

    dpo_out = real_like / "dpo"
    proc = run_baseline(real_like, "--pref", "dpo", "--reward_model", str(ppo_out / "reward_model"),
                        "--output_dir", str(dpo_out))
    dpo = json.loads((dpo_out / "results.json").read_text())
    assert dpo["reward_metric"] == "--reward_model score"
    assert "win_rate" in dpo["sft+dpo"]
    # 48 SFT rows in the file, the last 8 held out for evaluation; all 24 pairs used; nothing cut at --max_length 192
    sft, pref = real_like / "sft.jsonl", real_like / "pref.jsonl"
    assert f"SFT data: {sft}, split (the whole file): 40 of 40 rows used\n" in proc.stdout  # (the last 8 are held out: test)
    assert f"preference data: {pref}, split (the whole file): 24 of 24 rows used\n" in proc.stdout
    assert f"test data: {sft} (its last 8 rows), split (the whole file): 8 of 8 rows used\n" in proc.stdout
    report = dpo["data"]  # results.json holds the same report
    assert [(report[k]["rows_read"], report[k]["rows_used"]) for k in ("sft", "pref", "test")] == [(40, 40), (24, 24), (8, 8)]
    assert (report["sft"]["source"], report["pref"]["source"]) == (str(sft), str(pref))

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(dpo_out / "final")
    assert tok.pad_token_id == tok.eos_token_id and tok.chat_template == CHAT_TEMPLATE
    AutoModelForCausalLM.from_pretrained(dpo_out / "final")
