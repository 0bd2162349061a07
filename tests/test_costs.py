"""Cost annotation (FLOPs, saved bytes, roofline times) and device specs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples import gpt
from pipecc.costs import DEVICE_PRESETS, CostTable, DeviceSpec, resolve_device
from pipecc.errors import ConfigError
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture

CPU = DeviceSpec.preset("cpu")
MICROBATCH, IN, HIDDEN, OUT = 4, 16, 32, 8
FLOAT = 4  # bytes


def _mlp_costs(device: DeviceSpec = CPU) -> CostTable:
    """Costs of Linear(IN, HIDDEN) -> ReLU -> Linear(HIDDEN, OUT) at micro-batch MICROBATCH."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    x, target = torch.randn(2 * MICROBATCH, IN), torch.randn(2 * MICROBATCH, OUT)
    return annotate_costs(capture(model, (x,), F.mse_loss, target, num_microbatches=2), device)


def test_linear_flops_are_2_b_in_out_for_forward_backward_input_and_backward_weight() -> None:
    costs = _mlp_costs()
    second = costs["_2"]  # its input is an activation, so it has an input gradient
    flops = 2 * MICROBATCH * HIDDEN * OUT
    assert (second.flops_forward, second.flops_backward_input, second.flops_backward_weight) == (flops, flops, flops)
    first = costs["_0"]  # reads the model input, which needs no gradient: no B work at all
    flops = 2 * MICROBATCH * IN * HIDDEN
    assert (first.flops_forward, first.flops_backward_input, first.flops_backward_weight) == (flops, 0, flops)
    assert first.backward_input_ms == 0.0 and first.backward_weight_ms > 0


def test_linear_saved_bytes_are_its_input_not_its_weight() -> None:
    costs = _mlp_costs()
    assert costs["_2"].saved_bytes == MICROBATCH * HIDDEN * FLOAT
    assert costs["_0"].saved_bytes == MICROBATCH * IN * FLOAT
    assert costs["_2"].param_names == ("2.weight", "2.bias")
    assert costs.param_bytes["2.weight"] == HIDDEN * OUT * FLOAT and costs.param_bytes["2.bias"] == OUT * FLOAT


def test_relu_has_no_flops_but_takes_time_for_its_bytes() -> None:
    relu = _mlp_costs()["_1"]
    assert (relu.flops_forward, relu.flops_backward_input, relu.flops_backward_weight) == (0, 0, 0)
    activation = MICROBATCH * HIDDEN * FLOAT
    assert relu.bytes_forward == 2 * activation  # reads its input, writes its output
    assert relu.forward_ms == pytest.approx(CPU.compute_ms(0, 2 * activation)) and relu.forward_ms > 0
    assert relu.backward_input_ms > 0 and relu.backward_weight_ms == 0.0
    assert relu.saved_bytes == activation  # ReLU keeps its output for the backward mask


def test_roofline_takes_the_slower_of_compute_and_memory() -> None:
    h100 = DeviceSpec.preset("h100")
    compute_bound = h100.compute_ms(67e12, 1)  # one second of FLOPs, one byte
    memory_bound = h100.compute_ms(1, 3.35e12)  # one second of bytes
    assert compute_bound == pytest.approx(1000 + h100.op_overhead_ms)
    assert memory_bound == pytest.approx(1000 + h100.op_overhead_ms)
    assert h100.compute_ms(0, 0) == 0.0
    assert CPU.transfer_ms(2e9, 3) == pytest.approx(1000 + 3 * CPU.link_latency_ms)
    assert CPU.transfer_ms(0, 0) == 0.0


def test_faster_device_gives_smaller_times() -> None:
    cpu, h100 = _mlp_costs(CPU), _mlp_costs(DeviceSpec.preset("h100"))
    for name in cpu.nodes:
        assert h100[name].total_ms < cpu[name].total_ms, name
        assert h100[name].flops_forward == cpu[name].flops_forward


def test_tied_weight_is_one_parameter_named_once() -> None:
    model, inputs, loss_fn, target = gpt.build(vocab_size=64, d_model=16, n_layers=1, n_heads=2, seq_len=8)
    costs = annotate_costs(capture(model, inputs, loss_fn, target, num_microbatches=2), CPU)
    assert costs["tok_emb"].param_names == costs["lm_head"].param_names == ("tok_emb.weight",)
    assert "lm_head.weight" not in costs.param_bytes
    assert costs.param_bytes["tok_emb.weight"] == 64 * 16 * FLOAT
    lm_head = costs["lm_head"]  # (B*T, d) x (d, vocab)
    assert lm_head.flops_forward == 2 * 4 * 8 * 16 * 64


