"""hbat.py: the alternation, the modified EWC's bookkeeping across rounds checked by hand, anchors and
references, every stage's learning-rate schedule and optimizer (ours and the authors'), the K = 1 and
--compare equivalences to two_stage_baseline.py, the ablations, resume, and smoke runs."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common as C
import hbat
import two_stage_baseline

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_sft=32, n_pref=32, eval_size=4, sft_epochs=1, batch_size=16, ppo_batch_size=16, max_new_tokens=8)


def config(tmp_path, **overrides) -> hbat.Config:
    """In-process runs start from random weights (the stage bookkeeping tests replace common.train_sft, which
    the warm start of `tiny` calls too); the smoke runs below use the default, warm-started `tiny`."""
    return hbat.Config(**{**TINY, "model": "tiny-random", "output_dir": str(tmp_path / "run"), **overrides})


def final_weights(out) -> dict:
    return load_file(Path(out) / "final" / "model.safetensors")


def params_of(model) -> dict:
    """Every parameter, frozen or not (C.snapshot keeps only the trainable ones)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------- pure helpers


def test_alternate_runs_sft_then_preference_per_round_and_continues_from_next_stage():
    """Stand-in stages: round i is SFT on SFT shard i, then the preference stage on preference shard i, stage j
    (0-based) seeded seed + j; next_stage counts the stages done when after_stage runs (its checkpoint resumes
    after the stage); a state at next_stage 3 runs stages 3.. only. Each stage's drift goes to the other
    kind's accumulator, summed over rounds."""
    cfg = hbat.Config(rounds=3, ewc="none", seed=7)
    policy = torch.nn.Linear(2, 2, dtype=torch.float64)
    torch.nn.init.zeros_(policy.weight), torch.nn.init.zeros_(policy.bias)
    sft_shards, pref_shards = [["s1"], ["s2"], ["s3"]], [[{"chosen": "c1"}], [{"chosen": "c2"}], [{"chosen": "c3"}]]
    seen = []

    def train_stage(kind, round_, shard, penalty, seed):
        seen.append((kind, round_, shard, penalty, seed))
        with torch.no_grad():  # SFT moves the weight by 2e-10, the preference stage the bias by 1e-10
            (policy.weight if kind == "sft" else policy.bias).add_(2e-10 if kind == "sft" else 1e-10)
        return []

    def run(next_stage):
        state, done = {"next_stage": next_stage, "drift": {"sft": None, "pref": None}}, []
        hbat.alternate(cfg, policy, {"sft": sft_shards, "pref": pref_shards}, state, device=torch.device("cpu"), dtype=torch.float32,
                       train_stage=train_stage, after_stage=lambda kind, round_, regulariser, spread: done.append(
                           (kind, round_, state["next_stage"], regulariser, spread)))
        return state, done

    state, done = run(0)
    assert seen == [("sft", 1, ["s1"], None, 7), ("pref", 1, [{"chosen": "c1"}], None, 8), ("sft", 2, ["s2"], None, 9),
                    ("pref", 2, [{"chosen": "c2"}], None, 10), ("sft", 3, ["s3"], None, 11), ("pref", 3, [{"chosen": "c3"}], None, 12)]
    assert done == [(kind, round_, index + 1, "-", {}) for index, (kind, round_, *_) in enumerate(seen)]
    assert state["next_stage"] == 6
    # mean((delta * 1e10)^2) per tensor, three stages of each kind summed: SFT drift 3 * 2^2, preference drift 3 * 1^2
    assert state["drift"]["sft"] == pytest.approx({"weight": 12.0, "bias": 0.0}, rel=1e-9)
    assert state["drift"]["pref"] == pytest.approx({"weight": 0.0, "bias": 3.0}, rel=1e-9)
    seen.clear()
    state, done = run(3)
    assert seen == [("pref", 2, [{"chosen": "c2"}], None, 10), ("sft", 3, ["s3"], None, 11), ("pref", 3, [{"chosen": "c3"}], None, 12)]
    assert [d[2] for d in done] == [4, 5, 6]


