"""pipecc vs torch.distributed.pipelining: the same model, ranks, batch, micro-batches and schedule family.

    python benchmarks/vs_torch_pipelining.py --quick            # a few minutes on 2 cores
    python benchmarks/vs_torch_pipelining.py                    # the full sizes
    python benchmarks/vs_torch_pipelining.py --size tiny        # smallest: what tests/test_benchmarks.py runs

For every model and schedule, 2 gloo ranks (one intra-op thread each) train with
- pipecc: its own cost-model partition, static shapes, its schedule;
- torch.distributed.pipelining used the way its users do: a `PipelineStage` per piece of the
  model, split at equal numbers of blocks, driven by `ScheduleGPipe` / `Schedule1F1B` /
  `ScheduleZBVZeroBubble`; a tied weight is held by both end stages and its gradient summed
  after the step (as Megatron-LM does for its embedding group).
Before any timing, every rank checks that one step of each system gives the loss and every
gradient of the unpartitioned model (float32, rtol 1e-5). The two systems then alternate, run
by run, in the same processes, together with the single-rank baselines (the unpartitioned
model on the whole batch, one thread and two threads, run on rank 0 while rank 1 waits), and
the table reports medians and ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):  # the repo root (examples/) and this folder (_common)
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import pipecc  # noqa: E402
from _common import SavedActivationMeter, format_table, imbalance, parameters_of, stage_times_ms  # noqa: E402
from pipecc.passes.schedules import SCHEDULES as PIPECC_SCHEDULES  # noqa: E402
from pipecc.runtime.launch import spawn_local  # noqa: E402
from pipecc.testing import assert_same_grads, reference_step  # noqa: E402

NUM_RANKS = 2
# The schedule families both systems have: pipecc's schedule name -> torch's schedule class name.
TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "zbv": "ScheduleZBVZeroBubble",
                   "interleaved-1f1b": "ScheduleInterleaved1F1B", "looped-bfs": "ScheduleLoopedBFS"}
# How each places its stages: one per rank, two per rank in a V (rank r holds r and 2p-1-r), or
# two per rank in a loop (rank r holds r and r+p). pipecc and torch place them the same way.
DEFAULT_SCHEDULES = {"tiny": ("1f1b", "zbv"), "quick": ("1f1b", "zbv"), "full": ("1f1b", "zbv", "gpipe")}
PLACEMENT = {"gpipe": "one", "1f1b": "one", "zbv": "v", "interleaved-1f1b": "loop", "looped-bfs": "loop"}


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Case:
    """One row of the table: a model at one size, trained with one schedule family."""

    model: str  # a key of MODELS
    family: str  # examples/<family>.py
    sizes: tuple[tuple[str, int], ...]  # keyword arguments of the example's build()
    batch_size: int
    num_microbatches: int
    schedule: str  # a key of TORCH_SCHEDULES

    def build(self) -> tuple[nn.Module, tuple[torch.Tensor, ...], Callable[..., torch.Tensor], torch.Tensor]:
        module = importlib.import_module(f"examples.{self.family}")
        return module.build(batch_size=self.batch_size, seed=0, **dict(self.sizes))

    @property
    def num_stages(self) -> int:
        return NUM_RANKS * (1 if PLACEMENT[self.schedule] == "one" else 2)


@dataclass(frozen=True)
class Settings:
    repeats: int  # timed runs per system (medians are over these)
    steps_per_run: int  # training steps in one timed run
    stage_repeats: int  # samples per stage for the imbalance measurement
    cost_model: str = "analytic"  # pipecc's cost model: "analytic" (roofline) or "profile" (timed nodes)
    profile_cache_dir: str | None = None  # profiled costs, filled before the ranks start (see main)


@dataclass(frozen=True)
class Result:
    """What one case measured; times are medians of per-step seconds over the timed runs."""

    case: Case
    items_per_step: int  # tokens (or samples) in the global batch
    unit: str
    step_s: dict[str, float]  # system -> median seconds per step ("pipecc", "torch", "single-1t", "single-2t")
    cpu_step_s: dict[str, list[float]]  # "pipecc" / "torch" -> per rank, median CPU seconds per step
    saved_peak_bytes: dict[str, list[int]]  # system -> per rank
    stage_ms: dict[str, list[float]]  # "pipecc" / "torch" -> per stage F+B ms, measured alone
    torch_unsupported: str = ""  # why torch's pipelining could not run this case, else ""


# Sizes: "tiny" keeps the test fast, "quick" fits in a few minutes on 2 cores, "full" is the report.
# The GPT decoders have a large vocabulary: with equal-block splits, the LM head stage is the heavy one.
MODELS: dict[str, dict[str, tuple[str, dict[str, int], int, int]]] = {
    # model -> size -> (family, build sizes, batch_size, num_microbatches)
    "gpt-8k": {
        "tiny": ("gpt", dict(vocab_size=1024, d_model=32, n_layers=4, n_heads=2, seq_len=16), 8, 4),
        "quick": ("gpt", dict(vocab_size=8192, d_model=128, n_layers=8, n_heads=4, seq_len=32), 16, 8),
        "full": ("gpt", dict(vocab_size=8192, d_model=256, n_layers=8, n_heads=8, seq_len=128), 32, 16),
    },
    "gpt-32k": {
        "tiny": ("gpt", dict(vocab_size=4096, d_model=32, n_layers=4, n_heads=2, seq_len=16), 8, 4),
        "quick": ("gpt", dict(vocab_size=32768, d_model=128, n_layers=8, n_heads=4, seq_len=32), 16, 8),
        "full": ("gpt", dict(vocab_size=32768, d_model=256, n_layers=12, n_heads=8, seq_len=128), 32, 16),
    },
    "bert": {
        "tiny": ("bert", dict(vocab_size=512, d_model=32, n_layers=4, n_heads=2, seq_len=16), 8, 4),
        "quick": ("bert", dict(vocab_size=8192, d_model=128, n_layers=8, n_heads=4, seq_len=32), 16, 8),
        "full": ("bert", dict(vocab_size=30522, d_model=256, n_layers=8, n_heads=8, seq_len=128), 32, 16),
    },
    "unet": {
        "tiny": ("unet", dict(image_size=16, base=4), 8, 4),
        "quick": ("unet", dict(image_size=32, base=8), 16, 8),
        "full": ("unet", dict(image_size=64, base=16), 32, 16),
    },
}


def make_cases(size: str, models: Sequence[str], schedules: Sequence[str]) -> list[Case]:
    cases = []
    for model in models:
        family, sizes, batch_size, m = MODELS[model][size]
        for schedule in schedules:
            cases.append(Case(model, family, tuple(sorted(sizes.items())), batch_size, m, schedule))
    return cases


# ---------------------------------------------------------------------------------------------
# torch.distributed.pipelining, the way its users write it: stage modules cut at equal block counts


class _GptEmbed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.size(1), device=tokens.device)
        return self.tok_emb(tokens) + self.pos_emb(pos)


class _GptHead(nn.Module):
    """ln_f + LM head; the head's weight is this stage's own copy of the tied embedding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.ln_f = model.ln_f
        self.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        self.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class _BertEmbed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb, self.emb_ln = model.tok_emb, model.pos_emb, model.emb_ln

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.size(1), device=tokens.device)
        return self.emb_ln(self.tok_emb(tokens) + self.pos_emb(pos))


