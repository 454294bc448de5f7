"""Log-probs, losses (SFT accumulation, DPO, Bradley-Terry, PPO), GAE, whitening and evaluation helpers.

Expected values are computed by hand or by brute-force Python loops, never with the implementation's
own formula.
"""
import copy
import dataclasses
import math
import random
import statistics

import pytest
import torch

import common
from common import IGNORE_INDEX


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def word_ids(tokenizer, text):
    """Token ids of a whitespace-separated text, via the vocabulary (independent of encode_*)."""
    ids = tokenizer.convert_tokens_to_ids(text.split())
    assert tokenizer.unk_token_id not in ids, text
    return ids


def brute_token_logps(logits, labels):
    """{(row, t): log p(labels[row, t])} from logits[row, t-1], with a pure-Python log-softmax."""
    out = {}
    rows, width = labels.shape
    for b in range(rows):
        for t in range(1, width):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            row = [float(v) for v in logits[b, t - 1].tolist()]
            m = max(row)
            log_z = m + math.log(sum(math.exp(v - m) for v in row))
            out[(b, t)] = row[y] - log_z
    return out


def brute_sequence_logps(logits, labels):
    per_token = brute_token_logps(logits, labels)
    sums = [0.0] * labels.shape[0]
    counts = [0] * labels.shape[0]
    for (b, _), v in per_token.items():
        sums[b] += v
        counts[b] += 1
    return sums, counts


# Three (prompt, response) pairs of different lengths, all in the tiny vocabulary.
PAIRS = [
    ("summarize : alice found the car in the park . :", "alice found car"),
    ("summarize : bob sold the lamp in the market . the weather was calm . :", "bob sold lamp and alice found car"),
    ("summarize : carol fixed the door in the school . :", "carol fixed door ; it was"),
]


def seqs_with_labels(tokenizer, ignore_inside=True):
    """Token id lists and label lists; the last pair gets an IGNORE_INDEX label inside its response."""
    seqs = []
    for i, (prompt, response) in enumerate(PAIRS):
        p, r = word_ids(tokenizer, prompt), word_ids(tokenizer, response) + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(p) + list(r)
        if ignore_inside and i == 2:
            labels[len(p) + 2] = IGNORE_INDEX  # a masked token in the middle of the response
        seqs.append({"input_ids": p + r, "labels": labels, "n_expected": sum(l != IGNORE_INDEX for l in labels)})
    return seqs