def test_record_drift_adds_the_mean_squared_scaled_move_to_its_own_kinds_accumulator():
    state = {"drift": {"sft": None, "pref": None}}
    zero = {"a": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    moved = {"a": torch.full((2, 2), 2e-10, dtype=torch.float64), "b": torch.tensor([0.0, 0.0, 3e-10], dtype=torch.float64)}
    hbat.record_drift(state, "sft", zero, moved)  # an SFT stage's drift (it guards the preference stages)
    assert state["drift"]["pref"] is None
    assert state["drift"]["sft"] == pytest.approx({"a": 4.0, "b": 3.0}, rel=1e-12)  # a: 2^2; b: (0 + 0 + 3^2) / 3
    hbat.record_drift(state, "sft", moved, zero)  # the way back drifts as much: summed
    assert state["drift"]["sft"] == pytest.approx({"a": 8.0, "b": 6.0}, rel=1e-12)
    hbat.record_drift(state, "pref", zero, moved)
    assert state["drift"]["pref"] == pytest.approx({"a": 4.0, "b": 3.0}, rel=1e-12)
    assert state["drift"]["sft"] == pytest.approx({"a": 8.0, "b": 6.0}, rel=1e-12)  # untouched


def test_most_important_takes_the_top_fraction():
    raw = {f"t{i}": float(v) for i, v in enumerate([5, 1, 9, 3, 7, 0, 2, 8, 6, 4])}
    assert hbat.most_important(raw, 0.2) == ["t2", "t7"]  # 20% of 10 tensors: the two largest
    assert hbat.most_important(raw, 0.0) == []


def test_random_importance_is_a_seeded_softmax_of_uniform_scores():
    names = [f"t{i}" for i in range(6)]
    weights = hbat.random_importance(names, seed=3)
    scores = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).tolist()
    expected = [math.exp(s) / sum(math.exp(x) for x in scores) for s in scores]
    assert list(weights) == names
    assert list(weights.values()) == pytest.approx(expected, rel=1e-12)
    assert sum(weights.values()) == pytest.approx(1.0, rel=1e-12)
    assert hbat.random_importance(names, seed=3) == weights
    assert hbat.random_importance(names, seed=4) != weights


# ------------------------------------------------------------------------------- the bookkeeping, by hand
# Fake stages move known tensors by known amounts, so every importance, weight, anchor and penalty
# of the run's regulariser can be written down by hand. With s = 1 the drift importance of a tensor
# moved by a constant c is c^2.

A, B, NORM = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"
SFT_MOVE, PREF_MOVE = {A: 1.0, B: 2.0}, {NORM: 0.5}


def record_stages(monkeypatch):
    """Replace the training stages by fixed moves; record what each stage was given."""
    calls = []

    def fake_stage(moves, kind):
        def stage(policy, *args, penalty=None, **kwargs):
            params = dict(policy.named_parameters())
            shard, cfg = args[-2:]
            call = {"kind": kind, "start": {n: p.detach().clone() for n, p in params.items()}, "penalty": penalty,
                    "shard": shard, "seed": kwargs["seed"], "cfg": cfg}
            call["penalty_at_start"] = None if penalty is None else float(penalty().detach())
            with torch.no_grad():
                for name, delta in moves.items():
                    params[name] += delta
            call["penalty_after_move"] = None if penalty is None else float(penalty().detach())
            calls.append(call)
        return stage

    monkeypatch.setattr(C, "train_sft", fake_stage(SFT_MOVE, "sft"))
    monkeypatch.setattr(C, "train_dpo", fake_stage(PREF_MOVE, "pref"))
    return calls


