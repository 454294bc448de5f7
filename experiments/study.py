"""The evidence study: each method and its baseline over several seeds, one command per table.

    python experiments/study.py --table premise      # the built-in task's premise checks: SFT, two-stage's tax, the oracle's headroom
    python experiments/study.py --table main         # DPO at equal budgets: two-stage, joint, HBAT (default, released EWC, no penalty, the authors' recipe)
    python experiments/study.py --table m_sweep      # ... HBAT's preference-stage penalty M in {0, 1, 10, 100}
    python experiments/study.py --table sft_m_sweep  # ... HBAT's SFT-stage penalty M in {0, 0.1, 1}
    python experiments/study.py --table lr_ratio     # ... at the authors' SFT : preference learning rate 1 : 1
    python experiments/study.py --table k_sweep      # ... HBAT's K in {2, 5, 10}
    python experiments/study.py --table ablations    # ... HBAT's regularisers: none / default / released / fisher / freeze / random
    python experiments/study.py --table fronts       # ... the fronts over DPO's beta and HBAT's M, + experiments/fronts.png
    python experiments/study.py --table ppo_main     # PPO at equal budgets: two-stage, PPO-ptx, HBAT (default, no penalty, the authors' recipe)
    python experiments/study.py --table default_m    # HBAT's default SFT-stage M (1 or 0.1) at the scripts' default schedule
    python experiments/study.py --table ld_align     # LD-Align (policy and scratch guides) vs SPIN (uniform weights), from the full SFT model
    python experiments/study.py --table headroom     # ... default guide, from the warm-started model (--sft_epochs 0: room for self-play)
    python experiments/study.py --table drift        # ... on the drift variant (ld_align.py --task drift: errors the weights can find)
    python experiments/study.py --table all          # every table above (on the tiny model)
    python experiments/study.py --table smollm2 --seeds 0 1 2      # two-stage vs HBAT-DPO on SmolLM2-135M-Instruct (reduced; ~95 min)
    python experiments/study.py --table smollm2_ld --seeds 0 1 2   # SPIN vs LD-Align on SmolLM2-135M-Instruct (reduced; ~95 min)
    python experiments/study.py main --seeds 0 1 2 --jobs 1        # (the table's name alone works too)

A cell is one command line of one of the scripts at one seed (printed). It trains in
runs/study/<script>_<arguments>/seed<k>/ (its output in seed<k>.log beside it, a time limit of CELL_TIMEOUT or twice its estimate),
and as it finishes its results.json is kept in experiments/results/<script>_<arguments>/seed<k>.json with the
command, the commit and its time. A cell whose file exists is never run again (delete the file to rerun it), so a
table can be stopped and rerun, results can be committed as they come, and tables (or arms) that share a command
line share its cells. Before it starts, a table prints how many cells it will run and about how long that takes.
Each table prints mean +- sd over seeds of the final model's instruction, rougeL and gold reward, and a paired
comparison against the table's baseline: the mean +- sd of the per-seed difference, and on how many seeds the arm
is ahead. `--jobs 2` (the default) runs two scripts at once with one thread each, which on 2 CPU cores is
faster than one at a time with two threads (the tiny model is too small to use two threads well).
Needs matplotlib for the figure (experiments/requirements.txt).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "study"  # where cells train (not committed)
RESULTS = REPO / "experiments" / "results"  # one small JSON file per finished cell (committed)
CELL_TIMEOUT = 1800  # seconds (or twice the cell's estimate, if more): a cell that hangs fails the table instead of stalling it
SECONDS = {"two_stage_baseline.py": 60, "hbat.py": 80, "hbat.py --compare": 200, "hbat.py ppo": 200, "hbat.py ppo --compare": 500,
           "ld_align.py": 160, "ld_align.py --compare": 250,
           "ld_align.py --compare SMOLLM2": 1950, "hbat.py --compare SMOLLM2": 1300, "hbat.py SMOLLM2": 650}
# ^ a cell's rough time with one thread (two at once on 2 cores), for the estimate printed before a table runs; SMOLLM2: with
# two threads, one cell at a time, as measured (ld_align 1884-1932 s at seeds 0-2, hbat 1272-1407 s and 567-675 s;
# per LD-Align iteration ~9 min, of which the guide 2.4, DPO 2, the evaluation with 4 samples per prompt ~3)
METRICS = ("instruction", "rougeL", "reward")
SAMPLED = ("instruction_sampled", "reward_sampled")  # means over 4 samples per prompt at temperature 1

# An arm: (name, script, arguments, the results.json key of its final model). Every setting that the
# study compares is spelled out, so the tables do not change when a default does.
TWO_STAGE = ("two-stage dpo", "two_stage_baseline.py", [], "sft+dpo")


# hbat.py's default EWC up to commit 64566ba, spelled out ("default EWC" in the tables); default_m then moved the SFT-stage M to 0.1
DEFAULT_EWC = ("--ewc", "hbat", "--ewc_max_weight", "1", "--pref_ewc_max_weight", "100")


def sum_m(sft: str, pref: str) -> tuple[str, ...]:
    return ("--ewc", "hbat", "--ewc_max_weight", sft, "--pref_ewc_max_weight", pref)
GUIDE = ("--guide", "policy", "--no-guide_reads_prompt")  # ld_align.py's default guide, spelled out

AUTHORS = ("--ewc", "released", "--schedule", "authors")  # their EWC and per-stage schedule
AUTHORS_PPO = (*AUTHORS, "--no-critic", "--gamma", "0.95", "--kl_coef", "0.1")  # and their critic-free PPO settings


def ld_align(name: str, key: str, *args: str):
    return (name, "ld_align.py", ["--compare", *args], key)


# SmolLM2-135M-Instruct on the built-in task (issue 9, item 8), reduced for 2 CPU cores: 128 SFT rows and
# 128 preference pairs, 32 test prompts, batch 8, real-model learning rates. "SMOLLM2" stands for --smollm2.
SMOLLM2 = ("--model", "SMOLLM2", "--n_sft", "128", "--eval_size", "32", "--batch_size", "8", "--sft_lr", "5e-5")
SMOLLM2_HBAT = [*SMOLLM2, "--n_pref", "128", "--pref_lr", "5e-6", "--pref", "dpo", "--compare", *sum_m("0.1", "100")]  # hbat.py's
# default penalty since the default_m table (SFT-stage M 0.1), spelled out
# LD-Align from a partly SFT'd model (one epoch at 2e-5: room for self-play), two iterations
SMOLLM2_LD = [*SMOLLM2[:-1], "2e-5", "--sft_epochs", "1", "--pref_lr", "5e-6", "--iterations", "2", "--guide_lr", "1e-4",
              "--compare", *GUIDE]

# The main table's budget: every arm takes the same preference steps and learning-rate mass. Batch 20 divides the
# 3000 SFT rows and 2000 pairs and their shards for K in {1, 2, 5, 10} (no ragged last batch: two-stage's 100 DPO
# steps = HBAT's 5 x 20), and no warm-up with a constant rate makes the learning-rate mass steps x lr in every arm
# (the protocol allows at most 10% warm-up; 0 makes the mass exactly equal). SFT : preference lr = 5 : 1 (defaults).
EQUAL_BUDGET = ("--batch_size", "20", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--schedule", "ours")
MAIN = ["--pref", "dpo", *EQUAL_BUDGET]
MAIN_COMPARE = [*MAIN, "--compare", "--joint_coef", "1", *DEFAULT_EWC]  # two-stage, joint and HBAT from one run per seed
# The authors' recipe (released EWC, their per-stage schedule: cosine, 100 warm-up steps in preference stages, at most
# half a stage): their schedule, not the equal learning-rate mass, so its row says so. Batch 20 as in every arm.
MAIN_AUTHORS = ["--pref", "dpo", "--batch_size", "20", *AUTHORS]
# Two-stage with HBAT's total compute needs no arm of its own: at this budget both run 3 SFT epochs over the 3000 rows
# and one DPO epoch over the 2000 pairs (HBAT in K shards), the same forward and backward passes; HBAT adds only the
# penalty's elementwise terms and a drift per stage (their cost: the cells' seconds, experiments/README.md).
BETA_FRONT = ("0.03", "0.1", "0.3", "1")  # DPO's beta: from far past two-stage's point (0.03) to near the SFT model (1)
# PPO at equal budgets: 40 prompts per rollout divide the 2000 prompts and their shards for K in {1, 2, 5, 10}
# (two-stage's 50 rollouts = HBAT's 5 x 10), every other PPO setting the default
PPO_MAIN = ["--pref", "ppo", *EQUAL_BUDGET, "--ppo_batch_size", "40"]
PPO_COMPARE = [*PPO_MAIN, "--compare", "--joint_coef", "1", *DEFAULT_EWC]  # two-stage, PPO-ptx and HBAT, one reward model


def at_stage(key: str, stage: str) -> str:
    """A results key for the model after one stage of an HBAT run (its trajectory), e.g. round K's SFT stage."""
    return f"{key} @ {stage}"


