"""Frozen speech encoder + trainable adaptor + causal LM (kappa-selected tensors trainable)."""

from __future__ import annotations

import torch
from torch import nn

from .adaptor import SpeechAdaptor, pad_frames
from .alignment import build_inputs


def token_vectors(llm: nn.Module, ids: list[int]) -> torch.Tensor:
    """The vectors the LLM's layers read for ``ids``: its input-embedding module applied, not its table read
    (Gemma's module multiplies the table by sqrt(hidden size) in forward; the table alone is 1/25 of that).
    On the embedding's own device."""
    layer = llm.get_input_embeddings()
    return layer(torch.tensor(ids, dtype=torch.long, device=layer.weight.device))


def _loaded_table(llm: nn.Module) -> torch.Tensor:
    w = llm.get_input_embeddings().weight.detach()
    if w.is_meta or not w.is_floating_point():
        raise ValueError(f"the LLM's input embeddings are not a loaded float table ({w.dtype}, {w.device}): "
                         "load the model's weights before building the speech model")
    return w.float()


@torch.no_grad()
def _scale_on_row(llm: nn.Module, w: torch.Tensor, squares: torch.Tensor) -> float:
    """The embedding module's own factor, measured on the table's largest row (so a module that rescales in
    forward is followed without embedding the whole vocabulary)."""
    row = int(squares.sum(1).argmax())
    if not w[row].any():
        raise ValueError("the LLM's input embeddings are all zero: no scale to match")
    return float(token_vectors(llm, [row]).float().norm() / w[row].norm())


def embedding_scale(llm: nn.Module) -> float:
    """How much the embedding module multiplies its table by: 1.0 for a plain embedding, sqrt(hidden) for
    Gemma. What an adaptor trained to the LLM's scale depends on beyond the table itself."""
    w = _loaded_table(llm)
    return _scale_on_row(llm, w, w.pow(2))


def embedding_rms(llm: nn.Module) -> float:
    """Root-mean-square (per element) of the token vectors the LLM's layers read: the scale they expect. The
    table's RMS times the module's own scale (``embedding_scale``)."""
    w = _loaded_table(llm)
    squares = w.pow(2)  # squared once: a large vocabulary's table is big
    return float(squares.mean().sqrt() * _scale_on_row(llm, w, squares))  # plain embedding: the table's RMS


