"""experiments/study.py: a cell (one command line at one seed) runs once, is kept in its results file, and is
reused from that file without running again; a failing cell leaves no file. Smoke test: one tiny cell."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("study", REPO / "experiments" / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

TINY = ["--n_sft", "24", "--n_pref", "16", "--eval_size", "4", "--sft_epochs", "1", "--batch_size", "8",
        "--max_new_tokens", "6", "--eval_samples", "1", "--model", "tiny-random"]


def test_smoke_a_cell_runs_once_then_comes_from_its_file(tmp_path, monkeypatch):
    results_dir = tmp_path / "results"
    first = study.run("two_stage_baseline.py", TINY, 3, 1, tmp_path / "runs", results_dir, Path("unused"))
    cell = results_dir / study.cell_tag("two_stage_baseline.py", TINY) / "seed3.json"
    kept = json.loads(cell.read_text())
    assert kept["command"] == ["two_stage_baseline.py", *TINY, "--seed", "3"] and kept["results"] == first
    assert kept["results"]["config"]["seed"] == 3 and {"sft", "sft+dpo"} <= set(first)
    assert (tmp_path / "runs" / cell.parent.name / "seed3.log").read_text()  # the cell's output went to its log

    def no_run(*args, **kwargs):
        raise AssertionError("a kept cell was run again")
    monkeypatch.setattr(subprocess, "run", no_run)
    assert study.run("two_stage_baseline.py", TINY, 3, 1, tmp_path / "runs", results_dir, Path("unused")) == first


def test_a_failing_cell_exits_with_its_log_and_keeps_nothing(tmp_path):
    with pytest.raises(SystemExit) as stop:
        study.run("two_stage_baseline.py", [*TINY, "--beta", "-1"], 0, 1, tmp_path / "runs", tmp_path / "results", Path("unused"))
    assert "failed (" in str(stop.value) and "--beta" in str(stop.value)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))


def test_main_table_budget_is_equal_in_steps_and_learning_rate_mass():
    """Two-stage's DPO steps = HBAT's K stages' steps, for every K the protocol uses, with no ragged batch."""
    args = study.TABLES["main"]["arms"][1][2]
    batch = int(args[args.index("--batch_size") + 1])
    assert args[args.index("--warmup_steps") + 1] == "0" and args[args.index("--lr_scheduler_type") + 1] == "constant"
    for rows in (3000, 2000):  # the default SFT rows and preference pairs
        for k in (1, 2, 5, 10):
            assert rows % k == 0 and (rows // k) % batch == 0


def test_a_stage_key_reads_that_stage_of_the_trajectory_and_a_plain_key_the_final_model():
    results = {"hbat dpo": {"reward": 0.5}, "trajectory": [{"stage": "round 1 sft", "reward": 0.1}, {"stage": "round 2 sft", "reward": 0.2}]}
    assert study.final_of(results, "hbat dpo") == {"reward": 0.5}
    assert study.final_of(results, study.at_stage("hbat dpo", "round 2 sft"))["reward"] == 0.2


def test_every_table_names_its_baseline_and_each_arm_once():
    for name, spec in study.TABLES.items():
        names = [arm[0] for arm in spec["arms"]]
        assert len(set(names)) == len(names) and spec["baseline"] in names, name


def test_weight_diagnostics_are_the_mean_and_sd_over_seeds_per_arm_and_iteration():
    def trajectory(shift):
        return {"trajectory": [{"arm": "sft", "iteration": 0},
                               {"arm": "ld_align", "iteration": 1, "rho_w_gap": 0.2 + shift, "rho_w_grad": 0.1, "rho_grad_gap": 0.3,
                                "cos_weighted_uniform": 0.9},
                               {"arm": "spin", "iteration": 1, "rho_grad_gap": 0.5 - shift}]}
    runs = {(name, seed): {"results": trajectory(0.2 * seed)} for name in ("s", "l", "sft") for seed in (0, 1)}
    arms = [("sft", "ld_align.py", [], "sft"), ("s", "ld_align.py", [], "spin"), ("l", "ld_align.py", [], "ld_align")]
    lines = study.weight_diagnostics(arms, runs, [0, 1]).splitlines()
    assert lines[4:] == ["| s | 1 |  |  | 0.400 +- 0.141 |  |",  # SPIN: rho_grad_gap only; the SFT row has none
                         "| l | 1 | 0.300 +- 0.141 | 0.100 +- 0.000 | 0.300 +- 0.000 | 0.900 +- 0.000 |"]