class _BertHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.pooler, self.classifier = model.pooler, model.classifier

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class _Chain(nn.Module):
    """One torch pipeline stage: pieces applied in order; `mask` (BERT) goes to every piece."""

    def __init__(self, pieces: Sequence[nn.Module], takes_mask: bool) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.takes_mask = takes_mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for piece in self.pieces:
            x = piece(x, mask) if self.takes_mask else piece(x)
        return x


class _UNetDown(nn.Module):
    """The encoder half of the U-Net; returns the bottleneck map and the three skips for the decoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        skip1 = m.down1(x)
        skip2 = m.down2(m.pool(skip1))
        skip3 = m.down3(m.pool(skip2))
        return m.bottleneck(m.pool(skip3)), skip3, skip2, skip1


class _UNetUp(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, y: torch.Tensor, skip3: torch.Tensor, skip2: torch.Tensor, skip1: torch.Tensor) -> torch.Tensor:
        from examples.unet import _upsample

        m = self.model
        y = m.up3(torch.cat([_upsample(y), skip3], dim=1))
        y = m.up2(torch.cat([_upsample(y), skip2], dim=1))
        y = m.up1(torch.cat([_upsample(y), skip1], dim=1))
        return m.head(y)


def torch_stage_modules(case: Case, model: nn.Module) -> list[nn.Module]:
    """The model cut into `case.num_stages` torch stage modules at equal numbers of blocks.

    Raises NotImplementedError where a user of torch's pipelining cannot cut the model that way."""
    n = case.num_stages
    if case.family == "unet":
        if n != 2:
            raise NotImplementedError(
                f"the U-Net's skips cross every cut; with {n} stages they would skip a stage, and "
                "torch.distributed.pipelining stages only exchange tensors with their neighbours")
        return [_UNetDown(model), _UNetUp(model)]
    blocks = list(model.blocks if case.family == "gpt" else model.layers)
    if len(blocks) % n:
        raise NotImplementedError(f"{len(blocks)} blocks do not split equally into {n} stages")
    per_stage = len(blocks) // n
    first, last = (_GptEmbed(model), _GptHead(model)) if case.family == "gpt" else (_BertEmbed(model),
                                                                                     _BertHead(model))
    stages = []
    for s in range(n):
        pieces = ([first] if s == 0 else []) + blocks[s * per_stage:(s + 1) * per_stage] + ([last] if s == n - 1 else [])
        stages.append(_Chain(pieces, takes_mask=case.family == "bert"))
    return stages


