"""HBAT: Hybrid Alignment Training (arXiv 2406.15178), with its modified EWC and the ablations.

Two-stage alignment (SFT, then DPO/PPO) lets the second objective undo the first. HBAT alternates: the SFT
data and the preference data are each split into K shards, and round i is

    SFT stage on SFT shard i (--sft_epochs)  ->  preference stage on preference shard i (--pref_epochs)

each stage starting from the previous stage's output, with its own optimizer and learning-rate schedule;
a preference stage's reference (DPO) or KL reference (PPO) is the model at its start. Every stage but
round 1's SFT adds the modified EWC penalty of the authors' released code:

    F_n   = mean(((theta_n^after - theta_n^before) * s)^2)   drift of tensor n in the OTHER objective's last stage
    R     = R_prev + F                                       raw importance, one accumulator per stage type
    w_n   = R_n / sum_m R_m                                  (--ewc released: softmax_n(R), one-hot at s = 1e10)
    L_ewc = M * sum_n w_n * sum_j (lambda * (theta_nj - anchor_nj))^2,   anchor = the parameters at the stage start
            M = 0.1 in SFT stages, 100 in preference stages          (--ewc released: 100 in both)

The released softmax puts all the weight on one tensor, where the penalty does nothing; normalised by its
sum the weight spreads over the tensors the other objective moved (README, "HBAT").

    python hbat.py                         # built-in task, tiny model, HBAT with DPO (CPU, ~30 s)
    python hbat.py --pref ppo              # ... with a reward model and PPO
    python hbat.py --compare               # ... beside two-stage and the joint objective, same seed and budget
    python hbat.py --ewc released --schedule authors    # the authors' recipe (README)
    python hbat.py --ewc fisher|freeze|random|none      # ablations
    torchrun --nproc_per_node N hbat.py ...             # N processes: DDP, or --fsdp to shard the models
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import common as C


@dataclass
class Config(C.TrainConfig):
    """HBAT: alternate SFT and DPO/PPO stages over data shards, with the modified EWC. Shared settings: common.TrainConfig."""
    pref: str = "dpo"  # preference stage {dpo, ppo}
    rounds: int = 5  # K: shards of each data set, an SFT stage and a preference stage per shard (authors: 10) [1, inf)
    ewc: str = "hbat"  # regulariser: hbat (modified EWC), released (the authors' code exactly), fisher (textbook EWC), freeze (top tensors), random, none {hbat, released, fisher, freeze, random, none}
    ewc_max_weight: float = 0.1  # M of the hbat (and random) penalty in SFT stages (README: why 0.1) [0, inf)
    pref_ewc_max_weight: float = 100.0  # M of the hbat (and random) penalty in preference stages [0, inf)
    ewc_lambda: float = 1.0  # lambda inside the hbat (and random) penalty's square [0, inf)
    fisher_lambda: float = 1000.0  # --ewc fisher: lambda of (lambda / 2) * sum F (theta - anchor)^2 [0, inf)
    fisher_samples: int = 64  # --ewc fisher: examples of the other objective's last shard for the Fisher [1, inf)
    freeze_fraction: float = 0.2  # --ewc freeze: fraction of tensors (most important first) frozen for the stage [0, 1]
    schedule: str = "ours"  # ours: every stage by the schedule flags; authors: their per-stage schedule (AUTHORS_SCHEDULE, README) {ours, authors}
    compare: bool = False  # also run two-stage (K 1, --ewc none) and the joint objective on the same seed and budget
    joint_coef: float = 1.0  # --compare: the joint arm's --sft_coef (0: no joint arm) [0, inf)
    output_dir: str = "runs/hbat"  # final/, checkpoint/, reward_model/ (PPO), two_stage/ and joint/ (--compare), metrics.jsonl, results.json


RELEASED = {"mse_factor": 1e10, "max_weight": 100.0, "lambda": 1.0}  # --ewc released: s, M (every stage), lambda
# The authors' released scripts run every stage as its own job: cosine decay over the stage; SFT stages without
# warm-up, preference (RL) stages with 100 warm-up steps (at most half the stage here) and weight decay 0.1;
# AdamW betas (0.9, 0.95).
AUTHORS_SCHEDULE = {"sft": dict(lr_scheduler_type="cosine", warmup_steps=0, warmup_ratio=0.0, weight_decay=0.0, adam_beta2=0.95),
                    "pref": dict(lr_scheduler_type="cosine", warmup_steps=100, warmup_ratio=0.0, weight_decay=0.1, adam_beta2=0.95)}


def check(cfg: Config) -> list[str]:
    return ["--ewc fisher needs whole models: run it under torchrun without --fsdp"] if cfg.fsdp and cfg.ewc == "fisher" else []


# ============================================================================================
# The regulariser of a stage: importance bookkeeping, then the penalty (or frozen tensors)
# ============================================================================================
# state["drift"][kind] is R for the stages of type `kind`: the summed drift importance of every `kind` stage so far.
# A stage is guarded by the other type's R: an SFT stage by the drift of all the preference stages before it, a
# preference stage by that of all the SFT stages before it (the one just done included).


def other(kind: str) -> str:
    return "pref" if kind == "sft" else "sft"


def record_drift(state: dict, kind: str, before: dict, after: dict) -> None:
    """After a `kind` stage: R_kind += F(before -> after). (s matters only to the softmax: R / sum R drops it.)"""
    drift = {n: C.drift_importance(C.whole(before[n]), C.whole(after[n]), RELEASED["mse_factor"]) for n in before}
    state["drift"][kind] = C.accumulate_importance(state["drift"][kind], drift)


def random_importance(names: list[str], seed: int) -> dict[str, float]:
    """HAT-Random: softmax of uniform random scores in [0, 1), one per tensor, seeded per stage."""
    scores = torch.rand(len(names), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return C.softmax_importance(dict(zip(names, scores.tolist())))


def most_important(raw: dict, fraction: float) -> list[str]:
    """HAT-Freeze: the top round(fraction * n) tensors by raw importance (ties: first in model order)."""
    return sorted(raw, key=lambda n: -raw[n])[: round(fraction * len(raw))]


def stage_regulariser(cfg: Config, model, state: dict, kind: str, seed: int, other_examples: list, device, dtype):
    """(penalty or None, tensors to freeze, a short description, {"ewc_entropy", "ewc_top"}) of the stage about
    to start; the anchor is the weights now. Round 1's SFT stage has no importance yet: no regulariser."""
    raw = state["drift"][other(kind)]  # this stage is guarded by what the other type's stages so far moved
    if cfg.ewc == "none" or raw is None:
        return None, [], "-", {}
    if cfg.ewc == "freeze":
        frozen = most_important(raw, cfg.freeze_fraction)
        return None, frozen, f"froze {len(frozen)} of {len(raw)}", {}
    params = C.my_part(C.trainable(model))  # this rank's part: the penalty adds up once over ranks
    anchor = C.snapshot(params)
    if cfg.ewc == "fisher":  # textbook EWC: the per-sample diagonal Fisher of the other objective's last shard
        fisher = C.empirical_fisher(model, other_examples[: cfg.fisher_samples], device, dtype)
        return functools.partial(C.ewc_penalty, params, fisher, anchor, cfg.fisher_lambda), [], "fisher", {}
    max_weight, lam = (cfg.ewc_max_weight if kind == "sft" else cfg.pref_ewc_max_weight), cfg.ewc_lambda
    if cfg.ewc == "released":  # w = softmax(R), one-hot at s = 1e10; M = 100 in every stage
        weights, max_weight, lam = C.softmax_importance(raw), RELEASED["max_weight"], RELEASED["lambda"]
    else:
        weights = random_importance(list(raw), seed) if cfg.ewc == "random" else C.sum_importance(raw)  # w = R / sum R
    top = max(weights, key=weights.get)
    entropy, top_weight = C.weight_spread(weights)
    return (functools.partial(C.hbat_penalty, params, weights, anchor, lam, max_weight), [],
            f"{top.removeprefix('model.')} {weights[top]:.2f}", {"ewc_entropy": entropy, "ewc_top": top_weight})


