"""How well can the LLM's side transcribe when the spelling it reads is right, or wrong at a known rate?
(issue 15; docs/speech.md "An oracle for the LLM's side")

The character bridge (``--adaptor-bridge chars``) hands the LLM one of its own character embeddings per
character the CTC head reads. This probe replaces the head by the transcript itself: the LLM reads the
transcript's characters (``ctc.char_targets``) as those same embeddings, optionally corrupted at a chosen
character error rate (substitutions, deletions and insertions in equal shares), and the same LLM tensors as
the speech runs train (2M lowest-kappa by default) with the listen recipe's rate, warm-up, decay and batch.
No audio and no adaptor are involved, so each arm answers one question: given spelling this good, how close
to the transcript does the LLM get within N steps, and what does it forget (news perplexity)?

Two variations: ``--head STAGE`` replaces the synthetic errors by the real ones, the readings the CTC head of
a train-speech stage makes of every clip (what the bridge would hand the LLM, made hard); ``--reads tokens``
hands the LLM each reading through its own tokenizer instead of one character per position (a cascade: the
LLM corrects misspelt text it reads as text).

Each arm writes ``<out>/cer-<rate>.json`` or ``<out>/head.json`` (``tokens-`` in front with --reads tokens; a
finished arm is kept, so the script resumes arm by arm): WER/CER of greedy outputs against the held-out
transcripts, the measured CER of what the LLM read, the right-vs-wrong-reading loss gap (the analogue of the
audio gap) and the control perplexity (news), every --eval-every steps.

  python scripts/speech_oracle_probe.py --train data/speech/train.jsonl --test data/speech/probe_test.jsonl \\
      --rates 0,0.3 --steps 300 --out docs/results/speech-oracle
  python scripts/speech_oracle_probe.py ... --head runs/speech-b2/stage --reads tokens --out docs/results/speech-oracle
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
from kappatune.multimodal.model import greedy_after_prefix, word_error_rates

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


def llm_ids(reads: list[list[int]], mode: str, tok, char_ids: list[int]) -> list[list[int]]:
    """The LLM token ids each reading becomes: ``chars``, one character token per character (what the bridge
    hands the LLM: ``char_ids`` in ``CHARS`` order, CTC id c -> char_ids[c-1]); ``tokens``, the reading's text
    through the LLM's own tokenizer (a cascade: the LLM reads the misspelt text as it would read text)."""
    if mode == "chars":
        return [[char_ids[c - 1] for c in r] for r in reads]
    return [tok(char_text(r), add_special_tokens=False)["input_ids"] or [char_ids[0]] for r in reads]


