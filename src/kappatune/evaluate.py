"""Evaluation: control perplexity and forgetting, label-token accuracy, generalisation gap.

Perplexity of a control corpus
    The text is tokenised once (no special tokens) and cut into consecutive, non-overlapping chunks of
    ``chunk_len`` tokens; the last partial chunk is dropped and the first ``max_chunks`` chunks are used.
    Each chunk is scored independently (no BOS, no context carried over): chunk_len - 1 predicted tokens
    per chunk. PPL = exp(total NLL / total predicted tokens) (token-weighted). Forgetting = PPL(fine-tuned)
    - PPL(base) on the very same chunks.

Label-token accuracy (the paper's method)
    For each example, every candidate label is scored by the log-probability of its tokens after the prompt
    (sum over the label's tokens, so multi-token labels work); the prediction is the best-scoring label.

Generalisation gap
    PPL(task test) - PPL(task train), each over the fully formatted examples (prompt + answer + EOS).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .data import PromptTemplate, leading_special_ids, tokenize_examples
from .errors import KappaTuneError


def _pad_batch(seqs: list[list[int]], labels: list[list[int]], pad_id: int):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        att[i, : len(s)] = 1
    return ids, lab, att


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def token_nll(model, seqs: list[list[int]], labels: list[list[int]], *, pad_id: int = 0,
              batch_size: int = 8, probe_at: list[int] | None = None,
              probe_ids: list[int] | None = None):
    """Per-sequence (sum of NLL over labelled tokens, number of labelled tokens); causal shift inside.

    With ``probe_at`` (one position per sequence) and ``probe_ids`` (vocabulary ids) it also returns the
    float64 log-probabilities of ``probe_ids`` predicted at those positions, (N, len(probe_ids)): label
    accuracy and task perplexity then share one forward pass instead of two."""
    was_training = model.training
    model.eval()
    dev = _device(model)
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))  # similar lengths together: less padding
    seqs, labels = [seqs[k] for k in order], [labels[k] for k in order]
    probing = probe_at is not None
    if probing:
        probe_at = [probe_at[k] for k in order]
        vocab = torch.tensor(probe_ids, dtype=torch.long, device=dev)
    sums, counts, probes = [], [], []
    try:
        for i in range(0, len(seqs), batch_size):
            ids, lab, att = _pad_batch(seqs[i:i + batch_size], labels[i:i + batch_size], pad_id)
            ids, lab, att = ids.to(dev), lab.to(dev), att.to(dev)
            logits = model(input_ids=ids, attention_mask=att).logits
            if probing:
                at = torch.tensor(probe_at[i:i + batch_size], device=dev)
                last = logits[torch.arange(len(at), device=dev), at].double()
                probes.append(torch.log_softmax(last, -1)[:, vocab].cpu())
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
            tgt = lab[:, 1:]
            mask = tgt != -100
            picked = lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            sums.append((-(picked * mask)).sum(1).double().cpu())
            counts.append(mask.sum(1).cpu())
    finally:
        model.train(was_training)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    if probing:
        return torch.cat(sums)[inv], torch.cat(counts)[inv], torch.cat(probes)[inv]
    return torch.cat(sums)[inv], torch.cat(counts)[inv]


@torch.no_grad()
def _last_logprobs(model, seqs: list[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
    """log-softmax of the next-token distribution after each sequence: (N, V), float64."""
    was_training = model.training
    model.eval()
    dev = _device(model)
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
    out = torch.empty(0)
    rows = []
    try:
        for i in range(0, len(order), batch_size):
            chunk = [seqs[k] for k in order[i:i + batch_size]]
            ids, _, att = _pad_batch(chunk, chunk, pad_id)
            logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits
            last = torch.tensor([len(c) - 1 for c in chunk], device=logits.device)
            picked = logits[torch.arange(len(chunk), device=logits.device), last].double()
            rows.append(torch.log_softmax(picked, -1).cpu())
        out = torch.cat(rows)
    finally:
        model.train(was_training)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return out[inv]


def control_chunks(tokenizer, text: str, chunk_len: int = 256, max_chunks: int | None = 16) -> list[list[int]]:
    if chunk_len < 2:
        raise KappaTuneError("chunk_len must be at least 2")
    if max_chunks is not None and max_chunks < 1:
        raise KappaTuneError(f"max_chunks must be at least 1 (got {max_chunks})")
    prefix = leading_special_ids(tokenizer)  # each chunk starts as the model saw text in training (e.g. BOS)
    body = chunk_len - len(prefix)
    if body < 2:
        raise KappaTuneError(f"chunk_len {chunk_len} leaves fewer than 2 text tokens after the tokenizer's prefix")
    need = None if max_chunks is None else body * max_chunks
    probe = len(text) if need is None else min(len(text), need * 8)  # tokenise a prefix when that suffices
    while True:
        ids = tokenizer(text[:probe], add_special_tokens=False)["input_ids"]
        if need is None or len(ids) > need or probe >= len(text):
            break
        probe = min(len(text), probe * 2)
    n = len(ids) // body
    if n == 0:
        raise KappaTuneError(f"the control text has {len(ids)} tokens, fewer than one chunk of {chunk_len}")
    if max_chunks is not None:
        n = min(n, max_chunks)
    return [prefix + ids[i * body:(i + 1) * body] for i in range(n)]


def perplexity(model, tokenizer, text: str | None = None, *, chunks: list[list[int]] | None = None,
               chunk_len: int = 256, max_chunks: int | None = 16, batch_size: int = 4) -> dict:
    if chunks is None:
        chunks = control_chunks(tokenizer, text, chunk_len, max_chunks)
    s, c = token_nll(model, chunks, chunks, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    nll = float(s.sum() / c.sum())
    return {"ppl": math.exp(nll), "nll": nll, "tokens": int(c.sum()), "chunks": len(chunks),
            "chunk_len": len(chunks[0])}


def _pad_id(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


def task_perplexity(model, tokenizer, rows: list[dict], template: PromptTemplate, *, max_length: int = 256,
                    batch_size: int = 8) -> dict:
    ex = tokenize_examples(rows, tokenizer, template, max_length=max_length, loss_on="all")
    s, c = token_nll(model, [e["input_ids"] for e in ex], [e["labels"] for e in ex], pad_id=_pad_id(tokenizer),
                     batch_size=batch_size)
    nll = float(s.sum() / c.sum())
    return {"ppl": math.exp(nll), "nll": nll, "tokens": int(c.sum()), "examples": len(rows)}


def label_accuracy(model, tokenizer, rows: list[dict], template: PromptTemplate,
                   labels: Sequence[str] | None = None, *, batch_size: int = 16, max_length: int = 256) -> dict:
    """Accuracy of choosing the label whose tokens are most likely after the prompt."""
    labels = sorted({str(r[template.answer_field]) for r in rows}) if labels is None else list(labels)
    if len(labels) < 2:
        raise KappaTuneError(f"label accuracy needs at least two labels, got {labels}")
    unknown = {str(r[template.answer_field]) for r in rows} - set(labels)
    if unknown:
        raise KappaTuneError(f"label {sorted(unknown)[0]!r} in the data is not among the labels {labels}")
    lab_ids = [tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    if any(not ids for ids in lab_ids):
        raise KappaTuneError("a label tokenises to nothing")
    single = [i for i, ids in enumerate(lab_ids) if len(ids) == 1]
    multi = [i for i, ids in enumerate(lab_ids) if len(ids) > 1]
    scores = torch.empty(len(rows), len(labels), dtype=torch.float64)
    prefix = leading_special_ids(tokenizer)
    room = max_length - len(prefix)  # truncation cuts the prompt after the prefix
    prompts = [tokenizer(template.prompt(r), add_special_tokens=False)["input_ids"] for r in rows]
    if single:
        # One forward per prompt scores every single-token label at once (log-softmax at the prompt's end).
        cut = [prefix + p[-room:] for p in prompts]
        last = _last_logprobs(model, cut, _pad_id(tokenizer), batch_size)  # (N, V)
        for i in single:
            scores[:, i] = last[:, lab_ids[i][0]]
    if multi:
        seqs, labs = [], []
        for p in prompts:
            for i in multi:
                a = lab_ids[i]
                p_cut = prefix + p[-(room - len(a)):]
                seqs.append(p_cut + a)
                labs.append([-100] * len(p_cut) + a)
        s, _ = token_nll(model, seqs, labs, pad_id=_pad_id(tokenizer), batch_size=batch_size)
        scores[:, multi] = (-s).view(len(rows), len(multi))
    pred = scores.argmax(1)  # first label wins ties (labels are in a fixed order)
    gold = torch.tensor([labels.index(str(r[template.answer_field])) for r in rows])
    acc = float((pred == gold).double().mean())
    counts = {lab: int((pred == i).sum()) for i, lab in enumerate(labels)}
    return {"accuracy": acc, "n": len(rows), "labels": labels, "predicted_counts": counts}


def accuracy_and_perplexity(model, tokenizer, rows: list[dict], template: PromptTemplate,
                            labels: Sequence[str], *, batch_size: int = 8, max_length: int = 256) -> dict:
    """``label_accuracy`` and ``task_perplexity`` of the same rows from one forward pass per example.

    The formatted example is prompt tokens + answer tokens (``tokenize_examples``), so the distribution
    predicted at the prompt's last token is exactly the one label accuracy scores. That holds when every
    label is one token and no prompt is truncated; otherwise the two are computed separately."""
    labels = list(labels)
    lab_ids = [tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    prefix = leading_special_ids(tokenizer)
    prompts = [prefix + tokenizer(template.prompt(r), add_special_tokens=False)["input_ids"] for r in rows]
    ex = tokenize_examples(rows, tokenizer, template, max_length=max_length, loss_on="all")
    shared = all(len(ids) == 1 for ids in lab_ids) and \
        all(e["input_ids"][:len(p)] == p and len(p) < len(e["input_ids"]) for p, e in zip(prompts, ex))
    unknown = {str(r[template.answer_field]) for r in rows} - set(labels)
    if not shared or unknown or len(labels) < 2:  # label_accuracy explains bad labels
        return {"accuracy": label_accuracy(model, tokenizer, rows, template, labels, batch_size=batch_size,
                                           max_length=max_length),
                "ppl": task_perplexity(model, tokenizer, rows, template, max_length=max_length,
                                       batch_size=batch_size)}
    s, c, scores = token_nll(model, [e["input_ids"] for e in ex], [e["labels"] for e in ex],
                             pad_id=_pad_id(tokenizer), batch_size=batch_size,
                             probe_at=[len(p) - 1 for p in prompts], probe_ids=[ids[0] for ids in lab_ids])
    pred = scores.argmax(1)  # first label wins ties, as in label_accuracy
    gold = torch.tensor([labels.index(str(r[template.answer_field])) for r in rows])
    nll = float(s.sum() / c.sum())
    return {"accuracy": {"accuracy": float((pred == gold).double().mean()), "n": len(rows), "labels": labels,
                         "predicted_counts": {lab: int((pred == i).sum()) for i, lab in enumerate(labels)}},
            "ppl": {"ppl": math.exp(nll), "nll": nll, "tokens": int(c.sum()), "examples": len(rows)}}


def evaluate(model, tokenizer, *, control_text: str | None = None, task_test: list[dict] | None = None,
             task_train: list[dict] | None = None, template: PromptTemplate | None = None,
             labels: Sequence[str] | None = None, baseline=None, chunk_len: int = 256, max_chunks: int | None = 16,
             batch_size: int = 8) -> dict:
    """Everything at once; ``baseline`` (a model) adds its control PPL and the forgetting dPPL."""
    out: dict = {}
    if control_text is not None:
        chunks = control_chunks(tokenizer, control_text, chunk_len, max_chunks)
        out["control"] = perplexity(model, tokenizer, chunks=chunks, batch_size=batch_size)
        if baseline is not None:
            base = perplexity(baseline, tokenizer, chunks=chunks, batch_size=batch_size)
            out["baseline_control"] = base
            out["forgetting_dppl"] = out["control"]["ppl"] - base["ppl"]
    if task_test is not None:
        if template is None:
            raise KappaTuneError("task evaluation needs a prompt template")
        out["task_accuracy"] = label_accuracy(model, tokenizer, task_test, template, labels, batch_size=batch_size)
        out["task_test_ppl"] = task_perplexity(model, tokenizer, task_test, template, batch_size=batch_size)
        if baseline is not None:
            out["baseline_task_accuracy"] = label_accuracy(baseline, tokenizer, task_test, template,
                                                           out["task_accuracy"]["labels"], batch_size=batch_size)
        if task_train is not None:
            out["task_train_ppl"] = task_perplexity(model, tokenizer, task_train, template, batch_size=batch_size)
            out["generalisation_gap"] = out["task_test_ppl"]["ppl"] - out["task_train_ppl"]["ppl"]
    return out


def control_forgetting(model, tokenizer, text: str, *, base=None, chunk_len: int = 256,
                       max_chunks: int | None = 8, batch_size: int = 4) -> dict:
    """Control perplexity of ``model`` on ``text``; with ``base`` (the model before training, same tokenizer)
    also the base's perplexity on the very same chunks and the forgetting dPPL = PPL(model) - PPL(base)."""
    chunks = control_chunks(tokenizer, text, chunk_len, max_chunks)
    out = {"control_ppl": perplexity(model, tokenizer, chunks=chunks, batch_size=batch_size)["ppl"]}
    if base is not None:
        out["base_control_ppl"] = perplexity(base, tokenizer, chunks=chunks, batch_size=batch_size)["ppl"]
        out["dppl"] = out["control_ppl"] - out["base_control_ppl"]
    return out
