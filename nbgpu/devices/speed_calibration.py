"""Figures of the speed model (`nbgpu.running.cost_model`) that only real GPUs can give, in one table, with what they
were measured on. The memory model's calibration is the sibling table in calibration.py (the same machine).

The host's work is the time the Python process needs to launch one decoder layer's kernels (eager: one call per
operation; accelerate's hooks add the hand-over checks of a layer split; DTensor adds its own dispatch to every
operation of a tensor-parallel layer; compiled paths replay graphs) and, per generated token, generate's own loop
outside the model (logits processors, stopping criteria, the bench's synchronisation). The GPU's time comes from
published figures (memory bandwidth, bf16 compute), of which real decode and prefill kernels reach a fraction.

Where each figure comes from: `bench/split_vs_tensor.py` on MEASURED_ON, random-weight Llama shapes of 1B (16
layers) and 8B (32 layers) parameters, prompt 128, per-token p50 (`bench/cost_model_vs_measured.py` prints the model
beside every measured figure):

- bandwidth_fraction 0.59: 1 GPU compiled, 8B, batch 1: the profiler saw 5.3 ms of kernels per decode step
  (matrix 4.5 + other 0.8) for 15.0 GB of weights and cache read: 2.84 TB/s of the H200's 4.8 TB/s.
- compute_fraction 0.53: 1 GPU eager, 8B, batch 16, prompt 128: a 58.3 ms prefill of 2,048 tokens at
  2 x 7.5e9 FLOP per token: 527 TFLOP/s of the H200's 989 (dense bf16).
- per token, every path, 2.15 ms: generate's own work after each token's logits (nothing hides it: the bench
  synchronises the GPUs there). 1 GPU compiled at batch 1 less its GPU time at the fractions above: 7.68 - 5.30 ms
  (8B) and 2.64 - 0.73 ms (1B), averaged.
- eager 0.724 ms per layer: 1 GPU eager at batch 1, 25.99 ms per token over 32 layers (8B) and 12.41 ms over 16
  (1B), less the 2.15 ms per token, least squares.
- hooks 1.255 ms per layer: the layer split over 2 GPUs, eager, batch 1: 41.76 ms (8B) and 23.32 ms (1B), likewise.
- dtensor 1.303 ms per layer: tensor parallel over 2 GPUs, eager, batch 1, 8B: (43.83 - 2.15) / 32.
- compiled: nothing per layer (the forward is one CUDA graph).
- compiled split 0.371 ms per layer: the layer split compiled (a compiled frame per layer), 1B, batch 1:
  (8.09 - 2.15) / 16.
- compiled tensor parallel 0.279 ms per layer: tensor parallel over 2, compiled, 8B, batch 1: (11.08 - 2.15) / 32
  (its GPUs were busy 48% / 34% of the step: the host set the pace).
"""

from __future__ import annotations

from dataclasses import dataclass

from .calibration import MEASURED_ON

MS = 1e-3


@dataclass(frozen=True)
class HostPath:
    """The host's work on one way of running a model: seconds per decoder layer and per generated token."""

    key: str
    label: str
    per_layer: float
    per_step: float


@dataclass(frozen=True)
class SpeedCalibration:
    measured_on: str
    bandwidth_fraction: float  # of the peak memory bandwidth, reached by decode kernels
    compute_fraction: float  # of the peak dense bf16 compute, reached by prefill kernels
    paths: dict[str, HostPath]

    def path(self, key: str) -> HostPath:
        return self.paths[key]


PER_TOKEN = 2.15 * MS
PATHS = {p.key: p for p in [
    HostPath("eager", "eager", 0.724 * MS, PER_TOKEN),
    HostPath("hooks", "eager with accelerate's hooks (layer split)", 1.255 * MS, PER_TOKEN),
    HostPath("dtensor", "eager tensor parallel (DTensor)", 1.303 * MS, PER_TOKEN),
    HostPath("compiled", "compiled (CUDA graphs)", 0.0, PER_TOKEN),
    HostPath("compiled_split", "compiled layer split (a compiled frame per layer)", 0.371 * MS, PER_TOKEN),
    HostPath("compiled_tensor", "compiled tensor parallel", 0.279 * MS, PER_TOKEN),
]}

DEFAULT = SpeedCalibration(measured_on=MEASURED_ON, bandwidth_fraction=0.59, compute_fraction=0.53, paths=PATHS)