def test_hbat_importance_anchor_and_penalty_across_two_rounds_by_hand(tmp_path, monkeypatch):
    calls = record_stages(monkeypatch)
    lam, max_weight = 2.0, {"sft": 3.0, "pref": 5.0}
    cfg = config(tmp_path, rounds=2, ewc_lambda=lam, ewc_max_weight=max_weight["sft"], pref_ewc_max_weight=max_weight["pref"])
    hbat.main(cfg)
    names = list(calls[0]["start"])
    zeros = dict.fromkeys(names, 0.0)
    numel = {n: calls[0]["start"][n].numel() for n in names}
    # raw accumulators by hand, in units of s^2 (s = 1e10; it cancels out of w = R / sum R): each stage
    # adds (move * s)^2 to the accumulator of the other stage type
    expected_raw = [None,                                   # round 1 SFT: no EWC
                    {**zeros, A: 1.0, B: 4.0},              # round 1 pref: drift of round 1 SFT
                    {**zeros, NORM: 0.25},                  # round 2 SFT: drift of round 1 pref
                    {**zeros, A: 2.0, B: 8.0}]              # round 2 pref: both SFT drifts, summed
    moves = [SFT_MOVE, PREF_MOVE, SFT_MOVE, PREF_MOVE]
    assert [c["kind"] for c in calls] == ["sft", "pref", "sft", "pref"]
    assert calls[0]["penalty"] is None
    for call, raw, move in zip(calls[1:], expected_raw[1:], moves[1:]):
        weights = {n: v / sum(raw.values()) for n, v in raw.items()}
        _, penalty_weights, anchor, penalty_lam, penalty_max = call["penalty"].args
        assert penalty_weights == pytest.approx(weights, rel=1e-9)
        assert (penalty_lam, penalty_max) == (lam, max_weight[call["kind"]])
        for n in names:  # the anchor is refreshed: the parameters at this stage's start
            assert torch.equal(anchor[n], call["start"][n]), n
        # M * sum_n w_n * sum_j (lambda * delta)^2, for the stage's own move away from the anchor
        expected = max_weight[call["kind"]] * sum(weights[n] * numel[n] * (lam * d) ** 2 for n, d in move.items())
        assert call["penalty_at_start"] == 0.0
        assert call["penalty_after_move"] == pytest.approx(expected, rel=1e-5)
    # each stage trains on its own shard (half the rows, in order) with its own seed, under the run's settings
    # (--schedule ours: each stage's schedule is built from them; test_every_stage_has_its_own_schedule)
    data = C.load_data(cfg, C.load_tokenizer("tiny"))
    sft_shards, pref_shards = [data["sft"][:16], data["sft"][16:]], [data["pref"][:16], data["pref"][16:]]
    assert [c["shard"] for c in calls] == [sft_shards[0], pref_shards[0], sft_shards[1], pref_shards[1]]
    assert [c["seed"] for c in calls] == [cfg.seed + i for i in range(4)]
    assert all(c["cfg"] == cfg for c in calls)
    state = json.loads((Path(cfg.output_dir) / "checkpoint" / "state.json").read_text())
    assert state["drift"]["pref"] == pytest.approx({**zeros, NORM: 0.5e20})  # carried: two preference stages' drift
    assert state["drift"]["sft"] == pytest.approx({**zeros, A: 2.0e20, B: 8.0e20})


def test_released_setting_penalises_only_the_most_drifted_tensor_with_its_own_constants(tmp_path, monkeypatch):
    calls = record_stages(monkeypatch)
    hbat.main(config(tmp_path, rounds=2, ewc="released", ewc_max_weight=3.0, ewc_lambda=2.0))  # s = 1e10: one-hot
    for call in calls[1:]:
        _, weights, _, lam, max_weight = call["penalty"].args
        assert max(weights.values()) == 1.0 and sum(weights.values()) == 1.0 and (lam, max_weight) == (1.0, 100.0)
    assert calls[1]["penalty"].args[1][B] == 1.0


def test_anchor_and_reference_are_the_previous_stage_output(tmp_path, monkeypatch):
    """With real training: each stage starts from the previous stage's output and its EWC anchor equals
    it (a preference stage's DPO reference is, by construction, train_dpo's starting policy)."""
    starts, original_sft, original_dpo = [], C.train_sft, C.train_dpo

    def wrap(train, kind):
        def stage(policy, *args, penalty=None, **kwargs):
            starts.append({"kind": kind, "start": params_of(policy), "anchor": None if penalty is None else penalty.args[2]})
            train(policy, *args, penalty=penalty, **kwargs)
            starts[-1]["end"] = params_of(policy)
        return stage

    monkeypatch.setattr(C, "train_sft", wrap(original_sft, "sft"))
    monkeypatch.setattr(C, "train_dpo", wrap(original_dpo, "pref"))
    cfg = config(tmp_path, rounds=2, n_sft=32, n_pref=32, batch_size=8)
    hbat.main(cfg)
    steps = [json.loads(line) for line in open(Path(cfg.output_dir) / "metrics.jsonl") if '"step"' in line]
    by_stage = {}
    for row in steps:
        by_stage.setdefault(row["stage"], []).append(row)
    assert all("loss/ewc" not in row for row in by_stage["round 1 sft"])  # no EWC in round 1's SFT stage
    for stage in ("round 1 dpo", "round 2 sft", "round 2 dpo"):  # the penalty is added at every step
        ewc = [row["loss/ewc"] for row in by_stage[stage]]
        assert ewc[0] == 0.0 and all(v > 0 for v in ewc[1:]), (stage, ewc)  # 0 at the anchor, then > 0
    assert [s["kind"] for s in starts] == ["sft", "pref", "sft", "pref"]
    assert starts[0]["anchor"] is None  # round 1's SFT stage has no EWC
    for previous, stage in zip(starts, starts[1:]):
        for name, value in previous["end"].items():
            assert torch.equal(stage["start"][name], value), name
            assert torch.equal(stage["anchor"][name], value), name
        assert any(not torch.equal(previous["end"][n], previous["start"][n]) for n in previous["end"])  # it trained


