"""ld_align.py: the guiding auto-encoder, the latent weights, the weighted self-play loss, the reference
chain across iterations, the real-data path (SFT data only), and smoke runs end to end."""
import copy
import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

import common as C
import ld_align as L
from test_real_format import real_like  # noqa: F401  (fixture: GPT-2, byte-level BPE, chat template, pad == EOS)

REPO = Path(__file__).resolve().parents[1]  # conftest.py sets the offline variables and sys.path
CPU = torch.device("cpu")
TINY = dict(n_sft=32, eval_size=4, sft_epochs=1, batch_size=16, max_new_tokens=8, eval_batch_size=16, guide_dim=16,
            latent_dim=8, guide_layers=1, guide_heads=2, device="cpu")


def tiny_config(output_dir, **overrides) -> L.Config:
    return L.Config(**{**TINY, "output_dir": str(output_dir), **overrides})


def gold_seqs(tokenizer, n: int, seed: int = 0) -> list[dict]:
    rows = C.builtin_task(seed=seed, n_sft=n, n_pref=0, n_test=1)["sft"]
    return [C.sequence(C.encode_prompt(tokenizer, r["prompt"]), C.encode_response(tokenizer, r["completion"])) for r in rows]


def trained_guide(tokenizer, seqs, steps: int, **sizes) -> L.GuideModel:
    torch.manual_seed(0)
    guide = L.GuideModel(len(tokenizer), 128, **sizes)
    optimizer = torch.optim.AdamW(guide.parameters(), lr=3e-3)
    batch = C.collate(seqs, tokenizer.pad_token_id)
    for _ in range(steps):
        guide.reconstruction_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return guide


# ============================================================================================
# 1. the guiding model
# ============================================================================================


def test_guide_reconstruction_loss_falls_on_a_fixed_batch(tiny):
    _, tok = tiny
    seqs = gold_seqs(tok, 16)
    batch = C.collate(seqs, tok.pad_token_id)
    torch.manual_seed(0)
    guide = L.GuideModel(len(tok), 128, dim=32, latent_dim=16, layers=1, heads=2)
    with torch.no_grad():
        first = guide.reconstruction_loss(batch).item()
    assert abs(first - math.log(len(tok))) < 0.5  # small init: close to uniform over the vocabulary
    trained = trained_guide(tok, seqs, 80, dim=32, latent_dim=16, layers=1, heads=2)
    with torch.no_grad():
        last = trained.reconstruction_loss(batch).item()
    assert last < 0.3 * first, (first, last)


@pytest.mark.parametrize("kind", ["policy", "scratch"])
def test_build_guide_is_the_chosen_guide_seeded_alike(tiny, kind):
    model, tok = tiny
    cfg = tiny_config("unused", guide=kind, guide_reads_prompt=True)
    first, second = L.build_guide(cfg, model, tok), L.build_guide(cfg, model, tok)
    assert isinstance(first, L.PolicyGuide if kind == "policy" else L.GuideModel) and first.reads_prompt
    assert same(first.state_dict(), second.state_dict())  # seeded with --seed: every run builds the same guide
    assert not L.build_guide(dataclasses.replace(cfg, guide_reads_prompt=False), model, tok).reads_prompt


def test_decoder_input_without_the_prompt_is_each_response_moved_left():
    """By hand: rows [x; y] right-padded; without the prompt the decoder reads y alone, left-aligned."""
    seqs = [C.sequence([5, 6], [7, 8, 9]), C.sequence([5, 6, 4, 3], [2]), C.sequence([1], [3, 4])]
    batch = C.collate(seqs, pad_id=0)
    ids, response, seen = L.decoder_input(batch, reads_prompt=False)
    assert ids.tolist() == [[7, 8, 9], [2, 0, 0], [3, 4, 0]]
    assert response.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    assert seen.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    same = L.decoder_input(batch, reads_prompt=True)
    assert same[0] is batch["input_ids"] and same[2] is batch["attention_mask"]
    assert torch.equal(same[1], batch["labels"] != C.IGNORE_INDEX)


