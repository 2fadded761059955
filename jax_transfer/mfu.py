"""Model FLOP utilisation: the compiled step's FLOP count against the device's peak.

MFU = (FLOPs of one compiled step, per device) / (step time) / (peak FLOP/s of one device).
The FLOP count comes from XLA's cost analysis of the compiled (SPMD-partitioned) executable, so
it is already per device and counts what actually runs (remat recomputation included, which
makes it "hardware FLOP utilisation" when remat is on). Peaks are dense bf16 tensor-core /
MXU numbers from the vendors' data sheets — the convention of PaLM / MaxText MFU tables.
On CPU (and unknown devices) there is no peak: MFU is omitted, never guessed.
"""
from __future__ import annotations

import logging
from typing import Any

# device_kind substring (lower case) -> dense bf16 peak FLOP/s per chip / GPU. Most specific
# first: "tpu v5 lite" must win over "tpu v5".
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),   # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),   # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),        # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),          # SXM, dense bf16
    ("h100 pcie", 756e12),
    ("h100", 989e12),          # SXM / HBM3
    ("a100", 312e12),
)


def peak_flops(device) -> float | None:
  """Dense bf16 peak FLOP/s of one `jax.Device`, or None (CPU / unknown kind)."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak
  logging.warning("No peak FLOP/s known for device kind %r; MFU omitted.", device.device_kind)
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs per device of one call of a compiled executable (`jit(f).lower(...).compile()`),
  from XLA's cost analysis; None when the backend does not report it."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends raise NotImplementedError / XlaRuntimeError.
    return None
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per partition.
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 else None


def mfu(flops_per_step: float | None, steps_per_sec: float, peak: float | None) -> float | None:
  """Fraction of peak reached; None when either the FLOP count or the peak is unknown."""
  if not flops_per_step or not peak or not steps_per_sec == steps_per_sec:
    return None
  return flops_per_step * steps_per_sec / peak
