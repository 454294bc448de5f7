"""Runs that survive faults and attacks: checkpoints that load no pickles and notice tampering, one run per
folder (a lock), --overwrite that keeps the earlier run until the new one has finished, writes that never
follow a symbolic link, SIGTERM as SIGINT, and one clear message for a full disk, a damaged file or a
model that cannot take the data. Each case runs the real command line through the scripts' entry point
(common.cli: exit status, one message, no traceback), in this process, or in real processes where the case
needs two of them or a signal."""
import errno
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from types import SimpleNamespace

import common as C
from conftest import ROOT, script_env

TINY = ["--n_sft", "16", "--n_pref", "16", "--eval_size", "4", "--sft_epochs", "1", "--batch_size", "8", "--max_new_tokens", "6",
        "--eval_batch_size", "8"]


def run(*args) -> subprocess.CompletedProcess:
    """`python two_stage_baseline.py TINY args` through its real entry point, common.cli, in this process."""
    import contextlib
    import io

    import two_stage_baseline
    stdout, stderr, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = ["two_stage_baseline.py", *TINY, *map(str, args)]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            C.cli(two_stage_baseline.main, two_stage_baseline.Config)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(sys.argv, code, stdout.getvalue(), stderr.getvalue())


def one_line_error(proc, code: int = 2) -> str:
    """A refused run: the exit status, a single 'error:' line, no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-stage run (DPO), and the bytes of every file it wrote."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run("--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(finished: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(finished, to)
    return to


class Payload:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ============================================================================================
# Checkpoints: no pickles, and nothing resumed that changed
# ============================================================================================


def test_a_pickle_payload_planted_in_a_checkpoint_never_runs(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    marker = tmp_path / "payload_ran"
    for name in ("extra.pt", "optimizer.pt", "pytorch_model.bin"):  # files a checkpoint of this run does not list
        torch.save({"x": Payload(marker)}, out / "checkpoint" / name)
    torch.load(out / "checkpoint" / "extra.pt", weights_only=False)  # the payload is live: unpickled, it runs
    assert marker.exists()
    marker.unlink()
    (out / "results.json").unlink()
    proc = run("--output_dir", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()  # (the planted files stay where they were: a resumed run reads only the files state.json lists)


@pytest.mark.parametrize("fmt", [None, 1], ids=["no_format", "format_1"])
def test_a_checkpoint_of_an_older_format_is_refused_as_an_older_version(finished, tmp_path, fmt):
    """A checkpoint written before its state.json layout last changed (the --*_config settings, HBAT's drift) is named as
    older, not as one written with other settings."""
    out = copy_run(finished, tmp_path / "run")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state.pop("format") == C.CHECKPOINT_FORMAT
    (out / "checkpoint" / "state.json").write_text(json.dumps(state if fmt is None else {**state, "format": fmt}))
    (out / "results.json").unlink()
    before = snapshot(out)
    assert "is damaged or from an older version; start again with --overwrite" in one_line_error(run("--output_dir", out, "--resume"))
    assert snapshot(out) == before


def test_a_checkpoint_from_before_rng_pt_is_refused_as_an_older_version(finished, tmp_path):
    """Checkpoints once kept their RNG state in rng.safetensors: such a checkpoint is named as older, not a missing file."""
    out = copy_run(finished, tmp_path / "run")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    state["sha256"]["rng.safetensors"] = state["sha256"].pop("rng.pt")
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    (out / "checkpoint" / "rng.pt").unlink()
    (out / "results.json").unlink()
    before = snapshot(out)
    assert "is damaged or from an older version; start again with --overwrite" in one_line_error(run("--output_dir", out, "--resume"))
    assert snapshot(out) == before


@pytest.mark.parametrize("sha_updated", [False, True])
def test_a_pickle_payload_in_a_listed_checkpoint_file_is_refused_unrun(finished, tmp_path, sha_updated):
    """rng.pt holding pickled code: refused by its sha256, and, with the sha256 in state.json forged to match, by torch's
    weights-only unpickler, which reads it without running it."""
    out = copy_run(finished, tmp_path / "run")
    marker, rng = tmp_path / "payload_ran", out / "checkpoint" / "rng.pt"
    torch.save({"torch": Payload(marker)}, rng)
    if sha_updated:
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        state["sha256"]["rng.pt"] = C.files_sha256([rng])
        (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    (out / "results.json").unlink()
    before = snapshot(out)
    error = one_line_error(run("--output_dir", out, "--resume"))
    assert str(rng.resolve() if not sha_updated else rng) in error
    assert ("holds pickled code" if sha_updated else "is missing or changed") in error
    assert not marker.exists() and snapshot(out) == before


def test_a_model_folder_holding_only_pickles_is_refused_unloaded(tmp_path, tiny_dir):
    model = tmp_path / "pickled"
    model.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            (model / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "payload_ran"
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(marker), f)
    proc = run("--model", model, "--output_dir", tmp_path / "out")
    assert "pickle" in one_line_error(proc) and str(model) in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["weights replaced", "state truncated", "metrics deleted", "data changed"])
def test_resume_refuses_a_checkpoint_whose_files_changed(finished, tmp_path, damage):
    out = copy_run(finished, tmp_path / "run")
    (out / "results.json").unlink()
    args = []
    if damage == "weights replaced":  # other finite values: a run would go on silently from the wrong weights
        from safetensors.torch import load_file, save_file
        weights = load_file(out / "sft" / "model.safetensors")  # what --resume continues from (its sha256 is in the checkpoint)
        save_file({k: v + 0.01 for k, v in weights.items()}, out / "sft" / "model.safetensors", metadata={"format": "pt"})
        expect = f"{(out / 'sft' / 'model.safetensors').resolve()} is missing or changed"
    elif damage == "state truncated":
        text = (out / "checkpoint" / "state.json").read_text()
        (out / "checkpoint" / "state.json").write_text(text[: len(text) // 2])
        expect = "state.json is damaged"
    elif damage == "metrics deleted":
        (out / "metrics.jsonl").unlink()
        expect = "metrics.jsonl no longer holds the"
    else:  # the data file changed between the kill and --resume
        task = C.builtin_task(seed=0, n_sft=16, n_pref=16, n_test=4)
        sft, pref = tmp_path / "sft.jsonl", tmp_path / "pref.jsonl"
        for path, rows in ((sft, task["sft"] + task["test"]), (pref, task["pref"])):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = ["--sft_data", sft, "--pref_data", pref]
        first = run("--output_dir", tmp_path / "data_run", *args)
        assert first.returncode == 0, first.stderr[-3000:]
        out = tmp_path / "data_run"
        (out / "results.json").unlink()
        sft.write_text(sft.read_text().replace("summary :", "summary : ", 1))
        expect = f"{sft} changed since the checkpoint"
    before = snapshot(out)
    message = one_line_error(run("--output_dir", out, "--resume", *args))
    assert expect in message, message
    assert snapshot(out) == before  # nothing touched


@pytest.mark.parametrize("change", ["two tokenizer ids swapped", "weights changed"])
def test_resume_refuses_a_model_folder_that_changed(tmp_path, tiny_dir, change):
    """A changed --model folder between a kill and --resume: one line naming the flag and the file, nothing touched."""
    import shutil

    model, out = shutil.copytree(tiny_dir, tmp_path / "model"), tmp_path / "run"
    first = run("--model", model, "--output_dir", out)
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "results.json").unlink()
    if change == "weights changed":
        from safetensors.torch import load_file, save_file
        weights = load_file(model / "model.safetensors")
        save_file({k: v + 0.01 for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
        name = "model.safetensors"
    else:  # the same words, two ids exchanged: a model that reads other tokens than the run began with
        tokenizer = json.loads((model / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        a, b = list(vocab)[10:12]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (model / "tokenizer.json").write_text(json.dumps(tokenizer))
        name = "tokenizer.json"
    before = snapshot(out)
    message = one_line_error(run("--model", model, "--output_dir", out, "--resume"))
    assert f"--model {model}: {name} changed since the checkpoint" in message, message
    assert snapshot(out) == before


def test_input_prints_name_a_changed_added_or_removed_file_of_each_model_flag(tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = SimpleNamespace(model="tiny", reward_model=str(folder))
    then = C.input_prints(cfg)
    assert then == {"model": None, "reward_model": {"config.json": C.files_sha256([folder / "config.json"])}}
    checkpoint, data = {"inputs": then, "config": {"reward_model": str(folder)}}, {"report": {}}
    C.check_inputs_unchanged(checkpoint, data, C.input_prints(cfg))  # unchanged: no error
    for edit, says in ((lambda: (folder / "config.json").write_text('{"a": 1}'), "config.json changed"),
                       (lambda: (folder / "extra.json").write_text("{}"), "config.json changed"),  # (the first difference is named)
                       (lambda: (folder / "config.json").unlink(), "config.json removed")):
        edit()
        with pytest.raises(C.ConfigError, match=f"--reward_model {folder}: {says} since the checkpoint"):
            C.check_inputs_unchanged(checkpoint, data, C.input_prints(cfg))
    (folder / "config.json").write_text("{}")
    with pytest.raises(C.ConfigError, match=f"--reward_model {folder}: extra.json added since the checkpoint"):
        C.check_inputs_unchanged(checkpoint, data, C.input_prints(cfg))
    big = folder / "weights.bin"  # above WHOLE_HASH_BYTES a file is known by its size and modification time
    with open(big, "wb") as f:
        f.truncate(C.WHOLE_HASH_BYTES + 1)
    assert C.input_prints(cfg)["reward_model"]["weights.bin"] == f"{C.WHOLE_HASH_BYTES + 1} bytes, mtime {big.stat().st_mtime_ns}"


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path):
    """A run killed before its first checkpoint leaves a partial metrics.jsonl; --resume starts over."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    proc = run("--output_dir", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no checkpoint" in proc.stdout and "starting from the beginning" in proc.stdout
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert (out / "results.json").exists()


def test_a_run_killed_before_its_first_checkpoint_can_be_rerun_plainly(tmp_path):
    """Nothing of such a run can be resumed: its partial metrics.jsonl (and a half-written file) is no other run to keep."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": "sft", "step": 7, "loss/sft": 9.9}\n')
    (out / "sft.tmp").mkdir()  # a model folder it was writing when it died
    proc = run("--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"loss/sft": 9.9' not in (out / "metrics.jsonl").read_text() and not (out / "sft.tmp").exists()
    assert (out / "results.json").exists()
    # a folder holding a checkpoint (something --resume can continue) is still refused without --overwrite or --resume
    (out / "results.json").unlink()
    assert "holds another run's files" in one_line_error(run("--output_dir", out))


# ============================================================================================
# One run per folder
# ============================================================================================


def test_a_folder_held_by_a_live_run_is_refused_naming_its_pid(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    with open(out / ".lock", "w") as lock:  # this test process plays the running run
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("424242")
        lock.flush()
        before = snapshot(out)
        message = one_line_error(run("--output_dir", out, "--overwrite"))
        assert "in use by another run (process 424242)" in message
        assert snapshot(out) == before
    # the holder is gone (its lock went with it): the folder can be taken over
    proc = run("--output_dir", out, "--overwrite", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 1


def test_two_runs_started_together_into_one_folder_leave_one_whole_run(tmp_path):
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "two_stage_baseline.py"), *TINY, "--model", "tiny-random",
                               "--output_dir", str(out), "--seed", str(s),
                               *(["--overwrite"] if s else [])], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 2], [0, 0]), outcomes  # [0, 0]: one ran after the other had finished (then --overwrite replaced it)
    for code, stderr in outcomes:
        if code == 2:
            assert "Traceback" not in stderr and ("in use by another run" in stderr or "changed while this run was starting" in stderr
                                                  or "holds another run's files" in stderr), stderr
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records].count("eval final") == 1  # one run's log, not two interleaved
    assert not (out / ".replaced").exists()
    assert results["config"]["seed"] in (0, 1)


# ============================================================================================
# --overwrite: every check first, then the earlier run's files go; the new run's checkpoints stay on any failure
# ============================================================================================


def test_overwrite_that_fails_late_keeps_the_new_run_and_the_users_files(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    proc = run("--output_dir", out, "--overwrite", "--pref_lr", "1e30")  # passes every check, then the DPO loss blows up
    assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "back in place" not in proc.stderr and not (out / "results.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["config"]["pref_lr"] == 1e30  # the new run's checkpoint


def test_overwrite_that_finishes_deletes_the_earlier_run(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    proc = run("--output_dir", out, "--overwrite", "--seed", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / ".replaced").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 2


def test_an_input_that_would_fail_mid_training_is_refused_first(finished, tmp_path):
    """A model with fewer positions than the data need (GPT-2 with 128 and --max_length 512, in small):
    refused before the earlier run is moved or anything is written."""
    model, tokenizer = C.load_model_and_tokenizer("tiny-random")
    model.config.max_position_embeddings = 16  # the built-in task's rows are ~40 tokens
    C.save_model(model, tokenizer, tmp_path / "short")
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    message = one_line_error(run("--output_dir", out, "--overwrite", "--model", tmp_path / "short"))
    assert "takes at most 16 tokens" in message and message.endswith("give --max_length 16 --max_prompt_length 10")  # 16 - 6 new tokens
    assert snapshot(out) == before
    hint = message.split("; give ")[1].split()
    proc = run("--output_dir", tmp_path / "hinted", "--model", tmp_path / "short", *hint)  # the hint is a run the checks accept
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_tokenizer_with_more_ids_than_the_models_embedding_is_refused_first(finished, tmp_path):
    """A model folder whose weights have fewer embedding rows than its tokenizer has ids (an IndexError mid-run, once)."""
    model, tokenizer = C.load_model_and_tokenizer("tiny-random")
    model.resize_token_embeddings(20)  # the built-in task's words have ids up to ~len(tokenizer)
    C.save_model(model, tokenizer, tmp_path / "cut")
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    message = one_line_error(run("--output_dir", out, "--overwrite", "--model", tmp_path / "cut"))
    assert f"--model {tmp_path / 'cut'}: its tokenizer gives token id " in message and f"({len(tokenizer)} tokens)" in message
    assert "embedding has 20 rows" in message and snapshot(out) == before


def test_writes_never_follow_a_symbolic_link_out_of_the_folder(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(outside)
    (out / "results.json").unlink()
    for flag in ("--resume", "--overwrite"):
        message = one_line_error(run("--output_dir", out, flag))
        assert "metrics.jsonl is a symbolic link" in message
        assert outside.read_text() == "not yours"
    with pytest.raises(OSError) as info:
        C.write_text(out / "metrics.jsonl", "x", os.O_APPEND)  # the writer itself refuses a link (O_NOFOLLOW)
    assert info.value.errno == errno.ELOOP and outside.read_text() == "not yours"


# ============================================================================================
# Signals, full disks, damaged files: one message each
# ============================================================================================


def test_sigterm_stops_like_sigint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "two_stage_baseline.py"), *TINY, "--model", "tiny-random", "--pref_epochs", "50",
               "--output_dir", str(out)]  # (50 DPO epochs: seconds of work left after the first checkpoint)
    proc = subprocess.Popen(command, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr, stderr
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("SafetensorError: No space left on device")])
def test_a_full_disk_is_one_message_and_leaves_the_old_folder(tmp_path, failure):
    path = tmp_path / "checkpoint"
    C.write_folder(path, lambda tmp: (tmp / "state.json").write_text("old"))

    def fill(tmp):
        (tmp / "state.json").write_text("half")
        raise failure

    with pytest.raises(OSError) as info:  # cli: "error: no space left on the device (...); free some, then --resume", exit 1
        C.write_folder(path, fill)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert (path / "state.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_truncated_model_file_is_one_message(tmp_path, tiny_dir):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes()[: 100] if f.suffix == ".safetensors" else f.read_bytes())
    message = one_line_error(run("--model", model, "--output_dir", tmp_path / "out"))
    assert f"--model {model}: could not load it" in message
    assert not (tmp_path / "out").exists()


def test_output_dir_with_a_tilde_after_an_equals_sign_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = C.parse_config(C.TrainConfig, ["--output_dir=~/runs/x", "--model", "tiny"])
    assert cfg.output_dir == str(tmp_path / "runs" / "x")


# ============================================================================================
# Regressions (a review of the rewrite): each of these failed before its fix
# ============================================================================================


def small(out, **overrides):
    import two_stage_baseline
    return two_stage_baseline.Config(**{**dict(n_sft=16, n_pref=16, eval_size=4, sft_epochs=1, batch_size=8, max_new_tokens=6,
                                                eval_batch_size=8, device="cpu", output_dir=str(out)), **overrides})


def test_a_stopped_overwrite_leaves_the_new_run_resumable(finished, tmp_path, monkeypatch, capsys):
    """A full disk in the new run's DPO stage: one line, the new run's checkpoint stays; a plain run is refused (it holds a
    run); --resume finishes it with the uninterrupted run's results."""
    import two_stage_baseline
    out = copy_run(finished, tmp_path / "run")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C, "train_dpo", full_disk)
    monkeypatch.setattr(sys, "argv", ["two_stage_baseline.py", *TINY, "--overwrite", "--output_dir", str(out)])
    with pytest.raises(SystemExit) as info:
        C.cli(two_stage_baseline.main, two_stage_baseline.Config)
    assert info.value.code == 1 and "no space left on the device" in capsys.readouterr().err
    assert (out / "checkpoint" / "state.json").exists() and not (out / "results.json").exists() and not (out / "final").exists()
    monkeypatch.undo()
    with pytest.raises(C.ConfigError, match="holds another run's files"):
        two_stage_baseline.main(small(out))
    two_stage_baseline.main(small(out, resume=True))
    assert json.loads((out / "results.json").read_text())["sft+dpo"] == json.loads((finished / "results.json").read_text())["sft+dpo"]