def stage_placement(case: Case) -> list[int]:
    """stage -> rank, as PLACEMENT says."""
    n, p = case.num_stages, NUM_RANKS
    return {"one": list(range(n)), "loop": [s % p for s in range(n)],
            "v": [s if s < p else 2 * p - 1 - s for s in range(n)]}[PLACEMENT[case.schedule]]


class TorchSystem:
    """This rank's share of the model under torch.distributed.pipelining, and one training step."""

    name = "torch"

    def __init__(self, case: Case, model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        from torch.distributed import pipelining

        self.case = case
        self.rank = dist.get_rank()
        modules = torch_stage_modules(case, model)
        placement = stage_placement(case)
        self.local = [(s, modules[s]) for s in range(len(modules)) if placement[s] == self.rank]
        stages = [pipelining.PipelineStage(module, s, len(modules), torch.device("cpu")) for s, module in self.local]
        schedule_cls = getattr(pipelining, TORCH_SCHEDULES[case.schedule])
        self.schedule = schedule_cls(stages if len(stages) > 1 else stages[0], n_microbatches=case.num_microbatches,
                                     loss_fn=loss_fn)
        self.holds_first = placement[0] == self.rank
        self.holds_last = placement[-1] == self.rank
        self.names = _canonical_names(model, [m for _, m in self.local])
        # A tied weight (GPT's embedding / LM head) has a copy on the first and on the last stage.
        self.tied = {name: sorted({placement[0], placement[-1]}) for name in _tied_names(model)}

    def parameters(self) -> list[nn.Parameter]:
        return parameters_of(m for _, m in self.local)

    def step(self, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor | None:
        """One training step; the mean micro-batch loss on the rank with the last stage, else None."""
        kwargs = {"mask": inputs[1]} if self.case.family == "bert" else {}
        args = tuple(inputs[:1]) if self.holds_first else ()
        losses: list[torch.Tensor] = []
        if self.holds_last:
            self.schedule.step(*args, target=target, losses=losses, **kwargs)
        else:
            self.schedule.step(*args, **kwargs)
        self._sum_tied_grads()
        return torch.stack(losses).mean().detach() if self.holds_last else None

    def _sum_tied_grads(self) -> None:
        """Every copy of a tied weight gets the sum of all copies' gradients (all-reduced across ranks)."""
        for name, ranks in sorted(self.tied.items()):
            copies = [p for p in self.parameters() if self.names[id(p)] == name]
            if not copies:
                continue
            total = sum(p.grad for p in copies)
            if len(ranks) > 1:
                dist.all_reduce(total)  # both ranks of the 2-rank world hold a copy
            for p in copies:
                p.grad = total.clone()

    def named_grads(self) -> dict[str, torch.Tensor]:
        return {self.names[id(p)]: p.grad for p in self.parameters() if p.grad is not None}


def torch_stage_fns(case: Case, modules: Sequence[nn.Module], micro_inputs: Sequence[torch.Tensor],
                    micro_target: torch.Tensor, loss_fn: Callable[..., torch.Tensor]) -> list[Callable]:
    """Each torch stage as `received activations -> outputs` (the last one ends with the loss)."""
    kwargs = {"mask": micro_inputs[1]} if case.family == "bert" else {}

    def make(s: int, module: nn.Module) -> Callable:
        def run(received: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            out = module(*(micro_inputs[:1] if s == 0 else received), **kwargs)
            out = out if isinstance(out, tuple) else (out,)
            return (loss_fn(out[0], micro_target),) if s == len(modules) - 1 else out
        return run

    return [make(s, m) for s, m in enumerate(modules)]


def _tied_names(model: nn.Module) -> list[str]:
    """Canonical names of parameters the model uses under more than one name (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names[0] for names in by_id.values() if len(names) > 1]


def _canonical_names(model: nn.Module, modules: Sequence[nn.Module]) -> dict[int, str]:
    """id(parameter) -> its name in `model` (named_parameters' first name), for `modules`' parameters.

    A stage's private copy of a tied weight (_GptHead) maps to the tied weight's name."""
    names = {id(p): n for n, p in model.named_parameters()}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, _GptHead):
                names[id(sub.lm_head.weight)] = _tied_names(model)[0]
    return {id(p): names[id(p)] for m in modules for p in m.parameters()}


# ---------------------------------------------------------------------------------------------
# pipecc and the single-rank baselines


def compile_case(case: Case, model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                 target: torch.Tensor, settings: Settings) -> pipecc.Plan:
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=case.num_stages,
                          num_microbatches=case.num_microbatches, schedule=case.schedule,
                          cost_model=settings.cost_model, profile_cache_dir=settings.profile_cache_dir)


class PipeccSystem:
    name = "pipecc"

    def __init__(self, case: Case, model: nn.Module, inputs: Sequence[torch.Tensor],
                 loss_fn: Callable[..., torch.Tensor], target: torch.Tensor, settings: Settings) -> None:
        self.plan = compile_case(case, model, inputs, loss_fn, target, settings)
        self.runner = self.plan.runner()
        # Stages whose backward pipecc split into F/B/W graphs keep their saved values as plain
        # tensors between graphs, outside autograd: saved-tensor hooks cannot see them.
        self.hooks_see_saved = all(getattr(s, "backward_split", None) is None for s in self.plan.stages)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.runner.parameters())

    def step(self, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor | None:
        return self.runner.step(*inputs, target=target)

    def named_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in self.runner.named_parameters() if p.grad is not None}

    def stage_fns(self, micro_inputs: Sequence[torch.Tensor], micro_target: torch.Tensor) -> list[Callable]:
        """Each pipecc stage as `received activations -> outputs`, reading model inputs itself."""
        from pipecc.ir import InputKind

        def make(stage: pipecc.ir.Stage) -> Callable:
            def run(received: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
                it = iter(received)
                args = [next(it) if i.kind is InputKind.ACTIVATION else
                        micro_target if i.kind is InputKind.TARGET else micro_inputs[i.input_index]
                        for i in stage.inputs]
                return tuple(stage.graph(*args))
            return run

        return [make(stage) for stage in self.plan.stages]


class SingleRank:
    """The unpartitioned model on the whole batch in one process, with `num_threads` intra-op threads.
    Runs on rank 0 only; the other ranks wait at the barrier around it."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], num_threads: int) -> None:
        self.model, self.loss_fn, self.num_threads = model, loss_fn, num_threads
        self.name = f"single-{num_threads}t"

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def step(self, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            loss = self.loss_fn(self.model(*inputs), target)
            loss.backward()
        finally:
            torch.set_num_threads(threads)
        return loss.detach()


# ---------------------------------------------------------------------------------------------
# One case on one rank


def check_system(system: PipeccSystem | TorchSystem, inputs: Sequence[torch.Tensor], target: torch.Tensor,
                 expected_loss: torch.Tensor, expected: dict[str, torch.Tensor]) -> None:
    """One step of `system` gives the unpartitioned loss (on the last rank) and gradients (every rank)."""
    for p in system.parameters():
        p.grad = None
    loss = system.step(inputs, target)
    try:
        if loss is not None:
            torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        grads = system.named_grads()
        assert grads, "this rank holds no gradients"
        assert_same_grads(grads, expected)
    except AssertionError as err:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise AssertionError(f"{system.name} on rank {rank} differs from the unpartitioned model: "
                             f"{err}") from None


def torch_unsupported(case: Case, loss_fn: Callable[..., torch.Tensor], micro_inputs: Sequence[torch.Tensor],
                      micro_target: torch.Tensor) -> str:
    """Why torch.distributed.pipelining cannot train `case` as its users would cut it, or "" if it can."""
    try:
        modules = torch_stage_modules(case, case.build()[0])
    except NotImplementedError as err:
        return str(err)
    return _boundary_problem(torch_stage_fns(case, modules, micro_inputs, micro_target, loss_fn))


def _boundary_problem(stages: Sequence[Callable]) -> str:
    """A tensor that must cross a stage boundary but is not contiguous, or "".

    torch's PipelineStage records the strides of what crosses a boundary (the activations, and
    the gradients its backward computes with autograd.grad) and posts its receives into buffers
    with those strides; gloo refuses a non-contiguous buffer ("input tensor has to be contiguous")
    and the step crashes. The gradient of a skip that feeds torch.cat is such a tensor: a slice of
    the cat's gradient. Running the stages as a chain in this process finds it without a crash."""
    received: list[torch.Tensor] = []
    for s, stage in enumerate(stages):
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in received]
        outputs = [o for o in stage(leaves)]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        roots = [o for o in outputs if o.requires_grad]
        grads = torch.autograd.grad(roots, wanted, [torch.ones_like(o) for o in roots], allow_unused=True) \
            if wanted else ()
        crossing = [("gradient of input", i, g) for i, g in enumerate(grads) if g is not None]
        if s < len(stages) - 1:
            crossing += [("output", i, o) for i, o in enumerate(outputs)]
        for what, i, tensor in crossing:
            if not tensor.is_contiguous():
                return (f"stage {s}'s {what} {i} (shape {tuple(tensor.shape)}, strides {tensor.stride()}) is not "
                        "contiguous; torch.distributed.pipelining posts its gloo receive with those strides and "
                        "gloo refuses it (RuntimeError: input tensor has to be contiguous)")
        received = [o.detach() for o in outputs]
    return ""


def bench_rank(case: Case, settings: Settings) -> dict[str, object]:
    """On one rank: build both systems, check them, measure saved activations, time them alternately."""
    rank = dist.get_rank()
    model, inputs, loss_fn, target = case.build()
    micro_inputs = [t.chunk(case.num_microbatches)[0] for t in inputs]
    micro_target = target.chunk(case.num_microbatches)[0]
    expected_loss, expected = reference_step(model, inputs, loss_fn, target, case.num_microbatches)
    systems: list[object] = [PipeccSystem(case, case.build()[0], inputs, loss_fn, target, settings)]
    unsupported = torch_unsupported(case, loss_fn, micro_inputs, micro_target)
    if not unsupported:
        systems.append(TorchSystem(case, case.build()[0], loss_fn))
    for system in systems:
        check_system(system, inputs, target, expected_loss, expected)
    baselines = [SingleRank(case.build()[0], loss_fn, 1), SingleRank(case.build()[0], loss_fn, 2)]

    saved = {s.name: _saved_peak_bytes(s, inputs, target) if getattr(s, "hooks_see_saved", True) else -1
             for s in systems}
    if rank == 0:
        saved.update({b.name: _saved_peak_bytes(b, inputs, target) for b in baselines})
    dist.barrier()

    timed = systems + baselines
    times: dict[str, list[float]] = {s.name: [] for s in timed}
    cpu_times: dict[str, list[float]] = {s.name: [] for s in timed}
    optimizers = {s.name: torch.optim.SGD(s.parameters(), lr=1e-3) for s in timed}
    for run in range(settings.repeats + 1):  # run 0 warms up every system and is not counted
        order = timed if run % 2 == 0 else timed[::-1]
        for system in order:
            seconds, cpu_seconds = _timed_run(system, optimizers[system.name], inputs, target,
                                              settings.steps_per_run,
                                              on_this_rank=not isinstance(system, SingleRank) or rank == 0)
            if run > 0:
                times[system.name].append(seconds / settings.steps_per_run)
                cpu_times[system.name].append(cpu_seconds / settings.steps_per_run)

    stage_ms: dict[str, list[float]] = {}
    if rank == 0:  # every stage alone, in this process, while the other ranks wait at the barrier
        stage_ms["pipecc"] = stage_times_ms(systems[0].stage_fns(micro_inputs, micro_target),
                                            repeats=settings.stage_repeats)
        if not unsupported:
            modules = torch_stage_modules(case, case.build()[0])
            stage_ms["torch"] = stage_times_ms(torch_stage_fns(case, modules, micro_inputs, micro_target, loss_fn),
                                               repeats=settings.stage_repeats)
    dist.barrier()
    return dict(times=times, cpu_times=cpu_times, saved=saved, stage_ms=stage_ms, unsupported=unsupported)


def bench_ranks(cases: Sequence[Case], settings: Settings) -> list[dict[str, object]]:
    """bench_rank for every case in turn, in the same processes (one launch for the whole table)."""
    results = []
    for case in cases:
        start = time.perf_counter()
        results.append(bench_rank(case, settings))
        if dist.get_rank() == 0:
            print(f"  {case.model} {case.schedule}: {time.perf_counter() - start:.0f} s", flush=True)
    return results


def _timed_run(system: object, optimizer: torch.optim.Optimizer, inputs: Sequence[torch.Tensor],
               target: torch.Tensor, steps: int, on_this_rank: bool) -> tuple[float, float]:
    """Wall seconds for `steps` training steps (zero_grad, step, SGD update) between two barriers,
    and this process's CPU seconds for them.

    CPU time is what the rank computed (and spent on messages): unlike wall time it hardly moves
    when other processes share the cores, so it shows a runtime's own cost on a busy machine."""
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    if on_this_rank:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            system.step(inputs, target)
            optimizer.step()
    cpu_seconds = time.process_time() - cpu_start
    dist.barrier()
    return time.perf_counter() - start, cpu_seconds


def _saved_peak_bytes(system: object, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> int:
    """Peak saved-activation bytes on this rank over one training step of `system`."""
    for p in system.parameters():
        p.grad = None
    meter = SavedActivationMeter(system.parameters())
    with meter:
        system.step(inputs, target)
    return meter.peak_bytes


def run_cases(cases: Sequence[Case], settings: Settings) -> list[Result]:
    """Every case on NUM_RANKS fresh gloo processes; the per-rank measurements merged into Results."""
    per_rank = spawn_local(bench_ranks, NUM_RANKS, cases, settings)
    return [_merge(case, [ranks[i] for ranks in per_rank]) for i, case in enumerate(cases)]


def _merge(case: Case, per_rank: Sequence[dict]) -> Result:
    rank0 = per_rank[0]
    # A run ends at a barrier, so every rank measures the same span: take rank 0's.
    step_s = {name: statistics.median(samples) for name, samples in rank0["times"].items()}
    saved = {name: [r["saved"][name] for r in per_rank if name in r["saved"]] for name in rank0["saved"]}
    cpu = {name: [statistics.median(r["cpu_times"][name]) for r in per_rank] for name in ("pipecc", "torch")
           if name in rank0["cpu_times"]}
    _, inputs, _, _ = case.build()
    is_text = case.family in ("gpt", "bert")
    return Result(case, inputs[0].numel() if is_text else inputs[0].shape[0], "tokens" if is_text else "samples",
                  step_s, cpu, saved, rank0["stage_ms"], rank0["unsupported"])


# ---------------------------------------------------------------------------------------------
# Report


def format_results(results: Sequence[Result]) -> str:
    """The comparison table, then the per-stage measurements behind the imbalance column."""
    header = ["model", "sched", "m", "pipecc st/s", "torch st/s", "pipecc/torch", "pipecc items/s",
              "torch items/s", "1-rank-1t st/s", "pipecc/1t", "torch/1t", "1-rank-2t st/s", "pipecc/2t",
              "imb pipecc", "imb torch", "saved/rank pipecc", "saved/rank torch"]
    rows = [header]
    notes = []
    for r in results:
        s = r.step_s
        has_torch = "torch" in s
        rate = {name: 1.0 / sec for name, sec in s.items()}
        rows.append([
            r.case.model, r.case.schedule, str(r.case.num_microbatches),
            f"{rate['pipecc']:.2f}", f"{rate['torch']:.2f}" if has_torch else "unsupported",
            f"{rate['pipecc'] / rate['torch']:.2f}x" if has_torch else "-",
            f"{r.items_per_step * rate['pipecc']:.0f}", f"{r.items_per_step * rate['torch']:.0f}" if has_torch else "-",
            f"{rate['single-1t']:.2f}", f"{rate['pipecc'] / rate['single-1t']:.2f}x",
            f"{rate['torch'] / rate['single-1t']:.2f}x" if has_torch else "-",
            f"{rate['single-2t']:.2f}", f"{rate['pipecc'] / rate['single-2t']:.2f}x",
            f"{imbalance(r.stage_ms['pipecc']):.2f}", f"{imbalance(r.stage_ms['torch']):.2f}" if has_torch else "-",
            _mib(r.saved_peak_bytes["pipecc"]), _mib(r.saved_peak_bytes["torch"]) if has_torch else "-",
        ])
        stages = "; ".join(f"{name} " + " ".join(f"{ms:.1f}" for ms in times) for name, times in r.stage_ms.items())
        cpu = "; ".join(f"{name} " + "/".join(f"{1e3 * sec:.0f}" for sec in per_rank)
                        for name, per_rank in r.cpu_step_s.items())
        if "torch" in r.cpu_step_s:  # the busiest rank bounds the step when no rank is descheduled
            cpu += f" (busiest-rank ratio torch/pipecc {max(r.cpu_step_s['torch']) / max(r.cpu_step_s['pipecc']):.2f})"
        # The whole batch in one go vs the same work cut into m micro-batches: smaller matmuls run
        # slower on a CPU, which caps any pipeline's speedup below the rank count.
        micro_ms = r.case.num_microbatches * sum(r.stage_ms["pipecc"])
        notes.append(f"{r.case.model} {r.case.schedule}: stage F+B ms per micro-batch: {stages}; "
                     f"m x sum(stages) {micro_ms:.0f} ms vs one whole-batch step {1e3 * s['single-1t']:.0f} ms "
                     f"(micro-batching efficiency {1e3 * s['single-1t'] / micro_ms:.2f}); "
                     f"CPU ms per step by rank: {cpu}; "
                     f"single rank saves {_mib(r.saved_peak_bytes['single-1t'])} on the whole batch"
                     + (f"; torch unsupported: {r.torch_unsupported}" if r.torch_unsupported else ""))
    units = sorted({f"{r.case.model}: {r.unit}" for r in results})
    return "\n".join([format_table(rows), "", "items = " + ", ".join(units), *notes])


def _mib(per_rank: Sequence[int]) -> str:
    """Bytes per rank in MiB; -1 (not measurable by saved-tensor hooks) prints as n/a."""
    if any(b < 0 for b in per_rank):
        return "n/a"
    return "/".join(f"{b / 2**20:.1f}" for b in per_rank) + " MiB"


def machine_line() -> str:
    return (f"{datetime.date.today().isoformat()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{NUM_RANKS} gloo ranks x 1 thread, load average {os.getloadavg()[0]:.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "quick", "full"), default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", help="same as --size quick")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    known = [name for name in TORCH_SCHEDULES if name in PIPECC_SCHEDULES]  # both systems have them
    parser.add_argument("--schedules", nargs="+", choices=known, default=None,
                        help="default: 1f1b and zbv (and gpipe at full size), where pipecc has them")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per system (default by size)")
    parser.add_argument("--steps-per-run", type=int, default=None, help="training steps per timed run")
    parser.add_argument("--cost-model", choices=("analytic", "profile"), default="analytic",
                        help="pipecc's cost model (default analytic: the roofline estimate; profile times the nodes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    defaults = {"tiny": Settings(1, 1, 1), "quick": Settings(3, 2, 3), "full": Settings(7, 3, 5)}[args.size]
    schedules = args.schedules or [s for s in DEFAULT_SCHEDULES[args.size] if s in known]
    settings = dataclasses.replace(defaults, **{k: v for k, v in (("repeats", args.repeats),
                                                                  ("steps_per_run", args.steps_per_run))
                                                if v is not None})
    torch.set_num_threads(1)
    print(f"pipecc vs torch.distributed.pipelining, size {args.size}, pipecc cost model {args.cost_model}: "
          f"{machine_line()}", flush=True)
    cases = make_cases(args.size, args.models, schedules)
    with tempfile.TemporaryDirectory() as cache_dir:
        if args.cost_model == "profile":
            # Profile here, once: the ranks then read the same cached times and compile the same
            # plan (two ranks profiling side by side would measure different times).
            settings = dataclasses.replace(settings, cost_model="profile", profile_cache_dir=cache_dir)
            for case in cases:
                model, inputs, loss_fn, target = case.build()
                compile_case(case, model, inputs, loss_fn, target, settings)
        results = run_cases(cases, settings)
    print()
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