def right_batch(seqs, pad_id):
    width = max(len(s["input_ids"]) for s in seqs)
    ids = [s["input_ids"] + [pad_id] * (width - len(s["input_ids"])) for s in seqs]
    labels = [s["labels"] + [IGNORE_INDEX] * (width - len(s["labels"])) for s in seqs]
    mask = [[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in seqs]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def left_batch(seqs, pad_id):
    width = max(len(s["input_ids"]) for s in seqs)
    ids = [[pad_id] * (width - len(s["input_ids"])) + s["input_ids"] for s in seqs]
    labels = [[IGNORE_INDEX] * (width - len(s["labels"])) + s["labels"] for s in seqs]
    mask = [[0] * (width - len(s["input_ids"])) + [1] * len(s["input_ids"]) for s in seqs]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


# ------------------------------------------------------------------------------------------------
# 1. log-probs
# ------------------------------------------------------------------------------------------------


def test_position_ids_from_mask_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert common.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_logps_match_brute_force_loop(tiny, side):
    model, tokenizer = tiny
    seqs = seqs_with_labels(tokenizer)
    batch = (right_batch if side == "right" else left_batch)(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = common.forward_logits(model, batch)
        sums, counts = common.sequence_logps(model, batch)
        per_token, mask = common.token_logps(model, batch)
    assert torch.isfinite(logits).all()

    exp_sums, exp_counts = brute_sequence_logps(logits, batch["labels"])
    assert counts.tolist() == exp_counts == [s["n_expected"] for s in seqs]
    assert sums.dtype == torch.float32
    for got, want in zip(sums.tolist(), exp_sums):
        assert got == pytest.approx(want, abs=1e-5)
    assert all(v < 0 for v in exp_sums)

    brute = brute_token_logps(logits, batch["labels"])
    assert per_token.shape == (len(seqs), batch["labels"].shape[1] - 1)
    for b in range(len(seqs)):
        for t in range(1, batch["labels"].shape[1]):
            if (b, t) in brute:
                assert bool(mask[b, t - 1])
                assert float(per_token[b, t - 1]) == pytest.approx(brute[(b, t)], abs=1e-5)
            else:
                assert not bool(mask[b, t - 1])
                assert float(per_token[b, t - 1]) == 0.0


def full_logits_token_logps(model, batch, temperature=1.0):
    """The computation token_logps replaced: every position's logits in float32, log_softmax, gather."""
    logits = common.forward_logits(model, batch)[:, :-1].float() / temperature
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits.log_softmax(-1).gather(2, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, 0.0)


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("path", ["keep logits", "recompute, 2-row chunks", "model's own logits"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_only_logps_equal_the_full_logits_computation(tiny, monkeypatch, side, path, temperature):
    """Values and gradients (of a weighted sum, so every token's gradient counts differently) of
    token_logps equal those of the old full-logits computation, on either padding side, whether the
    backward keeps the softmax or recomputes it in chunks, and through the fallback for output layers
    that are not plain."""
    model, tokenizer = tiny
    batch = (right_batch if side == "right" else left_batch)(seqs_with_labels(tokenizer), tokenizer.pad_token_id)
    weights = torch.rand(batch["labels"].shape[0], batch["labels"].shape[1] - 1, generator=torch.Generator().manual_seed(0))
    expected = full_logits_token_logps(model, batch, temperature)
    expected_grads = grads_of(model, (expected * weights).sum())
    if path.startswith("recompute"):
        monkeypatch.setattr(common, "KEEP_LOGITS_BYTES", 0)
        monkeypatch.setattr(common, "CHUNK_BYTES", 2 * 4 * model.config.vocab_size)  # two rows of logits at a time
    if path == "model's own logits":
        monkeypatch.setattr(common, "output_head_is_plain", lambda model: False)
    got, mask = common.token_logps(model, batch, temperature)
    assert got.dtype == torch.float32 and int(mask.sum()) == sum(s["n_expected"] for s in seqs_with_labels(tokenizer))
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    got_grads = grads_of(model, (got * weights).sum())
    assert got_grads.keys() == expected_grads.keys()
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_linear_log_probs_gradcheck_with_bias_and_chunks(monkeypatch):
    """The hand-written backward against finite differences (float64), bias and temperature included,
    on both backward paths."""
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    for keep, chunk in ((1 << 30, 1 << 28), (0, 2 * 4 * 7)):
        monkeypatch.setattr(common, "KEEP_LOGITS_BYTES", keep)
        monkeypatch.setattr(common, "CHUNK_BYTES", chunk)
        assert torch.autograd.gradcheck(lambda h, w, b: common.LinearLogProbs.apply(h, w, b, targets, 0.8), (hidden, weight, bias))
    want = ((hidden @ weight.t() + bias) / 0.8).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(common.LinearLogProbs.apply(hidden, weight, bias, targets, 0.8).double(), want)


def test_token_logps_under_bf16_autocast_are_float32_and_close(tiny):
    """bf16 matmuls, float32 softmax, as the model's own bf16 output layer then log_softmax would give."""
    model, tokenizer = tiny
    batch = right_batch(seqs_with_labels(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = common.token_logps(model, batch)
        expected = full_logits_token_logps(model, batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)


def test_padding_does_not_change_sequence_logps(tiny):
    model, tokenizer = tiny
    seqs = seqs_with_labels(tokenizer)
    alone = []
    with torch.no_grad():
        for s in seqs:
            single = right_batch([s], tokenizer.pad_token_id)
            logits = model(input_ids=single["input_ids"]).logits  # no padding, default positions
            alone.append(brute_sequence_logps(logits, single["labels"])[0][0])
        for make in (right_batch, left_batch):
            batch = make(seqs, tokenizer.pad_token_id)
            assert (batch["attention_mask"] == 0).any()
            sums, _ = common.sequence_logps(model, batch)
            for got, want in zip(sums.tolist(), alone):
                assert abs(got - want) < 1e-5, make.__name__


# ------------------------------------------------------------------------------------------------
# 4. DPO
# ------------------------------------------------------------------------------------------------


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps_c, logps_r = t(-1.0, -7.5, -20.0), t(-3.0, -2.0, -0.5)
    for beta in (0.1, 0.5):
        losses, rc, rr = common.dpo_loss(logps_c, logps_r, logps_c.clone(), logps_r.clone(), beta=beta)
        assert losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-6)
        assert rc.tolist() == [0.0] * 3 and rr.tolist() == [0.0] * 3


def test_dpo_loss_by_hand():
    # policy chosen -1.0, rejected -3.0; reference chosen -2.0, rejected -2.5; beta 0.1
    # chosen log-ratio = 1.0, rejected log-ratio = -0.5, h = 1.5, beta*h = 0.15
    losses, rc, rr = common.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1)
    x = 0.15
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-x)), abs=1e-6)
    assert rc.item() == pytest.approx(0.1, abs=1e-6)
    assert rr.item() == pytest.approx(-0.05, abs=1e-6)
    # a second pair where the policy prefers the rejected answer: h = -2 - 2 = -4, beta*h = -0.4 (beta 0.1)
    losses, _, _ = common.dpo_loss(t(-1.0, -5.0), t(-3.0, -1.0), t(-2.0, -3.0), t(-2.5, -3.0), beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.15)), math.log(1 + math.exp(0.4))], abs=1e-6)


def test_dpo_label_smoothing_by_hand():
    eps, x = 0.2, 0.15  # beta*h as in test_dpo_loss_by_hand
    losses, _, _ = common.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1, label_smoothing=eps)
    expected = (1 - eps) * math.log(1 + math.exp(-x)) + eps * math.log(1 + math.exp(x))
    assert losses.item() == pytest.approx(expected, abs=1e-6)


def test_ipo_loss_by_hand():
    # h = 1.5, 1/(2 beta) = 5 for beta 0.1: (1.5 - 5)^2 = 12.25; beta 0.5: (1.5 - 1)^2 = 0.25
    losses, _, _ = common.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx(12.25, abs=1e-5)
    losses, _, _ = common.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.5, loss_type="ipo")
    assert losses.item() == pytest.approx(0.25, abs=1e-6)


def test_dpo_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="hinge"):
        common.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), loss_type="hinge")


def test_dpo_weights():
    args = (t(-1.0, -5.0), t(-3.0, -1.0), t(-2.0, -3.0), t(-2.5, -3.0))
    plain, rc, rr = common.dpo_loss(*args, beta=0.1)
    ones, rc1, rr1 = common.dpo_loss(*args, beta=0.1, weights=t(1.0, 1.0))
    assert torch.equal(plain, ones) and torch.equal(rc, rc1) and torch.equal(rr, rr1)
    weighted, rcw, rrw = common.dpo_loss(*args, beta=0.1, weights=t(2.0, 0.5))
    assert weighted.tolist() == pytest.approx([2.0 * math.log(1 + math.exp(-0.15)), 0.5 * math.log(1 + math.exp(0.4))], abs=1e-6)
    assert torch.equal(rc, rcw) and torch.equal(rr, rrw)  # the weights scale the loss, not the rewards


def _pair(tokenizer, prompt, chosen, rejected):
    p = word_ids(tokenizer, prompt)
    seq = lambda r: {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r}
    return {"chosen": seq(word_ids(tokenizer, chosen) + [tokenizer.eos_token_id]),
            "rejected": seq(word_ids(tokenizer, rejected) + [tokenizer.eos_token_id])}


