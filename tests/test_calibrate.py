"""Calibration: fitting a device spec to measured stage runs and link ping-pongs."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

import pipecc
from examples import gpt
from pipecc.calibration import write_device
from pipecc.costs import DeviceSpec, resolve_device
from pipecc.errors import ConfigError
from pipecc.passes.calibrate import (ComputeFit, LinkSample, StageSample, calibrated_device, fit_compute, fit_link,
                                     ping_pong_ms, predict_ms, stage_samples)
from pipecc.passes.capture import capture
from pipecc.passes.profile import ProfileSettings
from pipecc.testing import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = DeviceSpec.preset("cpu")
FAST = ProfileSettings(warmup=1, repeats=3, min_sample_ms=0.05, progress_after_s=None)


def _synthetic_samples(truth: DeviceSpec, num_samples: int = 24, seed: int = 0) -> list[StageSample]:
    """Stage samples whose 'measured' times are exactly what `truth` predicts: matmul-like terms
    (compute bound) and element-wise terms (memory bound) of many sizes."""
    rng = random.Random(seed)
    samples = []
    for k in range(num_samples):
        n = rng.randint(3, 30)
        flops = tuple(rng.choice([0, 10 ** rng.uniform(5, 9)]) for _ in range(n))
        moved = tuple(int(10 ** rng.uniform(3, 7)) for _ in range(n))
        flops = tuple(int(f) for f in flops)
        sample = StageSample(f"s{k}", flops, moved, 0.0)
        samples.append(dataclasses.replace(sample, measured_ms=predict_ms(sample, truth)))
    return samples


def test_fit_recovers_the_device_that_produced_the_times() -> None:
    truth = dataclasses.replace(CPU, peak_flops=20e9, memory_bandwidth_bytes_per_s=0.8e9, op_overhead_ms=0.03)
    fit = fit_compute(_synthetic_samples(truth))
    assert fit.peak_flops == pytest.approx(truth.peak_flops, rel=0.03)
    assert fit.memory_bandwidth_bytes_per_s == pytest.approx(truth.memory_bandwidth_bytes_per_s, rel=0.03)
    assert fit.op_overhead_ms == pytest.approx(truth.op_overhead_ms, rel=0.1, abs=2e-3)
    assert fit.rms_relative_error < 0.02
    # and the preset, a wrong guess for these "measurements", is far off
    assert max(abs(predict_ms(s, CPU) / s.measured_ms - 1) for s in _synthetic_samples(truth)) > 0.5


def test_too_few_samples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"at least 3 stage samples, got 1\.\nGive it more"):
        fit_compute([StageSample("x", (1,), (1,), 1.0)])


def test_link_fit_is_the_line_through_the_ping_pongs() -> None:
    latency_ms, bandwidth = 0.04, 1.5e9
    samples = [LinkSample(n, latency_ms + n / bandwidth * 1e3) for n in (1 << 10, 1 << 16, 1 << 20, 1 << 22)]
    fitted_latency, fitted_bandwidth = fit_link(samples)
    assert fitted_latency == pytest.approx(latency_ms, rel=1e-6)
    assert fitted_bandwidth == pytest.approx(bandwidth, rel=1e-6)


def test_stage_samples_predict_what_the_plan_predicts() -> None:
    """A sample's roofline sum on a device is the stage time split_stages computed on it: the fit
    adjusts exactly the numbers the partitioner and the simulator use."""
    model, inputs, loss_fn, target = gpt.build(batch_size=4, vocab_size=64, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2)
    captured = capture(model, inputs, loss_fn, target, num_microbatches=2)
    samples = stage_samples("gpt", captured, plan.stages, inputs, target, 2, FAST)
    assert [s.label for s in samples] == ["gpt stage 0 F (mb 2)", "gpt stage 0 BW (mb 2)",
                                          "gpt stage 1 F (mb 2)", "gpt stage 1 BW (mb 2)"]
    for stage, (forward, backward) in zip(plan.stages, zip(samples[::2], samples[1::2])):
        assert predict_ms(forward, CPU) == pytest.approx(stage.cost.forward_ms, rel=1e-9)
        assert predict_ms(backward, CPU) == pytest.approx(stage.cost.backward_input_ms + stage.cost.backward_weight_ms,
                                                          rel=1e-9)
        assert forward.measured_ms > 0 and backward.measured_ms > 0


def test_fitted_device_is_a_device_json_that_compile_accepts(tmp_path: Path) -> None:
    fit = ComputeFit(peak_flops=12e9, memory_bandwidth_bytes_per_s=0.7e9, op_overhead_ms=0.02, rms_relative_error=0.1)
    device = calibrated_device(CPU, "this-cpu", fit, link=(0.08, 1.2e9))
    path = write_device(device, tmp_path / "device.json")
    assert resolve_device(str(path)) == device
    assert (device.link_latency_ms, device.memory_capacity_bytes) == (0.08, CPU.memory_capacity_bytes)
    model, inputs, loss_fn, target = gpt.build(batch_size=4, vocab_size=64, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    slow = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2,
                          device=str(path))
    fast = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2)
    assert slow.device == device
    assert slow.simulate().step_time_ms > fast.simulate().step_time_ms  # 12 GFLOP/s is slower than the preset


def _ping_pong() -> list[LinkSample]:
    return ping_pong_ms([1 << 10, 1 << 18], repeats=3)


@pytest.mark.dist
def test_ping_pong_over_gloo_measures_each_size() -> None:
    rank0, rank1 = run_ranks(_ping_pong, 2)
    assert [s.num_bytes for s in rank0] == [1 << 10, 1 << 18]
    assert all(s.one_way_ms > 0 for s in rank0 + rank1)


def test_cli_calibrate_writes_a_device_json_that_report_reads(tmp_path: Path, capsys) -> None:
    from pipecc.cli import main

    out = tmp_path / "this-machine.json"
    assert main(["calibrate", "examples/mlp.py:build", "-o", str(out), "--name", "this-machine", "--no-link"]) == 0
    printed = capsys.readouterr().out
    assert "mlp stage 0 F (mb 2)" in printed and "mlp stage 1 BW (mb 4)" in printed  # per stage run
    assert f"wrote {out}: use it with --device {out}" in printed
    fitted = resolve_device(str(out))
    assert fitted.name == "this-machine" and fitted.link_latency_ms == CPU.link_latency_ms  # --no-link keeps it
    assert fitted.peak_flops != CPU.peak_flops
    assert main(["report", "examples/mlp.py:build", "--device", str(out)]) == 0
    assert "device this-machine" in capsys.readouterr().out
