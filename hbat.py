"""HBAT: Hybrid Alignment Training (arXiv 2406.15178), with its modified EWC and the ablations.

Two-stage alignment (SFT, then DPO/PPO) lets the second objective undo the first. HBAT alternates:
the SFT data and the preference data are each split into K shards, and round i is

    SFT stage on SFT shard i (--sft_epochs)  ->  preference stage on preference shard i (--pref_epochs)

each stage starting from the previous stage's output; the DPO reference / PPO KL reference of a
preference stage is the model at the start of that stage. Every stage but round 1's SFT adds the
modified EWC penalty of the authors' released code (../shared/METHODS.md section 2):

    F_n   = mean(((theta_n^after - theta_n^before) * s)^2)   drift of tensor n in the OTHER objective's last stage
    R     = R_prev + F_n                                     raw importance, one accumulator per stage type
    w_n   = R_n / sum_m R_m                                  (--ewc released: softmax_n(R), one-hot at s = 1e10)
    L_ewc = M * sum_n w_n * sum_j (lambda * (theta_nj - anchor_nj))^2,   anchor = parameters at the stage start
            M = 1 in SFT stages, 100 in preference stages            (--ewc released: 100 in both)

The released softmax puts all the weight on one tensor, a layer norm in the preference stages, where
the penalty then stays below 1e-3 of the DPO loss: it does nothing. Normalised by its sum, the weight
spreads over the tensors the other objective moved, and the penalty is a real part of every stage's
loss; the two M were chosen by a 5-seed study (README, "HBAT"). `--ewc released` is the released
setting exactly.

    python hbat.py                         # built-in task, tiny model, HBAT with DPO (CPU, ~1 min)
    python hbat.py --pref ppo              # ... with a reward model and PPO
    python hbat.py --compare               # ... and the two-stage baseline on the same seed, side by side
    python hbat.py --ewc released|fisher|freeze|random|none    # ablations
    torchrun --nproc_per_node N hbat.py ...           # N processes: DDP, or --fsdp to shard the models
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import common as C


@dataclass
class Config(C.TrainConfig):
    """HBAT: alternate SFT and DPO/PPO stages over data shards with the modified EWC. Shared settings
    are documented in common.TrainConfig."""
    pref: str = "dpo"  # preference stage: dpo | ppo
    rounds: int = 5  # K: shards of each data set, one SFT stage and one preference stage per shard (authors: 10)
    ewc: str = "hbat"  # regulariser: hbat (modified EWC) | released (the authors' code exactly) | fisher (textbook EWC) | freeze (top 20% tensors) | random | none
    ewc_max_weight: float = 1.0  # M of the hbat (and random) penalty in SFT stages
    pref_ewc_max_weight: float = 100.0  # M of the hbat (and random) penalty in preference stages (the authors' script sets the two apart)
    ewc_lambda: float = 1.0  # lambda inside the hbat (and random) penalty's square
    fisher_lambda: float = 1000.0  # --ewc fisher: lambda of (lambda / 2) * sum F (theta - anchor)^2
    fisher_samples: int = 64  # --ewc fisher: examples of the other objective's last shard for the Fisher
    freeze_fraction: float = 0.2  # --ewc freeze: fraction of tensors (most important first) frozen for the stage
    compare: bool = False  # also run the two-stage baseline (= K 1, --ewc none) on the same seed and budget (PPO: both use its reward model)
    output_dir: str = "runs/hbat"  # final/, checkpoint/, reward_model/ (PPO), two_stage/ (--compare), metrics.jsonl, results.json
    RANGES = {"rounds": "[1, inf)", "ewc_max_weight": "[0, inf)", "pref_ewc_max_weight": "[0, inf)", "ewc_lambda": "[0, inf)",
              "fisher_lambda": "[0, inf)", "fisher_samples": "[1, inf)", "freeze_fraction": "[0, 1]"}
    CHOICES = {"pref": ("dpo", "ppo"), "ewc": ("hbat", "released", "fisher", "freeze", "random", "none")}


RELEASED = {"mse_factor": 1e10, "max_weight": 100.0, "lambda": 1.0}  # --ewc released: s, M (every stage), lambda


def check(cfg: Config) -> None:
    problems = []
    if cfg.fsdp and cfg.ewc == "fisher":  # its per-sample gradients would be summed over ranks by FSDP's backward
        problems.append("--ewc fisher needs whole models: run it under torchrun without --fsdp")
    C.check_config(cfg, problems=problems)


# ============================================================================================
# Shards and stages
# ============================================================================================


def stage_list(rounds: int) -> list[tuple[int, str]]:
    """[(1, "sft"), (1, "pref"), (2, "sft"), ...]: the order of the alternation."""
    return [(r, kind) for r in range(1, rounds + 1) for kind in ("sft", "pref")]


def other(kind: str) -> str:
    return "pref" if kind == "sft" else "sft"


# ============================================================================================
# HBAT's regulariser: importance bookkeeping, and the penalty (or frozen tensors) of one stage
# ============================================================================================
# state["importance"][kind] is the raw accumulator that feeds stages of type `kind`: the summed drift
# importance of every past stage of the other type. After a stage ends, its drift is added to the
# accumulator of the other type (METHODS.md section 2: an SFT stage is guarded by the drift of the
# preceding preference stage, a preference stage by the drift of the SFT stage just done).


def record_drift(state: dict, kind: str, before: dict, after: dict, cfg: Config) -> None:
    """After a `kind` stage: R_other += F(before -> after)."""
    drift = C.drift_importance(before, after, RELEASED["mse_factor"])  # s only matters to the softmax: R / sum R drops it
    state["importance"][other(kind)] = C.accumulate_importance(state["importance"][other(kind)], drift)


def random_importance(names: list[str], seed: int) -> dict[str, float]:
    """HAT-Random: softmax of uniform random scores in [0, 1), one per tensor, seeded per stage."""
    scores = torch.rand(len(names), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return C.softmax_importance(dict(zip(names, scores.tolist())))


def most_important(raw: dict, fraction: float) -> list[str]:
    """HAT-Freeze: the top round(fraction * n) tensors by raw importance (ties: first in model order)."""
    ranked = sorted(raw, key=lambda n: -raw[n])
    return ranked[: round(fraction * len(raw))]


def stage_regulariser(cfg: Config, model, state: dict, kind: str, seed: int, other_examples: list, device, dtype):
    """(penalty callable or None, tensor names to freeze, a short description, {"ewc_entropy", "ewc_top"}:
    how the weights spread) for the stage about to start. The anchor is the parameters now, at the
    stage start. Round 1's SFT stage has no importance yet, so no regulariser."""
    raw = state["importance"][kind]
    if cfg.ewc == "none" or raw is None:
        return None, [], "-", {}
    if cfg.ewc == "freeze":
        frozen = most_important(raw, cfg.freeze_fraction)
        return None, frozen, f"froze {len(frozen)} of {len(raw)}", {}
    anchor = C.snapshot(model)
    if cfg.ewc == "fisher":  # textbook EWC: per-sample diagonal Fisher of the other objective's last shard
        fisher = C.empirical_fisher(model, other_examples[: cfg.fisher_samples], device, dtype)
        return functools.partial(C.ewc_penalty, model, fisher, anchor, cfg.fisher_lambda), [], "fisher", {}
    max_weight, lam = (cfg.ewc_max_weight if kind == "sft" else cfg.pref_ewc_max_weight), cfg.ewc_lambda
    if cfg.ewc == "released":  # w = softmax(R), one-hot at s = 1e10; M = 100 in every stage
        weights, max_weight, lam = C.softmax_importance(raw), RELEASED["max_weight"], RELEASED["lambda"]
    elif cfg.ewc == "random":
        weights = random_importance(list(raw), seed)
    else:  # w = R / sum R
        weights = C.sum_importance(raw)
    top = max(weights, key=weights.get)
    penalty = functools.partial(C.hbat_penalty, model, weights, anchor, lam, max_weight)
    entropy, top_weight = C.weight_spread(weights)
    return penalty, [], f"{top.removeprefix('model.')} {weights[top]:.2f}", {"ewc_entropy": entropy, "ewc_top": top_weight}


