"""LD-Align, Latent Distance Guided Alignment (arXiv 2404.06390): annotation-free alignment to an SFT data set.

Self-play as in SPIN: the gold SFT response is the chosen answer, the policy's own sample the rejected one.
A guiding auto-encoder, trained on both, maps each (prompt, response) to a latent vector; the farther the
sample's latent lies from the gold one, the more that pair weighs in the DPO-style loss. For t = 1..T:

    sample     y_gen ~ pi_{t-1}(. | x)                               one per training prompt
    guide      L_rec = -(1/N) sum_(i,t) log p_dec(y_it | phi(x_i, y_i), y_i<t)  token mean over a batch of gold and generated y
               (the paper's decoder also reads x: --guide_reads_prompt; then the latent need only carry
               what x does not tell, and its distance stops measuring wrong facts: README)
    distance   d_i = || phi(x_i, y_gold_i) - phi(x_i, y_gen_i) ||_2
    weights    w_i = clip(d_i / mean_j d_j, 0, w_max)                (--weighting uniform: w_i = 1, SPIN)
    policy     L = (1/n) sum_i -w_i log sigmoid(beta * [(log pi(y_gold|x) - log pi_{t-1}(y_gold|x))
                                                       - (log pi(y_gen|x)  - log pi_{t-1}(y_gen|x))])

with pi_{t-1} (the policy at the start of the iteration) frozen as the reference. The paper's full text was not
available: the guide, the distance, the weights and the schedule are our decisions (README, "LD-Align"), each a flag.

    python ld_align.py                  # built-in task, tiny model: SFT, then 3 LD-Align iterations (CPU, ~65 s)
    python ld_align.py --compare        # and the uniform-weight ablation (SPIN) from the same SFT model [--task drift: README]
    python ld_align.py --model DIR --sft_data FILE --pref_lr 5e-7   # real data: --model is already SFT'd
    torchrun --nproc_per_node N ld_align.py ...                      # N processes: DDP, or --fsdp to shard the models
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common as C


@dataclass
class Config(C.TrainConfig):
    """LD-Align: self-play DPO weighted by a guiding auto-encoder's latent distance. Shared settings: common.TrainConfig
    (--pref_lr, --pref_epochs, --beta: the DPO step of each iteration)."""
    iterations: int = 3  # self-play iterations T (sample, train the guide, weighted DPO against the previous iterate) [1, inf)
    weighting: str = "latent"  # pair weights: latent (w = d / mean d, clipped: LD-Align) or uniform (w = 1: SPIN) {latent, uniform}
    pref_lr: float = 5e-5  # DPO learning rate in every iteration (tiny model; the baseline's 2e-4 makes self-play drift) (0, inf)
    w_max: float = 5.0  # latent weights are clipped to [0, w_max] (0, inf)
    latent_dim: int = 64  # size of the guiding model's latent phi(x, y) [1, inf)
    guide: str = "policy"  # guiding model: policy (built from the starting policy: PolicyGuide) or scratch (a small transformer auto-encoder) {policy, scratch}
    guide_dim: int = 64  # --guide scratch: width of encoder and decoder [1, inf)
    guide_layers: int = 2  # --guide scratch: transformer layers in the encoder, and in the decoder [1, inf)
    guide_heads: int = 4  # --guide scratch: attention heads [1, inf)
    guide_epochs: int = 1  # guide passes per iteration over that iteration's gold and generated responses [1, inf)
    guide_lr: float = 1e-3  # guide learning rate (one AdamW, kept across iterations; ~1e-4 for a real model's policy guide) (0, inf)
    guide_reads_prompt: bool = False  # decoder p(y | z): y rebuilt from the latent alone, which must carry what y says (README); True: p(y | x, z), the paper's
    diagnostic_pairs: int = 256  # pairs per iteration whose own gradients show what the weights do (rho_*, cos_*: README); 0: off [0, inf)
    keep_identical: bool = False  # keep pairs whose sample equals the gold response (zero gradient; they only dilute the batch mean)
    task: str = "default"  # built-in task: default, or drift: SFT on drifted references (common.drifted_reference), self-play on the clean ones {default, drift}
    sft_first: bool = False  # real data: run SFT on --sft_data first (default: --model is already SFT'd); the built-in task always does
    compare: bool = False  # also run the uniform-weight ablation (SPIN) from the same SFT model with the same seeds
    output_dir: str = "runs/ld_align"  # models (sft/, final/, final_spin/), checkpoint/, metrics.jsonl, results.json


def check(cfg: Config) -> list[str]:
    rules = [(cfg.compare and cfg.weighting != "latent", "--compare runs the uniform ablation beside --weighting latent; drop one of them"),
             (cfg.guide == "policy" and cfg.fsdp, "--guide policy (the default) copies the policy whole: run it without --fsdp, or add --guide scratch"),
             (cfg.fsdp and cfg.diagnostic_pairs, "--fsdp shards the gradients the per-pair diagnostics read whole: add --diagnostic_pairs 0"),
             (cfg.task == "drift" and cfg.sft_data, "--task drift is a variant of the built-in task: drop --sft_data"),
             (cfg.guide_heads >= 1 and cfg.guide_dim % cfg.guide_heads, f"--guide_dim {cfg.guide_dim} must be a multiple of --guide_heads {cfg.guide_heads}")]
    return [message for broken, message in rules if broken]


# ============================================================================================
# The guiding model: an auto-encoder over (prompt, response) tokens, from the starting policy (default) or from scratch
# ============================================================================================


def response_mean(h: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """The mean of hidden states h (B, T, H) over each row's response tokens (mask (B, T)): the encoders' pooling."""
    m = response.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def decoder_input(batch: dict, reads_prompt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the guide's decoder reads after the latent prefix: (ids, response mask, attention mask), (B, T').
    reads_prompt: the collated rows [x; y] as they are. Otherwise each row's response alone, moved to the
    left (rows are right-padded, the response is the contiguous run of labelled tokens), padded with 0."""
    ids, response = batch["input_ids"], batch["labels"] != C.IGNORE_INDEX
    if reads_prompt:
        return ids, response, batch["attention_mask"]
    lengths, first = response.sum(1), response.int().argmax(1)
    offsets = torch.arange(int(lengths.max()), device=ids.device)
    kept = offsets < lengths[:, None]
    moved = ids.gather(1, (first[:, None] + offsets).clamp(max=ids.shape[1] - 1)) * kept
    return moved, kept, kept.long()