@pytest.mark.parametrize("reads_prompt", [True, False])
def test_policy_guide_loss_is_the_decoders_cross_entropy_after_the_latent_prefix(tiny, reads_prompt):
    """PolicyGuide by brute force: for one unpadded sequence at a time, the decoder (a copy of the policy)
    runs on [W_p phi(x, y); embeddings of x, y] (of y alone without the prompt) through its own forward,
    and the output at the position before each response token scores it; the batched, padded loss is
    the token mean of those."""
    model, tok = tiny
    seqs = gold_seqs(tok, 3)
    torch.manual_seed(1)
    guide = L.PolicyGuide(model, latent_dim=8, reads_prompt=reads_prompt).eval()
    assert guide.decoder is not model and torch.equal(guide.decoder.lm_head.weight, model.lm_head.weight)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            start = 0 if reads_prompt else s["labels"].count(C.IGNORE_INDEX)  # the decoder's input: [x; y] or y
            ids, labels = torch.tensor([s["input_ids"][start:]]), s["labels"][start:]
            prefix = guide.from_latent(guide.encode(C.collate([s], tok.pad_token_id)))[:, None]
            embeds = torch.cat([prefix, guide.decoder.get_input_embeddings()(ids)], 1)
            logps = guide.decoder(inputs_embeds=embeds).logits.log_softmax(-1)[0]
            for j, label in enumerate(labels):
                if label != C.IGNORE_INDEX:  # output j (after the prefix and tokens < j) predicts token j
                    total -= logps[j, ids[0, j]].item()
                    count += 1
        batched = guide.reconstruction_loss(C.collate(seqs, tok.pad_token_id)).item()
    assert batched == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("reads_prompt", [True, False])
def test_policy_guide_starts_far_below_the_uniform_guess_and_learns(tiny, reads_prompt):
    """The pretrained guide's decoder is a language model already: after the policy has seen the task
    for a few steps its loss starts below ln |V| (far below when it reads the prompt it can copy from),
    and guide training halves it."""
    model, tok = tiny
    seqs = gold_seqs(tok, 16)
    cfg = dataclasses.replace(C.TrainConfig(), sft_epochs=2, batch_size=8, warmup_steps=0)
    C.train_sft(model, seqs, cfg, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    torch.manual_seed(0)
    guide, batch = L.PolicyGuide(model, latent_dim=8, reads_prompt=reads_prompt), C.collate(seqs, tok.pad_token_id)
    with torch.no_grad():
        first = guide.reconstruction_loss(batch).item()
    optimizer = torch.optim.AdamW(guide.parameters(), lr=1e-3)
    for _ in range(20):
        guide.reconstruction_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        last = guide.reconstruction_loss(batch).item()
    assert first < math.log(len(tok)) - (0.5 if reads_prompt else 0.1) and last < 0.5 * first, (first, last, math.log(len(tok)))


@pytest.mark.parametrize("reads_prompt", [True, False])
def test_reconstruction_loss_is_the_response_token_cross_entropy(tiny, reads_prompt):
    """Brute force: run the decoder on one unpadded sequence at a time and sum -log p over response tokens."""
    _, tok = tiny
    seqs = gold_seqs(tok, 3)
    torch.manual_seed(1)
    guide = L.GuideModel(len(tok), 128, dim=16, latent_dim=8, layers=1, heads=2, reads_prompt=reads_prompt).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            batch = C.collate([s], tok.pad_token_id)
            n = sum(label != C.IGNORE_INDEX for label in s["labels"])
            total += guide.reconstruction_loss(batch).item() * n
            count += n
        batched = guide.reconstruction_loss(C.collate(seqs, tok.pad_token_id)).item()
    assert batched == pytest.approx(total / count, abs=1e-5)  # a token mean over the batch, padding ignored


def test_latent_has_the_configured_size_and_ignores_padding(tiny):
    _, tok = tiny
    seqs = gold_seqs(tok, 6)
    guide = L.GuideModel(len(tok), 128, dim=16, latent_dim=12, layers=1, heads=2).eval()
    with torch.no_grad():
        together = guide.encode(C.collate(seqs, tok.pad_token_id))
        alone = torch.cat([guide.encode(C.collate([s], tok.pad_token_id)) for s in seqs])
    assert together.shape == (6, 12)
    assert torch.allclose(together, alone, atol=1e-5)  # padding and the other rows change nothing


def edit(tokenizer, seq: dict, k: int, rng: random.Random) -> dict:
    """The same prompt with k response words replaced by other words of the vocabulary."""
    n_prompt = seq["labels"].count(C.IGNORE_INDEX)
    response = seq["input_ids"][n_prompt:]
    words = list(range(3, len(tokenizer)))  # not <pad>, <unk>, <eos>
    for i in rng.sample(range(len(response) - 1), k):  # the EOS stays
        response[i] = rng.choice([w for w in words if w != response[i]])
    return C.sequence(seq["input_ids"][:n_prompt], response)


def test_distance_is_zero_for_identical_responses_and_grows_with_edits(tiny):
    _, tok = tiny
    seqs = [s for s in gold_seqs(tok, 120, seed=3) if s["labels"].count(C.IGNORE_INDEX) < len(s["labels"]) - 3][:48]
    guide = trained_guide(tok, seqs[:32], 30, dim=32, latent_dim=16, layers=1, heads=2)
    rng = random.Random(0)
    mean_distance = []
    for k in range(4):
        pairs = [{"chosen": s, "rejected": edit(tok, s, k, rng) if k else copy.deepcopy(s)} for s in seqs]
        d = L.latent_distances(guide, pairs, pad_id=tok.pad_token_id, batch_size=16, device=CPU)
        assert d.shape == (len(seqs),) and d.dtype == torch.float32
        if k == 0:
            assert torch.equal(d, torch.zeros(len(seqs)))  # exactly 0, not merely small
        else:
            assert (d > 0).all()
        mean_distance.append(d.mean().item())
    assert mean_distance[0] < mean_distance[1] < mean_distance[2] < mean_distance[3], mean_distance


# ============================================================================================
# 2. weights
# ============================================================================================


def test_latent_weights_by_hand():
    d = torch.tensor([0.0, 1.0, 2.0, 9.0])  # mean 3
    assert L.latent_weights(d, w_max=10.0).tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 3.0])
    assert L.latent_weights(d, w_max=2.0).tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 2.0])
    assert L.latent_weights(torch.zeros(3), w_max=5.0).tolist() == [0.0, 0.0, 0.0]  # nothing to learn