def ewc_share(records: list[dict]) -> float | None:
    """How much the penalty weighs in a stage: mean loss/ewc over the stage's optimizer steps divided by
    the mean magnitude of its task loss (loss/sft, loss/dpo or loss/policy). None without a penalty."""
    steps = [r for r in records if "loss/ewc" in r]
    if not steps:
        return None
    task = next(k for k in steps[0] if k in ("loss/sft", "loss/dpo", "loss/policy"))
    task_mean = sum(abs(r[task]) for r in steps) / len(steps)
    return sum(r["loss/ewc"] for r in steps) / len(steps) / task_mean if task_mean > 0 else None


# ============================================================================================
# One HBAT run (with --ewc none and --rounds 1 it is the two-stage baseline)
# ============================================================================================


def train_stage(cfg: Config, kind: str, policy, shard: list, reward_model, *, penalty, seed: int, name: str, log,
                device, dtype) -> None:
    """One stage from the policy's current weights. A preference stage's reference (DPO) or KL
    reference (PPO) is a frozen copy of the policy at the start of that stage."""
    if kind == "sft":
        C.train_sft(policy, shard, cfg, device=device, dtype=dtype, seed=seed, desc=name, log=log, penalty=penalty)
        return
    if cfg.pref == "dpo":  # train_dpo's reference is the policy at its start
        C.train_dpo(policy, shard, cfg, device=device, dtype=dtype, seed=seed, desc=name, log=log, penalty=penalty)
    else:
        value_model = C.clone_model(reward_model).requires_grad_(True) if cfg.critic else None  # a fresh critic from the RM
        C.train_ppo(policy, C.frozen_copy(policy), reward_model, value_model, [p["prompt_ids"] for p in shard], cfg,
                    device=device, dtype=dtype, seed=seed, desc=name, log=log, penalty=penalty)


