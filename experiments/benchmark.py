"""Speed and memory of the shared training steps (common.py), alone or side by side with TRL.

Times the real code paths: train_sft, train_dpo (policy + frozen reference, one concatenated forward)
and ppo_step (rollout, scoring, GAE, clipped updates), on random token data of fixed lengths, with a
randomly initialised Llama of a real model's shape. Each measurement runs in its own process (so peak
memory is its own); with --against trl, TRL's SFTTrainer and DPOTrainer train the same model (same
seed, same weights) on the same tokens, with the same batch, learning rate, precision and optimizer
algorithm (AdamW), and the two are interleaved over --rounds rounds. Nothing is downloaded.

    python experiments/benchmark.py                                # this project alone (CPU: the cpu-small shape)
    python experiments/benchmark.py --against trl                  # ... and TRL, interleaved, with ratios
    python experiments/benchmark.py --against trl --shape qwen2.5-0.5b --batch_size 8   # on a GPU: with MFU
    python experiments/benchmark.py --stages ppo --shape smollm2-135m --batch_size 64 --response_len 32
                                                                   # PPO at the scripts' defaults: peak memory

Figures: seconds per optimizer step (PPO: per rollout + update) and tokens per second (prompt +
response tokens through the trained model; DPO counts chosen and rejected), as the median over the
rounds with the range; peak memory (CPU: the process's peak RSS; CUDA: torch's peak allocated);
on CUDA the model FLOPs utilisation (MFU, see flops_per_step). TRL settings that differ from its
defaults, to compare like with like: gradient_checkpointing=False (ours is off by default too), bf16
only on CUDA (TRL turns it on everywhere), its optimizer stays its default adamw_torch_fused (ours
uses the fused AdamW on CUDA too). TRL 1.16 ships no PPO trainer, so PPO has no TRL figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import common as C  # noqa: E402

SHAPES = {  # Llama configs: the CPU shape, SmolLM2-135M, Qwen2.5-0.5B (its 152k vocabulary, GQA, tied)
    "cpu-small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=49152),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks (SXM)


def tokenizer_for(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary ("w3" .. "w<V-1>"), so a text of n words is
    exactly n tokens for both trainers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def model_for(args, tokenizer, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the same weights in every process (initialised on the device: fast for 0.5B on a GPU)
    config = C.tiny_config(tokenizer, **SHAPES[args.shape], max_position_embeddings=4096,
                           tie_word_embeddings=args.shape != "cpu-small")  # as the real SmolLM2 and Qwen2.5 configs
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    C.disable_dropout(model)
    return model


def texts(args, n: int, n_words: int, seed: int) -> list[str]:
    """n random texts of n_words words (a leading space: responses are appended to prompts as text)."""
    rng = random.Random(seed)
    return [" " + " ".join(f"w{rng.randrange(3, SHAPES[args.shape]['vocab_size'])}" for _ in range(n_words)) for _ in range(n)]


def flops_per_step(args, model, stage: str) -> float:
    """Model FLOPs of one step: 6 x body parameters per token (forward and backward), 6 x output-layer
    parameters per response token (the only positions a loss reads), and causal attention, 6 x layers x
    hidden x T^2 / 2... x 2 (scores and values) per sequence; DPO adds the reference's forward (a third
    of it) and counts chosen and rejected."""
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for p in model.parameters()) - head * (1 if cfg.tie_word_embeddings else 2)
    t = args.prompt_len + args.response_len
    per_sequence = 6 * body * t + 6 * head * args.response_len + 6 * cfg.num_hidden_layers * cfg.hidden_size * t * t
    sequences = args.batch_size * (2 if stage == "dpo" else 1)
    return per_sequence * sequences * (4 / 3 if stage == "dpo" else 1)


# ============================================================================================
# One measurement (a child process): a side ("ours" or "trl") and a stage
# ============================================================================================


def measure(args) -> dict:
    side, stage = args.child.split(":")
    device = C.pick_device(args.device)
    dtype = C.pick_dtype(args.dtype, device)
    tokenizer = tokenizer_for(SHAPES[args.shape]["vocab_size"])
    model = model_for(args, tokenizer, device)
    n = args.batch_size * (args.warmup + args.steps)
    # prompts of prompt_len tokens; chosen and rejected responses of response_len tokens with the EOS both trainers add
    prompts, responses, others = (texts(args, n, k, seed) for seed, k in enumerate([args.prompt_len] + 2 * [args.response_len - 1]))
    times = []  # the clock before the first step, then after every optimizer step

    def tick(*_, **__):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    cfg = dataclasses.replace(C.TrainConfig(), batch_size=args.batch_size, sft_epochs=1, pref_epochs=1, sft_lr=1e-5,
                              pref_lr=1e-6, warmup_steps=0, max_length=args.prompt_len + args.response_len + 1,
                              max_prompt_length=args.prompt_len, ppo_batch_size=args.batch_size,
                              max_new_tokens=args.response_len, eval_batch_size=args.batch_size,
                              gradient_checkpointing=args.gradient_checkpointing, ppo_micro_batch_size=args.ppo_micro_batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tick()
    if side == "ours" and stage == "sft":
        examples, _ = C.tokenize_sft([{"prompt": p, "completion": r} for p, r in zip(prompts, responses)], tokenizer,
                                     cfg.max_length, cfg.max_prompt_length)
        C.train_sft(model, examples, cfg, device=device, dtype=dtype, seed=0, desc="sft", log=tick)
    elif side == "ours" and stage == "dpo":
        pairs, _ = C.tokenize_pref([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, responses, others)],
                                   tokenizer, cfg.max_length, cfg.max_prompt_length)
        C.train_dpo(model, pairs, cfg, device=device, dtype=dtype, seed=0, desc="dpo", log=tick)
    elif side == "ours" and stage == "ppo":
        from transformers import AutoModelForSequenceClassification

        model.config.num_labels = 1  # a scalar head, as common.load_reward_model makes
        reward_model = AutoModelForSequenceClassification.from_config(model.config).to(device).requires_grad_(False).eval()
        value_model = AutoModelForSequenceClassification.from_config(model.config).to(device)
        optimizers = [C.stage_optimizer(list(m.parameters()), cfg, 1e-6, 10 ** 6) for m in (model, value_model)]
        reference = C.frozen_copy(model)
        ids = [C.encode_prompt(tokenizer, p) for p in prompts[: args.batch_size]]
        for _ in range(args.warmup + args.steps):  # a random model rarely samples EOS: rollouts run to response_len
            C.ppo_step(model, reference, reward_model, value_model, ids, optimizers, cfg, device=device, dtype=dtype)
            tick()
    elif side == "trl":
        run_trl(stage, model, tokenizer, prompts, responses, others, args, device, tick)
    else:
        raise SystemExit(f"unknown measurement {args.child}")
    assert len(times) == 1 + args.warmup + args.steps, (len(times), args.warmup, args.steps)
    seconds = (times[-1] - times[args.warmup]) / args.steps
    tokens = args.batch_size * (args.prompt_len + args.response_len) * (2 if stage == "dpo" else 1)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    result = {"side": side, "stage": stage, "s_per_step": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak}
    if device.type == "cuda" and stage != "ppo":
        name = torch.cuda.get_device_name()
        peak_flops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
        result["mfu"] = flops_per_step(args, model, stage) / seconds / (peak_flops * 1e12) if peak_flops else float("nan")
    return result


def run_trl(stage, model, tokenizer, prompts, responses, others, args, device, tick) -> None:
    """TRL's trainer on the same model and tokens, calling tick() after every optimizer step."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            tick()

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                  max_steps=args.warmup + args.steps, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, save_strategy="no", report_to="none", logging_steps=10**9, seed=0,
                  bf16=device.type == "cuda", use_cpu=device.type == "cpu", gradient_checkpointing=args.gradient_checkpointing,
                  dataloader_num_workers=0, disable_tqdm=True, max_length=None)
    if stage == "sft":
        data = datasets.Dataset.from_dict({"prompt": prompts, "completion": responses})
        trainer = SFTTrainer(model=model, args=SFTConfig(learning_rate=1e-5, completion_only_loss=True, **common),
                             train_dataset=data, processing_class=tokenizer, callbacks=[Clock()])
    elif stage == "dpo":
        data = datasets.Dataset.from_dict({"prompt": prompts, "chosen": responses, "rejected": others})
        trainer = DPOTrainer(model=model, ref_model=C.frozen_copy(model), args=DPOConfig(learning_rate=1e-6, beta=0.1, **common),
                             train_dataset=data, processing_class=tokenizer, callbacks=[Clock()])  # (a model has no hub path to rebuild it from)
    else:
        raise SystemExit(f"TRL has no {stage} trainer to compare with")
    trainer.train()