class GuideModel(nn.Module):
    """encoder  h = Enc(E[x; y] + P + S)  (bidirectional; S marks prompt vs response tokens)
                phi(x, y) = W_z * mean_{t in y} h_t                       (pooled over response tokens)
       decoder  p(y_t | z, y_<t) = softmax(E^T Dec([W_p z; E[y_<t]] + P)_t)   (causal; z as a prefix)
       loss     L_rec = -(1/N) sum over response tokens of log p(y_t | phi(x, y), y_<t)
    (reads_prompt: the decoder reads [W_p z; E[x; y_<t]], p(y_t | z, x, y_<t).) It shares the policy's
    tokenizer (E: its own embedding table over the policy's vocabulary, tied to the output)."""

    def __init__(self, vocab_size: int, max_length: int, dim: int = 64, latent_dim: int = 64, layers: int = 2, heads: int = 4,
                 reads_prompt: bool = False):
        super().__init__()
        self.reads_prompt = reads_prompt
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_length + 1, dim)  # + 1: the decoder's latent prefix
        self.segment = nn.Embedding(2, dim)  # 0 = prompt token, 1 = response token (encoder input)

        def stack():
            layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

        self.encoder, self.decoder = stack(), stack()
        self.to_latent, self.from_latent = nn.Linear(dim, latent_dim), nn.Linear(latent_dim, dim)
        for table in (self.embed, self.position, self.segment):  # small init: logits E^T h start near uniform
            nn.init.normal_(table.weight, std=0.02)

    def encode(self, batch: dict) -> torch.Tensor:
        """phi(x, y) for a collated batch (input_ids, attention_mask, labels): (B, latent_dim)."""
        response = batch["labels"] != C.IGNORE_INDEX
        positions = torch.arange(batch["input_ids"].shape[1], device=response.device)
        h = self.embed(batch["input_ids"]) + self.position(positions) + self.segment(response.long())
        h = self.encoder(h, src_key_padding_mask=batch["attention_mask"] == 0)
        return self.to_latent(response_mean(h, response))

    def reconstruction_loss(self, batch: dict) -> torch.Tensor:
        """L_rec: the decoder rebuilds the response from the latent prefix (and the prompt, if it reads it); token mean."""
        prefix = self.from_latent(self.encode(batch)).unsqueeze(1)
        ids, response, _ = decoder_input(batch, self.reads_prompt)
        h = torch.cat([prefix, self.embed(ids)], 1) + self.position(torch.arange(ids.shape[1] + 1, device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=ids.device)
        h = self.decoder(h, mask=causal, is_causal=True)[:, :-1]  # h[:, j] saw the prefix and tokens < j: predicts token j
        logits = h[response] @ self.embed.weight.T  # right padding + causal mask: padding is never seen
        return F.cross_entropy(logits.float(), ids[response])


class PolicyGuide(nn.Module):
    """The default guide (README), an auto-encoder built from a pretrained transformer, the starting policy; GuideModel's interface.
       encoder  phi(x, y) = W_z * mean_{t in y} Body(x; y)_t          (a copy of the policy's body)
       decoder  p(y_t | z, y_<t) = LM([W_p z; E[y_<t]])_t               (a copy of the policy, z as a prefix embedding)
       loss     L_rec = -(1/N) sum over response tokens of log p(y_t | phi(x, y), y_<t)
    (reads_prompt: the decoder reads [W_p z; E[x; y_<t]], p(y_t | z, x, y_<t).)"""

    def __init__(self, policy, latent_dim: int, reads_prompt: bool = False):
        super().__init__()
        self.reads_prompt = reads_prompt
        self.decoder = copy.deepcopy(policy).train()
        self.encoder = copy.deepcopy(getattr(policy, policy.base_model_prefix)).train()
        hidden = policy.config.get_text_config().hidden_size
        self.to_latent, self.from_latent = nn.Linear(hidden, latent_dim), nn.Linear(latent_dim, hidden)

    def encode(self, batch: dict) -> torch.Tensor:
        h = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=C.position_ids_from_mask(batch["attention_mask"]), use_cache=False).last_hidden_state
        return self.to_latent(response_mean(h.float(), batch["labels"] != C.IGNORE_INDEX))

    def reconstruction_loss(self, batch: dict) -> torch.Tensor:
        prefix = self.from_latent(self.encode(batch)).unsqueeze(1)
        ids, response, seen = decoder_input(batch, self.reads_prompt)
        embeds = torch.cat([prefix.to(self.decoder.dtype), self.decoder.get_input_embeddings()(ids)], 1)
        mask = torch.cat([torch.ones_like(seen[:, :1]), seen], 1)
        body = getattr(self.decoder, self.decoder.base_model_prefix)
        h = body(inputs_embeds=embeds, attention_mask=mask, position_ids=C.position_ids_from_mask(mask),
                 use_cache=False).last_hidden_state[:, :-1]  # h[:, j] saw the prefix and tokens < j: predicts token j
        logits = self.decoder.get_output_embeddings()(h[response])
        return F.cross_entropy(logits.float(), ids[response])


