"""The `pipecc` command: partition reports with pictures, emitted plans, and local training runs.

    pipecc report examples/gpt.py:build --stages 4 --microbatches 8 --schedule 1f1b --plot gpt.png
    pipecc emit examples/gpt.py:build --stages 2 -o gpt_plan
    torchrun --nproc-per-node 2 -m pipecc.run gpt_plan --steps 5
    pipecc run examples/gpt.py:build --ranks 2 --microbatches 4 --steps 5
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from pipecc.errors import ConfigError, PipeccError

if TYPE_CHECKING:
    from pipecc.passes.simulate import Timeline

Factory = Callable[[], tuple]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'20GiB' -> 21474836480; plain numbers are bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"cannot read memory size {text!r}.\nWrite it like 20GiB, 512MiB or 1e9.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def load_factory(spec: str) -> Factory:
    """The factory named by 'path/to/file.py:name' or 'package.module:name'."""
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name:
        raise ConfigError(f"MODEL {spec!r} is not of the form path/to/file.py:factory or package.module:factory.\n"
                          "Name the function that builds the model after a colon, e.g. examples/gpt.py:build.")
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise ConfigError(f"MODEL file {module_part!r} does not exist.\n"
                              "Give the path relative to the current directory, e.g. examples/gpt.py:build.")
        module_spec = importlib.util.spec_from_file_location(f"pipecc_model_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as err:
            raise ConfigError(f"cannot import {module_part!r} for MODEL {spec!r}: {err}.\n"
                              "Run from the directory that holds the package, or give a file path instead.") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{module_part!r} has no callable {name!r}.\n"
                          "Name a function that returns (model, example_inputs, loss_fn, target).")
    return factory


def build_model(spec: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], Callable[..., torch.Tensor], torch.Tensor]:
    """Call the MODEL factory and check it returns (model, example_inputs, loss_fn, target)."""
    built = load_factory(spec)()
    if not isinstance(built, tuple) or len(built) != 4:
        raise ConfigError(
            f"{spec} returned {type(built).__name__}{' of length ' + str(len(built)) if isinstance(built, tuple) else ''}; "
            "pipecc needs (model, example_inputs, loss_fn, target) to train a pipeline."
        )
    model, inputs, loss_fn, target = built
    return model, tuple(inputs), loss_fn, target


def _compile_kwargs(args: argparse.Namespace, num_stages: int, num_ranks: int | None = None) -> dict[str, object]:
    """pipecc.compile's keyword arguments from the command line (the same on every rank of `run`)."""
    auto = getattr(args, "auto", False)  # report --auto: search what the command line leaves open
    microbatches = args.microbatches if args.microbatches is not None else ("auto" if auto else 4)
    kwargs: dict[str, object] = dict(
        num_stages="auto" if auto else num_stages, num_microbatches=microbatches, schedule=args.schedule,
        device=args.device, max_memory_bytes=parse_bytes(args.memory_limit) if args.memory_limit else None)
    if num_ranks is not None:
        kwargs["num_ranks"] = num_ranks
    if args.cluster:
        kwargs["cluster"] = args.cluster
    if getattr(args, "formulas", False):
        kwargs["symbolic_sizes"] = True
    return kwargs


def _compile(args: argparse.Namespace, spec: str, num_stages: int, num_ranks: int | None = None):  # -> Plan
    from pipecc.api import compile as compile_plan

    model, inputs, loss_fn, target = build_model(spec)
    plan = compile_plan(model, inputs, loss_fn=loss_fn, example_target=target,
                        **_compile_kwargs(args, num_stages, num_ranks))  # type: ignore[arg-type]
    return plan, (model, inputs, loss_fn, target)


def cmd_report(args: argparse.Namespace) -> int:
    from pipecc import render

    auto_ranks = args.ranks or (None if args.cluster else args.stages)  # --auto: the ranks it may use
    plan, _ = _compile(args, args.model, args.stages, num_ranks=auto_ranks if args.auto else None)
    timeline = plan.simulate()
    if args.format == "json":
        from pipecc.passes.codegen import plan_to_json

        print(json.dumps({**plan_to_json(plan), "prediction": prediction_json(timeline)}, indent=2, sort_keys=True))
    else:
        print(plan.report(formulas=args.formulas))
        print(f"\npredicted per rank:\n{render.format_prediction(timeline)}")
        print(f"\n{render.format_timeline(timeline, width=args.width)}")
    for path, write in ((args.plot, render.plot_timeline), (args.trace, render.write_trace)):
        if path:
            write(timeline, path)
            print(f"wrote {path}", file=sys.stderr if args.format == "json" else sys.stdout)
    return 0


def prediction_json(timeline: Timeline) -> dict[str, object]:
    """The simulator's numbers for `report --format json`."""
    return {"step_time_ms": timeline.step_time_ms, "bubble_ratio": timeline.bubble_ratio,
            "busy_ms": list(timeline.busy_ms), "idle_ms": list(timeline.idle_ms),
            "peak_memory_bytes": list(timeline.peak_memory_bytes)}


