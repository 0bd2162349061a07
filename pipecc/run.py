"""`python -m pipecc.run DIR`: train an emitted plan, one process per rank, multi-node included.

    pipecc emit examples/gpt.py:build --stages 2 -o gpt_plan
    torchrun --nproc-per-node 2 -m pipecc.run gpt_plan --steps 5
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29500 -m pipecc.run plan_dir

Each process loads only its own rank's module and weight shard (`pipecc.load(DIR, rank=RANK)`),
so the model's code is not needed. Without torchrun (no RANK in the environment) every rank
runs in this one process.

The data: every step trains on the same batch, read from `--data FILE` (a torch.save of
{"inputs": [tensor, ...], "target": tensor}), by default DIR/batch.pt, which `pipecc emit`
writes from the model factory's example batch. `--data random` makes a batch of the plan's
input specs instead (standard normal floats, zeros for integer tensors, which are valid token
ids and class labels), seeded by --seed. A real training loop feeds its own batches to
`pipecc.load(DIR, rank=r).runner().step(...)`; this command is for trying and timing a plan.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from pipecc.errors import ConfigError, PipeccError, PlanFileError
from pipecc.ir import TensorSpec
from pipecc.plan import Plan

BATCH_FILE = "batch.pt"


def save_batch(directory: str | Path, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> Path:
    """Write one training batch as DIR/batch.pt, the default data of `python -m pipecc.run DIR`."""
    path = Path(directory) / BATCH_FILE
    torch.save({"inputs": [t.detach().cpu() for t in inputs], "target": target.detach().cpu()}, path)
    return path


def load_batch(path: str | Path) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(inputs, target) from a file written by save_batch; ConfigError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist.\n"
                          "Pass --data FILE (a torch.save of {'inputs': [...], 'target': ...}) or --data random.")
    try:
        batch = torch.load(path, weights_only=True)
    except Exception as err:  # torch reports a bad file in many ways; one line names the file
        raise ConfigError(f"cannot read data file {str(path)!r}: {str(err).splitlines()[0]}.\n"
                          "Write it with pipecc.run.save_batch(directory, inputs, target).") from None
    ok = (isinstance(batch, dict) and isinstance(batch.get("inputs"), (list, tuple))
          and all(isinstance(t, torch.Tensor) for t in batch["inputs"]) and isinstance(batch.get("target"), torch.Tensor))
    if not ok:
        raise ConfigError(f"data file {str(path)!r} does not hold {{'inputs': [tensor, ...], 'target': tensor}}.\n"
                          "Write it with pipecc.run.save_batch(directory, inputs, target).")
    return tuple(batch["inputs"]), batch["target"]


def random_batch(plan: Plan, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A batch of the plan's input and target specs: N(0, 1) floats, zeros for integer and bool tensors."""
    generator = torch.Generator().manual_seed(seed)

    def make(spec: TensorSpec) -> torch.Tensor:
        if spec.torch_dtype.is_floating_point:
            return torch.randn(spec.shape, generator=generator).to(spec.torch_dtype)
        return torch.zeros(spec.shape, dtype=spec.torch_dtype)

    return tuple(make(s) for s in plan.input_specs), make(plan.target_spec)


def train(plan: Plan, inputs: Sequence[torch.Tensor], target: torch.Tensor, *, steps: int, lr: float,
          timeout_s: float, log_rank: bool) -> list[tuple[float, float]]:
    """`steps` SGD steps of this process's rank (every rank when no process group is initialised);
    (loss, step ms) per step. The loss is the full-batch loss on every rank."""
    distributed = dist.is_initialized()
    runner = plan.runner(timeout_s=timeout_s) if distributed else None
    params = list(runner.parameters()) if runner is not None else [p for _, p in plan.named_parameters()]
    optimizer = torch.optim.SGD(params, lr=lr)
    history = []
    for step in range(steps):
        optimizer.zero_grad()
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        if runner is not None:
            loss = runner.step(*inputs, target=target, broadcast_loss=True)
        else:
            loss = plan.run_local(*inputs, target=target)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        optimizer.step()
        history.append((float(loss), elapsed_ms))
        if log_rank:
            print(f"step {step + 1}/{steps}  loss {float(loss):.6f}  {elapsed_ms:.1f} ms", flush=True)
    return history


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipecc.run",
        description="Train an emitted pipecc plan (pipecc emit MODEL -o DIR): under torchrun each process runs "
                    "its rank; without torchrun every rank runs in this process.",
        epilog="Example: torchrun --nproc-per-node 2 -m pipecc.run gpt_plan --steps 5")
    parser.add_argument("directory", metavar="DIR", help="a directory written by pipecc emit or plan.emit()")
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    parser.add_argument("--data", default=None,
                        help="FILE: a torch.save of {'inputs': [...], 'target': ...} (default DIR/batch.pt, written "
                             "by pipecc emit), or 'random': a batch of the plan's input specs")
    parser.add_argument("--seed", type=int, default=0, help="seed of --data random (default 0)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    parser.add_argument("--backend", default=None,
                        help="torch.distributed backend (default: nccl if CUDA is available, else gloo)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a peer (default 300)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Load this rank's part of the plan, train, and print losses and measured against predicted step time."""
    import pipecc

    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}; it must be at least 1.")
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    try:
        rank = dist.get_rank() if distributed else None
        plan = pipecc.load(args.directory, rank=rank)
        if distributed and dist.get_world_size() != plan.num_ranks:
            raise ConfigError(f"the plan in {args.directory} has {plan.num_ranks} ranks but torchrun started "
                              f"{dist.get_world_size()} processes.\n"
                              f"Launch with torchrun --nproc-per-node {plan.num_ranks} (over all nodes).")
        if args.data == "random":
            inputs, target = random_batch(plan, args.seed)
        else:
            inputs, target = load_batch(args.data or Path(args.directory) / BATCH_FILE)
        last = plan.schedule.stage_to_rank[-1]
        log_rank = rank is None or rank == last
        if log_rank:
            where = f"{plan.num_ranks} torchrun ranks" if distributed else "one process (no torchrun)"
            print(f"training {args.steps} steps of {args.directory} on {where}, "
                  f"schedule {plan.schedule.name}, {plan.config.num_microbatches} micro-batches", flush=True)
        history = train(plan, inputs, target, steps=args.steps, lr=args.lr, timeout_s=args.timeout,
                        log_rank=log_rank)
        if log_rank:
            times = sorted(ms for _, ms in history[1:]) or [history[0][1]]
            measured = times[len(times) // 2]
            predicted = plan.simulate().step_time_ms
            print(f"median step time {measured:.1f} ms (first step excluded); predicted {predicted:.1f} ms on "
                  f"device spec {plan.device.name!r} (measured/predicted {measured / predicted:.2f}); "
                  f"final loss {history[-1][0]:.6f}", flush=True)
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from pipecc.cli import format_error

    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except PipeccError as err:
        print(format_error(err, "pipecc.run"), file=sys.stderr)
        return 2 if isinstance(err, (ConfigError, PlanFileError)) else 1  # a bad DIR is bad usage too


if __name__ == "__main__":
    sys.exit(main())
