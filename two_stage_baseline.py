"""Two-stage alignment, the baseline both papers measure against.

Stage 1, instruction following: SFT on (prompt, response) demonstrations, loss on response tokens only.
Stage 2, human preference, one of
  --pref dpo: L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
              reference = a frozen copy of the SFT model;
  --pref ppo: a Bradley-Terry reward model  L_RM = -log sigmoid(r(x, y_w) - r(x, y_l)),  then PPO on the
              prompts with per-token reward -kl_coef * KL(pi || SFT) plus r(x, y) on the last token, GAE,
              clipped policy and value losses, value model initialised from the reward model.

    python two_stage_baseline.py                      # built-in task, tiny model, SFT then DPO (CPU, ~2 min)
    python two_stage_baseline.py --pref ppo           # SFT then reward model then PPO
    torchrun --nproc_per_node N two_stage_baseline.py ...   # N processes: DDP, or --fsdp to shard the models
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import common as C


@dataclass
class Config(C.TrainConfig):
    """Two-stage baseline: SFT, then DPO or PPO. Shared settings are documented in common.TrainConfig."""
    pref: str = "dpo"  # preference stage: dpo | ppo
    output_dir: str = "runs/two_stage"  # models (sft/, final/, reward_model/), checkpoint/, metrics.jsonl, results.json
    CHOICES = {"pref": ("dpo", "ppo")}


def main(cfg: Config) -> dict:
    # ---------------------------------------------------------------- set-up: every check before any file is written
    C.check_config(cfg)
    device, out = C.pick_device(cfg.device), Path(cfg.output_dir)
    dtype = C.pick_dtype(cfg.dtype, device)
    state = C.load_checkpoint(out, cfg) if cfg.resume else None  # next_stage 1: SFT done; 2: reward model and SFT eval done
    next_stage = state["next_stage"] if state else 0
    C.seed_everything(cfg.seed)
    policy, tokenizer = C.load_model_and_tokenizer(str(out / "sft") if state else cfg.model, cfg.trust_remote_code, cfg.seed)
    data = C.load_data(cfg, tokenizer)  # raises on bad rows before anything is trained or written
    judge = C.load_reward_model(cfg.reward_model, tokenizer, cfg.trust_remote_code) if cfg.reward_model else None
    reward_model = None
    if next_stage == 2 and cfg.pref == "ppo":
        reward_model = C.load_reward_model(str(out / "reward_model"), tokenizer, cfg.trust_remote_code, flag="")
    C.start_output(cfg, fresh=state is None)
    log = C.open_log(out, state["metrics_lines"] if state else 0)
    for model in (policy, judge, reward_model):  # on the device; with --fsdp, sharded
        if model is not None:
            C.place(model, cfg, device)
    print(f"{len(data['sft'])} SFT rows, {len(data['pref'])} preference pairs, {len(data['test'])} test prompts; "
          f"model {cfg.model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters) on {device}, {dtype}")
    if cfg.resume:
        print(f"--resume: continuing {out} after stage {next_stage} (SFT, reward model + SFT evaluation)" if state
              else f"--resume: no checkpoint in {out}; starting from the beginning")
    if state:
        C.restore_rng(state["rng"])  # after loading the models: the rest of the run draws what it would have

    # ---------------------------------------------------------------- stage 1: instruction following (SFT)
    if next_stage < 1:
        C.train_sft(policy, data["sft"], cfg, device=device, dtype=dtype, seed=cfg.seed, desc="sft", log=log)
        C.save_model(policy, tokenizer, out / "sft")
        C.save_checkpoint(out, cfg, {"next_stage": 1})

    if next_stage < 2:
        if cfg.pref == "ppo":  # the reward model starts from the SFT model, as in InstructGPT
            reward_model = C.load_reward_model(str(out / "sft"), tokenizer, cfg.trust_remote_code, flag="", new_head=True)
            C.place(reward_model, cfg, device)
            C.train_reward_model(reward_model, data["pref"], cfg, device=device, dtype=dtype, seed=cfg.seed, log=log)
            C.save_model(reward_model, tokenizer, out / "reward_model")
    score_fn, score_name = C.preference_scorer(data["builtin"], reward_model if judge is None else judge,
                                               judge is not None, tokenizer, cfg, device, dtype)
    if next_stage < 2:
        sft_metrics, sft_outputs = C.evaluate(policy, tokenizer, data["test"], cfg, device=device, dtype=dtype,
                                              score_fn=score_fn, desc="eval sft")
        log({"stage": "eval sft", **sft_metrics})
        C.save_checkpoint(out, cfg, {"next_stage": 2, "sft_metrics": sft_metrics, "sft_outputs": sft_outputs})
    else:
        sft_metrics, sft_outputs = state["sft_metrics"], state["sft_outputs"]

    # ---------------------------------------------------------------- stage 2: human preference (DPO or PPO)
    if cfg.pref == "dpo":  # the reference: the SFT model, frozen (train_dpo: the policy at its start)
        C.train_dpo(policy, data["pref"], cfg, device=device, dtype=dtype, seed=cfg.seed + 1, log=log)
    else:
        value_model = C.clone_model(reward_model) if cfg.critic else None  # critic initialised from the reward model
        reward_model.requires_grad_(False)
        C.train_ppo(policy, C.frozen_copy(policy), reward_model, value_model, [p["prompt_ids"] for p in data["pref"]], cfg,
                    device=device, dtype=dtype, seed=cfg.seed + 1, log=log)
    C.save_model(policy, tokenizer, out / "final")

    # ---------------------------------------------------------------- evaluation: SFT and final side by side
    final_metrics, final_outputs = C.evaluate(policy, tokenizer, data["test"], cfg, device=device, dtype=dtype,
                                              score_fn=score_fn, against=sft_outputs, desc="eval final")
    log({"stage": "eval final", **final_metrics})
    results = {"config": dataclasses.asdict(cfg), "reward_metric": score_name, "data": data["counts"], "sft": sft_metrics,
               f"sft+{cfg.pref}": final_metrics,
               "examples": [{"prompt": t["prompt"], "reference": t["reference"], "sft": s, f"sft+{cfg.pref}": f}
                            for t, s, f in zip(data["test"][:5], sft_outputs["responses"], final_outputs["responses"])]}
    C.write_json(out / "results.json", results)
    print("\n" + C.format_table({"sft": sft_metrics, f"sft+{cfg.pref}": final_metrics}))
    print(f"rougeL: F1 against the reference (instruction following); reward: {score_name}; "
          f"win_rate: against the SFT model's response, by reward (ties 1/2); length: response tokens")
    print(f"\nexample prompt: {results['examples'][0]['prompt']}")
    for key in ("reference", "sft", f"sft+{cfg.pref}"):
        print(f"  {key + ':':11}{results['examples'][0][key]}")
    print(f"\nsaved {out / 'sft'}, {out / 'final'}, {out / 'results.json'}")
    return results


if __name__ == "__main__":
    C.cli(main, Config)