def cmd_emit(args: argparse.Namespace) -> int:
    from pipecc.run import save_batch

    plan, (_, inputs, _, target) = _compile(args, args.model, args.stages)
    directory = plan.emit(args.output)
    save_batch(directory, inputs, target)
    files = sorted(p.name for p in directory.iterdir())
    print(f"emitted a {plan.num_ranks}-rank plan ({len(plan.stages)} stages, schedule {plan.schedule.name}) "
          f"to {directory}: {', '.join(files)}")
    print(f"train it with: torchrun --nproc-per-node {plan.num_ranks} -m pipecc.run {directory} --steps 5")
    return 0


def _train_rank(spec: str, compile_kwargs: dict[str, object], steps: int, lr: float) -> list[tuple[float, float]]:
    """One rank of `pipecc run`: compile (the same plan on every rank), then train `steps` SGD steps."""
    import torch.distributed as dist

    from pipecc.api import compile as compile_plan
    from pipecc.run import train

    model, inputs, loss_fn, target = build_model(spec)
    plan = compile_plan(model, inputs, loss_fn=loss_fn, example_target=target, **compile_kwargs)  # type: ignore[arg-type]
    return train(plan, inputs, target, steps=steps, lr=lr, timeout_s=300.0,
                 log_rank=dist.get_rank() == plan.schedule.stage_to_rank[-1])


