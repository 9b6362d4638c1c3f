"""Where a scan computes its spectra, chosen once per scan: the CPU routes (``spectral.spectrum``, one
matrix at a time, units spread over worker threads) or the batched float64 torch route on a device
(``spectral.spectra_torch``, a source tensor's units batched by shape).

A route's ``key`` enters the spectrum cache key: a cached CPU result is never served for a device-route
request, nor the reverse (the two agree to ~1e-8 relative, not bit for bit).
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import KappaTuneError
from .spectral import Spectrum, spectra_torch, spectrum
from .units import UnitSpec, unit_matrix

log = logging.getLogger(__name__)


def attempt(fn, *args):
    """``fn(*args)``, or the exception it raised (one bad unit never aborts a scan)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported per unit
        return e


class CpuRoute:
    """The CPU routes, one unit at a time; a source tensor's units may run on several workers."""

    key = "cpu"
    label = "cpu"  # the report's options["device"]
    batched = False

    def __init__(self, input_var: float, exact: bool) -> None:
        self.input_var = input_var
        self.exact = exact

    def _one(self, spec: UnitSpec, tensor: torch.Tensor) -> Spectrum:
        return spectrum(unit_matrix(spec, tensor), input_var=self.input_var, force_exact=self.exact)

    def spectra(self, specs: list[UnitSpec], tensor: torch.Tensor) -> list[Spectrum | Exception]:
        """One Spectrum, or the exception it raised, per unit of ``tensor``, in ``specs`` order."""
        return [attempt(self._one, spec, tensor) for spec in specs]


class DeviceRoute:
    """The batched torch route on ``device``; a source tensor's units are one call (batched by shape). If it
    fails (out of device memory, a missing solver), those units are computed on the CPU routes."""

    batched = True

    def __init__(self, device: str, input_var: float, exact: bool) -> None:
        self.device = device
        self.label = "torch:cpu" if device == "cpu" else device
        self.key = f"torch:{torch.device(device).type}"  # cuda:0 and cuda:1 run the same kernels
        self.input_var = input_var
        self.exact = exact
        self.fallback = CpuRoute(input_var, exact)

    def spectra(self, specs: list[UnitSpec], tensor: torch.Tensor) -> list[Spectrum | Exception]:
        try:
            return spectra_torch([unit_matrix(sp, tensor) for sp in specs], device=self.device,
                                 input_var=self.input_var, exact=self.exact)
        except Exception as e:  # noqa: BLE001 - e.g. out of device memory, a missing solver
            log.warning("device route on %s failed (%s); computing %d units on the CPU", self.device, e,
                        len(specs))
            return self.fallback.spectra(specs, tensor)


def choose_route(device: str | None, *, input_var: float, exact: bool) -> CpuRoute | DeviceRoute:
    """The route for ``scan(device=...)``: None / "auto" a CUDA device when one is available (the rank's own
    under torchrun), else the CPU routes; "cpu" the CPU routes; "torch:cpu" the torch route on the CPU;
    any other torch device the torch route on it."""
    dev = _torch_device(device)
    return CpuRoute(input_var, exact) if dev is None else DeviceRoute(dev, input_var, exact)


def _torch_device(device: str | None) -> str | None:
    """The torch device of the batched route, or None for the CPU routes."""
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return None
        local = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(local)}" if local is not None and torch.cuda.device_count() > 1 else "cuda"
    if device == "cpu":
        return None
    if device == "torch:cpu":
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise KappaTuneError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KappaTuneError(f"device {device!r} requested but torch sees no CUDA device")
    return str(dev)
