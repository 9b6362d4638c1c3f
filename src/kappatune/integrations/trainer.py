"""Use a KappaTune selection with any HF ``Trainer`` (or your own loop).

    from kappatune.integrations.trainer import prepare, FrozenTensorsCallback
    summary = prepare(model, selection)               # freeze all, unfreeze the selection
    trainer = Trainer(model, args, ..., callbacks=[FrozenTensorsCallback()])
    trainer.train()                                   # raises at the end if a frozen tensor moved

The HF Trainer builds its AdamW from ``requires_grad`` parameters only, so frozen tensors get no optimizer
state at all.
"""

from __future__ import annotations

import logging
import signal

from transformers import TrainerCallback

from ..freeze import TrainableSummary, apply, changed, snapshot
from ..errors import KappaTuneError
from ..report import Selection

log = logging.getLogger(__name__)


def prepare(model, selection: Selection, *, check: bool = True) -> TrainableSummary:
    """Freeze ``model`` except the selected tensors; return the trainable summary. Call before the optimizer."""
    return apply(model, selection, check=check)


def enable_activation_checkpointing(model, *, use_reentrant: bool = False) -> None:
    """Activation (gradient) checkpointing that still reaches the selected tensors.

    With KappaTune the embeddings are usually frozen, so the hidden states entering the first checkpointed
    block do not require grad. Reentrant checkpointing (``use_reentrant=True``, the old default) then returns
    no gradient for any parameter inside the blocks: the selected tensors silently stop training. This turns
    checkpointing on with ``use_reentrant=False`` by default, and when reentrant checkpointing is asked for it
    also makes the embedding output require grad (``enable_input_require_grads``). Works on PEFT models too.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise KappaTuneError(f"{type(base).__name__} does not support activation checkpointing")
    if use_reentrant:
        base.enable_input_require_grads()
    if getattr(base.config, "use_cache", False):
        base.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


class FrozenTensorsCallback(TrainerCallback):
    """Hashes every frozen parameter when training starts and proves at the end none of them changed."""

    def __init__(self):
        self.snapshot: dict[str, str] = {}
        self.verified: bool | None = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.snapshot = snapshot(model, only_frozen=True)
        log.debug("frozen-tensor snapshot: %d tensors", len(self.snapshot))

    def on_train_end(self, args, state, control, model=None, **kw):
        moved = changed(model, self.snapshot)
        self.verified = not moved
        if moved:
            raise KappaTuneError(f"{len(moved)} frozen tensor(s) changed during training, e.g. {moved[0]}")


class GracefulStopCallback(TrainerCallback):
    """On SIGINT/SIGTERM: finish the current step, save a checkpoint, stop. Rerunning resumes from it."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: saving a checkpoint after this step (press Ctrl-C again to abort)")

    def on_train_begin(self, args, state, control, **kw):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not in the main thread
                pass

    def on_step_end(self, args, state, control, **kw):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kw):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
