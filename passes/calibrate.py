"""Calibrate: fit a DeviceSpec (effective FLOP/s, memory bandwidth, per-op overhead, the
runtime's per-action, per-message and per-step overheads, link latency and bandwidth) to times
measured on this machine.

The analytic cost model predicts a stage's forward as the sum over its nodes of the roofline
`max(flops / peak_flops, bytes / bandwidth) + op_overhead` (a convolution on a roofline of its
own, conv_flops and conv_bandwidth: on a CPU core a convolution with few channels is far from
the matmul rate, and the element-wise ops far from its bandwidth), and its backward the same way
from the B and W work; the simulator adds the runtime's own overheads. The samples come from
the runtime's measured timeline (`action_samples`): one `StageSample` per stage and action
kind, pairing the mean duration of that action in real pipelined steps with the work of
every node it ran. `fit_compute` finds the numbers that make the sums (plus one action
overhead per sample) closest to the measurements, in relative error (so a small model counts as
much as a large one). It is a grid search on the four rates in log space, with the
two overheads solved in closed form at each point (the prediction is linear in them), then a
finer grid around the best: no local minimum traps, and well under a second of numpy.

Messages and steps are read off the same timelines (`fit_runtime`): posting a send costs its
rank the median send action's time, taking a receive whose message is already there the median
such receive's time, and a step first costs the median time between the wall-clock step and the
span of its actions (`fit_step` replaces that, below). Links are fitted from ping-pong times between two ranks
(`ping_pong_ms`): a message of n bytes takes `latency + n / bandwidth` one way, a straight line.
Last, `fit_step` simulates each measured configuration's whole step on the fitted device and
fits the step overhead, and the latency (from the ping-pong's up) to what pipelined steps see:
on a machine whose cores are busy with ranks, a message waits for the receiver's progress thread
too.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipecc.costs import DeviceSpec
from pipecc.errors import ConfigError
from pipecc.ir import ActionKind, Captured, Schedule, Stage, StageCost
from pipecc.passes.annotate_costs import NodeWork, annotate_work
from pipecc.passes.simulate import TimedAction, matching_send, simulate


@dataclass(frozen=True)
class StageSample:
    """One measured stage run and the work of the nodes it ran: one (flops, bytes) per roofline term."""

    label: str  # e.g. "gpt stage 0 F (mb 4)"
    flops: tuple[int, ...]
    bytes_moved: tuple[int, ...]
    measured_ms: float
    conv: tuple[bool, ...] = ()  # per term: a convolution (timed at conv_flops); () for none
    # an F sample: whether its stage ran under autograd (True) or as the split forward graph of the
    # zero-bubble schedules (False); None for a backward sample
    forward_under_autograd: bool | None = None

    @property
    def autograd_ops(self) -> int:
        """The ops that also paid autograd_op_overhead_ms: all of an F's under autograd, else none."""
        return len(self.flops) if self.forward_under_autograd else 0

    @property
    def split_forward(self) -> bool:
        return self.forward_under_autograd is False


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
    action_overhead_ms: float = 0.0
    conv_flops: float = 0.0  # 0: no convolution among the samples, so peak_flops is used for them
    conv_bandwidth_bytes_per_s: float = 0.0  # likewise
    autograd_op_overhead_ms: float = 0.0  # the prior's where no sample ran F both ways


@dataclass(frozen=True)
class MeasuredStep:
    """One pipelined step as measured: the wall-clock time of the slowest rank from a common
    barrier to the end of its step, every rank's recorded actions (when the timeline was
    recorded), the busiest rank's CPU time in the step, and the tied-weight gradient exchange
    after the actions (the shortest rank's: the others also wait for the last to finish)."""

    wall_ms: float
    events: tuple[TimedAction, ...] = ()
    cpu_ms: float = 0.0
    tied_sync_ms: float = 0.0


@dataclass(frozen=True)
class RuntimeFit:
    message_overhead_ms: float
    step_overhead_ms: float
    receive_overhead_ms: float = 0.0
    message_ms_per_mb: float = 0.0


@dataclass(frozen=True)
class SendSample:
    """One measured send: the bytes it carried and how long posting it took."""

    num_bytes: int
    ms: float


