"""Calibration: fitting a device spec to the runtime's measured actions and steps, and link ping-pongs."""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from pathlib import Path

import pytest

import pipecc
from examples import gpt
from pipecc.calibration import write_device
from pipecc.costs import DeviceSpec, resolve_device
from pipecc.errors import ConfigError
from pipecc.ir import Action, ActionKind
from pipecc.passes.calibrate import (ComputeFit, LinkSample, MeasuredStep, RuntimeFit, StageSample, action_samples,
                                     calibrated_device, fit_compute, fit_link, fit_runtime, ping_pong_ms, predict_ms)
from pipecc.passes.capture import capture
from pipecc.passes.simulate import TimedAction
from pipecc.testing import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = DeviceSpec.preset("cpu")


def _synthetic_samples(truth: DeviceSpec, num_samples: int = 24, seed: int = 0,
                       conv: bool = False) -> list[StageSample]:
    """Stage samples whose 'measured' times are exactly what `truth` predicts: matmul-like terms
    (compute bound) and element-wise terms (memory bound) of many sizes; with `conv`, some of the
    compute-bound terms are convolutions."""
    rng = random.Random(seed)
    samples = []
    for k in range(num_samples):
        n = rng.randint(3, 30)
        flops = tuple(rng.choice([0, 10 ** rng.uniform(5, 9)]) for _ in range(n))
        moved = tuple(int(10 ** rng.uniform(3, 7)) for _ in range(n))
        flops = tuple(int(f) for f in flops)
        is_conv = tuple(conv and f > 0 and rng.random() < 0.5 for f in flops) if conv else ()
        sample = StageSample(f"s{k}", flops, moved, 0.0, is_conv)
        samples.append(dataclasses.replace(sample, measured_ms=predict_ms(sample, truth)))
    return samples


@pytest.mark.parametrize("action_overhead_ms", [0.0, 0.2])
def test_fit_recovers_the_device_that_produced_the_times(action_overhead_ms: float) -> None:
    truth = dataclasses.replace(CPU, peak_flops=20e9, memory_bandwidth_bytes_per_s=0.8e9, op_overhead_ms=0.03,
                                action_overhead_ms=action_overhead_ms)
    fit = fit_compute(_synthetic_samples(truth))
    assert fit.peak_flops == pytest.approx(truth.peak_flops, rel=0.03)
    assert fit.memory_bandwidth_bytes_per_s == pytest.approx(truth.memory_bandwidth_bytes_per_s, rel=0.03)
    assert fit.op_overhead_ms == pytest.approx(truth.op_overhead_ms, rel=0.1, abs=2e-3)
    assert fit.action_overhead_ms == pytest.approx(action_overhead_ms, abs=0.02)
    assert fit.rms_relative_error < 0.02
    # and the preset, a wrong guess for these "measurements", is far off
    assert max(abs(predict_ms(s, CPU) / s.measured_ms - 1) for s in _synthetic_samples(truth)) > 0.5


def test_fit_recovers_a_convolution_roofline_of_its_own() -> None:
    truth = dataclasses.replace(CPU, peak_flops=30e9, conv_flops=12e9, memory_bandwidth_bytes_per_s=2e9,
                                conv_bandwidth_bytes_per_s=0.5e9, op_overhead_ms=0.02, action_overhead_ms=0.1)
    samples = _synthetic_samples(truth, conv=True)
    fit = fit_compute(samples)
    assert fit.peak_flops == pytest.approx(truth.peak_flops, rel=0.03)
    assert fit.memory_bandwidth_bytes_per_s == pytest.approx(truth.memory_bandwidth_bytes_per_s, rel=0.03)
    assert fit.conv_flops == pytest.approx(truth.conv_flops, rel=0.03)
    assert fit.conv_bandwidth_bytes_per_s == pytest.approx(truth.conv_bandwidth_bytes_per_s, rel=0.03)
    assert fit.rms_relative_error < 0.02
    # with one rate for both, the same times fit worse
    assert fit_compute([dataclasses.replace(s, conv=()) for s in samples]).rms_relative_error > 0.05


