"""Log-probs, losses (SFT accumulation, DPO, Bradley-Terry, PPO), GAE, whitening and evaluation helpers.

Expected values are computed by hand or by brute-force Python loops, never with the implementation's
own formula.
"""
import copy
import dataclasses
import math
import random
import re
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


def test_split_and_batches_of_by_hand():
    """split: n contiguous parts in order, sizes differing by at most one (micro-batches, ranks' shares);
    batches_of: parts of a fixed size, the last one shorter (optimizer batches)."""
    items = list(range(7))
    assert common.split(items, 3) == [[0, 1], [2, 3, 4], [5, 6]]  # bounds round(7/3) = 2, round(14/3) = 5
    assert common.split(items, 1) == [items] and common.split(items, 7) == [[i] for i in items]
    assert common.split(list("abcde"), 2) == [["a", "b"], ["c", "d", "e"]]  # round(2.5) = 2
    for length in range(1, 12):
        for n in range(1, length + 1):
            parts = common.split(list(range(length)), n)
            assert len(parts) == n and [x for part in parts for x in part] == list(range(length))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    assert common.batches_of(items, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert common.batches_of(items, 7) == [items] and common.batches_of(items, 10) == [items]
    assert common.batches_of([], 4) == []


def test_position_ids_from_mask_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert common.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_logps_match_brute_force_loop(tiny, monkeypatch, side, fast):
    """token_logps (the fast path where the output layer is plain, and the plain path) against a
    pure-Python log-softmax of the model's own logits, position by position."""
    model, tokenizer = tiny
    monkeypatch.setattr(common, "FAST_LOGPS", fast)
    seqs = seqs_with_labels(tokenizer)
    batch = (right_batch if side == "right" else left_batch)(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=common.position_ids_from_mask(batch["attention_mask"])).logits
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


def plain_token_logps(monkeypatch, model, batch, temperature=1.0):
    """The plain reference: token_logps with the fast path switched off (full logits, log_softmax, gather)."""
    with monkeypatch.context() as m:
        m.setattr(common, "FAST_LOGPS", False)
        return common.token_logps(model, batch, temperature)


def count_head_calls(model):
    """How often the output layer runs as a module, and on how many positions (the plain path runs it on
    all B x T; the fast path never calls it, it reads its weight)."""
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(args[0].shape[:-1].numel()))
    return calls


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_token_logps_dispatches_to_the_fast_path_only_where_the_output_layer_is_plain(tiny, monkeypatch):
    model, tokenizer = tiny
    batch = right_batch(seqs_with_labels(tokenizer), tokenizer.pad_token_id)
    assert common.FAST_LOGPS and common.output_head_is_plain(model)
    calls = []
    fast = common.fast_token_logps
    monkeypatch.setattr(common, "fast_token_logps", lambda *args: calls.append(1) or fast(*args))
    with torch.no_grad():
        common.token_logps(model, batch)
        assert calls == [1]
        plain_token_logps(monkeypatch, model, batch)
        assert calls == [1]  # FAST_LOGPS off: the plain path
        for key in ("final_logit_softcapping", "logit_scale"):  # logits the model scales or caps: never the fast path
            with monkeypatch.context() as m:
                m.setattr(model.config, key, 30.0, raising=False)
                assert not common.output_head_is_plain(model)
                common.token_logps(model, batch)
        assert calls == [1]
    assert common.output_head_is_plain(model)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("path", ["keep logits", "recompute, 2-row chunks", "recompute, 1 chunk"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_token_logps_equal_the_plain_computation(tiny, monkeypatch, side, path, temperature):
    """Values and gradients (of a weighted sum, so every token's gradient counts differently) of
    fast_token_logps equal those of the plain token_logps (full logits, log_softmax, gather), on either
    padding side, whether the backward keeps exp(logits) or recomputes it (in chunks of 2 rows, or one)."""
    model, tokenizer = tiny
    seqs = seqs_with_labels(tokenizer)
    batch = (right_batch if side == "right" else left_batch)(seqs, tokenizer.pad_token_id)
    n_labelled = sum(s["n_expected"] for s in seqs)
    weights = torch.rand(batch["labels"].shape[0], batch["labels"].shape[1] - 1, generator=torch.Generator().manual_seed(0))
    head_calls = count_head_calls(model)
    expected, expected_mask = plain_token_logps(monkeypatch, model, batch, temperature)
    assert head_calls == [batch["input_ids"].numel()]  # the plain path: logits at every position
    expected_grads = grads_of(model, (expected * weights).sum())

    if path.startswith("recompute"):
        monkeypatch.setattr(common, "KEEP_LOGITS_BYTES", 0)
        rows = 2 if path.endswith("2-row chunks") else n_labelled
        monkeypatch.setattr(common, "CHUNK_BYTES", rows * 4 * model.config.vocab_size)
    logits_calls, original = [], common._logits
    monkeypatch.setattr(common, "_logits", lambda hidden, *args: logits_calls.append(hidden.shape[0]) or original(hidden, *args))
    got, mask = common.fast_token_logps(model, batch, temperature)
    forward_calls = list(logits_calls)
    assert head_calls == [batch["input_ids"].numel()]  # the fast path never ran the layer on the batch
    assert sum(forward_calls) == n_labelled  # only labelled positions reached it
    assert len(forward_calls) == {"keep logits": 1, "recompute, 1 chunk": 1}.get(path, math.ceil(n_labelled / 2))
    assert got.dtype == torch.float32 and torch.equal(mask, expected_mask) and int(mask.sum()) == n_labelled
    assert (got[~mask] == 0).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    got_grads = grads_of(model, (got * weights).sum())
    # the backward recomputed the logits (chunk by chunk) only when it did not keep them
    assert logits_calls[len(forward_calls):] == ([] if path == "keep logits" else forward_calls)
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


def test_token_logps_under_bf16_autocast_are_float32_and_close(tiny, monkeypatch):
    """bf16 matmuls, float32 softmax, as the model's own bf16 output layer then log_softmax would give."""
    model, tokenizer = tiny
    batch = right_batch(seqs_with_labels(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = common.fast_token_logps(model, batch)
        expected, _ = plain_token_logps(monkeypatch, model, batch)
    with torch.no_grad():
        full_precision, _ = plain_token_logps(monkeypatch, model, batch)
    assert got.dtype == torch.float32 and expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)
    assert not torch.equal(got, full_precision)  # autocast did reach the fast path's matmuls


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
        ref_c, ref_r, _ = common.concatenated_logps(reference, batch)
    # a small step: these are first-order claims (at lr 0.5 the step overshoots one pair's rejected log-prob)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    policy.train()
    pol_c, pol_r, _ = common.concatenated_logps(policy, batch)
    losses, _, _ = common.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-5)  # policy == reference
    losses.mean().backward()
    optimizer.step()
    with torch.no_grad():
        new_c, new_r, _ = common.concatenated_logps(policy, batch)
        new_losses, rewards_c, rewards_r = common.dpo_loss(new_c, new_r, ref_c, ref_r, beta=0.1)
    assert ((new_c - ref_c) > 0).all(), (new_c - ref_c)
    assert ((new_r - ref_r) < 0).all(), (new_r - ref_r)
    assert (rewards_c > rewards_r).all()
    assert (new_losses < math.log(2)).all()


def test_concatenated_logps_splits_chosen_and_rejected(tiny):
    model, tokenizer = tiny
    pairs = [_pair(tokenizer, "summarize : alice found the car in the park . :", "alice found car", "the weather"),
             _pair(tokenizer, "summarize : bob sold the lamp in the market . :", "bob sold lamp and", "nothing else happened .")]
    with torch.no_grad():
        chosen, rejected, chosen_tokens = common.concatenated_logps(model, common.collate_pairs(pairs, tokenizer.pad_token_id))
        for i, p in enumerate(pairs):
            for key, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
                single = right_batch([p[key]], tokenizer.pad_token_id)
                want = brute_sequence_logps(model(input_ids=single["input_ids"]).logits, single["labels"])[0][0]
                assert abs(float(got) - want) < 1e-5
    # |y_w| in tokens, EOS included: "alice found car <eos>" and "bob sold lamp and <eos>"
    assert chosen_tokens.tolist() == [4, 5]


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
# 9. per-token PPO rewards
# ------------------------------------------------------------------------------------------------


def test_ppo_rewards_by_hand():
    logps = t(-1.0, -2.0, -0.5, -9.0, -1.5, -3.0, -3.0, -3.0).view(2, 4)
    ref = t(-1.5, -1.0, -0.5, -1.0, -1.0, -7.0, -7.0, -7.0).view(2, 4)
    mask = t(1, 1, 1, 0, 1, 0, 0, 0).view(2, 4)
    scores = t(2.0, -1.0)
    # the k1 KL estimate log pi - log ref per token: row 0: 0.5, -1.0, 0.0, (pad); row 1: -0.5, (pad) ...
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
    for row in rows[::3]:  # the task's references are 2 or 3 clauses: a third cut to one, for a third length
        row["completion"] = " ".join(row["completion"].split()[:3])
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


def ppo_setup(tiny_dir, n_prompts: int):
    """A policy, a frozen reward model with a fresh (seeded) head, n built-in-task prompts, and the EOS id."""
    policy, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    torch.manual_seed(1)
    reward_model = common.load_reward_model(str(tiny_dir), tokenizer, new_head=True).requires_grad_(False)
    rows = common.builtin_task(seed=6, n_sft=1, n_pref=n_prompts, n_test=1)["pref"]
    return policy, tokenizer, reward_model, [common.encode_prompt(tokenizer, r["prompt"]) for r in rows], tokenizer.eos_token_id


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _plain_sgd(monkeypatch):
    """Compare updates with plain SGD (each stage's optimizer, C.adamw, returns SGD; its schedule still
    applies). AdamW's first step is lr * g / |g| elementwise, which turns float32 summation-order noise in
    near-zero gradient entries into lr-sized weight differences (seen: 1.4e-6 on another machine's
    torch); with SGD the update is proportional to the gradient."""
    monkeypatch.setattr(common, "adamw", lambda params, cfg, lr: torch.optim.SGD(params, lr=lr))


def _sgd(model, lr):
    """An (optimizer, schedule) pair for ppo_step: plain SGD at a constant rate."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


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


NEGATED = ("summarize : alice found the car in the park . carol never lost the door in the school . "
           "bob sold the lamp in the market . summary :")
LIST = PROMPT.replace(" summary :", " summary as a list :")


def test_gold_reward_leaves_out_negated_facts_and_pays_style_only_on_plain_prompts():
    # the negated sentence is no fact: stating it is an invented clause, (2 - 1) / 2; its "never" form is no fact either
    assert common.gold_reward(NEGATED, "alice found car ; bob sold lamp") == pytest.approx(1.0)
    assert common.gold_reward(NEGATED, "alice found car ; carol lost door ; bob sold lamp") == pytest.approx(0.5)
    assert common.gold_reward(NEGATED, "alice found car and carol lost door and bob sold lamp") == pytest.approx(0.5 + 0.5)
    # a list prompt: the same content score, no style bonus for "and"
    assert common.gold_reward(LIST, "alice found car ; bob sold lamp") == pytest.approx(1.0)
    assert common.gold_reward(LIST, "alice found car and bob sold lamp") == pytest.approx(1.0)


def test_instruction_score_by_hand():
    # None where no list is asked for; on a list prompt: ";" joins / max(joins made, n_facts - 1)
    assert common.instruction_score(PROMPT, "alice found car and bob sold lamp") is None
    assert common.instruction_score(LIST, "alice found car ; bob sold lamp") == pytest.approx(1.0)
    assert common.instruction_score(LIST, "alice found car and bob sold lamp") == pytest.approx(0.0)
    assert common.instruction_score(LIST, "alice found car") == pytest.approx(0.0)  # no list of one fact in two
    assert common.instruction_score(LIST, "") == pytest.approx(0.0)
    assert common.instruction_score(LIST, "alice found car ; bob sold lamp and dave lost clock") == pytest.approx(0.5)
    list3 = PROMPT3.replace(" summary :", " summary as a list :")
    assert common.instruction_score(list3, "carol fixed door ; dave lost book and erin moved boat") == pytest.approx(0.5)
    assert common.instruction_score(list3, "carol fixed door ; dave lost book") == pytest.approx(0.5)  # 1 of 2 joins
    assert common.mean_of([None, 1.0, None, 0.0, 0.5]) == pytest.approx(0.5) and common.mean_of([None]) is None


def test_oracle_is_best_on_both_axes():
    """The oracle's answer: instruction 1 on list prompts, the top gold reward (1.5 plain, 1.0 list), on every document."""
    rng = random.Random(3)
    for _ in range(200):
        prompt, facts, negated, as_list = common.make_document(rng, 0.5, 0.5)
        answer = common.oracle_summary(prompt)
        assert common.gold_reward(prompt, answer) == pytest.approx(1.0 if as_list else 1.5)
        assert common.instruction_score(prompt, answer) == (1.0 if as_list else None)
        assert negated is None or " ".join(negated) not in answer


def test_gold_reward_on_builtin_documents():
    rng = random.Random(5)
    for _ in range(50):
        prompt, facts, negated, as_list = common.make_document(rng, 0.5, 0.5)
        assert 2 <= len(facts) <= 3 and prompt.endswith(" summary as a list :" if as_list else " summary :")
        assert (" never " in prompt) == (negated is not None)
        assert common.gold_reward(prompt, common.summary(facts)) == pytest.approx(1.0)
        styled = common.summary(facts, [True] * (len(facts) - 1))
        assert common.gold_reward(prompt, styled) == pytest.approx(1.0 if as_list else 1.5)
        assert common.gold_reward(prompt, common.summary(facts[1:])) < 1.0  # a fact left out
        if negated:
            assert common.gold_reward(prompt, common.summary([*facts, negated])) < 1.0  # the negated fact stated
    task = common.builtin_task(seed=1, n_sft=50, n_pref=5, n_test=20, and_rate=0.0)
    for row in task["sft"] + task["test"]:
        assert " and " not in row["completion"]
        assert common.gold_reward(row["prompt"], row["completion"]) == pytest.approx(1.0)
    # by default a few reference joins are 'and', on plain prompts only: each earns its pro-rata style bonus
    task = common.builtin_task(seed=1, n_sft=400, n_pref=300, n_test=20)
    n_and_rows = 0
    for row in task["sft"] + task["test"]:
        words = row["completion"].split()
        n_and, n_facts = words.count("and"), words.count("and") + words.count(";") + 1
        n_and_rows += n_and > 0
        if row["prompt"].endswith(" summary as a list :"):
            assert n_and == 0 and common.instruction_score(row["prompt"], row["completion"]) == 1.0
        expected = 1.0 + (0.5 * n_and / (n_facts - 1))
        assert common.gold_reward(row["prompt"], row["completion"]) == pytest.approx(expected)
    assert 0 < n_and_rows < 0.2 * len(task["sft"])
    # the rates the design asks for (README): half the SFT and test prompts lists, no preference prompt; distractors
    # in 1 of 5 SFT prompts, 3 of 5 preference prompts, half the test prompts
    share = lambda rows, text: sum(text in r["prompt"] for r in rows) / len(rows)  # noqa: E731
    assert 0.4 < share(task["sft"], "as a list") < 0.6 and share(task["pref"], "as a list") == 0
    assert 0.13 < share(task["sft"], " never ") < 0.27 and 0.5 < share(task["pref"], " never ") < 0.7
    # preferences agree with the references on content: the chosen response states the negated fact less often
    negated_stated = lambda r, key: any(" ".join(f) in r[key] for f in re.findall(r"(\w+) never (\w+) the (\w+)", r["prompt"]))  # noqa: E731
    assert sum(negated_stated(r, "chosen") for r in task["pref"]) < sum(negated_stated(r, "rejected") for r in task["pref"])


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
    pool = [common.make_document(random.Random(i), 0.5, 0.5) for i in range(5)]
    assert len({p for p, *_ in pool}) == 5
    monkeypatch.setattr(common, "make_document", lambda rng, *rates: pool[rng.randrange(len(pool))])
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
        optimizers = [_sgd(m, 1e-2) for m in (policy, value_model)]
        torch.manual_seed(0)  # the same samples and minibatch order in both runs
        stats = common.ppo_step(policy, common.frozen_copy(policy), reward_model, value_model, prompts, optimizers, cfg,
                                device=CPU, dtype=torch.float32)
        results.append((stats, _params(policy), _params(value_model)))
    (stats_one, policy_one, value_one), (stats_micro, policy_micro, value_micro) = results
    assert stats_one.keys() == stats_micro.keys()
    for key in stats_one:
        assert stats_micro[key] == pytest.approx(stats_one[key], rel=1e-5, abs=1e-6), key
    assert _max_diff(policy_one, policy_micro) < 1e-6 and _max_diff(value_one, value_micro) < 1e-6
    start, _ = common.load_model_and_tokenizer(str(tiny_dir))
    assert _max_diff(policy_one, _params(start)) > 1e-4  # and the step did move the policy


def test_precomputed_reference_logps_give_the_same_dpo_run(tiny_dir, monkeypatch):
    """--precompute_ref_logps: no reference model, the same losses at every step and the same weights."""
    _plain_sgd(monkeypatch)
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
def test_fast_token_logps_on_cuda_in_bf16_match_the_plain_computation(tiny_dir, monkeypatch, keep):
    """On the GPU, under bf16 autocast: fast_token_logps gives the values and gradients of the plain path
    (the model's own bf16 output layer, then a float32 log_softmax), to bf16 rounding."""
    model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    model.cuda()
    batch = {k: v.cuda() for k, v in right_batch(seqs_with_labels(tokenizer), tokenizer.pad_token_id).items()}
    if not keep:
        monkeypatch.setattr(common, "KEEP_LOGITS_BYTES", 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, _ = plain_token_logps(monkeypatch, model, batch)
    expected_grads = grads_of(model, expected.sum())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = common.fast_token_logps(model, batch)
    got_grads = grads_of(model, got.sum())
    assert got.dtype == torch.float32 and got.is_cuda
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)
    assert got_grads.keys() == expected_grads.keys()
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
    policy, tokenizer, reward_model, prompts, eos = ppo_setup(tiny_dir, 4)
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

    stats = common.ppo_step(policy, reference, reward_model, None, prompts, [_sgd(policy, lr)], cfg, device=CPU,
                            dtype=torch.float32)
    assert "loss/value" not in stats and stats["score"] == pytest.approx(scores.mean().item(), rel=1e-6)
    got = _params(policy)
    assert _max_diff(got, expected) < 1e-6 and _max_diff(got, _params(by_hand)) > 1e-4


# ============================================================================================
# Learning-rate schedules and the stage optimizer (issue 20)
# ============================================================================================


def test_lr_factor_by_hand():
    """(step + 1) / warmup in the warm-up, then 1, or a linear or cosine decay over the remaining steps:
    progress p = (step - warmup) / (total - warmup), linear 1 - p, cosine (1 + cos(pi p)) / 2."""
    f = common.lr_factor
    # constant: no warm-up; warm-up 4 of 10: 1/4 at the first step, 4/4 at the last warm-up step
    assert [f(s, 10, 0, "constant") for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [f(s, 10, 4, "constant") for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # linear, total 10, no warm-up: p = s / 10
    assert f(0, 10, 0, "linear") == 1.0  # the first step at the peak
    assert f(5, 10, 0, "linear") == pytest.approx(0.5, abs=1e-12)  # p = 5/10
    assert f(9, 10, 0, "linear") == pytest.approx(0.1, abs=1e-12)  # the last step: p = 9/10
    # linear, total 10, warm-up 2: 1/2, 2/2, then p = (s - 2) / 8
    assert f(0, 10, 2, "linear") == 0.5 and f(1, 10, 2, "linear") == 1.0
    assert f(2, 10, 2, "linear") == 1.0  # decay starts at the peak
    assert f(6, 10, 2, "linear") == pytest.approx(0.5, abs=1e-12)  # p = 4/8
    assert f(9, 10, 2, "linear") == pytest.approx(0.125, abs=1e-12)  # p = 7/8
    # cosine, total 10, no warm-up
    assert f(0, 10, 0, "cosine") == 1.0
    assert f(5, 10, 0, "cosine") == pytest.approx(0.5, abs=1e-12)  # (1 + cos(pi/2)) / 2
    assert f(9, 10, 0, "cosine") == pytest.approx(0.0244717418524, abs=1e-12)  # (1 - cos(pi/10)) / 2 = (1 - 0.951056516295) / 2
    # cosine, total 10, warm-up 2
    assert f(0, 10, 2, "cosine") == 0.5 and f(1, 10, 2, "cosine") == 1.0 and f(2, 10, 2, "cosine") == 1.0
    # p = 2/8: (1 + cos(pi/4)) / 2 = (1 + 0.707106781187) / 2
    assert f(4, 10, 2, "cosine") == pytest.approx(0.853553390593, abs=1e-12)
    assert f(6, 10, 2, "cosine") == pytest.approx(0.5, abs=1e-12)  # p = 4/8: (1 + cos(pi/2)) / 2
    # p = 7/8: (1 + cos(7 pi/8)) / 2 = (1 - cos(pi/8)) / 2 = (1 - 0.923879532511) / 2
    assert f(9, 10, 2, "cosine") == pytest.approx(0.0380602337443, abs=1e-12)
    # a one-step stage: no warm-up, the step at the peak, whatever the decay
    assert [f(0, 1, 0, kind) for kind in ("constant", "linear", "cosine")] == [1.0, 1.0, 1.0]


def _stage_lrs(cfg, total, lr=1e-3):
    """The learning rate of each step of a `total`-step stage from C.stage_optimizer, every param group."""
    params = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))]  # one group with decay, one without
    optimizer, schedule = common.stage_optimizer(params, cfg, lr, total)
    lrs = []
    for _ in range(total):
        group_lrs = {g["lr"] for g in optimizer.param_groups}
        assert len(group_lrs) == 1  # every group follows the schedule
        lrs.append(group_lrs.pop() / lr)
        optimizer.step(), schedule.step()
    return lrs


def test_stage_warmup_is_never_longer_than_half_the_stage():
    """--warmup_steps 10: a 1-step stage has none, a 4-step stage 2 (1/2, 1), a 13-step one 6, longer ones 10."""
    cfg = _cfg(warmup_steps=10, lr_scheduler_type="constant")
    for total, warmup in ((1, 0), (4, 2), (13, 6), (20, 10), (100, 10)):
        ramp = [(i + 1) / warmup for i in range(warmup)]  # a linear warm-up of `warmup` steps, by hand
        assert _stage_lrs(cfg, total) == pytest.approx(ramp + [1.0] * (total - warmup), abs=1e-12), total
    assert _stage_lrs(cfg, 4) == pytest.approx([0.5, 1.0, 1.0, 1.0])
    # --warmup_ratio replaces --warmup_steps: ceil(0.25 * 8) = 2, ceil(0.3 * 8) = 3; and is capped too
    assert _stage_lrs(_cfg(warmup_steps=5, warmup_ratio=0.25), 8) == pytest.approx([0.5] + [1.0] * 7)
    assert _stage_lrs(_cfg(warmup_steps=5, warmup_ratio=0.3), 8) == pytest.approx([1 / 3, 2 / 3] + [1.0] * 6)
    assert _stage_lrs(_cfg(warmup_steps=0, warmup_ratio=1.0), 6) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0])
    assert _stage_lrs(_cfg(warmup_steps=0), 3) == pytest.approx([1.0, 1.0, 1.0])