def test_latent_weights_mean_one_before_clipping_and_capped_after():
    d = torch.rand(1000, generator=torch.Generator().manual_seed(0)) ** 4 * 10  # skewed: some d > 5 * mean
    unclipped = L.latent_weights(d, w_max=float("inf"))
    assert unclipped.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(unclipped, d / d.mean())
    w = L.latent_weights(d, w_max=2.5)
    assert w.max().item() == 2.5 and (w >= 0).all()
    assert torch.equal(w == 2.5, d / d.mean() >= 2.5)
    assert torch.equal(w[w < 2.5], unclipped[unclipped < 2.5])


def test_uniform_weights_are_all_one():
    assert L.pair_weights(None, "uniform", 5.0, 7).tolist() == [1.0] * 7
    d = torch.tensor([0.5, 4.0])
    assert L.pair_weights(d, "uniform", 5.0, 2).tolist() == [1.0, 1.0]
    assert torch.equal(L.pair_weights(d, "latent", 5.0, 2), L.latent_weights(d, 5.0))


def test_rank_correlation_by_hand_with_ties_and_constants():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 40.0, 30.0])
    assert C.rank_correlation(a, b) == pytest.approx(1 - 6 * 2 / (4 * 15))  # Spearman's 1 - 6 sum d^2 / (n (n^2 - 1)), no ties
    assert C.rank_correlation(a, -a) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2), Pearson 1.5 / sqrt(1.5 * 2)
    assert C.rank_correlation(torch.tensor([7.0, 7.0, 9.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.5 / math.sqrt(3.0))
    assert C.rank_correlation(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])) is None  # SPIN's weights: nothing to rank


def test_weight_diagnostics_on_a_hand_built_case():
    w, gaps, norms = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, 0.5, 0.3]), torch.tensor([1.0, 1.0, math.sqrt(2)])
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # per-pair gradients: weighted (4, 5), uniform (2, 2)
    got = C.weight_diagnostics(w, gaps, norms, w @ g, g.sum(0))
    assert got["rho_w_gap"] == pytest.approx(0.5)  # ranks (0, 1, 2) against (0, 2, 1)
    assert got["rho_w_grad"] == pytest.approx(math.sqrt(3) / 2)  # against (0.5, 0.5, 2)
    assert got["rho_grad_gap"] == pytest.approx(0.0)  # (0.5, 0.5, 2) against (0, 2, 1)
    assert got["cos_weighted_uniform"] == pytest.approx(18 / math.sqrt(41 * 8))
    spin = C.weight_diagnostics(torch.ones(3), gaps, norms, g.sum(0), g.sum(0))
    assert spin == {"rho_grad_gap": pytest.approx(0.0)}  # constant weights: no rho_w_*, no cosine
    assert set(C.weight_diagnostics(w, None, norms, w @ g, g.sum(0))) == {"rho_w_grad", "cos_weighted_uniform"}  # no reward


def test_margin_gradients_are_each_pairs_own_and_add_up_to_the_batch_gradient(self_play_setup, monkeypatch):
    """||g_i|| from one backward per pair, by the plain log-prob path; sum_i w_i g_i equals the gradient of
    sum_i w_i h_i in a single padded batch (the fast path): each pair's gradient is its own, none lost."""
    policy, _, pairs, _ = self_play_setup
    pairs, w = pairs[:4], [0.5, 2.0, 0.0, 1.0]
    norms, weighted, uniform = C.margin_gradients(policy, pairs, w, pad_id=policy.config.pad_token_id, device=CPU, dtype=torch.float32)
    params = [p for p in policy.parameters() if p.requires_grad]
    assert all(p.grad is None for p in params)  # nothing left for the DPO step that follows

    def flat_grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    monkeypatch.setattr(C, "FAST_LOGPS", False)
    for pair, norm in zip(pairs, norms):
        gold = C.sequence_logps(policy, C.collate([pair["chosen"]], policy.config.pad_token_id))[0]
        sample = C.sequence_logps(policy, C.collate([pair["rejected"]], policy.config.pad_token_id))[0]
        assert norm.item() == pytest.approx(flat_grad((gold - sample).sum()).norm().item(), rel=1e-4)
    monkeypatch.setattr(C, "FAST_LOGPS", True)
    gold, sample, _ = C.concatenated_logps(policy, C.collate_pairs(pairs, policy.config.pad_token_id))
    torch.testing.assert_close(weighted, flat_grad((torch.tensor(w) * (gold - sample)).sum()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(uniform, flat_grad((gold - sample).sum()), rtol=1e-4, atol=1e-5)


# ============================================================================================
# 3. the weighted self-play loss
# ============================================================================================


def test_weighted_dpo_loss_on_fixed_numbers():
    pc, pr = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0, -2.0]), torch.tensor([-1.5, -3.0, -1.0])
    w, beta = torch.tensor([0.5, 2.0, 0.0]), 0.1
    h = [(-1 + 1.5) - (-2 + 1.5), (-2 + 2) - (-2 + 3), (-3 + 2) - (-1 + 1)]  # [1.0, -1.0, -1.0]
    by_hand = sum(wi * math.log(1 + math.exp(-beta * hi)) for wi, hi in zip([0.5, 2.0, 0.0], h)) / 3
    losses, _, _ = C.dpo_loss(pc, pr, rc, rr, beta=beta, weights=w)
    assert losses.mean().item() == pytest.approx(by_hand, rel=1e-6)


def first_step_loss(policy, reference, pairs, cfg) -> float:
    """loss/dpo of common.train_dpo's first optimizer step (computed before the update)."""
    records = []
    pairs = C.with_reference_logps(reference, pairs, cfg, device=CPU, dtype=torch.float32)
    C.train_dpo(policy, pairs, cfg, device=CPU, dtype=torch.float32, seed=0, log=records.append)
    return records[0]["loss/dpo"]


@pytest.fixture
def self_play_setup(tiny, tmp_path):
    """A policy a little away from its reference, and self-play pairs sampled from the reference."""
    model, tok = tiny
    cfg = tiny_config(tmp_path, n_sft=12, batch_size=12, grad_accum_steps=3)  # one step over all pairs, 3 micro-batches
    data = C.load_data(cfg, tok, need_pref=False)
    pairs = L.self_play_pairs(model, data["sft"], cfg, tokenizer=tok, seed=1, device=CPU, dtype=torch.float32)
    assert len(pairs) == 12 and all(p["chosen"] != p["rejected"] for p in pairs)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, reference, pairs, cfg


def per_pair_losses(policy, reference, pairs, beta) -> list[float]:
    """-log sigmoid(beta * h) for gold (chosen) vs sample (rejected), one unpadded sequence per forward."""
    def logp(model, seq):
        batch = C.collate([seq], model.config.pad_token_id)
        with torch.no_grad():
            return C.sequence_logps(model, batch)[0].item()
    out = []
    for p in pairs:
        h = (logp(policy, p["chosen"]) - logp(reference, p["chosen"])) - (logp(policy, p["rejected"]) - logp(reference, p["rejected"]))
        out.append(math.log1p(math.exp(-beta * h)))
    return out


def test_uniform_loss_equals_common_dpo_loss_gold_chosen_sample_rejected(self_play_setup):
    policy, reference, pairs, cfg = self_play_setup
    by_hand = sum(per_pair_losses(policy, reference, pairs, cfg.beta)) / len(pairs)
    plain = first_step_loss(copy.deepcopy(policy), reference, [{k: v for k, v in p.items()} for p in pairs], cfg)
    weights = L.pair_weights(None, "uniform", cfg.w_max, len(pairs)).tolist()
    uniform = first_step_loss(copy.deepcopy(policy), reference, [{**p, "weight": w} for p, w in zip(pairs, weights)], cfg)
    assert abs(by_hand - math.log(2)) > 1e-3  # the policy really differs from its reference
    assert uniform == pytest.approx(plain, abs=1e-6) and plain == pytest.approx(by_hand, abs=1e-5)


def test_latent_weighted_loss_is_the_weighted_mean(self_play_setup):
    policy, reference, pairs, cfg = self_play_setup
    d = torch.linspace(0.0, 3.0, len(pairs)) ** 2  # fixed distances: weights from 0 up to the clip
    w = L.latent_weights(d, w_max=2.0).tolist()
    assert w[0] == 0.0 and w[-1] == 2.0 and len(set(w)) > 3
    losses = per_pair_losses(policy, reference, pairs, cfg.beta)
    by_hand = sum(wi * li for wi, li in zip(w, losses)) / len(pairs)
    got = first_step_loss(policy, reference, [{**p, "weight": wi} for p, wi in zip(pairs, w)], cfg)
    assert got == pytest.approx(by_hand, abs=1e-5)


def test_self_play_pairs_are_seeded_and_share_the_prompt(tiny, tmp_path):
    model, tok = tiny
    cfg = tiny_config(tmp_path, n_sft=8)
    data = C.load_data(cfg, tok, need_pref=False)
    a = L.self_play_pairs(model, data["sft"], cfg, tokenizer=tok, seed=5, device=CPU, dtype=torch.float32)
    b = L.self_play_pairs(model, data["sft"], cfg, tokenizer=tok, seed=5, device=CPU, dtype=torch.float32)
    c = L.self_play_pairs(model, data["sft"], cfg, tokenizer=tok, seed=6, device=CPU, dtype=torch.float32)
    assert a == b and a != c
    for pair, example in zip(a, data["sft"]):
        assert pair["chosen"] == {k: example[k] for k in ("input_ids", "labels")}  # gold response, untouched
        n = len(pair["prompt_ids"])
        assert pair["rejected"]["input_ids"][:n] == pair["prompt_ids"] == example["input_ids"][:n]
        assert pair["rejected"]["labels"][:n] == [C.IGNORE_INDEX] * n
        assert 1 <= len(pair["rejected"]["input_ids"]) - n <= cfg.max_new_tokens


def test_self_play_on_a_conversation_pairs_its_last_turn_and_leaves_earlier_turns_unlabelled(tiny, tmp_path):
    """SFT trains every assistant turn; a self-play pair is the gold last turn against a sample after the same context."""
    model, tok = tiny
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    chat = [{"role": "user", "content": "summarize : bob sold the lamp ."}, {"role": "assistant", "content": "bob sold lamp"},
            {"role": "user", "content": "summarize : alice found the car ."}, {"role": "assistant", "content": "alice found car"}]
    examples, counts = C.tokenize_sft([{"messages": chat}], tok, 64, 48)
    assert counts["earlier_turns"] == 1 and examples[0]["labels"].count(C.IGNORE_INDEX) < len(examples[0]["prompt_ids"])
    pair = L.self_play_pairs(model, examples, tiny_config(tmp_path), tokenizer=tok, seed=0, device=CPU, dtype=torch.float32)[0]
    n, gold = len(examples[0]["prompt_ids"]), tok.convert_tokens_to_ids("alice found car".split()) + [tok.eos_token_id]
    assert pair["prompt_ids"] == examples[0]["prompt_ids"]
    assert pair["chosen"] == {"input_ids": examples[0]["prompt_ids"] + gold, "labels": [C.IGNORE_INDEX] * n + gold}
    assert pair["rejected"]["labels"][:n] == [C.IGNORE_INDEX] * n


