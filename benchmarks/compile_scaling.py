"""Compile time against graph size: synthetic graphs of 1k, 10k and 100k nodes, and a 48-layer GPT.

Each compile is timed pass by pass (trace, fake-tensor propagation, cost annotation, schedule,
partition problem, order search with coarsen + DP along each candidate order, split), with capture excluded and included, and the scaling
exponent is the least-squares slope of log(time) over log(nodes) on the synthetic graphs.
Goals (issue 5): <= 3 s for the 48-layer GPT, <= 60 s at 100k nodes, exponent <= 1.2.

    python benchmarks/compile_scaling.py                 # 1k, 10k, 100k and GPT-48
    python benchmarks/compile_scaling.py --sizes 1000 10000 --no-gpt --check-exact

The synthetic model is a residual chain of Linear -> GELU -> add blocks with, every fourth
block, a parallel second Linear branch (a branchy DAG: two topological paths, joined by an add),
and a long skip from the input to the loss; widths are small, so the graph, not the arithmetic,
is what grows. Every synthetic node costs time, so exact coarsening keeps them all and the DP runs
on the sampled boundaries (pipecc.passes.coarsen), refined around its cuts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import format_table  # noqa: E402
from examples import gpt  # noqa: E402
from pipecc.costs import DeviceSpec  # noqa: E402
from pipecc.passes import capture as capture_pass  # noqa: E402
from pipecc.passes.annotate_costs import annotate_costs  # noqa: E402
from pipecc.passes.coarsen import exact_boundaries  # noqa: E402
from pipecc.passes.order import best_order, order_by_stage, reorder  # noqa: E402
from pipecc.passes.partition import check_partition, partition_graph, solve  # noqa: E402
from pipecc.passes.schedules import in_flight as stage_in_flight, schedule_kind  # noqa: E402
from pipecc.passes.split_stages import check_stages, split_stages  # noqa: E402
from pipecc.ir import Partition  # noqa: E402

NODES_PER_BLOCK = 3  # linear, gelu, add (a branch block adds a linear and an add)


class Synthetic(nn.Module):
    """A residual chain of `num_blocks` Linear -> GELU -> add blocks; every fourth has a second branch."""

    def __init__(self, num_blocks: int, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(num_blocks))
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(num_blocks // 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        for i, block in enumerate(self.blocks):
            h = torch.nn.functional.gelu(block(x))
            if i % 4 == 3:
                h = h + self.branches[i // 4](x)
            x = x + h
        return x + skip


def synthetic(num_nodes: int) -> tuple[nn.Module, tuple[torch.Tensor, ...], object, torch.Tensor]:
    """A Synthetic model with about `num_nodes` graph nodes, its input, loss and target."""
    torch.manual_seed(0)
    num_blocks = max(1, round(num_nodes / (NODES_PER_BLOCK + 0.5)))
    model = Synthetic(num_blocks)
    return model, (torch.randn(8, 8),), nn.functional.mse_loss, torch.randn(8, 8)


def timed_compile(model: nn.Module, inputs: tuple[torch.Tensor, ...], loss_fn: object, target: torch.Tensor, *,
                  num_stages: int, num_microbatches: int, check_exact: bool) -> dict[str, float]:
    """Seconds per pass of one compile (the passes of pipecc.pipeline.compile_plan, capture in two parts)."""
    times: dict[str, float] = {}

    def clock(name: str, start: float) -> float:
        now = time.perf_counter()
        times[name] = now - start
        return now

    device = DeviceSpec.preset("cpu")
    schedule = schedule_kind("1f1b").build(num_stages, num_microbatches)
    in_flight = lambda stage: stage_in_flight(schedule, stage)  # noqa: E731
    mb = inputs[0].shape[0] // num_microbatches
    mb_inputs, mb_target = tuple(t[:mb] for t in inputs), target[:mb]
    t = time.perf_counter()
    capture_pass._trace_fx(model, loss_fn, mb_inputs, mb_target)  # the tracing part of capture, alone
    t = clock("trace", t)
    captured = capture_pass.capture(model, inputs, loss_fn, target, num_microbatches=num_microbatches)
    t = clock("capture", t)
    times["fake_prop+checks"] = times["capture"] - times["trace"]
    costs = annotate_costs(captured, device)
    t = clock("annotate", t)
    graph = partition_graph(captured, costs)
    problem = graph.problem()
    t = clock("problem", t)
    best = best_order(graph, num_stages, in_flight=in_flight)  # coarsen + DP along each candidate order
    t = clock("order+coarsen+dp", t)
    bounds, names = [0, *best.cuts, problem.num_nodes], [graph.node_names[i] for i in best.order]
    bottleneck = best.bottleneck_ms
    part = Partition(num_stages, {name: s for s in range(num_stages) for name in names[bounds[s]:bounds[s + 1]]},
                     bottleneck)
    captured = reorder(captured, order_by_stage(captured, part))
    check_partition(captured, part)
    t = clock("check", t)
    stages = split_stages(captured, part, costs, stage_to_rank=schedule.stage_to_rank, in_flight=in_flight)
    check_stages(stages)
    clock("split", t)
    times["nodes"] = problem.num_nodes
    times["kept"] = len(exact_boundaries(problem)) + 1
    times["bottleneck_ms"] = bottleneck
    if check_exact:
        t = time.perf_counter()
        times["exact_bottleneck_ms"] = solve(problem, num_stages, in_flight=in_flight)[1]
        times["exact_dp"] = time.perf_counter() - t
    times["total_excl_capture"] = sum(times[k] for k in ("annotate", "problem", "order+coarsen+dp", "check", "split"))
    times["total"] = times["total_excl_capture"] + times["capture"]
    return times


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(ys) over log(xs)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


COLUMNS = ("trace", "fake_prop+checks", "capture", "annotate", "problem", "order+coarsen+dp", "split", "total_excl_capture",
           "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--no-gpt", action="store_true")
    parser.add_argument("--gpt-layers", type=int, default=48)
    parser.add_argument("--check-exact", action="store_true", help="also run the DP on the uncoarsened graph")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    timed_compile(*synthetic(100), num_stages=2, num_microbatches=2, check_exact=False)
    print(f"warm-up compile of a 100-node graph (one-time imports and caches): {time.perf_counter() - start:.2f} s")
    rows, synthetic_times = [], []
    header = ["graph", "nodes", "after exact coarsening", *COLUMNS, "bottleneck ms"] + (["exact ms", "exact DP s"] if args.check_exact else [])
    cases = [(f"synthetic {n}", lambda n=n: synthetic(n)) for n in args.sizes]
    if not args.no_gpt:
        cases.append((f"gpt {args.gpt_layers} layers", lambda: gpt.build(n_layers=args.gpt_layers, d_model=64, n_heads=4,
                                                                         vocab_size=4096, seq_len=32)))
    for name, build in cases:
        model, inputs, loss_fn, target = build()
        times = timed_compile(model, inputs, loss_fn, target, num_stages=args.stages,
                              num_microbatches=args.microbatches, check_exact=args.check_exact)
        if name.startswith("synthetic"):
            synthetic_times.append(times)
        row = [name, f"{times['nodes']:.0f}", f"{times['kept']:.0f}", *(f"{times[c]:.2f}" for c in COLUMNS),
               f"{times['bottleneck_ms']:.4f}"]
        if args.check_exact:
            row += [f"{times['exact_bottleneck_ms']:.4f}", f"{times['exact_dp']:.2f}"]
        rows.append(row)
        print(", ".join(f"{h} {c}" for h, c in zip(header, row)), flush=True)
    print()
    print(format_table([header, *rows]))
    if len(synthetic_times) >= 2:
        nodes = [t["nodes"] for t in synthetic_times]
        for column in ("total_excl_capture", "total", "order+coarsen+dp", "annotate", "capture"):
            print(f"scaling exponent of {column}: {slope(nodes, [max(t[column], 1e-4) for t in synthetic_times]):.2f}")


if __name__ == "__main__":
    main()