def ewc_share(records: list[dict]) -> float | None:
    """How much the penalty weighs in a stage: mean loss/ewc over its steps / the mean magnitude of its task
    loss (loss/sft, loss/dpo or loss/policy). None without a penalty."""
    steps = [r for r in records if "loss/ewc" in r]
    if not steps:
        return None
    task = next(k for k in steps[0] if k in ("loss/sft", "loss/dpo", "loss/policy"))
    task_mean = sum(abs(r[task]) for r in steps) / len(steps)
    return sum(r["loss/ewc"] for r in steps) / len(steps) / task_mean if task_mean > 0 else None


# ============================================================================================
# The alternation
# ============================================================================================


def alternate(cfg: Config, policy, shards: dict, state: dict, *, train_stage, after_stage, device, dtype) -> None:
    """HBAT. For round i = 1..K, an SFT stage on SFT shard i, then a preference stage on preference shard i:
       1. the regulariser, from the drift the other objective made (none in round 1's SFT stage);
       2. the stage, from the previous stage's output, under that regulariser (train_stage);
       3. this stage's drift, recorded to guard the other objective's next stages;
       4. after_stage: evaluation and a checkpoint (handed in).
    Continues from state["next_stage"]; stage j (0-based) shuffles with seed + j, so round 1 has the
    two-stage baseline's seeds."""
    for index in range(state["next_stage"], 2 * cfg.rounds):
        round_, kind = index // 2 + 1, ("sft", "pref")[index % 2]
        # the other objective's most recent shard (--ewc fisher's data)
        other_examples = shards["sft"][round_ - 1] if kind == "pref" else [p["chosen"] for p in shards["pref"][max(round_ - 2, 0)]]
        penalty, frozen, regulariser, spread = stage_regulariser(cfg, policy, state, kind, cfg.seed + index, other_examples, device, dtype)
        for name, p in policy.named_parameters():
            p.requires_grad_(name not in frozen)
        before = C.snapshot(dict(policy.named_parameters()))
        records = train_stage(kind, round_, shards[kind][round_ - 1], penalty, cfg.seed + index)
        policy.requires_grad_(True)
        record_drift(state, kind, before, dict(policy.named_parameters()))
        state["next_stage"] = index + 1
        after_stage(kind, round_, regulariser, {**spread, **({"ewc_share": s} if (s := ewc_share(records)) is not None else {})})


