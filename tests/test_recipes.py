"""The README's copy recipes ("Copying one method into your own trainer"): a module built from exactly the names its
table lists (their source, and nothing else of this project) gives the project's own numbers on a tiny model, in one
process. The table is read from the README itself, so the two cannot drift apart."""
import __future__
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common as C
import hbat
import ld_align

SECTION = Path(__file__).resolve().parents[1].joinpath("README.md").read_text().split("## Copying one method into your own trainer")[1]
SECTION = SECTION.split("\n## ")[0]


def recipes() -> dict[str, list[str]]:
    """{row: its names}, a row's names being the backticked identifiers and `NAME = value` constants of its "take" cell;
    "the DPO row with ..." starts from the DPO row's names."""
    rows = {}
    for line in SECTION.splitlines():
        if line.startswith("| ") and not line.startswith(("| to use", "|---")):
            use, take = line[2:].split(" | ")[:2]
            names = [n for n in re.findall(r"`([^`]+)`", take) if n.isidentifier() or re.fullmatch(r"[A-Z_]+ = .+", n)]
            rows[use] = (rows[next(iter(rows))] if take.startswith("the DPO row") else []) + names
    return rows


def owner_of(name: str):
    return next(m for m in (C, ld_align, hbat) if name in vars(m) and getattr(vars(m)[name], "__module__", "") == m.__name__)


def build(names: list[str]) -> dict:
    """A fresh namespace: torch, F and math, the constants as written, each function or class by its source."""
    ns = {"math": math, "torch": torch, "F": F, "__name__": "recipe"}
    for name in names:
        if "=" in name:
            exec(name, ns)
            continue
        exec(compile(source(owner_of(name), name), f"recipe:{name}", "exec", __future__.annotations.compiler_flag), ns)
    return ns


def source(owner, name: str) -> str:
    """A name's source; in a script, common's functions are called as C.name: the README says to drop the "C."."""
    text = inspect.getsource(vars(owner)[name])
    return text.replace("C.", "") if owner is not C else text


RECIPES = recipes()


def test_the_readme_lists_a_recipe_per_method_each_short():
    assert len(RECIPES) == 5 and all(RECIPES.values())
    loop = re.search(r"```python\n(.*?)```", SECTION, re.S).group(1)
    for row, (use, names) in enumerate(RECIPES.items()):
        lines = sum(1 if "=" in n else len(source(owner_of(n), n).splitlines()) for n in names)
        if row != 1:  # (the fast path is the DPO recipe's optional extra)
            assert lines + (len(loop.splitlines()) if use.startswith("HBAT") else 0) <= (60 if use.startswith("HBAT") else 80), (use, lines)


def pairs_and_models(tiny):
    model, tokenizer = tiny
    task = C.builtin_task(seed=3, n_sft=4, n_pref=6, n_test=1)
    pairs, _ = C.tokenize_pref(task["pref"], tokenizer, 128, 96)
    torch.manual_seed(0)
    ref = C.frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the policy a little away from its reference: h != 0
    return pairs, model, ref, tokenizer.pad_token_id


@pytest.mark.parametrize("row", [0, 1], ids=["plain", "fast"])
def test_the_dpo_recipe_gives_the_project_s_log_probs_and_loss(tiny, monkeypatch, row):
    names = list(RECIPES.values())[row]
    ns = build(names)
    assert ns["FAST_LOGPS"] == bool(row)
    monkeypatch.setattr(C, "FAST_LOGPS", bool(row))  # the project on the same path
    pairs, model, ref, pad_id = pairs_and_models(tiny)
    assert C.output_head_is_plain(model)  # (so the fast row really takes the fast path)
    with torch.no_grad():
        mine = [ns["concatenated_logps"](m, ns["collate_pairs"](pairs, pad_id)) for m in (model, ref)]
        project = [C.concatenated_logps(m, C.collate_pairs(pairs, pad_id)) for m in (model, ref)]
    for got, expected in zip(mine, project):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    loss = ns["dpo_loss"](mine[0][0], mine[0][1], mine[1][0], mine[1][1], beta=0.1)
    expected = C.dpo_loss(project[0][0], project[0][1], project[1][0], project[1][1], beta=0.1)
    assert all(torch.equal(a, b) for a, b in zip(loss, expected)) and loss[0].abs().sum() > 0
    grads = []  # and the backward (the fast path's own): the same gradient in every tensor
    for logps, collate in ((ns["concatenated_logps"], ns["collate_pairs"]), (C.concatenated_logps, C.collate_pairs)):
        model.zero_grad(set_to_none=True)
        chosen, rejected, _ = logps(model, collate(pairs, pad_id))
        C.dpo_loss(chosen, rejected, mine[1][0], mine[1][1], beta=0.1)[0].mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and grads[0][-1].abs().sum() > 0


