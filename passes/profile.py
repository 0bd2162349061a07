"""Profile costs: forward, backward-input and backward-weight times measured on real tensors.

The analytic roofline (annotate_costs) knows FLOPs and bytes exactly but guesses how fast the
device turns them into time. This pass runs the captured graph once on the first real
micro-batch and, at every compute node, times the node itself with its real arguments:

- F: the node's forward with autograd recording (as the pipeline's forward runs it);
- B: `torch.autograd.grad` of its outputs with respect to its activation inputs;
- W: `torch.autograd.grad` of its outputs with respect to its parameters.

Each is run `warmup` times, then `repeats` samples are taken (each sample loops the call until
it lasts `min_sample_ms`, so microsecond ops are not lost in timer noise) and the median is
kept. Nodes with equal signatures (the same op, settings and shapes: every layer of a stack of
identical blocks) are timed once, so a 48-layer model costs about as much to profile as one
layer. Results are cached on disk, keyed by the graph, its shapes and the machine.

Profiling runs the model's real modules, so it saves and restores their buffers (BatchNorm
running statistics) and the RNG state: compiling leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence, TextIO

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from pipecc.costs import CostTable, NodeCost
from pipecc.ir import Captured, InputKind, Stage
from pipecc.passes.annotate_costs import node_signature
from pipecc.passes.graph_facts import compute_nodes, grad_nodes, node_tensors

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class ProfileSettings:
    """How to time each node: warm-up calls, median of `repeats` samples of at least `min_sample_ms`."""

    warmup: int = 2
    repeats: int = 5
    min_sample_ms: float = 0.2
    max_calls_per_sample: int = 200
    progress_after_s: float | None = 2.0  # a progress line on stderr once profiling has taken this long
    # "wall": elapsed time. "cpu": this process's CPU time, which a shared machine's other jobs do
    # not inflate: with one intra-op thread it is what the work takes on an idle core. (Measured
    # here at load 7 on 2 cores: wall-clock stage runs came out 3x the sum of their nodes' short
    # wall-clock samples, because only the long runs get preempted; CPU time agrees for both.)
    # "auto": "cpu" with one intra-op thread (the process's CPU time is then the op's time), else "wall".
    clock: str = "auto"

    def resolved_clock(self) -> str:
        if self.clock == "auto":
            return "cpu" if torch.get_num_threads() == 1 else "wall"
        return self.clock

    def timer(self) -> Callable[[], float]:
        """The clock to time with, in seconds."""
        return time.process_time if self.resolved_clock() == "cpu" else time.perf_counter


@dataclass(frozen=True)
class NodeTimes:
    """Measured median times of one node, in ms."""

    forward_ms: float
    backward_input_ms: float
    backward_weight_ms: float


def profile_costs(captured: Captured, analytic: CostTable, example_inputs: Sequence[torch.Tensor],
                  example_target: torch.Tensor, *, cache_dir: Path | None,
                  settings: ProfileSettings = ProfileSettings()) -> CostTable:
    """`analytic` with every node's F, B and W times replaced by times measured on real tensors.

    FLOPs, bytes and saved-activation sizes stay the analytic ones (they are exact); only the
    times change. With `cache_dir`, a second compile of the same graph on the same machine
    reads the times back instead of measuring them.
    """
    key = profile_key(captured, settings)
    cached = _read_cache(cache_dir, key) if cache_dir is not None else None
    if cached is None:
        mb = captured.microbatch_size
        real = [*(t[:mb] for t in example_inputs), example_target[:mb]]
        cached = measure_node_times(captured, real, settings)
        if cache_dir is not None:
            _write_cache(cache_dir, key, cached)
    else:
        log.info("profiled costs read from the cache (%d nodes)", len(cached))
    nodes = {name: _with_times(cost, cached.get(name)) for name, cost in analytic.nodes.items()}
    return replace(analytic, nodes=nodes)


def _with_times(cost: NodeCost, times: NodeTimes | None) -> NodeCost:
    if times is None:  # a node the profiler could not run alone keeps its roofline estimate
        return cost
    return replace(cost, forward_ms=times.forward_ms, backward_input_ms=times.backward_input_ms,
                   backward_weight_ms=times.backward_weight_ms)


def machine_key() -> dict[str, object]:
    """What profiled times depend on besides the graph: the processor, torch and its thread count."""
    return {
        "processor": _cpu_model(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def profile_key(captured: Captured, settings: ProfileSettings = ProfileSettings()) -> str:
    """A hash of the graph (every node's name and signature, so its shapes too), of the machine
    and of the clock the times were taken with."""
    gm = captured.graph_module
    needs_grad = grad_nodes(gm)
    digest = hashlib.sha256()
    digest.update(json.dumps({**machine_key(), "clock": settings.resolved_clock()}, sort_keys=True).encode())
    for node in compute_nodes(gm):
        digest.update(f"{node.name}={node_signature(gm, node, needs_grad)!r};".encode())
    return digest.hexdigest()[:32]


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"profile-{key}.json"


def _read_cache(cache_dir: Path, key: str) -> dict[str, NodeTimes] | None:
    path = _cache_path(cache_dir, key)
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION:
            return None
        return {name: NodeTimes(*map(float, times)) for name, times in data["nodes"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:  # a corrupt entry is measured again
        log.warning("ignoring unreadable profile cache %s: %s", path, err)
        return None


def _write_cache(cache_dir: Path, key: str, times: dict[str, NodeTimes]) -> None:
    path = _cache_path(cache_dir, key)
    data = {"version": CACHE_VERSION, "machine": machine_key(),
            "nodes": {name: [t.forward_ms, t.backward_input_ms, t.backward_weight_ms] for name, t in times.items()}}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent compile reads the old file or the new one
    except OSError as err:
        log.warning("cannot write the profile cache %s: %s", path, err)


def measure_node_times(captured: Captured, real_inputs: Sequence[torch.Tensor],
                       settings: ProfileSettings = ProfileSettings()) -> dict[str, NodeTimes]:
    """Median F, B, W times of every compute node, running the graph once on `real_inputs`
    (one micro-batch: model inputs then target). Nodes that share a signature share one timing."""
    gm = captured.graph_module
    with _model_state_kept(gm):
        profiler = _NodeProfiler(gm, settings)
        with torch.no_grad():  # the real run only feeds the nodes' inputs; timing turns grad on
            profiler.run(*real_inputs)
        profiler.progress.finish()
    return profiler.times


class _Progress:
    """A one-line progress bar on stderr, shown only once the work has taken `after_s`."""

    def __init__(self, total: int, after_s: float | None, stream: TextIO | None = None) -> None:
        self.total = total
        self.after_s = after_s
        self.stream = stream
        self.start = time.perf_counter()
        self.shown = False
        self.last_draw = 0.0

    def update(self, done: int, measured: int) -> None:
        now = time.perf_counter()
        if self.after_s is None or now - self.start < self.after_s or now - self.last_draw < 0.1:
            return
        self.last_draw = now
        self.shown = True
        width = 30
        filled = width * done // max(self.total, 1)
        stream = self.stream or sys.stderr
        stream.write(f"\rpipecc: profiling [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} nodes, "
                     f"{measured} timed, {now - self.start:.1f} s")
        stream.flush()

    def finish(self) -> None:
        if self.shown:
            stream = self.stream or sys.stderr
            stream.write("\n")
            stream.flush()


class _NodeProfiler(fx.Interpreter):
    """Runs the graph on real tensors; at each compute node, times the node with its real arguments."""

    def __init__(self, gm: fx.GraphModule, settings: ProfileSettings) -> None:
        super().__init__(gm)
        self.settings = settings
        self.needs_grad = grad_nodes(gm)
        self.num_compute = len(compute_nodes(gm))
        self.times: dict[str, NodeTimes] = {}
        self.by_signature: dict[tuple[object, ...], NodeTimes | None] = {}
        self.done = 0
        self.progress = _Progress(self.num_compute, settings.progress_after_s)
        self.engine_ms = engine_overhead_ms(settings)

    def run_node(self, n: fx.Node) -> object:
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        key = node_signature(self.module, n, self.needs_grad)
        if key not in self.by_signature:
            self.by_signature[key] = self._time_node(n)
        times = self.by_signature[key]
        if times is not None:
            self.times[n.name] = times
        self.done += 1
        self.progress.update(self.done, len(self.by_signature))
        return getattr(self, n.op)(n.target, args, kwargs)

    def _time_node(self, n: fx.Node) -> NodeTimes | None:
        # Copies of the activation inputs (so an in-place op cannot change the real run), the
        # ones that carry gradients made leaves, as a stage's received inputs are.
        leaves: list[torch.Tensor] = []

        def fresh(arg: fx.Node) -> object:
            value = self.env[arg]
            if not isinstance(value, torch.Tensor) or arg.op == "get_attr":
                return value
            copy = value.detach().clone()
            if arg.name in self.needs_grad and copy.dtype.is_floating_point:
                leaves.append(copy.requires_grad_(True))
            return copy

        copies = {a: fresh(a) for a in n.all_input_nodes}
        args = fx.node.map_arg(n.args, copies.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, copies.__getitem__)
        params = [t for _, t in node_tensors(self.module, n) if t.requires_grad]
        call = getattr(self, n.op)

        def forward() -> list[torch.Tensor]:
            out = call(n.target, args, kwargs)
            return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]

        try:
            with torch.enable_grad():
                forward_ms = _median_ms(forward, self.settings)
                outputs = forward()
                grads = [torch.ones_like(o) for o in outputs]
                backward_input_ms = _backward_ms(outputs, leaves, grads, self.settings, self.engine_ms)
                backward_weight_ms = _backward_ms(outputs, params, grads, self.settings, self.engine_ms)
        except Exception as err:  # in-place on a leaf, an op with no backward: keep the roofline
            log.info("cannot profile %s alone (%s); it keeps its analytic cost", n.name, err)
            return None
        return NodeTimes(forward_ms, backward_input_ms, backward_weight_ms)


def _backward_ms(outputs: list[torch.Tensor], wrt: list[torch.Tensor], grads: list[torch.Tensor],
                 settings: ProfileSettings, engine_ms: float) -> float:
    """Time of the node's share of a backward: one autograd.grad call less the engine's fixed start cost."""
    if not outputs or not wrt:
        return 0.0
    total_ms = _median_ms(lambda: torch.autograd.grad(outputs, wrt, grads, retain_graph=True, allow_unused=True),
                          settings)
    return max(total_ms - engine_ms, 0.0)


def engine_overhead_ms(settings: ProfileSettings) -> float:
    """The fixed cost of starting one torch.autograd.grad call (10-30 us on a CPU), apart from
    the per-node work inside it: t(1-node graph) - (t(2-node chain) - t(1-node graph)). A stage's
    backward starts the engine once, not once per node, so the profiler takes it off every
    per-node backward time (without this, a BERT-sized model's node times summed to ~1.4x its
    measured stage time).

    The difference doubles the noise of its two timings, and one estimate is taken off every
    node's backward, so this is the median of ENGINE_ESTIMATES of them: a single one at a moment
    of load once came out above a small Linear's whole weight-gradient time, which then read 0."""
    x = torch.zeros(1, requires_grad=True)
    g = torch.ones(1)
    with torch.enable_grad():
        one = x * 1.0
        two = one * 1.0

    def estimate() -> float:
        one_ms = _median_ms(lambda: torch.autograd.grad([one], [x], [g], retain_graph=True), settings)
        two_ms = _median_ms(lambda: torch.autograd.grad([two], [x], [g], retain_graph=True), settings)
        return 2 * one_ms - two_ms

    return max(statistics.median(estimate() for _ in range(ENGINE_ESTIMATES)), 0.0)


ENGINE_ESTIMATES = 3  # each is two timings, about 50 ms


def _median_ms(fn: Callable[[], object], settings: ProfileSettings) -> float:
    """Median time of one call of `fn` in ms, over `settings.repeats` samples after warm-up."""
    now = settings.timer()
    for _ in range(settings.warmup):
        fn()
    start = now()
    fn()
    once_s = max(now() - start, 1e-7)
    calls = min(settings.max_calls_per_sample, max(1, math.ceil(settings.min_sample_ms / 1e3 / once_s)))
    samples = []
    for _ in range(settings.repeats):
        start = now()
        for _ in range(calls):
            fn()
        samples.append((now() - start) / calls)
    return statistics.median(samples) * 1e3


class _model_state_kept:
    """Context: the graph module's buffers and the global RNG state are restored on exit."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __enter__(self) -> None:
        self.buffers = [(b, b.detach().clone()) for b in self.gm.buffers()]
        self.rng = torch.get_rng_state()

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        torch.set_rng_state(self.rng)



@dataclass(frozen=True)
class StageTimes:
    """Measured median times of one whole stage for one micro-batch, in ms."""

    forward_ms: float
    backward_ms: float  # input and weight gradients together, one autograd call


def measure_stage_times(stages: Sequence[Stage], inputs: Sequence[torch.Tensor], target: torch.Tensor,
                        num_microbatches: int, settings: ProfileSettings = ProfileSettings()) -> list[StageTimes]:
    """Each stage run whole on the first micro-batch of `inputs`: forward, then one backward for
    its input and weight gradients. What a sum of profiled node times should add up to."""
    micro_inputs = [t.chunk(num_microbatches)[0] for t in inputs]
    micro_target = target.chunk(num_microbatches)[0]
    received: list[torch.Tensor] = []
    results = []
    for stage in stages:
        args: list[torch.Tensor] = []
        leaves: list[torch.Tensor] = []
        activations = iter(received)
        for spec in stage.inputs:
            if spec.kind is InputKind.ACTIVATION:
                value = next(activations).detach().requires_grad_(spec.spec.requires_grad)
                if spec.spec.requires_grad:
                    leaves.append(value)
            else:
                value = micro_target if spec.kind is InputKind.TARGET else micro_inputs[spec.input_index]
            args.append(value)
        params = [p for p in stage.graph.parameters() if p.requires_grad]
        with _model_state_kept(stage.graph), torch.enable_grad():
            forward_ms = _median_ms(lambda: stage.graph(*args), settings)
            outputs = [o for o in stage.graph(*args) if o.requires_grad]
            grads = [torch.ones_like(o) for o in outputs]
            backward_ms = _median_ms(lambda: torch.autograd.grad(outputs, leaves + params, grads, retain_graph=True,
                                                                 allow_unused=True), settings)
            received = list(stage.graph(*args))
        results.append(StageTimes(forward_ms, backward_ms))
    return results
