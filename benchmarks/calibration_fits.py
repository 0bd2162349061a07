"""Calibration fits compared on one set of measurements: which schedules to fit to, one spec for all
models or one per model, judged on the same measured steps.

    python benchmarks/calibration_fits.py                 # all examples, ~6 minutes on 2 cores
    python benchmarks/calibration_fits.py --models mlp gpt --launches 2
    python benchmarks/calibration_fits.py --models mlp --steps 2 --launches 1   # seconds: does it run

Measures every example's pipelined steps under GPipe, 1F1B and ZB-H1 at 2 and 4 micro-batches on 2
gloo ranks (what `pipecc calibrate --schedules gpipe 1f1b zb-h1` measures: each plan cut by the
`cpu` preset, --launches launches of fresh processes) and gloo ping-pongs, once. Then fits specs to
subsets of those runs (--fit-sets: the schedules each fit sees; for each, one spec to all models
and one to each model alone) and prints, per measured configuration, every spec's predicted step
on that configuration's own partition against the median measured step, and per spec the mean
error and how many configurations it predicts within 10%, over all of them and over the schedules
it was not fitted to. Every spec is judged on the same measurements, so the differences between
them are the fits', not the machine's noise (benchmarks/calibration.py compiles and measures a
plan per spec instead, as a user would, and its measured steps move 5-15% between plans).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from pipecc.calibration import (CALIBRATION_LAUNCHES, CALIBRATION_STEPS, MeasuredRun, collect_runs, fit_calibration,  # noqa: E402
                                measure_link)
from pipecc.costs import DeviceSpec  # noqa: E402

MODELS = ("gpt", "bert", "mlp", "resnet", "unet")
SCHEDULES = ("gpipe", "1f1b", "zb-h1")


def spec_of(name: str) -> str:
    return str(Path(_ROOT) / "examples" / f"{name}.py") + ":build"


def fit_label(schedules: tuple[str, ...], scope: str) -> str:
    return f"{'+'.join(schedules)} {scope}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=CALIBRATION_STEPS,
                        help=f"measured steps per configuration and launch (default {CALIBRATION_STEPS})")
    parser.add_argument("--launches", type=int, default=CALIBRATION_LAUNCHES,
                        help=f"launches of fresh rank processes per model (default {CALIBRATION_LAUNCHES})")
    parser.add_argument("--fit-sets", nargs="+", default=["1f1b", "1f1b,zb-h1"],
                        help="the schedules of each fit, comma-separated (default: 1f1b, and 1f1b,zb-h1)")
    parser.add_argument("--nice", type=int, default=0, help="add this to the process priority (e.g. -10, as root)")
    args = parser.parse_args()
    if args.nice:
        os.nice(args.nice)
    torch.set_num_threads(1)
    fit_sets = [tuple(s.split(",")) for s in args.fit_sets]
    unknown = {s for fit in fit_sets for s in fit} - set(SCHEDULES)
    if unknown:
        parser.error(f"--fit-sets: {', '.join(sorted(unknown))} not measured here; choose among {', '.join(SCHEDULES)}")

    print(f"{datetime.date.today().isoformat()}, {os.cpu_count()} cores, torch {torch.__version__}, 2 gloo ranks x 1 "
          f"thread, load average {os.getloadavg()[0]:.1f}")
    start = time.perf_counter()
    runs = collect_runs([spec_of(m) for m in args.models], schedules=SCHEDULES, num_steps=args.steps,
                        num_launches=args.launches)
    links = measure_link()
    print(f"measured in {time.perf_counter() - start:.0f} s")

    specs = {}  # fit label -> {model: DeviceSpec}, the same spec under every model for a joint fit
    fitted_to = {}  # fit label -> the schedules it saw
    for schedules in fit_sets:
        fitted_to[fit_label(schedules, "joint")] = fitted_to[fit_label(schedules, "own")] = schedules
        seen = [r for r in runs if r.plan.schedule.name in schedules]
        joint = fit_calibration(seen, links, name="joint").device
        specs[fit_label(schedules, "joint")] = dict.fromkeys(args.models, joint)
        specs[fit_label(schedules, "own")] = {m: fit_calibration([r for r in seen if r.label == m], links).device
                                              for m in args.models}
        print(describe(fit_label(schedules, "joint"), "all", joint))
        for model, device in sorted(specs[fit_label(schedules, "own")].items()):
            print(describe(fit_label(schedules, "own"), model, device))

    print("\npredicted / measured - 1 per configuration (median of the steps measured without the timeline)")
    print(f"{'model':7s} {'schedule':8s} {'mb':>2s} {'measured':>9s} " + " ".join(f"{k:>18s}" for k in specs))
    errors: dict[str, list[tuple[MeasuredRun, float]]] = {k: [] for k in specs}
    for run in runs:
        cells = []
        for label, per_model in specs.items():
            error = run.predicted_ms(per_model[run.label]) / run.measured_ms - 1
            errors[label].append((run, error))
            cells.append(f"{100 * error:+17.0f}%")
        print(f"{run.label:7s} {run.plan.schedule.name:8s} {run.plan.schedule.num_microbatches:2d} "
              f"{run.measured_ms:9.2f} " + " ".join(cells), flush=True)

    print("\nper spec: mean |error| and configurations within 10%, over all of them, and over the schedules it "
          "was not fitted to")
    for label, rows in errors.items():
        unseen = [s for s in SCHEDULES if s not in fitted_to[label]]
        print(f"{label:18s} all {summary([e for _, e in rows])}; out of sample ({', '.join(unseen)}) "
              f"{summary([e for r, e in rows if r.plan.schedule.name in unseen])}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


def describe(label: str, model: str, device: DeviceSpec) -> str:
    """The fitted overheads, link latency and step overhead of one spec, on a line."""
    return (f"{label:18s} {model:6s}: op overhead {device.op_overhead_ms * 1e3:5.1f} us, under autograd "
            f"+{device.autograd_op_overhead_ms * 1e3:4.1f} us, action overhead {device.action_overhead_ms * 1e3:3.0f} us, "
            f"link latency {device.link_latency_ms * 1e3:4.0f} us, step overhead {device.step_overhead_ms:.2f} ms")


def summary(errors: list[float]) -> str:
    if not errors:
        return "none"
    return (f"{100 * statistics.mean(abs(e) for e in errors):.1f}%, "
            f"{sum(abs(e) <= 0.10 for e in errors)} of {len(errors)} within 10%")


if __name__ == "__main__":
    sys.exit(main())
