"""Generation and PPO rollout alignment: invariances that hold whatever the model's weights."""
import torch

import common

CPU = torch.device("cpu")


def _sft_examples(tokenizer, n):
    rows = common.builtin_task(seed=3, n_sft=n, n_pref=1, n_test=1)["sft"]
    return common.tokenize_sft(rows, tokenizer, 512, 256)[0]


def test_batched_left_padded_greedy_equals_one_at_a_time(tiny):
    """Left padding with position ids from the mask must not change what greedy decoding produces."""
    model, tok = tiny
    torch.manual_seed(0)
    common.train_sft(model, _sft_examples(tok, 64), common.TrainConfig(sft_epochs=1, batch_size=16),
                     device=CPU, dtype=torch.float32, seed=0)  # a little training: non-trivial outputs
    prompts = [common.encode_prompt(tok, r["prompt"]) for r in common.builtin_task(seed=5, n_test=6)["test"]]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so the batch really is padded
    kwargs = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=12, device=CPU)
    batched = common.generate(model, prompts, batch_size=len(prompts), **kwargs)
    alone = [common.generate(model, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == alone


def test_generate_cuts_after_first_eos_and_keeps_it(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 3.0  # EOS likely but not certain: some responses end early, others run to the limit
    model.lm_head.bias = torch.nn.Parameter(bias)
    torch.manual_seed(0)
    prompts = [common.encode_prompt(tok, "summarize : alice found the lamp in the park . summary :")] * 32
    outs = common.generate(model, prompts, pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=6, batch_size=32,
                           device=CPU, do_sample=True)
    ended = [o for o in outs if eos in o]
    assert ended and len(ended) < len(outs)  # both kinds occur, so both branches are checked
    for out in outs:
        if eos in out:
            assert out.index(eos) == len(out) - 1  # cut after its first EOS, EOS kept
        else:
            assert len(out) == 6  # ran to max_new_tokens


def test_rollout_logps_and_values_align_with_response_tokens(tiny):
    """response_logps(t) must be log pi(y_t | x, y_<t) and response_values(t) the head on the token
    before y_t, for left-padded prompts followed by right-padded responses."""
    model, tok = tiny
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    responses = [[12, 13, tok.eos_token_id], [14, 15, 16, 17, tok.eos_token_id]]
    batch = common.rollout_batch(prompts, responses, tok.pad_token_id)
    logps = common.response_logps(model, batch)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            alone = model(torch.tensor([p + r])).logits[0].log_softmax(-1)
        expected = [alone[len(p) - 1 + t, r[t]].item() for t in range(len(r))]
        assert torch.allclose(logps[row, :len(r)], torch.tensor(expected), atol=1e-5)
        assert (logps[row, len(r):] == 0).all()  # padding contributes nothing

    class Head(torch.nn.Module):  # a "value model": the causal LM's base with a scalar head
        base_model_prefix = "model"

        def __init__(self, lm):
            super().__init__()
            self.model, self.score = lm.model, torch.nn.Linear(lm.config.hidden_size, 1)

    head = Head(model)
    values = common.response_values(head, batch)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            hidden = model.model(torch.tensor([p + r])).last_hidden_state[0]
            expected = head.score(hidden).squeeze(-1)[len(p) - 1: len(p) - 1 + len(r)]
        assert torch.allclose(values[row, :len(r)], expected, atol=1e-5)