# ------------------------------------------------------------------------------- every stage's schedule and optimizer
# A real run, rounds 2: 16 SFT rows and 16 pairs per shard in batches of 4, so an SFT stage (1 epoch) is 4
# steps and a DPO stage (2 epochs) 8. The factors of the peak learning rate, by hand: a warm-up of w steps
# gives (s + 1) / w at step s; then k = 0, 1, ... of the remaining T - w steps give 0.5 (1 + cos(pi k / (T - w)))
# (cosine) or 1 - k / (T - w) (linear).

R2, R3 = math.sqrt(2) / 2, math.sqrt(3) / 2
SCHEDULE_RUN = dict(rounds=2, batch_size=4, sft_epochs=1, pref_epochs=2)
HAND_FACTORS = {  # --warmup_steps 2 (at most half the stage: 2 of 4, 2 of 8)
    "cosine": {"sft": [1 / 2, 1, 1, 1 / 2], "pref": [1 / 2, 1, 1, (1 + R3) / 2, 3 / 4, 1 / 2, 1 / 4, (1 - R3) / 2]},
    "linear": {"sft": [1 / 2, 1, 1, 1 / 2], "pref": [1 / 2, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]},
    # --schedule authors: SFT cosine without warm-up; preference cosine with min(100, 8 // 2) = 4 warm-up steps
    "authors": {"sft": [1, (1 + R2) / 2, 1 / 2, (1 - R2) / 2], "pref": [1 / 4, 2 / 4, 3 / 4, 1, 1, (1 + R2) / 2, 1 / 2, (1 - R2) / 2]}}


def step_lrs(out) -> dict[str, list[float]]:
    """The "lr" of every logged optimizer step, by stage."""
    lrs = {}
    for row in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()):
        if "step" in row:
            lrs.setdefault(row["stage"], []).append(row["lr"])
    return lrs


def record_optimizers(monkeypatch) -> list:
    """Per stage_optimizer call, its param groups sorted: [(the kinds of tensor, matrix or not, weight_decay, betas)]."""
    seen, real = [], C.stage_optimizer

    def record(params, cfg, lr, total_steps):
        optimizer, schedule = real(params, cfg, lr, total_steps)
        seen.append(sorted((sorted({p.ndim >= 2 for p in g["params"]}), g["weight_decay"], tuple(g["betas"])) for g in optimizer.param_groups))
        return optimizer, schedule

    monkeypatch.setattr(C, "stage_optimizer", record)
    return seen


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_every_stage_has_its_own_schedule(tmp_path, monkeypatch, kind):
    """--schedule ours: every stage, round 2's too, warms up and decays over its own steps, by the flags;
    --weight_decay on the matrices (not norms) and --adam_beta2 in every stage."""
    optimizers = record_optimizers(monkeypatch)
    cfg = config(tmp_path, **SCHEDULE_RUN, lr_scheduler_type=kind, warmup_steps=2, weight_decay=0.3, adam_beta2=0.99)
    hbat.main(cfg)
    lr = {"sft": cfg.sft_lr, "pref": cfg.pref_lr}
    expected = {f"round {r} {name}": [lr[k] * f for f in HAND_FACTORS[kind][k]] for r in (1, 2) for k, name in (("sft", "sft"), ("pref", "dpo"))}
    got = step_lrs(cfg.output_dir)
    assert list(got) == list(expected)
    for stage in expected:
        assert got[stage] == pytest.approx(expected[stage], rel=1e-12, abs=0), stage
    assert len(optimizers) == 4
    for groups in optimizers:
        assert groups == [([False], 0.0, (0.9, 0.99)), ([True], 0.3, (0.9, 0.99))]  # norms: no decay


