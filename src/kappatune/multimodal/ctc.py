"""An auxiliary alignment loss for the adaptor (optional, ``--ctc-weight``): CTC of the adaptor's outputs
against the transcript's characters, through a small head that is dropped after training.

Why characters: the LLM's 49k-token embedding matrix as a CTC vocabulary aligned slowly (issue 15's
measurements); 38 symbols are learnt from far fewer examples. Why ``subsample`` symbols per position: after
4x subsampling a 4.5 s clip has ~56 adaptor positions but ~70 characters, more than CTC can emit one per
position, so each position predicts ``subsample`` consecutive CTC frames (the head's output is reshaped to
the encoder's own frame rate). The loss reaches the adaptor's output vectors, the ones the LLM reads, and
pushes them to carry the content of the audio rather than a style prefix.
"""

from __future__ import annotations

import torch
from torch import nn

CHARS = " abcdefghijklmnopqrstuvwxyz0123456789'"
CTC_VOCAB = len(CHARS) + 1  # + the CTC blank (id 0)


def char_targets(text: str) -> list[int]:
    """Ids 1..len(CHARS) of the transcript's characters: lower-cased, other symbols dropped, runs of spaces
    collapsed (punctuation is not spoken)."""
    out: list[int] = []
    for c in text.lower():
        if c not in CHARS:
            continue
        if c == " " and (not out or out[-1] == 1):
            continue
        out.append(CHARS.index(c) + 1)
    while out and out[-1] == 1:
        out.pop()
    return out


def char_text(ids: list[int]) -> str:
    """The text of CTC symbol ids (1..len(CHARS); the blank, 0, is never passed here)."""
    return "".join(CHARS[c - 1] for c in ids)


class CharCTCHead(nn.Module):
    """(B, T, dim) adaptor outputs -> CTC log-probabilities over (B, T * per_position, vocab).

    ``vocab`` counts the blank: the default is the 38 characters + 1; a probe with another alphabet (e.g.
    scripts/speech_phoneme_probe.py's espeak-ng phonemes) passes its own size. ``hidden`` > 0 puts one GELU
    layer of that width before the output (a reader with its own non-linearity; the default, 0, is the linear
    head every saved stage has)."""

    def __init__(self, dim: int, per_position: int, vocab: int = CTC_VOCAB, hidden: int = 0):
        super().__init__()
        self.per_position = per_position
        self.vocab = vocab
        out = per_position * vocab
        self.proj = nn.Linear(dim, out) if hidden <= 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, T * per_position, vocab) logits, one row per CTC frame."""
        b, t, _ = x.shape
        return self.proj(x).view(b, t * self.per_position, self.vocab)

    def loss(self, x: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss per target character over the batch (clips whose audio is too short for their text
        contribute 0 instead of inf)."""
        logp = self.frame_logits(x).float().log_softmax(-1).transpose(0, 1)
        flat = torch.tensor([i for tgt in targets for i in tgt], dtype=torch.long, device=x.device)
        tgt_lens = torch.tensor([len(tgt) for tgt in targets], dtype=torch.long, device=x.device)
        return nn.functional.ctc_loss(logp, flat, lengths * self.per_position, tgt_lens, blank=0,
                                      reduction="mean", zero_infinity=True)

    @torch.no_grad()
    def best_paths(self, x: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Best-path decoding: the most likely symbol per CTC frame, repeats merged, blanks dropped; the
        symbol ids (1..vocab-1) of each clip."""
        best = self.frame_logits(x).argmax(-1)
        out = []
        for i in range(x.shape[0]):
            ids = best[i, : int(lengths[i]) * self.per_position].tolist()
            out.append([c for j, c in enumerate(ids) if c != 0 and (j == 0 or c != ids[j - 1])])
        return out

    def greedy(self, x: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """The best paths as text (the character alphabet): a direct read of what the adaptor's outputs
        carry, without the LLM."""
        return [char_text(ids).strip() for ids in self.best_paths(x, lengths)]