def build_guide(cfg, policy, tokenizer) -> nn.Module:
    """The --guide model, seeded alike in every run: from the starting policy, or a scratch auto-encoder."""
    torch.manual_seed(cfg.seed)
    if cfg.guide == "policy":
        return PolicyGuide(policy, cfg.latent_dim, cfg.guide_reads_prompt)
    vocab_size = max(len(tokenizer), policy.config.vocab_size)  # the policy may sample ids of a padded vocabulary
    return GuideModel(vocab_size, cfg.max_length, cfg.guide_dim, cfg.latent_dim, cfg.guide_layers, cfg.guide_heads,
                      cfg.guide_reads_prompt)


def train_guide(guide: nn.Module, optimizer, seqs: list[dict], cfg, *, pad_id: int, seed: int, device, log=None,
                desc: str = "guide") -> float:
    """`guide_epochs` passes of L_rec over seqs (gold and generated responses). Returns the last epoch's
    mean loss. On N ranks each takes its share of a batch, its loss weighted by its share of the tokens."""
    guide.train()
    order_rng, params = torch.Generator().manual_seed(seed), list(guide.parameters())
    bar = C.progress(cfg.guide_epochs * -(-len(seqs) // cfg.batch_size), desc)
    for epoch in range(cfg.guide_epochs):
        order, losses = torch.randperm(len(seqs), generator=order_rng).tolist(), []
        for start in range(0, len(order), cfg.batch_size):
            whole = [seqs[i] for i in order[start:start + cfg.batch_size]]
            mine = C.my_share(whole)
            part = mine or whole[:1]  # (a rank with no rows runs a zero-weighted one, so every rank has gradients)
            share = sum(map(C.response_tokens, mine)) / sum(map(C.response_tokens, whole))  # 1.0 with one process
            loss = guide.reconstruction_loss(C.to_device(C.collate(part, pad_id), device)) * share
            loss.backward()
            loss_value = C.sum_over_ranks(loss.detach()).item()
            C.check_finite({"loss/guide": loss_value}, f"{desc}, epoch {epoch + 1}, step {len(losses) + 1}")
            C.sync_gradients(params)
            C.optimizer_step(params, optimizer, cfg.max_grad_norm, f"{desc}, epoch {epoch + 1}")
            losses.append(loss_value)
            bar.set_postfix_str(f"loss/guide={loss_value:.3g}", refresh=False)
            bar.update()
        if log is not None:
            log({"stage": desc, "epoch": epoch + 1, "loss/guide": sum(losses) / len(losses)})
    bar.close()
    return sum(losses) / len(losses)


@torch.no_grad()
def latent_distances(guide: nn.Module, pairs: list[dict], *, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """d_i = ||phi(x, y_gold) - phi(x, y_gen)||_2 in float32 (gold and sample of a pair share one padded batch)."""
    guide.eval()
    out = [torch.zeros(0)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        z = guide.encode(C.to_device(C.collate_pairs(chunk, pad_id), device)).float()
        out.append((z[:len(chunk)] - z[len(chunk):]).norm(dim=-1).cpu())
    return torch.cat(out)


# ============================================================================================
# Self-play pairs and their weights
# ============================================================================================


def latent_weights(distances: torch.Tensor, w_max: float) -> torch.Tensor:
    """w_i = clip(d_i / mean(d), 0, w_max). All distances 0 (every sample is the gold answer): all w = 0."""
    d = distances.float()
    return (d / d.mean()).clamp(0.0, w_max) if d.mean() > 0 else torch.zeros_like(d)


def pair_weights(distances: torch.Tensor | None, weighting: str, w_max: float, n: int) -> torch.Tensor:
    """latent: latent_weights(d, w_max); uniform: every w = 1 (SPIN)."""
    return latent_weights(distances, w_max) if weighting == "latent" else torch.ones(n)


def self_play_pairs(policy, examples: list[dict], cfg, *, tokenizer, seed: int, device, dtype, desc: str = "sample") -> list[dict]:
    """One sample per training prompt from the current policy (seeded), paired with the gold response:
    {"chosen": gold, "rejected": sample, "prompt_ids", "prompt" (its text)}. Prompts are cut like evaluation prompts (room
    for --max_new_tokens), then both responses share that prompt under common.truncate's rule."""
    bos, room = tokenizer.bos_token_id, max(cfg.max_length - cfg.max_new_tokens, cfg.max_prompt_length)
    prompts, golds = [], []
    for e in examples:  # the gold response: a conversation's last assistant turn (earlier turns are prompt here)
        prompts.append(C.keep_last(e["prompt_ids"], room, bos))
        golds.append(e["input_ids"][len(e["prompt_ids"]):])
    C.set_seed(seed)  # sampling draws from torch's global generator: same seed, same samples
    samples = C.generate(policy, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.eval_batch_size, device=device, dtype=dtype, do_sample=True, temperature=cfg.temperature, desc=desc)
    pairs = []
    for e, prompt_ids, gold, sample in zip(examples, prompts, golds, samples):
        cut = C.truncate(prompt_ids, [gold, sample], cfg.max_length, cfg.max_prompt_length, bos)
        if cut is not None:
            pairs.append({"chosen": C.sequence(cut[0], cut[1][0]), "rejected": C.sequence(cut[0], cut[1][1]), "prompt_ids": cut[0],
                          "prompt": e["prompt"]})
    return pairs


# ============================================================================================
# Self-play
# ============================================================================================


def self_play(cfg: Config, state: dict, *, sample, weigh, train, after_iteration) -> None:
    """LD-Align (SPIN with uniform weights). For iteration t = 1..T, from state["iteration"] on:
       1. sample: one response per training prompt from pi_{t-1}, paired with the gold response;
       2. weigh: the guide trained on gold and generated responses, then w_i from the latent distances (identical
          samples dropped: their margin is 0 whatever pi is);
       3. train: weighted DPO against pi_{t-1}, frozen;
       4. after_iteration: evaluation and a checkpoint (handed in)."""
    for t in range(state["iteration"] + 1, cfg.iterations + 1):
        pairs, stats = sample(t)
        pairs, weigh_stats = weigh(pairs, t)
        train(pairs, t)
        after_iteration(t, stats | weigh_stats)


def run_arm(name: str, weighting: str, policy, run, state: dict, checkpoint: dict | None, score_fn, log) -> None:
    """One self-play arm on `policy`, in place, from where `checkpoint` left off (or from t = 1). Each
    iteration adds its row to state["trajectory"] and saves a checkpoint (the policy, the guide and its optimizer)."""
    cfg, tokenizer, device, dtype = run.cfg, run.tokenizer, run.device, run.dtype
    guide = guide_optimizer = None
    if weighting == "latent":  # the guide is seeded alike in every run, and keeps training across iterations
        guide = build_guide(cfg, policy, tokenizer).to(device)
        guide_optimizer = C.adamw(list(guide.parameters()), cfg, cfg.guide_lr)
        if checkpoint:
            guide.load_state_dict(checkpoint["extra"]["guide"])
            guide_optimizer.load_state_dict(checkpoint["extra"]["guide_optimizer"])

    def sample(t):
        pairs = self_play_pairs(policy, run.data["sft"], cfg, tokenizer=tokenizer, seed=cfg.seed + t, device=device, dtype=dtype,
                                desc=f"{name} sample {t}")
        return pairs, {"identical": sum(p["chosen"] == p["rejected"] for p in pairs) / len(pairs)}  # samples equal to the gold

    def weigh(pairs, t):  # -> (the pairs that train, each with its "weight"; stats)
        guide_seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        if not cfg.keep_identical:  # y_gen == y_gold: h == 0 whatever pi is, so no gradient (and d == 0)
            pairs = [p for p in pairs if p["chosen"] != p["rejected"]]
        stats, distances = {}, None
        if guide is not None:  # LD-Align (SPIN has no guide: every w = 1)
            stats["guide_loss"] = train_guide(guide, guide_optimizer, guide_seqs, cfg, pad_id=tokenizer.pad_token_id, seed=cfg.seed + t,
                                              device=device, log=log, desc=f"{name} guide {t}")
            if not pairs:
                return pairs, stats
            distances = latent_distances(guide, pairs, pad_id=tokenizer.pad_token_id, batch_size=cfg.eval_batch_size, device=device)
            stats |= {"d_mean": distances.mean().item(), "d_min": distances.min().item(), "d_max": distances.max().item(),
                      "clipped": (distances > cfg.w_max * distances.mean()).float().mean().item()}
        weights = pair_weights(distances, weighting, cfg.w_max, len(pairs)).tolist()  # common.train_dpo: loss = (1/n) sum_i w_i l_i
        pairs = [{**p, "weight": w} for p, w in zip(pairs, weights)]
        return pairs, stats | diagnose(pairs, t)

    def diagnose(pairs, t):  # common.weight_diagnostics on --diagnostic_pairs of the pairs, drawn by the seed (every rank: all)
        if not pairs or not cfg.diagnostic_pairs:
            return {}
        picked, gaps = random.Random(cfg.seed + t).sample(pairs, min(cfg.diagnostic_pairs, len(pairs))), None
        if score_fn is not None:  # how much worse the sample is than the gold response, by the gold reward (or --reward_model)
            prompts, prompt_ids = [p["prompt"] for p in picked], [p["prompt_ids"] for p in picked]
            gold, sample = (torch.tensor(score_fn(prompts, tokenizer.batch_decode(ids, skip_special_tokens=True), prompt_ids, ids))
                            for ids in ([p[side]["input_ids"][len(p["prompt_ids"]):] for p in picked] for side in ("chosen", "rejected")))
            gaps = gold - sample
        weights = [p["weight"] for p in picked]
        return C.weight_diagnostics(torch.tensor(weights), gaps, *C.margin_gradients(policy, picked, weights, pad_id=tokenizer.pad_token_id,
                                                                                     device=device, dtype=dtype))

    def train(pairs, t):
        if pairs:  # weighted self-play DPO against the frozen pi_{t-1}: the policy now
            C.train_dpo(policy, pairs, cfg, device=device, dtype=dtype, seed=cfg.seed + t, desc=f"{name} dpo {t}", log=log)
        else:
            print(f"[{name} {t}/{cfg.iterations}] every sample equals its gold response: no pair to train on")

    def after_iteration(t, stats):
        metrics, outputs = C.evaluate(policy, tokenizer, run.data["test"], cfg, device=device, dtype=dtype, score_fn=score_fn,
                                      against=state["sft_outputs"], desc=f"eval {name} {t}")
        row = {"arm": name, "iteration": t, **metrics, **stats}
        log({"stage": f"iteration {name}", **row})
        print(f"[{name} {t}/{cfg.iterations}] " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
        state["trajectory"].append(row)
        state["finals"][name], state["examples"][name], state["iteration"] = metrics, outputs["responses"][:5], t
        extra = {"guide": guide.state_dict(), "guide_optimizer": guide_optimizer.state_dict()} if guide else None
        C.save_checkpoint(run, state, policy, extra, reads=["sft"] if (run.out / "sft").exists() else [])

    self_play(cfg, state, sample=sample, weigh=weigh, train=train, after_iteration=after_iteration)


# ============================================================================================
# Main: the starting model, the arm(s), the report
# ============================================================================================


def main(cfg: Config) -> dict:
    run = C.prepare(cfg, need_pref=False, problems=check(cfg))
    checkpoint, run_sft = run.checkpoint, not cfg.sft_data or cfg.sft_first  # the built-in task always starts with SFT
    policy = C.load_model(str(run.out / "sft") if checkpoint and run_sft else cfg.model, run.tokenizer, cfg.trust_remote_code, cfg.seed)
    resumed_policy = (C.load_model(str(checkpoint["folder"]), run.tokenizer, cfg.trust_remote_code, cfg.seed)  # an arm stopped mid-way
                      if checkpoint and checkpoint["iteration"] > 0 else None)
    log = C.begin(run, policy, resumed_policy)
    tokenizer, data, device, dtype = run.tokenizer, run.data, run.device, run.dtype
    score_fn, score_name = C.preference_scorer(data["builtin"], run.judge, run.judge is not None, tokenizer, cfg, device, dtype)
    arms = [("ld_align" if cfg.weighting == "latent" else "spin", cfg.weighting)] + ([("spin", "uniform")] if cfg.compare else [])

    # ---------------------------------------------------------------- the starting model: SFT (built-in task) or --model
    if checkpoint is None:
        if run_sft:  # --task drift: the starting model learns drifted references; self-play then aligns it to the clean ones
            start = C.drifted_examples(data["sft"], tokenizer, cfg) if cfg.task == "drift" else data["sft"]
            C.train_sft(policy, start, cfg, device=device, dtype=dtype, seed=cfg.seed, desc="sft", log=log)
            C.save_model(policy, tokenizer, run.out / "sft")
        sft_metrics, sft_outputs = C.evaluate(policy, tokenizer, data["test"], cfg, device=device, dtype=dtype, score_fn=score_fn,
                                              desc="eval sft")
        log({"stage": "eval sft", **sft_metrics})
        state = {"arm": 0, "iteration": 0, "sft_outputs": sft_outputs, "trajectory": [{"arm": "sft", "iteration": 0, **sft_metrics}],
                 "finals": {"sft": sft_metrics}, "examples": {"sft": sft_outputs["responses"][:5]}}
        C.save_checkpoint(run, state, reads=["sft"] if run_sft else [])
    else:
        state = {k: checkpoint[k] for k in ("arm", "iteration", "sft_outputs", "trajectory", "finals", "examples")}

    # ---------------------------------------------------------------- self-play: LD-Align (and SPIN with --compare)
    final_dirs = [run.out / ("final" if i == 0 else f"final_{name}") for i, (name, _) in enumerate(arms)]
    for i, (name, weighting) in enumerate(arms[state["arm"]:], start=state["arm"]):
        resumed = checkpoint if resumed_policy is not None and i == checkpoint["arm"] else None
        # every arm starts from the same weights (the last one may take the starting model itself)
        arm_policy = resumed_policy if resumed else C.clone_model(policy) if i < len(arms) - 1 else policy
        run_arm(name, weighting, arm_policy, run, state, resumed, score_fn, log)
        C.save_model(arm_policy, tokenizer, final_dirs[i])
        state["arm"], state["iteration"] = i + 1, 0
        C.save_checkpoint(run, state, reads=["sft"] if run_sft else [])

    # ---------------------------------------------------------------- report: arms side by side, iteration by iteration
    by_iteration = sorted(state["trajectory"][1:], key=lambda r: r["iteration"])
    columns = {"sft": state["finals"]["sft"]} | {f"{r['arm']} {r['iteration']}": {k: v for k, v in r.items() if k not in ("arm", "iteration")}
                                                for r in by_iteration}
    return C.finish(run, {"reward_metric": score_name, **state["finals"], "trajectory": state["trajectory"]}, columns,
                    "win_rate: against the SFT model's response, by reward (ties 1/2); identical: samples equal to the gold "
                    "response; d_*: latent distances; clipped: weights cut at --w_max; guide_loss: reconstruction loss; rho_*, cos_*: "
                    "what the weights do to the first step (common.weight_diagnostics, on --diagnostic_pairs of the pairs)",
                    state["examples"], ([run.out / "sft"] if run_sft else []) + final_dirs)


if __name__ == "__main__":
    C.cli(main, Config)