# ============================================================================================
# The parent: interleave the measurements, print the table
# ============================================================================================


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="", choices=["", *SHAPES], help="default: cpu-small on CPU, smollm2-135m on CUDA")
    parser.add_argument("--stages", default="sft,dpo", help="comma-separated: sft, dpo, ppo")
    parser.add_argument("--against", default="", choices=["", "trl"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--response_len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before the clock starts")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="for both sides")
    parser.add_argument("--ppo_micro_batch_size", type=int, default=C.TrainConfig.ppo_micro_batch_size)
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the GPU's dense bf16 peak, for MFU (default: known GPUs)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or ("smollm2-135m" if C.pick_device(args.device).type == "cuda" else "cpu-small")
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    device = C.pick_device(args.device)
    sides = ["ours"] + ([args.against] if args.against else [])
    runs = [(side, stage) for stage in args.stages.split(",") for side in sides if not (side == "trl" and stage == "ppo")]
    print(f"{args.shape} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads), compute {C.pick_dtype(args.dtype, device)}, batch {args.batch_size}, "
          f"prompt {args.prompt_len} + response {args.response_len} tokens, {args.warmup} + {args.steps} steps, "
          f"{args.rounds} rounds; torch {torch.__version__}" + (f", trl {__import__('trl').__version__}" if args.against else ""))
    results = {run: [] for run in runs}
    child_args = [a for a in sys.argv[1:]]
    for round_ in range(args.rounds):
        for side, stage in runs:
            proc = subprocess.run([sys.executable, __file__, *child_args, "--child", f"{side}:{stage}", "--shape", args.shape],
                                  capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                                      "TOKENIZERS_PARALLELISM": "false"})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{side}:{stage} failed:\n{proc.stderr[-3000:]}")
            results[(side, stage)].append(json.loads(line[7:]))
            print(f"  round {round_ + 1}: {side:4} {stage}: {results[(side, stage)][-1]['s_per_step']:.3f} s/step", flush=True)

    def cell(values, fmt):
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    mfu = device.type == "cuda"
    print("\n| stage | side | s/step | tokens/s | peak GiB |" + (" MFU |" if mfu else "") + (" ours/TRL tokens/s | ours/TRL peak |" if args.against else ""))
    print("|---" * (5 + mfu + 2 * bool(args.against)) + "|")
    for side, stage in runs:
        rs = results[(side, stage)]
        row = (f"| {stage} | {side} | {cell([r['s_per_step'] for r in rs], '{:.3f}')} | {cell([r['tokens_per_s'] for r in rs], '{:.0f}')} "
               f"| {statistics.median(r['peak_gib'] for r in rs):.2f} |")
        row += f" {statistics.median(r.get('mfu', float('nan')) for r in rs):.1%} |" if mfu else ""
        if args.against:
            theirs = results.get((args.against, stage))
            if side == "ours" and theirs:  # ratios round by round (interleaved: the machine's drift cancels)
                ratios = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(rs, theirs)]
                memory = statistics.median(r["peak_gib"] for r in rs) / statistics.median(r["peak_gib"] for r in theirs)
                row += f" {cell(ratios, '{:.2f}x')} | {memory:.2f} |"
            else:
                row += " | |"
        print(row)


if __name__ == "__main__":
    main()