def final_of(results: dict, key: str) -> dict:
    """The metrics of `key` in a cell's results.json: a final model, or "<arm> @ <stage>" from HBAT's trajectory."""
    if " @ " not in key:
        return results[key]
    return next(row for row in results["trajectory"] if row["stage"] == key.split(" @ ")[1])

TABLES = {
    # HBAT against two-stage and the joint objective at equal budgets, DPO (the design above, fixed before any result)
    "main": {"baseline": "two-stage dpo", "metrics": METRICS + SAMPLED, "arms": [
        ("sft (two-stage's SFT model)", "hbat.py", MAIN_COMPARE, "two-stage sft"),
        ("two-stage dpo", "hbat.py", MAIN_COMPARE, "two-stage dpo"),
        ("joint (dpo + 1 x SFT loss)", "hbat.py", MAIN_COMPARE, "joint dpo"),
        ("hbat dpo (default EWC)", "hbat.py", MAIN_COMPARE, "hbat dpo"),
        ("hbat dpo, the released EWC (softmax, M 100)", "hbat.py", [*MAIN, "--ewc", "released"], "hbat dpo"),
        ("hbat dpo, no penalty (plain alternation, M 0)", "hbat.py", [*MAIN, "--ewc", "none"], "hbat dpo"),
        ("hbat dpo, the authors' recipe (released EWC, their schedule)", "hbat.py", MAIN_AUTHORS, "hbat dpo"),
        ("hbat dpo (default EWC), ending on its last SFT stage (4 of 5 DPO stages)", "hbat.py", MAIN_COMPARE,
         at_stage("hbat dpo", "round 5 sft")),
    ]},
    # HBAT's K at the main table's budget (every K takes the same steps); K 5 is main's cell
    "k_sweep": {"baseline": "two-stage dpo", "metrics": METRICS + SAMPLED, "arms": [
        ("two-stage dpo", "hbat.py", MAIN_COMPARE, "two-stage dpo"),
        *[(f"hbat dpo (default EWC), K {k}", "hbat.py", [*MAIN, *DEFAULT_EWC, "--rounds", k], "hbat dpo") for k in ("2", "10")],
        ("hbat dpo (default EWC), K 5", "hbat.py", MAIN_COMPARE, "hbat dpo"),
    ]},
    # the regularisers of the ablations at the main table's budget (default, released, none: main's cells)
    "ablations": {"baseline": "hbat dpo, no penalty (--ewc none)", "metrics": METRICS + SAMPLED, "arms": [
        ("hbat dpo, no penalty (--ewc none)", "hbat.py", [*MAIN, "--ewc", "none"], "hbat dpo"),
        ("hbat dpo (default EWC)", "hbat.py", MAIN_COMPARE, "hbat dpo"),
        ("hbat dpo, the released EWC", "hbat.py", [*MAIN, "--ewc", "released"], "hbat dpo"),
        *[(f"hbat dpo, --ewc {e}", "hbat.py", [*MAIN, "--ewc", e], "hbat dpo") for e in ("fisher", "freeze", "random")],
    ]},
    # the Pareto fronts at the main table's budget: two-stage, joint and HBAT over DPO's beta (one --compare run per
    # beta and seed), and HBAT over its preference-stage M at beta 0.1 (m_sweep's cells); + experiments/fronts.png
    "fronts": {"baseline": "two-stage dpo, beta 0.1", "metrics": METRICS + SAMPLED, "figure": "fronts.png", "arms": [
        *[(f"{arm}, beta {b}", "hbat.py", [*MAIN_COMPARE, *([] if b == "0.1" else ["--beta", b])], key)
          for arm, key in (("two-stage dpo", "two-stage dpo"), ("joint (dpo + 1 x SFT loss)", "joint dpo"),
                           ("hbat dpo (default EWC)", "hbat dpo")) for b in BETA_FRONT],
        *[(f"hbat dpo (beta 0.1), M {m}", "hbat.py", [*MAIN, *sum_m("1", m)], "hbat dpo") for m in ("0", "1", "10")],
        ("hbat dpo (beta 0.1), M 100", "hbat.py", MAIN_COMPARE, "hbat dpo"),
    ]},
    # PPO at equal budgets: two-stage, the joint objective (PPO-ptx) and HBAT from one run per seed, all on the
    # baseline's reward model; and the authors' recipe (their critic-free PPO settings, released EWC, their schedule)
    "ppo_main": {"baseline": "two-stage ppo", "metrics": METRICS + SAMPLED, "arms": [
        ("sft (two-stage's SFT model)", "hbat.py", PPO_COMPARE, "two-stage sft"),
        ("two-stage ppo", "hbat.py", PPO_COMPARE, "two-stage ppo"),
        ("joint (ppo-ptx, 1 x SFT loss)", "hbat.py", PPO_COMPARE, "joint ppo"),
        ("hbat ppo (default EWC)", "hbat.py", PPO_COMPARE, "hbat ppo"),
        ("hbat ppo, no penalty (--ewc none)", "hbat.py", [*PPO_MAIN, "--compare", "--joint_coef", "0", "--ewc", "none"], "hbat ppo"),
        ("hbat ppo, the authors' recipe", "hbat.py", ["--pref", "ppo", "--batch_size", "20", "--ppo_batch_size", "40",
                                                      "--compare", "--joint_coef", "0", *AUTHORS_PPO], "hbat ppo"),
    ]},
    # the preference-stage penalty M at the main table's budget (SFT stages keep M 1); M 100 is main's cell, and so is
    # --ewc none, which also drops the SFT stages' penalty (M 0 first stood for it; the M 0 row was added to separate the two)
    "m_sweep": {"baseline": "two-stage dpo", "metrics": METRICS + SAMPLED, "arms": [
        ("two-stage dpo", "hbat.py", MAIN_COMPARE, "two-stage dpo"),
        ("hbat dpo, no penalty in any stage (--ewc none)", "hbat.py", [*MAIN, "--ewc", "none"], "hbat dpo"),
        *[(f"hbat dpo, M {m}", "hbat.py", [*MAIN, *sum_m("1", m)], "hbat dpo") for m in ("0", "1", "10")],
        ("hbat dpo, M 100 (default)", "hbat.py", MAIN_COMPARE, "hbat dpo"),
    ]},
    # the SFT stages' penalty M at the main table's budget (preference stages keep M 100); M 1 is main's cell
    "sft_m_sweep": {"baseline": "two-stage dpo", "metrics": METRICS + SAMPLED, "arms": [
        ("two-stage dpo", "hbat.py", MAIN_COMPARE, "two-stage dpo"),
        *[(f"hbat dpo, SFT-stage M {m}", "hbat.py", [*MAIN, *sum_m(m, "100")], "hbat dpo") for m in ("0", "0.1")],
        ("hbat dpo, SFT-stage M 1 (default)", "hbat.py", MAIN_COMPARE, "hbat dpo"),
    ]},
    # SFT : preference learning rate 1 : 1 (the authors'), both at the preference rate 2e-4, otherwise main's budget
    "lr_ratio": {"baseline": "two-stage dpo, lr 1:1", "metrics": METRICS + SAMPLED, "arms": [
        ("sft (two-stage's SFT model), lr 1:1", "hbat.py", [*MAIN_COMPARE, "--sft_lr", "2e-4"], "two-stage sft"),
        ("two-stage dpo, lr 1:1", "hbat.py", [*MAIN_COMPARE, "--sft_lr", "2e-4"], "two-stage dpo"),
        ("joint (dpo + 1 x SFT loss), lr 1:1", "hbat.py", [*MAIN_COMPARE, "--sft_lr", "2e-4"], "joint dpo"),
        ("hbat dpo (default EWC), lr 1:1", "hbat.py", [*MAIN_COMPARE, "--sft_lr", "2e-4"], "hbat dpo"),
        ("hbat dpo, no penalty, lr 1:1", "hbat.py", [*MAIN, "--ewc", "none", "--sft_lr", "2e-4"], "hbat dpo"),
    ]},
    # The default SFT-stage M, checked at the scripts' default schedule (batch 32, 10 warm-up steps, constant rate), K 5,
    # beta 0.1: M 1 (the default) against 0.1 (ahead on the study's budget, sft_m_sweep). Rule, fixed before these cells
    # run: the default becomes 0.1 if its mean is ahead of M 1 on greedy instruction and gold reward, and its sampled
    # instruction and gold reward are ahead on at least 4 of 5 seeds each; otherwise it stays 1.
    "default_m": {"baseline": "hbat dpo, SFT-stage M 1 (default schedule)", "metrics": METRICS + SAMPLED, "arms": [
        ("two-stage dpo (default schedule)", "hbat.py", ["--pref", "dpo", "--compare", "--joint_coef", "1", *DEFAULT_EWC], "two-stage dpo"),
        ("hbat dpo, SFT-stage M 1 (default schedule)", "hbat.py", ["--pref", "dpo", "--compare", "--joint_coef", "1", *DEFAULT_EWC], "hbat dpo"),
        ("hbat dpo, SFT-stage M 0.1 (default schedule)", "hbat.py", ["--pref", "dpo", *sum_m("0.1", "100")], "hbat dpo"),
    ]},
    # the task's premise checks (README): the SFT model, two-stage's tax on it, and the hand-written oracle's headroom
    "premise": {"baseline": "two-stage dpo", "oracle": True, "metrics": METRICS + SAMPLED, "arms": [
        ("sft (the two-stage SFT model)", "two_stage_baseline.py", [], "sft"), TWO_STAGE]},
    # LD-Align against SPIN (one ld_align.py --compare run gives both, from the same SFT model and seeds), with the
    # weights' per-iteration diagnostics; paired on the sampled metrics too
    "ld_align": {"baseline": "spin (uniform), full SFT", "metrics": METRICS + SAMPLED, "paired": METRICS + SAMPLED,
                 "diagnostics": True, "arms": [
        ld_align("spin (uniform), full SFT", "spin", *GUIDE),
        ld_align("ld-align, policy guide, full SFT", "ld_align", *GUIDE),
        ld_align("ld-align, policy guide reading the prompt, full SFT", "ld_align", "--guide", "policy", "--guide_reads_prompt"),
        ld_align("ld-align, scratch guide reading the prompt, full SFT", "ld_align", "--guide", "scratch", "--guide_reads_prompt"),
    ]},
    # reduced to the default guide (budget): the other guides' headroom rows ran on the previous task only
    "headroom": {"baseline": "spin (uniform), headroom", "metrics": METRICS + SAMPLED, "paired": METRICS + SAMPLED,
                 "diagnostics": True, "arms": [
        ld_align("spin (uniform), headroom", "spin", *GUIDE, "--sft_epochs", "0"),
        ld_align("ld-align, policy guide, headroom", "ld_align", *GUIDE, "--sft_epochs", "0"),
    ]},
    # the drift variant (ld_align.py --task drift, README): a starting model SFT'd on drifted references (facts reversed,
    # the negated fact stated as true in half the rows that have one), self-play against the clean ones; default guide
    "drift": {"baseline": "spin (uniform), drift", "metrics": METRICS + SAMPLED, "paired": METRICS + SAMPLED,
              "diagnostics": True, "arms": [
        ld_align("sft on drifted references", "sft", *GUIDE, "--task", "drift"),
        ld_align("spin (uniform), drift", "spin", *GUIDE, "--task", "drift"),
        ld_align("ld-align, policy guide, drift", "ld_align", *GUIDE, "--task", "drift"),
    ]},
    # two-stage against HBAT, SPIN against LD-Align on SmolLM2-135M-Instruct, reduced (the built-in task as chat)
    "smollm2": {"baseline": "two-stage dpo", "jobs": 1, "metrics": METRICS + SAMPLED, "paired": METRICS + SAMPLED, "arms": [
        ("sft (the two-stage SFT model)", "hbat.py", SMOLLM2_HBAT, "two-stage sft"),
        ("two-stage dpo", "hbat.py", SMOLLM2_HBAT, "two-stage dpo"),
        ("hbat dpo (default: M 0.1 / 100)", "hbat.py", SMOLLM2_HBAT, "hbat dpo"),
        ("hbat dpo, no penalty (--ewc none)", "hbat.py", [*SMOLLM2_HBAT[:-len(DEFAULT_EWC) - 1], "--ewc", "none"], "hbat dpo"),
    ]},
    "smollm2_ld": {"baseline": "spin (uniform)", "jobs": 1, "metrics": METRICS + SAMPLED, "paired": METRICS + SAMPLED,
                   "diagnostics": True, "arms": [
        ("sft (1 epoch)", "ld_align.py", SMOLLM2_LD, "sft"),
        ("spin (uniform)", "ld_align.py", SMOLLM2_LD, "spin"),
        ("ld-align (policy guide)", "ld_align.py", SMOLLM2_LD, "ld_align"),
    ]},
}