def test_dpo_sgd_step_raises_chosen_and_lowers_rejected_logratio(tiny):
    policy, tokenizer = tiny
    reference = copy.deepcopy(policy).eval()
    pairs = [_pair(tokenizer, "summarize : alice found the car in the park . :",
                   "alice found car", "victor washed the piano ; nobody saw it"),
             _pair(tokenizer, "summarize : bob sold the lamp in the market . :",
                   "bob sold lamp and alice found car", "the weather was calm")]
    batch = common.collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        ref_c, ref_r = common.concatenated_logps(reference, batch)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    policy.train()
    pol_c, pol_r = common.concatenated_logps(policy, batch)
    losses, _, _ = common.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-5)  # policy == reference
    losses.mean().backward()
    optimizer.step()
    with torch.no_grad():
        new_c, new_r = common.concatenated_logps(policy, batch)
        new_losses, rewards_c, rewards_r = common.dpo_loss(new_c, new_r, ref_c, ref_r, beta=0.1)
    assert ((new_c - ref_c) > 0).all(), (new_c - ref_c)
    assert ((new_r - ref_r) < 0).all(), (new_r - ref_r)
    assert (rewards_c > rewards_r).all()
    assert (new_losses < math.log(2)).all()


def test_concatenated_logps_splits_chosen_and_rejected(tiny):
    model, tokenizer = tiny
    pairs = [_pair(tokenizer, "summarize : alice found the car in the park . :", "alice found car", "the weather"),
             _pair(tokenizer, "summarize : bob sold the lamp in the market . :", "bob sold lamp", "nothing else happened .")]
    with torch.no_grad():
        chosen, rejected = common.concatenated_logps(model, common.collate_pairs(pairs, tokenizer.pad_token_id))
        for i, p in enumerate(pairs):
            for key, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
                single = right_batch([p[key]], tokenizer.pad_token_id)
                want = brute_sequence_logps(model(input_ids=single["input_ids"]).logits, single["labels"])[0][0]
                assert abs(float(got) - want) < 1e-5


# ------------------------------------------------------------------------------------------------
# 5. Bradley-Terry
# ------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    losses = common.bradley_terry_loss(t(2.0, 0.0, 3.0), t(1.0, 0.5, 3.0))
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5)), math.log(2)], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# 6. GAE, 7. whitening
# ------------------------------------------------------------------------------------------------


def brute_gae(rewards, values, lengths, gamma, lam):
    advantages = []
    for r, v, n in zip(rewards, values, lengths):
        adv = [0.0] * n
        running = 0.0
        for step in range(n - 1, -1, -1):
            next_v = v[step + 1] if step + 1 < n else 0.0
            delta = r[step] + gamma * next_v - v[step]
            running = delta + gamma * lam * running
            adv[step] = running
        advantages.append(adv)
    return advantages


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (0.99, 0.95), (1.0, 0.95)])
def test_gae_matches_brute_force_loop(gamma, lam):
    g = torch.Generator().manual_seed(1)
    lengths, width = [4, 2, 6, 1], 6
    rewards = torch.randn(4, width, generator=g)
    values = torch.randn(4, width, generator=g)  # values and rewards on padding are garbage on purpose
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    advantages, returns = common.gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = brute_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    for b, n in enumerate(lengths):
        for step in range(n):
            assert float(advantages[b, step]) == pytest.approx(expected[b][step], abs=1e-5)
            assert float(returns[b, step]) == pytest.approx(expected[b][step] + float(values[b, step]), abs=1e-5)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = t(0.5, -1.0, 2.0, 9.0).unsqueeze(0)
    values = t(0.25, 1.0, -0.5, 7.0).unsqueeze(0)
    mask = t(1, 1, 1, 0).unsqueeze(0)
    advantages, returns = common.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go over the 3 real tokens: 1.5, 1.0, 2.0
    assert advantages[0, :3].tolist() == pytest.approx([1.5 - 0.25, 1.0 - 1.0, 2.0 + 0.5], abs=1e-6)
    assert returns[0, :3].tolist() == pytest.approx([1.5, 1.0, 2.0], abs=1e-6)


def test_masked_whiten():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=g) * 4 + 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    out = common.masked_whiten(x, mask)
    picked = out[mask.bool()].tolist()
    assert statistics.fmean(picked) == pytest.approx(0.0, abs=1e-5)
    assert statistics.stdev(picked) == pytest.approx(1.0, abs=1e-4)  # unbiased (n - 1)
    assert torch.equal(out[~mask.bool()], x[~mask.bool()])


def test_masked_whiten_by_hand():
    x = t(1.0, 2.0, 3.0, 100.0).unsqueeze(0)
    mask = t(1, 1, 1, 0).unsqueeze(0)
    # mean 2, unbiased variance ((1)^2 + 0 + 1^2) / 2 = 1
    assert common.masked_whiten(x, mask)[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 100.0], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# 8. PPO losses
# ------------------------------------------------------------------------------------------------


def ppo_case(ratios, advantages):
    old = torch.zeros(1, len(ratios))
    logps = torch.log(t(*ratios)).unsqueeze(0).requires_grad_(True)
    return logps, old, t(*advantages).unsqueeze(0), torch.ones(1, len(ratios))


def test_ppo_policy_loss_unclipped_by_hand():
    logps, old, adv, mask = ppo_case([1.1, 0.9], [1.0, -2.0])
    loss, clipfrac = common.ppo_policy_loss(logps, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.1 + 1.8) / 2, abs=1e-6)
    assert clipfrac.item() == 0.0
    loss.backward()
    # d/dlogp of -A * exp(logp) / 2 = -A * ratio / 2
    assert logps.grad[0].tolist() == pytest.approx([-1.1 / 2, 2.0 * 0.9 / 2], abs=1e-6)