def test_annotation_is_deterministic() -> None:
    assert _mlp_costs() == _mlp_costs()


@pytest.mark.parametrize("name", ["cpu", "a100", "h100"])
def test_presets_exist_and_resolve_by_name(name: str) -> None:
    spec = DeviceSpec.preset(name)
    assert spec.name == name and resolve_device(name) is spec and resolve_device(spec) is spec
    assert spec.peak_flops > 0 and spec.memory_capacity_bytes > 0
    assert set(DEVICE_PRESETS) == {"cpu", "a100", "h100"}


def test_device_resolves_from_a_json_file(tmp_path: Path) -> None:
    custom = dataclasses.replace(DeviceSpec.preset("a100"), name="my-gpu", peak_flops=1e14)
    path = tmp_path / "my-gpu.json"
    path.write_text(json.dumps(custom.to_json()))
    assert resolve_device(str(path)) == custom
    assert resolve_device(path) == custom
    assert DeviceSpec.load(path) == custom


def test_unknown_preset_is_a_config_error_listing_the_presets() -> None:
    with pytest.raises(ConfigError, match=r"unknown device 'tpu'; built-in devices are a100, cpu, h100\.\nPass one"):
        DeviceSpec.preset("tpu")
    with pytest.raises(ConfigError, match=r"unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match=r"device=device\(type='cuda'\) is a device; .*\nPass one of those"):
        resolve_device(torch.device("cuda"))


def test_bad_device_json_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=r"cannot read device spec .*missing\.json.*\nA device JSON has the fields name, "):
        resolve_device(str(missing))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"name": "x", "peak_flops": 1e12}))
    with pytest.raises(ConfigError, match=r"cannot read device spec .*partial\.json.*missing"):
        resolve_device(str(partial))
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps({**CPU.to_json(), "link_bandwidth_bytes_per_s": -1}))
    with pytest.raises(ConfigError, match=r"link_bandwidth_bytes_per_s=-1; it must be a positive number") as info:
        resolve_device(str(negative))
    assert "negative.json" in info.value.__notes__[0]


class _Attention(nn.Module):
    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


def test_measurement_cache_tells_apart_modules_whose_repr_hides_a_setting() -> None:
    # MultiheadAttention's repr omits num_heads, but the saved attention weights grow with it.
    x, target = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    saved = {}
    for heads in (1, 8):
        captured = capture(_Attention(heads), (x,), F.mse_loss, target, num_microbatches=1)
        saved[heads] = annotate_costs(captured, CPU)["attn"].saved_bytes
    assert saved[8] - saved[1] == 2 * (8 - 1) * 8 * 8 * FLOAT  # (B, heads, T, T) attention weights


def test_convolutions_are_timed_at_the_conv_rate() -> None:
    """A device with conv_flops times convolution nodes at that rate and every other node as before."""
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(32 * 8 * 8, 10))
    captured = capture(model, (torch.randn(4, 16, 8, 8),), torch.nn.functional.cross_entropy,
                       torch.randint(0, 10, (4,)), num_microbatches=1)
    compute_bound = DeviceSpec("c", peak_flops=1e9, memory_bandwidth_bytes_per_s=1e15, link_bandwidth_bytes_per_s=1e9,
                               link_latency_ms=0.0, memory_capacity_bytes=1 << 30, op_overhead_ms=0.0)
    same = annotate_costs(captured, compute_bound)
    # a slow conv bandwidth as well: the conv stays compute-bound at 1e15 / 4 B/s
    slow_conv = annotate_costs(captured, dataclasses.replace(compute_bound, conv_flops=0.25e9,
                                                             conv_bandwidth_bytes_per_s=0.25e15))
    ratios = {name: slow_conv[name].total_ms / same[name].total_ms for name in same.nodes if same[name].total_ms}
    gm = captured.graph_module
    conv = [n.name for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), torch.nn.Conv2d)]
    assert [round(ratios[n], 6) for n in conv] == [4.0]
    assert all(r == pytest.approx(1.0) for n, r in ratios.items() if n not in conv)