def test_authors_schedule_per_stage(tmp_path, monkeypatch):
    """--schedule authors overrides the schedule flags: SFT stages cosine without warm-up, no weight decay;
    preference stages cosine with warm-up min(100, half the stage), weight decay 0.1 on matrices; betas
    (0.9, 0.95) in both."""
    optimizers = record_optimizers(monkeypatch)
    cfg = config(tmp_path, **SCHEDULE_RUN, schedule="authors", lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.3, adam_beta2=0.99)
    hbat.main(cfg)
    lr = {"sft": cfg.sft_lr, "pref": cfg.pref_lr}
    expected = {f"round {r} {name}": [lr[k] * f for f in HAND_FACTORS["authors"][k]] for r in (1, 2) for k, name in (("sft", "sft"), ("pref", "dpo"))}
    got = step_lrs(cfg.output_dir)
    assert list(got) == list(expected)
    for stage in expected:
        assert got[stage] == pytest.approx(expected[stage], rel=1e-12, abs=0), stage
    sft_groups = [([False], 0.0, (0.9, 0.95)), ([True], 0.0, (0.9, 0.95))]
    pref_groups = [([False], 0.0, (0.9, 0.95)), ([True], 0.1, (0.9, 0.95))]
    assert optimizers == [sft_groups, pref_groups, sft_groups, pref_groups]
    # the settings recorded are the run's own (the override is per stage, not a rewrite of the config)
    assert json.loads((Path(cfg.output_dir) / "results.json").read_text())["config"]["weight_decay"] == 0.3


# ------------------------------------------------------------------------------- equivalence to the baseline


@pytest.mark.parametrize("pref", ["dpo", "ppo"])
def test_one_round_without_ewc_is_the_two_stage_baseline(tmp_path, pref):
    hbat.main(config(tmp_path, pref=pref, rounds=1, ewc="none", model="tiny", output_dir=str(tmp_path / "hbat")))
    baseline_cfg = two_stage_baseline.Config(**TINY, pref=pref, output_dir=str(tmp_path / "baseline"))
    two_stage_baseline.main(baseline_cfg)
    assert_same_weights(final_weights(tmp_path / "hbat"), final_weights(tmp_path / "baseline"))
    hbat_results = json.loads((tmp_path / "hbat" / "results.json").read_text())
    baseline_results = json.loads((tmp_path / "baseline" / "results.json").read_text())
    assert hbat_results[f"hbat {pref}"] == pytest.approx(baseline_results[f"sft+{pref}"])


@pytest.mark.parametrize("pref", ["dpo", "ppo"])
def test_compare_arms_are_the_two_stage_baseline_and_its_joint_objective(tmp_path, pref):
    """--compare: out/two_stage is `two_stage_baseline.py`, out/joint is `two_stage_baseline.py --sft_coef 1`
    (the default --joint_coef), weight for weight; and the joint objective trains something else."""
    cfg = config(tmp_path, pref=pref, compare=True, rounds=2, model="tiny", output_dir=str(tmp_path / "hbat"))
    results = hbat.main(cfg)
    out = tmp_path / "hbat"
    for name, sft_coef in (("two_stage", 0.0), ("joint", 1.0)):
        two_stage_baseline.main(two_stage_baseline.Config(**TINY, pref=pref, sft_coef=sft_coef, output_dir=str(tmp_path / name)))
        assert_same_weights(final_weights(out / name), final_weights(tmp_path / name))
        baseline = json.loads((tmp_path / name / "results.json").read_text())
        assert results[f"{name.replace('_', '-')} {pref}"] == pytest.approx(baseline[f"sft+{pref}"])
    assert results["two-stage sft"] == pytest.approx(json.loads((tmp_path / "two_stage" / "results.json").read_text())["sft"])
    two_stage, joint = final_weights(out / "two_stage"), final_weights(out / "joint")
    assert any(not torch.equal(two_stage[n], joint[n]) for n in two_stage)
    term = "nll/chosen" if pref == "dpo" else "loss/sft"  # the joint term, logged at every preference step of the joint arm only
    for name, logged in (("joint", True), ("two_stage", False)):
        steps = [r for r in map(json.loads, (out / name / "metrics.jsonl").read_text().splitlines()) if r["stage"] == f"round 1 {pref}"]
        assert steps and all((term in r) == logged for r in steps), name
    assert [row["stage"] for row in results["joint_trajectory"]] == ["round 1 sft", f"round 1 {pref}"]


