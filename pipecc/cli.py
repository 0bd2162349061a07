"""The `pipecc` command: partition reports and local pipelined training runs.

    pipecc report examples/gpt.py:build --stages 4 --microbatches 8 --schedule 1f1b
    pipecc run examples/gpt.py:build --ranks 2 --microbatches 4 --steps 5
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from pipecc.errors import ConfigError, PipeccError

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
        raise ConfigError(f"MODEL {spec!r} is not of the form path/to/file.py:factory or package.module:factory.")
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise ConfigError(f"MODEL file {module_part!r} does not exist.")
        module_spec = importlib.util.spec_from_file_location(f"pipecc_model_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as err:
            raise ConfigError(f"cannot import {module_part!r} for MODEL {spec!r}: {err}.") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{module_part!r} has no callable {name!r}.")
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


def _compile(args: argparse.Namespace, spec: str, num_stages: int):  # -> Plan
    from pipecc.api import compile as compile_plan

    model, inputs, loss_fn, target = build_model(spec)
    plan = compile_plan(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                        num_microbatches=args.microbatches, schedule=args.schedule, device=args.device,
                        max_memory_bytes=parse_bytes(args.memory_limit) if args.memory_limit else None)
    return plan, (model, inputs, loss_fn, target)


def cmd_report(args: argparse.Namespace) -> int:
    plan, _ = _compile(args, args.model, args.stages)
    if args.format == "json":
        from pipecc.passes.codegen import plan_to_json

        print(json.dumps(plan_to_json(plan), indent=2, sort_keys=True))
    else:
        print(plan.report())
    return 0


def _train_rank(spec: str, stages: int, microbatches: int, schedule: str, device: str, steps: int,
                lr: float) -> list[tuple[float, float]]:
    """One rank of `pipecc run`: compile (the same plan on every rank), then train `steps` SGD steps."""
    import torch.distributed as dist

    from pipecc.api import compile as compile_plan

    model, inputs, loss_fn, target = build_model(spec)
    plan = compile_plan(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=stages,
                        num_microbatches=microbatches, schedule=schedule, device=device)
    runner = plan.runner()
    optimizer = torch.optim.SGD(list(runner.parameters()), lr=lr)
    history = []
    for step in range(steps):
        optimizer.zero_grad()
        dist.barrier()
        start = time.perf_counter()
        loss = runner.step(*inputs, target=target, broadcast_loss=True)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        optimizer.step()
        history.append((float(loss), elapsed_ms))
        if dist.get_rank() == plan.num_ranks - 1:
            print(f"step {step + 1}/{steps}  loss {float(loss):.6f}  {elapsed_ms:.1f} ms", flush=True)
    return history


def cmd_run(args: argparse.Namespace) -> int:
    from pipecc.runtime.launch import spawn_local

    plan, _ = _compile(args, args.model, args.ranks)
    print(plan.report())
    print(f"\ntraining {args.steps} steps on {args.ranks} local gloo ranks ...", flush=True)
    history = spawn_local(_train_rank, args.ranks, args.model, args.ranks, args.microbatches, args.schedule,
                          args.device, args.steps, args.lr)[-1]
    times = sorted(ms for _, ms in history[1:]) or [history[0][1]]
    measured = times[len(times) // 2]
    predicted = plan.simulate().step_time_ms
    print(f"median step time {measured:.1f} ms (first step, with warm-up, excluded); "
          f"predicted {predicted:.1f} ms on device spec {plan.device.name!r} (measured/predicted {measured / predicted:.2f}); "
          f"final loss {history[-1][0]:.6f}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipecc", description="Pipeline-parallelism compiler for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL",
                       help="path/to/file.py:factory or package.module:factory returning "
                            "(model, example_inputs, loss_fn, target)")
        p.add_argument("--microbatches", type=int, default=4, help="micro-batches per step (default 4)")
        p.add_argument("--schedule", default="1f1b", help="pipeline schedule: gpipe or 1f1b (default 1f1b)")
        p.add_argument("--device", default="cpu", help="cpu, a100, h100, or a device JSON file (default cpu)")
        p.add_argument("--memory-limit", default=None, help="per-rank memory limit, e.g. 20GiB")

    report = sub.add_parser("report", help="print the partition table and schedule of a model")
    common(report)
    report.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    report.add_argument("--format", choices=("text", "json"), default="text")
    report.set_defaults(func=cmd_report)

    run = sub.add_parser("run", help="train a few pipelined steps on local gloo ranks (one stage per rank)")
    common(run)
    run.add_argument("--ranks", type=int, default=2, help="processes, one stage each (default 2)")
    run.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    run.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PipeccError as err:
        print(f"pipecc: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
