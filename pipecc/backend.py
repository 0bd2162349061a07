"""The torch.compile front door: `torch.compile(step, backend="pipecc", options={...})`.

Dynamo hands the backend one graph per captured region, with the parameters lifted to graph
inputs (torch 2.13: `placeholder` nodes whose example values are the model's very
`nn.Parameter` objects). For a graph that returns a scalar loss, the backend turns the
parameter placeholders back into attributes, compiles the result with `pipecc.compile`, and
returns a callable that runs the whole pipelined training step (forward and backward of every
micro-batch) inside one `torch.autograd.Function`. Its backward hands back the gradients the
step already computed, scaled by the incoming gradient, so `loss.backward()` leaves in each
parameter's `.grad` what the unpartitioned step would have left there.

    step = torch.compile(lambda x, y: loss_fn(model(x), y), backend="pipecc",
                         options={"num_microbatches": 4, "schedule": "1f1b"})
    loss = step(x, y)        # full-batch loss, on every rank
    loss.backward()          # .grad of this rank's parameters; the others stay None
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import fx, nn

from pipecc.errors import ConfigError, PipeccError
from pipecc.plan import Plan

log = logging.getLogger(__name__)

# Where dynamo's pipelined loss and the eager full-batch loss may differ only by summation order.
_LOSS_RTOL = 1e-4


# Options of the backend itself; every other option is a keyword argument of pipecc.compile.
_BACKEND_ONLY = {"memory_limit": None, "timeout_s": 300.0}
_NOT_OPTIONS = {"loss_fn", "example_target"}  # the backend supplies these


def compile_option_names() -> tuple[str, ...]:
    """The keyword arguments of pipecc.compile that torch.compile's options= may set."""
    from pipecc.api import compile as compile_plan

    params = inspect.signature(compile_plan).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _NOT_OPTIONS)


@dataclass(frozen=True)
class BackendOptions:
    """The `options=` of torch.compile(backend="pipecc"): pipecc.compile's keyword arguments
    (num_stages, num_microbatches, schedule, device, max_memory_bytes, ...), plus `memory_limit`
    (the text form of max_memory_bytes, "20GiB") and `timeout_s` (how long a rank waits for a peer).

    num_stages defaults to the process group's size times the schedule's stages per rank
    (2 stages without a process group); num_microbatches defaults to num_stages.
    """

    compile_kwargs: Mapping[str, object]
    memory_limit: str | None = None
    timeout_s: float = 300.0

    @staticmethod
    def parse(options: Mapping[str, object] | None) -> BackendOptions:
        """The options, checked by name; ConfigError naming an unknown one and listing the known."""
        options = dict(options or {})
        known = [*compile_option_names(), *_BACKEND_ONLY]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"torch.compile(backend='pipecc') got unknown option{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}.\nThe options are {', '.join(known)}.")
        own = {name: options.pop(name, default) for name, default in _BACKEND_ONLY.items()}
        return BackendOptions(compile_kwargs=options, **own)  # type: ignore[arg-type]

    def resolved(self) -> dict[str, object]:
        """pipecc.compile's keyword arguments, with the defaults that depend on the process group filled in."""
        from pipecc.cli import parse_bytes
        from pipecc.passes.schedules import default_num_stages

        kwargs = dict(self.compile_kwargs)
        schedule = str(kwargs.get("schedule", "1f1b"))
        grouped = dist.is_available() and dist.is_initialized()
        if grouped and "num_ranks" in compile_option_names():
            kwargs.setdefault("num_ranks", dist.get_world_size())
        if "num_stages" not in kwargs:
            kwargs["num_stages"] = default_num_stages(schedule, dist.get_world_size()) if grouped else 2
        kwargs.setdefault("num_microbatches", kwargs["num_stages"])
        if self.memory_limit is not None:
            if kwargs.get("max_memory_bytes") is not None:
                raise ConfigError("options memory_limit and max_memory_bytes both given.\nPass one of them.")
            kwargs["max_memory_bytes"] = parse_bytes(self.memory_limit)
        return kwargs


@dataclass(frozen=True)
class GraphInputs:
    """How dynamo's placeholders split: trainable state (lifted attributes) and batch arguments."""

    names: tuple[str, ...]  # per placeholder: the canonical name of an attribute, or "" for a batch input
    batch_positions: tuple[int, ...]  # placeholders that are arguments of the compiled call

    @property
    def attribute_positions(self) -> tuple[int, ...]:
        return tuple(i for i, name in enumerate(self.names) if name)


