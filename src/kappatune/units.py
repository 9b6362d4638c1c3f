"""What is eligible, how it becomes a 2-D matrix, and what the unit is called.

A *unit* is one weight matrix the paper would take an SVD of:

* ``nn.Linear`` weights and any other 2-D weight: the matrix as stored, (d_out, d_in);
* HF GPT-2 ``Conv1D`` (stored (d_in, d_out)): reported as (d_out, d_in);
* ``nn.Conv1d/2d/3d`` kernels and any other >=3-D weight: reshaped to (d_out, d_in * k...), as in the paper;
* fused MoE experts (transformers 5.x ``experts.gate_up_proj`` (E, 2I, H), ``experts.down_proj`` (E, H, I)):
  one unit per expert, gate and up halves separate (the paper's per-expert gate_proj / up_proj / down_proj);
* embeddings and LM heads only when asked for.

Unit names
----------
A plain unit is named exactly by its ``named_parameters()`` name. A slice of a fused expert parameter is
named ``<param>@<expert>`` (``down_proj``) or ``<param>@<expert>.gate`` / ``<param>@<expert>.up``
(``gate_up_proj``), e.g. ``model.layers.3.mlp.experts.gate_up_proj@17.up``. ``@`` is not a regex
metacharacter, so ``re.fullmatch(r".*gate_up_proj@\\d+\\.up", name)`` selects every up half.

``save_pretrained`` in transformers 5.x writes experts unfused (``mlp.experts.17.up_proj.weight``;
Mixtral: ``block_sparse_moe.experts.17.w3.weight``). A scan on disk names such a tensor by the in-memory
slice it becomes on load (``mlp.experts.gate_up_proj@17.up``) and keeps the file key in ``source``, so
both scans of one model give the same names and the same kappas.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Default parameter names that hold fused experts, first dimension = expert.
FUSED_GATE_UP = "gate_up_proj"
FUSED_DOWN = "down_proj"
FUSED_GATE = "gate_proj"
FUSED_UP = "up_proj"

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|blk|decoder_layers|encoder_layers)\.(\d+)(?:\.|$)")
_UNFUSED_EXPERT_RE = re.compile(
    r"^(?P<pre>.*)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PROJ_CANON = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_NORM_RE = re.compile(r"(?:^|[._])(?:\w*norm\w*|ln_\w+|ln\d*|layernorm\w*)(?:\.|$)", re.IGNORECASE)
_ROUTER_LAST = {"gate", "router", "shared_expert_gate", "gating", "moe_gate", "wg"}
_EMBED_RE = re.compile(r"(?:^|\.)(?:\w*embed\w*|wte|wpe|word_embeddings|tok_embeddings|position_embeddings)(?:\.|$)")
_HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output)\.weight$")
_ATTN_RE = re.compile(r"(?:attn|attention|q_proj|k_proj|v_proj|o_proj|qkv|query|key|value|out_proj|c_attn)",
                      re.IGNORECASE)
_MLP_RE = re.compile(r"(?:mlp|ffn|feed_forward|fc\d|c_fc|gate_proj|up_proj|down_proj|intermediate|dense_h_to_4h|"
                     r"dense_4h_to_h|w1|w2|w3)", re.IGNORECASE)
_CONV1D_HF_FAMILIES = {"gpt2", "decision_transformer", "imagegpt"}
_CONV1D_HF_NAMES = re.compile(r"\.(?:c_attn|c_proj|c_fc|q_attn)\.weight$")


@dataclass(frozen=True)
class Entry:
    """One tensor of a source, as the unit planner sees it."""

    source: str            # key in the source (file key or parameter name)
    shape: tuple[int, ...]
    dtype: str
    owner: str | None = None  # class name of the owning module, when the source is a module


@dataclass(frozen=True)
class UnitSpec:
    """How to get one unit's 2-D matrix out of a source tensor, and what to call it."""

    name: str                    # canonical unit name (in-memory naming)
    param: str                   # in-memory parameter it lives in
    source: str                  # source tensor key
    layout: str                  # linear | conv1d_hf | conv | embedding | expert
    kind: str                    # module kind, e.g. q_proj, c_attn, conv2, experts.up_proj
    group: str                   # attention | mlp | expert | conv | embedding | lm_head | other
    layer: int | None
    shape: tuple[int, int]       # (d_out, d_in) of the matrix
    expert: int | None = None
    half: str | None = None      # gate | up (fused gate_up halves)
    # For slices taken from a fused tensor in the *source*: (expert index, row start, row stop) in the
    # (E, out, in) layout. None when the source tensor already is the unit's matrix (unfused file key).
    source_slice: tuple[int, int, int] | None = None
    # Row range inside the in-memory parameter's expert matrix, for applying slice selections.
    param_rows: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def is_slice(self) -> bool:
        return self.expert is not None


