"""Calibration benchmark: predicted vs measured step time per model and schedule, 2 gloo ranks.

    python benchmarks/calibration.py                      # all examples, gpipe, 1f1b and zb-h1
    python benchmarks/calibration.py --models gpt mlp --schedules 1f1b --steps 5 --launches 1

For each model of --fit-models (default: --models), in turn:
1. calibrates on it, as `pipecc calibrate MODEL` does (the recorded actions and steps of its 1F1B
   and ZB-H1 runs, --fit-schedules, on 2 gloo ranks, and gloo ping-pongs measured once at the
   start) and writes the spec as JSON: the `own model` spec, what a user who trains MODEL gets;
2. right after (a spec is fitted to the machine as it runs then, and on a 2-core VM the same
   plan's step moves 10-50% over a few minutes), compiles the model under each of --schedules
   three ways (the `cpu` preset, the own model spec, and profiled node times with its runtime and
   link), measures their steps on 2 local gloo ranks, one intra-op thread each, in --launches
   launches of fresh processes (each plan's steps back to back, in 2 blocks; plans that come out
   the same, as when two specs cut the model alike, are measured once and share those steps), and
   prints predicted, measured (median of the launches' medians) and the error; under each schedule
   calibration measured, how far the preset's plan (the one calibration ran) moved since.
Then one spec fitted to all those models together (`calibrated`, written to --device-out), with
its error on the steps it was fitted to, and the models left out of --fit-models judged on it, out
of sample. Before all this: per stage, the sum of the profiled node times (cost_model="profile")
against one whole-stage run (forward + backward). Last, per cost model, the mean error and how
many steps it predicted within 10%, over all and over those whose plan held still.

Timings on a shared machine are noisy: rerun and compare before trusting a digit.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import pipecc  # noqa: E402
from pipecc.calibration import (CALIBRATION_LAUNCHES, CALIBRATION_SCHEDULES, STEP_HEADER, MeasuredRun,  # noqa: E402
                                Variant, collect_runs, compare_steps, fit_calibration, format_step_row, format_steps,
                                measure_link, write_device)
from pipecc.passes.profile import measure_stage_times  # noqa: E402

MODELS = ("gpt", "bert", "mlp", "resnet", "unet")


HELD_STILL = 0.05  # a plan whose step measured within this of its calibration-time step: the machine held still


class Judged(NamedTuple):
    """One predicted step against its measurement, and how far the calibrated plan's step had moved
    since calibration (None for a schedule calibration did not measure)."""

    error: float  # |predicted / measured - 1| of the step
    busy_error: float  # the same of the busiest rank's CPU time
    drift: float | None


def describe(judged: list[Judged]) -> str:
    """Mean step and busy error, and how many steps were predicted within 10%, over all and over
    those the machine held still for."""
    still = [j for j in judged if j.drift is not None and abs(j.drift) <= HELD_STILL]
    step, busy = (100 * statistics.mean(getattr(j, field) for j in judged) for field in ("error", "busy_error"))
    return (f"{step:.1f}%; {busy:.1f}%, "
            f"{sum(j.error <= 0.10 for j in judged)} of {len(judged)} "
            f"({sum(j.error <= 0.10 for j in still)} of {len(still)})")


def spec_of(name: str) -> str:
    return str(Path(_ROOT) / "examples" / f"{name}.py") + ":build"


def profile_consistency(names: list[str], cache_dir: str) -> None:
    from pipecc.cli import build_model

    print("\nprofile consistency: sum of profiled node times / measured whole-stage time (2 stages, 4 micro-batches)")
    print(f"{'model':8s} {'stage':>5s} {'nodes ms':>9s} {'stage ms':>9s} {'ratio':>6s}")
    ratios = []
    for name in names:
        model, inputs, loss_fn, target = build_model(spec_of(name))
        plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                              num_microbatches=4, cost_model="profile", profile_cache_dir=cache_dir)
        for stage, whole in zip(plan.stages, measure_stage_times(plan.stages, inputs, target, 4)):
            measured = whole.forward_ms + whole.backward_ms
            ratios.append(stage.cost.compute_ms / measured)
            print(f"{name:8s} {stage.index:5d} {stage.cost.compute_ms:9.3f} {measured:9.3f} {ratios[-1]:6.2f}")
    print(f"median ratio {statistics.median(ratios):.2f}, range {min(ratios):.2f}..{max(ratios):.2f}")


def judge(name: str, label: str, device: str, calibration_runs: list[MeasuredRun], args: argparse.Namespace,
          cache_dir: str) -> list[tuple[str, Judged]]:
    """Compile `name` under each of --schedules on the `cpu` preset, on `device` (labelled `label`) and
    on profiled node times with `device`'s runtime and link; measure the plans and print each
    predicted step beside the measured one, and under each schedule calibration measured, how far
    the preset's plan (the one calibration ran) moved since: the machine's drift, which no fitted
    spec can follow. Returns each step judged, under its cost model."""
    variants = {"cpu preset": ("cpu", "analytic"), label: (device, "analytic"), "profiled": (device, "profile")}
    plans = [Variant(schedule=s, device=d, cost_model=c, profile_cache_dir=cache_dir if c == "profile" else None,
                     num_microbatches=args.microbatches)
             for s in args.schedules for d, c in variants.values()]
    results = compare_steps(spec_of(name), plans, num_steps=args.steps, num_launches=args.launches)
    print(STEP_HEADER)
    judged = []
    for i, schedule in enumerate(args.schedules):
        row = dict(zip(variants, results[i * len(variants):(i + 1) * len(variants)]))  # each may cut the model apart
        at_calibration = next((run.measured_ms for run in calibration_runs if (
            run.plan.schedule.name, run.plan.schedule.num_microbatches) == (schedule, args.microbatches)), None)
        drift = None if at_calibration is None else row["cpu preset"].measured_ms / at_calibration - 1
        for key, result in row.items():
            print(format_step_row(name, key, result), flush=True)
            judged.append((key, Judged(abs(result.error), abs(result.busy_error), drift)))
        if drift is not None:
            print(f"{'':19s}the cpu preset's plan measured {at_calibration:.2f} ms during calibration: "
                  f"{100 * drift:+.0f}% since (the machine's drift)")
    return judged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--fit-models", nargs="+", default=None, choices=MODELS,
                        help="models whose steps the spec is fitted to (default: --models); others are "
                             "then predicted out of sample")
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "zb-h1"])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per plan and launch")
    parser.add_argument("--launches", type=int, default=3,
                        help="launches of fresh rank processes per model; a plan's measured step is the median of "
                             "their medians (one launch's median moves about 10%% from the next's)")
    parser.add_argument("--fit-schedules", nargs="+", default=list(CALIBRATION_SCHEDULES),
                        help=f"schedules whose steps the spec is fitted to (default {' '.join(CALIBRATION_SCHEDULES)}, "
                             "what pipecc calibrate fits to: the others out of sample)")
    parser.add_argument("--fit-launches", type=int, default=CALIBRATION_LAUNCHES,
                        help="launches of fresh rank processes per model that the spec is fitted to")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--device-out", default=None, help="where to write the fitted device JSON")
    parser.add_argument("--nice", type=int, default=0,
                        help="add this to the process priority (e.g. -10, as root: the measured ranks then lose "
                             "less time to other jobs on a shared machine; their children inherit it)")
    args = parser.parse_args()
    if args.nice:
        os.nice(args.nice)
    torch.set_num_threads(1)  # as each gloo rank runs; profiled times and their cache key depend on it
    work = tempfile.mkdtemp(prefix="pipecc-calibration-")
    cache_dir = os.path.join(work, "profile-cache")
    device_path = args.device_out or os.path.join(work, "device.json")

    links = measure_link()
    print("link ping-pong (one way): " + ", ".join(f"{s.num_bytes} B {s.one_way_ms * 1e3:.0f} us" for s in links))
    profile_consistency(args.models, cache_dir)

    print(f"\npredicted / measured per step, 2 gloo ranks x 1 thread, {args.microbatches} micro-batches, median over "
          f"{args.launches} launches of the median of {args.steps} steps (error = predicted / measured - 1). 'step': "
          "wall-clock step time of the slowest rank; 'busy': CPU time of the busiest rank in the step (what other "
          "jobs on a shared machine cannot stretch)")
    fit_models = args.fit_models or args.models
    runs: list[MeasuredRun] = []
    judged: dict[str, list[Judged]] = collections.defaultdict(list)
    for name in fit_models:  # each calibrated right before its plans are measured, as a user calibrates, then trains
        start = time.perf_counter()
        own_runs = collect_runs([spec_of(name)], num_launches=args.fit_launches, schedules=args.fit_schedules)
        runs += own_runs
        own = fit_calibration(own_runs, links, name=f"calibrated on {name}")
        own_path = write_device(own.device, os.path.join(work, f"device-{name}.json"))
        print(f"\n{name} calibrated in {time.perf_counter() - start:.1f} s: {own.summary()}\n"
              f"the steps it was fitted to (without the timeline):\n{format_steps(own)}", flush=True)
        if name in args.models:  # "own model": what `pipecc calibrate MODEL` gives whoever trains MODEL
            for key, step in judge(name, "own model", str(own_path), own_runs, args, cache_dir):
                judged[key].append(step)
    # one spec fitted to all of them: judged on the steps it was fitted to, and on the models left out
    calibration = fit_calibration(runs, links)
    write_device(calibration.device, device_path)
    print(f"\nfitted to {', '.join(fit_models)} together: {calibration.summary()}\ndevice JSON: {device_path}\n"
          f"the steps it was fitted to (without the timeline):\n{format_steps(calibration)}")
    for name in (m for m in args.models if m not in fit_models):
        for key, step in judge(name, "calibrated", device_path, [], args, cache_dir):
            judged[key].append(step)
    print(f"\nmean |error| per cost model (step; busy), and steps predicted within 10% (in brackets: of the steps "
          f"whose cpu preset plan measured within {HELD_STILL:.0%} of its calibration-time step, where the machine "
          "held still): " + ", ".join(f"{k} {describe(v)}" for k, v in judged.items()))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