def reward_model_from(policy, tokenizer, data: dict, cfg: Config, out: Path, log, device, dtype):
    """--pref ppo: the reward model is trained once, on all preference pairs, from the model after round
    1's SFT stage (for K = 1, the baseline's SFT model); every PPO stage reuses it."""
    staging = out / "reward_model.tmp"  # the policy on disk, read back with a fresh head; a leftover is cleared like any .tmp
    C.save_model(policy, tokenizer, staging)
    reward_model = C.load_reward_model(str(staging), tokenizer, cfg.trust_remote_code, flag="", new_head=True)
    C.place(reward_model, cfg, device)
    C.barrier()  # every rank has read it
    if C.is_main():
        shutil.rmtree(staging)
    C.train_reward_model(reward_model, data["pref"], cfg, device=device, dtype=dtype, seed=cfg.seed, log=log)
    C.save_model(reward_model, tokenizer, out / "reward_model")
    return reward_model.requires_grad_(False)


def start_policy(cfg: Config, checkpoint: dict | None):
    """Seed, then load the run's starting policy: its checkpoint's, or --model (for `tiny`, the seeded
    warm start, common.warm_start). The order matters: every run draws the same random numbers as the two-stage baseline."""
    C.seed_everything(cfg.seed)
    return C.load_model_and_tokenizer(str(checkpoint["folder"]) if checkpoint else cfg.model, cfg.trust_remote_code, cfg.seed)


