"""Run by tests/test_distributed.py, under `torchrun --nproc_per_node N` or as one plain process: from the
tiny model in MODEL_DIR, two epochs of SFT (with an HBAT penalty spread over every tensor) or of DPO on 11
examples with a global batch of 8 and 2 micro-batches (so the second step is ragged: 3 examples over the
ranks), then rank 0 saves the whole weights to OUT_FILE.

    python tests/distributed_steps.py sft|dpo MODEL_DIR OUT_FILE [--fsdp]
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

mode, model_dir, out_file = sys.argv[1:4]
cfg = C.TrainConfig(batch_size=8, grad_accum_steps=2, sft_epochs=2, pref_epochs=2, warmup_steps=0, device="cpu",
                    fsdp="--fsdp" in sys.argv, sft_lr=1e-3, pref_lr=1e-3)
C.init_distributed(cfg)
device, dtype = torch.device("cpu"), torch.float32
model, tokenizer = C.load_model_and_tokenizer(model_dir)
model.double()  # float64: summing in another order (over ranks) moves no weight by more than rounding, even through
# Adam's m / sqrt(v), which magnifies float32 noise in elements whose gradient is near zero
C.pick_dtype = lambda *_: torch.float64  # and FSDP's forward in float64 too (its mixed-precision policy takes this dtype)
C.disable_dropout(model)
C.place(model, cfg, device)
task = C.builtin_task(0, n_sft=11, n_pref=11, n_test=1)
if mode == "sft":
    examples, _ = C.tokenize_sft(task["sft"], tokenizer, cfg.max_length, cfg.max_prompt_length)
    names = list(C.trainable(model))
    params = C.my_part(C.trainable(model))  # this rank's part, as hbat.stage_regulariser builds it: the penalty adds up once over ranks
    anchor, weights = C.snapshot(params), {n: 1.0 / len(names) for n in names}
    C.train_sft(model, examples, cfg, device=device, dtype=dtype, seed=0,
                penalty=lambda: C.hbat_penalty(params, weights, anchor, 1.0, 1e4))
else:
    examples, _ = C.tokenize_pref(task["pref"], tokenizer, cfg.max_length, cfg.max_prompt_length)
    C.train_dpo(model, examples, cfg, device=device, dtype=dtype, seed=0)
state_dict = C.full_state_dict(model) or model.state_dict()
if C.is_main():
    torch.save({k: v.detach().clone() for k, v in state_dict.items()}, out_file)
if C.world_size() > 1:  # as common.cli leaves: all ranks done, then out before gloo's threads can abort a rank in Python's clean-up
    C.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
