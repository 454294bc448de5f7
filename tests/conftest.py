"""Shared fixtures for the tests: offline hub settings, the repo root on sys.path, the tiny model, and
script runs in subprocesses.

`tiny_dir` builds the built-in task's tiny model and tokenizer once per session (seed 0, `tiny-random`:
the math checks want an arbitrary model, not the warm start's) and saves them with common.save_model; `tiny` loads a fresh copy from that folder with common.load_model_and_tokenizer,
so every test gets its own model/tokenizer (safe to train or mutate) and the real loading code is used.
`script_run` runs a script's command line once per session (smoke tests and the kill/resume tests share
the runs). Tests marked `slow` (kill/resume) still run by default; `-m "not slow"` skips them.
"""
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import common  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Folder holding the saved tiny model + tokenizer (built once per session, seed 0, random weights)."""
    path = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = common.load_model_and_tokenizer("tiny-random", seed=0)
    common.save_model(model, tokenizer, path)
    return path


@pytest.fixture
def tiny(tiny_dir):
    """A fresh (model, tokenizer) loaded back from tiny_dir with common.load_model_and_tokenizer."""
    return common.load_model_and_tokenizer(str(tiny_dir))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: several whole script runs in subprocesses (run by default)")


def script_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def script_run(tmp_path_factory):
    """script_run(script, *args) -> (CompletedProcess, output folder): `python script args --output_dir
    <fresh folder>`, run once per distinct command line in the session."""
    runs = {}

    def run(script: str, *args):
        key = (script, *map(str, args))
        if key not in runs:
            out = tmp_path_factory.mktemp(Path(script).stem) / "run"
            proc = subprocess.run([sys.executable, str(ROOT / script), *key[1:], "--output_dir", str(out)], cwd=ROOT,
                                  env=script_env(), capture_output=True, text=True, timeout=300)
            runs[key] = (proc, out)
        return runs[key]

    return run


def all_metrics_lines(out: Path) -> int:
    """Lines in out's metrics.jsonl files (hbat --compare writes one per run). Known paths only: a walk of
    the folder while the script renames checkpoint.tmp would race it."""
    total = 0
    for path in (out / "metrics.jsonl", out / "two_stage" / "metrics.jsonl", out / "joint" / "metrics.jsonl"):
        try:
            total += len(path.read_text().splitlines())
        except FileNotFoundError:
            pass
    return total


@pytest.fixture
def kill_and_resume(tmp_path):
    """kill_and_resume(script, args, whole): run `script args` into a new folder, SIGKILL it at a seeded
    random point (once its metrics.jsonl files hold k lines, k drawn from the last third of the
    uninterrupted run's lines in `whole`, so that a checkpoint exists), run it again with --resume, and
    check that it continued from the checkpoint and ended as the uninterrupted run did: every saved
    tensor equal, metrics.jsonl and results.json identical. Returns the resumed run's CompletedProcess."""
    import json
    import random
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    def run(script: str, args: list, whole: Path):
        out, total = tmp_path / "killed", all_metrics_lines(whole)
        kill_at = random.Random(f"kill {script} {args}").randint(total * 2 // 3, total - 2)
        command = [sys.executable, str(ROOT / script), *map(str, args), "--output_dir", str(out)]
        proc = subprocess.Popen(command, cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and (not out.exists() or all_metrics_lines(out) < kill_at):
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before line {kill_at} of {total}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = subprocess.run([*command, "--resume"], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, f"killed at line {kill_at} of {total}\n{resumed.stderr[-3000:]}"
        assert "resuming" in resumed.stdout or "continuing" in resumed.stdout, resumed.stdout[-3000:]

        tensors = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
        assert tensors and tensors == sorted(p.relative_to(out) for p in out.rglob("*.safetensors"))
        for name in tensors:
            a, b = load_file(whole / name), load_file(out / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs (killed at line {kill_at})"
        for name in ["metrics.jsonl"] + [f"{arm}/metrics.jsonl" for arm in ("two_stage", "joint") if (whole / arm).exists()]:
            assert (whole / name).read_text() == (out / name).read_text(), f"{name} differs (killed at line {kill_at})"
        results = [json.loads((folder / "results.json").read_text()) for folder in (whole, out)]
        for r in results:
            r["config"].pop("output_dir"), r["config"].pop("resume")
        assert results[0] == results[1]
        return resumed

    return run