def test_joint_coef_zero_leaves_the_joint_arm_out(tmp_path):
    results = hbat.main(config(tmp_path, compare=True, rounds=1, n_sft=16, n_pref=16, joint_coef=0.0))
    out = tmp_path / "run"
    assert not (out / "joint").exists() and (out / "two_stage" / "final").is_dir() and (out / "final").is_dir()
    assert "joint dpo" not in results and "joint_trajectory" not in results
    assert {"two-stage sft", "two-stage dpo", "hbat dpo", "two_stage_trajectory"} <= set(results)


# ------------------------------------------------------------------------------- ablations


def test_freeze_keeps_exactly_the_top_fifth_of_tensors_fixed(tmp_path, monkeypatch):
    seen, original_dpo = [], C.train_dpo

    def stage(policy, *args, **kwargs):
        frozen = [n for n, p in policy.named_parameters() if not p.requires_grad]
        before = params_of(policy)
        original_dpo(policy, *args, **kwargs)
        seen.append({"frozen": frozen, "before": before, "after": params_of(policy),
                     "penalty": kwargs.get("penalty")})

    monkeypatch.setattr(C, "train_dpo", stage)
    cfg = config(tmp_path, rounds=2, n_sft=16, n_pref=16, ewc="freeze")
    hbat.main(cfg)
    n_tensors = len(seen[0]["before"])
    for stage_seen in seen:
        assert len(stage_seen["frozen"]) == round(0.2 * n_tensors) and stage_seen["penalty"] is None
        for name, value in stage_seen["before"].items():
            unchanged = torch.equal(stage_seen["after"][name], value)
            assert unchanged == (name in stage_seen["frozen"]), name
    assert all(p.requires_grad for p in C.load_model_and_tokenizer(str(Path(cfg.output_dir) / "final"))[0].parameters())


def test_freeze_picks_the_tensors_the_other_objective_moved_most(tmp_path, monkeypatch):
    frozen_seen = []
    calls = record_stages(monkeypatch)
    fake_dpo = C.train_dpo

    def stage(policy, *args, **kwargs):
        frozen_seen.append([n for n, p in policy.named_parameters() if not p.requires_grad])
        fake_dpo(policy, *args, **kwargs)

    monkeypatch.setattr(C, "train_dpo", stage)
    hbat.main(config(tmp_path, rounds=1, ewc="freeze"))
    names = list(calls[0]["start"])
    assert len(names) == 20  # so 20% is 4 tensors: the two that round 1's SFT moved, then ties in model order
    assert set(frozen_seen[0]) == {B, A, *[n for n in names if n not in (A, B)][:2]}


def test_random_ablation_penalises_with_normalised_random_weights(tmp_path, monkeypatch):
    calls = record_stages(monkeypatch)
    hbat.main(config(tmp_path, rounds=2, ewc="random"))
    for index, call in enumerate(calls[1:], start=1):
        weights = call["penalty"].args[1]
        assert weights == hbat.random_importance(list(weights), seed=0 + index)  # seed + stage index
        assert sum(weights.values()) == pytest.approx(1.0) and min(weights.values()) > 0


def test_fisher_ablation_uses_textbook_ewc_on_the_other_objectives_data(tmp_path, monkeypatch):
    calls = record_stages(monkeypatch)
    cfg = config(tmp_path, rounds=2, ewc="fisher", fisher_samples=4, fisher_lambda=7.0)
    hbat.main(cfg)
    penalty = calls[1]["penalty"]  # round 1 pref: Fisher of the SFT shard just trained on, at the stage start
    assert penalty.func is C.ewc_penalty and penalty.args[3] == 7.0
    policy, tokenizer = C.load_model_and_tokenizer("tiny-random", seed=0)
    data = C.load_data(cfg, tokenizer)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(calls[1]["start"][name])
    expected = C.empirical_fisher(policy, data["sft"][:16][:4], torch.device("cpu"))  # (shard 1: the first 16 of 32 rows)
    for name, value in expected.items():
        torch.testing.assert_close(penalty.args[1][name], value)
    # round 2 SFT: Fisher of the chosen responses of round 1's preference shard, at that stage's start
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(calls[2]["start"][name])
    expected = C.empirical_fisher(policy, [p["chosen"] for p in data["pref"][:16][:4]], torch.device("cpu"))
    for name, value in expected.items():
        torch.testing.assert_close(calls[2]["penalty"].args[1][name], value)


