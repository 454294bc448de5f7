"""Two-stage alignment, the baseline both papers measure against.

Stage 1, instruction following: SFT on (prompt, response) demonstrations, loss on response tokens only.
Stage 2, human preference, one of
  --pref dpo: L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
              reference = a frozen copy of the SFT model;
  --pref ppo: a Bradley-Terry reward model  L_RM = -log sigmoid(r(x, y_w) - r(x, y_l)),  then PPO on the
              prompts with per-token reward -kl_coef * KL(pi || SFT) plus r(x, y) on the last token, GAE,
              clipped policy and value losses, value model initialised from the reward model.
With --sft_coef a, stage 2 optimises both objectives at once (the joint baseline): DPO plus a times the
chosen response's per-token NLL (RPO), or PPO plus a times the SFT loss on a batch of SFT rows (PPO-ptx).

    python two_stage_baseline.py                      # built-in task, tiny model, SFT then DPO (CPU, ~30 s)
    python two_stage_baseline.py --pref ppo           # SFT, then reward model, then PPO
    python two_stage_baseline.py --sft_coef 1         # SFT, then DPO + NLL (the joint objective)
    torchrun --nproc_per_node N two_stage_baseline.py ...   # N processes: DDP, or --fsdp to shard the models
"""
from __future__ import annotations

from dataclasses import dataclass

import common as C


@dataclass
class Config(C.TrainConfig):
    """Two-stage baseline: SFT, then DPO or PPO (--sft_coef: both objectives at once). Shared settings: common.TrainConfig."""
    pref: str = "dpo"  # preference stage {dpo, ppo}
    output_dir: str = "runs/two_stage"  # models (sft/, final/, reward_model/), checkpoint/, metrics.jsonl, results.json


def main(cfg: Config) -> dict:
    # ---------------------------------------------------------------- set-up: every check before any file is written
    run = C.prepare(cfg)
    next_stage = run.checkpoint["next_stage"] if run.checkpoint else 0  # 1: SFT done; 2: the reward model and SFT evaluation too
    policy = C.load_model(str(run.out / "sft") if run.checkpoint else cfg.model, run.tokenizer, cfg.trust_remote_code, cfg.seed)
    reward_model = None
    if next_stage == 2 and cfg.pref == "ppo":
        reward_model = C.load_reward_model(str(run.out / "reward_model"), run.tokenizer, cfg.trust_remote_code, flag="")
    log = C.begin(run, policy, reward_model)
    device, dtype, tokenizer, data = run.device, run.dtype, run.tokenizer, run.data

    # ---------------------------------------------------------------- stage 1: instruction following (SFT)
    if next_stage < 1:
        C.train_sft(policy, data["sft"], cfg, device=device, dtype=dtype, seed=cfg.seed, desc="sft", log=log)
        C.save_model(policy, tokenizer, run.out / "sft")
        C.save_checkpoint(run, {"next_stage": 1}, reads=["sft"])  # --resume continues from sft/, its sha256 recorded
    if next_stage < 2 and cfg.pref == "ppo":  # the reward model starts from the SFT model, as in InstructGPT
        reward_model = C.load_reward_model(str(run.out / "sft"), tokenizer, cfg.trust_remote_code, flag="", new_head=True)
        C.place(reward_model, cfg, device)
        C.train_reward_model(reward_model, data["pref"], cfg, device=device, dtype=dtype, seed=cfg.seed, log=log)
        C.save_model(reward_model, tokenizer, run.out / "reward_model")
    judge = run.judge if run.judge is not None else reward_model
    score_fn, score_name = C.preference_scorer(data["builtin"], judge, run.judge is not None, tokenizer, cfg, device, dtype)
    if next_stage < 2:
        sft_metrics, sft_outputs = C.evaluate(policy, tokenizer, data["test"], cfg, device=device, dtype=dtype, score_fn=score_fn,
                                              desc="eval sft")
        log({"stage": "eval sft", **sft_metrics})
        C.save_checkpoint(run, {"next_stage": 2, "sft_metrics": sft_metrics, "sft_outputs": sft_outputs},
                          reads=["sft", "reward_model"] if cfg.pref == "ppo" else ["sft"])
    else:
        sft_metrics, sft_outputs = run.checkpoint["sft_metrics"], run.checkpoint["sft_outputs"]

    # ---------------------------------------------------------------- stage 2: human preference (DPO or PPO)
    if cfg.pref == "dpo":  # the reference: the SFT model, frozen (train_dpo: the policy at its start)
        C.train_dpo(policy, data["pref"], cfg, device=device, dtype=dtype, seed=cfg.seed + 1, log=log)
    else:
        value_model = C.clone_model(reward_model) if cfg.critic else None  # the critic starts from the reward model
        C.train_ppo(policy, C.frozen_copy(policy), reward_model.requires_grad_(False), value_model,
                    [p["prompt_ids"] for p in data["pref"]], cfg, device=device, dtype=dtype, seed=cfg.seed + 1, log=log,
                    sft_examples=data["sft"])
    C.save_model(policy, tokenizer, run.out / "final")

    # ---------------------------------------------------------------- evaluation: SFT and final side by side
    final_metrics, final_outputs = C.evaluate(policy, tokenizer, data["test"], cfg, device=device, dtype=dtype, score_fn=score_fn,
                                              against=sft_outputs, desc="eval final")
    log({"stage": "eval final", **final_metrics})
    final = f"sft+{cfg.pref}"
    return C.finish(run, {"reward_metric": score_name, "sft": sft_metrics, final: final_metrics},
                    {"sft": sft_metrics, final: final_metrics}, "win_rate: against the SFT model's response, by reward (ties 1/2)",
                    {"sft": sft_outputs["responses"][:5], final: final_outputs["responses"][:5]},
                    [run.out / "sft", run.out / "final"] + ([run.out / "reward_model"] if cfg.pref == "ppo" else []))


if __name__ == "__main__":
    C.cli(main, Config)