def test_a_rate_the_samples_do_not_see_keeps_the_prior_value() -> None:
    # U-Net-like: every op that does FLOPs is a convolution, so nothing pins the matmul rate
    truth = dataclasses.replace(CPU, peak_flops=30e9, conv_flops=12e9, memory_bandwidth_bytes_per_s=2e9,
                                conv_bandwidth_bytes_per_s=0.5e9, op_overhead_ms=0.02, action_overhead_ms=0.1)
    conv_only = []
    for s in _synthetic_samples(truth, conv=True):
        flops = tuple(f if c else 0 for f, c in zip(s.flops, s.conv))
        sample = dataclasses.replace(s, flops=flops)
        conv_only.append(dataclasses.replace(sample, measured_ms=predict_ms(sample, truth)))
    unseen = fit_compute(conv_only).peak_flops
    assert not 0.1 < unseen / CPU.peak_flops < 10  # without a prior, the unseen rate lands anywhere
    fit = fit_compute(conv_only, prior=CPU)
    assert fit.peak_flops == pytest.approx(CPU.peak_flops, rel=0.05)
    assert fit.conv_flops == pytest.approx(truth.conv_flops, rel=0.03)  # what the samples do see is still fitted
    assert fit.rms_relative_error < 0.02
    # and a prior 10x off every rate does not pull a well-measured fit
    far = dataclasses.replace(CPU, peak_flops=300e9, memory_bandwidth_bytes_per_s=0.2e9)
    seen = fit_compute(_synthetic_samples(truth, conv=True), prior=far)
    assert seen.peak_flops == pytest.approx(truth.peak_flops, rel=0.03)
    assert seen.memory_bandwidth_bytes_per_s == pytest.approx(truth.memory_bandwidth_bytes_per_s, rel=0.03)


def test_the_autograd_overhead_is_fitted_from_forwards_run_both_ways() -> None:
    """Forwards measured under autograd and as split graphs: the fit tells the recording overhead
    per op from the op's own; with forwards of one way alone it keeps the prior's."""
    truth = dataclasses.replace(CPU, peak_flops=20e9, memory_bandwidth_bytes_per_s=0.8e9, op_overhead_ms=0.03,
                                action_overhead_ms=0.1, autograd_op_overhead_ms=0.012)
    samples = []
    for k, s in enumerate(_synthetic_samples(truth, num_samples=36)):
        sample = dataclasses.replace(s, forward_under_autograd=(True, False, None)[k % 3])  # F, F, a backward
        samples.append(dataclasses.replace(sample, measured_ms=predict_ms(sample, truth)))
    fit = fit_compute(samples, prior=CPU)
    assert fit.autograd_op_overhead_ms == pytest.approx(0.012, rel=0.1)
    assert fit.op_overhead_ms == pytest.approx(0.03, rel=0.1) and fit.rms_relative_error < 0.02
    device = calibrated_device(CPU, "x", fit, None)
    assert device.autograd_op_overhead_ms == fit.autograd_op_overhead_ms
    one_way = [s for s in samples if not s.split_forward]
    assert fit_compute(one_way, prior=CPU).autograd_op_overhead_ms == CPU.autograd_op_overhead_ms == 0.0
    prior = dataclasses.replace(CPU, autograd_op_overhead_ms=0.012)
    assert fit_compute(one_way, prior=prior).autograd_op_overhead_ms == 0.012


def test_too_few_samples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"at least 3 stage samples, got 1\.\nGive it more"):
        fit_compute([StageSample("x", (1,), (1,), 1.0)])


def test_link_fit_is_the_line_through_the_ping_pongs() -> None:
    latency_ms, bandwidth = 0.04, 1.5e9
    samples = [LinkSample(n, latency_ms + n / bandwidth * 1e3) for n in (1 << 10, 1 << 16, 1 << 20, 1 << 22)]
    fitted_latency, fitted_bandwidth = fit_link(samples)
    assert fitted_latency == pytest.approx(latency_ms, rel=1e-6)
    assert fitted_bandwidth == pytest.approx(bandwidth, rel=1e-6)