def pipecc_backend(gm: fx.GraphModule, example_inputs: Sequence[object], *,
                   options: Mapping[str, object] | None = None) -> Callable[..., object]:
    """A dynamo backend: the callable that runs `gm` as a pipelined training step.

    Registered as "pipecc" through the `torch_dynamo_backends` entry point. A graph without
    trainable parameters (nothing to pipeline, e.g. the tail after a graph break) runs as is;
    a graph with parameters must return one scalar loss, else ConfigError says where the graph
    ends (usually a graph break) and how to fix it.
    """
    opts = BackendOptions.parse(options)
    inputs = classify_inputs(gm, example_inputs)
    params = [example_inputs[i] for i in inputs.attribute_positions if isinstance(example_inputs[i], nn.Parameter)]
    if not any(p.requires_grad for p in params):
        log.info("pipecc backend: a graph without trainable parameters runs as is")
        return gm.forward
    check_scalar_loss(gm)
    module = graph_as_module(gm, example_inputs, inputs)
    batch = [example_inputs[i] for i in inputs.batch_positions]
    check_loss_is_batch_mean(gm, example_inputs, inputs, opts)
    return PipelinedGraph(gm, compile_graph(module, batch, opts), inputs, example_inputs, opts)


def classify_inputs(gm: fx.GraphModule, example_inputs: Sequence[object]) -> GraphInputs:
    """Placeholders whose dynamo source reads an attribute (`G['model']._modules['fc']._parameters['w']`)
    are model state; the rest are the batch. ConfigError for symbolic sizes (pipecc plans are static)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names: list[str] = []
    batch: list[int] = []
    taken: set[str] = set()
    for index, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(example, torch.Tensor) or any(not isinstance(s, int) for s in example.shape):
            raise ConfigError(
                f"graph input {node.name} is {type(example).__name__}"
                f"{'' if not isinstance(example, torch.Tensor) else ' with symbolic shape ' + str(tuple(example.shape))}; "
                "pipecc plans have static shapes.\n"
                "Pass dynamic=False to torch.compile: each batch shape then gets a plan of its own."
            )
        source = _source_name(node)
        path = re.findall(r"_(?:modules|parameters|buffers)\['([^']+)'\]", source)
        if isinstance(example, nn.Parameter) or path:
            name = ".".join(path) or node.name
            if name in taken:
                name = node.name
            taken.add(name)
            names.append(name)
        else:
            names.append("")
            batch.append(index)
    return GraphInputs(tuple(names), tuple(batch))


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "")
    return name() if callable(name) else str(name)


def check_scalar_loss(gm: fx.GraphModule) -> None:
    """ConfigError unless `gm` returns exactly one scalar tensor: what a graph break usually breaks."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    shapes = [tuple(v.meta["example_value"].shape) if isinstance(v, fx.Node) and "example_value" in v.meta
              else type(v).__name__ for v in values]
    if len(values) == 1 and shapes[0] == ():
        return
    raise ConfigError(
        f"the compiled graph returns {len(values)} value{'s' if len(values) != 1 else ''} of shape "
        f"{', '.join(map(str, shapes))}, not one scalar loss; {_where_graph_ends(gm)}.\n"
        "pipecc compiles a training step: torch.compile a function that returns the loss, "
        "e.g. lambda x, y: loss_fn(model(x), y), with no graph break inside it "
        "(find breaks with TORCH_LOGS=graph_breaks, or pass fullgraph=True)."
    )


def _where_graph_ends(gm: fx.GraphModule) -> str:
    """'the graph ends after file.py:12 (`code`)': the last traced line, where a graph break cut the step."""
    for node in reversed(gm.graph.nodes):
        trace = node.meta.get("stack_trace")
        if trace:
            frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
            if frames:
                path, line, code = frames[-1]
                return f"the graph ends after {path}:{line} ({code.strip()}), where dynamo broke the step"
    return "dynamo may have broken the step into several graphs"


def graph_as_module(gm: fx.GraphModule, example_inputs: Sequence[object], inputs: GraphInputs) -> fx.GraphModule:
    """`gm` as a module of the batch inputs only: attribute placeholders become get_attr nodes
    on the very tensors dynamo handed over (so gradients land in the user's parameters), and
    the 1-tuple output becomes the bare loss."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, inputs.names):  # placeholders lead, as fx codegen wants
        if not name:
            env[node] = graph.placeholder(node.name)
    for node, name, example in zip(placeholders, inputs.names, example_inputs):
        if name:
            _set_attribute(root, name, example)
            env[node] = graph.get_attr(name)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            value = node.args[0]
            graph.output(env[value[0]] if isinstance(value, (tuple, list)) else env[value])
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    for name, module in gm.named_children():  # call_module targets, if dynamo left any
        if not hasattr(root, name):
            root.add_module(name, module)
    return fx.GraphModule(root, graph, class_name="DynamoGraph")


def _set_attribute(root: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Parameter):
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)


def _loss_is_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The graph already ends in the loss: pipecc's loss_fn passes it through (the target is a dummy)."""
    return output


def compile_graph(module: fx.GraphModule, batch: Sequence[torch.Tensor], opts: BackendOptions) -> Plan:
    """pipecc.compile of the dynamo graph, with a dummy target (the loss needs none)."""
    from pipecc.api import compile as compile_plan

    if not batch:
        raise ConfigError("the compiled step takes no tensor arguments, so there is no batch to split into "
                          "micro-batches.\nPass the batch (inputs and targets) as arguments of the compiled function.")
    dummy_target = torch.zeros(batch[0].shape[0])
    return compile_plan(module, tuple(batch), loss_fn=_loss_is_output, example_target=dummy_target,
                        **opts.resolved())  # type: ignore[arg-type]


