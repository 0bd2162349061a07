"""The values the passes hand each other: frozen dataclasses and enums.

Data flow: Captured -> CostTable -> Partition -> tuple[Stage] -> Schedule -> Plan.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import torch
from torch import fx, nn


@dataclass(frozen=True)
class Config:
    """Everything the user chose for one compile."""

    num_stages: int
    num_microbatches: int
    schedule: str = "1f1b"
    device: str = "cpu"  # preset name or device JSON path, as given
    max_memory_bytes: int | None = None
    num_ranks: int | None = None  # defaults to the schedule's placement (one stage per rank)
    cost_model: str = "analytic"  # "analytic" (roofline on the device spec) or "profile" (measured)
    profile_cache_dir: str | None = None  # where cost_model="profile" caches its times; None: no cache
    symbolic_sizes: bool = False  # keep cost formulas in the micro-batch size (plan.what_if, report(formulas=True))
    symbolic_sequence_dim: int | None = None  # with symbolic_sizes: this input dim is the sequence length T too


@dataclass(frozen=True)
class TensorSpec:
    """Static shape and dtype of one tensor at micro-batch size."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    requires_grad: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def num_bytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.torch_dtype.itemsize

    @staticmethod
    def of(tensor: torch.Tensor, requires_grad: bool) -> TensorSpec:
        return TensorSpec(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), requires_grad)


class InputKind(enum.Enum):
    MODEL_INPUT = "model_input"  # a positional input of the user's model (every rank has it)
    TARGET = "target"  # the loss target (every rank has it)
    ACTIVATION = "activation"  # received from the previous stage


@dataclass(frozen=True)
class StageInput:
    name: str  # fx node name in the captured graph
    kind: InputKind
    spec: TensorSpec
    input_index: int = -1  # position among the model inputs, for MODEL_INPUT


@dataclass(frozen=True)
class StageOutput:
    name: str
    spec: TensorSpec


@dataclass(frozen=True)
class ParamBinding:
    """A parameter or buffer of a stage module: its name there and in the user's model."""

    local_name: str
    canonical_name: str
    is_parameter: bool  # False for buffers


@dataclass(frozen=True)
class StageCost:
    """Estimated cost of one stage for one micro-batch."""

    num_nodes: int
    num_params: int  # parameter elements (a tied parameter counts once per stage that holds it)
    flops: int  # forward FLOPs
    param_bytes: int
    forward_ms: float
    backward_input_ms: float
    backward_weight_ms: float
    send_forward_ms: float  # activations to the next stage
    send_backward_ms: float  # gradients to the previous stage
    bytes_to_next: int
    saved_bytes: int  # activations kept per in-flight micro-batch
    memory_bytes: int  # weights + grads + in-flight activations under the plan's schedule
    comm_ms: float  # moving activations and gradients across both of its boundaries
    # The runtime's own costs on this stage's rank (DeviceSpec fields of the same names): the
    # simulator charges them, the partitioner does not (they are about the same on every stage).
    action_overhead_ms: float = 0.0
    message_overhead_ms: float = 0.0
    step_overhead_ms: float = 0.0
    # Summing the gradients of weights that other ranks also hold (tied weights), after the rank's
    # last action; carried by the rank's first stage, 0 on its others.
    sync_ms: float = 0.0
    receive_overhead_ms: float = 0.0  # the DeviceSpec fields of these names
    message_ms_per_mb: float = 0.0
    # the stage's forward ops times DeviceSpec.autograd_op_overhead_ms: what its F costs on top of
    # forward_ms where it runs under autograd (the simulator charges it unless the schedule splits B and W)
    autograd_forward_ms: float = 0.0

    @property
    def compute_ms(self) -> float:
        return self.forward_ms + self.backward_input_ms + self.backward_weight_ms

    @property
    def time_ms(self) -> float:
        """What the partitioner balances: compute plus traffic at both ends, per micro-batch."""
        return self.compute_ms + self.comm_ms


@dataclass(frozen=True)
class Partition:
    """node name -> stage index, for every compute node; stages are contiguous in graph order."""

    num_stages: int
    stage_of: Mapping[str, int]
    bottleneck_ms: float  # the slowest stage: what the partitioner minimised with one stage per rank
    # The largest sum of one rank's stages, minimised first where a rank holds several
    # (passes/rank_balance.py); equal to bottleneck_ms with one stage per rank, None if not computed.
    max_rank_ms: float | None = None

    def nodes_of(self, stage: int) -> tuple[str, ...]:
        return tuple(name for name, s in self.stage_of.items() if s == stage)


