"""Training single experts inside fused MoE parameters (e.g. ``experts.gate_up_proj`` (E, 2I, H)).

``requires_grad`` cannot pick one expert, so a fused parameter with selected slices is made trainable as a
whole and three things keep every unselected slice bit-identical:

1. a gradient hook zeroes the gradient rows of unselected slices, so gradient clipping and any other use
   of ``.grad`` sees only the selected slices;
2. ``SliceAdamW`` keeps Adam moments only for the selected rows (not for the whole fused tensor) and writes
   the update back into exactly those rows with ``index_copy_``: no decoupled weight decay, momentum or
   update ever touches another row;
3. ``slice_snapshot`` hashes the unselected rows so a callback can prove they did not move.

Rows are counted in the parameter viewed as (-1, last_dim): for ``gate_up_proj`` (E, 2I, H) expert e's
gate half is rows e*2I .. e*2I+I, its up half the next I rows; for ``down_proj`` (E, H, I) expert e is rows
e*H .. e*H+H.
"""

from __future__ import annotations

import math

import torch

from .hashing import tensor_hash
from .report import Selection


def slice_rows(selection: Selection, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """{fused parameter name: sorted row indices (into p.view(-1, p.shape[-1])) of its selected slices}."""
    rows: dict[str, list[int]] = {}
    for u in selection.units:
        if u.expert is None:
            continue
        p = params[u.param]
        per_expert = p.shape[1]
        r0, r1 = u.param_rows
        base = u.expert * per_expert
        rows.setdefault(u.param, []).extend(range(base + r0, base + r1))
    return {k: torch.tensor(sorted(set(v)), dtype=torch.long) for k, v in rows.items()}


def install_grad_masks(params: dict[str, torch.nn.Parameter], rows: dict[str, torch.Tensor]) -> list:
    """Zero the gradient of every unselected row of each fused parameter; returns the hook handles."""
    handles = []
    for name, idx in rows.items():
        p = params[name]
        mask = torch.zeros(p.numel() // p.shape[-1], 1, dtype=p.dtype, device=p.device)
        mask[idx.to(p.device)] = 1

        def hook(g, mask=mask, shape=p.shape):
            return (g.reshape(-1, shape[-1]) * mask.to(g.dtype)).reshape(shape)

        handles.append(p.register_hook(hook))
    return handles


class SliceAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) whose state and updates cover only given rows.

    ``params``: a list of dicts ``{"params": [p], "rows": LongTensor | None}``; ``rows=None`` trains the whole
    tensor. Moments are stored with the shape of the trained part only.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rows=None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            rows = group["rows"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if rows is None:
                    w, g = p, p.grad
                else:
                    idx = rows.to(p.device)
                    flat = p.view(-1, p.shape[-1])
                    w = flat.index_select(0, idx)  # (n_rows, last) copy of the trained rows
                    g = p.grad.reshape(-1, p.shape[-1]).index_select(0, idx)
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                st["step"] += 1
                t = float(st["step"])
                m, v = st["exp_avg"], st["exp_avg_sq"]
                if wd:
                    w.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                if rows is not None:
                    flat.index_copy_(0, idx, w)
        return loss


def build_optimizer(model: torch.nn.Module, selection: Selection, *, lr: float, weight_decay: float = 0.0,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> SliceAdamW:
    """SliceAdamW over the selection: whole tensors for plain units, selected rows for fused-expert slices."""
    params = dict(model.named_parameters())
    rows = slice_rows(selection, params)
    groups = []
    for name in dict.fromkeys(u.param for u in selection.units):
        groups.append({"params": [params[name]], "rows": rows.get(name)})
    return SliceAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)


def slice_snapshot(model: torch.nn.Module, rows: dict[str, torch.Tensor]) -> dict[str, str]:
    """Hashes of the unselected rows of each fused parameter with selected slices."""
    params = dict(model.named_parameters())
    out = {}
    for name, idx in rows.items():
        p = params[name].detach()
        flat = p.reshape(-1, p.shape[-1])
        keep = torch.ones(flat.shape[0], dtype=torch.bool)
        keep[idx] = False
        out[name] = tensor_hash(flat[keep.to(flat.device)])
    return out
