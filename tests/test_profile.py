"""Profiled costs: times measured on real tensors, grouped by node signature, cached on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pipecc
from examples import gpt, mlp, resnet
from pipecc.errors import ConfigError
from pipecc.passes import profile
from pipecc.passes.annotate_costs import stage_backward_ms
from pipecc.passes.capture import capture
from pipecc.passes.profile import ProfileSettings, measure_node_times, measure_stage_times, profile_key
from pipecc.testing import assert_same_step

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ProfileSettings(warmup=1, repeats=3, min_sample_ms=0.05, progress_after_s=None)


def _compile(build, tmp_path: Path, cost_model: str = "profile", num_stages: int = 2, **sizes):
    model, inputs, loss_fn, target = build(batch_size=4, **sizes)
    plan = pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=num_stages,
                          num_microbatches=2, cost_model=cost_model, profile_cache_dir=tmp_path)
    return plan, (model, inputs, loss_fn, target)


def _cached_times(cache_dir: Path) -> dict[str, list[float]]:
    (path,) = cache_dir.glob("profile-*.json")
    return json.loads(path.read_text())["nodes"]


def test_profiled_stage_times_are_sums_of_measured_node_times(tmp_path: Path) -> None:
    plan, _ = _compile(mlp.build, tmp_path)
    analytic, _ = _compile(mlp.build, tmp_path, cost_model="analytic")
    times = _cached_times(tmp_path)
    for stage, reference in zip(plan.stages, analytic.stages):
        names = [n for n in stage.node_names if n in times]
        assert names, f"no node of stage {stage.index} was profiled"
        forward, backward_input, backward_weight = (sum(times[n][kind] for n in names) for kind in range(3))
        # the first stage's backward is all W (stage_backward_ms); elsewhere B and W are the node sums
        expected = (forward, *stage_backward_ms(backward_input, backward_weight, first_stage=stage.index == 0))
        actual = (stage.cost.forward_ms, stage.cost.backward_input_ms, stage.cost.backward_weight_ms)
        assert actual == pytest.approx(expected, rel=1e-12)
        assert stage.cost.flops == reference.cost.flops  # work stays analytic: only times are measured
        assert stage.cost.compute_ms != reference.cost.compute_ms
    assert plan.config.cost_model == "profile"
    # the first Linear reads the model input, which needs no gradient: its B is not even run
    assert times["layers_0"][0] > 0 and times["layers_0"][1] == 0 and times["layers_0"][2] > 0


def test_second_compile_reads_the_cache_and_measures_nothing(tmp_path: Path, monkeypatch) -> None:
    first, _ = _compile(mlp.build, tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again despite a cache entry")

    monkeypatch.setattr(profile, "measure_node_times", refuse)
    second, _ = _compile(mlp.build, tmp_path)
    assert [s.cost for s in second.stages] == [s.cost for s in first.stages]


def test_cache_key_changes_with_shapes_and_threads() -> None:
    def key(batch_size: int) -> str:
        model, inputs, loss_fn, target = mlp.build(batch_size=batch_size)
        return profile_key(capture(model, inputs, loss_fn, target, num_microbatches=2))

    one_thread = key(4)
    assert key(4) == one_thread
    assert key(8) != one_thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key(4) != one_thread
    finally:
        torch.set_num_threads(threads)


def test_repeated_blocks_are_timed_once(monkeypatch) -> None:
    timed: list[str] = []
    original = profile._NodeProfiler._time_node

    def counting(self, n):  # type: ignore[no-untyped-def]
        timed.append(n.name)
        return original(self, n)

    monkeypatch.setattr(profile._NodeProfiler, "_time_node", counting)
    counts = {}
    for n_layers in (2, 6):
        timed.clear()
        model, inputs, loss_fn, target = gpt.build(batch_size=2, vocab_size=64, d_model=16, n_layers=n_layers,
                                                   n_heads=2, seq_len=8)
        captured = capture(model, inputs, loss_fn, target, num_microbatches=1)
        times = measure_node_times(captured, [*inputs, target], FAST)
        counts[n_layers] = len(timed)
        assert "blocks_5_mlp_fc1" in times or n_layers == 2
    assert counts[6] == counts[2]  # four more blocks, no more timing
    assert len(times) > 3 * counts[6]  # ...yet every node of the 6 blocks has its times


def test_profiling_leaves_the_model_unchanged_and_the_plan_exact(tmp_path: Path) -> None:
    plan, (model, inputs, loss_fn, target) = _compile(resnet.build, tmp_path, num_blocks=2, width=8)
    fresh, *_ = resnet.build(batch_size=4, num_blocks=2, width=8)
    for (name, before), after in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(before, after), f"profiling changed {name}"  # BatchNorm running stats included
    assert_same_step(model, inputs, loss_fn, target, plan)


def test_progress_bar_on_stderr_only_when_slow(capsys) -> None:
    model, inputs, loss_fn, target = mlp.build(batch_size=2)
    captured = capture(model, inputs, loss_fn, target, num_microbatches=1)
    measure_node_times(captured, [*inputs, target], FAST)
    assert capsys.readouterr().err == ""
    slow = ProfileSettings(warmup=1, repeats=2, min_sample_ms=0.05, progress_after_s=0.0)
    measure_node_times(captured, [*inputs, target], slow)
    err = capsys.readouterr().err
    assert "pipecc: profiling [" in err and err.endswith(" s\n")


def test_unknown_cost_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cost_model='measured'; it must be one of analytic, profile\.\nPass"):
        _compile(mlp.build, tmp_path, cost_model="measured")


def test_node_times_sum_to_the_measured_stage_times(tmp_path: Path) -> None:
    """The consistency number of issue 5: sum of profiled node times / whole-stage time, per stage.
    Printed, not thresholded (timings on a shared CPU); see benchmarks/calibration.py."""
    plan, (_, inputs, _, target) = _compile(gpt.build, tmp_path, vocab_size=256, d_model=32, n_layers=2)
    measured = measure_stage_times(plan.stages, inputs, target, plan.config.num_microbatches, FAST)
    for stage, whole in zip(plan.stages, measured):
        ratio = stage.cost.compute_ms / (whole.forward_ms + whole.backward_ms)
        print(f"stage {stage.index}: nodes {stage.cost.compute_ms:.3f} ms, whole stage "
              f"{whole.forward_ms + whole.backward_ms:.3f} ms, ratio {ratio:.2f}")
        assert math.isfinite(ratio) and ratio > 0