def check_loss_is_batch_mean(gm: fx.GraphModule, example_inputs: Sequence[object], inputs: GraphInputs,
                             opts: BackendOptions) -> None:
    """ConfigError unless the mean of the micro-batch losses equals the full-batch loss.

    A pipeline averages its micro-batches' losses (and gradients). That equals the step without
    the backend only for a loss that is a mean over the batch, with no batch statistics
    (BatchNorm in training mode) or randomness (dropout) inside; checked once, on the example batch."""
    num_microbatches = int(opts.resolved()["num_microbatches"])  # type: ignore[call-overload]
    if num_microbatches == 1 or not inputs.batch_positions:
        return
    args = list(example_inputs)
    with torch.no_grad():
        full = gm(*args)[0]
        chunks = {i: args[i].chunk(num_microbatches) for i in inputs.batch_positions}  # type: ignore[union-attr]
        if any(len(c) != num_microbatches for c in chunks.values()):
            return  # pipecc.compile reports the batch size that does not divide
        losses = []
        for mb in range(num_microbatches):
            for i, c in chunks.items():
                args[i] = c[mb]
            losses.append(gm(*args)[0])
        mean = torch.stack(losses).mean()
    if not torch.allclose(mean, full, rtol=_LOSS_RTOL, atol=1e-6):
        raise ConfigError(
            f"the step's loss on the whole batch ({float(full):.6g}) is not the mean of its losses on "
            f"{num_microbatches} micro-batches ({float(mean):.6g}), so a pipeline would train on a different loss.\n"
            "Return a loss averaged over the batch (reduction='mean'), and keep batch statistics (BatchNorm in "
            "training mode) and randomness (dropout) out of the step, or pass num_microbatches=1."
        )


class _Step(torch.autograd.Function):
    """One pipelined step as an autograd node: forward runs the whole step (gradients included),
    backward returns those gradients times the incoming gradient of the loss."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, graph: PipelinedGraph,  # type: ignore[override]
                num_params: int, *tensors: torch.Tensor) -> torch.Tensor:
        params, batch = tensors[:num_params], tensors[num_params:]
        loss, grads = graph.run_step(params, batch)
        ctx.grads = grads  # type: ignore[attr-defined]
        ctx.num_batch = len(batch)  # type: ignore[attr-defined]
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple:  # type: ignore[override]
        grads = [None if g is None else g * grad_loss for g in ctx.grads]  # type: ignore[attr-defined]
        return (None, None, *grads, *([None] * ctx.num_batch))  # type: ignore[attr-defined]


class PipelinedGraph:
    """The callable the backend returns for one dynamo graph: the pipelined step of this rank."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, inputs: GraphInputs, example_inputs: Sequence[object],
                 opts: BackendOptions) -> None:
        self.gm = gm
        self.plan = plan
        self.inputs = inputs
        self.param_positions = tuple(i for i in inputs.attribute_positions
                                     if isinstance(example_inputs[i], nn.Parameter))
        self.params = tuple(example_inputs[i] for i in self.param_positions)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.arg_names = [re.sub(r"^L\['([^']+)'\]$", r"\1", _source_name(n)) or n.name for n in placeholders]
        self.distributed = dist.is_available() and dist.is_initialized()
        self.runner = plan.runner(timeout_s=opts.timeout_s) if self.distributed else None
        log.info("pipecc backend: %s", plan.report().splitlines()[0])

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor]:
        params = [args[i] for i in self.param_positions]
        for name_index, (given, compiled) in enumerate(zip(params, self.params)):
            if given is not compiled:
                name = self.inputs.names[self.param_positions[name_index]]
                raise PipeccError(f"parameter {name} was replaced by another tensor after torch.compile built "
                                  "its pipeline.\nUpdate parameters in place (optimizers do), or call "
                                  "torch._dynamo.reset() and compile again.")
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
            return self.gm(*args)  # evaluation: no gradients to pipeline, the graph runs as is
        batch = [args[i] for i in self.inputs.batch_positions]
        for index, tensor in zip(self.inputs.batch_positions, batch):
            if tensor.requires_grad:  # its gradient would be dropped: refuse rather than train wrong
                raise ConfigError(f"argument {self.arg_names[index]} of the compiled step requires grad (it comes "
                                  "out of other autograd work), but pipecc returns gradients for parameters only.\n"
                                  "Move that work into the compiled step, or pass the argument detached.")
        loss = _Step.apply(self, len(params), *params, *batch)
        return (loss,)

    def run_step(self, params: Sequence[nn.Parameter], batch: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The full-batch loss and this step's gradient of every parameter (None where another rank
        holds it), leaving the parameters' .grad as they were."""
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            target = torch.zeros(batch[0].shape[0])
            if self.runner is not None:
                loss = self.runner.step(*batch, target=target, broadcast_loss=True)
            else:
                loss = self.plan.run_local(*batch, target=target)
            grads = [p.grad for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        return loss.detach().reshape(()).clone(), grads