@dataclass(frozen=True)
class Skipped:
    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class UnitPlan:
    units: list[UnitSpec] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def slice_name(param: str, expert: int, half: str | None) -> str:
    return f"{param}@{expert}" + (f".{half}" if half else "")


_SLICE_NAME_RE = re.compile(r"^(?P<param>.+)@(?P<e>\d+)(?:\.(?P<half>gate|up))?$")


def parse_slice_name(name: str) -> tuple[str, int, str | None] | None:
    """``'a.experts.gate_up_proj@3.up'`` -> ``('a.experts.gate_up_proj', 3, 'up')``; None for plain names."""
    m = _SLICE_NAME_RE.match(name)
    if not m:
        return None
    return m.group("param"), int(m.group("e")), m.group("half")


def _group(name: str, kind: str, layout: str) -> str:
    if layout == "expert":
        return "expert"
    if layout == "embedding":
        return "lm_head" if _HEAD_RE.search(name) else "embedding"
    if layout == "conv":
        return "conv"
    if _ATTN_RE.search(kind) or _ATTN_RE.search(name.rsplit(".", 2)[0] if "." in name else name):
        return "attention"
    if _MLP_RE.search(kind) or _MLP_RE.search(name):
        return "mlp"
    return "other"


def _kind(param: str) -> str:
    parts = param.split(".")
    if parts[-1] in ("weight",) and len(parts) >= 2:
        return parts[-2]
    return parts[-1]


def _is_router(name: str) -> bool:
    parts = name.split(".")
    last = parts[-2] if parts[-1] == "weight" and len(parts) >= 2 else parts[-1]
    return last in _ROUTER_LAST or "router" in last


def _skip_reason(e: Entry, embeddings: bool, include_routers: bool) -> str | None:
    name = e.source
    owner = (e.owner or "")
    if name.endswith(".bias") or name == "bias":
        return "bias"
    if "norm" in owner.lower() or _NORM_RE.search(name):
        return "normalisation parameter"
    if len(e.shape) < 2:
        return "1-D parameter (scale/bias-like, not a matrix)"
    if min(e.shape) == 0:
        return "empty tensor"
    if not include_routers and _is_router(name):
        return "MoE router (routing is left unchanged, as in the paper; include_routers=True to scan it)"
    is_embed = "Embedding" in owner or (not owner and (_EMBED_RE.search(name) or _HEAD_RE.search(name))) or \
        (owner and _HEAD_RE.search(name) and "lm_head" in name)
    if is_embed and not embeddings:
        return "embedding / LM head (scanned only with embeddings=True / --embeddings)"
    if e.dtype.startswith("int") or e.dtype in ("bool", "uint8"):
        return f"integer tensor ({e.dtype}): not a float weight"
    return None


def _expert_pair_layout(entries_by_name: dict[str, Entry], param: str) -> str | None:
    """Check a fused gate_up/down pair has the standard (E, 2I, H) / (E, H, I) layout."""
    base = param.rsplit(".", 1)[0]
    gu = entries_by_name.get(f"{base}.{FUSED_GATE_UP}")
    dn = entries_by_name.get(f"{base}.{FUSED_DOWN}")
    if gu is None or dn is None or len(gu.shape) != 3 or len(dn.shape) != 3:
        return None
    e1, two_i, h = gu.shape
    e2, h2, i = dn.shape
    if e1 == e2 and two_i == 2 * i and h == h2:
        return "standard"
    return None


def plan_units(entries: list[Entry], *, model_type: str | None = None, embeddings: bool = False,
               include_routers: bool = False) -> UnitPlan:
    """Turn a source's tensors into units (and skipped tensors with reasons). Deterministic order."""
    plan = UnitPlan()
    by_name = {e.source: e for e in entries}
    conv1d_family = (model_type or "") in _CONV1D_HF_FAMILIES
    for e in entries:
        reason = _skip_reason(e, embeddings, include_routers)
        if reason is not None:
            plan.skipped.append(Skipped(e.source, tuple(e.shape), reason))
        elif _is_fused_experts(e):
            plan.units += _fused_expert_units(e, by_name)
        elif len(e.shape) == 2 and _UNFUSED_EXPERT_RE.match(e.source):
            plan.units.append(_unfused_expert_unit(e, by_name))
        else:
            plan.units.append(_plain_unit(e, conv1d_family))
    return plan


def _is_fused_experts(e: Entry) -> bool:
    """Fused experts held as one 3-D parameter (in memory, or fused on disk), first dimension = expert."""
    last = e.source.rsplit(".", 1)[-1]
    return len(e.shape) == 3 and ".experts." in f".{e.source}" and \
        last in (FUSED_GATE_UP, FUSED_DOWN, FUSED_GATE, FUSED_UP)