def test_ppo_policy_loss_clipped_by_hand():
    # A>0 with ratio 1.5 -> clipped at 1.2: -1.2; A<0 with ratio 0.5 -> clipped at 0.8: +0.8
    logps, old, adv, mask = ppo_case([1.5, 0.5], [1.0, -1.0])
    loss, clipfrac = common.ppo_policy_loss(logps, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert clipfrac.item() == 1.0
    loss.backward()
    assert logps.grad.abs().max().item() == 0.0  # clipped tokens pass no gradient


def test_ppo_policy_loss_pessimistic_side_not_clipped_by_hand():
    # A>0 with ratio 0.5: min objective keeps the unclipped -0.5; A<0 with ratio 1.5: keeps +1.5
    logps, old, adv, mask = ppo_case([0.5, 1.5], [1.0, -1.0])
    loss, clipfrac = common.ppo_policy_loss(logps, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-0.5 + 1.5) / 2, abs=1e-6)
    assert clipfrac.item() == 0.0


def test_ppo_policy_loss_masked_2x2_by_hand():
    old = torch.log(t(0.5, 0.25, 0.5, 0.5)).view(2, 2)
    logps = torch.log(t(0.5 * 1.1, 0.25 * 1.5, 0.5 * 0.7, 0.5 * 42.0)).view(2, 2)  # ratios 1.1, 1.5, 0.7, (pad)
    adv = t(2.0, 1.0, 3.0, 5.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    loss, clipfrac = common.ppo_policy_loss(logps, old, adv, mask, clip=0.2)
    # token 1: -2*1.1 = -2.2 (unclipped); token 2: max(-1.5, -1.2) = -1.2 (clipped);
    # token 3: A=3, ratio 0.7 -> max(-2.1, -2.4) = -2.1 (unclipped); token 4 is padding
    assert loss.item() == pytest.approx((-2.2 - 1.2 - 2.1) / 3, abs=1e-5)
    assert clipfrac.item() == pytest.approx(1 / 3, abs=1e-6)


def test_ppo_value_loss_by_hand():
    values = t(1.0, 1.0, 1.0, 50.0).view(2, 2)
    old = t(0.5, 0.9, 0.5, 0.0).view(2, 2)
    returns = t(2.0, 0.0, 0.0, 0.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    # token 1: clipped V = 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69 (clipping active)
    # token 2: |V - V_old| = 0.1 < 0.2, no clipping: 1.0
    # token 3: clipped V = 0.7 -> max(1, 0.49) = 1.0 (unclipped wins); token 4 padding
    loss = common.ppo_value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 1.0) / 3, abs=1e-6)
    # no clipping at all when V == V_old: plain 0.5 * MSE
    loss = common.ppo_value_loss(old, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * ((0.5 - 2) ** 2 + 0.9 ** 2 + 0.5 ** 2) / 3, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# 9. KL estimate and per-token PPO rewards
# ------------------------------------------------------------------------------------------------


def test_kl_estimate_and_ppo_rewards_by_hand():
    logps = t(-1.0, -2.0, -0.5, -9.0, -1.5, -3.0, -3.0, -3.0).view(2, 4)
    ref = t(-1.5, -1.0, -0.5, -1.0, -1.0, -7.0, -7.0, -7.0).view(2, 4)
    mask = t(1, 1, 1, 0, 1, 0, 0, 0).view(2, 4)
    scores = t(2.0, -1.0)
    kl = common.kl_estimate(logps, ref)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0, -8.0], abs=1e-6)
    assert kl[1].tolist() == pytest.approx([-0.5, 4.0, 4.0, 4.0], abs=1e-6)
    coef = 0.1
    rewards = common.ppo_rewards(scores, logps, ref, mask, coef)
    expected = [
        [-coef * 0.5, -coef * -1.0, -coef * 0.0 + 2.0, 0.0],  # score on the 3rd (last real) token only
        [-coef * -0.5 + -1.0, 0.0, 0.0, 0.0],  # one-token response: penalty and score on it
    ]
    for got, want in zip(rewards.tolist(), expected):
        assert got == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# 10. gradient accumulation
# ------------------------------------------------------------------------------------------------