@dataclass(frozen=True)
class SplitBackward:
    """A stage's forward (F), input-gradient (B) and weight-gradient (W) graphs, cut from one
    joint graph (passes/split_backward.py says how each is called). B then W equals the fused
    backward bit for bit; between B and W only the `num_held` values W reads stay alive."""

    weight_names: tuple[str, ...]  # local names of the stage's parameters then buffers: every graph's first args
    grad_param_names: tuple[str, ...]  # the parameters W returns gradients for, in order
    grad_input_positions: tuple[int, ...]  # indices into Stage.inputs of the inputs B returns gradients for
    tangent_positions: tuple[int, ...]  # indices into Stage.outputs of the outputs B receives gradients for
    num_saved: int  # values F hands to B, after the stage outputs
    num_held: int  # values B hands to W, after the input gradients
    forward: fx.GraphModule = field(compare=False, repr=False)
    backward_input: fx.GraphModule = field(compare=False, repr=False)
    backward_weight: fx.GraphModule = field(compare=False, repr=False)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: which rank runs it, which graph nodes it holds, its typed boundary."""

    index: int
    rank: int
    node_names: tuple[str, ...]
    inputs: tuple[StageInput, ...]  # the stage module's positional arguments, in order
    outputs: tuple[StageOutput, ...]  # what its forward returns, in order (the loss, last stage)
    params: tuple[ParamBinding, ...]
    cost: StageCost
    graph: nn.Module = field(compare=False, repr=False)  # fx.GraphModule, or an emitted module
    # F/B/W graphs when the schedule splits backwards and the graph split worked (else autograd splits)
    backward_split: SplitBackward | None = field(default=None, compare=False, repr=False)

    @property
    def activation_inputs(self) -> tuple[StageInput, ...]:
        return tuple(i for i in self.inputs if i.kind is InputKind.ACTIVATION)


def named_stage_parameters(stages: Iterable[Stage]) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of `stages`, each once, under their names in the user's model."""
    seen: set[str] = set()
    for stage in stages:
        params = dict(stage.graph.named_parameters(remove_duplicate=False))
        for binding in stage.params:
            if binding.is_parameter and binding.canonical_name not in seen:
                seen.add(binding.canonical_name)
                yield binding.canonical_name, params[binding.local_name]


def shared_parameters(stages: Iterable[Stage]) -> dict[str, list[int]]:
    """Canonical name -> sorted ranks, for every parameter that stages on several ranks hold (tied
    weights split across ranks: the runtime sums their gradients after each step)."""
    holders: dict[str, set[int]] = {}
    for stage in stages:
        for binding in stage.params:
            if binding.is_parameter:
                holders.setdefault(binding.canonical_name, set()).add(stage.rank)
    return {name: sorted(ranks) for name, ranks in holders.items() if len(ranks) > 1}


class ActionKind(enum.Enum):
    F = "F"  # forward
    B = "B"  # backward for the stage inputs
    W = "W"  # backward for the weights
    BW = "BW"  # both backward parts, fused
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in (ActionKind.F, ActionKind.B, ActionKind.W, ActionKind.BW)


@dataclass(frozen=True, order=True)
class Action:
    """One thing a rank does: printed `{stage}{kind}{microbatch}`, e.g. `0F3`, `1SEND_F0`."""

    stage: int
    kind: ActionKind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"


@dataclass(frozen=True)
class Schedule:
    """Per rank, the ordered actions of one training step."""

    name: str
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    rank_actions: tuple[tuple[Action, ...], ...]

    @property
    def num_ranks(self) -> int:
        return len(self.rank_actions)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)


@dataclass(frozen=True)
class Captured:
    """A traced model+loss: one graph whose output is the scalar loss of one micro-batch."""

    graph_module: fx.GraphModule
    input_names: tuple[str, ...]  # placeholders of the model inputs, in call order
    target_name: str
    batch_size: int
    microbatch_size: int
    canonical_names: Mapping[str, str]  # qualified name in graph_module -> name in the user's model
    method: str  # "symbolic_trace", "export(strict=False)" or "export(strict=True)"


@dataclass(frozen=True)
class ScheduleCandidate:
    """One schedule schedule="auto" tried: its simulated step, or why it could not be built."""

    name: str
    num_stages: int
    step_time_ms: float | None  # None: it could not be built (see note)
    bubble_ratio: float | None
    peak_memory_bytes: tuple[int, ...]  # per rank
    note: str  # "" when it fits; else why it was left out


@dataclass(frozen=True)
class ScheduleChoice:
    """What schedule="auto" compared, which it chose, and why."""

    candidates: tuple[ScheduleCandidate, ...]
    chosen: str
    reason: str
