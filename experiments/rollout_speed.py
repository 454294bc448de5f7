"""What makes PPO's rollouts faster: Hugging Face generate() with its default dynamic KV cache, with a
static KV cache, and with a static cache plus the compiled decoding step (transformers compiles the
forward for a static cache unless told not to). Random model of a real shape with bf16 weights (a
static cache takes the weights' dtype, so it cannot run under autocast over float32 weights as the
scripts' rollouts do), random prompts, sampling at temperature 1 (a random model almost never samples
EOS, so every response runs to --new_tokens).

    python experiments/rollout_speed.py                     # SmolLM2-135M's shape, batch 16, 128 + 128 tokens (a GPU)
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as B  # noqa: E402  (shapes, tokenizer, model)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=list(B.SHAPES))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.response_len = args.new_tokens
    tokenizer = B.tokenizer_for(B.SHAPES[args.shape]["vocab_size"])
    model = B.model_for(args, tokenizer, device).eval().to(dtype)
    prompts = torch.randint(3, B.SHAPES[args.shape]["vocab_size"], (args.batch_size, args.prompt_len), device=device)
    variants = {"dynamic cache (default)": dict(),
                "static cache": dict(cache_implementation="static", disable_compile=True),
                "static cache + compiled step": dict(cache_implementation="static")}
    print(f"{args.shape} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {dtype}, batch "
          f"{args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens; torch {torch.__version__}")
    print("\n| generate() | s per rollout | new tokens/s |\n|---|---|---|")
    for name, options in variants.items():
        times = []
        for i in range(args.repeats + 1):  # the first call warms up (and compiles)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               pad_token_id=0, eos_token_id=2, **options)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best = sorted(times[1:])[len(times[1:]) // 2]
        print(f"| {name} | {best:.3f} | {args.batch_size * args.new_tokens / best:.0f} |", flush=True)


if __name__ == "__main__":
    main()