def send_samples(stages: Sequence[Stage], steps: Sequence[MeasuredStep]) -> list[SendSample]:
    """Every recorded send of `steps` with its bytes: a SEND_F carries its stage's outputs, a SEND_B
    the gradients of its stage's activation inputs that need one."""
    carried = {}
    for stage in stages:
        carried[(ActionKind.SEND_F, stage.index)] = sum(o.spec.num_bytes for o in stage.outputs)
        carried[(ActionKind.SEND_B, stage.index)] = sum(i.spec.num_bytes for i in stage.activation_inputs
                                                        if i.spec.requires_grad)
    return [SendSample(carried[(e.action.kind, e.action.stage)], e.end_ms - e.start_ms)
            for step in steps for e in step.events if (e.action.kind, e.action.stage) in carried]


def fit_send(samples: Sequence[SendSample]) -> tuple[float, float]:
    """(overhead ms, ms per MB) of posting a send: the least-squares line through the median time of
    each message size (medians: a send that met a stall says nothing of the others), both >= 0; with
    one size, or a falling line, a flat one at the median.

    >>> fit_send([SendSample(0, 0.1), SendSample(1_000_000, 0.3), SendSample(2_000_000, 0.5)])
    (0.1, 0.2)
    """
    if not samples:
        return 0.0, 0.0
    by_size: dict[int, list[float]] = {}
    for s in samples:
        by_size.setdefault(s.num_bytes, []).append(s.ms)
    sizes = np.array(sorted(by_size), dtype=np.float64) / 1e6
    medians = np.array([statistics.median(by_size[b]) for b in sorted(by_size)])
    if len(sizes) >= 2:
        slope, intercept = np.polyfit(sizes, medians, 1)
        if slope >= 0 and intercept >= 0:
            return round(float(intercept), 12), round(float(slope), 12)
    return float(statistics.median(s.ms for s in samples)), 0.0


def action_samples(label: str, captured: Captured, stages: Sequence[Stage],
                   steps: Sequence[MeasuredStep]) -> list[StageSample]:
    """One sample per stage and compute action kind that ran (F, and BW or B and W): the mean of
    its measured durations over the steps and micro-batches (a step's time is a sum of actions,
    whose expectation is the sum of their means; medians predicted steps 5 to 10 points short),
    and the work of its nodes.

    `captured` is the model captured at the steps' micro-batch size (its nodes' work)."""
    works, _, _ = annotate_work(captured)
    durations: dict[tuple[int, ActionKind], list[float]] = {}
    for step in steps:
        for e in step.events:
            if e.action.kind.is_compute:
                durations.setdefault((e.action.stage, e.action.kind), []).append(e.end_ms - e.start_ms)
    mb = captured.microbatch_size
    samples = []
    for (stage, kind), times in sorted(durations.items(), key=lambda item: (item[0][0], list(ActionKind).index(item[0][1]))):
        nodes = [works[n] for n in stages[stage].node_names if n in works]
        terms = _action_terms(nodes, kind, first_stage=stage == 0)
        flops, bytes_moved, conv = _columns(terms)
        # the runtime's split F/B/W graphs record no autograd graph
        under_autograd = stages[stage].backward_split is None if kind is ActionKind.F else None
        samples.append(StageSample(f"{label} stage {stage} {kind.name} (mb {mb})", flops, bytes_moved,
                                   statistics.mean(times), conv, under_autograd))
    return samples


def _action_terms(nodes: Sequence[NodeWork], kind: ActionKind, first_stage: bool) -> list[tuple[int, int, bool]]:
    """The (flops, bytes, is_conv) terms node_cost times for `kind` on these nodes (none where there is
    no such work); on the first stage W runs the whole backward and B nothing (stage_backward_ms)."""
    forward = [(w.flops_forward, w.bytes_forward, w.is_conv) for w in nodes]
    backward_input = [(w.flops_backward_input, w.bytes_backward_input, w.is_conv) for w in nodes if w.has_input_grad]
    backward_weight = [(w.flops_backward_weight, w.bytes_backward_weight, w.is_conv) for w in nodes if w.trainable]
    if first_stage:
        backward_input, backward_weight = [], backward_input + backward_weight
    match kind:
        case ActionKind.F:
            return forward
        case ActionKind.B:
            return backward_input
        case ActionKind.W:
            return backward_weight
        case ActionKind.BW:
            return backward_input + backward_weight
    raise ValueError(f"{kind} is not a compute action")


def fit_runtime(steps: Sequence[MeasuredStep], sends: Sequence[SendSample] | None = None) -> RuntimeFit:
    """The runtime's message and step overheads, from measured steps (medians: other jobs on a shared
    machine only ever add time). A send costs the median send's time, or with `sends` (their bytes:
    `send_samples`) a line in its bytes (`fit_send`). The step overhead leaves out the tied-weight
    exchange, which the simulator charges by itself (StageCost.sync_ms)."""
    if sends is None:  # sizes unknown: all alike, a flat line at the median
        sends = [SendSample(0, e.end_ms - e.start_ms) for step in steps for e in step.events
                 if e.action.kind in (ActionKind.SEND_F, ActionKind.SEND_B)]
    message_ms, per_mb = fit_send(sends)
    outside = [max(0.0, step.wall_ms - _span_ms(step.events) - step.tied_sync_ms) for step in steps if step.events]
    received = [ms for step in steps for ms in _ready_receive_ms(step.events)]
    return RuntimeFit(message_ms, statistics.median(outside) if outside else 0.0,
                      statistics.median(received) if received else 0.0, per_mb)


READY_MARGIN_MS = 0.2  # a receive begun this long after its send was posted finds the message there


def _ready_receive_ms(events: Sequence[TimedAction]) -> list[float]:
    """The durations of the receives that began READY_MARGIN_MS or more after their message was sent
    (the ranks' clocks agree to about 0.1 ms: both start at a barrier)."""
    sent = {(e.action.kind, e.action.stage, e.action.microbatch): e.end_ms for e in events
            if e.action.kind in (ActionKind.SEND_F, ActionKind.SEND_B)}
    receives = [(e, matching_send(e.action)) for e in events if e.action.kind in (ActionKind.RECV_F, ActionKind.RECV_B)]
    return [e.end_ms - e.start_ms for e, send in receives if send in sent and e.start_ms >= sent[send] + READY_MARGIN_MS]


# StageCost fields that grow linearly with the link latency (the rest do not depend on it)
LINK_FIELDS = ("send_forward_ms", "send_backward_ms", "comm_ms", "sync_ms")


@dataclass(frozen=True)
class StepSample:
    """One measured configuration for the step-level fit (`fit_step`): its schedule, its stages'
    costs on the fitted device at link latency 0 and at 1 ms, and the median of its measured steps."""

    label: str
    schedule: Schedule
    costs_at_zero_latency: tuple[StageCost, ...]
    costs_at_1ms_latency: tuple[StageCost, ...]
    measured_ms: float

    def costs(self, latency_ms: float) -> list[StageCost]:
        """The stages' costs at link latency `latency_ms`, with no step overhead."""
        return [dataclasses.replace(zero, step_overhead_ms=0.0, **{
                    f: getattr(zero, f) + latency_ms * (getattr(one, f) - getattr(zero, f)) for f in LINK_FIELDS})
                for zero, one in zip(self.costs_at_zero_latency, self.costs_at_1ms_latency)]


@dataclass(frozen=True)
class FittedStep:
    """One configuration of the step fit: its simulated step at the fitted latency and overhead,
    beside the median of its measured steps."""

    label: str
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0


@dataclass(frozen=True)
class StepFit:
    link_latency_ms: float
    step_overhead_ms: float
    steps: tuple[FittedStep, ...]  # per configuration, in the order of the samples

    @property
    def mean_relative_error(self) -> float:
        """Mean |simulated / measured - 1| over the configurations."""
        return sum(abs(s.error) for s in self.steps) / len(self.steps)


MAX_LINK_LATENCY_MS = 5.0  # the highest latency fit_step searches


def fit_step(samples: Sequence[StepSample], *, min_latency_ms: float = 0.0,
             max_latency_ms: float = MAX_LINK_LATENCY_MS) -> StepFit:
    """The link latency and step overhead whose simulated steps come closest to the measured
    medians, in mean absolute relative error (a configuration whose steps met a burst of load, or
    a gloo stall, pulls them less than under squares).

    The latency is the one pipelined steps see: a message arrives that long (plus its bytes over the
    bandwidth) after it is posted. On a machine whose cores are all busy with ranks, that includes
    waking the receiver's progress thread, which a ping-pong between idle ranks does not see (on a
    2-core VM: 40-60 us by ping-pong, 0-2.5 ms per delivery in pipelined steps, mean 0.1-0.3 ms).
    It is searched on a grid from `min_latency_ms` (the ping-pong's) to `max_latency_ms`, 0.02 ms
    apart, then 0.002 ms around the best. The step overhead (the runtime's time outside the actions)
    is fitted here too, on steps measured without the timeline: the timeline's own view of it
    (`fit_runtime`) includes the barrier that lines the ranks' clocks up, and recorded steps ran
    5-46% longer than plain ones. At each latency the best overhead >= 0 is exact: a weighted
    median. (A step-level fit of the bandwidth too, tried on held-out GPipe and ZB-H1 steps,
    predicted them no better.)"""
    if not samples:
        raise ConfigError("the step-level fit needs at least one measured configuration.")
    measured = np.array([s.measured_ms for s in samples])

    def fit_at(latency: float) -> tuple[float, float, float, np.ndarray]:
        """(error, latency, step overhead, simulated steps without it) at `latency`."""
        simulated = np.array([simulate(s.schedule, s.costs(latency)).step_time_ms for s in samples])
        overhead = max(0.0, _weighted_median(measured - simulated, 1.0 / measured))
        return float(np.abs((simulated + overhead) / measured - 1).mean()), latency, overhead, simulated

    def fit_key(fit: tuple[float, float, float, np.ndarray]) -> tuple[float, float, float]:
        return fit[:3]  # the least error, then the lowest latency

    coarse = np.arange(min_latency_ms, max(min_latency_ms, max_latency_ms) + 0.01, 0.02)
    best = min((fit_at(float(latency)) for latency in coarse), key=fit_key)
    fine = np.arange(max(min_latency_ms, best[1] - 0.02), min(max_latency_ms, best[1] + 0.02) + 0.001, 0.002)
    _, latency, overhead, simulated = min([best] + [fit_at(float(latency)) for latency in fine], key=fit_key)
    steps = tuple(FittedStep(s.label, float(t) + overhead, s.measured_ms) for s, t in zip(samples, simulated))
    return StepFit(latency, overhead, steps)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The x minimising sum(weights * |values - x|).

    >>> _weighted_median(np.array([1.0, 2.0, 10.0]), np.array([1.0, 1.0, 1.0]))
    2.0
    >>> _weighted_median(np.array([1.0, 2.0, 10.0]), np.array([1.0, 1.0, 3.0]))
    10.0
    """
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _span_ms(events: Sequence[TimedAction]) -> float:
    return max(e.end_ms for e in events) - min(e.start_ms for e in events)


def _columns(terms: list[tuple[int, int, bool]]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    terms = [t for t in terms if t[:2] != (0, 0)]  # DeviceSpec.compute_ms charges nothing, not even overhead
    return tuple(f for f, _, _ in terms), tuple(b for _, b, _ in terms), tuple(c for _, _, c in terms)


def predict_ms(sample: StageSample, device: DeviceSpec) -> float:
    """The analytic prediction for `sample` on `device`: the sum split_stages makes, plus the action
    overhead the simulator adds."""
    conv = sample.conv or (False,) * len(sample.flops)
    return sum(device.compute_ms(f, b, c) for f, b, c in zip(sample.flops, sample.bytes_moved, conv)) \
        + device.action_overhead_ms + sample.autograd_ops * device.autograd_op_overhead_ms


PRIOR_WEIGHT = 1e-3  # RMS relative error a rate pays per decade squared away from the prior's


def fit_compute(samples: Sequence[StageSample], prior: DeviceSpec | None = None) -> ComputeFit:
    """Peak FLOP/s and bandwidth, the convolutions' FLOP/s and bandwidth, per-op, per-action and
    per-autograd-recorded-op overhead minimising the RMS relative error of the samples.

    The autograd overhead is told apart from the per-op one only by forward actions run both ways,
    under autograd (GPipe, 1F1B) and as split graphs (the zero-bubble schedules); samples of one
    way alone keep the prior's (0 without a prior).

    With a `prior` (the spec being calibrated), each rate also pays PRIOR_WEIGHT per squared decade
    it moves from the prior's: 0.1% of error for 10x. That is nothing against a rate the samples
    pin down, but it keeps the prior's value for a rate they barely see: fitted to U-Net alone (its
    matmul FLOPs a rounding error beside its convolutions), the matmul rate went to 1 MFLOP/s,
    the grid's floor, and every other model compiled on that spec came out a thousand times slow."""
    if len(samples) < 3:
        raise ConfigError(f"calibration needs at least 3 stage samples, got {len(samples)}.\n"
                          "Give it more models, stages or micro-batch sizes.")
    measured = np.array([s.measured_ms for s in samples])
    if not np.all(measured > 0):
        raise ConfigError("a calibration sample has a non-positive measured time; the timer failed.")
    count = np.array([len(s.flops) for s in samples], dtype=np.float64)
    autograd_ops = np.array([s.autograd_ops for s in samples], dtype=np.float64)
    fit_autograd = bool(autograd_ops.any()) and any(s.split_forward for s in samples)
    fixed_autograd_ms = 0.0 if fit_autograd or prior is None else prior.autograd_op_overhead_ms
    # the overheads' columns: per op, per autograd-recorded op (when fitted), per action
    regressors = np.stack([count] + [autograd_ops] * fit_autograd + [np.ones_like(count)], axis=1)
    target = measured - fixed_autograd_ms * autograd_ops  # what the rooflines and fitted overheads explain
    has_conv = any(any(s.conv) for s in samples)
    # log10 of (peak, bandwidth, conv rate, conv bandwidth): a grid of half-decade steps over
    # 10^6..10^13, then finer grids (a third of the span each time) around the best point; without
    # convolutions their two rates are not dimensions (0: the general ones)
    centre = np.full(4, 9.5)
    span = 3.5
    prior_rates = _prior_rates(prior)
    for _ in range(7):
        axes = [10 ** np.linspace(c - span, c + span, 15 if has_conv else 41) for c in centre]
        if not has_conv:
            axes[2:] = [np.array([0.0]), np.array([0.0])]
        best = _best_on_grid(samples, target, measured, regressors, *axes, prior=prior_rates)
        centre = np.log10([max(r, 1.0) for r in best[:4]])
        span /= 3
    peak, bw, conv, conv_bw, overheads, error = best
    autograd = overheads[1] if fit_autograd else fixed_autograd_ms
    return ComputeFit(float(peak), float(bw), float(overheads[0]), float(error), float(overheads[-1]), float(conv),
                      float(conv_bw), float(autograd))