class SpeechLLM(nn.Module):
    """``encoder(input_features).last_hidden_state`` -> adaptor -> ``llm(inputs_embeds=...)``.

    The encoder is frozen here; the LLM is left as given (apply a KappaTune selection to it first); the
    adaptor is trainable.
    """

    def __init__(self, encoder: nn.Module, llm: nn.Module, *, subsample: int = 4, heads: int = 8,
                 layers: int = 2, frames_per_feature: int = 2, ctc_weight: float = 0.0, out_norm: bool = False,
                 bridge_ids: list[int] | None = None):
        super().__init__()
        if bridge_ids is not None and ctc_weight <= 0:
            raise ValueError("the character bridge reads the CTC head: it needs ctc_weight > 0")
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        enc_dim = encoder.config.d_model
        llm_dim = llm.get_input_embeddings().embedding_dim
        self.adaptor = SpeechAdaptor(enc_dim, llm_dim, subsample=subsample, heads=heads, layers=layers,
                                     ctc_head=ctc_weight > 0, out_rms=embedding_rms(llm) if out_norm else None)
        self.ctc_weight = ctc_weight  # weight of the auxiliary character CTC loss (0: the paper's plain recipe)
        self.llm = llm
        # the LLM token ids of the CTC characters when the LLM reads them through the bridge (bridge.py)
        self.bridge_ids = None if bridge_ids is None else list(bridge_ids)
        self.frames_per_feature = frames_per_feature  # Whisper's conv stem halves the mel frames
        self.bos_id: int | None = None
        self.eos_id: int | None = None
        # tokens the LLM's tokenizer puts before every text (e.g. Gemma's BOS); they go before the audio
        self.lead_ids: list[int] = []

    def use_tokenizer_ids(self, tok) -> None:
        """BOS, EOS and the leading tokens (``data.leading_special_ids``) of the LLM's tokenizer."""
        from ..data import leading_special_ids

        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        self.lead_ids = leading_special_ids(tok)

    def encode(self, features: torch.Tensor, feature_lens: torch.Tensor):
        self.encoder.eval()
        with torch.no_grad():
            frames = self.encoder(features).last_hidden_state  # (B, T, enc_dim)
        lens = torch.div(feature_lens + self.frames_per_feature - 1, self.frames_per_feature, rounding_mode="floor")
        return self.adaptor(frames, lens.clamp(max=frames.shape[1]))

    def encoder_frames(self, features: torch.Tensor, feature_lens: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's valid output frames per clip (cacheable: the encoder never changes)."""
        self.encoder.eval()
        with torch.no_grad():
            frames = self.encoder(features).last_hidden_state
        lens = torch.div(feature_lens + self.frames_per_feature - 1, self.frames_per_feature, rounding_mode="floor")
        return [frames[i, : int(min(lens[i], frames.shape[1]))] for i in range(frames.shape[0])]

    def forward_frames(self, frames: list[torch.Tensor], text_ids: list[list[int]], bos_id: int | None = None,
                       eos_id: int | None = None, char_ids: list[list[int]] | None = None):
        """Loss from cached encoder frames (list of (T_i, enc_dim)); with ``char_ids`` (the transcripts'
        characters, ``ctc.char_targets``) and a CTC head, plus ``ctc_weight`` x the character CTC loss."""
        audio, alens = self.adaptor(*pad_frames(frames))
        out = self._lm(*self.llm_inputs(audio, alens), text_ids, bos_id, eos_id)
        if char_ids is not None and self.adaptor.ctc_head is not None and self.ctc_weight > 0:
            out.loss = out.loss + self.ctc_weight * self.adaptor.ctc_head.loss(audio, alens, char_ids)
        return out

    def forward(self, features=None, feature_lens=None, text_ids: list[list[int]] | None = None,
                bos_id: int | None = None, eos_id: int | None = None, frames: list[torch.Tensor] | None = None,
                char_ids: list[list[int]] | None = None):
        """LM loss of the text given the audio: from log-mel ``features`` (+ ``feature_lens``) through the frozen
        encoder, or from cached encoder ``frames``. BOS/EOS default to the ids set on the model."""
        if text_ids is None:
            raise ValueError("text_ids is required")
        if frames is not None:
            return self.forward_frames(frames, text_ids, bos_id, eos_id, char_ids)
        audio, alens = self.encode(features, feature_lens)
        return self._lm(*self.llm_inputs(audio, alens), text_ids, bos_id, eos_id)

    def llm_inputs(self, audio: torch.Tensor, alens: torch.Tensor):
        """What the LLM reads for the audio: the adaptor's outputs, or through the character bridge the mix
        of its own character embeddings at each character the CTC head emits (bridge.py)."""
        if self.bridge_ids is None:
            return audio, alens
        from .bridge import bridge_embeddings

        head = self.adaptor.ctc_head
        table = token_vectors(self.llm, self.bridge_ids).to(audio.device)
        return bridge_embeddings(head.frame_logits(audio), alens * head.per_position, table.to(audio.dtype))

    def _lm(self, audio, alens, text_ids, bos_id, eos_id):
        bos_id = self.bos_id if bos_id is None else bos_id
        eos_id = self.eos_id if eos_id is None else eos_id
        if bos_id is None or eos_id is None:
            raise ValueError("bos_id and eos_id are needed (pass them or set model.bos_id / model.eos_id)")
        emb, att, lab = build_inputs(audio, alens, text_ids, self.llm.get_input_embeddings(), bos_id, eos_id,
                                     self.lead_ids)
        return self.llm(inputs_embeds=emb, attention_mask=att, labels=lab)

    @torch.no_grad()
    def transcribe_frames(self, frames: list[torch.Tensor], bos_id: int, eos_id: int,
                          max_new_tokens: int = 64) -> list[list[int]]:
        """Greedy decoding from cached encoder frames."""
        was = (self.adaptor.training, self.llm.training)
        self.adaptor.eval()
        self.llm.eval()
        try:
            outs = []
            for f in frames:
                audio, alens = self.adaptor(f[None], torch.tensor([f.shape[0]], device=f.device))
                outs += self._greedy(*self.llm_inputs(audio, alens), bos_id, eos_id, max_new_tokens)
            return outs
        finally:
            self.adaptor.train(was[0])
            self.llm.train(was[1])

    @torch.no_grad()
    def transcribe(self, features, feature_lens, bos_id: int, eos_id: int, max_new_tokens: int = 64) -> list[list[int]]:
        """Greedy decoding from [leading tokens, audio, BOS]; returns token ids per sample (without EOS)."""
        audio, alens = self.encode(features, feature_lens)
        return self._greedy(*self.llm_inputs(audio, alens), bos_id, eos_id, max_new_tokens)

    def _greedy(self, audio, alens, bos_id: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
        return greedy_after_prefix(self.llm, self.lead_ids, audio, alens, bos_id, eos_id, max_new_tokens)


@torch.no_grad()
def greedy_after_prefix(llm: nn.Module, lead_ids: list[int], inputs: torch.Tensor, lens: torch.Tensor, bos_id: int,
                        eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding, clip by clip, after [leading tokens, the clip's ``inputs`` (its first ``lens[i]`` vectors
    in the LLM's input space), BOS]; token ids per clip, without EOS."""
    emb_layer = llm.get_input_embeddings()
    lead = emb_layer(torch.tensor(lead_ids, dtype=torch.long, device=inputs.device))
    bos = emb_layer(torch.tensor([bos_id], device=inputs.device))
    outs = []
    for i in range(inputs.shape[0]):
        x = torch.cat([lead, inputs[i, : int(lens[i])], bos])[None]
        past, ids = None, []
        for _ in range(max_new_tokens):
            o = llm(inputs_embeds=x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = int(o.logits[0, -1].argmax())
            if nxt == eos_id:
                break
            ids.append(nxt)
            x = emb_layer(torch.tensor([[nxt]], device=inputs.device))
        outs.append(ids)
    return outs


def word_error_rates(references: list[str], hypotheses: list[str]) -> dict:
    """WER and CER through jiwer (pip install 'kappatune[multimodal]')."""
    try:
        import jiwer
    except ImportError:
        from ..errors import KappaTuneError

        raise KappaTuneError("WER needs jiwer: pip install 'kappatune[multimodal]'") from None
    return {"wer": float(jiwer.wer(references, hypotheses)), "cer": float(jiwer.cer(references, hypotheses))}