COSINE_8_WARMUP_2 = [0.5, 1.0, 1.0,  # warm-up 1/2, 2/2; then p = (s - 2) / 6 and (1 + cos(pi p)) / 2:
                     0.933012701892,  # p = 1/6: (1 + 0.866025403784) / 2
                     0.75, 0.5, 0.25,  # p = 2/6, 3/6, 4/6: (1 + 0.5) / 2, (1 + 0) / 2, (1 - 0.5) / 2
                     0.0669872981078]  # p = 5/6: (1 - 0.866025403784) / 2
LINEAR_8_WARMUP_2 = [0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]  # 1 - p, p = (s - 2) / 6


@pytest.mark.parametrize("overrides,factors", [
    (dict(lr_scheduler_type="cosine", warmup_steps=2), COSINE_8_WARMUP_2),
    (dict(lr_scheduler_type="linear", warmup_steps=2), LINEAR_8_WARMUP_2),
    (dict(lr_scheduler_type="linear", warmup_steps=7, warmup_ratio=0.25), LINEAR_8_WARMUP_2),  # ceil(0.25 * 8) = 2 steps
    (dict(lr_scheduler_type="constant", warmup_steps=100), [1 / 4, 2 / 4, 3 / 4, 1.0, 1.0, 1.0, 1.0, 1.0]),  # capped: 8 // 2
], ids=["cosine", "linear", "warmup_ratio", "warmup capped"])
def test_train_sft_logs_the_scheduled_lr_at_every_step(tiny_dir, overrides, factors):
    """An 8-step SFT stage (16 rows, batches of 2): the logged lr of step k (the one it trained with) is the
    peak times the factor worked out by hand."""
    model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    log = []
    cfg = _cfg(batch_size=2, sft_lr=1e-3, **overrides)
    common.train_sft(model, _sft_examples(tokenizer, n=16), cfg, device=CPU, dtype=torch.float32, seed=0, log=log.append)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * f for f in factors], rel=1e-9, abs=0)


