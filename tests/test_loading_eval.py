"""Model and tokenizer loading, reward-model scoring, evaluation, tempered log-probs, penalties and dropout.

Expected values come from brute force (one sequence at a time through the model, a hand-written greedy
loop, log_softmax by hand), hand-computed indices, or invariances (a zero penalty changes nothing).
"""
import dataclasses
import math
import statistics

import pytest
import torch

import common

CPU = torch.device("cpu")
F32 = torch.float32


def ids_of(tokenizer, text):
    """Ids of a whitespace-separated text, looked up word by word in the vocabulary."""
    return tokenizer.convert_tokens_to_ids(text.split())


def test_prompts(seed=5, n=8):
    return common.builtin_task(seed=seed, n_sft=1, n_pref=1, n_test=n)["test"]


test_prompts.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def trained_dir(tiny_dir, tmp_path_factory):
    """The tiny model after a little SFT (256 rows, 2 epochs, < 1 s), saved: its greedy outputs are
    real words of varying length, some ending in EOS, some repeating tokens (so a repetition penalty
    would change them)."""
    model, tok = common.load_model_and_tokenizer(str(tiny_dir))
    rows = common.builtin_task(seed=3, n_sft=256, n_pref=1, n_test=1)["sft"]
    examples = common.tokenize_sft(rows, tok, 512, 256)[0]
    torch.manual_seed(0)
    common.train_sft(model, examples, common.TrainConfig(sft_epochs=2, batch_size=16), device=CPU, dtype=F32, seed=0)
    path = tmp_path_factory.mktemp("trained")
    common.save_model(model, tok, path)
    return path


# ------------------------------------------------------------------------------------------------
# 2. load_model_and_tokenizer resets a checkpoint's generation defaults
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def brute_force_greedy(model, prompt, eos_id, max_new_tokens, repetition_penalty=1.0):
    """Greedy decoding one token at a time on the full sequence (no cache, no padding), stopping at EOS.
    repetition_penalty applied by hand as in CTRL / transformers (only for the control)."""
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].clone()
        if repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token == eos_id:
            break
    return out


def test_load_model_resets_generation_defaults_and_eos_list(trained_dir, tmp_path):
    model, tok = common.load_model_and_tokenizer(str(trained_dir))
    eos = tok.eos_token_id
    other = ids_of(tok, ";")[0]  # a join the trained model does produce mid-response
    model.generation_config.repetition_penalty = 1.8
    model.generation_config.do_sample = True
    model.config.eos_token_id = [eos, other]
    path = tmp_path / "bad_defaults"
    common.save_model(model, tok, path)

    reloaded, tok2 = common.load_model_and_tokenizer(str(path))
    assert reloaded.config.eos_token_id == tok2.eos_token_id == eos
    assert isinstance(reloaded.config.eos_token_id, int)
    assert reloaded.generation_config.repetition_penalty in (None, 1.0)  # unset (None in transformers 5) or 1
    assert not reloaded.generation_config.do_sample

    prompts = [common.encode_prompt(tok2, r["prompt"]) for r in test_prompts()]
    torch.manual_seed(0)
    got = common.generate(reloaded, prompts, pad_id=tok2.pad_token_id, eos_id=eos, max_new_tokens=12,
                          batch_size=len(prompts), device=CPU)
    reloaded.eval()
    expected = [brute_force_greedy(reloaded, p, eos, 12) for p in prompts]
    assert got == expected
    # the check has teeth: on these prompts the saved penalty would change greedy outputs, and the
    # other listed EOS id occurs mid-response, so stopping on it would cut responses short
    penalised = [brute_force_greedy(reloaded, p, eos, 12, repetition_penalty=1.8) for p in prompts]
    assert penalised != expected
    assert any(other in e[:-1] for e in expected)


# ------------------------------------------------------------------------------------------------
# 3. encode_prompt's BOS branch
# ------------------------------------------------------------------------------------------------


def bos_tokenizer():
    """The tiny task's word-level tokenizer plus a <bos> token that its post-processor prepends."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = common.task_vocabulary() + ["<bos>"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_encode_prompt_adds_bos_once():
    tok = bos_tokenizer()
    bos = tok.bos_token_id
    text = "summarize : alice found the car in the park . summary :"
    words = ids_of(tok, text)
    assert bos is not None and bos not in words
    assert tok(text).input_ids == [bos] + words  # the tokenizer itself adds BOS (precondition)
    assert common.encode_prompt(tok, text) == [bos] + words
    # text that already starts with the BOS string (e.g. a rendered chat template): not doubled
    assert common.encode_prompt(tok, "<bos> " + text) == [bos] + words
    assert common.encode_prompt(tok, "<bos>" + text) == [bos] + words


def test_encode_prompt_without_bos_adds_nothing():
    tok = common.build_tiny_tokenizer()
    assert tok.bos_token_id is None
    text = "summarize : alice found the car in the park . summary :"
    assert common.encode_prompt(tok, text) == ids_of(tok, text)


def test_generation_prompt_keeps_bos_when_cutting():
    tok = bos_tokenizer()
    bos = tok.bos_token_id
    text = "summarize : alice found the car in the park . summary :"  # 12 words
    words = ids_of(tok, text)

    def cfg(max_length, max_prompt_length, max_new_tokens):
        return dataclasses.replace(common.TrainConfig(), max_length=max_length, max_prompt_length=max_prompt_length,
                                   max_new_tokens=max_new_tokens)

    # room = max(16 - 8, 4) = 8 tokens, BOS counted: BOS + the last 7 words
    assert common.generation_prompt(tok, text, cfg(16, 4, 8)) == [bos] + words[-7:]
    # floor: max(16 - 14, 5) = 5 tokens: BOS + the last 4 words
    assert common.generation_prompt(tok, text, cfg(16, 5, 14)) == [bos] + words[-4:]
    # fits (13 <= max(40 - 8, 4)): whole, one BOS
    assert common.generation_prompt(tok, text, cfg(40, 4, 8)) == [bos] + words
    # without a BOS token the cut is a plain keep-the-last: max(16 - 8, 4) = 8 words
    plain = common.build_tiny_tokenizer()
    assert common.generation_prompt(plain, text, cfg(16, 4, 8)) == ids_of(plain, text)[-8:]


# ------------------------------------------------------------------------------------------------
# 4. sequence_scores: the last real token (pad == EOS, right and left padding)
# ------------------------------------------------------------------------------------------------


def test_sequence_scores_read_the_last_real_token_index_by_hand(monkeypatch):
    """sequence_scores picks, in each row, the head's output at the last position the mask keeps, for
    right and left padding: with a head whose output at column j is j, the score is that index."""
    monkeypatch.setattr(common, "score_tokens", lambda model, input_ids, attention_mask:
                        torch.arange(attention_mask.shape[1], dtype=torch.float32).expand(attention_mask.shape))
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    assert common.sequence_scores(None, torch.zeros_like(right), right).tolist() == [2, 4, 0, 3]
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]])
    assert common.sequence_scores(None, torch.zeros_like(left), left).tolist() == [4, 4, 4, 4]
    assert common.sequence_scores(None, torch.zeros_like(left), left.bool()).tolist() == [4, 4, 4, 4]


@torch.no_grad()
def alone_score(reward_model, ids):
    """The scalar head on the last token of one unpadded sequence."""
    hidden = reward_model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return reward_model.score(hidden).squeeze(-1).item()


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_scores_read_last_real_token_when_pad_is_eos(tiny_dir, side):
    tok = common.build_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    torch.manual_seed(0)
    rm = common.load_reward_model(str(tiny_dir), tok, new_head=True)
    rm.eval()
    seqs = [ids_of(tok, "summarize : alice found the car summary : alice found car") + [eos],
            ids_of(tok, "summarize : bob sold lamp summary : bob") + [eos],
            ids_of(tok, "summary : carol fixed door ; dave lost book") + [eos]]
    assert len({len(s) for s in seqs}) == 3  # every row but the longest is padded
    batch = {"input_ids": common.pad(seqs, tok.pad_token_id, side),
             "attention_mask": common.pad([[1] * len(s) for s in seqs], 0, side)}
    padding = batch["attention_mask"][1] == 0
    assert padding.sum() > 0 and (batch["input_ids"][1][padding] == eos).all()  # padding looks exactly like EOS
    with torch.no_grad():
        got = common.sequence_scores(rm, batch["input_ids"], batch["attention_mask"])
    expected = torch.tensor([alone_score(rm, s) for s in seqs])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # reading the token before the EOS (what a pad-id lookup would do) gives other numbers
    before_eos = torch.tensor([alone_score(rm, s[:-1]) for s in seqs])
    assert (got - before_eos).abs().min() > 1e-4


# ------------------------------------------------------------------------------------------------
# 4b. own_memory: loaded weights in memory torch allocated (aligned), ties kept
# ------------------------------------------------------------------------------------------------


def tensors_of(model):
    """Every parameter and buffer, tied ones listed under each of their names."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def test_loaded_models_own_aligned_memory_and_keep_tied_weights(tiny_dir, monkeypatch):
    """Why own_memory: transformers loads safetensors weights at offsets inside the file's buffer, so some
    sit at addresses torch's allocator (64-byte aligned) never gives, where some CPU kernels round
    differently. Through common.load_model (and load_reward_model) every tensor is torch-allocated and
    64-byte aligned, the output layer still shares the embedding's tensor, and no value changed."""
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    misaligned = [n for n, t in tensors_of(raw) if t.data_ptr() % 64]
    assert misaligned, "transformers' own load is aligned here: this test no longer shows why own_memory exists"
    assert raw.config.tie_word_embeddings and raw.lm_head.weight is raw.model.embed_tokens.weight

    tokenizer = common.load_tokenizer(str(tiny_dir))
    model = common.load_model(str(tiny_dir), tokenizer)
    assert [n for n, t in tensors_of(model) if t.data_ptr() % 64] == []
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: one tensor, one gradient
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(list(model.parameters())) == len(list(raw.parameters()))
    raw_state, state = raw.state_dict(), model.state_dict()
    assert raw_state.keys() == state.keys() and all(torch.equal(raw_state[k], state[k]) for k in state)
    # no tensor of the loaded model shares memory with the transformers load's storage
    raw_pointers = {t.data_ptr() for _, t in tensors_of(raw)}
    assert not raw_pointers & {t.data_ptr() for _, t in tensors_of(model)}

    # own_memory itself, on the raw load: aligned now, same values, the tie kept (a training step moves both)
    before = {k: v.clone() for k, v in raw.state_dict().items()}
    assert common.own_memory(raw) is raw
    assert [n for n, t in tensors_of(raw) if t.data_ptr() % 64] == []
    assert all(torch.equal(before[k], v) for k, v in raw.state_dict().items())
    with torch.no_grad():
        raw.model.embed_tokens.weight[3, 0] += 1.0
    assert raw.lm_head.weight[3, 0] == before["lm_head.weight"][3, 0] + 1.0

    reward_model = common.load_reward_model(str(tiny_dir), tokenizer, new_head=True)
    assert [n for n, t in tensors_of(reward_model) if t.data_ptr() % 64] == []

    # control: the same load_model with own_memory a no-op leaves loaded tensors misaligned
    monkeypatch.setattr(common, "own_memory", lambda model: model)
    assert [n for n, t in tensors_of(common.load_model(str(tiny_dir), tokenizer)) if t.data_ptr() % 64]


