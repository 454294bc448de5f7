"""Speed and memory of the shared training steps (common.py), on the device at hand.

Times the real code paths: train_sft, train_dpo (policy + frozen reference, one concatenated forward)
and ppo_step (rollout, scoring, GAE, clipped updates), on random token data of fixed lengths, with a
randomly initialised model of a real architecture's shape (default: SmolLM2-135M's Llama config).
Prints milliseconds per optimizer step, tokens per second and peak GPU memory. Nothing is downloaded.

    python experiments/benchmark.py                      # SmolLM2-135M shape, bf16 autocast on CUDA
    python experiments/benchmark.py --shape tiny         # the built-in task's model (CPU-friendly)
    python experiments/benchmark.py --save_model DIR     # save the random model for two_stage_baseline.py --model DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common as C  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048),
    "tiny": {},
}


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--response_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per stage (after 2 warm-up)")
    parser.add_argument("--save_model", default="", help="only save the random model + tiny tokenizer here (for "
                        "two_stage_baseline.py --model DIR) and exit")
    args = parser.parse_args()

    device = C.pick_device(args.device)
    dtype = C.pick_dtype(args.dtype, device)
    tokenizer = C.build_tiny_tokenizer()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = C.tiny_config(tokenizer, **SHAPES[args.shape])
    policy = AutoModelForCausalLM.from_config(config).to(device)
    if args.save_model:
        C.save_model(policy, tokenizer, args.save_model)
        return
    vocab = config.vocab_size
    n_params = sum(p.numel() for p in policy.parameters())
    cfg = dataclasses.replace(C.TrainConfig(), batch_size=args.batch_size, sft_epochs=1, pref_epochs=1,
                              sft_lr=1e-5, pref_lr=1e-6, ppo_batch_size=args.batch_size,
                              max_new_tokens=args.response_len, temperature=1.0)

    def rand(n):  # token ids that are never pad / EOS (ids 0..2 are the tiny tokenizer's specials)
        return torch.randint(3, vocab, (n,)).tolist()

    n = args.batch_size * (args.steps + 2)
    sft = [C.sequence(rand(args.prompt_len), rand(args.response_len)) for _ in range(n)]
    pairs = [{"chosen": C.sequence(p, rand(args.response_len)), "rejected": C.sequence(p, rand(args.response_len))}
             for p in (rand(args.prompt_len) for _ in range(n))]
    tokens_per_step = args.batch_size * (args.prompt_len + args.response_len)
    print(f"{args.shape}: {n_params / 1e6:.1f}M parameters on {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), compute {dtype}, "
          f"batch {args.batch_size}, prompt {args.prompt_len} + response {args.response_len} tokens")

    reference = AutoModelForCausalLM.from_config(config).to(device).requires_grad_(False).eval()
    rows = []
    for name, run, data, k in [
        ("sft", lambda ex: C.train_sft(policy, ex, cfg, device=device, dtype=dtype, seed=0, desc="sft"), sft, 1),
        ("dpo", lambda ex: C.train_dpo(policy, reference, ex, cfg, device=device, dtype=dtype, seed=0, desc="dpo"), pairs, 2),
    ]:
        warm = data[: 2 * args.batch_size]
        run(warm)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(lambda: run(data[2 * args.batch_size:]), device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((name, 1000 * seconds / args.steps, k * tokens_per_step * args.steps / seconds, peak))

    # PPO: policy, reference, reward and value models (the two scalar-head models share the policy's shape)
    config.num_labels = 1  # a scalar head, as common.load_reward_model makes
    reward_model = AutoModelForSequenceClassification.from_config(config).to(device).requires_grad_(False).eval()
    value_model = AutoModelForSequenceClassification.from_config(config).to(device)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    value_opt = torch.optim.AdamW(value_model.parameters(), lr=1e-6)
    prompts = [rand(args.prompt_len) for _ in range(args.batch_size)]
    # a random model samples EOS with probability ~1/vocab per token, so rollouts run to response_len
    step = lambda: C.ppo_step(policy, reference, reward_model, value_model, prompts, policy_opt, value_opt, cfg,
                              device=device, dtype=dtype)
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = sum(timed(step, device) for _ in range(max(args.steps // 2, 1))) / max(args.steps // 2, 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    rows.append(("ppo (1 rollout + update)", 1000 * seconds, tokens_per_step / seconds, peak))

    print(f"\n{'stage':26}{'ms/step':>10}{'tokens/s':>12}{'peak GiB':>10}")
    for name, ms, tps, peak in rows:
        print(f"{name:26}{ms:10.1f}{tps:12.0f}{peak:10.2f}")
    print("tokens/s counts prompt + response tokens through the trained model (DPO: chosen and rejected).")


if __name__ == "__main__":
    main()