def _cfg(**overrides):
    base = dict(batch_size=8, grad_accum_steps=1, warmup_steps=1, max_grad_norm=1.0, sft_lr=1e-2, sft_epochs=1,
                pref_lr=1e-2, pref_epochs=1, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    base.update(overrides)
    return dataclasses.replace(common.TrainConfig(), **base)


def _sft_examples(tokenizer, n=16):
    rows = common.builtin_task(seed=3, n_sft=n, n_pref=1, n_test=1)["sft"]
    examples, counts = common.tokenize_sft(rows, tokenizer, 128, 100)
    assert (counts["prompt_cut"], counts["response_cut"], counts["skipped"]) == (0, 0, 0)
    lengths = {sum(l != IGNORE_INDEX for l in e["labels"]) for e in examples}
    assert len(lengths) > 2  # responses of different lengths: token-count normalisation matters
    return examples


def _pref_examples(tokenizer, n=13, weighted=False):
    """13 pairs in batches of 8: the second step's 5 pairs split into micro-batches of 2, 2 and 1, so a
    mean of micro-batch means would weight the pairs unequally."""
    rows = common.builtin_task(seed=4, n_sft=1, n_pref=n, n_test=1)["pref"]
    examples, counts = common.tokenize_pref(rows, tokenizer, 128, 100)
    assert (counts["prompt_cut"], counts["response_cut"], counts["skipped"]) == (0, 0, 0)
    if weighted:
        for i, e in enumerate(examples):
            e["weight"] = 0.25 + 0.5 * (i % 4)
    return examples


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _plain_sgd(monkeypatch):
    """Compare updates with plain SGD. AdamW's first step is lr * g / |g| elementwise, which turns
    float32 summation-order noise in near-zero gradient entries into lr-sized weight differences
    (seen: 1.4e-6 on another machine's torch); with SGD the update is proportional to the gradient."""
    monkeypatch.setattr(common.torch.optim, "AdamW", lambda params, lr, weight_decay=0.0, **_: torch.optim.SGD(params, lr=lr))


def _capture_grads(monkeypatch):
    """Record the accumulated gradient handed to each optimizer step (wrapping common.optimizer_step)."""
    captured = []
    original = common.optimizer_step

    def spy(params, optimizer, max_grad_norm, where="step"):
        captured.append(torch.cat([p.grad.detach().flatten() for p in params]).clone())
        return original(params, optimizer, max_grad_norm, where)

    monkeypatch.setattr(common, "optimizer_step", spy)
    return captured


CPU = torch.device("cpu")

# Why the learning rates are small here: AdamW divides each gradient entry by sqrt(v) + 1e-8, so
# float32 rounding noise (~1e-7 relative, from summing in a different order) in an entry whose gradient
# is ~1e-8 moves that entry's update by up to lr * noise / eps. The step size keeps that below the
# 1e-6 weight tolerance, while a wrong normalisation still moves weights by ~lr (checked below). The
# accumulated gradients themselves are also compared directly.


def test_sft_grad_accumulation_gives_same_weights(tiny_dir, monkeypatch):
    _plain_sgd(monkeypatch)
    results, logs, grads = [], [], []
    for accum in (1, 4):
        model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
        examples = _sft_examples(tokenizer)
        start = _params(model)
        log, captured = [], _capture_grads(monkeypatch)
        common.train_sft(model, examples, _cfg(grad_accum_steps=accum), device=CPU, dtype=torch.float32, seed=0,
                         log=log.append)
        results.append(_params(model))
        logs.append(log)
        grads.append(captured)
        assert len(log) == len(captured) == 2  # two optimizer steps
    assert _max_diff(results[0], start) > 1e-5  # training moved the weights
    for g1, g4 in zip(*grads):
        assert (g1 - g4).abs().max().item() < 1e-5 * g1.abs().max().item()  # float32 summation order only
        assert ((g1 - g4).norm() / g1.norm()).item() < 1e-5
    assert _max_diff(results[0], results[1]) < 1e-6
    for a, b in zip(*logs):
        assert a["loss/sft"] == pytest.approx(b["loss/sft"], abs=1e-5)

    # negative control: the same loop normalising each micro-batch by its own token count and averaging
    # the micro-batch means ends somewhere else
    model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    examples = _sft_examples(tokenizer)

    def mean_of_means_step(micro_batches, whole_batch, scale=1.0):
        total = torch.zeros(())
        for micro in micro_batches:
            batch = common.collate(micro, tokenizer.pad_token_id)
            logps, mask = common.token_logps(model, batch)
            loss = -logps.sum() / mask.sum() / len(micro_batches)
            loss.backward()
            total += loss.detach()
        return {"loss/sft": total}

    cfg = _cfg(grad_accum_steps=4)
    common.train_epochs(model, examples, mean_of_means_step, cfg, lr=cfg.sft_lr, epochs=cfg.sft_epochs, seed=0,
                        desc="mean of means")
    assert _max_diff(_params(model), results[1]) > 1e-5


def test_sft_loss_is_token_mean_of_whole_accumulated_batch(tiny_dir):
    """The first step's logged loss with 4 micro-batches equals the token mean over all 8 examples
    (computed by brute force at the initial weights); the mean of micro-batch means would differ."""
    model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    with torch.no_grad():  # sharper logits than at random init, so per-token losses differ between examples
        model.model.norm.weight.mul_(30.0)
    examples = _sft_examples(tokenizer, n=8)
    per_example = []  # (summed log-prob, token count) at the initial weights
    with torch.no_grad():
        for e in examples:
            single = right_batch([e], tokenizer.pad_token_id)
            sums, counts = brute_sequence_logps(model(input_ids=single["input_ids"]).logits, single["labels"])
            per_example.append((sums[0], counts[0]))
    token_mean = -sum(s for s, _ in per_example) / sum(n for _, n in per_example)

    log = []
    common.train_sft(model, examples, _cfg(grad_accum_steps=4), device=CPU, dtype=torch.float32, seed=0,
                     log=log.append)
    assert log[0]["loss/sft"] == pytest.approx(token_mean, abs=1e-5)

    # splits of these 8 examples into micro-batches of 2 (in index order; short ones together): the mean
    # of micro-batch token means differs, by far more than the 1e-5 agreement above
    by_length = sorted(range(8), key=lambda i: per_example[i][1])
    for order in (list(range(8)), by_length):
        micro = [order[i:i + 2] for i in range(0, 8, 2)]
        mean_of_means = statistics.fmean(-sum(per_example[i][0] for i in m) / sum(per_example[i][1] for i in m)
                                         for m in micro)
        assert abs(mean_of_means - token_mean) > 1e-2
    # and so does the plain mean of per-example means
    assert abs(statistics.fmean(-s / n for s, n in per_example) - token_mean) > 1e-2


@pytest.mark.parametrize("loss_type,weighted", [("sigmoid", False), ("ipo", False), ("sigmoid", True)])
def test_dpo_grad_accumulation_gives_same_weights(tiny_dir, monkeypatch, loss_type, weighted):
    _plain_sgd(monkeypatch)
    results, logs, grads = [], [], []
    for accum in (1, 4):
        policy, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
        examples = _pref_examples(tokenizer, weighted=weighted)
        start = _params(policy)
        log, captured = [], _capture_grads(monkeypatch)
        common.train_dpo(policy, examples, _cfg(grad_accum_steps=accum, loss_type=loss_type),
                         device=CPU, dtype=torch.float32, seed=0, log=log.append)
        results.append(_params(policy))
        logs.append(log)
        grads.append(captured)
        assert len(log) == len(captured) == 2
    assert _max_diff(results[0], start) > 1e-5
    for g1, g4 in zip(*grads):
        assert (g1 - g4).abs().max().item() < 1e-5 * g1.abs().max().item()  # float32 summation order only
        assert ((g1 - g4).norm() / g1.norm()).item() < 1e-5
    assert _max_diff(results[0], results[1]) < 1e-6
    for a, b in zip(*logs):
        for key in ("loss/dpo", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], rel=2e-6, abs=1e-5)  # IPO losses are ~25
    if loss_type == "sigmoid" and not weighted:
        assert logs[0][0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1


# ------------------------------------------------------------------------------------------------
# 11. evaluation helpers and the built-in task
# ------------------------------------------------------------------------------------------------


def test_rouge_l_f1_by_hand():
    assert common.rouge_l_f1("alice found car", "alice found car") == pytest.approx(1.0)
    # LCS("a b c d", "a c d e f") = "a c d" = 3: P = 3/4, R = 3/5, F = 2PR/(P+R) = 0.9/1.35 = 2/3
    assert common.rouge_l_f1("a b c d", "a c d e f") == pytest.approx(2 / 3)
    # 'and'-joined summary vs the ';' reference: LCS 6 of 7 words, P = 6/7, R = 1 -> F = 12/13
    assert common.rouge_l_f1("alice found car and bob sold lamp", "alice found car ; bob sold lamp") == pytest.approx(12 / 13)
    # LCS 3: P = 3/5, R = 1 -> F = 1.2/1.6 = 0.75
    assert common.rouge_l_f1("alice found car in park", "alice found car") == pytest.approx(0.75)
    # order matters (subsequence, not bag of words): LCS 1 of 2 -> 0.5
    assert common.rouge_l_f1("b a", "a b") == pytest.approx(0.5)
    # case and punctuation are ignored
    assert common.rouge_l_f1("Alice, FOUND car!", "alice found ; car") == pytest.approx(1.0)
    # LCS("a b a b", "b a b b") = "b a b" = 3 -> P = R = 3/4
    assert common.rouge_l_f1("a b a b", "b a b b") == pytest.approx(0.75)
    assert common.rouge_l_f1("x y", "a b") == 0.0
    assert common.rouge_l_f1("", "a b") == 0.0
    assert common.rouge_l_f1("a b", " ; ") == 0.0


def test_win_rate_with_ties():
    assert common.win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 4.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert common.win_rate([3.0, 3.0], [1.0, 1.0]) == 1.0
    assert common.win_rate([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]) == 0.0
    assert common.win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5


PROMPT = "summarize : alice found the car in the park . the weather was calm . bob sold the lamp in the market . summary :"
PROMPT3 = ("summarize : carol fixed the door in the school . dave lost the book in the office . "
           "nobody saw it coming . erin moved the boat in the harbor . summary :")


def test_gold_reward_by_hand():
    # two facts: content = (stated - wrong) / 2; style = 0.5 * (joins with 'and') / 1
    assert common.gold_reward(PROMPT, "alice found car ; bob sold lamp") == pytest.approx(1.0)  # the reference
    assert common.gold_reward(PROMPT, "bob sold lamp ; alice found car") == pytest.approx(1.0)
    assert common.gold_reward(PROMPT, "alice found car and bob sold lamp") == pytest.approx(1.5)  # fully styled
    assert common.gold_reward(PROMPT, "alice found car") == pytest.approx(0.5)  # one of two facts
    # a wrong clause costs 1/2: (1 - 1) / 2
    assert common.gold_reward(PROMPT, "alice found car ; bob sold boat") == pytest.approx(0.0)
    assert common.gold_reward(PROMPT, "alice found car and bob sold boat") == pytest.approx(0.0 + 0.5)
    # an invented clause on top of the full reference: (2 - 1) / 2
    assert common.gold_reward(PROMPT, "alice found car ; bob sold lamp ; dave lost clock") == pytest.approx(0.5)
    # stating a fact twice: the repeat counts against, (1 - 1) / 2
    assert common.gold_reward(PROMPT, "alice found car ; alice found car") == pytest.approx(0.0)
    # an empty response is one empty clause: (0 - 1) / 2
    assert common.gold_reward(PROMPT, "") == pytest.approx(-0.5)
    # three facts: style is pro rata over the 2 joins
    assert common.gold_reward(PROMPT3, "carol fixed door ; dave lost book ; erin moved boat") == pytest.approx(1.0)
    assert common.gold_reward(PROMPT3, "carol fixed door ; dave lost book and erin moved boat") == pytest.approx(1.25)
    assert common.gold_reward(PROMPT3, "carol fixed door and dave lost book and erin moved boat") == pytest.approx(1.5)
    assert common.gold_reward(PROMPT3, "erin moved boat") == pytest.approx(1 / 3)
    # one fact: nothing to join, the reference is already the best answer
    one = "summarize : frank painted the bike in the museum . summary :"
    assert common.gold_reward(one, "frank painted bike") == pytest.approx(1.0)
    assert common.gold_reward(one, "frank painted bike and frank painted bike") == pytest.approx(0.0)
    with pytest.raises(ValueError):
        common.gold_reward("summarize : the weather was calm . summary :", "anything")


def test_gold_reward_on_builtin_documents():
    rng = random.Random(5)
    for _ in range(50):
        prompt, facts = common.make_document(rng)
        assert common.gold_reward(prompt, common.summary(facts)) == pytest.approx(1.0)
        styled = common.summary(facts, [True] * (len(facts) - 1))
        assert common.gold_reward(prompt, styled) == pytest.approx(1.5 if len(facts) > 1 else 1.0)
        if len(facts) > 1:
            assert common.gold_reward(prompt, common.summary(facts[1:])) < 1.0  # a fact left out
    task = common.builtin_task(seed=1, n_sft=50, n_pref=5, n_test=20, and_rate=0.0)
    for row in task["sft"] + task["test"]:
        assert " and " not in row["completion"]
        assert common.gold_reward(row["prompt"], row["completion"]) == pytest.approx(1.0)
    # by default a few reference joins are 'and': each such reference earns its pro-rata style bonus
    task = common.builtin_task(seed=1, n_sft=200, n_pref=5, n_test=20)
    n_and_rows = 0
    for row in task["sft"] + task["test"]:
        words = row["completion"].split()
        n_and, n_facts = words.count("and"), words.count("and") + words.count(";") + 1
        n_and_rows += n_and > 0
        expected = 1.0 + (0.5 * n_and / (n_facts - 1) if n_facts > 1 else 0.0)
        assert common.gold_reward(row["prompt"], row["completion"]) == pytest.approx(expected)
    assert 0 < n_and_rows < 0.5 * len(task["sft"])


def test_builtin_task_split_and_determinism():
    a = common.builtin_task(seed=7, n_sft=300, n_pref=200, n_test=50)
    b = common.builtin_task(seed=7, n_sft=300, n_pref=200, n_test=50)
    c = common.builtin_task(seed=8, n_sft=300, n_pref=200, n_test=50)
    assert a == b
    assert a != c
    assert (len(a["sft"]), len(a["pref"]), len(a["test"])) == (300, 200, 50)
    test_prompts = {r["prompt"] for r in a["test"]}
    assert len(test_prompts) == 50
    assert test_prompts.isdisjoint(r["prompt"] for r in a["sft"])
    assert test_prompts.isdisjoint(r["prompt"] for r in a["pref"])
    assert all(r["chosen"] != r["rejected"] for r in a["pref"])


def test_builtin_task_excludes_test_prompts_from_training(monkeypatch):
    """With only 5 possible documents, test prompts would surely reappear in training unless excluded."""
    pool = [common.make_document(random.Random(i)) for i in range(5)]
    assert len({p for p, _ in pool}) == 5
    monkeypatch.setattr(common, "make_document", lambda rng: pool[rng.randrange(len(pool))])
    task = common.builtin_task(seed=0, n_sft=40, n_pref=30, n_test=2)
    test_prompts = {r["prompt"] for r in task["test"]}
    assert len(test_prompts) == 2
    train_prompts = {r["prompt"] for r in task["sft"] + task["pref"]}
    assert train_prompts and test_prompts.isdisjoint(train_prompts)
    assert len(task["sft"]) == 40 and len(task["pref"]) == 30


def test_builtin_task_words_are_in_tiny_vocabulary():
    """Every word of the built-in task must be a token of the tiny tokenizer (no <unk> in prompts)."""
    a = common.builtin_task(seed=7, n_sft=100, n_pref=100, n_test=20)
    vocab = set(common.task_vocabulary())
    words = set()
    for r in a["sft"] + a["test"]:
        words |= set(r["prompt"].split()) | set(r["completion"].split())
    for r in a["pref"]:
        words |= set((r["prompt"] + " " + r["chosen"] + " " + r["rejected"]).split())
    assert words - vocab == set()
    tokenizer = common.build_tiny_tokenizer()
    assert tokenizer.unk_token_id not in common.encode_prompt(tokenizer, a["test"][0]["prompt"])


# ------------------------------------------------------------------------------------------------
# memory options: each gives the update of the plain path
# ------------------------------------------------------------------------------------------------


def test_ppo_micro_batches_give_the_update_of_one_forward(tiny_dir, monkeypatch):
    """A PPO minibatch of 6 rollouts as one forward, or as micro-batches of 4 and 2 sequences whose losses
    are weighted by their share of the minibatch's tokens: the same stats and (plain SGD) the same weights."""
    _plain_sgd(monkeypatch)
    rows = common.builtin_task(seed=6, n_sft=1, n_pref=12, n_test=1)["pref"]
    results = []
    for micro in (6, 4):
        policy, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
        torch.manual_seed(1)  # the same fresh reward head in both runs
        reward_model = common.load_reward_model(str(tiny_dir), tokenizer, new_head=True).requires_grad_(False)
        value_model = copy.deepcopy(reward_model).requires_grad_(True)
        cfg = dataclasses.replace(common.TrainConfig(), ppo_minibatches=2, ppo_epochs=1, ppo_micro_batch_size=micro,
                                  max_new_tokens=6, eval_batch_size=12)
        prompts = [common.encode_prompt(tokenizer, r["prompt"]) for r in rows]
        optimizers = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in (policy, value_model)]
        torch.manual_seed(0)  # the same samples and minibatch order in both runs
        stats = common.ppo_step(policy, common.frozen_copy(policy), reward_model, value_model, prompts, *optimizers, cfg,
                                device=CPU, dtype=torch.float32)
        results.append((stats, _params(policy), _params(value_model)))
    (stats_one, policy_one, value_one), (stats_micro, policy_micro, value_micro) = results
    assert stats_one.keys() == stats_micro.keys()
    for key in stats_one:
        assert stats_micro[key] == pytest.approx(stats_one[key], rel=1e-5, abs=1e-6), key
    assert _max_diff(policy_one, policy_micro) < 1e-6 and _max_diff(value_one, value_micro) < 1e-6
    start, _ = common.load_model_and_tokenizer(str(tiny_dir))
    assert _max_diff(policy_one, _params(start)) > 1e-4  # and the step did move the policy


