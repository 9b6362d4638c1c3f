"""Inputs and labels for Algorithm 2: inputs_embeds = [adapted audio, BOS, text tokens + EOS]; labels are
-100 on the audio and BOS positions and on padding, and the text tokens (with EOS) elsewhere. The causal LM
shifts internally, so the BOS position predicts the first text token."""

from __future__ import annotations

import torch


def build_inputs(audio: torch.Tensor, audio_lens: torch.Tensor, text_ids: list[list[int]], embed: torch.nn.Module,
                 bos_id: int, eos_id: int):
    """audio (B, Ta, D) adapted embeddings with valid lengths audio_lens; text_ids per sample (no BOS/EOS).

    Returns inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L), right-padded to the longest
    len_a + 1 + len_t + 1 in the batch.
    """
    b, _, d = audio.shape
    dev = audio.device
    seqs = []
    for i in range(b):
        la = int(audio_lens[i])
        tok = torch.tensor([bos_id] + list(text_ids[i]) + [eos_id], dtype=torch.long, device=dev)
        seqs.append((audio[i, :la], embed(tok), la, tok))
    n = max(la + len(tok) for _, _, la, tok in seqs)
    emb = audio.new_zeros(b, n, d)
    att = torch.zeros(b, n, dtype=torch.long, device=dev)
    lab = torch.full((b, n), -100, dtype=torch.long, device=dev)
    for i, (a, e, la, tok) in enumerate(seqs):
        k = la + len(tok)
        emb[i, :la] = a
        emb[i, la:k] = e.to(audio.dtype)
        att[i, :k] = 1
        lab[i, la + 1:k] = tok[1:]  # text + EOS; audio and BOS positions stay -100
    return emb, att, lab
