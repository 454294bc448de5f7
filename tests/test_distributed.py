"""torchrun: N processes train what one would. On CPU with gloo, 2 processes, in subprocesses:
- two epochs of SFT (with an HBAT penalty) and of DPO, ragged last batch included, under DDP and FSDP2,
  end with the weights of one process (tests/distributed_steps.py);
- each script end to end under torchrun (smoke), rank 0 alone printing and writing;
- --resume under torchrun continues a two-stage run to the same results.
The one-process helpers (split, my_share, my_part, gather, lockstep) are the identity there: tested directly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common as C

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_sft", "48", "--n_pref", "48", "--eval_size", "6", "--sft_epochs", "1", "--batch_size", "12",
        "--ppo_batch_size", "12", "--max_new_tokens", "8", "--eval_batch_size", "4"]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


# ============================================================================================
# One process: the layer does nothing
# ============================================================================================


def test_split_is_contiguous_and_balanced():
    items = list(range(10))
    parts = C.split(items, 3)
    assert [len(p) for p in parts] == [3, 4, 3] and sum(parts, []) == items
    assert C.split(items, 1) == [items]


def test_one_process_helpers_are_the_identity():
    items, t = [1, 2, 3], torch.arange(4.0)
    assert C.world_size() == 1 and C.is_main() and C.my_share(items) is items and C.gather(items) is items
    assert C.gather_rows(t) is t and C.sum_over_ranks(t) is t and C.lockstep([[1], [2]], [0]) == [[1], [2]]
    assert C.local(t) is t and C.whole(t) is t
    params = {"a": torch.nn.Parameter(torch.ones(2, 2)), "b": torch.nn.Parameter(torch.zeros(3))}
    mine = C.my_part(params)  # one process: every tensor, itself
    assert list(mine) == list(params) and all(mine[n] is params[n] for n in params)


def test_fsdp_is_refused_without_torchrun_and_with_the_textbook_fisher(tmp_path):
    import hbat
    assert hbat.check(hbat.Config(fsdp=True, ewc="fisher")) == ["--ewc fisher needs whole models: run it under torchrun without --fsdp"]
    assert hbat.check(hbat.Config(fsdp=True)) == [] and hbat.check(hbat.Config(ewc="fisher")) == []
    with pytest.raises(C.ConfigError) as info:  # both problems, before anything is written
        hbat.main(hbat.Config(fsdp=True, ewc="fisher", output_dir=str(tmp_path / "out")))
    assert "--ewc fisher needs whole models" in str(info.value) and "torchrun --nproc_per_node N" in str(info.value)
    assert not (tmp_path / "out").exists()


# ============================================================================================
# N processes: the same weights as one
# ============================================================================================


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_two_processes_give_the_weights_of_one(mode, tiny_dir, tmp_path):
    """Two epochs on 11 examples, global batch 8 in 2 micro-batches (second step ragged: 3 examples over 2
    ranks, so FSDP runs a zero-weighted filler micro-batch), SFT with an HBAT penalty spread over every
    tensor: 1 process, DDP on 2, FSDP2 on 2. Equal to float tolerance (sums in another order)."""
    script = REPO / "tests" / "distributed_steps.py"
    one = subprocess.run([sys.executable, str(script), mode, str(tiny_dir), str(tmp_path / "one.pt")], cwd=REPO,
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    expected = torch.load(tmp_path / "one.pt")
    start = load_file(tiny_dir / "model.safetensors")
    moved = max((expected[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the steps changed the weights: equality below is not trivial
    for flags in ([], ["--fsdp"]):
        out = tmp_path / f"two{''.join(flags)}.pt"
        proc = torchrun(script, mode, tiny_dir, out, *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = torch.load(out)
        assert sorted(got) == sorted(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2e-5, msg=f"{flags} {name}")


# ============================================================================================
# Each script under torchrun (smoke), and --resume
# ============================================================================================


SMOKE = [("two_stage_baseline.py", []), ("two_stage_baseline.py", ["--pref", "ppo", "--fsdp"]),
         ("two_stage_baseline.py", ["--fsdp", "--precompute_ref_logps", "--gradient_checkpointing", "--grad_accum_steps", "3"]),
         ("hbat.py", ["--rounds", "2", "--fsdp"]), ("hbat.py", ["--rounds", "2", "--pref", "ppo", "--ewc", "fisher"]),
         ("ld_align.py", ["--iterations", "1", "--compare"]), ("ld_align.py", ["--iterations", "1", "--fsdp", "--guide", "scratch", "--diagnostic_pairs", "0"])]


@pytest.mark.slow
@pytest.mark.parametrize("script,flags", SMOKE, ids=[f"{s} {' '.join(f)}" for s, f in SMOKE])
def test_smoke_every_script_under_torchrun(script, flags, tmp_path):
    proc = torchrun(script, *TINY, *flags, "--output_dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\nsaved ") == 1  # rank 0 alone prints
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["fsdp"] == ("--fsdp" in flags)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # a whole Hugging Face checkpoint
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.slow
def test_resume_under_torchrun_ends_like_the_whole_run(tmp_path):
    """A finished two-stage run, cut back to its checkpoint (after SFT, the reward model and the SFT
    evaluation), resumed under torchrun: the same final weights and results as the whole run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [*TINY, "--pref", "ppo"]
    proc = torchrun("two_stage_baseline.py", *args, "--output_dir", whole)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "final")
    (cut / "results.json").unlink()
    proc = torchrun("two_stage_baseline.py", *args, "--output_dir", cut, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume: continuing" in proc.stdout
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda r: {k: v for k, v in r.items() if k != "config"}  # noqa: E731 (the config differs in --resume)
    assert drop(json.loads((whole / "results.json").read_text())) == drop(json.loads((cut / "results.json").read_text()))


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank among the descendants of `parent` (from /proc), or None."""
    for stat in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"RANK={rank}".encode() in stat.read_bytes().split(b"\0") and str(parent) in ancestors(int(stat.parent.name)):
                return int(stat.parent.name)
        except OSError:
            continue
    return None


def ancestors(pid: int) -> list[str]:
    chain = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        chain.append(str(pid))
    return chain


@pytest.mark.slow
def test_a_lost_rank_after_the_first_checkpoint_leaves_the_new_run_resumable(tmp_path):
    """--overwrite over a finished run under torchrun; rank 1 is killed once the new run's first checkpoint is written. Rank 0
    says so in one line, the new run's checkpoint stays (nothing is put back over it) and --resume finishes the run."""
    import signal
    import time

    out, args = tmp_path / "run", [*TINY, "--pref", "ppo", "--pref_epochs", "3"]
    assert subprocess.run([sys.executable, "two_stage_baseline.py", *map(str, TINY), "--output_dir", str(out)], cwd=REPO, env=env(),
                          capture_output=True, timeout=300).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "two_stage_baseline.py",
           *map(str, args), "--seed", "1", "--overwrite", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        state, deadline = out / "checkpoint" / "state.json", time.time() + 240
        while not (state.exists() and json.loads(state.read_text())["config"]["seed"] == 1):
            assert time.time() < deadline and proc.poll() is None, "no checkpoint from the new run"
            time.sleep(0.2)
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "[rank0]: Traceback" not in stderr  # rank 0: one line (what follows it is torchrun's own report)
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [next(
        line for line in stderr.splitlines() if line.startswith("error: another process of this torchrun run stopped"))]
    assert "--resume continues" in stderr
    assert json.loads(state.read_text())["config"]["seed"] == 1 and not (out / "results.json").exists()
    resumed = torchrun("two_stage_baseline.py", *args, "--seed", "1", "--output_dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--resume: continuing" in resumed.stdout and json.loads((out / "results.json").read_text())["config"]["seed"] == 1
