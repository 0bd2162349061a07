"""Schedules side by side on 2 gloo ranks: measured step time beside the simulator's prediction.

    python benchmarks/schedules.py                                  # GPT example, 1f1b zb-h1 zbv auto, m = 8
    python benchmarks/schedules.py --calibrate                      # predict with a device spec fitted here first
                                                                    # (to every example's 1F1B actions, ~45 s)
    python benchmarks/schedules.py --model examples/bert.py:build --schedules 1f1b zbv --steps 10

For each schedule: pipecc compiles the model for 2 ranks (2 stages, or 4 for the V schedules),
predicts the step (passes/simulate.py), then 2 local gloo ranks with one intra-op thread each
run all the plans round-robin (so load spikes hit every schedule alike); the table has the
median wall-clock step of the slowest rank, the busiest rank's CPU time (what other jobs on a
shared machine cannot stretch), predicted beside measured, and each schedule's ratio to 1f1b.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from pipecc.calibration import Variant, calibrate, compare_steps, compile_variant, write_device  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(_ROOT) / "examples" / "gpt.py") + ":build")
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "zb-h1", "zbv", "auto"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per schedule (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="device preset or JSON the predictions use")
    parser.add_argument("--calibrate", action="store_true", help="fit a device spec to this machine first")
    parser.add_argument("--fit-models", nargs="+", default=None, metavar="MODEL",
                        help="the models --calibrate fits to (default: the five examples; one model alone "
                             "cannot tell the per-action overhead from the per-op one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each rank runs
    device = args.device
    if args.calibrate:
        start = time.perf_counter()
        examples = Path(_ROOT) / "examples"
        fitted = calibrate(args.fit_models or [f"{examples / m}.py:build" for m in ("gpt", "bert", "mlp", "resnet", "unet")])
        device = write_device(fitted.device, os.path.join(tempfile.mkdtemp(prefix="pipecc-schedules-"), "device.json"))
        print(f"calibrated in {time.perf_counter() - start:.1f} s: {fitted.summary()}")
    variants = [Variant(schedule=s, device=str(device), num_microbatches=args.microbatches) for s in args.schedules]
    chosen = [compile_variant(args.model, v, 2)[0].schedule.name for v in variants]
    results = compare_steps(args.model, variants, num_steps=args.steps)
    base = next((r for r in results if r.variant.schedule == "1f1b"), results[0])
    print(f"\n{args.model}, 2 gloo ranks x 1 thread, {args.microbatches} micro-batches, device {device}, "
          f"median of {args.steps} steps; ratios are to {base.variant.schedule} (< 1: faster)")
    print(f"{'schedule':16s} {'step pred':>9s} {'measured':>9s} {'meas/pred':>9s} {'busy pred':>9s} {'measured':>9s} "
          f"{'pred ratio':>10s} {'meas ratio':>10s}")
    for name, r in zip(chosen, results):
        label = r.variant.schedule if name == r.variant.schedule else f"{r.variant.schedule}->{name}"
        print(f"{label:16s} {r.predicted_ms:9.2f} {r.measured_ms:9.2f} {r.measured_ms / r.predicted_ms:9.2f} "
              f"{r.predicted_busy_ms:9.2f} {r.measured_busy_ms:9.2f} {r.predicted_ms / base.predicted_ms:10.3f} "
              f"{r.measured_ms / base.measured_ms:10.3f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