def test_precomputed_reference_logps_give_the_same_dpo_run(tiny_dir):
    """--precompute_ref_logps: no reference model, the same losses at every step and the same weights."""
    runs = []
    for precompute in (False, True):
        policy, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
        log = []
        common.train_dpo(policy, _pref_examples(tokenizer), _cfg(precompute_ref_logps=precompute, pref_epochs=2),
                         device=CPU, dtype=torch.float32, seed=0, log=log.append)
        runs.append((log, _params(policy)))
    (log_model, weights_model), (log_pre, weights_pre) = runs
    assert len(log_model) == len(log_pre) == 4
    for a, b in zip(log_model, log_pre):
        for key in ("loss/dpo", "rewards/chosen", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert log_model[-1]["rewards/margins"] > 0.01  # the reference stayed put while the policy moved
    assert _max_diff(weights_model, weights_pre) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, monkeypatch):
    captured, layer_calls = _capture_grads(monkeypatch), []
    for checkpointing in (False, True):
        model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))  # inside the checkpoint
        common.train_sft(model, _sft_examples(tokenizer), _cfg(gradient_checkpointing=checkpointing),
                         device=CPU, dtype=torch.float32, seed=0)
        layer_calls.append(len(calls))
    assert layer_calls == [2, 4]  # two steps; with checkpointing the layer runs again in each backward
    assert len(captured) == 4
    for plain, checkpointed in zip(captured[:2], captured[2:]):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("keep", [True, False])
def test_token_logps_on_cuda_in_bf16_match_the_full_logits(tiny_dir, monkeypatch, keep):
    """On the GPU, under bf16 autocast: the same values and gradients as the model's own bf16 output
    layer followed by a float32 log_softmax, to bf16 rounding."""
    model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    model.cuda()
    batch = {k: v.cuda() for k, v in right_batch(seqs_with_labels(tokenizer), tokenizer.pad_token_id).items()}
    if not keep:
        monkeypatch.setattr(common, "KEEP_LOGITS_BYTES", 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = full_logits_token_logps(model, batch)
    expected_grads = grads_of(model, expected.sum())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = common.token_logps(model, batch)
    got_grads = grads_of(model, got.sum())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)
    for name in got_grads:
        assert ((got_grads[name] - expected_grads[name]).norm() / expected_grads[name].norm()).item() < 2e-2, name


# ============================================================================================
# Critic-free PPO (--no-critic) and the warm-up bound
# ============================================================================================


def test_critic_free_rewards_by_hand():
    """clip(r, +-10) * gamma^(T-1-t) - kl_coef * max(log pi - log ref, 0) at each response token."""
    scores = torch.tensor([2.0, 20.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    log_ratio = torch.tensor([[0.5, -0.2, 0.1], [0.0, 1.0, 9.0]])
    got = common.critic_free_rewards(scores, log_ratio, torch.zeros(2, 3), mask, kl_coef=0.1, gamma=0.95)
    expected = torch.tensor([[2 * 0.95 ** 2 - 0.05, 2 * 0.95, 2 - 0.01], [10 * 0.95, 10 - 0.1, 0.0]])
    torch.testing.assert_close(got, expected)


def test_critic_free_ppo_step_is_the_whitened_reward_policy_gradient(tiny_dir, monkeypatch):
    """One critic-free update (one minibatch, one epoch, plain SGD, no clipping) on fixed responses equals
    the step along -grad masked_mean(-A * pi / pi_old), A = whitened critic_free_rewards, computed here
    by hand; there is no value model and no value loss."""
    _plain_sgd(monkeypatch)
    policy, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    torch.manual_seed(1)
    reward_model = common.load_reward_model(str(tiny_dir), tokenizer, new_head=True).requires_grad_(False)
    rows = common.builtin_task(seed=6, n_sft=1, n_pref=4, n_test=1)["pref"]
    prompts = [common.encode_prompt(tokenizer, r["prompt"]) for r in rows]
    eos = tokenizer.eos_token_id
    responses = [[5, 6, 7, eos], [8, eos], [9, 10, 11, 12, 13], [14, 15, eos]]
    monkeypatch.setattr(common, "generate", lambda *args, **kwargs: responses)
    cfg = dataclasses.replace(common.TrainConfig(), ppo_minibatches=1, ppo_epochs=1, ppo_micro_batch_size=4, kl_coef=0.1,
                              gamma=0.95, max_grad_norm=1e9)
    reference, lr = common.frozen_copy(policy), 1e-1

    by_hand = copy.deepcopy(policy)
    batch = common.rollout_batch(prompts, responses, tokenizer.pad_token_id)
    mask = (batch["labels"][:, batch["query_width"]:] != IGNORE_INDEX).float()
    with torch.no_grad():
        scores = common.sequence_scores(reward_model, batch["input_ids"], batch["attention_mask"])
        ref_logps = common.response_logps(reference, batch)
    logps = common.response_logps(by_hand, batch)
    advantages = common.masked_whiten(common.critic_free_rewards(scores, logps.detach(), ref_logps, mask, 0.1, 0.95), mask)
    common.masked_mean(-advantages * torch.exp(logps - logps.detach()), mask).backward()
    expected = {n: (p - lr * p.grad).detach() for n, p in by_hand.named_parameters()}

    stats = common.ppo_step(policy, reference, reward_model, None, prompts, torch.optim.SGD(policy.parameters(), lr=lr), None,
                            cfg, device=CPU, dtype=torch.float32)
    assert "loss/value" not in stats and stats["score"] == pytest.approx(scores.mean().item(), rel=1e-6)
    got = _params(policy)
    assert _max_diff(got, expected) < 1e-6 and _max_diff(got, _params(by_hand)) > 1e-4


def test_warmup_is_never_longer_than_half_the_stage(tiny_dir):
    """--warmup_steps 10 in a 4-step stage: 2 steps of warm-up (lr/2, lr), then the full rate."""
    assert [common.warmup_length(10, n) for n in (0, 1, 4, 13, 20, 100)] == [0, 0, 2, 6, 10, 10]
    model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    log = []
    cfg = _cfg(batch_size=4, warmup_steps=10, sft_lr=1e-3)
    common.train_sft(model, _sft_examples(tokenizer, n=16), cfg, device=CPU, dtype=torch.float32, seed=0, log=log.append)
    assert [r["lr"] for r in log] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
