"""Inputs and labels for Algorithm 2: inputs_embeds = [leading tokens, adapted audio, BOS, text tokens + EOS];
labels are -100 on the leading, audio and BOS positions and on padding, and the text tokens (with EOS)
elsewhere. The causal LM shifts internally, so the BOS position predicts the first text token.

The leading tokens are what the LLM's tokenizer puts in front of every text (``data.leading_special_ids``:
Gemma's BOS, nothing for SmolLM2): an LLM trained to always see its BOS first reads everything after a
sequence that lacks it badly, so the audio goes after it, as text would."""

from __future__ import annotations

from typing import Sequence

import torch


def build_inputs(audio: torch.Tensor, audio_lens: torch.Tensor, text_ids: list[list[int]], embed: torch.nn.Module,
                 bos_id: int, eos_id: int, lead_ids: Sequence[int] = ()):
    """audio (B, Ta, D) adapted embeddings with valid lengths audio_lens; text_ids per sample (no BOS/EOS);
    lead_ids: token ids placed before the audio (not predicted).

    Returns inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L), right-padded to the longest
    len_lead + len_a + 1 + len_t + 1 in the batch.
    """
    b, _, d = audio.shape
    dev = audio.device
    lead = embed(torch.tensor(list(lead_ids), dtype=torch.long, device=dev)).to(audio.dtype)
    nl = len(lead_ids)
    seqs = []
    for i in range(b):
        la = int(audio_lens[i])
        tok = torch.tensor([bos_id] + list(text_ids[i]) + [eos_id], dtype=torch.long, device=dev)
        seqs.append((audio[i, :la], embed(tok), la, tok))
    n = max(nl + la + len(tok) for _, _, la, tok in seqs)
    emb = audio.new_zeros(b, n, d)
    att = torch.zeros(b, n, dtype=torch.long, device=dev)
    lab = torch.full((b, n), -100, dtype=torch.long, device=dev)
    for i, (a, e, la, tok) in enumerate(seqs):
        start = nl + la  # where BOS sits
        k = start + len(tok)
        emb[i, :nl] = lead
        emb[i, nl:start] = a
        emb[i, start:k] = e.to(audio.dtype)
        att[i, :k] = 1
        lab[i, start + 1:k] = tok[1:]  # text + EOS; leading, audio and BOS positions stay -100
    return emb, att, lab
