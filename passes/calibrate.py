"""Calibrate: fit a DeviceSpec (effective FLOP/s, memory bandwidth, per-op overhead, link latency
and bandwidth) to times measured on this machine.

The analytic cost model predicts a stage's forward as the sum over its nodes of the roofline
`max(flops / peak_flops, bytes / bandwidth) + op_overhead`, and its backward the same way
from the B and W work. A `StageSample` pairs one measured stage run (forward, or the fused
backward) with the work of every node in it; `fit_compute` finds the three numbers that make
those sums closest to the measurements, in relative error (so a small model counts as much as
a large one). It is a grid search on (peak, bandwidth) in log space, with the overhead solved
in closed form at each point (the prediction is linear in it), then a finer grid around the
best: no local minimum traps, and about 10 ms of numpy.

Links are fitted from ping-pong times between two ranks (`ping_pong_ms`): a message of n bytes
takes `latency + n / bandwidth` one way, a straight line.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from pipecc.costs import DeviceSpec
from pipecc.errors import ConfigError
from pipecc.ir import Captured, Stage
from pipecc.passes.annotate_costs import NodeWork, annotate_work
from pipecc.passes.profile import ProfileSettings, measure_stage_times


@dataclass(frozen=True)
class StageSample:
    """One measured stage run and the work of the nodes it ran: one (flops, bytes) per roofline term."""

    label: str  # e.g. "gpt stage 0 F (mb 4)"
    flops: tuple[int, ...]
    bytes_moved: tuple[int, ...]
    measured_ms: float


@dataclass(frozen=True)
class LinkSample:
    num_bytes: int
    one_way_ms: float


@dataclass(frozen=True)
class ComputeFit:
    peak_flops: float
    memory_bandwidth_bytes_per_s: float
    op_overhead_ms: float
    rms_relative_error: float  # over the samples it was fitted to


def stage_samples(label: str, captured: Captured, stages: Sequence[Stage], inputs: Sequence[torch.Tensor],
                  target: torch.Tensor, num_microbatches: int,
                  settings: ProfileSettings = ProfileSettings()) -> list[StageSample]:
    """Two samples per stage (its forward, and its fused backward), measured on real tensors."""
    works, _, _ = annotate_work(captured)
    measured = measure_stage_times(stages, inputs, target, num_microbatches, settings)
    samples = []
    for stage, times in zip(stages, measured):
        nodes = [works[n] for n in stage.node_names if n in works]
        forward = [(w.flops_forward, w.bytes_forward) for w in nodes]
        backward = _backward_terms(nodes)
        mb = captured.microbatch_size
        samples.append(StageSample(f"{label} stage {stage.index} F (mb {mb})", *_columns(forward), times.forward_ms))
        samples.append(StageSample(f"{label} stage {stage.index} BW (mb {mb})", *_columns(backward), times.backward_ms))
    return samples


def _backward_terms(nodes: Iterable[NodeWork]) -> list[tuple[int, int]]:
    """B and W of every node, as node_cost times them (no term where there is no such work)."""
    terms = []
    for w in nodes:
        if w.has_input_grad:
            terms.append((w.flops_backward_input, w.bytes_backward_input))
        if w.trainable:
            terms.append((w.flops_backward_weight, w.bytes_backward_weight))
    return terms


def _columns(terms: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    terms = [t for t in terms if t != (0, 0)]  # DeviceSpec.compute_ms charges nothing, not even overhead
    return tuple(f for f, _ in terms), tuple(b for _, b in terms)


def predict_ms(sample: StageSample, device: DeviceSpec) -> float:
    """The analytic prediction for `sample` on `device`: the same sum split_stages makes."""
    return sum(device.compute_ms(f, b) for f, b in zip(sample.flops, sample.bytes_moved))


def fit_compute(samples: Sequence[StageSample]) -> ComputeFit:
    """Peak FLOP/s, bandwidth and per-op overhead minimising the RMS relative error of the samples."""
    if len(samples) < 3:
        raise ConfigError(f"calibration needs at least 3 stage samples, got {len(samples)}.\n"
                          "Give it more models, stages or micro-batch sizes.")
    measured = np.array([s.measured_ms for s in samples])
    if not np.all(measured > 0):
        raise ConfigError("a calibration sample has a non-positive measured time; the timer failed.")
    count = np.array([len(s.flops) for s in samples], dtype=np.float64)
    log_peak, log_bw = np.log10(1e8), np.log10(1e8)
    span = 5.0
    for step in range(3):  # a coarse grid over 5 decades, then two finer ones around the best point
        peaks = 10 ** np.linspace(log_peak - (span if step else 0), log_peak + span, 41)
        bws = 10 ** np.linspace(log_bw - (span if step else 0), log_bw + span, 41)
        best = _best_on_grid(samples, measured, count, peaks, bws)
        log_peak, log_bw = np.log10(best[0]), np.log10(best[1])
        span = span / 8 if step else 0.5
    peak, bw, overhead, error = _best_on_grid(samples, measured, count, np.array([10 ** log_peak]),
                                              np.array([10 ** log_bw]))
    return ComputeFit(float(peak), float(bw), float(overhead), float(error))


def _best_on_grid(samples: Sequence[StageSample], measured: np.ndarray, count: np.ndarray, peaks: np.ndarray,
                  bws: np.ndarray) -> tuple[float, float, float, float]:
    """(peak, bandwidth, overhead, rms relative error) of the best grid point."""
    # roofline[s, i, j]: sample s's summed max(flops/peak_i, bytes/bw_j) in ms
    roofline = np.zeros((len(samples), len(peaks), len(bws)))
    for k, s in enumerate(samples):
        if not s.flops:
            continue
        f = np.array(s.flops, dtype=np.float64)[:, None, None] / peaks[None, :, None]
        b = np.array(s.bytes_moved, dtype=np.float64)[:, None, None] / bws[None, None, :]
        roofline[k] = np.maximum(f, b).sum(axis=0) * 1e3
    # relative residual (m - r - n*o)/m: least squares in o is a weighted mean, clipped at 0
    w = 1.0 / measured**2
    residual = (measured[:, None, None] - roofline)
    overhead = np.maximum(0.0, ((w * count)[:, None, None] * residual).sum(0) / max((w * count**2).sum(), 1e-30))
    error = np.sqrt((((residual - count[:, None, None] * overhead[None]) / measured[:, None, None]) ** 2).mean(0))
    i, j = np.unravel_index(np.argmin(error), error.shape)
    return peaks[i], bws[j], overhead[i, j], error[i, j]


def ping_pong_ms(sizes_bytes: Sequence[int], *, repeats: int = 20, peer: int = 1) -> list[LinkSample]:
    """One-way message time (half the fastest round trip) for each size, between this rank (0) and
    `peer`. Every rank of the initialised group must call it; ranks other than 0 and `peer` wait."""
    import torch.distributed as dist

    rank = dist.get_rank()
    samples = []
    for size in sizes_bytes:
        buffer = torch.zeros(max(1, size // 4), dtype=torch.float32)
        times = []
        for i in range(repeats + 2):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buffer, peer)
                dist.recv(buffer, peer)
            elif rank == peer:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
            if i >= 2:  # the first two are warm-up (connection set-up)
                times.append((time.perf_counter() - start) * 1e3 / 2)
        # the fastest round trip: other jobs on a shared machine only ever add to it
        samples.append(LinkSample(buffer.numel() * 4, float(np.min(times))))
    return samples


def fit_link(samples: Sequence[LinkSample]) -> tuple[float, float]:
    """(latency ms, bandwidth bytes/s) of the line through the one-way times, least squares."""
    if len(samples) < 2:
        raise ConfigError("link calibration needs at least 2 message sizes.")
    x = np.array([s.num_bytes for s in samples], dtype=np.float64)
    y = np.array([s.one_way_ms for s in samples])
    slope, intercept = np.polyfit(x, y, 1)
    slope = max(slope, 1e-12)  # ms per byte; a flat line means "faster than we can see"
    return max(float(intercept), 0.0), 1e3 / slope


def calibrated_device(base: DeviceSpec, name: str, compute: ComputeFit,
                      link: tuple[float, float] | None) -> DeviceSpec:
    """`base` with the fitted numbers; link fields kept from `base` when `link` is None."""
    spec = dataclasses.replace(base, name=name, peak_flops=compute.peak_flops,
                               memory_bandwidth_bytes_per_s=compute.memory_bandwidth_bytes_per_s,
                               op_overhead_ms=compute.op_overhead_ms)
    if link is not None:
        spec = dataclasses.replace(spec, link_latency_ms=link[0], link_bandwidth_bytes_per_s=link[1])
    return spec