def test_action_samples_predict_what_the_plan_predicts() -> None:
    """A sample is one stage's action kind in a measured step, and its roofline sum on a device is the
    time split_stages computed on it: the fit adjusts exactly the numbers the partitioner and the
    simulator use."""
    model, inputs, loss_fn, target = gpt.build(batch_size=4, vocab_size=64, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2)
    captured = capture(model, inputs, loss_fn, target, num_microbatches=2)
    steps = [MeasuredStep(0.0, plan.measure_local(*inputs, target=target)[1]) for _ in range(3)]
    samples = action_samples("gpt", captured, plan.stages, steps)
    assert [s.label for s in samples] == ["gpt stage 0 F (mb 2)", "gpt stage 0 BW (mb 2)",
                                          "gpt stage 1 F (mb 2)", "gpt stage 1 BW (mb 2)"]
    # 1F1B runs its forwards under autograd: each of their ops pays the recording overhead
    recording = dataclasses.replace(CPU, autograd_op_overhead_ms=0.01)
    costed = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2,
                            device=recording)
    for stage, (forward, backward) in zip(costed.stages, zip(samples[::2], samples[1::2])):
        assert forward.autograd_ops == len(forward.flops) > 0 and backward.autograd_ops == 0
        assert stage.cost.autograd_forward_ms == pytest.approx(0.01 * forward.autograd_ops)
        assert predict_ms(forward, recording) == pytest.approx(stage.cost.forward_ms + stage.cost.autograd_forward_ms,
                                                               rel=1e-9)
    for stage, (forward, backward) in zip(plan.stages, zip(samples[::2], samples[1::2])):
        assert predict_ms(forward, CPU) == pytest.approx(stage.cost.forward_ms, rel=1e-9)
        assert predict_ms(backward, CPU) == pytest.approx(stage.cost.backward_input_ms + stage.cost.backward_weight_ms,
                                                          rel=1e-9)
        measured = [e.end_ms - e.start_ms for step in steps for e in step.events
                    if e.action.stage == stage.index and e.action.kind is ActionKind.F]
        assert len(measured) == 6 and forward.measured_ms == pytest.approx(statistics.mean(measured))


def test_split_backward_samples_time_b_and_w_apart() -> None:
    model, inputs, loss_fn, target = gpt.build(batch_size=4, vocab_size=64, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2,
                          schedule="zb-h1")
    captured = capture(model, inputs, loss_fn, target, num_microbatches=2)
    samples = action_samples("gpt", captured, plan.stages, [MeasuredStep(0.0, plan.measure_local(*inputs, target=target)[1])])
    assert [s.label for s in samples[:3]] == ["gpt stage 0 F (mb 2)", "gpt stage 0 B (mb 2)", "gpt stage 0 W (mb 2)"]
    assert samples[0].split_forward and samples[0].autograd_ops == 0  # the split forward graph records no autograd
    assert predict_ms(samples[1], CPU) == pytest.approx(plan.stages[0].cost.backward_input_ms, rel=1e-9)
    assert predict_ms(samples[2], CPU) == pytest.approx(plan.stages[0].cost.backward_weight_ms, rel=1e-9)


def _event(rank: int, kind: ActionKind, start: float, end: float) -> TimedAction:
    return TimedAction(rank, Action(rank, kind, 0), start, end)


