"""Helpers shared by the benchmark scripts: the problem, peak memory."""

from __future__ import annotations

import resource
import sys

import numpy as np

_MB = 2**20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory of this process inside a ``with`` block, above its start.

    On Linux the kernel's high-water mark (VmHWM) is reset on entry (by
    writing 5 to ``/proc/self/clear_refs``), so the peak belongs to the
    block alone. Elsewhere it falls back to ``ru_maxrss``, a high-water mark
    of the whole process that cannot be reset: then only a peak above any
    earlier one shows. ``mb`` is the peak minus the resident size on entry.
    """

    def __enter__(self):
        self.start_kb = _status_kb("VmRSS")
        self.resettable = False
        if self.start_kb is not None:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.resettable = True
            except OSError:
                pass
        if not self.resettable:
            self.start_kb = self._maxrss_kb()
        return self

    @staticmethod
    def _maxrss_kb() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS

    def __exit__(self, *exc):
        end_kb = _status_kb("VmHWM") if self.resettable else self._maxrss_kb()
        self.mb = max(0, end_kb - self.start_kb) / 1024
        return False


def device_peak_mb(device) -> float | None:
    """``peak_bytes_in_use`` of an accelerator in MB (None where not reported)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / _MB


def build_problem(model: str, input_shape: tuple, num_classes: int, particles: int,
                  batch_size: int, seed: int = 0):
    """``(loss_fn, params, batch)``: a fresh model and random data, one slice per particle."""
    import jax

    from sfpk_jax import models
    from sfpk_jax.train import make_loss_fn

    apply_fn, variables = models.build(
        model, num_classes=num_classes, key=jax.random.key(seed), input_shape=(1,) + input_shape)
    loss_fn = make_loss_fn(apply_fn, variables)
    rng = np.random.default_rng(seed)
    batch = {
        "image": rng.normal(size=(particles, batch_size) + input_shape).astype(np.float32),
        "label": rng.integers(0, num_classes, (particles, batch_size)).astype(np.int32),
    }
    return loss_fn, variables["params"], batch