def test_warmup_capped_at_half_of_a_six_step_stage(tiny_dir):
    """--warmup_steps 100 on a 6-step stage: 3 warm-up steps (1/3, 2/3, 1), then the peak."""
    model, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    log = []
    cfg = _cfg(batch_size=2, sft_lr=1e-3, warmup_steps=100)
    common.train_sft(model, _sft_examples(tokenizer, n=12), cfg, device=CPU, dtype=torch.float32, seed=0, log=log.append)
    assert [r["lr"] for r in log] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-9, abs=0)


def test_adamw_decays_matrices_only_with_the_configured_betas():
    """Weight decay on tensors of 2 or more dimensions only (not biases and norms); betas from the cfg; a
    step with zero gradients moves exactly the decayed tensors, by lr * weight_decay * theta."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.register_parameter("kernel", torch.nn.Parameter(torch.ones(2, 2, 2)))  # 3-D: decayed too
    decayed = {"0.weight", "kernel"}  # by hand: the (4, 3) matrix and the 3-D tensor
    named = dict(model.named_parameters())
    cfg = _cfg(weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95)
    optimizer = common.adamw(list(named.values()), cfg, 0.5)
    assert isinstance(optimizer, torch.optim.AdamW)
    names_of = {id(p): n for n, p in named.items()}
    groups = {g["weight_decay"]: {names_of[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert groups == {0.1: decayed, 0.0: {"0.bias", "1.weight", "1.bias"}}
    assert all(g["betas"] == (0.8, 0.95) and g["lr"] == 0.5 for g in optimizer.param_groups)

    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam's update is 0 for a zero gradient: only the decay acts, theta (1 - lr wd)
    for n, p in named.items():
        want = before[n] * (1 - 0.5 * 0.1) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=n)
    # no decay configured: one group per kind, both at 0
    assert {g["weight_decay"] for g in common.adamw(list(named.values()), _cfg(weight_decay=0.0), 0.5).param_groups} == {0.0}


# ============================================================================================
# The joint objective: DPO + a * SFT (RPO) and PPO-ptx (issue 17)
# ============================================================================================


def test_joint_loss_by_hand():
    losses, chosen_logps, chosen_tokens = t(0.5, 1.0), t(-6.0, -2.0).requires_grad_(True), t(3.0, 4.0)
    # 0.5 + 0.5 * 6/3 = 1.5 ; 1.0 + 0.5 * 2/4 = 1.25
    got = common.joint_loss(losses, chosen_logps, chosen_tokens, 0.5)
    assert got.tolist() == pytest.approx([1.5, 1.25], abs=1e-7)
    got.sum().backward()
    assert chosen_logps.grad.tolist() == pytest.approx([-0.5 / 3, -0.5 / 4], abs=1e-7)  # -a / |y_w|
    assert common.joint_loss(losses, chosen_logps, chosen_tokens, 0.0).tolist() == [0.5, 1.0]
    # a is per token: a response twice as long with twice the log-prob adds the same
    assert common.joint_loss(t(0.0), t(-8.0), t(4.0), 2.0).item() == pytest.approx(4.0)
    assert common.joint_loss(t(0.0), t(-16.0), t(8.0), 2.0).item() == pytest.approx(4.0)


def brute_logps(model, sequence):
    """log pi(y | x) of one unpadded sequence and its response token count, log-softmax of the model's own
    logits read position by position (a loop, no batching)."""
    logp = model(input_ids=torch.tensor([sequence["input_ids"]])).logits[0].float().log_softmax(-1)
    terms = [logp[t - 1, y] for t, y in enumerate(sequence["labels"]) if t > 0 and y != IGNORE_INDEX]
    return sum(terms), len(terms)


def test_dpo_step_with_sft_coef_is_the_hand_built_joint_step(tiny_dir, monkeypatch):
    """One train_dpo step (4 pairs, 2 micro-batches, plain SGD, no clipping) with --sft_coef a: the update is
    -lr grad of mean_i [-log sigmoid(beta h_i) - a log pi(y_w,i | x_i) / |y_w,i|], built here pair by pair."""
    _plain_sgd(monkeypatch)
    a, beta, lr = 0.7, 0.1, 0.5
    policy, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
    pool = _pref_examples(tokenizer)  # 4 pairs, one per chosen length first: the per-token mean matters
    firsts = list({common.response_tokens(e["chosen"]): i for i, e in reversed(list(enumerate(pool)))}.values())
    examples = [pool[i] for i in (firsts + [i for i in range(len(pool)) if i not in firsts])[:4]]
    assert len({common.response_tokens(e["chosen"]) for e in examples}) >= 2
    by_hand, reference = copy.deepcopy(policy), copy.deepcopy(policy).requires_grad_(False)

    dpo_terms, nll_terms = [], []
    for e in examples:
        with torch.no_grad():
            ref_c, _ = brute_logps(reference, e["chosen"])
            ref_r, _ = brute_logps(reference, e["rejected"])
        pol_c, n_c = brute_logps(by_hand, e["chosen"])
        pol_r, _ = brute_logps(by_hand, e["rejected"])
        dpo_terms.append(-torch.nn.functional.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))))
        nll_terms.append(-pol_c / n_c)
    params = dict(by_hand.named_parameters())
    dpo_grads = dict(zip(params, torch.autograd.grad(sum(dpo_terms) / len(examples), list(params.values()), retain_graph=True)))
    nll_grads = dict(zip(params, torch.autograd.grad(sum(nll_terms) / len(examples), list(params.values()))))
    start = _params(policy)
    expected = {n: start[n] - lr * (dpo_grads[n] + a * nll_grads[n]) for n in start}
    plain_dpo = {n: start[n] - lr * dpo_grads[n] for n in start}

    log = []
    cfg = _cfg(batch_size=4, grad_accum_steps=2, pref_lr=lr, beta=beta, max_grad_norm=1e9, sft_coef=a)
    common.train_dpo(policy, examples, cfg, device=CPU, dtype=torch.float32, seed=0, log=log.append)
    got = _params(policy)
    assert len(log) == 1 and log[0]["lr"] == lr
    assert _max_diff(got, expected) < 1e-6
    assert _max_diff(got, plain_dpo) > 1e-3  # the SFT term moved the weights far more than the tolerance
    assert log[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)  # the DPO loss alone (policy == reference)
    assert log[0]["nll/chosen"] == pytest.approx(sum(x.item() for x in nll_terms) / len(examples), rel=1e-6)


def test_dpo_with_sft_coef_zero_is_plain_dpo_bit_for_bit(tiny_dir, monkeypatch):
    """--sft_coef 0 (the default, or given) is plain DPO: the same weights bit for bit and no nll/chosen
    in the log; the joint term taken with a zero coefficient changes nothing either; any a > 0 does."""
    def run(overrides, joint_with_zero=False):
        policy, tokenizer = common.load_model_and_tokenizer(str(tiny_dir))
        log = []
        with monkeypatch.context() as m:
            if joint_with_zero:  # take the joint branch (a truthy sft_coef), with a = 0 in the loss itself
                original = common.joint_loss
                m.setattr(common, "joint_loss", lambda losses, chosen, tokens, coef: original(losses, chosen, tokens, 0.0))
            common.train_dpo(policy, _pref_examples(tokenizer), _cfg(grad_accum_steps=2, **overrides), device=CPU,
                             dtype=torch.float32, seed=0, log=log.append)
        return _params(policy), log

    default, default_log = run({})
    assert common.TrainConfig().sft_coef == 0.0
    for weights, log in (run({"sft_coef": 0.0}), run({"sft_coef": 1.0}, joint_with_zero=True)):
        assert all(torch.equal(default[n], weights[n]) for n in default)
        assert [r["loss/dpo"] for r in log] == [r["loss/dpo"] for r in default_log]
    assert all("nll/chosen" not in r for r in default_log) and len(default_log) == 2
    joint, joint_log = run({"sft_coef": 0.05})
    assert all("nll/chosen" in r for r in joint_log)
    assert _max_diff(joint, default) > 1e-5


def test_ppo_step_with_sft_batches_adds_sft_coef_times_the_sft_gradient(tiny_dir, monkeypatch):
    """PPO-ptx: with the clipped policy loss made zero (0 * logps, so only the SFT term moves the policy),
    one update with plain SGD is -lr a grad of the SFT token-mean NLL on the next SFT batch, which is
    computed here sequence by sequence; without SFT batches the same update leaves the policy where it was."""
    a, lr = 0.5, 0.2
    policy, tokenizer, reward_model, prompts, eos = ppo_setup(tiny_dir, 3)
    monkeypatch.setattr(common, "generate", lambda *args, **kwargs: [[5, 6, eos], [8, eos], [9, 10, 11, 12]])
    monkeypatch.setattr(common, "ppo_policy_loss",
                        lambda logps, old_logps, advantages, mask, clip=0.2: (0 * logps.sum(), torch.zeros(())))
    cfg = _cfg(ppo_minibatches=1, ppo_epochs=1, ppo_micro_batch_size=2, grad_accum_steps=2, max_grad_norm=1e9, sft_coef=a)
    sft = _sft_examples(tokenizer, n=16)[:5]  # 5 examples of different lengths: micro-batches of 3 and 2 (grad_accum 2)
    start = _params(policy)

    by_hand = copy.deepcopy(policy)
    per_example = [brute_logps(by_hand, e) for e in sft]
    nll = -sum(s for s, _ in per_example) / sum(n for _, n in per_example)  # the token mean over the whole batch
    grads = grads_of(by_hand, nll)
    expected = {n: start[n] - lr * a * grads[n] for n in start}

    stats = common.ppo_step(policy, common.frozen_copy(policy), reward_model, None, prompts, [_sgd(policy, lr)], cfg,
                            device=CPU, dtype=torch.float32, sft_batches=iter([sft]))  # one batch: a second next() would fail
    got = _params(policy)
    assert _max_diff(got, expected) < 1e-6
    assert _max_diff(got, start) > 1e-3
    assert stats["loss/sft"] == pytest.approx(nll.item(), rel=1e-6)  # logged without the coefficient

    policy, _ = common.load_model_and_tokenizer(str(tiny_dir))
    stats = common.ppo_step(policy, common.frozen_copy(policy), reward_model, None, prompts, [_sgd(policy, lr)], cfg,
                            device=CPU, dtype=torch.float32)
    assert "loss/sft" not in stats
    assert _max_diff(_params(policy), start) == 0.0  # the zeroed policy loss alone moves nothing