def test_runtime_fit_reads_messages_and_steps_off_the_timeline() -> None:
    steps = [MeasuredStep(wall, (_event(0, ActionKind.F, 1.0, 3.0), _event(0, ActionKind.SEND_F, 3.0, 3.0 + send),
                                 _event(1, ActionKind.BW, 4.0, 7.0), _event(1, ActionKind.SEND_B, 7.0, 7.0 + send)))
             for wall, send in [(7.5, 0.1), (9.0, 0.2), (8.0, 0.3)]]  # spans 6.1, 6.2, 6.3 ms
    fit = fit_runtime(steps)
    assert fit.message_overhead_ms == pytest.approx(0.2)  # the median send
    assert fit.step_overhead_ms == pytest.approx(1.7)  # the median of 1.4, 2.8 and 1.7 ms outside the actions
    # the tied-weight exchange after the actions is the simulator's sync_ms, not step overhead
    with_sync = [dataclasses.replace(s, wall_ms=s.wall_ms + 3.0, tied_sync_ms=3.0) for s in steps]
    assert fit_runtime(with_sync).step_overhead_ms == pytest.approx(1.7)
    device = calibrated_device(CPU, "x", ComputeFit(1e9, 1e9, 0.0, 0.0, 0.3), None, fit)
    assert (device.action_overhead_ms, device.message_overhead_ms, device.step_overhead_ms) == (0.3, fit.message_overhead_ms,
                                                                                                fit.step_overhead_ms)


def test_receive_overhead_is_read_off_receives_whose_message_was_there() -> None:
    """A receive begun well after its message was sent takes the receive overhead; one that waited
    for the message says nothing about it and is left out."""
    ready = [MeasuredStep(10.0, (_event(0, ActionKind.SEND_F, 1.0, 1.1), _event(1, ActionKind.RECV_F, start, start + ms)))
             for start, ms in [(2.0, 0.04), (1.5, 0.05), (3.0, 0.03)]]
    waited = [MeasuredStep(10.0, (_event(1, ActionKind.RECV_F, 0.0, 1.3), _event(0, ActionKind.SEND_F, 1.0, 1.1)))]
    fit = fit_runtime(ready + waited * 5)
    assert fit.receive_overhead_ms == pytest.approx(0.04)  # the median of the three that found it there
    device = calibrated_device(CPU, "x", ComputeFit(1e9, 1e9, 0.0, 0.0), None, fit)
    assert device.receive_overhead_ms == pytest.approx(0.04)


def test_a_device_json_from_before_the_runtime_overheads_still_loads(tmp_path: Path) -> None:
    fields = {k: v for k, v in CPU.to_json().items() if not k.endswith(("action_overhead_ms", "message_overhead_ms",
                                                                        "step_overhead_ms", "receive_overhead_ms"))}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(fields))
    assert resolve_device(str(path)) == CPU