def run(cfg: Config, data: dict, out: Path, checkpoint: dict | None, judge=None, against: dict | None = None,
        against_name: str = "", loaded: tuple | None = None, reward_model_dir: Path | None = None) -> dict:
    """Train, evaluating and checkpointing after every stage; `checkpoint` is a saved state to continue
    from (common.load_checkpoint) or None; `loaded` is start_policy()'s result when main already loaded
    it. Win rates are against `against` (another model's evaluate() outputs) or else against this run's
    first stage (round 1's SFT model). --pref ppo: `reward_model_dir` is another run's reward model to
    use (--compare: the baseline's), else this run trains its own after round 1's SFT stage."""
    device = C.pick_device(cfg.device)
    dtype = C.pick_dtype(cfg.dtype, device)
    out.mkdir(parents=True, exist_ok=True)
    policy, tokenizer = loaded or start_policy(cfg, checkpoint)
    state = {"next_stage": 0, "importance": {"sft": None, "pref": None}, "trajectory": [], "first_outputs": None,
             "last_responses": [], "score_name": ""}
    if checkpoint:
        state = {k: checkpoint[k] for k in state}
        print(f"resuming {out} after stage {state['next_stage']} of {2 * cfg.rounds}")
    elif cfg.resume:
        print(f"--resume: no checkpoint in {out}; starting from the beginning")
    log = C.open_log(out, checkpoint["metrics_lines"] if checkpoint else 0)
    C.place(policy, cfg, device)
    sft_shards, pref_shards = C.shards(data["sft"], cfg.rounds), C.shards(data["pref"], cfg.rounds)
    reward_model = None
    if cfg.pref == "ppo" and (reward_model_dir or state["next_stage"] > 0):  # given, or resumed after it was trained
        reward_model = C.load_reward_model(str(reward_model_dir or out / "reward_model"), tokenizer, cfg.trust_remote_code, flag="")
        C.place(reward_model, cfg, device).requires_grad_(False)
    if checkpoint:  # last, after every model is loaded: the rest of the run draws what it would have
        C.restore_rng(checkpoint["rng"])

    stages = stage_list(cfg.rounds)
    for index in range(state["next_stage"], len(stages)):
        round_, kind = stages[index]
        name = f"round {round_} {kind if kind == 'sft' else cfg.pref}"
        seed = cfg.seed + index  # SFT of round 1 gets seed, its preference stage seed + 1: as the baseline
        # the other objective's most recent shard, for --ewc fisher (round 1's SFT stage has no regulariser)
        other_examples = sft_shards[round_ - 1] if kind == "pref" else [p["chosen"] for p in pref_shards[max(round_ - 2, 0)]]
        penalty, frozen, regulariser, spread = stage_regulariser(cfg, policy, state, kind, seed, other_examples, device, dtype)
        for param_name, p in policy.named_parameters():
            p.requires_grad_(param_name not in frozen)
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        shard = (sft_shards if kind == "sft" else pref_shards)[round_ - 1]
        # Each stage gets a fresh AdamW (the authors run every stage as its own job), but the learning-rate
        # warm-up happens once per objective, in round 1: later stages run at the full rate, as one
        # continuous run would. Otherwise short stages would train at a lower average rate than the baseline.
        stage_cfg = cfg if round_ == 1 else dataclasses.replace(cfg, warmup_steps=0)
        records = []  # the stage's logged steps, for ewc_share

        def log_stage(record: dict) -> None:
            records.append(record)
            log(record)

        train_stage(stage_cfg, kind, policy, shard, reward_model, penalty=penalty, seed=seed, name=name, log=log_stage,
                    device=device, dtype=dtype)
        policy.requires_grad_(True)
        record_drift(state, kind, before, {n: p.detach() for n, p in policy.named_parameters()}, cfg)
        if cfg.pref == "ppo" and reward_model is None:
            reward_model = reward_model_from(policy, tokenizer, data, cfg, out, log, device, dtype)

        # ------------------------------------------------------------ evaluate, then checkpoint the stage
        score_fn, score_name = C.preference_scorer(data["builtin"], judge if judge is not None else reward_model,
                                                   judge is not None, tokenizer, cfg, device, dtype)
        metrics, outputs = C.evaluate(policy, tokenizer, data["test"], cfg, device=device, dtype=dtype, score_fn=score_fn,
                                      against=against if against is not None else state["first_outputs"], desc=f"eval {name}")
        state["first_outputs"] = state["first_outputs"] or outputs
        share = ewc_share(records)
        state["trajectory"].append({"stage": name, "ewc": regulariser, **metrics, **spread,
                                    **({"ewc_share": share} if share is not None else {})})
        state["last_responses"], state["score_name"] = outputs["responses"][:5], score_name
        log({"stage": f"eval {name}", **metrics})
        print(f"[{out.name}] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f"; ewc: {regulariser}")
        state["next_stage"] = index + 1
        C.save_checkpoint(out, cfg, state, policy, tokenizer)

    C.save_model(policy, tokenizer, out / "final")
    return {"model": policy, "tokenizer": tokenizer, "trajectory": state["trajectory"], "score_name": state["score_name"],
            "first_outputs": state["first_outputs"], "responses": state["last_responses"],
            "win_rate_against": against_name or "round 1's SFT model"}


# ============================================================================================
# Main: data, the run(s), the summary
# ============================================================================================


def main(cfg: Config) -> dict:
    # ---------------------------------------------------------------- set-up: every check before any file is written
    check(cfg)
    out = Path(cfg.output_dir)
    # the two-stage baseline is HBAT with one round and no regulariser (tests/test_hbat.py); each run has its checkpoint
    runs = ([(dataclasses.replace(cfg, rounds=1, ewc="none"), out / "two_stage")] if cfg.compare else []) + [(cfg, out)]
    states = [C.load_checkpoint(folder, run_cfg) if cfg.resume else None for run_cfg, folder in runs]
    first = start_policy(runs[0][0], states[0])  # the first run's model: a bad --model fails before any file is touched
    tokenizer = first[1]
    data = C.load_data(cfg, tokenizer)  # raises on bad rows before anything is trained or written
    if cfg.rounds > min(len(data["sft"]), len(data["pref"])):
        raise C.ConfigError(f"--rounds {cfg.rounds} leaves an empty shard ({len(data['sft'])} SFT rows, "
                            f"{len(data['pref'])} preference pairs)")
    judge = C.load_reward_model(cfg.reward_model, tokenizer, cfg.trust_remote_code) if cfg.reward_model else None
    if judge is not None:
        C.place(judge, cfg, C.pick_device(cfg.device))
    C.start_output(cfg, fresh=not any(states))
    print(f"{len(data['sft'])} SFT rows and {len(data['pref'])} preference pairs in {cfg.rounds} shards each, "
          f"{len(data['test'])} test prompts; HBAT with {cfg.pref}, --ewc {cfg.ewc}")

    columns, baseline = {}, None
    if cfg.compare:
        baseline = run(runs[0][0], data, runs[0][1], states[0], judge, loaded=first)
        columns["two-stage sft"] = baseline["trajectory"][0]
        columns[f"two-stage {cfg.pref}"] = baseline["trajectory"][-1]
    # with --compare both PPO runs optimise one reward model: the baseline's, trained from its SFT model
    shared_reward_model = runs[0][1] / "reward_model" if cfg.compare and cfg.pref == "ppo" else None
    hbat = run(cfg, data, out, states[-1], judge, *((baseline["first_outputs"], "the two-stage SFT model") if baseline else ()),
               loaded=None if baseline else first, reward_model_dir=shared_reward_model)
    columns[f"hbat {cfg.pref}"] = hbat["trajectory"][-1]

    # ---------------------------------------------------------------- report
    print(f"\nHBAT trajectory (win_rate against {hbat['win_rate_against']}; ewc: the stage's regulariser: for "
          f"hbat/random the most-weighted tensor and its weight; ewc_entropy, ewc_top: the entropy (nats) and the "
          f"largest of the tensor weights; ewc_share: mean loss/ewc over the stage's steps / mean task loss)")
    print(format_trajectory(hbat["trajectory"]))
    metric_columns = {k: {m: v for m, v in c.items() if m != "stage" and not m.startswith("ewc")} for k, c in columns.items()}
    if cfg.compare:
        print("\n" + C.format_table(metric_columns))
    print(f"rougeL: F1 against the reference (instruction following); reward: {hbat['score_name']}; "
          f"length: response tokens")
    results = {"config": dataclasses.asdict(cfg), "reward_metric": hbat["score_name"], "data": data["counts"],
               "win_rate_against": hbat["win_rate_against"], **metric_columns, "trajectory": hbat["trajectory"],
               "examples": [{"prompt": t["prompt"], "reference": t["reference"], "hbat": r}
                            for t, r in zip(data["test"], hbat["responses"])]}
    if baseline:
        results["two_stage_trajectory"] = baseline["trajectory"]
    C.write_json(out / "results.json", results)
    print(f"\nsaved {out / 'final'}, {out / 'results.json'}, {out / 'metrics.jsonl'}")
    return results


def format_trajectory(trajectory: list[dict]) -> str:
    keys = [k for k in dict.fromkeys(k for row in trajectory for k in row) if k not in ("stage", "ewc")]
    widths = {k: max(10, len(k) + 2) for k in keys}
    lines = [f"{'stage':<20}" + "".join(f"{k:>{widths[k]}}" for k in keys) + "  ewc"]
    for row in trajectory:  # ewc_share spans decades: 3 significant digits
        cells = "".join(f"{row[k]:>{widths[k]}.{'3g' if k == 'ewc_share' else '3f'}}" if isinstance(row.get(k), float)
                        else f"{'n/a':>{widths[k]}}" for k in keys)
        lines.append(f"{row['stage']:<20}{cells}  {row['ewc']}")
    return "\n".join(lines)


if __name__ == "__main__":
    C.cli(main, Config)