def test_an_overwrite_stopped_while_removing_the_earlier_run_leaves_nothing_to_resume(finished, tmp_path, monkeypatch):
    """The checkpoint goes first: killed right after it, the half-removed run cannot be mistaken for one to continue."""
    import two_stage_baseline
    out = copy_run(finished, tmp_path / "run")
    removed, remove = [], C.remove

    def remove_then_stop(path):
        remove(path)
        removed.append(path.name)
        if len(removed) == 1:
            raise KeyboardInterrupt  # a kill right after the first removal

    monkeypatch.setattr(C, "remove", remove_then_stop)
    with pytest.raises(KeyboardInterrupt):
        two_stage_baseline.main(small(out, overwrite=True, seed=5))
    monkeypatch.undo()
    assert removed == ["checkpoint"] and (out / "final").exists() and (out / "results.json").exists()
    for refused, says in ((small(out, seed=5), "holds another run's files"), (small(out, seed=5, resume=True), "no checkpoint")):
        with pytest.raises(C.ConfigError, match=says):
            two_stage_baseline.main(refused)
    two_stage_baseline.main(small(out, overwrite=True, seed=5))
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 5


@pytest.mark.parametrize("failure", [OSError(errno.EFBIG, "File too large"), PermissionError(errno.EACCES, "Permission denied", "x"),
                                     MemoryError()], ids=["file too large", "permission", "memory"])
