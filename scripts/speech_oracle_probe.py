"""How well can the LLM's side transcribe when the spelling it reads is right, or wrong at a known rate?
(issue 15; docs/speech.md "An oracle for the LLM's side")

The character bridge (``--adaptor-bridge chars``) hands the LLM one of its own character embeddings per
character the CTC head reads. This probe replaces the head by the transcript itself: the LLM reads the
transcript's characters (``ctc.char_targets``) as those same embeddings, optionally corrupted at a chosen
character error rate (substitutions, deletions and insertions in equal shares), and the same LLM tensors as
the speech runs train (2M lowest-kappa by default) with the listen recipe's rate, warm-up, decay and batch.
No audio and no adaptor are involved, so each arm answers one question: given spelling this good, how close
to the transcript does the LLM get within N steps, and what does it forget (news perplexity)?

Each arm writes ``<out>/cer-<rate>.json`` (a finished arm is kept, so the script resumes arm by arm):
WER/CER of greedy outputs against the held-out transcripts, the measured CER of what the LLM read, the
right-vs-wrong-spelling loss gap (the analogue of the audio gap) and news perplexity, every --eval-every steps.

  python scripts/speech_oracle_probe.py --train data/speech/train.jsonl --test data/speech/probe_test.jsonl \\
      --rates 0,0.1,0.3 --steps 300 --out docs/results/speech-oracle
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from kappatune._io import atomic_write_json
from kappatune.multimodal.alignment import build_inputs
from kappatune.multimodal.bridge import char_token_ids
from kappatune.multimodal.ctc import CHARS, char_targets, char_text
from kappatune.multimodal.model import greedy_after_prefix, token_vectors, word_error_rates

LETTERS = range(1, CHARS.index("z") + 2)  # CTC ids of space and a-z: what a misreading turns a character into


def corrupt(chars: list[int], rate: float, rng: random.Random) -> list[int]:
    """``chars`` (CTC ids) with each character hit with probability ``rate``; a hit is a substitution (another
    letter or space), a deletion, or an insertion of a random letter before it, one third each. Never empty."""
    out: list[int] = []
    for c in chars:
        if rng.random() >= rate:
            out.append(c)
            continue
        kind = rng.randrange(3)
        if kind == 0:
            out.append(rng.choice([x for x in LETTERS if x != c]))
        elif kind == 2:
            out += [rng.choice(LETTERS), c]
    return out or chars[:1]


def readings(texts: list[str], rate: float, seed: int) -> list[list[int]]:
    """The spelling the LLM reads for each text: fixed per text (a head reads a clip the same way every
    time), drawn from one generator seeded by ``seed``."""
    rng = random.Random(seed)
    return [corrupt(char_targets(t), rate, rng) for t in texts]


def spelled(table: torch.Tensor, reads: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max L, D) LLM inputs, one character embedding per position (rows of ``table`` in ``CHARS`` order,
    CTC id c -> row c-1), zero-padded, and the lengths (B,)."""
    lens = torch.tensor([len(r) for r in reads])
    out = table.new_zeros(len(reads), int(lens.max()), table.shape[1])
    for i, r in enumerate(reads):
        out[i, : len(r)] = table[torch.tensor(r) - 1]
    return out, lens


def lm_loss(llm, tok, table, reads, text_ids, lead_ids):
    inputs, lens = spelled(table, reads)
    emb, att, lab = build_inputs(inputs, lens, text_ids, llm.get_input_embeddings(), tok.bos_token_id,
                                 tok.eos_token_id, lead_ids)
    return llm(inputs_embeds=emb, attention_mask=att, labels=lab).loss


@torch.no_grad()
def measure(llm, tok, table, reads, refs, lead_ids, control, base_ppl, batch_size: int = 8) -> dict:
    """WER/CER of greedy outputs, the loss with the right spelling and with the next text's, and the
    control perplexity."""
    from kappatune.evaluate import perplexity

    llm.eval()
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in refs]
    hyps = []
    for i in range(0, len(reads), batch_size):
        inputs, lens = spelled(table, reads[i:i + batch_size])
        out = greedy_after_prefix(llm, lead_ids, inputs, lens, tok.bos_token_id, tok.eos_token_id, 48)
        hyps += [tok.decode(x, skip_special_tokens=True).strip() for x in out]
    losses = {}
    for key, rd in (("right", reads), ("wrong", reads[1:] + reads[:1])):
        total = 0.0
        for i in range(0, len(rd), batch_size):
            n = sum(len(x) + 1 for x in ids[i:i + batch_size])
            total += float(lm_loss(llm, tok, table, rd[i:i + batch_size], ids[i:i + batch_size], lead_ids)) * n
        losses[key] = total / sum(len(x) + 1 for x in ids)
    ppl = perplexity(llm, tok, chunks=control)["ppl"]
    llm.train()
    return dict(word_error_rates(refs, hyps), loss_right=losses["right"], loss_wrong=losses["wrong"],
                gap=losses["wrong"] - losses["right"], control_ppl=ppl, dppl=ppl - base_ppl,
                examples=[{"read": char_text(r), "ref": ref, "hyp": h}
                          for r, ref, h in list(zip(reads, refs, hyps))[:3]])


