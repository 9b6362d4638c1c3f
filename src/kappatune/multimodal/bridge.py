"""An optional character bridge between the adaptor and the LLM (``--adaptor-bridge chars``).

Why: after a CTC stage the adaptor's outputs carry the audio's characters (the CTC head reads held-out clips
at CER ~0.3), yet a frozen or 2M-trainable SmolLM2 did not learn to read those vectors within hundreds of
steps (docs/speech.md): it has to discover a monotonic alignment from ~56 audio positions to its tokens and
a mapping from acoustic vectors to its own input space. The bridge hands it both. The CTC head's output is
compressed the way its best path is read (one position per run of the same non-blank symbol, blanks
dropped), and each kept position becomes the probability-weighted mix of the LLM's *own* input embeddings of
the characters (renormalised over the non-blank symbols). The LLM then reads a soft spelling of what was
said, in its own embedding space, one position per character. Everything stays differentiable in the kept
positions' probabilities, so the LM loss still trains the adaptor and its head.
"""

from __future__ import annotations

import torch

from ..errors import KappaTuneError
from .ctc import CHARS


def char_token_ids(tokenizer) -> list[int]:
    """The LLM token id of each CTC character (``ctc.CHARS`` order); every character must be one token."""
    ids = []
    for c in CHARS:
        got = tokenizer(c, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise KappaTuneError(f"the LLM's tokenizer spells character {c!r} as {len(got)} tokens; the "
                                 f"character bridge needs one token per character")
        ids.append(got[0])
    return ids


def compress(logits: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """Per clip, the indices of the CTC frames its best path emits: argmax not blank (id 0) and different
    from the previous frame's argmax. ``logits`` (B, F, V), ``lengths`` valid frames per clip. A clip with no
    such frame keeps its first frame, so every clip gives the LLM at least one position."""
    best = logits.argmax(-1)
    kept = []
    for i in range(logits.shape[0]):
        path = best[i, : int(lengths[i])]
        new = torch.ones_like(path, dtype=torch.bool)
        new[1:] = path[1:] != path[:-1]
        idx = torch.nonzero(new & (path != 0)).flatten()
        kept.append(idx if idx.numel() else torch.zeros(1, dtype=torch.long, device=logits.device))
    return kept


def bridge_embeddings(logits: torch.Tensor, lengths: torch.Tensor, char_embeddings: torch.Tensor):
    """(B, L, D) inputs for the LLM and their lengths from the CTC head's ``logits`` (B, F, 1 + n_chars):
    at each kept frame, sum over characters c of p(c | not blank) * char_embeddings[c]."""
    kept = compress(logits.detach(), lengths)
    probs = logits.float().softmax(-1)[..., 1:]
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-9)
    mixed = [probs[i, idx] @ char_embeddings.float() for i, idx in enumerate(kept)]
    lens = torch.tensor([m.shape[0] for m in mixed], device=logits.device)
    out = logits.new_zeros(len(mixed), int(lens.max()), char_embeddings.shape[-1], dtype=char_embeddings.dtype)
    for i, m in enumerate(mixed):
        out[i, : m.shape[0]] = m.to(out.dtype)
    return out, lens
