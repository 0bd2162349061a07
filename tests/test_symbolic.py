"""Symbolic sizes: cost formulas in the micro-batch size equal fresh compiles at that size."""

from __future__ import annotations

import pytest
import sympy

import pipecc
from examples import gpt, mlp, resnet, unet
from pipecc.costs import DeviceSpec
from pipecc.errors import ConfigError
from pipecc.passes.annotate_costs import annotate_costs
from pipecc.passes.capture import capture
from pipecc.passes.symbolic import MICROBATCH, SEQUENCE, stage_formulas, symbolic_costs

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = DeviceSpec.preset("cpu")
NUM_MICROBATCHES = 2
SIZES = (1, 2, 4)
MODELS = {
    "gpt": lambda batch_size: gpt.build(batch_size=batch_size, vocab_size=64, d_model=16, n_layers=2, n_heads=2,
                                        seq_len=8),
    "mlp": lambda batch_size: mlp.build(batch_size=batch_size, num_layers=3),
    "resnet": lambda batch_size: resnet.build(batch_size=batch_size, width=8, num_blocks=2, image_size=8),
}


def _captured(name: str, microbatch_size: int):
    model, inputs, loss_fn, target = MODELS[name](NUM_MICROBATCHES * microbatch_size)
    return capture(model, inputs, loss_fn, target, num_microbatches=NUM_MICROBATCHES)


def _compile(name: str, microbatch_size: int, **options):
    model, inputs, loss_fn, target = MODELS[name](NUM_MICROBATCHES * microbatch_size)
    return pipecc.compile(model, inputs, loss_fn=loss_fn, example_target=target, num_stages=2,
                          num_microbatches=NUM_MICROBATCHES, **options)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_formulas_equal_fresh_compiles_at_1_2_4(name: str) -> None:
    formulas = symbolic_costs(_captured(name, 3), CPU)  # traced once, at micro-batch size 3
    assert formulas.specialized is None
    assert any(MICROBATCH in f.flops_forward.free_symbols for f in formulas.nodes.values())
    for b in SIZES:
        fresh_costs = annotate_costs(_captured(name, b), CPU)
        assert formulas.at(b) == fresh_costs, f"{name} at micro-batch size {b}"  # every node, bit for bit
        fresh = _compile(name, b)
        in_flight = [NUM_MICROBATCHES - s for s in range(2)]  # 1f1b: stage s holds p - s micro-batches
        for stage, formula in zip(fresh.stages, stage_formulas(formulas, fresh.stages, in_flight)):
            at_b = formula.at(b, stage.cost)
            for field in ("flops", "bytes_to_next", "saved_bytes", "memory_bytes"):  # integers: exact
                assert getattr(at_b, field) == getattr(stage.cost, field), (name, b, stage.index, field)
            for field in ("forward_ms", "backward_input_ms", "backward_weight_ms", "send_forward_ms",
                          "send_backward_ms", "comm_ms"):  # the same floats summed in another order
                assert getattr(at_b, field) == pytest.approx(getattr(stage.cost, field), rel=1e-9, abs=1e-12), \
                    (name, b, stage.index, field)


def test_what_if_predicts_a_larger_microbatch_without_tracing_again() -> None:
    plan = _compile("gpt", 2, symbolic_sizes=True)
    assert plan.what_if(2).step_time_ms == pytest.approx(plan.simulate().step_time_ms, rel=1e-9)
    doubled = plan.what_if(4)
    fresh = _compile("gpt", 4)
    assert [s.node_names for s in fresh.stages] == [s.node_names for s in plan.stages]  # same cut at both sizes
    assert doubled.step_time_ms == pytest.approx(fresh.simulate().step_time_ms, rel=1e-9)
    assert doubled.peak_memory_bytes == fresh.simulate().peak_memory_bytes
    assert doubled.step_time_ms > plan.simulate().step_time_ms


def test_without_formulas_what_if_is_a_config_error() -> None:
    plan = _compile("mlp", 2)
    with pytest.raises(ConfigError, match=r"keeps no cost formulas\.\nCompile with symbolic_sizes=True"):
        plan.what_if(4)
    with pytest.raises(ConfigError, match=r"keeps no cost formulas"):
        plan.report(formulas=True)


def test_a_specialised_batch_dimension_is_refused_at_other_sizes() -> None:
    # Tracing examples/unet.py, torch pins the batch dimension to the traced size (a guard in a fake kernel).
    model, inputs, loss_fn, target = unet.build(batch_size=4, image_size=8, base=4)
    captured = capture(model, inputs, loss_fn, target, num_microbatches=2)
    formulas = symbolic_costs(captured, CPU)
    assert formulas.specialized and "specialised the batch dimension to 2" in formulas.specialized
    assert formulas.at(2) == annotate_costs(captured, CPU)
    with pytest.raises(ConfigError, match=r"hold only at micro-batch size 2, not 4: torch specialised .*\nCompile again"):
        formulas.at(4)


def test_sequence_length_formulas_equal_fresh_compiles() -> None:
    """With sequence_dim=1, T is a symbol too: attention's FLOPs grow as T^2, the rest as T."""
    model, inputs, loss_fn, target = gpt.build(batch_size=6, vocab_size=64, d_model=16, n_layers=1, n_heads=2,
                                               seq_len=16)

    def captured(b: int, seq: int):  # the model takes any length up to 16
        tokens, labels = inputs[0][:2 * b, :seq].contiguous(), target[:2 * b, :seq].contiguous()
        return capture(model, (tokens,), loss_fn, labels, num_microbatches=2)

    formulas = symbolic_costs(captured(3, 8), CPU, sequence_dim=1)
    assert formulas.specialized is None and formulas.traced_sequence_length == 8
    attention = formulas.nodes["scaled_dot_product_attention"].flops_forward
    assert sympy.degree(attention, SEQUENCE) == 2 and sympy.degree(attention, MICROBATCH) == 1
    for b, seq in ((1, 4), (2, 16)):
        assert formulas.at(b, seq) == annotate_costs(captured(b, seq), CPU), (b, seq)
    assert formulas.at(3) == annotate_costs(captured(3, 8), CPU)  # T defaults to the traced length
    with pytest.raises(ConfigError, match=r"sequence_length given, but the formulas keep the sequence length fixed"):
        symbolic_costs(captured(3, 8), CPU).at(3, 16)


def test_report_prints_the_formulas(capsys) -> None:
    from pipecc.cli import main

    assert main(["report", "examples/mlp.py:build", "--formulas"]) == 0  # plan.report(formulas=True)
    out = capsys.readouterr().out
    assert "cost formulas per micro-batch of size b (ms, bytes):" in out
    stage0 = out[out.index("stage 0:"):]
    assert "F ms      = " in stage0 and "memory B  = " in stage0
    memory = stage0.split("memory B  = ")[1].splitlines()[0]
    assert sympy.sympify(memory).free_symbols == {sympy.Symbol("b")}
    assert main(["report", "examples/mlp.py:build"]) == 0
    assert "cost formulas" not in capsys.readouterr().out