def cmd_run(args: argparse.Namespace) -> int:
    from pipecc.passes.schedules import default_num_stages
    from pipecc.runtime.launch import spawn_local

    num_stages = default_num_stages(args.schedule, args.ranks)
    kwargs = _compile_kwargs(args, num_stages, num_ranks=args.ranks)
    plan, _ = _compile(args, args.model, num_stages, num_ranks=args.ranks)
    print(plan.report())
    print(f"\ntraining {args.steps} steps on {args.ranks} local gloo ranks ...", flush=True)
    history = spawn_local(_train_rank, args.ranks, args.model, kwargs, args.steps, args.lr)[0]
    times = sorted(ms for _, ms in history[1:]) or [history[0][1]]
    measured = times[len(times) // 2]
    predicted = plan.simulate().step_time_ms
    print(f"median step time {measured:.1f} ms (first step, with warm-up, excluded); "
          f"predicted {predicted:.1f} ms on device spec {plan.device.name!r} (measured/predicted {measured / predicted:.2f}); "
          f"final loss {history[-1][0]:.6f}")
    return 0


def _schedule_help() -> str:
    from pipecc.passes.schedules import SCHEDULES

    return ("pipeline schedule (default 1f1b): " + "; ".join(f"{k.name}: {k.summary}" for k in SCHEDULES.values())
            + "; auto: every schedule that fits the memory limit, the fastest by the simulator")


def make_parser() -> argparse.ArgumentParser:
    from pipecc.calibration import CALIBRATION_LAUNCHES, CALIBRATION_SCHEDULES

    parser = argparse.ArgumentParser(
        prog="pipecc", description="Pipeline-parallelism compiler for PyTorch: partition a model into balanced "
                                   "pipeline stages, predict and draw its schedule, emit and run it.",
        epilog="MODEL is path/to/file.py:factory or package.module:factory; the factory returns "
               "(model, example_inputs, loss_fn, target). Example: pipecc report examples/gpt.py:build "
               "--stages 4 --microbatches 8 --plot gpt.png")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL",
                       help="path/to/file.py:factory or package.module:factory returning "
                            "(model, example_inputs, loss_fn, target)")
        p.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default 4)")
        p.add_argument("--schedule", default=None, help=_schedule_help())
        p.add_argument("--device", default="cpu", help="cpu, a100, h100, or a device JSON file (default cpu)")
        p.add_argument("--memory-limit", default=None, help="per-rank memory limit, e.g. 20GiB or 512MiB")
        p.add_argument("--cluster", metavar="CLUSTER.json", default=None,
                       help="per-rank speed, memory and link (pipecc.cluster.Cluster JSON); default identical ranks")

    report = sub.add_parser("report", help="print the partition, the predicted step per rank and its timeline",
                            description="Compile MODEL and print the per-stage table, the simulator's prediction "
                                        "per rank and an ASCII timeline of the schedule; optionally draw it.")
    common(report)
    report.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    report.add_argument("--format", choices=("text", "json"), default="text",
                        help="text (default) or json: the plan as in plan.json, plus the prediction")
    report.add_argument("--plot", metavar="OUT.png|OUT.svg", default=None,
                        help="draw the per-rank Gantt chart into a PNG or SVG file (needs pipecc[plot])")
    report.add_argument("--trace", metavar="OUT.json", default=None,
                        help="write the predicted timeline as Chrome/Perfetto trace events (one track per rank)")
    report.add_argument("--width", type=int, default=100, help="columns of the ASCII timeline (default 100)")
    report.add_argument("--formulas", action="store_true",
                        help="also print each stage's time and memory as formulas in the micro-batch size b")
    report.add_argument("--auto", action="store_true",
                        help="search ranks x stages per rank x micro-batches x schedule with the simulator and "
                             "report the fastest that fits, with every candidate; --microbatches / --schedule fix them")
    report.add_argument("--ranks", type=int, default=None,
                        help="with --auto: the ranks available (default: the --cluster's, else --stages)")
    report.set_defaults(func=cmd_report)

    emit = sub.add_parser("emit", help="write the plan: plan.json, one Python module and weight shard per rank",
                          description="Compile MODEL and write the plan into DIR, with the factory's example batch "
                                      "as batch.pt; train it with torchrun --nproc-per-node N -m pipecc.run DIR.")
    common(emit)
    emit.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    emit.add_argument("-o", "--output", metavar="DIR", required=True, help="directory to write (created if needed)")
    emit.set_defaults(func=cmd_emit)

    run = sub.add_parser("run", help="train a few pipelined steps on local gloo ranks",
                         description="Spawn --ranks local gloo processes, train --steps SGD steps on the factory's "
                                     "example batch, and print the measured against the predicted step time.")
    common(run)
    run.add_argument("--ranks", type=int, default=2,
                     help="processes (default 2); one stage each, two with the V schedules")
    run.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    run.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    run.set_defaults(func=cmd_run)

    calibrate = sub.add_parser("calibrate", help="fit a device spec to this machine and write it as a device JSON",
                               description="Time the stages of each MODEL on this machine (one intra-op thread, as "
                                           "each gloo rank runs) and the link between two local gloo ranks, fit "
                                           "peak FLOP/s, memory bandwidth, per-op overhead, link latency and "
                                           "bandwidth, print predicted against measured per stage run and per "
                                           "step, and write the fitted spec to -o, for --device / device=.")
    calibrate.add_argument("models", nargs="+", metavar="MODEL", help="one or more model factories to time")
    calibrate.add_argument("-o", "--output", metavar="DEVICE.json", required=True, help="where to write the spec")
    calibrate.add_argument("--base", default="cpu", help="spec whose memory capacity (and link, with --no-link) "
                                                         "is kept: cpu, a100, h100 or a JSON (default cpu)")
    calibrate.add_argument("--name", default="calibrated", help="name of the fitted spec (default calibrated)")
    calibrate.add_argument("--no-link", action="store_true", help="keep the base spec's link; skip the ping-pong")
    calibrate.add_argument("--schedules", nargs="+", default=list(CALIBRATION_SCHEDULES), metavar="SCHEDULE",
                           help=f"schedules whose steps the spec is fitted to (default "
                                f"{' '.join(CALIBRATION_SCHEDULES)}: the two ways the runtime runs a stage, so the "
                                "spec also fits what the zero-bubble schedules' split graphs save by not recording "
                                "the autograd graph; each adds its measurement time, and 1f1b alone measures in 40%% "
                                "of it)")
    calibrate.add_argument("--launches", type=int, default=CALIBRATION_LAUNCHES,
                           help="launches of fresh rank processes each configuration is measured in (default "
                                f"{CALIBRATION_LAUNCHES}; "
                                "one launch's steps run 5-15%% apart from the next's)")
    calibrate.add_argument("--compare", action="store_true",
                           help="then run each MODEL on 2 local gloo ranks and print predicted against measured "
                                "step time, with the base spec and with the fitted one")
    calibrate.add_argument("--schedule", default="1f1b", help="schedule for --compare (default 1f1b)")
    calibrate.add_argument("--microbatches", type=int, default=4, help="micro-batches for --compare (default 4)")
    calibrate.set_defaults(func=cmd_calibrate)
    return parser


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pipecc import calibration
    from pipecc.costs import resolve_device

    torch.set_num_threads(1)  # as each gloo rank of `pipecc run` computes
    if args.launches < 1:
        raise ConfigError(f"--launches {args.launches}: it must be at least 1 "
                          f"({calibration.CALIBRATION_LAUNCHES} by default).")
    base = resolve_device(args.base)
    result = calibration.calibrate(args.models, base=base, name=args.name, measure_links=not args.no_link,
                                   num_launches=args.launches, schedules=args.schedules)
    path = calibration.write_device(result.device, args.output)
    print(calibration.format_samples(result, base))
    print()
    print(calibration.format_steps(result))
    print(f"\n{result.summary()}\nwrote {path}: use it with --device {path}")
    if args.compare:
        variants = {base.name: calibration.Variant(args.schedule, args.base, num_microbatches=args.microbatches),
                    args.name: calibration.Variant(args.schedule, str(path), num_microbatches=args.microbatches)}
        print("\npredicted / measured per step on 2 gloo ranks ('busy': CPU time of the busiest rank):")
        print(calibration.STEP_HEADER)
        for spec in args.models:
            for label, result_ in zip(variants, calibration.compare_steps(spec, list(variants.values()))):
                print(calibration.format_step_row(Path(spec.rpartition(":")[0]).stem, label, result_), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PipeccError as err:
        print(format_error(err), file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


def format_error(err: BaseException, prog: str = "pipecc") -> str:
    """`prog: error: <what went wrong>` and, on the lines after it, how to fix it."""
    what, _, hint = str(err).partition("\n")
    return f"{prog}: error: {what}" + (f"\n{hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