# ============================================================================================
# 4. iterations: the reference of iteration t is the policy at the end of iteration t-1
# ============================================================================================


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_is_the_previous_iterate_and_arms_start_alike(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls, real_train_dpo = [], C.train_dpo

    def recording_train_dpo(policy, examples, cfg, **kw):  # its reference is the policy at its start (test_losses)
        call = {"desc": kw["desc"], "ref": state(policy), "pairs": [(p["chosen"], p["rejected"]) for p in examples],
                "weights": [p["weight"] for p in examples]}
        real_train_dpo(policy, examples, cfg, **kw)
        call.update(end=state(policy))
        calls.append(call)

    monkeypatch.setattr(C, "train_dpo", recording_train_dpo)
    out = tmp_path / "run"
    results = L.main(tiny_config(out, iterations=3, compare=True))
    assert [c["desc"] for c in calls] == [f"{arm} dpo {t}" for arm in ("ld_align", "spin") for t in (1, 2, 3)]
    sft = AutoModelForCausalLM.from_pretrained(out / "sft").state_dict()
    for arm, folder in (("ld_align", "final"), ("spin", "final_spin")):
        chain = [c for c in calls if c["desc"].startswith(arm)]
        assert same(chain[0]["ref"], sft)  # iteration 1: the reference is the SFT model
        for previous, current in zip(chain, chain[1:]):
            assert same(current["ref"], previous["end"]), f"{current['desc']}: reference is not the previous iterate"
        for c in chain:
            assert not same(c["end"], c["ref"])  # the policy trained
        assert same(AutoModelForCausalLM.from_pretrained(out / folder).state_dict(), chain[-1]["end"])
    ld1, spin1 = calls[0], calls[3]
    assert ld1["pairs"] == spin1["pairs"]  # same SFT model, same sampling seed: same pairs
    assert spin1["weights"] == [1.0] * len(spin1["pairs"])
    assert len(set(ld1["weights"])) > 1 and max(ld1["weights"]) <= 5.0
    assert sum(ld1["weights"]) / len(ld1["weights"]) == pytest.approx(1.0, abs=1e-5) or max(ld1["weights"]) == 5.0
    assert [r["iteration"] for r in results["trajectory"]] == [0, 1, 2, 3, 1, 2, 3]


def test_drifted_reference_reverses_the_facts_and_states_the_negated_one_by_hand():
    prompt = "summarize : alice found the car in the park . bob never sold the lamp in the school . carol fixed the door in the office . summary :"
    clean = "alice found car and carol fixed door"
    assert C.drifted_reference(prompt, clean, random.Random(0), error_rate=0.0) == "carol fixed door and alice found car"
    wrong = C.drifted_reference(prompt, clean, random.Random(0), error_rate=1.0)
    assert sorted(wrong.split(" and ")) == ["alice found car", "bob sold lamp", "carol fixed door"]  # inserted among the facts
    assert wrong.replace("bob sold lamp and ", "").replace(" and bob sold lamp", "") == "carol fixed door and alice found car"
    # order is harmless to the gold reward and the instruction score; the negated fact stated costs 1 / n_facts
    assert C.gold_reward(prompt, C.drifted_reference(prompt, clean, random.Random(0), 0.0)) == C.gold_reward(prompt, clean) == 1.5
    assert C.gold_reward(prompt, wrong) == pytest.approx((2 - 1) / 2 + 0.5)
    listed = prompt.replace(" summary :", " summary as a list :")
    assert C.instruction_score(listed, C.drifted_reference(listed, "alice found car ; carol fixed door", random.Random(0), 1.0)) == 1.0
    no_negation = prompt.replace("bob never sold the lamp in the school . ", "")
    assert C.drifted_reference(no_negation, clean, random.Random(0), 1.0) == "carol fixed door and alice found car"


def test_task_drift_trains_the_starting_model_on_drifted_references_and_self_plays_on_the_clean_ones(tmp_path, monkeypatch):
    seen, real_train_sft, real_train_dpo = {}, C.train_sft, C.train_dpo

    def recording_train_sft(policy, examples, cfg, **kw):
        seen["sft"] = examples
        real_train_sft(policy, examples, cfg, **kw)

    def recording_train_dpo(policy, examples, cfg, **kw):
        seen.setdefault("gold", [p["chosen"] for p in examples])
        real_train_dpo(policy, examples, cfg, **kw)

    monkeypatch.setattr(C, "train_sft", recording_train_sft)
    monkeypatch.setattr(C, "train_dpo", recording_train_dpo)
    cfg = tiny_config(tmp_path / "run", iterations=1, task="drift", n_sft=48)
    L.main(cfg)
    tok = C.load_tokenizer("tiny")
    clean = C.load_data(cfg, tok, need_pref=False)["sft"]
    rng = random.Random(cfg.seed)
    assert [tok.decode(e["input_ids"][len(e["prompt_ids"]):], skip_special_tokens=True) for e in seen["sft"]] == [
        C.drifted_reference(e["prompt"], e["reference"], rng) for e in clean]
    assert any(e["input_ids"] != d["input_ids"] for e, d in zip(clean, seen["sft"]))
    golds = {tuple(e["input_ids"]) for e in clean}
    assert seen["gold"] and all(tuple(g["input_ids"]) in golds for g in seen["gold"])  # self-play's gold: the clean references


def test_same_seed_gives_identical_runs(tmp_path):
    a = L.main(tiny_config(tmp_path / "a", iterations=2, seed=4))
    b = L.main(tiny_config(tmp_path / "b", iterations=2, seed=4))
    assert a["trajectory"] == b["trajectory"] and a["examples"] == b["examples"]
    from transformers import AutoModelForCausalLM
    assert same(AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict(),
                AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict())


def test_resume_inside_the_latent_arm_restores_policy_guide_and_optimizer(tmp_path, monkeypatch):
    """Stopped during iteration 3's guide training (the guide and its AdamW have two iterations of
    state by then), resumed: the same final weights, guide and trajectory as an uninterrupted run."""
    from safetensors.torch import load_file

    whole = L.main(tiny_config(tmp_path / "whole", iterations=3))
    real_train_guide, n_calls = L.train_guide, []

    def stop_in_iteration_three(*args, **kwargs):
        n_calls.append(1)
        if len(n_calls) == 3:
            raise KeyboardInterrupt
        return real_train_guide(*args, **kwargs)

    monkeypatch.setattr(L, "train_guide", stop_in_iteration_three)
    with pytest.raises(KeyboardInterrupt):
        L.main(tiny_config(tmp_path / "stopped", iterations=3))
    monkeypatch.setattr(L, "train_guide", real_train_guide)
    resumed = L.main(tiny_config(tmp_path / "stopped", iterations=3, resume=True))
    assert resumed["trajectory"] == whole["trajectory"] and resumed["examples"] == whole["examples"]
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("whole", "stopped"))
    assert same(a, b)
    # iteration 3's guide_loss and distances (in the trajectory) come from the restored guide and optimizer
    assert resumed["trajectory"][3]["iteration"] == 3 and "guide_loss" in resumed["trajectory"][3]
    assert (tmp_path / "stopped" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()


# ============================================================================================
# 5. settings and data: SFT data only, checked before anything is written
# ============================================================================================


def test_load_data_without_preference_data(tiny):
    _, tok = tiny
    cfg = tiny_config("unused", n_sft=20, n_pref=10, eval_size=5)
    with_pref, without = C.load_data(cfg, tok), C.load_data(cfg, tok, need_pref=False)
    assert without["pref"] == [] and len(with_pref["pref"]) == 10
    assert without["sft"] == with_pref["sft"] and without["test"] == with_pref["test"]  # the same rows


@pytest.mark.parametrize("overrides, message", [
    (dict(pref_data="pref.jsonl"), "--pref_data is not used"),
    (dict(weighting="cosine"), "--weighting must be one of latent, uniform"),
    (dict(weighting="uniform", compare=True), "--compare"),
    (dict(w_max=0.0), "--w_max"),
    (dict(guide_dim=30, guide_heads=4), "multiple of --guide_heads"),
    (dict(iterations=0), "--iterations"),
    (dict(diagnostic_pairs=-1), "--diagnostic_pairs"),
    (dict(task="drift", sft_data="sft.jsonl"), "--task drift is a variant of the built-in task"),
    (dict(task="shuffle"), "--task must be one of default, drift"),
    (dict(fsdp=True, guide="scratch"), "add --diagnostic_pairs 0"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, overrides, message):
    out = tmp_path / "never_created"
    with pytest.raises(C.ConfigError, match=message):
        L.main(tiny_config(out, **overrides))
    assert not out.exists()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_sft_row_is_named_before_anything_is_written(tmp_path, tiny_dir):
    rows = C.builtin_task(seed=0, n_sft=12, n_pref=0, n_test=1)["sft"]
    rows[2] = {"prompt": rows[2]["prompt"], "response": "x"}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(C.DataError, match=r"bad.jsonl: row 3: missing field 'completion'"):
        L.main(tiny_config(out, model=str(tiny_dir), sft_data=str(bad)))
    assert not out.exists()


def test_smoke_ld_align_real_data_sft_file_only(tmp_path, tiny_dir):
    """--model DIR (taken as already SFT'd) and a prompt/completion file, no --pref_data, no judge."""
    sft = write_jsonl(tmp_path / "sft.jsonl", C.builtin_task(seed=2, n_sft=20, n_pref=0, n_test=1)["sft"])
    out = tmp_path / "run"
    results = L.main(tiny_config(out, model=str(tiny_dir), sft_data=str(sft), iterations=1))
    assert not (out / "sft").exists()  # no SFT without --sft_first
    assert results["reward_metric"].startswith("n/a") and set(results["sft"]) == {"rougeL", "length"}
    assert set(results["ld_align"]) == {"rougeL", "length"}
    assert results["config"]["n_pref"] == 2000 and results["config"]["pref_data"] == ""
    start = C.load_model_and_tokenizer(str(tiny_dir))[0].state_dict()
    final, _ = C.load_model_and_tokenizer(str(out / "final"))
    assert not same(start, final.state_dict())


def test_smoke_ld_align_chat_data_gpt2_pad_is_eos_with_sft_first(real_like):
    """messages rows through a chat template, a byte-level BPE tokenizer whose pad is its EOS, GPT-2 modules."""
    out = real_like / "ld_align"
    results = L.main(tiny_config(out, model=str(real_like / "model"), sft_data=str(real_like / "sft.jsonl"), eval_size=8,
                                 batch_size=8, max_length=128, max_prompt_length=96, iterations=1, sft_first=True, sft_lr=1e-3))
    assert (out / "sft").is_dir() and results["trajectory"][1]["identical"] < 1.0
    model, tok = C.load_model_and_tokenizer(str(out / "final"))
    assert tok.pad_token_id == tok.eos_token_id and tok.chat_template
    assert not same(model.state_dict(), C.load_model_and_tokenizer(str(out / "sft"))[0].state_dict())


# ============================================================================================
# 6. smoke run (subprocess, built-in task, both arms)
# ============================================================================================


SMOKE_ARGS = ["--n_sft", "64", "--eval_size", "8", "--sft_epochs", "1", "--batch_size", "16", "--max_new_tokens", "12",
              "--iterations", "2", "--guide_dim", "32", "--latent_dim", "16", "--compare"]


def test_smoke_ld_align_with_the_scratch_guide(script_run):
    proc, out = script_run("ld_align.py", *SMOKE_ARGS[:-1], "--guide", "scratch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["trajectory"][1:]
    assert results["config"]["guide"] == "scratch" and len(rows) == 2
    assert all(r["guide_loss"] > 0 and math.isfinite(r["guide_loss"]) for r in rows)


def test_smoke_ld_align_end_to_end_with_compare(script_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, out = script_run("ld_align.py", *SMOKE_ARGS)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "reward_metric", "data", "sft", "ld_align", "spin", "trajectory", "examples"}
    for name in ("ld_align", "spin"):
        assert set(results[name]) == {"instruction", "instruction_sampled", "rougeL", "length", "reward", "reward_sampled", "win_rate"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in results[name].values())
    trajectory = results["trajectory"]
    assert [(r["arm"], r["iteration"]) for r in trajectory] == [("sft", 0), ("ld_align", 1), ("ld_align", 2), ("spin", 1), ("spin", 2)]
    assert {k: trajectory[2][k] for k in results["ld_align"]} == results["ld_align"]  # final = last iteration
    assert {"d_mean", "d_min", "d_max", "clipped", "guide_loss", "identical"} <= set(trajectory[1])
    assert "d_mean" not in trajectory[3] and "identical" in trajectory[3]
    for row in trajectory[1:3]:  # the weights' diagnostics (on the built-in task: against the gold reward's gaps)
        assert {"rho_w_gap", "rho_w_grad", "rho_grad_gap", "cos_weighted_uniform"} <= set(row)
        assert all(-1 <= row[k] <= 1 for k in ("rho_w_gap", "rho_w_grad", "rho_grad_gap", "cos_weighted_uniform"))
    assert "rho_grad_gap" in trajectory[3] and "rho_w_gap" not in trajectory[3] and "cos_weighted_uniform" not in trajectory[3]
    assert results["config"]["guide"] == "policy"  # the default: its decoder, the SFT model, starts below the uniform guess
    assert all(0 < r["guide_loss"] < math.log(len(C.load_tokenizer("tiny"))) for r in trajectory[1:3])
    assert all(set(e) == {"prompt", "reference", "sft", "ld_align", "spin"} for e in results["examples"])
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"sft", "eval sft", "ld_align guide 1", "ld_align dpo 2", "spin dpo 2", "iteration ld_align", "iteration spin"} <= stages
    assert "spin guide 1" not in stages  # SPIN needs no guiding model
    assert "ld_align 2" in proc.stdout and "spin 2" in proc.stdout  # the trajectory table

    sft = AutoModelForCausalLM.from_pretrained(out / "sft").state_dict()
    for folder in ("final", "final_spin"):
        model = AutoModelForCausalLM.from_pretrained(out / folder)
        tok = AutoTokenizer.from_pretrained(out / folder)
        assert tok.eos_token_id != tok.pad_token_id
        assert not same(model.state_dict(), sft)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_ends_as_an_uninterrupted_run(script_run, kill_and_resume):
    """Iteration-level checkpoints: the policy, the guide and its optimizer, and the arm in progress."""
    proc, whole = script_run("ld_align.py", *SMOKE_ARGS)
    assert proc.returncode == 0
    kill_and_resume("ld_align.py", SMOKE_ARGS, whole)


def test_smoke_ld_align_headroom_variant_starts_from_the_warm_started_model(script_run):
    """--sft_epochs 0 (the headroom variant): self-play starts from `tiny` as loaded, the warm-started
    model, whose weights sft/ holds unchanged."""
    proc, out = script_run("ld_align.py", *SMOKE_ARGS[:-1], "--sft_epochs", "0", "--iterations", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warm, _ = C.load_model_and_tokenizer("tiny", seed=0)
    saved, _ = C.load_model_and_tokenizer(str(out / "sft"))
    assert same(saved.state_dict(), warm.state_dict())
    assert json.loads((out / "results.json").read_text())["trajectory"][1]["identical"] < 0.5  # room to learn
