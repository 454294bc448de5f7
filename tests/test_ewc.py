"""Fisher / EWC / HBAT importance math in common.py, checked against brute force or by-hand values."""
import math
import statistics

import pytest
import torch

import common as C


# ============================================================================================
# 1. empirical Fisher
# ============================================================================================


@pytest.fixture(scope="module")
def small_model_and_examples():
    from transformers import AutoModelForCausalLM

    tokenizer = C.build_tiny_tokenizer()
    torch.manual_seed(0)
    config = C.tiny_config(tokenizer, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).float()
    C.disable_dropout(model)
    rows = C.builtin_task(seed=0, n_sft=30, n_pref=2, n_test=2)["sft"]
    examples, counts = C.tokenize_sft(rows, tokenizer, max_length=512, max_prompt_length=256)
    assert (counts["prompt_cut"], counts["response_cut"], counts["skipped"]) == (0, 0, 0)
    # four examples of different lengths (so a padded batch would differ from one-at-a-time)
    picked = []
    for e in examples:
        if all(len(e["input_ids"]) != len(p["input_ids"]) for p in picked):
            picked.append(e)
        if len(picked) == 4:
            break
    assert len(picked) == 4, "could not find 4 examples of different lengths"
    return model, picked


def per_sample_grads(model, examples):
    """Gradient of each sample's summed response log-prob, one sample at a time, no padding,
    log-softmax written out by hand."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    grads = []
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        labels = torch.tensor(e["labels"])
        logits = model(input_ids=ids).logits[0].float()  # (T, V)
        logp = logits.log_softmax(-1)
        total = 0.0
        for t in range(1, len(labels)):
            if labels[t] != C.IGNORE_INDEX:
                total = total + logp[t - 1, labels[t]]
        g = torch.autograd.grad(total, params, allow_unused=True)
        grads.append({n: (torch.zeros_like(p) if gi is None else gi.detach()) for n, p, gi in zip(names, params, g)})
    return grads


def test_empirical_fisher_is_mean_of_per_sample_squared_gradients(small_model_and_examples):
    model, examples = small_model_and_examples
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) == 4  # padding would matter if the implementation batched them

    fisher = C.empirical_fisher(model, examples, device=torch.device("cpu"))
    grads = per_sample_grads(model, examples)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(fisher) == set(names)
    expected = {n: sum(g[n] ** 2 for g in grads) / len(grads) for n in names}
    for n in names:
        assert fisher[n].dtype == torch.float32
        assert fisher[n].shape == expected[n].shape
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-12, msg=lambda m: f"{n}: {m}")
    # the Fisher is not all zero (the check above would then be vacuous)
    assert sum(f.abs().sum().item() for f in fisher.values()) > 0

    # ... and it is not the square of the batch-mean gradient: that is smaller (Jensen) and far off
    squared_mean = {n: (sum(g[n] for g in grads) / len(grads)) ** 2 for n in names}
    total_fisher = sum(fisher[n].sum().item() for n in names)
    total_squared_mean = sum(squared_mean[n].sum().item() for n in names)
    assert total_squared_mean < 0.9 * total_fisher
    for n in names:
        assert (fisher[n] >= squared_mean[n] * (1 - 1e-4) - 1e-12).all(), n

    # gradients are cleared afterwards: the Fisher pass must not leak into the next optimizer step
    assert all(p.grad is None for p in model.parameters())


def test_empirical_fisher_skips_frozen_parameters(small_model_and_examples):
    model, examples = small_model_and_examples
    frozen = "model.embed_tokens.weight"
    param = dict(model.named_parameters())[frozen]
    param.requires_grad_(False)
    try:
        fisher = C.empirical_fisher(model, examples[:2], device=torch.device("cpu"))
    finally:
        param.requires_grad_(True)
    assert frozen not in fisher
    assert len(fisher) == len(list(model.parameters())) - 1


# ============================================================================================
# 2. textbook EWC penalty
# ============================================================================================


def test_ewc_penalty_value_and_gradient_on_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    params = dict(layer.named_parameters())
    anchor = C.snapshot(params)
    fisher = {"weight": torch.tensor([[1.0, 0.5], [2.0, 0.0]]), "bias": torch.tensor([4.0, 1.0])}
    lam = 3.0

    # 0 at the anchor, with zero gradient
    at_anchor = C.ewc_penalty(params, fisher, anchor, lam)
    assert at_anchor.item() == 0.0
    at_anchor.backward()
    assert all(float(p.grad.abs().sum()) == 0.0 for p in layer.parameters())
    layer.zero_grad(set_to_none=True)

    with torch.no_grad():
        layer.weight += torch.tensor([[1.0, -2.0], [0.5, 3.0]])
        layer.bias += torch.tensor([-1.0, 0.25])
    # by hand: (lam/2) * sum F d^2
    #   weight: 1*1 + 0.5*4 + 2*0.25 + 0*9 = 3.5 ; bias: 4*1 + 1*0.0625 = 4.0625 ; total 7.5625
    value = C.ewc_penalty(params, fisher, anchor, lam)
    assert value.item() == pytest.approx(0.5 * 3.0 * 7.5625, rel=1e-6)

    value.backward()
    for name, p in layer.named_parameters():
        expected = lam * fisher[name] * (p.detach() - anchor[name])
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=0.0)


def test_ewc_penalty_anchor_is_a_detached_copy():
    layer = torch.nn.Linear(3, 1)
    params = dict(layer.named_parameters())
    anchor = C.snapshot(params)
    assert all(not a.requires_grad for a in anchor.values())
    assert all(a.data_ptr() != params[n].data_ptr() for n, a in anchor.items())  # a copy, not a view
    with torch.no_grad():
        layer.weight += 1.0  # moving the model must not move the anchor
    fisher = {n: torch.ones_like(a) for n, a in anchor.items()}
    assert C.ewc_penalty(params, fisher, anchor, lam=2.0).item() == pytest.approx(3.0, rel=1e-6)  # 0.5*2*3*1


# ============================================================================================
# 3. HBAT importance and penalty
# ============================================================================================


def test_drift_importance_by_hand():
    before = {"a": torch.tensor([0.5, -0.25]), "b": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    after = {"a": torch.tensor([0.75, -0.5]),  # drift 0.25, -0.25
             "b": torch.tensor([[1.0, 2.5], [3.0, 2.0]])}  # drift 0, 0.5, 0, -2
    # s = 1: mean of squared drifts
    assert C.drift_importance(before["a"], after["a"], mse_factor=1.0) == pytest.approx((0.0625 + 0.0625) / 2, rel=1e-12)
    assert C.drift_importance(before["b"], after["b"], mse_factor=1.0) == pytest.approx((0.0 + 0.25 + 0.0 + 4.0) / 4, rel=1e-12)
    # s = 1e10: scaled by s^2 = 1e20 (no float32 overflow, no loss of precision)
    raw = {n: C.drift_importance(before[n], after[n]) for n in before}  # default s = 1e10
    assert raw["a"] == pytest.approx(0.0625 * 1e20, rel=1e-12)
    assert raw["b"] == pytest.approx(1.0625 * 1e20, rel=1e-12)
    assert all(type(v) is float for v in raw.values())
    # the direction does not matter (a square), nor the order of the arguments
    assert C.drift_importance(after["b"], before["b"], mse_factor=1.0) == pytest.approx(1.0625, rel=1e-12)


def test_drift_importance_small_float32_drift_at_default_scale():
    # a realistic drift on float32 weights: the difference is taken before scaling and in float64
    before = torch.full((4,), 0.1, dtype=torch.float32)
    after = before + torch.tensor([1e-3, -1e-3, 2e-3, 0.0])
    d = [float(a) - float(b) for a, b in zip(after.tolist(), before.tolist())]  # exact float64 differences
    expected = math.fsum((x * 1e10) ** 2 for x in d) / 4
    raw = C.drift_importance(before, after)
    assert raw == pytest.approx(expected, rel=1e-12)
    assert math.isfinite(raw) and raw == pytest.approx(1.5e14, rel=1e-3)
    # in float32 the scaled squares (~1e14) would keep only ~7 digits; the float64 result keeps them all
    assert C.drift_importance(before, before.clone()) == 0.0
    # a bf16 tensor works too (the difference is formed in float64)
    b16, a16 = before.bfloat16().tolist(), after.bfloat16().tolist()
    assert C.drift_importance(before.bfloat16(), after.bfloat16(), mse_factor=1.0) == pytest.approx(
        statistics.fmean((a - b) ** 2 for a, b in zip(a16, b16)), rel=1e-12)


def drift(before: dict, after: dict, s: float = 1e10) -> dict:
    """Per-tensor raw importance, as hbat.record_drift builds it from C.drift_importance."""
    return {n: C.drift_importance(before[n], after[n], s) for n in before}


def test_softmax_importance_by_hand():
    raw = {"a": 0.0, "b": 1.0, "c": 2.0, "d": -1.5}
    w = C.softmax_importance(raw)
    assert list(w) == list(raw)
    z = sum(math.exp(v) for v in raw.values())
    for n, v in raw.items():
        assert w[n] == pytest.approx(math.exp(v) / z, rel=1e-12)
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    # shift invariance, and no overflow with huge raw scores
    w_big = C.softmax_importance({n: v + 1e6 for n, v in raw.items()})
    for n in raw:
        assert w_big[n] == pytest.approx(w[n], rel=1e-9)


def test_softmax_importance_is_one_hot_at_default_scale():
    torch.manual_seed(0)
    before = {f"t{i}": torch.randn(8, 8) for i in range(5)}
    sizes = [1.0e-3, 1.3e-3, 0.7e-3, 2.0e-3, 1.1e-3]  # realistic drifts of different sizes per tensor
    after = {n: before[n] + s * torch.randn(8, 8).sign() for n, s in zip(before, sizes)}
    w = C.softmax_importance(drift(before, after))  # default s = 1e10
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert w["t3"] == 1.0
    assert all(w[n] == 0.0 for n in w if n != "t3")
    # with s = 1 the same drifts give (nearly) uniform weights: s is a temperature
    w1 = C.softmax_importance(drift(before, after, 1.0))
    assert all(w1[n] == pytest.approx(0.2, rel=1e-4) for n in w1)


def test_accumulate_importance_adds_raw_scores():
    first = {"a": 1.5, "b": 2.0}
    second = {"a": 0.25, "b": 10.0}
    acc = C.accumulate_importance(None, first)
    assert acc == first
    assert acc is not first  # a copy: later updates must not change the caller's dict
    acc = C.accumulate_importance(acc, second)
    assert acc == {"a": 1.75, "b": 12.0}
    assert first == {"a": 1.5, "b": 2.0} and second == {"a": 0.25, "b": 10.0}  # inputs untouched
    # huge raw scores (s = 1e10) add without loss
    big = C.accumulate_importance(C.accumulate_importance(None, {"a": 1e20}), {"a": 3e20})
    assert big["a"] == pytest.approx(4e20, rel=1e-15)


class TwoTensors(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.b = torch.nn.Parameter(torch.tensor([[0.5, 0.0, 1.0]]))


def test_hbat_penalty_by_hand():
    model = TwoTensors()
    params = C.trainable(model)
    anchor = C.snapshot(params)
    weights = {"a": 0.25, "b": 0.75}

    at_anchor = C.hbat_penalty(params, weights, anchor, lam=2.0, max_weight=100.0)
    assert at_anchor.item() == 0.0

    with torch.no_grad():
        model.a += torch.tensor([1.0, -0.5])  # d_a = (1, -0.5)
        model.b += torch.tensor([[2.0, 0.0, -1.0]])  # d_b = (2, 0, -1)
    # M * sum_n w_n * sum_j (lam * d)^2 with lam = 2, M = 100:
    #   a: 0.25 * 4 * (1 + 0.25) = 1.25 ;  b: 0.75 * 4 * (4 + 0 + 1) = 15 ;  total 100 * 16.25 = 1625
    value = C.hbat_penalty(params, weights, anchor, lam=2.0, max_weight=100.0)
    assert value.item() == pytest.approx(1625.0, rel=1e-6)
    value.backward()
    # gradient: M * w_n * 2 * lam^2 * d
    torch.testing.assert_close(model.a.grad, 100 * 0.25 * 2 * 4 * torch.tensor([1.0, -0.5]))
    torch.testing.assert_close(model.b.grad, 100 * 0.75 * 2 * 4 * torch.tensor([[2.0, 0.0, -1.0]]))

    # defaults lam = 1, M = 100
    assert C.hbat_penalty(params, weights, anchor).item() == pytest.approx(100 * (0.25 * 1.25 + 0.75 * 5), rel=1e-6)


def test_hbat_penalty_skips_zero_weight_tensors():
    model = TwoTensors()
    params = C.trainable(model)
    anchor = C.snapshot(params)
    with torch.no_grad():
        model.a += torch.tensor([3.0, 1.0])
        model.b += torch.tensor([[1.0, 1.0, 1.0]])
    value = C.hbat_penalty(params, {"a": 0.0, "b": 1.0}, anchor, lam=1.0, max_weight=10.0)
    assert value.item() == pytest.approx(10 * 3.0, rel=1e-6)  # only b: 10 * 1 * (1+1+1)
    value.backward()
    assert model.a.grad is None  # a was skipped, not multiplied by 0
    assert model.b.grad is not None

    # skipping changes nothing: a zero-weight tensor is skipped even when its drift is not finite
    with torch.no_grad():
        model.a.fill_(float("inf"))
    value = C.hbat_penalty(params, {"a": 0.0, "b": 1.0}, anchor, lam=1.0, max_weight=10.0)
    assert value.item() == pytest.approx(30.0, rel=1e-6)

    # all weights zero: a 0-dim zero tensor, not a Python int
    none = C.hbat_penalty(params, {"a": 0.0, "b": 0.0}, anchor)
    assert torch.is_tensor(none) and none.dim() == 0 and none.item() == 0.0
    assert none.device.type == "cpu" and not none.requires_grad  # nothing to backward through


def test_hbat_penalty_with_one_hot_weights_from_realistic_drift():
    # end to end: drift -> importance -> softmax (one-hot) -> penalty on the most-drifted tensor only
    model = TwoTensors()
    params = C.trainable(model)
    start = C.snapshot(params)
    with torch.no_grad():
        model.a += 1e-3
        model.b += 2e-3  # b drifted more
    w = C.softmax_importance(C.accumulate_importance(None, drift(start, C.snapshot(params))))
    assert w == {"a": 0.0, "b": 1.0}
    anchor = C.snapshot(params)
    with torch.no_grad():
        model.a += 1.0
        model.b += 1.0
    assert C.hbat_penalty(params, w, anchor).item() == pytest.approx(100 * 3.0, rel=1e-5)


def test_sum_importance_and_weight_spread_by_hand():
    w = C.sum_importance({"a": 1e20, "b": 3e20, "c": 0.0})
    assert w == pytest.approx({"a": 0.25, "b": 0.75, "c": 0.0})
    assert C.sum_importance({"a": 2.0, "b": 6.0}) == pytest.approx({"a": 0.25, "b": 0.75})  # any scale s: the same weights
    assert C.sum_importance({"a": 0.0, "b": 0.0}) == {"a": 0.5, "b": 0.5}  # nothing moved: uniform
    entropy, top = C.weight_spread(w)
    assert entropy == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) and top == 0.75
    assert C.weight_spread({"a": 1.0, "b": 0.0}) == (0.0, 1.0)
    assert C.weight_spread({n: 0.25 for n in "abcd"}) == (pytest.approx(math.log(4)), 0.25)


def test_penalties_read_exactly_the_tensors_handed_in():
    """The pure penalties sum over the dict they are given (the caller picks this rank's part with
    my_part): a tensor left out adds nothing and gets no gradient, even where fisher, anchor or weights
    name it. With one process my_part is the whole dict, the same tensors."""
    model = TwoTensors()
    params = C.trainable(model)
    anchor = C.snapshot(params)
    with torch.no_grad():
        model.a += torch.tensor([1.0, 2.0])  # d_a = (1, 2)
        model.b += torch.tensor([[1.0, -1.0, 0.5]])  # d_b = (1, -1, 0.5)
    fisher = {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([[1.0, 3.0, 4.0]])}
    only_b = {"b": params["b"]}
    # EWC on b alone: 0.5 * lam * (1*1 + 3*1 + 4*0.25) = 0.5 * 2 * 5 = 5; both: + 0.5 * 2 * (2*1 + 1*4) = + 6
    assert C.ewc_penalty(only_b, fisher, anchor, lam=2.0).item() == pytest.approx(5.0, rel=1e-6)
    assert C.ewc_penalty(params, fisher, anchor, lam=2.0).item() == pytest.approx(11.0, rel=1e-6)
    # HBAT on b alone: M * w_b * (1 + 1 + 0.25) = 10 * 0.5 * 2.25 = 11.25, though w_a is not zero
    value = C.hbat_penalty(only_b, {"a": 0.5, "b": 0.5}, anchor, lam=1.0, max_weight=10.0)
    assert value.item() == pytest.approx(11.25, rel=1e-6)
    value.backward()
    assert model.a.grad is None and model.b.grad is not None
    assert C.ewc_penalty({}, fisher, anchor, lam=2.0).item() == 0.0

    mine = C.my_part(params)
    assert list(mine) == list(params) and all(mine[n] is params[n] for n in params)
    assert all(C.whole(p) is p for p in params.values())
