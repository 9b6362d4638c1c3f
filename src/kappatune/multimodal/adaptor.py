"""The adaptor between a speech encoder and an LLM, as the paper describes it: 4x subsampling by concatenating
adjacent frames, a linear projection to the LLM's hidden size, LayerNorm, positional encoding, and two
multi-head self-attention layers."""

from __future__ import annotations


import torch
from torch import nn

from .ctc import CharCTCHead


def sinusoidal_positions(n: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]  # (n, 1)
    i = torch.arange(0, dim, 2, device=device, dtype=torch.float32)  # (dim/2,)
    angle = pos / torch.pow(10000.0, i / dim)  # (n, dim/2)
    pe = torch.zeros(n, dim, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe.to(dtype)


def pad_frames(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of (T_i, dim) clips as one zero-padded (B, max T, dim) batch and the lengths (B,)."""
    lens = torch.tensor([f.shape[0] for f in frames], device=frames[0].device)
    return torch.nn.utils.rnn.pad_sequence(frames, batch_first=True), lens


class _AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention with a residual connection, padding-aware."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x)
        out, _ = self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=False)
        return x + out


class SpeechAdaptor(nn.Module):
    """(B, T, enc_dim) encoder frames -> (B, ceil(T / subsample), llm_dim) LLM input embeddings."""

    def __init__(self, enc_dim: int, llm_dim: int, *, subsample: int = 4, heads: int = 8, layers: int = 2,
                 dropout: float = 0.0, ctc_head: bool = False, out_rms: float | None = None):
        super().__init__()
        if llm_dim % heads:
            raise ValueError(f"llm_dim {llm_dim} is not divisible by heads {heads}")
        self.subsample = subsample
        self.proj = nn.Linear(enc_dim * subsample, llm_dim)
        self.norm = nn.LayerNorm(llm_dim)
        self.blocks = nn.ModuleList(_AttentionBlock(llm_dim, heads, dropout) for _ in range(layers))
        # optional: the outputs brought to the LLM's own input scale. LayerNorm plus a positional encoding gives
        # vectors of norm ~sqrt(llm_dim) (~30 for SmolLM2, whose token embeddings have norm ~3): an RMS norm
        # whose learnable gain starts at the embeddings' RMS starts the adaptor where the LLM's inputs live
        self.out_norm = None
        if out_rms is not None:
            self.out_norm = nn.RMSNorm(llm_dim, eps=1e-6)
            nn.init.constant_(self.out_norm.weight, out_rms)
        # training aid only (multimodal/ctc.py): saved in checkpoints so a resume is exact, dropped from model/
        self.ctc_head = CharCTCHead(llm_dim, subsample) if ctc_head else None

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.subsample - 1, self.subsample, rounding_mode="floor")

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor | None = None):
        """Returns (embeddings (B, T', llm_dim), lengths (B,)) with T' = ceil(T / subsample)."""
        b, t, d = frames.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=frames.device)
        pad = (-t) % self.subsample
        if pad:
            frames = torch.cat([frames, frames.new_zeros(b, pad, d)], dim=1)
        # concatenate each run of `subsample` adjacent frames: (B, T/s, s*d)
        x = frames.reshape(b, (t + pad) // self.subsample, self.subsample * d)
        x = self.norm(self.proj(x))
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        out_len = self.out_lengths(lengths)
        pad_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= out_len[:, None]  # True = padding
        for blk in self.blocks:
            x = blk(x, pad_mask)
        if self.out_norm is not None:
            x = self.out_norm(x)
        return x, out_len