# ------------------------------------------------------------------------------------------------
# 5. load_reward_model refuses another vocabulary
# ------------------------------------------------------------------------------------------------


def test_load_reward_model_refuses_other_vocabulary(tiny_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, tok = common.load_model_and_tokenizer(str(tiny_dir))
    words = common.task_vocabulary()
    words[5], words[6] = words[6], words[5]  # same size, same words, two ids swapped
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    assert len(other) == len(tok) and other.get_vocab() != tok.get_vocab()
    path = tmp_path / "other_vocab"
    common.save_model(model, other, path)
    with pytest.raises(common.ConfigError) as info:
        common.load_reward_model(str(path), tok)
    assert str(path) in str(info.value)
    # the same folder is accepted by a policy that shares its tokenizer
    assert hasattr(common.load_reward_model(str(path), other, new_head=True), "score")


# ------------------------------------------------------------------------------------------------
# 6. preference_scorer: a reward model scores the generated ids themselves; the built-in task's gold reward
# ------------------------------------------------------------------------------------------------


def test_preference_scorer_with_a_reward_model_scores_generated_ids(tiny_dir):
    tok = common.build_tiny_tokenizer()
    eos = tok.eos_token_id
    torch.manual_seed(0)
    rm = common.load_reward_model(str(tiny_dir), tok, new_head=True)
    prompt_ids = [ids_of(tok, "summarize : alice found the car summary :"),
                  ids_of(tok, "summarize : bob sold the lamp in the market . summary :"),
                  ids_of(tok, "summary :")]
    response_ids = [ids_of(tok, "alice found car") + [eos],
                    ids_of(tok, "bob sold lamp and"),  # cut at max_new_tokens: no EOS
                    ids_of(tok, "carol") + [eos]]
    cfg = dataclasses.replace(common.TrainConfig(), eval_batch_size=2)  # batches of 2 and 1: padding in the first
    score, name = common.preference_scorer(False, rm, True, tok, cfg, CPU, F32)
    assert name == "--reward_model score"
    got = score(["p"] * 3, ["r"] * 3, prompt_ids, response_ids)  # the texts are not read: the ids are scored
    assert len(got) == 3 and all(isinstance(v, float) for v in got)
    # one unpadded sequence at a time, the head read at its last token by hand
    assert got == pytest.approx([alone_score(rm, p + r) for p, r in zip(prompt_ids, response_ids)], abs=1e-5)
    # the unfinished response is scored as it is, not with an EOS appended
    with_eos = alone_score(rm, prompt_ids[1] + response_ids[1] + [eos])
    assert abs(got[1] - with_eos) > 1e-4
    assert not rm.training  # scored in eval mode

    # the reward model PPO optimised: the same scores, a name that says it is not an independent judge
    score_ppo, name_ppo = common.preference_scorer(False, rm, False, tok, cfg, CPU, F32)
    assert "not independent" in name_ppo
    assert score_ppo(["p"] * 3, ["r"] * 3, prompt_ids, response_ids) == got
    # real data without a reward model: nothing to score with
    none, why = common.preference_scorer(False, None, True, tok, cfg, CPU, F32)
    assert none is None and "--reward_model" in why


def test_preference_scorer_on_the_builtin_task_is_the_gold_reward():
    tok = common.build_tiny_tokenizer()
    score, name = common.preference_scorer(True, None, True, tok, common.TrainConfig(), CPU, F32)
    assert name == "gold reward"
    prompt = "summarize : alice found the car in the park . bob sold the lamp in the market . summary :"
    # by hand (test_losses.test_gold_reward_by_hand): the reference 1.0, fully styled 1.5, one fact 0.5
    responses = ["alice found car ; bob sold lamp", "alice found car and bob sold lamp", "alice found car"]
    assert score([prompt] * 3, responses) == pytest.approx([1.0, 1.5, 0.5])
    assert score([prompt] * 3, responses, [[1]] * 3, [[2]] * 3) == pytest.approx([1.0, 1.5, 0.5])  # ids are not read


# ------------------------------------------------------------------------------------------------
# 7. evaluate
# ------------------------------------------------------------------------------------------------


def test_evaluate_metrics_by_hand(trained_dir):
    model, tok = common.load_model_and_tokenizer(str(trained_dir))
    eos = tok.eos_token_id
    rows = [{"prompt": r["prompt"], "reference": r["completion"]} for r in test_prompts(seed=5, n=8)]
    cfg = dataclasses.replace(common.TrainConfig(), max_new_tokens=8, eval_batch_size=4)
    gold_scorer, _ = common.preference_scorer(True, None, True, tok, cfg, CPU, F32)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    metrics, outputs = common.evaluate(model, tok, rows, cfg, device=CPU, dtype=F32, score_fn=gold_scorer)
    assert torch.equal(torch.get_rng_state(), rng_before)  # evaluation's sampling leaves training's generator alone
    responses = outputs["responses"]
    assert len(responses) == len(rows)

    # the generated ids, by hand (prompts fit, so generation_prompt is the whole prompt)
    prompts = [common.encode_prompt(tok, r["prompt"]) for r in rows]
    ids = common.generate(model, prompts, pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=8, batch_size=4, device=CPU)
    assert responses == [tok.decode(i, skip_special_tokens=True) for i in ids]
    ended = [i for i in ids if i[-1:] == [eos]]
    assert ended and len(ended) < len(ids)  # some end in EOS, some run to the limit: the EOS rule matters
    assert metrics["length"] == pytest.approx(sum(len(i) - (i[-1:] == [eos]) for i in ids) / len(ids))
    assert metrics["length"] != pytest.approx(sum(map(len, ids)) / len(ids))

    rouge = [common.rouge_l_f1(y, r["reference"]) for y, r in zip(responses, rows)]
    assert len(set(rouge)) > 1 and max(rouge) > 0  # varied, non-zero: a misalignment would show
    assert metrics["rougeL"] == pytest.approx(sum(rouge) / len(rows), abs=1e-12)

    gold = [common.gold_reward(r["prompt"], y) for r, y in zip(rows, responses)]
    assert outputs["scores"] == gold
    assert metrics["reward"] == pytest.approx(sum(gold) / len(rows), abs=1e-12)
    assert "win_rate" not in metrics
    checked = [common.instruction_score(r["prompt"], y) for r, y in zip(rows, responses)]
    assert 0 < checked.count(None) < len(rows)  # plain and list prompts both: the mean is over the list prompts only
    assert metrics["instruction"] == pytest.approx(sum(c for c in checked if c is not None) / (len(rows) - checked.count(None)))

    # the sampled metrics: --eval_samples (4) responses per prompt at temperature 1 from a generator seeded by --seed
    torch.manual_seed(cfg.seed)
    sampled_ids = common.generate(model, [p for p in prompts for _ in range(4)], pad_id=tok.pad_token_id, eos_id=eos,
                                  max_new_tokens=8, batch_size=4, device=CPU, do_sample=True)
    samples = [tok.decode(i, skip_special_tokens=True) for i in sampled_ids]
    sample_rows = [r for r in rows for _ in range(4)]
    assert len(set(samples)) > len(set(responses))  # sampling, not four greedy copies
    assert metrics["reward_sampled"] == pytest.approx(statistics.mean(common.gold_reward(r["prompt"], y) for r, y in zip(sample_rows, samples)))
    scored = [common.instruction_score(r["prompt"], y) for r, y in zip(sample_rows, samples)]
    assert metrics["instruction_sampled"] == pytest.approx(statistics.mean(c for c in scored if c is not None))
    greedy_only, _ = common.evaluate(model, tok, rows, dataclasses.replace(cfg, eval_samples=0), device=CPU, dtype=F32, score_fn=gold_scorer)
    assert greedy_only == {k: v for k, v in metrics.items() if not k.endswith("_sampled")}
    plain_rows = [r for r in rows if not r["prompt"].endswith(common.LIST)]  # no prompt asks for a list: no instruction score
    plain, _ = common.evaluate(model, tok, plain_rows, cfg, device=CPU, dtype=F32, score_fn=gold_scorer)
    assert plain_rows and "instruction" not in plain and "instruction_sampled" not in plain and "reward_sampled" in plain

    again, _ = common.evaluate(model, tok, rows, cfg, device=CPU, dtype=F32, score_fn=gold_scorer, against=outputs)
    assert again["win_rate"] == 0.5
    assert {k: again[k] for k in metrics} == metrics


# ------------------------------------------------------------------------------------------------
# 8. response_logps under a sampling temperature
# ------------------------------------------------------------------------------------------------


def test_response_logps_with_temperature_brute_force(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    responses = [[12, 13, eos], [14, 15, 16, 17, eos]]
    batch = common.rollout_batch(prompts, responses, tok.pad_token_id)
    T = 0.7
    with torch.no_grad():
        tempered = common.response_logps(model, batch, temperature=T)
        plain = common.response_logps(model, batch)
        at_one = common.response_logps(model, batch, temperature=1.0)
    assert torch.equal(at_one, plain)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].double()
        for temp, got in ((T, tempered), (1.0, plain)):
            logps = (logits / temp).log_softmax(-1)
            expected = torch.tensor([logps[len(p) - 1 + t, r[t]].item() for t in range(len(r))], dtype=F32)
            torch.testing.assert_close(got[row, :len(r)], expected, atol=1e-5, rtol=1e-5)
        assert (tempered[row, len(r):] == 0).all()
    assert (tempered - plain).abs().max() > 1e-3  # the temperature really changes them


# ------------------------------------------------------------------------------------------------
# 9. a penalty without grad (all weights zero) in train_epochs
# ------------------------------------------------------------------------------------------------


def _train(tiny_dir, examples, penalty_factory=None):
    model, _ = common.load_model_and_tokenizer(str(tiny_dir))
    cfg = common.TrainConfig(sft_epochs=1, batch_size=8, warmup_steps=1)
    records = []
    penalty = penalty_factory(model) if penalty_factory else None
    common.train_sft(model, examples, cfg, device=CPU, dtype=F32, seed=0, log=records.append, penalty=penalty)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, records


def test_zero_penalty_without_grad_changes_nothing(tiny_dir):
    tok = common.build_tiny_tokenizer()
    rows = common.builtin_task(seed=7, n_sft=24, n_pref=1, n_test=1)["sft"]
    examples = common.tokenize_sft(rows, tok, 512, 256)[0]

    plain, plain_log = _train(tiny_dir, examples)
    const, const_log = _train(tiny_dir, examples, lambda m: (lambda: torch.zeros(())))
    hbat, hbat_log = _train(tiny_dir, examples, lambda m: (
        lambda anchor=common.snapshot(common.trainable(m)):
            common.hbat_penalty(common.trainable(m), {n: 0.0 for n in anchor}, anchor)))
    assert len(plain_log) == 3  # 24 rows / 8
    for other in (const, hbat):
        assert all(torch.equal(plain[n], other[n]) for n in plain)
    for log in (const_log, hbat_log):
        assert [r["loss/ewc"] for r in log] == [0.0] * 3
        assert [r["loss/sft"] for r in log] == [r["loss/sft"] for r in plain_log]
    assert "loss/ewc" not in plain_log[0]

    # control: a penalty that does have a gradient changes the weights (so equality above means something)
    pulled, _ = _train(tiny_dir, examples, lambda m: (lambda: 10.0 * m.model.norm.weight.sum()))
    assert not torch.equal(pulled["model.norm.weight"], plain["model.norm.weight"])


def test_hbat_penalty_all_zero_weights_is_a_zero_tensor(tiny):
    model, _ = tiny
    params = common.trainable(model)
    anchor = common.snapshot(params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    value = common.hbat_penalty(params, {n: 0.0 for n in anchor}, anchor)
    assert torch.is_tensor(value) and value.dim() == 0 and value.item() == 0.0
    assert not value.requires_grad
    # one non-zero weight: a real, differentiable penalty (M * w * sum of squared drift)
    name = "model.norm.weight"
    value = common.hbat_penalty(params, {n: (0.5 if n == name else 0.0) for n in anchor}, anchor)
    assert value.requires_grad
    assert value.item() == pytest.approx(100 * 0.5 * anchor[name].numel(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# 10. disable_dropout
# ------------------------------------------------------------------------------------------------


def test_disable_dropout_zeroes_modules_and_attention_dropout():
    from transformers import AutoModelForCausalLM

    tok = common.build_tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(common.tiny_config(tok, attention_dropout=0.3))
    model.model.extra_dropout = torch.nn.Dropout(0.4)  # an nn.Dropout module too (Llama has none)
    attention = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert len(attention) == model.config.num_hidden_layers and all(m.attention_dropout == 0.3 for m in attention)
    x = torch.tensor([ids_of(tok, "summarize : alice found the car in the park . summary : alice found car")])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x).logits, model(x).logits)  # precondition: dropout is live

    common.disable_dropout(model)
    assert model.model.extra_dropout.p == 0.0
    assert all(m.attention_dropout == 0.0 for m in attention)
    assert model.config.attention_dropout == 0.0
    assert model.training
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)


def test_tiny_warm_start_is_a_seeded_sft_on_held_out_rows_outside_the_random_stream():
    """`tiny` = `tiny-random` + SFT on WARM_START_ROWS held-out rows: none of them shares a prompt with the
    run's test rows; the global random stream after loading is the same with and without the warm start
    (so every later draw of a run is too); a second load (hbat --compare) gives the same weights; and the
    warm start learned the task: its SFT loss on the test references is far below the random model's."""
    avoid = {r["prompt"] for r in common.builtin_task(3, 0, 0, n_test=1000)["test"]}
    held_out = common.builtin_task(3 + 1000, common.WARM_START_ROWS, 0, 0, avoid=avoid)["sft"]
    assert len(held_out) == common.WARM_START_ROWS and not avoid & {r["prompt"] for r in held_out}

    common.set_seed(3)
    random_model, tokenizer = common.load_model_and_tokenizer("tiny-random", seed=3)
    after_random = torch.get_rng_state()
    common._warm_started.pop(3, None)
    warm, _ = common.load_model_and_tokenizer("tiny", seed=3)
    assert torch.equal(torch.get_rng_state(), after_random)
    again, _ = common.load_model_and_tokenizer("tiny", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(warm.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(warm.model.embed_tokens.weight, random_model.model.embed_tokens.weight)

    test = common.builtin_task(3, 0, 0, n_test=16)["test"]
    examples, _ = common.tokenize_sft(test, tokenizer, 512, 256)
    batch = common.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        losses = [-common.token_logps(m, batch)[0].sum().item() / sum(map(common.response_tokens, examples))
                  for m in (random_model, warm)]
    uniform = math.log(len(tokenizer))  # the loss of a uniform guess
    # random: a guess; warm: under 0.3 of it (0.26 measured; the previous task's shorter references reached under 0.25)
    assert losses[0] > 0.85 * uniform and losses[1] < 0.3 * uniform, (losses, uniform)