def test_fitted_device_is_a_device_json_that_compile_accepts(tmp_path: Path) -> None:
    fit = ComputeFit(peak_flops=12e9, memory_bandwidth_bytes_per_s=0.7e9, op_overhead_ms=0.02, rms_relative_error=0.1,
                     action_overhead_ms=0.1)
    device = calibrated_device(CPU, "this-cpu", fit, link=(0.08, 1.2e9), runtime=RuntimeFit(0.05, 0.5))
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
    assert main(["calibrate", "examples/mlp.py:build", "-o", str(out), "--name", "this-machine", "--no-link",
                 "--launches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "mlp 1f1b stage 0 F (mb 2)" in printed and "mlp 1f1b stage 1 BW (mb 4)" in printed  # per stage run
    assert "mlp 1f1b x2" in printed and "mlp 1f1b x4" in printed  # per whole step, 2 and 4 micro-batches
    assert "mlp zb-h1 x2" in printed and "mlp zb-h1 x4" in printed  # and ZB-H1's, unless --schedules says less
    assert "gpipe" not in printed
    assert f"wrote {out}: use it with --device {out}" in printed
    fitted = resolve_device(str(out))
    assert fitted.name == "this-machine" and fitted.link_latency_ms == CPU.link_latency_ms  # --no-link keeps it
    assert fitted.peak_flops != CPU.peak_flops
    assert main(["report", "examples/mlp.py:build", "--device", str(out)]) == 0
    assert "device this-machine" in capsys.readouterr().out


def test_step_fit_recovers_the_latency_behind_whole_steps() -> None:
    """Steps simulated with a known latency and step overhead give both back, from the ping-pong's
    lower bound, whatever the schedule's number of hops."""
    from pipecc.ir import StageCost
    from pipecc.passes.calibrate import StepSample, fit_step
    from pipecc.passes.schedules.gpipe import gpipe
    from pipecc.passes.schedules.one_f_one_b import one_f_one_b
    from pipecc.passes.simulate import simulate

    def stage(forward_ms: float, messages: int) -> tuple[StageCost, StageCost]:
        free = StageCost(1, 0, 0, 0, forward_ms, forward_ms, forward_ms, 0.05, 0.05, 0, 0, 0, 0.1)
        return free, dataclasses.replace(free, send_forward_ms=0.05 + messages, send_backward_ms=0.05 + messages,
                                         comm_ms=0.1 + 2 * messages)

    samples = []
    for schedule, forward_ms in ((one_f_one_b(2, 4), 1.0), (gpipe(2, 4), 0.5), (one_f_one_b(2, 2), 2.0)):
        (zero0, one0), (zero1, one1) = stage(forward_ms, 1), stage(1.2 * forward_ms, 1)
        sample = StepSample("synthetic", schedule, (zero0, zero1), (one0, one1), 1.0)
        measured = simulate(schedule, sample.costs(0.3)).step_time_ms + 0.4
        samples.append(dataclasses.replace(sample, measured_ms=measured))
    fit = fit_step(samples, min_latency_ms=0.05)
    assert fit.link_latency_ms == pytest.approx(0.3, abs=0.002) and fit.mean_relative_error < 1e-3
    assert fit.step_overhead_ms == pytest.approx(0.4, abs=0.01)
    assert [s.measured_ms for s in fit.steps] == [s.measured_ms for s in samples]  # one row per configuration
    assert all(abs(s.error) < 1e-3 for s in fit.steps)
    assert fit_step(samples, min_latency_ms=0.5).link_latency_ms == pytest.approx(0.5)
    held = fit_step(samples, min_latency_ms=0.3, max_latency_ms=0.3)  # calibrate --no-link: the overhead alone
    assert held.link_latency_ms == pytest.approx(0.3) and held.step_overhead_ms == pytest.approx(0.4, abs=1e-9)
    with pytest.raises(ConfigError):
        fit_step([])


@pytest.mark.dist
def test_calibrate_fits_the_latency_of_whole_steps_over_gloo() -> None:
    """End to end on 2 gloo ranks, fitted to 1F1B and ZB-H1 steps: the fitted latency is at least
    the ping-pong's, the step overhead is the step fit's, ZB-H1's split B and W actions are among
    the samples, and the summary names both latencies. Refitted to a subset of the same runs
    without ping-pongs (what the benchmark does per model), the base spec's link stays."""
    from pipecc.calibration import collect_runs, fit_calibration, measure_link

    runs = collect_runs(["examples/mlp.py:build"], num_steps=2, num_launches=1, schedules=("1f1b", "zb-h1"))
    result = fit_calibration(runs, measure_link())
    assert [s.label for s in result.step.steps] == ["mlp 1f1b x2", "mlp 1f1b x4", "mlp zb-h1 x2", "mlp zb-h1 x4"]
    errors = [abs(s.error) for s in result.step.steps]
    assert result.step.mean_relative_error == pytest.approx(sum(errors) / len(errors)) and max(errors) < 1.0
    assert "mlp zb-h1 stage 1 W (mb 2)" in [s.label for s in result.samples]
    # forwards ran both ways (1F1B under autograd, ZB-H1 as split graphs), so the autograd cost is
    # fitted and reaches the spec; fitted to 1F1B alone it stays the base's (0 for the cpu preset)
    assert any(s.autograd_ops for s in result.samples) and any(s.split_forward for s in result.samples)
    assert result.device.autograd_op_overhead_ms == result.compute.autograd_op_overhead_ms >= 0.0
    assert result.device.link_latency_ms == result.step.link_latency_ms >= fit_link(result.link_samples)[0]
    assert result.device.step_overhead_ms == result.step.step_overhead_ms >= 0.0
    assert "ping-pong" in result.summary() and "mean error over the measured steps" in result.summary()
    # a run simulated on the fitted spec is the step fit's row for it (benchmarks/calibration_fits.py judges specs so)
    for run, row in zip(runs, result.step.steps):
        assert run.predicted_ms(result.device) == pytest.approx(row.predicted_ms, rel=1e-6)
        assert run.measured_ms == row.measured_ms
    one_f_one_b = fit_calibration([r for r in runs if r.plan.schedule.name == "1f1b"], [], base=CPU, name="1f1b")
    assert [s.label for s in one_f_one_b.step.steps] == ["mlp 1f1b x2", "mlp 1f1b x4"]
    assert not any("zb-h1" in s.label for s in one_f_one_b.samples)
    assert one_f_one_b.device.autograd_op_overhead_ms == CPU.autograd_op_overhead_ms == 0.0
    assert one_f_one_b.device.link_latency_ms == CPU.link_latency_ms and one_f_one_b.device.name == "1f1b"
    assert one_f_one_b.device.link_bandwidth_bytes_per_s == CPU.link_bandwidth_bytes_per_s


@pytest.mark.dist
def test_variants_that_compile_to_one_plan_share_its_measurement(tmp_path: Path) -> None:
    """compare_steps measures each distinct plan once on 2 gloo ranks: a device that predicts other
    times but cuts the MLP where the preset does is judged on the very steps the preset's plan ran,
    while another micro-batch count (another plan) gets steps of its own."""
    from pipecc.calibration import Variant, compare_steps

    slower = write_device(dataclasses.replace(CPU, name="slower ops", op_overhead_ms=2 * CPU.op_overhead_ms),
                          tmp_path / "slower.json")
    preset, same_cut, other_plan = compare_steps(
        "examples/mlp.py:build", [Variant("1f1b", "cpu"), Variant("1f1b", str(slower)),
                                  Variant("1f1b", "cpu", num_microbatches=2)], num_steps=2)
    assert same_cut.predicted_ms > preset.predicted_ms  # another prediction, the same steps
    assert (same_cut.measured_ms, same_cut.measured_busy_ms) == (preset.measured_ms, preset.measured_busy_ms)
    assert other_plan.measured_ms != preset.measured_ms and other_plan.measured_ms > 0


def test_calibrate_names_a_bad_schedule_before_any_rank_starts() -> None:
    from pipecc.calibration import calibrate

    with pytest.raises(ConfigError, match="nope"):
        calibrate(["examples/mlp.py:build"], schedules=("nope",))


def test_sends_are_timed_by_the_bytes_they_carry() -> None:
    """send_samples gives each recorded send its stage's bytes; the fitted line through them is what
    the simulator charges for posting a send of that size."""
    from pipecc.passes.calibrate import SendSample, fit_send, send_samples

    model, inputs, loss_fn, target = gpt.build(batch_size=4, vocab_size=64, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2, num_microbatches=2)
    forward_bytes = sum(o.spec.num_bytes for o in plan.stages[0].outputs)
    step = MeasuredStep(5.0, (TimedAction(0, Action(0, ActionKind.SEND_F, 0), 1.0, 1.2),
                              TimedAction(1, Action(1, ActionKind.SEND_B, 0), 2.0, 2.3)))
    samples = send_samples(plan.stages, [step])
    grad_bytes = sum(i.spec.num_bytes for i in plan.stages[1].activation_inputs if i.spec.requires_grad)
    assert samples == [SendSample(forward_bytes, pytest.approx(0.2)), SendSample(grad_bytes, pytest.approx(0.3))]
    assert fit_send([SendSample(1000, 0.1)] * 3) == (0.1, 0.0)  # one size: a flat line at the median
    overhead, per_mb = fit_send([SendSample(b, 0.05 + 0.2 * b / 1e6) for b in (16_000, 256_000, 1_000_000)])
    assert (overhead, per_mb) == (pytest.approx(0.05), pytest.approx(0.2))
    fit = fit_runtime([step], [SendSample(b, 0.05 + 0.2 * b / 1e6) for b in (16_000, 1_000_000)])
    assert (fit.message_overhead_ms, fit.message_ms_per_mb) == (pytest.approx(0.05), pytest.approx(0.2))
