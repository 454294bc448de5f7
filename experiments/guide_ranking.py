"""Does LD-Align's guide measure mistakes? Its reconstruction loss, and how its latent distance ranks
real mistakes against a harmless difference, for each guide (--guide scratch | policy).

    python experiments/guide_ranking.py                            # built-in task, tiny model, seed 0 (~1 min)
    python experiments/guide_ranking.py --seed 1 --guides policy
    python experiments/guide_ranking.py --model /tmp/smollm2-135m --n_sft 300 --sft_epochs 0 --guides policy scratch

Exactly LD-Align's first iteration, up to the guide: the starting model (SFT on the built-in task, as
ld_align.py does: --sft_epochs 0 keeps --model as it is), one sample per training prompt, the guide
trained on gold and generated responses (ld_align.train_guide; its last-epoch loss is printed next to
the uniform guess ln |V|). Then, for every test row with two or more facts, the distance
d = ||phi(x, gold) - phi(x, variant)|| from the gold summary to four edits of it:

    join word      one " ; " turned into " and "        harmless: the gold reward even rises
    missing fact   one clause dropped                  a real mistake
    wrong object   one clause's object replaced         a real mistake
    wrong name     one clause's name replaced           a real mistake

A guide that measures mistakes puts every mistake farther than the join word: the table gives the
mean d of each edit and the share of rows where the mistake is farther than that row's join-word
edit. On the guide's own training pairs it also compares samples that state the facts right (gold
reward >= 1, differing only in join words) with samples that get a fact wrong. All other flags are
ld_align.py's.
"""
import dataclasses
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C
import ld_align

EDITS = ("join word", "missing fact", "wrong object", "wrong name")


def edits(reference: str, rng: random.Random) -> dict[str, str] | None:
    """The gold summary 'n v o ; n v o ...' and its four edits (None without two facts and a ' ; ')."""
    clauses, joins = [[]], []
    for word in reference.split():
        if word in (";", "and"):
            clauses.append([])
            joins.append(word)
        else:
            clauses[-1].append(word)
    semis = [k for k, j in enumerate(joins) if j == ";"]
    if len(clauses) < 2 or any(len(c) != 3 for c in clauses) or not semis:
        return None

    def text(cs, js):
        return " ".join([" ".join(cs[0])] + [f"{j} {' '.join(c)}" for j, c in zip(js, cs[1:])])

    i, k = rng.randrange(len(clauses)), rng.choice(semis)
    name, verb, obj = clauses[i]
    replaced = lambda clause: clauses[:i] + [clause] + clauses[i + 1:]
    return {"gold": text(clauses, joins),
            "join word": text(clauses, joins[:k] + ["and"] + joins[k + 1:]),
            "missing fact": text(clauses[:i] + clauses[i + 1:], joins[:max(i - 1, 0)] + joins[max(i - 1, 0) + 1:]),
            "wrong object": text(replaced([name, verb, rng.choice([o for o in C.OBJECTS if o != obj])]), joins),
            "wrong name": text(replaced([rng.choice([n for n in C.NAMES if n != name]), verb, obj]), joins)}


def main() -> None:
    guides = ["scratch", "policy"]
    if "--guides" in sys.argv:
        at = sys.argv.index("--guides")
        rest = sys.argv[at + 1:]
        n = next((j for j, a in enumerate(rest) if a.startswith("--")), len(rest))
        guides, sys.argv = rest[:n], sys.argv[:at] + rest[n:]
    cfg = C.parse_config(ld_align.Config)
    device = C.pick_device(cfg.device)
    dtype = C.pick_dtype(cfg.dtype, device)
    C.set_seed(cfg.seed)
    policy, tokenizer = C.load_model_and_tokenizer(cfg.model, cfg.trust_remote_code, cfg.seed)
    policy.to(device)
    data = C.load_data(cfg, tokenizer, need_pref=False)
    if cfg.sft_epochs:
        C.train_sft(policy, data["sft"], cfg, device=device, dtype=dtype, seed=cfg.seed, desc="sft")
    pairs = ld_align.self_play_pairs(policy, data["sft"], cfg, tokenizer=tokenizer, seed=cfg.seed + 1, device=device, dtype=dtype)
    pad_id = tokenizer.pad_token_id

    rng = random.Random(cfg.seed)
    variants = []  # (prompt ids, {edit: response ids})
    for row in data["test"]:
        edited = edits(row["reference"], rng)
        if edited:
            prompt_ids = C.encode_prompt(tokenizer, row["prompt"])
            variants.append((prompt_ids, {k: C.encode_response(tokenizer, v) for k, v in edited.items()}))
    # the guide's training pairs, split by whether the sample states the facts right
    prompts = tokenizer.batch_decode([p["prompt_ids"] for p in pairs], skip_special_tokens=True)
    samples = tokenizer.batch_decode([p["rejected"]["input_ids"][len(p["prompt_ids"]):] for p in pairs], skip_special_tokens=True)
    differing = [(p, C.gold_reward(x, y) >= 1.0) for p, x, y in zip(pairs, prompts, samples) if p["chosen"] != p["rejected"]]

    print(f"\n{cfg.model}, seed {cfg.seed}: {len(pairs)} self-play pairs ({len(differing)} differ from gold), "
          f"{len(variants)} test rows with 2+ facts; uniform guess ln |V| = {torch.log(torch.tensor(float(len(tokenizer)))):.2f} nats\n")
    print("| guide | guide loss | " + " | ".join(f"d {e}" for e in EDITS) + " | " +
          " | ".join(f"{e} > join" for e in EDITS[1:]) + " | d sample, facts right | d sample, a fact wrong |")
    print("|---" * (2 + 2 * len(EDITS) + 1) + "|")
    for guide_kind in guides:
        guide = ld_align.build_guide(dataclasses.replace(cfg, guide=guide_kind), policy, tokenizer).to(device)
        optimizer = C.adamw(list(guide.parameters()), cfg, cfg.guide_lr)
        seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        loss = ld_align.train_guide(guide, optimizer, seqs, cfg, pad_id=pad_id, seed=cfg.seed + 1, device=device,
                                    desc=f"guide {guide_kind}")

        d = {e: ld_align.latent_distances(guide, [{"chosen": C.sequence(p, v["gold"]), "rejected": C.sequence(p, v[e])}
                                                   for p, v in variants], pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device)
             for e in EDITS}
        by_kind = {}
        for right in (True, False):
            chosen = [p for p, ok in differing if ok == right]
            by_kind[right] = ld_align.latent_distances(guide, chosen, pad_id=pad_id, batch_size=cfg.eval_batch_size,
                                                       device=device) if chosen else torch.zeros(0)
        cells = [f"{loss:.3f}"] + [f"{d[e].mean():.3f}" for e in EDITS]
        cells += [f"{(d[e] > d['join word']).float().mean():.2f}" for e in EDITS[1:]]
        cells += [f"{by_kind[r].mean():.3f} (n {len(by_kind[r])})" if len(by_kind[r]) else "n/a" for r in (True, False)]
        print(f"| {guide_kind} | " + " | ".join(cells) + " |", flush=True)
    print("\nd: latent distance ||phi(x, gold) - phi(x, edit)||; 'X > join': share of rows where that mistake is "
          "farther from gold than the row's join-word edit (1.00: every row ranked right)")


if __name__ == "__main__":
    main()