# ------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("pref", ["dpo", "ppo"])
def test_resume_after_a_stop_between_stages_gives_the_same_weights(tmp_path, monkeypatch, pref):
    # (w = R / sum R spreads over the tensors: a wrongly restored accumulator would show in the weights)
    hbat.main(config(tmp_path, pref=pref, rounds=2, output_dir=str(tmp_path / "whole")))
    stage_fn = "train_dpo" if pref == "dpo" else "train_ppo"
    original, n_calls = getattr(C, stage_fn), []

    def stop_in_round_two(*args, **kwargs):
        n_calls.append(1)
        if len(n_calls) == 2:
            raise KeyboardInterrupt  # stopped during round 2's preference stage
        return original(*args, **kwargs)

    monkeypatch.setattr(C, stage_fn, stop_in_round_two)
    cfg = config(tmp_path, pref=pref, rounds=2, output_dir=str(tmp_path / "stopped"))
    with pytest.raises(KeyboardInterrupt):
        hbat.main(cfg)
    assert json.loads((tmp_path / "stopped" / "checkpoint" / "state.json").read_text())["next_stage"] == 3
    assert not (tmp_path / "stopped" / "final").exists()
    monkeypatch.setattr(C, stage_fn, original)
    results = hbat.main(config(tmp_path, pref=pref, rounds=2, output_dir=str(tmp_path / "stopped"), resume=True))
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "stopped"))
    whole, resumed = ((tmp_path / run / "checkpoint" / "state.json").read_text() for run in ("whole", "stopped"))
    assert json.loads(whole)["drift"] == json.loads(resumed)["drift"]
    assert [row["stage"] for row in results["trajectory"]] == ["round 1 sft", f"round 1 {pref}", "round 2 sft", f"round 2 {pref}"]

    with pytest.raises(C.ConfigError, match="other settings: --beta 0.1 \\(now 0.2\\)"):
        hbat.main(config(tmp_path, pref=pref, rounds=2, output_dir=str(tmp_path / "stopped"), resume=True, beta=0.2))


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, capsys):
    results = hbat.main(config(tmp_path, rounds=1, n_sft=16, n_pref=16, resume=True))
    assert "no checkpoint" in capsys.readouterr().out
    assert [row["stage"] for row in results["trajectory"]] == ["round 1 sft", "round 1 dpo"]


def test_compare_with_ppo_gives_both_runs_one_reward_model(tmp_path, monkeypatch):
    """--compare --pref ppo: every PPO stage, the baseline's, the joint arm's and each of HBAT's, optimises the
    reward model the baseline trained (saved in two_stage/reward_model/); the others train none of their own."""
    used, real_train_ppo, trained = [], C.train_ppo, []
    monkeypatch.setattr(C, "train_ppo", lambda policy, ref, reward_model, *a, **k: (
        used.append(params_of(reward_model)), real_train_ppo(policy, ref, reward_model, *a, **k))[1])
    real_train_rm = C.train_reward_model
    monkeypatch.setattr(C, "train_reward_model", lambda *a, **k: (trained.append(1), real_train_rm(*a, **k))[1])
    hbat.main(config(tmp_path, pref="ppo", compare=True, rounds=2, ppo_epochs=1))
    out = tmp_path / "run"
    assert len(used) == 4 and len(trained) == 1  # two-stage, joint: one PPO stage each; HBAT: two
    assert not (out / "reward_model").exists() and not (out / "joint" / "reward_model").exists()
    saved = load_file(out / "two_stage" / "reward_model" / "model.safetensors")
    for weights in used:
        assert weights.keys() == saved.keys()
        assert all(torch.equal(weights[n], saved[n]) for n in saved)