def _fused_expert_units(e: Entry, by_name: dict[str, Entry]) -> list[UnitSpec]:
    """One unit per expert of an (E, rows, cols) tensor; a standard gate_up_proj gives two, gate and up."""
    name = e.source
    n_exp, rows, cols = e.shape
    last = name.rsplit(".", 1)[-1]
    if last == FUSED_GATE_UP and _expert_pair_layout(by_name, name) == "standard":
        half_rows = rows // 2
        return [UnitSpec(name=slice_name(name, x, half), param=name, source=name, layout="expert",
                         kind=f"experts.{half}_proj", group="expert", layer=layer_index(name),
                         shape=(r1 - r0, cols), expert=x, half=half, source_slice=(x, r0, r1), param_rows=(r0, r1))
                for x in range(n_exp) for half, (r0, r1) in (("gate", (0, half_rows)), ("up", (half_rows, rows)))]
    kind = {FUSED_GATE_UP: "gate_up_proj"}.get(last, last)
    return [UnitSpec(name=slice_name(name, x, None), param=name, source=name, layout="expert",
                     kind=f"experts.{kind}", group="expert", layer=layer_index(name), shape=(rows, cols),
                     expert=x, half=None, source_slice=(x, 0, rows), param_rows=(0, rows))
            for x in range(n_exp)]


def _unfused_expert_unit(e: Entry, by_name: dict[str, Entry]) -> UnitSpec:
    """An unfused expert matrix on disk, named by the in-memory fused slice it becomes on load."""
    name, shape = e.source, tuple(e.shape)
    m = _UNFUSED_EXPERT_RE.match(name)
    pre = re.sub(r"\.block_sparse_moe$", ".mlp", m.group("pre"))
    proj = _PROJ_CANON.get(m.group("proj"), m.group("proj"))
    x = int(m.group("e"))
    if proj == "down_proj":
        param, half, rows = f"{pre}.experts.{FUSED_DOWN}", None, (0, shape[0])
    else:
        half = proj[: -len("_proj")]
        gate_key = next((k for k in (f"{m.group('pre')}.experts.{x}.gate_proj.weight",
                                     f"{m.group('pre')}.experts.{x}.w1.weight") if k in by_name), None)
        i_rows = by_name[gate_key].shape[0] if gate_key else shape[0]
        param = f"{pre}.experts.{FUSED_GATE_UP}"
        rows = (0, i_rows) if half == "gate" else (i_rows, i_rows + shape[0])
    return UnitSpec(name=slice_name(param, x, half), param=param, source=name, layout="expert",
                    kind=f"experts.{proj}", group="expert", layer=layer_index(name), shape=(shape[0], shape[1]),
                    expert=x, half=half, source_slice=None, param_rows=rows)


def _plain_unit(e: Entry, conv1d_family: bool) -> UnitSpec:
    """A Linear-like, HF Conv1D, ConvNd or embedding weight: one unit, named by its parameter."""
    name, shape, owner = e.source, tuple(e.shape), e.owner or ""
    kind = _kind(name)
    if "Embedding" in owner or ((not owner) and (_EMBED_RE.search(name) or _HEAD_RE.search(name))) or \
            (_HEAD_RE.search(name) and "lm_head" in name):
        layout, mat = "embedding", (shape[0], math.prod(shape[1:]))
    elif owner == "Conv1D" or (not owner and conv1d_family and len(shape) == 2 and _CONV1D_HF_NAMES.search(name)):
        layout, mat = "conv1d_hf", (shape[1], shape[0])  # stored (in, out): report (out, in)
    elif len(shape) >= 3:
        layout, mat = "conv", (shape[0], math.prod(shape[1:]))  # (d_out, d_in * k...)
    else:
        layout, mat = "linear", (shape[0], shape[1])
    return UnitSpec(name=name, param=name, source=name, layout=layout, kind=kind,
                    group=_group(name, kind, layout), layer=layer_index(name), shape=mat)


def structure_fingerprint(pairs: Iterable[tuple[str, tuple[int, int]]]) -> str:
    """Hash of the unit names and matrix shapes: identifies the architecture a report/selection fits."""
    h = hashlib.sha256()
    for name, shape in sorted(pairs):
        h.update(f"{name}|{shape[0]}x{shape[1]}\n".encode())
    return h.hexdigest()[:16]


def raw_unit(spec: UnitSpec, tensor):
    """The unit's values in the layout they are stored in (no transpose, no reshape): what its content hash
    is taken of, the same on disk and in memory."""
    if spec.source_slice is not None:
        x, r0, r1 = spec.source_slice
        return tensor[x, r0:r1]
    return tensor


def unit_matrix(spec: UnitSpec, tensor):
    """The unit's 2-D matrix from its source tensor (a view where possible)."""
    if spec.source_slice is not None:
        x, r0, r1 = spec.source_slice
        return tensor[x, r0:r1]
    if spec.layout == "conv1d_hf":
        return tensor.T
    if tensor.dim() > 2:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor
