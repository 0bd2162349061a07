"""Calibration runs: measure this machine, fit a device spec, and compare predicted with measured
steps over real gloo ranks. Behind `pipecc calibrate` and benchmarks/calibration.py.

The fitting itself is `pipecc.passes.calibrate`; this module launches what it needs: pipelined
1F1B and ZB-H1 steps of the given models on local gloo ranks, one intra-op thread each as `pipecc run`
trains, with the runtime's timeline recorded (the samples the device spec is fitted to), and a
ping-pong for the link.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from pipecc.costs import CostTable, DeviceSpec, resolve_device
from pipecc.errors import ConfigError
from pipecc.ir import Captured, Partition, StageCost
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.calibrate import (MAX_LINK_LATENCY_MS, ComputeFit, LinkSample, MeasuredStep, RuntimeFit, StageSample,
                                     StepFit, StepSample, action_samples, calibrated_device, fit_compute, fit_link,
                                     fit_runtime, fit_step, ping_pong_ms, predict_ms, send_samples)
from pipecc.passes.capture import capture
from pipecc.passes.schedules import in_flight as held_microbatches
from pipecc.passes.simulate import simulate
from pipecc.pipeline import split_partition
from pipecc.plan import Plan

log = logging.getLogger(__name__)

LINK_SIZES_BYTES = (1 << 10, 1 << 14, 1 << 18, 1 << 21)  # 1 KiB .. 2 MiB: the activations of the examples


@dataclass(frozen=True)
class Calibration:
    """A fitted device spec and the measurements behind it."""

    device: DeviceSpec
    compute: ComputeFit
    runtime: RuntimeFit
    samples: tuple[StageSample, ...]
    link_samples: tuple[LinkSample, ...]
    step: StepFit  # the step-level fit of the link latency and step overhead

    def summary(self) -> str:
        d = self.device
        ping_pong = f" (ping-pong {fit_link(self.link_samples)[0] * 1e3:.1f} us)" if self.link_samples else ""
        conv = (f" (convolutions {d.conv_flops / 1e9:.2f} GFLOP/s, {d.conv_bandwidth_bytes_per_s / 1e9:.3f} GB/s)"
                if d.conv_flops else "")
        return (f"fitted {d.name!r}: {d.peak_flops / 1e9:.2f} GFLOP/s{conv}, memory {d.memory_bandwidth_bytes_per_s / 1e9:.3f} GB/s, "
                f"op overhead {d.op_overhead_ms * 1e3:.1f} us (under autograd +{d.autograd_op_overhead_ms * 1e3:.1f} us), "
                f"action overhead {d.action_overhead_ms * 1e3:.0f} us, "
                f"message overhead {d.message_overhead_ms * 1e3:.0f} us + {d.message_ms_per_mb * 1e3:.0f} us/MB "
                f"(receive {d.receive_overhead_ms * 1e3:.0f} us), step overhead {d.step_overhead_ms:.2f} ms, "
                f"link latency {d.link_latency_ms * 1e3:.1f} us{ping_pong}, link {d.link_bandwidth_bytes_per_s / 1e9:.2f} GB/s; "
                f"RMS relative error over {len(self.samples)} measured actions {100 * self.compute.rms_relative_error:.1f}%"
                f", mean error over the measured steps {100 * self.step.mean_relative_error:.1f}%")


def _build(model_spec: str) -> tuple:
    from pipecc.cli import build_model  # the CLI's MODEL syntax: path/to/file.py:factory or module:factory

    return build_model(model_spec)


# What the samples are measured on by default; other schedules are then predicted. 1F1B runs its
# stages under autograd, as GPipe and interleaved 1F1B do. The zero-bubble schedules run split
# F/B/W graphs instead, whose forwards skip recording the autograd graph: only forwards measured
# both ways tell that cost (DeviceSpec.autograd_op_overhead_ms) from the per-op overhead, so the
# default measures both, at 2.5x the measuring time of 1F1B alone (benchmarks/calibration_fits.py,
# per-model specs, seven runs on 2-core VMs: fitted to 1F1B and ZB-H1, 201 of 210
# configurations within 10% and never under 25 of 30 in a run; to 1F1B alone 193 of 210, down to
# 24 of 30 where ZB-H1 ran 15-25% faster than its 1F1B steps).
CALIBRATION_SCHEDULES = ("1f1b", "zb-h1")
CALIBRATION_STEPS = 10  # measured steps per configuration and launch
CALIBRATION_LAUNCHES = 4  # launches of fresh rank processes per configuration: one's steps run 5-15% from the next's


@dataclass(frozen=True)
class MeasuredRun:
    """One model at one micro-batch count as calibration measured it: its plan (partitioned with the
    `cpu` preset), the model captured at its micro-batch size, its steps with the timeline recorded,
    and its steps without (what training runs: recording, and gathering the events between steps,
    made steps 5-25% longer on a 2-core VM)."""

    label: str
    plan: Plan
    captured: Captured
    steps: tuple[MeasuredStep, ...]
    plain_steps: tuple[MeasuredStep, ...]

    def _stage_costs(self, costs: CostTable) -> tuple[StageCost, ...]:
        """The plan's stages, its partition kept, costed by `costs` (and its device's link)."""
        schedule = self.plan.schedule
        partition = Partition(schedule.num_stages, {n: s.index for s in self.plan.stages for n in s.node_names}, 0.0)
        _, stages = split_partition(self.captured, partition, costs, schedule,
                                    lambda stage: held_microbatches(schedule, stage), None)
        return tuple(s.cost for s in stages)

    @property
    def configuration(self) -> str:
        """The model and schedule, e.g. "gpt 1f1b": what its action samples and step rows are labelled with."""
        return f"{self.label} {self.plan.schedule.name}"

    @property
    def measured_ms(self) -> float:
        """The median of its steps measured without recording (what training runs)."""
        return statistics.median(s.wall_ms for s in self.plain_steps)

    def predicted_ms(self, device: DeviceSpec) -> float:
        """Its step as simulated on `device`, on its own partition (a plan compiled for `device`
        may cut the model elsewhere): how well `device` predicts these measurements."""
        return simulate(self.plan.schedule, list(self._stage_costs(annotate_costs(self.captured, device)))).step_time_ms

    def step_sample(self, device: DeviceSpec) -> StepSample:
        """This run for fit_step: its stages on `device` at link latency 0 and 1 ms, and the median of
        its steps measured without recording."""
        costs = annotate_costs(self.captured, device)  # node times do not depend on the link
        at = [self._stage_costs(dataclasses.replace(costs, device=dataclasses.replace(device, link_latency_ms=ms)))
              for ms in (0.0, 1.0)]
        return StepSample(f"{self.configuration} x{self.plan.schedule.num_microbatches}",
                          self.plan.schedule, at[0], at[1], self.measured_ms)


def collect_runs(model_specs: Sequence[str], *, microbatch_counts: Sequence[int] = (2, 4),
                 num_steps: int = CALIBRATION_STEPS, num_ranks: int = 2, num_launches: int = CALIBRATION_LAUNCHES,
                 schedules: Sequence[str] = CALIBRATION_SCHEDULES) -> list[MeasuredRun]:
    """Measured steps of every model under each schedule on `num_ranks` gloo ranks at each
    micro-batch count, with the runtime's timeline recorded and without, pooled over `num_launches`
    launches of fresh rank processes (each launch's steps differ from the next's by about 10%)."""
    runs: list[MeasuredRun] = []
    configurations = [(schedule, m) for schedule in schedules for m in microbatch_counts]
    for spec in model_specs:
        model, inputs, loss_fn, target = _build(spec)  # a bad MODEL fails here, before any rank starts
        variants = tuple(Variant(schedule, "cpu", num_microbatches=m, record_timeline=recorded)
                         for recorded in (True, False) for schedule, m in configurations)
        # and a bad schedule here: compiled once in this process, then on every rank
        plans = [compile_variant(spec, variant, num_ranks)[0] for variant in variants[:len(configurations)]]
        launches = measure_launches(spec, variants, num_steps, num_ranks, num_launches)
        measured = [[step for launch in launches for step in launch[k]] for k in range(len(variants))]
        recorded, plain = measured[:len(configurations)], measured[len(configurations):]
        for plan, steps, plain_steps in zip(plans, recorded, plain):
            captured = capture(model, inputs, loss_fn, target, num_microbatches=plan.schedule.num_microbatches)
            runs.append(MeasuredRun(_label(spec), plan, captured, tuple(steps), tuple(plain_steps)))
    return runs


def _label(model_spec: str) -> str:
    return Path(model_spec.rpartition(":")[0]).stem.split(".")[-1]


def _ping_pong_rank(sizes: Sequence[int]) -> list[LinkSample]:
    return ping_pong_ms(sizes)


def measure_link(sizes_bytes: Sequence[int] = LINK_SIZES_BYTES) -> list[LinkSample]:
    """One-way message times between two local gloo ranks."""
    from pipecc.runtime.launch import spawn_local

    return spawn_local(_ping_pong_rank, 2, tuple(sizes_bytes))[0]


def calibrate(model_specs: Sequence[str], *, base: DeviceSpec | str = "cpu", name: str = "calibrated",
              measure_links: bool = True, num_steps: int = CALIBRATION_STEPS, num_launches: int = CALIBRATION_LAUNCHES,
              schedules: Sequence[str] = CALIBRATION_SCHEDULES) -> Calibration:
    """Fit a DeviceSpec to the recorded actions of pipelined steps of `model_specs` on local gloo
    ranks of this machine: compute rates and overheads to the actions, message overheads to the
    timeline, the link to gloo ping-pongs, and then the step overhead and the link latency to the
    whole steps (`fit_step`; with measure_links=False the base spec's link is kept as it is).
    The steps are those of each of `schedules` (1F1B and ZB-H1 by default, CALIBRATION_SCHEDULES;
    the others are then predicted out of sample) at 2 and 4 micro-batches.

    Each configuration is measured in `num_launches` launches of fresh rank processes: one launch's
    median step moves 5-15% from the next's on a 2-core VM, and with 2 launches two calibrations
    minutes apart predicted the GPT example's step 7% apart."""
    if not model_specs:
        raise ConfigError("calibrate needs at least one MODEL.\nFor example: pipecc calibrate examples/gpt.py:build")
    runs = collect_runs(model_specs, num_steps=num_steps, num_launches=num_launches, schedules=schedules)
    return fit_calibration(runs, measure_link() if measure_links else [], base=base, name=name)


def fit_calibration(runs: Sequence[MeasuredRun], links: Sequence[LinkSample], *, base: DeviceSpec | str = "cpu",
                    name: str = "calibrated") -> Calibration:
    """The device spec fitted to measured `runs` (`collect_runs`) and link ping-pongs (`measure_link`;
    none: the base spec's link is kept): what `calibrate` does once it has measured. Fitting the runs
    of one model alone gives a spec for that model (its unseen rates stay the base's), one of
    several models a compromise between them."""
    samples = [sample for run in runs
               for sample in action_samples(run.configuration, run.captured, run.plan.stages, run.steps)]
    base = resolve_device(base)
    compute = fit_compute(samples, prior=base)
    runtime = fit_runtime([step for run in runs for step in run.steps],
                          [send for run in runs for send in send_samples(run.plan.stages, run.steps)])
    device = calibrated_device(base, name, compute, fit_link(links) if links else None, runtime)
    # the step overhead, and the latency that makes whole simulated steps match the measured ones
    step = fit_step([run.step_sample(device) for run in runs], min_latency_ms=device.link_latency_ms,
                    max_latency_ms=MAX_LINK_LATENCY_MS if links else device.link_latency_ms)
    device = dataclasses.replace(device, link_latency_ms=step.link_latency_ms, step_overhead_ms=step.step_overhead_ms)
    return Calibration(device, compute, runtime, tuple(samples), tuple(links), step)


def format_samples(calibration: Calibration, base: DeviceSpec) -> str:
    """Per stage and action kind: its measured mean time vs predicted, before and after the fit."""
    lines = [f"{'action':34s} {'measured':>9s} {base.name:>12s} {'err':>6s} {calibration.device.name:>12s} {'err':>6s}"]
    for s in calibration.samples:
        before, after = predict_ms(s, base), predict_ms(s, calibration.device)
        lines.append(f"{s.label:34s} {s.measured_ms:9.3f} {before:12.3f} {100 * (before / s.measured_ms - 1):+5.0f}% "
                     f"{after:12.3f} {100 * (after / s.measured_ms - 1):+5.0f}%")
    return "\n".join(lines)


def format_steps(calibration: Calibration) -> str:
    """Per measured configuration (schedule and micro-batch count, steps without the timeline): the
    step simulated on the fitted spec beside the median measured step."""
    lines = [f"{'step':34s} {'measured':>9s} {calibration.device.name:>12s} {'err':>6s}"]
    for s in calibration.step.steps:
        lines.append(f"{s.label:34s} {s.measured_ms:9.3f} {s.predicted_ms:12.3f} {100 * s.error:+5.0f}%")
    return "\n".join(lines)


def write_device(device: DeviceSpec, path: str | Path) -> Path:
    """Write `device` as a device JSON file (what `--device` and `device=` read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(device.to_json(), indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Variant:
    """One way to compile the model whose steps are measured."""

    schedule: str
    device: str  # preset name or device JSON path
    cost_model: str = "analytic"
    profile_cache_dir: str | None = None
    num_microbatches: int = 4
    record_timeline: bool = False  # measure with plan.runner(record_timeline=True): its actions too


@dataclass(frozen=True)
class StepComparison:
    """Predicted vs measured step of one plan. The busy pair is the load-proof one: on a shared
    machine other jobs stretch a rank's wall-clock step, but not the CPU time it spends."""

    variant: Variant
    predicted_ms: float
    measured_ms: float  # median over steps of the slowest rank's wall-clock step time
    predicted_busy_ms: float  # the busiest rank's compute time in the simulated step
    measured_busy_ms: float  # median over steps of the busiest rank's CPU time in the step

    @property
    def error(self) -> float:
        """(predicted - measured) / measured, of the step time."""
        return self.predicted_ms / self.measured_ms - 1.0

    @property
    def busy_error(self) -> float:
        return self.predicted_busy_ms / self.measured_busy_ms - 1.0


def compile_variant(model_spec: str, variant: Variant, num_ranks: int):  # -> (Plan, inputs, target)
    import pipecc

    from pipecc.passes.schedules import default_num_stages

    model, inputs, loss_fn, target = _build(model_spec)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target,
                          num_stages=default_num_stages(variant.schedule, num_ranks), num_ranks=num_ranks,
                          num_microbatches=variant.num_microbatches, schedule=variant.schedule, device=variant.device,
                          cost_model=variant.cost_model, profile_cache_dir=variant.profile_cache_dir)
    return plan, inputs, target


MEASURE_ROUNDS = 2  # each plan's steps come in this many blocks, the plans taking turns between blocks


def _steps_rank(model_spec: str, variants: Sequence[Variant], num_steps: int,
                num_ranks: int) -> list[list[MeasuredStep]]:
    """On each rank: every variant's plan; per variant, `num_steps` measured steps.

    A plan runs its steps back to back, as training does (its weights and activations stay in
    cache; taking turns step by step with eight other plans measured GPT's 1F1B 10-20% slower), in
    MEASURE_ROUNDS blocks with the plans taking turns between blocks, so that a burst of load on a
    shared machine does not land on one plan alone. Each block begins with one unmeasured step."""
    import torch.distributed as dist

    runs = [compile_variant(model_spec, v, num_ranks) for v in variants]
    runners = [plan.runner(record_timeline=v.record_timeline) for v, (plan, _, _) in zip(variants, runs)]
    times: list[list[MeasuredStep]] = [[] for _ in variants]
    rounds = min(MEASURE_ROUNDS, num_steps)
    for block in range(rounds):
        block_steps = num_steps // rounds + (block < num_steps % rounds)
        for k, (runner, (_, inputs, target)) in enumerate(zip(runners, runs)):
            for step in range(block_steps + 1):
                measured = _measure_step(runner, inputs, target, variants[k].record_timeline)
                if step > 0:  # the first step of a block warms caches, allocators and connections up
                    times[k].append(measured)
    return times


def _measure_step(runner, inputs: Sequence[torch.Tensor], target: torch.Tensor,  # runner: DistRunner
                  record_timeline: bool) -> MeasuredStep:
    """One step of `runner` from a common barrier: the slowest rank's wall and CPU time, the shortest
    tied-weight exchange, and every rank's recorded actions."""
    import torch.distributed as dist

    dist.barrier()
    start, start_cpu = time.perf_counter(), time.process_time()
    runner.step(*inputs, target=target)
    elapsed = torch.tensor([(time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3,
                            -runner.last_shared_sync_ms])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # slowest wall and CPU time, shortest tied exchange
    events = runner.gather_events() if record_timeline else ()
    return MeasuredStep(float(elapsed[0]), tuple(events), float(elapsed[1]), -float(elapsed[2]))


def compare_steps(model_spec: str, variants: Sequence[Variant], *, num_steps: int = 5, num_ranks: int = 2,
                  num_launches: int = 1) -> list[StepComparison]:
    """Predicted vs measured step time of each variant, over `num_ranks` local gloo ranks: the median
    over `num_launches` launches of fresh rank processes of each launch's median step (the same
    plan's median moved 10-11% from one launch to the next on a 2-core VM).

    Variants that compile to the same plan (devices that cut the model alike) run the same steps, so
    that plan is measured once and its steps judge each of them: two copies of one MLP plan measured
    side by side in the same launches came out up to 38% apart on a 2-core VM, a difference no
    prediction can follow."""
    plans = [compile_variant(model_spec, v, num_ranks)[0] for v in variants]
    keys = [_runs_as(plan) for plan in plans]
    distinct: dict[tuple, Variant] = {}
    for key, variant in zip(keys, variants):
        distinct.setdefault(key, variant)  # the first variant of each distinct plan
    launches = measure_launches(model_spec, list(distinct.values()), num_steps, num_ranks, num_launches)

    def over_launches(k: int, field: str) -> float:  # the median of each launch's median
        return statistics.median(statistics.median(getattr(r, field) for r in launch[k]) for launch in launches)

    measured = {key: (over_launches(k, "wall_ms"), over_launches(k, "cpu_ms")) for k, key in enumerate(distinct)}
    timelines = [plan.simulate() for plan in plans]
    return [StepComparison(v, t.step_time_ms, measured[key][0], max(t.busy_ms), measured[key][1])
            for v, t, key in zip(variants, timelines, keys)]


def _runs_as(plan: Plan) -> tuple:
    """What a plan's steps do on the ranks: its schedule, and each stage's rank, nodes and backward
    split (the device a plan was compiled for changes its steps only through these)."""
    return plan.schedule, tuple((s.rank, s.node_names, s.backward_split is None) for s in plan.stages)


def measure_launches(model_spec: str, variants: Sequence[Variant], num_steps: int, num_ranks: int,
                     num_launches: int) -> list[list[list[MeasuredStep]]]:
    """Per launch of `num_ranks` fresh local gloo processes, per variant, its measured steps."""
    from pipecc.runtime.launch import spawn_local

    if not (isinstance(num_launches, int) and num_launches >= 1):
        raise ConfigError(f"num_launches={num_launches!r}; it must be a positive integer.")
    return [spawn_local(_steps_rank, num_ranks, model_spec, tuple(variants), num_steps, num_ranks)[0]
            for _ in range(num_launches)]


STEP_HEADER = (f"{'model':8s} {'schedule':9s} {'cost model':11s} {'step pred':>9s} {'measured':>9s} {'error':>6s} "
               f"{'busy pred':>9s} {'measured':>9s} {'error':>6s}")


def format_step_row(model: str, label: str, result: StepComparison) -> str:
    """One line of the predicted-vs-measured table (under STEP_HEADER)."""
    return (f"{model:8s} {result.variant.schedule:9s} {label:11s} {result.predicted_ms:9.2f} {result.measured_ms:9.2f} "
            f"{100 * result.error:+5.0f}% {result.predicted_busy_ms:9.2f} {result.measured_busy_ms:9.2f} "
            f"{100 * result.busy_error:+5.0f}%")
