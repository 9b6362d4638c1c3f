"""Where tensors come from: an nn.Module, a (sharded) safetensors file/folder, or a GGUF file.

A source lists its tensors (name, shape, dtype, owner module class when known) without loading them and
loads one tensor at a time on request, so a scan from disk never holds more than a few tensors.
No model is constructed for files.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import torch

from .errors import KappaTuneError
from .sharding import is_sharded
from .units import Entry, UnitSpec, plan_units, structure_fingerprint


class Source:
    kind: str = "abstract"
    model_type: str | None = None

    def entries(self) -> list[Entry]:  # pragma: no cover - interface
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_type": self.model_type}

    def load_order(self, keys: list[str]) -> list[str]:
        """The order in which the scan should load ``keys`` (a streaming source groups them by file)."""
        return keys

    def close(self) -> None:
        pass


class ModuleSource(Source):
    kind = "module"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        cfg = getattr(model, "config", None)
        self.model_type = getattr(cfg, "model_type", None)
        owners: dict[str, str] = {}
        for mod_name, mod in model.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                owners[f"{mod_name}.{p_name}" if mod_name else p_name] = type(mod).__name__
        self._params = dict(model.named_parameters())  # tied parameters appear once
        self._owners = owners
        for n, p in self._params.items():
            if is_sharded(p):
                raise KappaTuneError(f"parameter {n} is sharded (FSDP / DeepSpeed ZeRO-3): scan the model before "
                                     f"sharding it, or scan its checkpoint folder (kappatune scan PATH)")

    def entries(self) -> list[Entry]:
        return [Entry(n, tuple(p.shape), str(p.dtype).replace("torch.", ""), self._owners.get(n))
                for n, p in self._params.items()]

    def load(self, name: str) -> torch.Tensor:
        return self._params[name].detach()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_type": self.model_type, "class": type(self.model).__name__}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise KappaTuneError(f"cannot read {path}: {e}") from None


class SafetensorsSource(Source):
    """A .safetensors file, or a folder with model.safetensors or a sharded index.

    The header is parsed here and each tensor is read with a plain positioned read into fresh memory: no
    memory map, so pages of tensors already scanned do not stay in the process's resident set, and a scan's
    peak memory follows the tensors in flight, not the checkpoint.
    """

    kind = "safetensors"

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise KappaTuneError(f"{index}: no 'weight_map' in the shard index")
                files = sorted(set(weight_map.values()))
            else:
                files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if not files:
                    raise KappaTuneError(f"{path}: no .safetensors file in this folder")
            files = [os.path.join(path, f) for f in files]
            cfg_path = os.path.join(path, "config.json")
        else:
            files = [path]
            cfg_path = os.path.join(os.path.dirname(path) or ".", "config.json")
        self.config = _read_json(cfg_path) if os.path.exists(cfg_path) else None
        self.model_type = (self.config or {}).get("model_type")
        self.files = files
        self._where: dict[str, tuple[str, int, int, torch.dtype, tuple[int, ...]]] = {}
        self._meta: dict[str, Entry] = {}
        for f in files:
            if not os.path.exists(f):
                raise KappaTuneError(f"{f}: shard listed in the index is missing")
            for k, (start, stop, dtype, shape, dname) in read_safetensors_header(f).items():
                self._meta[k] = Entry(k, shape, dname)
                self._where[k] = (f, start, stop, dtype, shape)

    def entries(self) -> list[Entry]:
        return [self._meta[k] for k in sorted(self._meta)]

    def load(self, name: str) -> torch.Tensor:
        return read_tensor(name, *self._where[name])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "files": len(self.files),
                "model_type": self.model_type}


def read_tensor(name: str, f: str, start: int, stop: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor of a safetensors file (absolute byte range from ``read_safetensors_header``), read into fresh
    memory with a positioned read (no memory map)."""
    buf = torch.empty(stop - start, dtype=torch.uint8)
    try:
        with open(f, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(memoryview(buf.numpy()))
    except OSError as e:
        raise KappaTuneError(f"{f}: cannot read tensor {name!r} ({e})") from None
    if got != stop - start:
        raise KappaTuneError(f"{f}: tensor {name!r} is cut short; the file is truncated")
    return buf.view(dtype).reshape(shape)


_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_safetensors_header(f: str) -> dict:
    """{name: (absolute start, stop, torch dtype, shape, dtype name)}; every inconsistency is a clear error."""
    import struct

    size = os.path.getsize(f)
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise KappaTuneError(f"{f}: not a valid safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise KappaTuneError(f"{f}: not a valid safetensors file (header size {n} does not fit the file)")
            raw = fh.read(n)
    except OSError as e:
        raise KappaTuneError(f"{f}: cannot read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KappaTuneError(f"{f}: not a valid safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise KappaTuneError(f"{f}: not a valid safetensors file (the header is not a JSON object)")
    data_start = 8 + n
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            dname = v["dtype"]
            shape = tuple(int(x) for x in v["shape"])
            b, e = (int(x) for x in v["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise KappaTuneError(f"{f}: not a valid safetensors file (bad entry for {k!r})") from None
        dtype = _ST_TORCH.get(dname)
        if dtype is None:
            raise KappaTuneError(f"{f}: tensor {k!r} has an unsupported dtype {dname}")
        numel = 1
        for x in shape:
            numel *= x
        if e - b != numel * torch.empty(0, dtype=dtype).element_size() or b < 0:
            raise KappaTuneError(f"{f}: not a valid safetensors file (tensor {k!r} has inconsistent offsets)")
        if data_start + e > size:
            raise KappaTuneError(f"{f}: the file is truncated (tensor {k!r} ends past the end of the file)")
        out[k] = (data_start + b, data_start + e, dtype, shape, st_dtype_name(dname))
    return out


_ST_DTYPES = {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16", "f8_e4m3": "float8_e4m3fn",
              "f8_e5m2": "float8_e5m2", "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8",
              "u8": "uint8", "bool": "bool"}


def st_dtype_name(s: str) -> str:
    s = s.lower()
    return _ST_DTYPES.get(s, s)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


# GGUF -> transformers names for the Llama-style block layout (llama, mistral, qwen2, gemma, ...).
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
_GGUF_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GGUF_EXPS_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


def gguf_to_hf_name(name: str) -> str:
    """Map a GGUF tensor name to the transformers parameter name where the layout is known, else keep it.

    Fused GGUF experts ``blk.N.ffn_{gate,up,down}_exps.weight`` map to the per-expert unfused names
    ``model.layers.N.mlp.experts.{E}.{gate,up,down}_proj.weight`` only after slicing (see GGUFSource).
    """
    m = _GGUF_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        if part in _GGUF_BLOCK:
            return f"model.layers.{layer}.{_GGUF_BLOCK[part]}.{kind}"
        return name
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{kind}"
    return name


class GGUFSource(Source):
    """A GGUF file read through the ``gguf`` package, each tensor dequantised to float32 on load."""

    kind = "gguf"

    def __init__(self, path: str):
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise KappaTuneError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(path)
        except Exception as e:
            raise KappaTuneError(f"{path}: not a valid GGUF file ({_one_line(e)})") from None
        arch = self.reader.fields.get("general.architecture")
        self.model_type = bytes(arch.parts[-1]).decode("utf-8", "replace") if arch is not None else None
        self._tensors = {}
        self._entries: list[Entry] = []
        for t in self.reader.tensors:
            shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))  # GGUF lists ne[0] first
            em = _GGUF_EXPS_RE.match(t.name)
            if em and len(shape) == 3:
                # One fused (E, rows, cols) tensor per projection: expose per-expert unfused names.
                layer, proj = em.groups()
                for x in range(shape[0]):
                    key = f"model.layers.{layer}.mlp.experts.{x}.{proj}_proj.weight"
                    self._tensors[key] = (t, x)
                    self._entries.append(Entry(key, shape[1:], "float32"))
                continue
            key = gguf_to_hf_name(t.name)
            self._tensors[key] = (t, None)
            self._entries.append(Entry(key, shape, "float32"))
        self._last: tuple[str, torch.Tensor] | None = None

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def load(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t, x = self._tensors[name]
        if self._last is not None and self._last[0] == t.name:
            full = self._last[1]
        else:
            try:
                arr = dequantize(t.data, t.tensor_type)
            except Exception as e:
                raise KappaTuneError(f"{self.path}: cannot dequantise {t.name} ({_one_line(e)})") from None
            full = torch.from_numpy(arr.reshape(tuple(reversed([int(s) for s in t.shape]))).copy())
            self._last = (t.name, full)
        return full if x is None else full[x]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "model_type": self.model_type}


# (matches(obj) -> bool, factory(obj) -> Source), tried in order by open_source
_OPENERS: list[tuple[Callable[[Any], bool], Callable[[Any], Source]]] = []


def register_source(matches: Callable[[Any], bool]):
    """Decorator for a ``Source`` subclass (or any factory): ``open_source(obj)`` builds it when
    ``matches(obj)`` is true. Sources are tried in registration order, so the built-in ones (module, GGUF,
    safetensors; they only claim modules and existing paths) come first and a new kind of input (a hub id, a
    new file format) needs only its class and this line."""
    def deco(factory):
        _OPENERS.append((matches, factory))
        return factory
    return deco


def unregister_source(factory) -> None:
    """Remove a source registered with ``register_source`` (tests, plugins that unload)."""
    _OPENERS[:] = [(m, f) for m, f in _OPENERS if f is not factory]


def _path(obj) -> str | None:
    return os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else None


def _is_gguf(obj) -> bool:
    path = _path(obj)
    if path is None or not os.path.exists(path):
        return False
    if os.path.isdir(path):
        files = os.listdir(path)
        return not any(f.endswith(".safetensors") for f in files) and sum(f.endswith(".gguf") for f in files) == 1
    if path.endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_source(obj) -> Source:
    path = _path(obj)
    if os.path.isdir(path):
        path = os.path.join(path, next(f for f in os.listdir(path) if f.endswith(".gguf")))
    return GGUFSource(path)


register_source(lambda obj: isinstance(obj, torch.nn.Module))(ModuleSource)
register_source(_is_gguf)(_gguf_source)
register_source(lambda obj: _path(obj) is not None and os.path.exists(_path(obj)))(
    lambda obj: SafetensorsSource(_path(obj)))


def _is_hub_id(obj) -> bool:
    from .hub import is_hub_id

    return is_hub_id(obj)


def _hub_source(obj) -> Source:
    from .hub import resolve

    return SafetensorsSource(resolve(obj))  # streams shard by shard from the cache, like a local folder


register_source(_is_hub_id)(_hub_source)


def open_source(obj) -> Source:
    """An nn.Module, or a path to a .safetensors file, a model folder, or a .gguf file (or whatever else a
    registered source claims)."""
    if isinstance(obj, Source):
        return obj
    for matches, factory in _OPENERS:
        if matches(obj):
            return factory(obj)
    if _path(obj) is not None:
        raise KappaTuneError(f"{_path(obj)}: no such file or folder")
    raise KappaTuneError(f"cannot scan an object of type {type(obj).__name__}: pass an nn.Module or a path")


def model_structure_fingerprint(model: torch.nn.Module, options: dict) -> tuple[str, dict[str, UnitSpec]]:
    """The structure fingerprint a scan of ``model`` with ``options`` would have (no SVD), and its units."""
    src = open_source(model)
    plan = plan_units(src.entries(), model_type=src.model_type, embeddings=bool(options.get("embeddings")),
                      include_routers=bool(options.get("include_routers")))
    return structure_fingerprint((u.name, u.shape) for u in plan.units), {u.name: u for u in plan.units}