def test_the_hbat_recipe_and_readme_loop_give_hbat_alternate_s_penalties_stage_by_stage(tiny):
    """Fake stages move every tensor by a known, stage-dependent amount, then read the penalty they were given: the README's
    loop (built from the recipe) and hbat.alternate (--ewc hbat, 3 rounds) must hand every stage the same penalty."""
    model, _ = tiny
    start = C.snapshot(dict(model.named_parameters()))
    names = RECIPES["HBAT's modified EWC: importance, weights, penalty"]
    loop = re.search(r"```python\n(.*?)```", SECTION, re.S).group(1)

    def stage(kind, index, penalty, seen):
        with torch.no_grad():
            for k, p in enumerate(model.parameters()):  # SFT moves the even tensors most, preference stages the odd ones
                p.add_(1e-6 * (index + 1) * (3.0 if (k % 2 == 0) == (kind == "sft") else 0.5))
        seen.append((kind, None if penalty is None else penalty().item()))

    def readme_run():
        seen, counter = [], iter(range(100))
        ns = {**build(names), "model": model, "sft_shards": [1, 2, 3], "pref_shards": [1, 2, 3],
              "train_sft": lambda m, shard, penalty: stage("sft", next(counter), penalty, seen),
              "train_pref": lambda m, shard, penalty: stage("pref", next(counter), penalty, seen)}
        exec(loop, ns)
        return seen

    def project_run():
        seen = []
        cfg = hbat.Config(rounds=3, ewc="hbat")
        state = {"next_stage": 0, "drift": {"sft": None, "pref": None}}
        shards = {"sft": [[], [], []], "pref": [[{"chosen": None}]] * 3}
        hbat.alternate(cfg, model, shards, state, device=torch.device("cpu"), dtype=torch.float32,
                       train_stage=lambda kind, round_, shard, penalty, seed: stage(kind, seed - cfg.seed, penalty, seen) or [],
                       after_stage=lambda *args: None)
        return seen

    runs = []
    for run in (readme_run, project_run):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        runs.append(run())
    readme, project = runs
    assert [kind for kind, _ in readme] == ["sft", "pref"] * 3 and readme[0][1] is None
    assert all(v is not None and v > 0 for _, v in readme[1:])
    assert [k for k, _ in readme] == [k for k, _ in project] and [v for _, v in readme[1:]] == pytest.approx([v for _, v in project[1:]], rel=1e-12)


class MeanEmbeddingGuide(torch.nn.Module):
    """A stand-in guide: phi(x, y) = the mean input embedding of a sequence's tokens."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def encode(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)


def test_the_ld_align_recipe_gives_the_distances_weights_and_weighted_loss(tiny):
    ns = build(RECIPES["LD-Align's latent distance, weights and weighted loss"])
    pairs, model, _, pad_id = pairs_and_models(tiny)
    guide = MeanEmbeddingGuide(model)
    got = ns["latent_distances"](guide, pairs, pad_id=pad_id, batch_size=4, device="cpu")
    assert torch.equal(got, ld_align.latent_distances(guide, pairs, pad_id=pad_id, batch_size=4, device="cpu")) and got.min() > 0
    distances = torch.tensor([0.0, 0.5, 1.0, 2.0, 6.0])
    weights = ns["latent_weights"](distances, 2.5)
    assert torch.equal(weights, ld_align.pair_weights(distances, "latent", 2.5, 5))
    assert torch.equal(weights, torch.tensor([0.0, 0.5, 1.0, 2.0, 6.0]) / 1.9 * (distances < 4) + 2.5 * (distances > 4))  # by hand: mean 1.9
    logps = [torch.tensor([-3.0, -2.0, -5.0, -1.0, -4.0]) + i for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(ns["dpo_loss"](*logps, beta=0.2, weights=weights), C.dpo_loss(*logps, beta=0.2, weights=weights)))


@pytest.mark.parametrize("critic", [True, False], ids=["gae", "critic_free"])
def test_the_ppo_recipe_gives_ppo_advantages_and_losses(critic):
    ns = build(RECIPES["PPO rewards, advantages and losses"])
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    rollout = {"mask": mask, "critic": critic, "scores": torch.randn(3, generator=gen), "old_logps": torch.randn(3, 4, generator=gen) * mask,
               "ref_logps": torch.randn(3, 4, generator=gen) * mask, "old_values": torch.randn(3, 4, generator=gen) * mask}
    cfg = C.TrainConfig()
    args = (rollout["scores"], rollout["old_logps"], rollout["ref_logps"], mask, cfg.kl_coef)
    if critic:
        rewards = ns["ppo_rewards"](*args)
        advantages, returns = ns["gae"](rewards, rollout["old_values"], mask, cfg.gamma, cfg.lam)
    else:
        rewards, returns = ns["critic_free_rewards"](*args, cfg.gamma), None
        advantages = rewards
    advantages = ns["masked_whiten"](advantages, mask)
    expected = C.ppo_advantages(rollout, cfg)
    assert torch.equal(rewards, expected[0]) and torch.equal(advantages, expected[1])
    assert (returns is None and expected[2] is None) or torch.equal(returns, expected[2])
    logps = rollout["old_logps"] + 0.1 * torch.randn(3, 4, generator=gen) * mask
    assert all(torch.equal(a, b) for a, b in zip(ns["ppo_policy_loss"](logps, rollout["old_logps"], advantages, mask, cfg.clip),
                                                 C.ppo_policy_loss(logps, rollout["old_logps"], advantages, mask, cfg.clip)))
    if critic:
        values = rollout["old_values"] + 0.3
        assert torch.equal(ns["ppo_value_loss"](values, rollout["old_values"], returns, mask, cfg.value_clip),
                           C.ppo_value_loss(values, rollout["old_values"], returns, mask, cfg.value_clip))