def run_arm(cfg: Config, run, out, checkpoint: dict | None, policy=None, log=None, against: dict | None = None,
            reward_model_dir=None) -> dict:
    """One run of the alternation into `out` (--compare: two-stage = K 1 without a regulariser, joint = that
    with --sft_coef, and HBAT), from `checkpoint` or the start. Each stage is evaluated and checkpointed.
    --pref ppo: the reward model is `reward_model_dir`'s, or trained once, on every pair, from the model
    after round 1's SFT stage; each PPO stage gets a fresh critic copied from it."""
    arm = SimpleNamespace(**{**vars(run), "cfg": cfg, "out": out})
    device, dtype, tokenizer, data = run.device, run.dtype, run.tokenizer, run.data
    if policy is None:  # (the first arm's policy comes from main, which loaded it before anything was written)
        policy = C.place(C.load_model(str(checkpoint["folder"]) if checkpoint else cfg.model, tokenizer, cfg.trust_remote_code, cfg.seed),
                         cfg, device)
    if log is None:  # (the HBAT arm logs into --output_dir itself, opened by main)
        out.mkdir(exist_ok=True)
        log = C.open_log(out, checkpoint["metrics_lines"] if checkpoint else 0)
    state = {k: checkpoint[k] for k in ("next_stage", "drift", "trajectory", "first_outputs", "last_responses", "score_name")} \
        if checkpoint else {"next_stage": 0, "drift": {"sft": None, "pref": None}, "trajectory": [], "first_outputs": None,
                            "last_responses": [], "score_name": ""}
    reward_model = None
    if cfg.pref == "ppo" and (reward_model_dir or state["next_stage"] > 0):  # given, or trained before the checkpoint
        reward_model = C.load_reward_model(str(reward_model_dir or out / "reward_model"), tokenizer, cfg.trust_remote_code, flag="")
        C.place(reward_model, cfg, device).requires_grad_(False)
    if checkpoint:
        print(f"[{out.name}] resuming after stage {state['next_stage']} of {2 * cfg.rounds}")
        C.restore_rng(checkpoint["rng"])  # last, after every model is loaded
    shards = {"sft": C.split(data["sft"], cfg.rounds), "pref": C.split(data["pref"], cfg.rounds)}
    name = lambda kind, round_: f"round {round_} {'sft' if kind == 'sft' else cfg.pref}"  # noqa: E731

    def train_stage(kind, round_, shard, penalty, seed) -> list[dict]:
        nonlocal reward_model
        stage_cfg = dataclasses.replace(cfg, **AUTHORS_SCHEDULE[kind]) if cfg.schedule == "authors" else cfg
        records = []  # the stage's logged steps, for ewc_share
        args = dict(device=device, dtype=dtype, seed=seed, desc=name(kind, round_), log=lambda r: (records.append(r), log(r)), penalty=penalty)
        if kind == "sft":
            C.train_sft(policy, shard, stage_cfg, **args)
            if cfg.pref == "ppo" and reward_model is None:
                reward_model = reward_model_from(policy, run, cfg, out, log)
        elif cfg.pref == "dpo":  # the reference: the policy at the stage start
            C.train_dpo(policy, shard, stage_cfg, **args)
        else:
            critic = C.clone_model(reward_model).requires_grad_(True) if cfg.critic else None
            C.train_ppo(policy, C.frozen_copy(policy), reward_model, critic, [p["prompt_ids"] for p in shard], stage_cfg,
                        sft_examples=shards["sft"][round_ - 1], **args)
        return records

    def after_stage(kind, round_, regulariser, spread) -> None:
        judge = run.judge if run.judge is not None else reward_model
        score_fn, state["score_name"] = C.preference_scorer(data["builtin"], judge, run.judge is not None, tokenizer, cfg, device, dtype)
        metrics, outputs = C.evaluate(policy, tokenizer, data["test"], cfg, device=device, dtype=dtype, score_fn=score_fn,
                                      against=against or state["first_outputs"], desc=f"eval {name(kind, round_)}")
        state["first_outputs"] = state["first_outputs"] or outputs
        state["trajectory"].append({"stage": name(kind, round_), "ewc": regulariser, **metrics, **spread})
        state["last_responses"] = outputs["responses"][:5]
        log({"stage": f"eval {name(kind, round_)}", **metrics})
        print(f"[{out.name}] {name(kind, round_)}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f"; ewc: {regulariser}")
        C.save_checkpoint(arm, state, policy, reads=[] if reward_model is None or reward_model_dir else ["reward_model"])

    alternate(cfg, policy, shards, state, train_stage=train_stage, after_stage=after_stage, device=device, dtype=dtype)
    C.save_model(policy, tokenizer, out / "final")
    return state


def reward_model_from(policy, run, cfg: Config, out, log):
    """--pref ppo: the reward model, trained once on every preference pair from the policy now (after round 1's
    SFT stage; for K = 1, the full SFT model), its head fresh; saved to out/reward_model."""
    staging = out / "reward_model.tmp"  # the policy on disk, read back with a fresh head (a leftover is cleared like any .tmp)
    C.save_model(policy, run.tokenizer, staging)
    reward_model = C.place(C.load_reward_model(str(staging), run.tokenizer, cfg.trust_remote_code, flag="", new_head=True), cfg, run.device)
    C.barrier()  # every rank has read it
    if C.is_main():
        shutil.rmtree(staging)
    C.train_reward_model(reward_model, run.data["pref"], cfg, device=run.device, dtype=run.dtype, seed=cfg.seed, log=log)
    C.save_model(reward_model, run.tokenizer, out / "reward_model")
    return reward_model.requires_grad_(False)


# ============================================================================================
# Main: the run(s), the summary
# ============================================================================================


def main(cfg: Config) -> dict:
    run = C.prepare(cfg, problems=check(cfg))
    if cfg.rounds > min(len(run.data["sft"]), len(run.data["pref"])):
        raise C.ConfigError(f"--rounds {cfg.rounds} leaves an empty shard ({len(run.data['sft'])} SFT rows, "
                            f"{len(run.data['pref'])} preference pairs)")
    arms = [("hbat", cfg, run.out)]
    if cfg.compare:  # HBAT with K 1 and no regulariser *is* two-stage training; joint is that with --sft_coef
        baseline = dataclasses.replace(cfg, rounds=1, ewc="none", schedule="ours", sft_coef=0.0)
        joint = dataclasses.replace(baseline, sft_coef=cfg.joint_coef)
        arms[:0] = [("two-stage", baseline, run.out / "two_stage")] + ([("joint", joint, run.out / "joint")] if cfg.joint_coef else [])
    checkpoints = [C.load_checkpoint(folder, arm_cfg) if cfg.resume and arm != "hbat" else run.checkpoint for arm, arm_cfg, folder in arms]
    for checkpoint in checkpoints:
        C.check_inputs_unchanged(checkpoint, run.data, run.inputs)
    first = C.load_model(str(checkpoints[0]["folder"]) if checkpoints[0] else arms[0][1].model, run.tokenizer, cfg.trust_remote_code, cfg.seed)
    log = C.begin(run, first, resumed=any(checkpoints))
    print(f"{len(run.data['sft'])} SFT rows and {len(run.data['pref'])} preference pairs in {cfg.rounds} shards each; HBAT with "
          f"{cfg.pref}, --ewc {cfg.ewc}, --schedule {cfg.schedule}" + (f"; beside: {', '.join(a for a, *_ in arms[:-1])}" if cfg.compare else ""))
    # with --compare every PPO arm optimises one reward model, the baseline's (from its SFT model); wins are against its SFT model
    results, against, reward_model_dir = {}, None, run.out / "two_stage" / "reward_model" if cfg.compare and cfg.pref == "ppo" else None
    for i, (arm, arm_cfg, folder) in enumerate(arms):
        results[arm] = run_arm(arm_cfg, run, folder, checkpoints[i], first if i == 0 else None, log if arm == "hbat" else None,
                               against=against, reward_model_dir=reward_model_dir if i > 0 else None)
        against = against or (results[arm]["first_outputs"] if cfg.compare else None)

    # ---------------------------------------------------------------- report
    hbat = results["hbat"]
    print(f"\nHBAT trajectory (win_rate against {'the two-stage SFT model' if cfg.compare else 'round 1 SFT model'}; ewc: the "
          f"regulariser, for hbat/random the most-weighted tensor and its weight; ewc_entropy, ewc_top: entropy (nats) and largest "
          f"of the tensor weights; ewc_share: mean loss/ewc / mean task loss)\n" + format_trajectory(hbat["trajectory"]))
    columns = ({"two-stage sft": results["two-stage"]["trajectory"][0]} if cfg.compare else {}) | \
        {f"{arm} {cfg.pref}": r["trajectory"][-1] for arm, r in results.items()}
    columns = {k: {m: v for m, v in c.items() if m != "stage" and not m.startswith("ewc")} for k, c in columns.items()}
    extra = {f"{arm.replace('-', '_')}_trajectory": r["trajectory"] for arm, r in results.items() if arm != "hbat"}
    return C.finish(run, {"reward_metric": hbat["score_name"], "win_rate_against": "the two-stage SFT model" if cfg.compare else
                          "round 1's SFT model", **columns, "trajectory": hbat["trajectory"], **extra}, columns,
                    "win_rate: against " + ("the two-stage SFT model" if cfg.compare else "round 1's SFT model") + ", by reward (ties 1/2)",
                    {f"{arm}": r["last_responses"] for arm, r in results.items()}, [run.out / "final"])


def format_trajectory(trajectory: list[dict]) -> str:
    keys = [k for k in dict.fromkeys(k for row in trajectory for k in row) if k not in ("stage", "ewc")]
    widths = {k: max(10, len(k) + 2) for k in keys}
    lines = [f"{'stage':<20}" + "".join(f"{k:>{widths[k]}}" for k in keys) + "  ewc"]
    for row in trajectory:  # ewc_share spans decades: 3 significant digits
        lines.append(f"{row['stage']:<20}" + "".join(f"{row[k]:>{widths[k]}.{'3g' if k == 'ewc_share' else '3f'}}" if isinstance(row.get(k), float)
                                                     else f"{'n/a':>{widths[k]}}" for k in keys) + f"  {row['ewc']}")
    return "\n".join(lines)


if __name__ == "__main__":
    C.cli(main, Config)
