"""The side-by-side and calibration-fit benchmarks keep working: they run end to end at their
smallest size (no timing assertions), and the measuring pieces measure what they claim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import vs_torch_pipelining as bench  # noqa: E402
from _common import SavedActivationMeter, stage_times_ms  # noqa: E402


def test_saved_activation_meter_counts_what_autograd_keeps(one_thread: None) -> None:
    """Two linears save their inputs (not their weights); the graph's release brings the live count to 0."""
    layer1, layer2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)
    x = torch.randn(4, 16, requires_grad=True)
    meter = SavedActivationMeter(list(layer1.parameters()) + list(layer2.parameters()))
    with meter:
        loss = layer2(layer1(x)).sum()
    assert meter.peak_bytes == (4 * 16 + 4 * 32) * 4
    loss.backward()
    assert meter.live_bytes == 0


def test_stage_times_cover_every_stage(one_thread: None) -> None:
    first, last = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    x = torch.randn(4, 8)
    times = stage_times_ms([lambda received: (first(x),), lambda received: (last(received[0]).sum(),)], repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_unet_skip_gradients_are_found_before_torch_crashes_on_them(one_thread: None) -> None:
    """The U-Net's skip gradients are slices of torch.cat's gradient: torch's gloo receive refuses them."""
    case = bench.make_cases("tiny", ["unet"], ["1f1b"])[0]
    _, inputs, loss_fn, target = case.build()
    reason = bench.torch_unsupported(case, loss_fn, [t.chunk(4)[0] for t in inputs], target.chunk(4)[0])
    assert "not contiguous" in reason and "gradient of input" in reason


def test_gpt_cuts_into_equal_block_stages_without_problems(one_thread: None) -> None:
    case = bench.make_cases("tiny", ["gpt-8k"], ["1f1b"])[0]
    _, inputs, loss_fn, target = case.build()
    assert bench.torch_unsupported(case, loss_fn, [t.chunk(4)[0] for t in inputs], target.chunk(4)[0]) == ""
    modules = bench.torch_stage_modules(case, case.build()[0])
    assert [len(m.pieces) for m in modules] == [1 + 2, 2 + 1]  # embedding + 2 blocks | 2 blocks + head


class _OffByALittle:
    """A 'system' whose gradients are 1e-3 off: the benchmark must refuse to time it."""

    name = "wrong"

    def __init__(self, expected: dict[str, torch.Tensor]) -> None:
        self.grads = {n: g * (1 + 1e-3) for n, g in expected.items()}

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def step(self, inputs: object, target: object) -> None:
        return None

    def named_grads(self) -> dict[str, torch.Tensor]:
        return self.grads


def test_a_fast_wrong_answer_is_refused(one_thread: None) -> None:
    from pipecc.testing import reference_step

    case = bench.make_cases("tiny", ["gpt-8k"], ["1f1b"])[0]
    model, inputs, loss_fn, target = case.build()
    loss, expected = reference_step(model, inputs, loss_fn, target, 4)
    with pytest.raises(AssertionError, match="wrong on rank 0 differs from the unpartitioned model"):
        bench.check_system(_OffByALittle(expected), inputs, target, loss, expected)


@pytest.mark.dist
def test_benchmark_runs_at_the_smallest_size() -> None:
    """2 gloo ranks, 1F1B and ZBV: the gradient checks pass and the table has a row per model and schedule
    (gpt-32k runs the same code as gpt-8k with another vocabulary, so it is left out to save time)."""
    models = ["gpt-8k", "bert", "unet"]
    proc = subprocess.run([sys.executable, "benchmarks/vs_torch_pipelining.py", "--size", "tiny",
                           "--models", *models, "--schedules", "1f1b", "zbv"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {tuple(line.split()[:2]): line.split() for line in proc.stdout.splitlines()
            if line.split()[1:2] in (["1f1b"], ["zbv"])}
    assert set(rows) == {(m, s) for m in models for s in ("1f1b", "zbv")}, proc.stdout
    for schedule in ("1f1b", "zbv"):
        assert rows[("unet", schedule)][4] == "unsupported"  # torch cannot train the U-Net's skips
        assert rows[("gpt-8k", schedule)][5].endswith("x")  # the pipecc/torch ratio
        assert rows[("bert", schedule)][5].endswith("x")
    assert "torch unsupported: stage 1's gradient of input 1" in proc.stdout  # why, for the 1F1B U-Net


@pytest.mark.dist
def test_calibration_fits_benchmark_judges_every_fit_on_every_configuration() -> None:
    """MLP, 2 steps, 1 launch: a row per schedule and micro-batch count with every fit's error, and a
    summary per fit naming the schedules it did not see."""
    proc = subprocess.run([sys.executable, "benchmarks/calibration_fits.py", "--models", "mlp", "--steps", "2",
                           "--launches", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("mlp ")]
    assert [(r[1], r[2]) for r in rows] == [(s, m) for s in ("gpipe", "1f1b", "zb-h1") for m in ("2", "4")]
    assert all(len(r) == 4 + 4 and all(cell.endswith("%") for cell in r[4:]) for r in rows)  # 4 fits
    assert "1f1b+zb-h1 own     all" in proc.stdout and "out of sample (gpipe, zb-h1)" in proc.stdout


@pytest.mark.dist
def test_calibration_benchmark_judges_every_spec_and_names_the_drift() -> None:
    """MLP calibrated on, BERT out of sample, 2 steps, 1 launch: a row per model, schedule and cost
    model with its error (the MLP's own spec, the spec of all fitted models on BERT), the drift of
    the plan calibration measured under the schedule it fitted (MLP 1F1B) and under no other, and a
    summary per cost model counting its steps within 10%, over all and over those the machine held
    still for."""
    proc = subprocess.run([sys.executable, "benchmarks/calibration.py", "--models", "mlp", "bert", "--fit-models", "mlp",
                           "--schedules", "gpipe", "1f1b", "--fit-schedules", "1f1b", "--steps", "2", "--launches", "1",
                           "--fit-launches", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    expected = [(model, schedule, label) for model, spec in (("mlp", "own model"), ("bert", "calibrated"))
                for schedule in ("gpipe", "1f1b") for label in ("cpu preset", spec, "profiled")]
    rows = {(model, schedule, label): line for line in lines for model, schedule, label in expected
            if line.split()[:2] == [model, schedule] and label in line}
    assert list(rows) == expected, proc.stdout
    assert all(len(re.findall(r"[+-] *\d+%", row)) == 2 for row in rows.values())  # step and busy errors
    drift = [i for i, line in enumerate(lines) if "during calibration" in line]
    assert len(drift) == 1 and lines.index(rows["mlp", "1f1b", "profiled"]) + 1 == drift[0]  # under MLP 1F1B only
    summary = next(line for line in lines if line.startswith("mean |error| per cost model"))
    counts = dict(re.findall(r"(cpu preset|own model|calibrated|profiled) [\d.]+%; [\d.]+%, (\d of \d \(\d of \d\))",
                             summary))
    # steps judged, and of them those calibration measured the plan of (MLP's 1F1B) if it held still since
    judged = {label: re.sub(r"^\d of (\d) \(\d of (\d)\)$", r"\1 \2", count) for label, count in counts.items()}
    held = judged["own model"][-1]
    assert held in "01" and judged == {"cpu preset": "4 " + held, "own model": "2 " + held, "calibrated": "2 0",
                                       "profiled": "4 " + held}, summary