def spelled(embed, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max L, D) LLM inputs, the embedding module's vectors of each reading's ids, zero-padded, and the
    lengths (B,)."""
    lens = torch.tensor([len(r) for r in ids])
    rows = [embed(torch.tensor(r)) for r in ids]
    out = rows[0].new_zeros(len(ids), int(lens.max()), rows[0].shape[1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, lens


def lm_loss(llm, tok, ids, text_ids, lead_ids):
    inputs, lens = spelled(llm.get_input_embeddings(), ids)
    emb, att, lab = build_inputs(inputs, lens, text_ids, llm.get_input_embeddings(), tok.bos_token_id,
                                 tok.eos_token_id, lead_ids)
    return llm(inputs_embeds=emb, attention_mask=att, labels=lab).loss


@torch.no_grad()
def measure(llm, tok, reads, ids, refs, lead_ids, control, base_ppl, batch_size: int = 8) -> dict:
    """WER/CER of greedy outputs (exact, as eval-speech scores them, and plain: lower case, no punctuation,
    as the readings are scored), the outputs, the loss with the right reading and with the next text's, and
    the control perplexity."""
    from kappatune.evaluate import perplexity

    llm.eval()
    ref_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in refs]
    hyps = []
    for i in range(0, len(ids), batch_size):
        inputs, lens = spelled(llm.get_input_embeddings(), ids[i:i + batch_size])
        out = greedy_after_prefix(llm, lead_ids, inputs, lens, tok.bos_token_id, tok.eos_token_id, 48)
        hyps += [tok.decode(x, skip_special_tokens=True).strip() for x in out]
    losses = {}
    for key, rd in (("right", ids), ("wrong", ids[1:] + ids[:1])):
        total = 0.0
        for i in range(0, len(rd), batch_size):
            n = sum(len(x) + 1 for x in ref_ids[i:i + batch_size])
            total += float(lm_loss(llm, tok, rd[i:i + batch_size], ref_ids[i:i + batch_size], lead_ids)) * n
        losses[key] = total / sum(len(x) + 1 for x in ref_ids)
    ppl = perplexity(llm, tok, chunks=control)["ppl"]
    llm.train()
    plain = word_error_rates([char_text(char_targets(r)) for r in refs], [char_text(char_targets(h)) for h in hyps])
    return dict(word_error_rates(refs, hyps), wer_plain=plain["wer"], cer_plain=plain["cer"], hyps=hyps,
                loss_right=losses["right"], loss_wrong=losses["wrong"],
                gap=losses["wrong"] - losses["right"], control_ppl=ppl, dppl=ppl - base_ppl,
                examples=[{"read": char_text(r), "ref": ref, "hyp": h}
                          for r, ref, h in list(zip(reads, refs, hyps))[:3]])


def schedule(step: int, steps: int, warmup: int) -> float:
    """The listen recipe's rate factor: linear warm-up, then linear decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train_and_measure(llm, tok, train_ids, test_ids, test_reads, base, args) -> tuple[list, list]:
    """The training loop with its evaluations: (evaluations, training losses)."""
    from kappatune.data import leading_special_ids

    lead_ids = leading_special_ids(tok)
    text_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in base["train"]]
    opt = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    perm = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed)).tolist()
    evals, losses, t0 = [], [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            n = len(test_ids) if step == args.steps else args.eval_limit  # the last evaluation reads them all
            rec = measure(llm, tok, test_reads[:n], test_ids[:n], base["test"][:n], lead_ids, base["control"],
                          base["base_ppl"])
            evals.append(dict(rec, step=step, clips=n, wall_s=time.perf_counter() - t0))
            print(f"step {step}: WER {rec['wer']:.3f} CER {rec['cer']:.3f} gap {rec['gap']:.3f} "
                  f"control dPPL {rec['dppl']:+.2f}", flush=True)
        if step == args.steps:
            break
        idx = [perm[(step * args.batch_size + j) % len(perm)] for j in range(args.batch_size)]
        for g in opt.param_groups:
            g["lr"] = args.lr * schedule(step, args.steps, args.warmup)
        loss = lm_loss(llm, tok, [train_ids[i] for i in idx], [text_ids[i] for i in idx], lead_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append({"step": step + 1, "loss": float(loss.detach())})
    return evals, losses


def prepare_arm(llm, tok, args) -> tuple[torch.nn.Module, dict]:
    """The LLM made ready to train and what the arm's record says about it, through the method registry as
    ``kappatune train`` does: the selective method of ``--order`` (what train-speech trains), or any
    registered method ``--method`` (a peer such as ``lora``, whose PEFT wrapper is then the model), at the
    same parameter budget."""
    from kappatune.methods import MethodContext, get_method
    from kappatune.methods.selective import method_name
    from kappatune.policies import parse_size
    from kappatune.scanner import scan
    from kappatune.train import TrainConfig

    name = args.method or method_name(args.order)
    cfg = TrainConfig(method=name, budget_params=parse_size(args.budget_params), seed=args.seed, progress=False)
    prep = get_method(name).prepare(llm, MethodContext(lambda: scan(llm, distributed=False), tok), cfg)
    facts = {"selected": prep.selection.names if prep.selection is not None else None}
    if args.method:
        facts.update(method_info=prep.info, trainable_params=prep.summary.trainable_params)
    return prep.model, facts


def run_arm(rate: float | None, args, base) -> dict:
    """One arm: readings corrupted at ``rate``, or (``rate`` None) the CTC stage's own readings."""
    from kappatune.models import load_model

    if rate is None:
        train_reads, test_reads = base["head_train"], base["head_test"]
    else:
        train_reads, test_reads = readings(base["train"], rate, args.seed), readings(base["test"], rate, args.seed + 1)
    llm, tok = load_model(args.model)
    llm, facts = prepare_arm(llm, tok, args)
    char_ids = char_token_ids(tok)
    t0 = time.perf_counter()
    evals, losses = train_and_measure(llm, tok, llm_ids(train_reads, args.reads, tok, char_ids),
                                      llm_ids(test_reads, args.reads, tok, char_ids), test_reads, base, args)
    read = word_error_rates([char_text(char_targets(t)) for t in base["test"]], [char_text(r) for r in test_reads])
    return {"input_cer_rate": rate, "head": args.head, "reads": args.reads, "input_cer_measured": read["cer"],
            "input_wer_measured": read["wer"], "model": args.model, "order": None if args.method else args.order,
            "method": args.method, "budget_params": args.budget_params, **facts,
            "steps": args.steps, "lr": args.lr, "warmup": args.warmup, "batch_size": args.batch_size,
            "seed": args.seed, "train": args.train, "test": args.test, "eval_limit": args.eval_limit,
            "control": args.control, "base_control_ppl": base["base_ppl"], "evals": evals, "train_loss": losses,
            "wall_s": time.perf_counter() - t0}


def head_readings(stage: str, llm, manifests: list[str]) -> list[list[list[int]]]:
    """Per manifest, the CTC ids the head of the train-speech CTC stage in ``stage`` reads from each clip
    (best path, as the bridge compresses it), from the frozen encoder's cached frames. ``llm``: the stage's
    LLM (only its width and embedding scale are read)."""
    from kappatune.multimodal.ctc_stage import load_ctc_stage, require_stage
    from kappatune.multimodal.encoders import feature_extractor, load_encoder
    from kappatune.multimodal.frames_cache import frames_cache_dir
    from kappatune.multimodal.model import SpeechLLM
    from kappatune.multimodal.speech_train import encode_clips, head_best_paths, load_manifest, stage_fingerprint

    fp = require_stage(stage)["fingerprint"]
    encoder = load_encoder(fp["encoder"], fp["encoder_window_s"])
    fe, n_frames = feature_extractor(encoder)
    model = SpeechLLM(encoder, llm, heads=fp["heads"], layers=fp["layers"], subsample=fp["subsample"],
                      ctc_weight=1.0, out_norm=fp["out_norm"])
    load_ctc_stage(model.adaptor, stage, stage_fingerprint(model, {k: fp[k] for k in ("encoder", "encoder_window_s", "llm")}))
    out = []
    for path in manifests:
        frames = encode_clips(model, fe, load_manifest(path), n_frames, cache_dir=frames_cache_dir())
        # the reading normalised as the targets are (edge spaces dropped); an empty one reads as a space
        out.append([char_targets(char_text(ids)) or [1] for ids in head_best_paths(model.adaptor, frames, 32)])
    return out


def shared_inputs(args) -> dict:
    """Texts, the control chunks and the base model's news perplexity (the same for every arm); with --head,
    the stage's readings of every clip."""
    from kappatune.data import control_text
    from kappatune.evaluate import control_chunks, perplexity
    from kappatune.models import load_model

    def texts(path):
        with open(path) as f:
            return [json.loads(line)["text"] for line in f if line.strip()]

    llm, tok = load_model(args.model)
    control = control_chunks(tok, control_text(args.control), 256, 8)
    base = {"train": texts(args.train), "test": texts(args.test), "control": control,
            "base_ppl": perplexity(llm, tok, chunks=control)["ppl"]}
    if args.head:
        base["head_train"], base["head_test"] = head_readings(args.head, llm, [args.train, args.test])
    return base


def arm_file(rate: float | None, reads: str) -> str:
    """cer-0.3.json, head.json; tokens-cer-0.3.json, tokens-head.json for the tokenizer's reading."""
    name = "head" if rate is None else f"cer-{rate:g}"
    return f"{name}.json" if reads == "chars" else f"{reads}-{name}.json"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="training manifest (only its 'text' is read, unless --head)")
    ap.add_argument("--test", required=True, help="held-out manifest (only its 'text' is read, unless --head)")
    ap.add_argument("--rates", default="0,0.1,0.3", help="comma-separated character corruption rates")
    ap.add_argument("--head", metavar="STAGE", default=None,
                    help="instead of --rates, one arm that reads what the CTC head of this train-speech stage "
                         "folder reads from each clip (the manifests' audio is then needed)")
    ap.add_argument("--reads", choices=("chars", "tokens"), default="chars",
                    help="chars: one character embedding per character (the bridge); tokens: the reading "
                         "through the LLM's own tokenizer")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--order", default="lowest", help="which LLM tensors train, as in train-speech")
    ap.add_argument("--method", default=None,
                    help="instead of --order, a registered training method (e.g. lora, kappatune-lora) at the "
                         "same --budget-params: a peer on the oracle")
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
    for rate in [None] if args.head else [float(x) for x in args.rates.split(",")]:
        path = os.path.join(args.out, arm_file(rate, args.reads))
        if os.path.exists(path):  # resumable: a finished arm is kept
            continue
        base = base or shared_inputs(args)
        atomic_write_json(path, run_arm(rate, args, base))
        print(path, flush=True)


if __name__ == "__main__":
    main()