def test_a_late_resource_error_is_one_line_and_the_run_resumes(finished, tmp_path, monkeypatch, capsys, failure):
    """An --overwrite run that meets a resource error after its first checkpoint keeps its checkpoints and says so in one
    line; --resume then finishes it with the uninterrupted run's results."""
    import two_stage_baseline
    out = copy_run(finished, tmp_path / "run")

    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(C, "train_dpo", fails)  # after the SFT stage's checkpoint
    monkeypatch.setattr(sys, "argv", ["two_stage_baseline.py", *TINY, "--overwrite", "--output_dir", str(out)])
    with pytest.raises(SystemExit) as info:
        C.cli(two_stage_baseline.main, two_stage_baseline.Config)
    stderr = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--resume continues" in lines[0], stderr
    assert (out / "checkpoint" / "state.json").exists() and not (out / "results.json").exists()  # the earlier run's: removed
    monkeypatch.undo()
    resumed = run("--output_dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["sft+dpo"] == json.loads((finished / "results.json").read_text())["sft+dpo"]


def test_hbat_resumes_from_a_checkpoint_written_after_its_last_stage(tmp_path):
    import hbat
    cfg = hbat.Config(n_sft=16, n_pref=16, eval_size=4, sft_epochs=1, batch_size=8, max_new_tokens=6, eval_batch_size=8, rounds=1,
                      device="cpu", output_dir=str(tmp_path / "run"))
    whole = hbat.main(cfg)
    (tmp_path / "run" / "results.json").unlink()
    import shutil
    shutil.rmtree(tmp_path / "run" / "final")
    import dataclasses
    resumed = hbat.main(dataclasses.replace(cfg, resume=True))
    assert resumed["reward_metric"] == whole["reward_metric"] == "gold reward" and resumed["trajectory"] == whole["trajectory"]


def test_micro_steps_on_a_rank_whose_share_is_empty(monkeypatch):
    """Two ranks, one example: rank 1's share is empty, and it runs one zero-weighted filler (so it has gradients to sum)."""
    monkeypatch.setattr(C, "my_share", lambda items: [])
    monkeypatch.setattr(C, "lockstep", lambda batches, filler: batches + [filler])  # the other rank has one micro-batch
    calls = []
    metrics = C.micro_steps(lambda micro, whole, scale=1.0: calls.append((micro, whole, scale)) or {"n": len(micro)}, ["x"],
                            C.TrainConfig(grad_accum_steps=2))
    assert calls == [([], ["x"], 1.0), ([["x"]], ["x"], 0.0)] and metrics == {"n": 0}


def test_a_ppo_rollout_smaller_than_the_minibatch_count_makes_no_empty_update(tiny_dir, monkeypatch):
    """One prompt, --ppo_minibatches 2: one update per PPO epoch (an empty minibatch would step on nothing but the penalty)."""
    policy, tokenizer = C.load_model_and_tokenizer(str(tiny_dir))
    reward_model = C.load_reward_model(str(tiny_dir), tokenizer, new_head=True, flag="")
    cfg = C.TrainConfig(ppo_minibatches=2, ppo_epochs=3, max_new_tokens=4, device="cpu")
    steps = []

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            steps.append(1)
            return super().step(closure)

    optimizer = CountingSGD(policy.parameters(), lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    prompt = C.encode_prompt(tokenizer, C.builtin_task(0, 1, 0, 1)["sft"][0]["prompt"])
    C.ppo_step(policy, C.frozen_copy(policy), reward_model, None, [prompt], [(optimizer, schedule)], cfg,
               device=torch.device("cpu"), dtype=torch.float32)
    assert len(steps) == 3


def test_a_json_file_with_one_line_of_json_lines_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{"prompt": "a", "completion": "b"}\n')  # what Dataset.to_json writes for one row
    assert C.read_rows(str(path)).rows == [{"prompt": "a", "completion": "b"}]