def cell_tag(script: str, args: list[str]) -> str:
    """<script>[_<args>]: arms that run the same command line share its cells."""
    return re.sub(r"[^\w.]+", "_", " ".join([Path(script).stem, *args])).strip("_")


def cell_file(results: Path, script: str, args: list[str], seed: int) -> Path:
    return results / cell_tag(script, args) / f"seed{seed}.json"


def cell_seconds(script: str, args: list[str]) -> int:
    name = " ".join([script, *(["ppo"] if "ppo" in args else []), *(["--compare"] if "--compare" in args else []),
                     *(["SMOLLM2"] if "SMOLLM2" in args else [])])
    return SECONDS.get(name, 120)


def run(script: str, args: list[str], seed: int, threads: int, root: Path, results: Path, smollm2: Path) -> dict:
    """One cell: its results from results/<tag>/seed<k>.json, or a run of the script that writes that file."""
    cell, timeout = cell_file(results, script, args, seed), max(CELL_TIMEOUT, 2 * cell_seconds(script, args))
    if cell.exists():
        return json.loads(cell.read_text())["results"]
    out = root / cell_tag(script, args) / f"seed{seed}"
    command = [sys.executable, str(REPO / script), *[str(smollm2) if a == "SMOLLM2" else a for a in args],
               "--seed", str(seed), "--output_dir", str(out), "--overwrite"]
    out.parent.mkdir(parents=True, exist_ok=True)
    log, start = out.parent / f"seed{seed}.log", time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    try:
        with open(log, "w") as log_file:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = f"timed out after {timeout} s"
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(command[1:])}\n{log.read_text()[-3000:]}\n(the whole output: {log})")
    seconds = round(time.time() - start)
    print(f"  {seconds:5d} s  {' '.join(command[1:-1])}", flush=True)
    # the commit the cell ran on, "-dirty" if the working tree had uncommitted changes
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    finished = json.loads((out / "results.json").read_text())
    cell.parent.mkdir(parents=True, exist_ok=True)
    partial = cell.with_suffix(".partial")
    partial.write_text(json.dumps({"command": [script, *args, "--seed", str(seed)], "commit": commit, "seconds": seconds,
                                   "threads": threads, "results": finished}, indent=1) + "\n")
    partial.replace(cell)  # the cell file appears whole or not at all
    return finished


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def ewc_shares(results: list[dict]) -> str:
    """HBAT's penalty over its task loss (ewc_share): the range over every penalised stage of every seed,
    SFT stages / preference stages ("" for runs without a penalty)."""
    shares = {"sft": [], "pref": []}
    for r in results:
        for row in r.get("trajectory", []):
            if "ewc_share" in row:
                shares["sft" if row["stage"].endswith("sft") else "pref"].append(row["ewc_share"])
    if not shares["sft"] or not shares["pref"]:
        return ""
    return " / ".join(f"{min(v):.2g}-{max(v):.2g}" for v in shares.values())