def _prior_rates(prior: DeviceSpec | None) -> tuple[float, float, float, float] | None:
    """The prior's (peak, bandwidth, conv rate, conv bandwidth), its conv rates falling back to the general ones."""
    if prior is None:
        return None
    return (prior.peak_flops, prior.memory_bandwidth_bytes_per_s, prior.flops_per_s(conv=True),
            prior.bytes_per_s(conv=True))


def _best_on_grid(samples: Sequence[StageSample], target: np.ndarray, measured: np.ndarray, regressors: np.ndarray,
                  peaks: np.ndarray, bws: np.ndarray, conv_rates: np.ndarray, conv_bws: np.ndarray,
                  prior: tuple[float, float, float, float] | None = None) -> tuple:
    """(peak, bandwidth, conv rate, conv bandwidth, overheads, rms relative error) of the best grid
    point: the least error, plus PRIOR_WEIGHT per squared decade from the `prior` rates when given;
    conv rates of 0 time convolutions at the general ones. `target`: the measured times less what
    is charged at a fixed value; the overheads, one per column of `regressors`, explain the rest
    beside the rooflines."""
    # roofline[s, i, j, k, l]: sample s's summed max(flops / rate, bytes / bandwidth) in ms, where
    # (rate, bandwidth) is (peak_i, bw_j), or (conv_rate_k, conv_bw_l) for a convolution
    shape = (len(peaks), len(bws), len(conv_rates), len(conv_bws))
    roofline = np.zeros((len(samples), *shape))
    peak, bw = peaks[:, None, None, None], bws[None, :, None, None]
    conv_rate = np.where(conv_rates[None, None, :, None] > 0, conv_rates[None, None, :, None], peak)
    conv_bw = np.where(conv_bws[None, None, None, :] > 0, conv_bws[None, None, None, :], bw)
    for n, s in enumerate(samples):
        is_conv = np.array(s.conv or (False,) * len(s.flops), dtype=bool)
        flops, moved = np.array(s.flops, dtype=np.float64), np.array(s.bytes_moved, dtype=np.float64)
        for terms, rate, band in ((~is_conv, peak, bw), (is_conv, conv_rate, conv_bw)):
            if terms.any():
                f, b = flops[terms][:, None, None, None, None], moved[terms][:, None, None, None, None]
                roofline[n] += np.maximum(f / rate, b / band).sum(axis=0) * 1e3
    overheads, error = _overheads(target.reshape(-1, 1, 1, 1, 1) - roofline, measured, regressors)
    penalty = np.zeros(shape)
    if prior is not None:
        for axis, (values, centre) in enumerate(zip((peaks, bws, conv_rates, conv_bws), prior)):
            if values.any():  # a conv axis of [0] is no dimension
                decades = np.log10(np.maximum(values, 1.0) / centre) ** 2
                penalty += PRIOR_WEIGHT * decades.reshape([-1 if a == axis else 1 for a in range(4)])
    i, j, k, m = np.unravel_index(np.argmin(error + penalty), error.shape)
    return peaks[i], bws[j], conv_rates[k], conv_bws[m], overheads[:, i, j, k, m], error[i, j, k, m]


