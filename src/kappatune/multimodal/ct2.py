"""Read a CTranslate2 ``model.bin`` (its documented variable layout) and map a Whisper encoder onto
transformers' ``WhisperEncoder``, without executing anything from the file.

Layout (binary version 6): uint32 version; string spec name; uint32 revision; uint32 variable count; per
variable: string name, uint8 rank, uint32 dims, uint8 dtype id (float32, int8, int16, int32, float16,
bfloat16), uint32 byte count, raw bytes; then uint32 alias count and (alias, target) string pairs. A string
is a uint16 length (with the trailing NUL) followed by the bytes.
"""

from __future__ import annotations

import os
import re
import struct

import torch

from ..errors import KappaTuneError

_CT2_DTYPES = [torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16]


def read_ct2(path: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    def string():
        nonlocal pos
        (n,) = take("<H")
        s = data[pos:pos + n - 1].decode("utf-8")
        pos += n
        return s

    try:
        (version,) = take("<I")
        if version < 5:
            raise KappaTuneError(f"{path}: CTranslate2 binary version {version} is not supported")
        string()  # spec name
        take("<I")  # revision
        (count,) = take("<I")
        out: dict[str, torch.Tensor] = {}
        for _ in range(count):
            name = string()
            (rank,) = take("<B")
            dims = take("<" + "I" * rank) if rank else ()
            (dt,) = take("<B")
            (nbytes,) = take("<I")
            raw = bytearray(data[pos:pos + nbytes])
            pos += nbytes
            t = torch.frombuffer(raw, dtype=_CT2_DTYPES[dt]) if nbytes else torch.empty(0, dtype=_CT2_DTYPES[dt])
            out[name] = t.reshape(dims) if rank else t.reshape(())
        (n_alias,) = take("<I")
        for _ in range(n_alias):
            alias, target = string(), string()
            if target in out:
                out[alias] = out[target]
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise KappaTuneError(f"{path}: not a readable CTranslate2 model ({e})") from None
    return out


def whisper_encoder_from_ct2(folder: str, dtype: torch.dtype = torch.float32):
    """A transformers ``WhisperEncoder`` holding the encoder weights of a CTranslate2 Whisper model folder."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    v = read_ct2(os.path.join(folder, "model.bin"))
    pre = "encoder/"
    layers = sorted({int(m.group(1)) for k in v if (m := re.match(r"^encoder/layer_(\d+)/", k))})
    d_model = v[pre + "conv1/weight"].shape[0]
    n_mels = v[pre + "conv1/weight"].shape[1]
    ffn = v[pre + "layer_0/ffn/linear_0/weight"].shape[0]
    heads = int(v[pre + "num_heads"]) if pre + "num_heads" in v else max(1, d_model // 64)
    cfg = WhisperConfig(d_model=d_model, encoder_layers=len(layers), decoder_layers=1, encoder_attention_heads=heads,
                        decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, num_mel_bins=n_mels,
                        max_source_positions=v[pre + "position_encodings/encodings"].shape[0],
                        vocab_size=51864, pad_token_id=50256, bos_token_id=50257, eos_token_id=50256,
                        decoder_start_token_id=50257)
    enc = WhisperEncoder(cfg)
    sd = {}

    def put(name, t):
        sd[name] = t.to(dtype)

    put("conv1.weight", v[pre + "conv1/weight"])
    put("conv1.bias", v[pre + "conv1/bias"])
    put("conv2.weight", v[pre + "conv2/weight"])
    put("conv2.bias", v[pre + "conv2/bias"])
    put("embed_positions.weight", v[pre + "position_encodings/encodings"])
    put("layer_norm.weight", v[pre + "layer_norm/gamma"])
    put("layer_norm.bias", v[pre + "layer_norm/beta"])
    for i in layers:
        L = f"{pre}layer_{i}/"
        qkv_w, qkv_b = v[L + "self_attention/linear_0/weight"], v[L + "self_attention/linear_0/bias"]
        q_w, k_w, vv_w = qkv_w.chunk(3, 0)
        q_b, k_b, v_b = qkv_b.chunk(3, 0)
        h = f"layers.{i}."
        put(h + "self_attn.q_proj.weight", q_w)
        put(h + "self_attn.q_proj.bias", q_b)
        put(h + "self_attn.k_proj.weight", k_w)  # Whisper's k_proj has no bias (CTranslate2 stores zeros)
        put(h + "self_attn.v_proj.weight", vv_w)
        put(h + "self_attn.v_proj.bias", v_b)
        put(h + "self_attn.out_proj.weight", v[L + "self_attention/linear_1/weight"])
        put(h + "self_attn.out_proj.bias", v[L + "self_attention/linear_1/bias"])
        put(h + "self_attn_layer_norm.weight", v[L + "self_attention/layer_norm/gamma"])
        put(h + "self_attn_layer_norm.bias", v[L + "self_attention/layer_norm/beta"])
        put(h + "fc1.weight", v[L + "ffn/linear_0/weight"])
        put(h + "fc1.bias", v[L + "ffn/linear_0/bias"])
        put(h + "fc2.weight", v[L + "ffn/linear_1/weight"])
        put(h + "fc2.bias", v[L + "ffn/linear_1/bias"])
        put(h + "final_layer_norm.weight", v[L + "ffn/layer_norm/gamma"])
        put(h + "final_layer_norm.bias", v[L + "ffn/layer_norm/beta"])
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KappaTuneError(f"{folder}: CTranslate2 Whisper encoder does not map onto transformers' "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return enc.eval()