def schedule(step: int, steps: int, warmup: int) -> float:
    """The listen recipe's rate factor: linear warm-up, then linear decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def run_arm(rate: float, args, base) -> dict:
    from kappatune.data import leading_special_ids
    from kappatune.models import load_model
    from kappatune.multimodal.recipe import prepare_llm
    from kappatune.policies import parse_size

    llm, tok = load_model(args.model)
    sel = prepare_llm(llm, args.order, parse_size(args.budget_params), args.seed)
    lead_ids = leading_special_ids(tok)
    table = token_vectors(llm, char_token_ids(tok)).detach()
    train_reads = readings(base["train"], rate, args.seed)
    test_reads = readings(base["test"], rate, args.seed + 1)
    text_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in base["train"]]
    params = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(train_reads), generator=order).tolist()
    evals, losses, t0 = [], [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            n = len(test_reads) if step == args.steps else args.eval_limit  # the last evaluation reads them all
            rec = measure(llm, tok, table, test_reads[:n], base["test"][:n], lead_ids, base["control"],
                          base["base_ppl"])
            evals.append(dict(rec, step=step, clips=n, wall_s=time.perf_counter() - t0))
            print(f"cer {rate:g} step {step}: WER {rec['wer']:.3f} CER {rec['cer']:.3f} gap {rec['gap']:.3f} "
                  f"control dPPL {rec['dppl']:+.2f}", flush=True)
        if step == args.steps:
            break
        idx = [perm[(step * args.batch_size + j) % len(perm)] for j in range(args.batch_size)]
        for g in opt.param_groups:
            g["lr"] = args.lr * schedule(step, args.steps, args.warmup)
        loss = lm_loss(llm, tok, table, [train_reads[i] for i in idx], [text_ids[i] for i in idx], lead_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append({"step": step + 1, "loss": float(loss.detach())})
    read_cer = word_error_rates([char_text(char_targets(t)) for t in base["test"]],
                                [char_text(r) for r in test_reads])["cer"]
    return {"input_cer_rate": rate, "input_cer_measured": read_cer, "model": args.model, "order": args.order,
            "budget_params": args.budget_params, "selected": None if sel is None else sel.names,
            "steps": args.steps, "lr": args.lr, "warmup": args.warmup, "batch_size": args.batch_size,
            "seed": args.seed, "train": args.train, "test": args.test, "eval_limit": args.eval_limit,
            "control": args.control, "base_control_ppl": base["base_ppl"], "evals": evals, "train_loss": losses,
            "wall_s": time.perf_counter() - t0}


def shared_inputs(args) -> dict:
    """Texts, the control chunks and the base model's news perplexity (the same for every arm)."""
    from kappatune.data import control_text
    from kappatune.evaluate import control_chunks, perplexity
    from kappatune.models import load_model

    def texts(path):
        with open(path) as f:
            return [json.loads(line)["text"] for line in f if line.strip()]

    llm, tok = load_model(args.model)
    control = control_chunks(tok, control_text(args.control), 256, 8)
    return {"train": texts(args.train), "test": texts(args.test), "control": control,
            "base_ppl": perplexity(llm, tok, chunks=control)["ppl"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="training manifest (only its 'text' is read)")
    ap.add_argument("--test", required=True, help="held-out manifest (only its 'text' is read)")
    ap.add_argument("--rates", default="0,0.1,0.3", help="comma-separated character corruption rates")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--order", default="lowest")
    ap.add_argument("--budget-params", default="2M")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-limit", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", default="news", help="text for the forgetting measurement (news, wikipedia or a file)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    base = None
    for rate in [float(x) for x in args.rates.split(",")]:
        path = os.path.join(args.out, f"cer-{rate:g}.json")
        if os.path.exists(path):  # resumable: a finished arm is kept
            continue
        base = base or shared_inputs(args)
        atomic_write_json(path, run_arm(rate, args, base))
        print(path, flush=True)


if __name__ == "__main__":
    main()