def report(table: str, arms: list, baseline: str, runs: dict, seeds: list[int], metrics=METRICS, paired=METRICS) -> str:
    """Markdown: mean +- sd per arm, and each arm minus the baseline on the `paired` metrics, paired by seed (and HBAT's
    ewc_share)."""
    shares = {name: ewc_shares([runs[name, s]["results"] for s in seeds]) if key.startswith("hbat") else ""
              for name, _, _, key in arms}
    columns = ["arm", *metrics, *[f"{m} - baseline" for m in paired], f"ahead on {' / '.join(paired)}"]
    columns += ["ewc_share sft / pref"] if any(shares.values()) else []
    lines = [(f"### {table}: mean +- sd over seeds {' '.join(map(str, seeds))}; paired: arm minus {baseline}, "
              f"same seed (mean +- sd of the difference; seeds where the arm is ahead)"), "",
             "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for name, *_ in arms:
        finals = [runs[name, s]["final"] for s in seeds]
        cells = [name] + [mean_sd([f[m] for f in finals]) for m in metrics]
        if name == baseline:
            cells += [""] * (len(paired) + 1)
        else:
            diffs = {m: [runs[name, s]["final"][m] - runs[baseline, s]["final"][m] for s in seeds] for m in paired}
            cells += [mean_sd(diffs[m]) for m in paired]
            cells.append(" / ".join(f"{sum(d > 0 for d in diffs[m])}/{len(seeds)}" for m in paired))
        cells += [shares[name]] if any(shares.values()) else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DIAGNOSTICS = ("rho_w_gap", "rho_w_grad", "rho_grad_gap", "cos_weighted_uniform")  # ld_align.py's per-iteration figures (README)


def weight_diagnostics(arms: list, runs: dict, seeds: list[int]) -> str:
    """Markdown: per self-play arm and iteration, mean +- sd over seeds of what the weights did (ld_align.py's
    trajectory rows; SPIN has rho_grad_gap only)."""
    lines = [f"What the weights did, per iteration: mean +- sd over seeds {' '.join(map(str, seeds))} (on at most --diagnostic_pairs of the iteration's pairs)", "",
             "| arm | iteration | " + " | ".join(DIAGNOSTICS) + " |", "|---" * (len(DIAGNOSTICS) + 2) + "|"]
    for name, _, _, key in arms:
        rows = [[r for r in runs[name, s]["results"]["trajectory"] if r["arm"] == key and r["iteration"] > 0] for s in seeds]
        for t in range(min(map(len, rows))):
            cells = [mean_sd([r[t][d] for r in rows]) if all(d in r[t] for r in rows) else "" for d in DIAGNOSTICS]
            lines.append(f"| {name} | {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def oracle_metrics(seed: int, eval_size: int = 100) -> dict:
    """The hand-written oracle (every fact; the list where asked, "and" elsewhere) on a seed's test prompts."""
    sys.path.insert(0, str(REPO))
    import common as C

    rows = C.builtin_task(seed, 0, 0, eval_size)["test"]
    answers = [C.oracle_summary(r["prompt"]) for r in rows]
    return {"instruction": C.mean_of([C.instruction_score(r["prompt"], a) for r, a in zip(rows, answers)]),
            "rougeL": statistics.mean(C.rouge_l_f1(a, r["completion"]) for r, a in zip(rows, answers)),
            "reward": statistics.mean(C.gold_reward(r["prompt"], a) for r, a in zip(rows, answers))}


def premise_checks(runs: dict, seeds: list[int]) -> str:
    """(d) two-stage's tax: its instruction score below its own SFT model's while its reward rises; (c) headroom:
    the oracle against two-stage, in units of two-stage's seed sd."""
    sft = [runs["sft (the two-stage SFT model)", s]["final"] for s in seeds]
    two = [runs["two-stage dpo", s]["final"] for s in seeds]
    oracle = [oracle_metrics(s) for s in seeds]
    lines = ["| premise check | mean +- sd over seeds | per seed |", "|---|---|---|"]
    for label, a, b, m in [("(d) tax: two-stage instruction - its SFT model's (must be <= -0.05)", two, sft, "instruction"),
                           ("(d) two-stage reward - its SFT model's (must be > 0)", two, sft, "reward"),
                           ("(c) headroom: oracle instruction - two-stage's", oracle, two, "instruction"),
                           ("(c) headroom: oracle reward - two-stage's", oracle, two, "reward")]:
        diffs = [x[m] - y[m] for x, y in zip(a, b)]
        lines.append(f"| {label} | {mean_sd(diffs)} | {' '.join(f'{d:+.3f}' for d in diffs)} |")
    for m in ("instruction", "reward"):
        sd = statistics.stdev([t[m] for t in two]) if len(two) > 1 else 0.0
        gap = statistics.mean(o[m] - t[m] for o, t in zip(oracle, two))
        lines.append(f"| (c) headroom on {m} in two-stage seed sds | {gap / sd if sd else float('inf'):.1f} sd (sd {sd:.3f}) | |")
    lines.append(f"| oracle (instruction, rougeL, reward) | {', '.join(mean_sd([o[m] for o in oracle]) for m in METRICS)} | |")
    return "\n".join(lines)


def plot(path: Path, panels: int, draw) -> None:
    """A figure of `panels` side by side, each drawn by draw(ax, i), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels + 0.5, 4.5), squeeze=False)
    for i, ax in enumerate(axes[0]):
        draw(ax, i)
        ax.set_xlabel("gold reward (preference)")
        ax.set_ylabel("instruction (the list format kept)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


def point(ax, finals: list[dict], seeds: list[int], **style):
    """Mean instruction score against mean gold reward, error bars one sd over the seeds."""
    sd = lambda m: statistics.stdev(f[m] for f in finals) if len(seeds) > 1 else 0  # noqa: E731
    return ax.errorbar(statistics.mean(f["reward"] for f in finals), statistics.mean(f["instruction"] for f in finals),
                       xerr=sd("reward"), yerr=sd("instruction"), marker="o", capsize=3, **style)


def figure(arms: list, runs: dict, seeds: list[int], path: Path) -> None:
    """One curve per method through its knob values (arm names "<method>, <knob>"), the two-stage SFT model as a reference."""
    def draw(ax, _):
        for method in dict.fromkeys(name.rsplit(", ", 1)[0] for name, *_ in arms):
            points = [(name.rsplit(", ", 1)[1], [runs[name, s]["final"] for s in seeds]) for name, *_ in arms
                      if name.rsplit(", ", 1)[0] == method]
            xy = [(statistics.mean(f["reward"] for f in finals), statistics.mean(f["instruction"] for f in finals)) for _, finals in points]
            line = ax.plot(*zip(*xy), "-", label=method)[0]
            for (knob, finals), (x, y) in zip(points, xy):
                point(ax, finals, seeds, color=line.get_color())
                ax.annotate(knob, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color=line.get_color())
        sft = [(lambda r: r.get("two-stage sft") or r.get("sft"))(runs[arms[0][0], s]["results"]) for s in seeds]
        if all(sft):
            ax.plot(statistics.mean(f["reward"] for f in sft), statistics.mean(f["instruction"] for f in sft), "k*", markersize=10,
                    label="SFT model (start of preference training)")
        ax.set_title(f"built-in task, tiny model: mean +- sd over {len(seeds)} seeds", fontsize=10)
    plot(path, 1, draw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", choices=[*TABLES, "all"], metavar="TABLE", help="the table (or --table TABLE)")
    parser.add_argument("--table", choices=[*TABLES, "all"], help=f"the table: {', '.join(TABLES)} or all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=OUT, help="where the cells train (default runs/study)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where finished cells are kept (default experiments/results)")
    parser.add_argument("--jobs", type=int, help="scripts run at once, each with cores // jobs threads (default: 2, "
                        "and 1 for the smollm2 tables)")
    parser.add_argument("--smollm2", type=Path, default=Path("/tmp/smollm2-135m"),
                        help="the smollm2 tables' model: a folder built by experiments/build_smollm2.py")
    known = parser.parse_args()
    if (known.table is None) == (known.name is None):
        parser.error("give one table: --table TABLE (or TABLE alone)")
    known.table = known.table or known.name
    tables = [t for t in TABLES if not t.startswith("smollm2")] if known.table == "all" else [known.table]
    if known.table.startswith("smollm2") and not (known.smollm2 / "config.json").exists():
        sys.exit(f"--smollm2 {known.smollm2}: no model there; build it with python experiments/build_smollm2.py {known.smollm2}")
    for table in tables:
        spec = TABLES[table]
        jobs = known.jobs or spec.get("jobs", 2)
        threads = max(1, (os.cpu_count() or 2) // jobs)
        start = time.time()
        # each distinct command line once (LD-Align and SPIN both come from one ld_align.py --compare run)
        commands = list(dict.fromkeys((arm[1], tuple(arm[2]), seed) for seed in known.seeds for arm in spec["arms"]))
        todo = [c for c in commands if not cell_file(known.results, c[0], list(c[1]), c[2]).exists()]
        estimate = sum(cell_seconds(c[0], list(c[1])) for c in todo) / jobs / 60
        print(f"{table}: {len(commands)} cells, {len(commands) - len(todo)} already in {known.results}; "
              f"{len(todo)} to run, about {estimate:.0f} min with --jobs {jobs}", flush=True)
        with ThreadPoolExecutor(jobs) as pool:
            results = dict(zip(commands, pool.map(lambda c: run(c[0], list(c[1]), c[2], threads, known.out, known.results,
                                                                known.smollm2), commands)))
        runs = {(name, seed): {"final": final_of(results[script, tuple(args), seed], key), "results": results[script, tuple(args), seed]}
                for seed in known.seeds for name, script, args, key in spec["arms"]}
        text = report(table, spec["arms"], spec["baseline"], runs, known.seeds, spec.get("metrics", METRICS),
                      spec.get("paired", METRICS))
        if spec.get("diagnostics"):
            text += "\n\n" + weight_diagnostics(spec["arms"], runs, known.seeds)
        if spec.get("oracle"):
            text += "\n\n" + premise_checks(runs, known.seeds)
        print("\n" + text + f"\n\n({time.time() - start:.0f} s)\n", flush=True)
        if "figure" in spec:
            figure(spec["arms"], runs, known.seeds, Path(__file__).resolve().parent / spec["figure"])

if __name__ == "__main__":
    main()