def _overheads(residual: np.ndarray, measured: np.ndarray, regressors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At every grid point (the axes of `residual` after the first, its samples), the overheads
    c >= 0, one per column of `regressors` (samples x overheads), minimising the RMS of
    (residual - regressors @ c) / measured, and that RMS. Weighted least squares under c >= 0: for
    every subset of the columns left free (the rest at 0), the unconstrained solution, kept where it
    is >= 0; the best of those. A subset whose columns cannot be told apart is skipped.

    >>> m = np.array([3.0, 5.0, 9.0]); n = np.array([1.0, 2.0, 4.0])
    >>> c, err = _overheads(m[:, None], m, np.stack([n, np.ones(3)], axis=1))  # measured = 2*n + 1
    >>> [round(float(x), 6) for x in c[:, 0]], round(float(err[0]), 6)
    ([2.0, 1.0], 0.0)
    """
    flat = residual.reshape(len(measured), -1)
    weights = (1.0 / measured**2)[:, None]
    num_columns = regressors.shape[1]
    best_error = np.full(flat.shape[1], np.inf)
    best = np.zeros((num_columns, flat.shape[1]))
    for free in itertools.product((False, True), repeat=num_columns):
        columns = np.flatnonzero(free)
        coefficients = np.zeros((num_columns, flat.shape[1]))
        if columns.size:
            x = regressors[:, columns]
            normal = x.T @ (weights * x)
            if np.linalg.matrix_rank(normal) < columns.size:
                continue
            coefficients[columns] = np.linalg.solve(normal, x.T @ (weights * flat))
        error = np.sqrt((((flat - regressors @ coefficients) / measured[:, None]) ** 2).mean(0))
        better = (coefficients >= 0).all(0) & (error < best_error)
        best_error = np.where(better, error, best_error)
        best = np.where(better, coefficients, best)
    return best.reshape(num_columns, *residual.shape[1:]), best_error.reshape(residual.shape[1:])


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
                      link: tuple[float, float] | None, runtime: RuntimeFit | None = None) -> DeviceSpec:
    """`base` with the fitted numbers; link fields (and the runtime's overheads) kept from `base`
    when `link` (`runtime`) is None."""
    spec = dataclasses.replace(base, name=name, peak_flops=compute.peak_flops, conv_flops=compute.conv_flops,
                               conv_bandwidth_bytes_per_s=compute.conv_bandwidth_bytes_per_s,
                               memory_bandwidth_bytes_per_s=compute.memory_bandwidth_bytes_per_s,
                               op_overhead_ms=compute.op_overhead_ms, action_overhead_ms=compute.action_overhead_ms,
                               autograd_op_overhead_ms=compute.autograd_op_overhead_ms)
    if runtime is not None:
        spec = dataclasses.replace(spec, message_overhead_ms=runtime.message_overhead_ms,
                                   receive_overhead_ms=runtime.receive_overhead_ms,
                                   message_ms_per_mb=runtime.message_ms_per_mb,
                                   step_overhead_ms=runtime.step_overhead_ms)
    if link is not None:
        spec = dataclasses.replace(spec, link_latency_ms=link[0], link_bandwidth_bytes_per_s=link[1])
    return spec