@pytest.mark.parametrize("flag, value, message", [("ewc", "l2", "--ewc must be"), ("rounds", 0, "--rounds must be"),
                                                   ("rounds", 40, "leaves an empty shard"), ("fisher_samples", 0, "--fisher_samples")])
def test_bad_settings_are_rejected_before_anything_is_written(tmp_path, flag, value, message):
    with pytest.raises(C.ConfigError, match=message):
        hbat.main(config(tmp_path, **{flag: value}))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- smoke


SMOKE = {"dpo-compare": ["--pref", "dpo", "--compare"], "ppo-fisher": ["--pref", "ppo", "--ewc", "fisher"],
         "ppo-no-critic-compare": ["--pref", "ppo", "--no-critic", "--compare"], "dpo-released": ["--pref", "dpo", "--ewc", "released", "--sft_epochs", "2", "--pref_epochs", "2"]}  # (2 steps a stage)


def smoke_args(case: str) -> list[str]:
    return [x for k, v in TINY.items() for x in (f"--{k}", str(v))] + ["--rounds", "2", *SMOKE[case]]


@pytest.mark.parametrize("case", SMOKE)
def test_smoke_hbat_end_to_end(script_run, case):
    proc, out = script_run("hbat.py", *smoke_args(case))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    results = json.loads((out / "results.json").read_text())
    pref = SMOKE[case][1]
    assert len(results["trajectory"]) == 4 and f"hbat {pref}" in results
    for key in (f"two-stage {pref}", f"joint {pref}", "two_stage_trajectory", "joint_trajectory"):
        assert (key in results) == ("--compare" in SMOKE[case]), key
    assert "HBAT trajectory" in proc.stdout
    if "fisher" not in SMOKE[case]:  # HBAT's penalty: how its weights spread and its share are logged
        penalised, released = results["trajectory"][1:], "released" in SMOKE[case]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = {row["stage"]: sum(r["stage"] == row["stage"] and "loss/ewc" in r for r in records) for row in penalised}
        # the penalty is 0 at its anchor (a stage's first step) and > 0 once the stage has moved; a PPO record
        # averages a whole rollout's optimizer steps (here 2 epochs x 2 minibatches), an SFT/DPO record is one step
        moved = {row["stage"]: steps[row["stage"]] >= 2 or row["stage"].endswith("ppo") for row in penalised}
        assert all(steps[row["stage"]] >= 1 and (row["ewc_share"] > 0) == moved[row["stage"]] for row in penalised)
        # the default (sum) spreads the weights; the released softmax (s 1e10) is one-hot
        assert all((row["ewc_top"] > 0.999) if released else (row["ewc_entropy"] > 0.1 and row["ewc_top"] < 1.0) for row in penalised)
    model, _ = C.load_model_and_tokenizer(str(out / "final"))
    assert sum(p.numel() for p in model.parameters()) > 0
    if pref == "ppo":  # critic-free PPO stages log no value loss (and their baseline's neither)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        ppo_steps = [r for r in records if r["stage"].endswith("ppo") and "loss/policy" in r]
        assert ppo_steps and all(("loss/value" in r) == ("--no-critic" not in SMOKE[case]) for r in ppo_steps)


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_ends_as_an_uninterrupted_run(script_run, kill_and_resume):
    """--compare: two runs, each with its own checkpoint, in one folder."""
    proc, whole = script_run("hbat.py", *smoke_args("dpo-compare"))
    assert proc.returncode == 0
    kill_and_resume("hbat.py", smoke_args("dpo-compare"), whole)


def test_ewc_share_is_mean_penalty_over_mean_task_loss():
    records = [{"stage": "s", "loss/dpo": 0.6, "loss/ewc": 0.03}, {"stage": "s", "loss/dpo": 0.4, "loss/ewc": 0.01},
               {"stage": "eval s", "rougeL": 0.9}]
    assert hbat.ewc_share(records) == pytest.approx(0.02 / 0.5)
    policy = [{"loss/policy": -0.2, "loss/value": 1.0, "loss/ewc": 0.1}, {"loss/policy": 0.4, "loss/value": 1.0, "loss/ewc": 0.2}]
    assert hbat.ewc_share(policy) == pytest.approx(0.15 / 0.3)  # |policy loss|: it changes sign
    assert hbat.ewc_share([{"loss/sft": 1.0}]) is None  # no penalty in the stage
