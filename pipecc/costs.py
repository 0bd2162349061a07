"""Cost data: what a device can do and what every graph node costs on it.

Data only; the estimators live in `pipecc.passes.annotate_costs`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from pipecc.errors import ConfigError

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    """Roofline description of one rank: compute, memory and the link to its neighbours.

    >>> DeviceSpec.preset("a100").peak_flops
    19500000000000.0
    """

    name: str
    peak_flops: float  # float32 FLOP/s the device sustains on large matmuls
    memory_bandwidth_bytes_per_s: float
    link_bandwidth_bytes_per_s: float  # point-to-point, rank to next rank
    link_latency_ms: float  # per message
    memory_capacity_bytes: int
    op_overhead_ms: float  # fixed cost per graph node (dispatch, kernel launch)
    # Convolutions on a roofline of their own, where they run at another efficiency than matmuls
    # and element-wise ops (on one CPU core, a convolution with few channels at full resolution is
    # far from both); 0: peak_flops, memory_bandwidth_bytes_per_s.
    conv_flops: float = 0.0
    conv_bandwidth_bytes_per_s: float = 0.0
    # The runtime's own costs on this device, beyond the graph's ops (0 in the presets; `pipecc
    # calibrate` fits them from measured pipelined steps). Only the simulator charges them.
    action_overhead_ms: float = 0.0  # per compute action (F, B, W, BW): argument plumbing, autograd set-up
    message_overhead_ms: float = 0.0  # CPU time of posting one send, on its rank's clock
    step_overhead_ms: float = 0.0  # per step, outside the actions: splitting the batch, waiting for sends
    # CPU time of taking a receive whose message is already there (its buffer was posted ahead);
    # fitted separately: on a 2-core VM 0.03-0.05 ms, against 0.06-0.25 ms to post a send
    receive_overhead_ms: float = 0.0
    # and posting a send costs this much more per MB it carries (gloo writes into the socket what it
    # takes at once, on the sending thread: on a 2-core VM 0.06 ms for 16 KB, 0.25 ms for 1 MB)
    message_ms_per_mb: float = 0.0
    # CPU time per forward op of recording the autograd graph (its grad_fn, saved tensors), paid
    # where a stage's forward runs under autograd: GPipe, 1F1B and interleaved 1F1B. The zero-bubble
    # schedules run split F/B/W graphs without autograd (passes/split_backward.py) and do not pay
    # it. On a 2-core VM, MLP example: F 0.28-0.41 ms under autograd, 0.22-0.29 ms as a split graph.
    autograd_op_overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bandwidth_bytes_per_s", "link_bandwidth_bytes_per_s",
                     "memory_capacity_bytes", "link_latency_ms", "op_overhead_ms", "action_overhead_ms",
                     "message_overhead_ms", "step_overhead_ms", "receive_overhead_ms", "message_ms_per_mb",
                     "autograd_op_overhead_ms", "conv_flops", "conv_bandwidth_bytes_per_s"):
            value = getattr(self, name)
            # latencies, overheads and per-MB costs may be 0; a conv rate of 0 means the general one
            may_be_zero = name.endswith(("_ms", "_per_mb")) or name.startswith("conv_")
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or not (value >= 0 if may_be_zero else value > 0):
                raise ConfigError(
                    f"device {self.name!r}: {name}={value!r}; it must be a "
                    f"{'non-negative' if may_be_zero else 'positive'} number.\n"
                    "Fix that field of the DeviceSpec (or of the device JSON file)."
                )

    def flops_per_s(self, conv: bool = False) -> float:
        """The FLOP rate of a convolution (`conv`) or of any other op."""
        return self.conv_flops if conv and self.conv_flops else self.peak_flops

    def bytes_per_s(self, conv: bool = False) -> float:
        """The memory bandwidth of a convolution (`conv`) or of any other op."""
        return self.conv_bandwidth_bytes_per_s if conv and self.conv_bandwidth_bytes_per_s \
            else self.memory_bandwidth_bytes_per_s

    def compute_ms(self, flops: float, bytes_moved: float, conv: bool = False) -> float:
        """Roofline time of one op (a convolution if `conv`): the slower of its compute and its memory traffic."""
        if flops == 0 and bytes_moved == 0:
            return 0.0
        seconds = max(flops / self.flops_per_s(conv), bytes_moved / self.bytes_per_s(conv))
        return seconds * 1e3 + self.op_overhead_ms

    def transfer_ms(self, num_bytes: float, num_messages: int) -> float:
        """Time to move `num_bytes` in `num_messages` point-to-point messages."""
        if num_messages == 0:
            return 0.0
        return num_messages * self.link_latency_ms + num_bytes / self.link_bandwidth_bytes_per_s * 1e3

    @staticmethod
    def preset(name: str) -> DeviceSpec:
        """The built-in spec called `name` ("cpu", "a100" or "h100")."""
        try:
            return DEVICE_PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown device {name!r}; built-in devices are {', '.join(sorted(DEVICE_PRESETS))}.\n"
                "Pass one of those, a DeviceSpec, or the path of a device JSON file."
            ) from None

    @staticmethod
    def load(path: str | Path) -> DeviceSpec:
        """Read a DeviceSpec from a JSON file with the same field names."""
        try:
            data = json.loads(Path(path).read_text())
            return DeviceSpec(**data)
        except ConfigError as err:
            err.add_note(f"(in device spec {str(path)!r})")
            raise
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise ConfigError(
                f"cannot read device spec {str(path)!r}: {err}.\n"
                f"A device JSON has the fields {', '.join(DeviceSpec.__dataclass_fields__)}."
            ) from None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def resolve_device(device: DeviceSpec | str) -> DeviceSpec:
    """A DeviceSpec from a spec, a preset name, or a JSON path (a str or a pathlib.Path)."""
    if isinstance(device, DeviceSpec):
        return device
    if isinstance(device, Path) or (isinstance(device, str) and device.endswith(".json")):
        return DeviceSpec.load(device)
    if not isinstance(device, str):
        raise ConfigError(
            f"device={device!r} is a {type(device).__name__}; pipecc describes a device by a DeviceSpec, "
            f"a preset name ({', '.join(sorted(DEVICE_PRESETS))}) or the path of a device JSON file.\n"
            "Pass one of those (pipecc plans for the device; where tensors live is up to the runtime)."
        )
    return DeviceSpec.preset(device)


DEVICE_PRESETS: Mapping[str, DeviceSpec] = {
    # One core of a current x86 server with MKL-DNN float32, gloo over loopback TCP.
    # Order-of-magnitude values; `pipecc calibrate` fits them to a machine.
    "cpu": DeviceSpec(
        name="cpu",
        peak_flops=50e9,
        memory_bandwidth_bytes_per_s=10e9,
        link_bandwidth_bytes_per_s=2e9,
        link_latency_ms=0.05,
        memory_capacity_bytes=24 * GiB,
        op_overhead_ms=0.01,
    ),
    # NVIDIA A100 SXM 80GB: float32 (non-TF32) peak, HBM2e, NVLink3 per direction.
    "a100": DeviceSpec(
        name="a100",
        peak_flops=19.5e12,
        memory_bandwidth_bytes_per_s=2.0e12,
        link_bandwidth_bytes_per_s=300e9,
        link_latency_ms=0.01,
        memory_capacity_bytes=80 * GiB,
        op_overhead_ms=0.005,
    ),
    # NVIDIA H100 SXM: float32 peak, HBM3, NVLink4 per direction.
    "h100": DeviceSpec(
        name="h100",
        peak_flops=67e12,
        memory_bandwidth_bytes_per_s=3.35e12,
        link_bandwidth_bytes_per_s=450e9,
        link_latency_ms=0.008,
        memory_capacity_bytes=80 * GiB,
        op_overhead_ms=0.004,
    ),
}


@dataclass(frozen=True)
class NodeCost:
    """What one graph node costs: work, bytes and estimated times for F, B and W."""

    flops_forward: int
    flops_backward_input: int
    flops_backward_weight: int
    bytes_forward: int  # bytes read + written by the forward op
    output_bytes: int
    saved_bytes: int  # activations autograd keeps for backward (parameters excluded)
    param_names: tuple[str, ...]  # canonical names of the parameters the node reads
    forward_ms: float
    backward_input_ms: float
    backward_weight_ms: float

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_input_ms + self.backward_weight_ms


ZERO_COST = NodeCost(0, 0, 0, 0, 0, 0, (), 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class CostTable:
    """Per-node costs keyed by fx node name, plus parameter sizes keyed by canonical name."""

    device: DeviceSpec
    nodes: Mapping[str, NodeCost]
    param_bytes: Mapping[str, int] = field(default_factory=dict)

    def __getitem__(self, node_name: str) -> NodeCost:
        return self.nodes.get(node_name, ZERO_COST)
