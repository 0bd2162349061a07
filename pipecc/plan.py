"""Plan: the compiled pipeline, and what a user does with it (report, run, save, emit)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from pipecc.costs import DeviceSpec
from pipecc.errors import ConfigError
from pipecc.ir import Config, Schedule, ScheduleChoice, Stage, TensorSpec, named_stage_parameters
from pipecc.printing import format_bytes, format_schedule, format_schedule_choice, format_stage_table, imbalance


class Plan:
    """A model cut into pipeline stages, with a schedule saying what each rank does when."""

    def __init__(self, *, config: Config, device: DeviceSpec, stages: Sequence[Stage], schedule: Schedule,
                 input_specs: Sequence[TensorSpec], target_spec: TensorSpec, capture_method: str,
                 cost_formulas: Sequence["StageFormulas"] | None = None,  # noqa: F821
                 schedule_choice: ScheduleChoice | None = None) -> None:
        self.config = config
        self.device = device
        self.stages = tuple(stages)
        self.schedule = schedule
        self.input_specs = tuple(input_specs)  # at full batch size
        self.target_spec = target_spec
        self.capture_method = capture_method
        self.dropout_seed = 0  # seeded dropout draws by (dropout_seed, step, micro-batch, dropout): passes/rng.py
        self.num_local_steps = 0  # steps run_local has run: the step number of the next one's dropout masks
        self.cost_formulas = tuple(cost_formulas) if cost_formulas is not None else None  # symbolic_sizes=True
        self.schedule_choice = schedule_choice  # schedule="auto": the candidates it compared

    @property
    def num_ranks(self) -> int:
        return self.schedule.num_ranks

    @staticmethod
    def batch_specs(tensors: Sequence[torch.Tensor]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.of(t, requires_grad=False) for t in tensors)

    def report(self, *, formulas: bool = False) -> str:
        """The per-stage table, the imbalance, and the schedule; with `formulas`, each stage's
        cost formulas in the micro-batch size b (compile with symbolic_sizes=True)."""
        c = self.config
        lines = [
            f"pipecc plan: {len(self.stages)} stages on {self.num_ranks} ranks, schedule {self.schedule.name}, "
            f"{c.num_microbatches} micro-batches of {self.input_specs[0].shape[0] // c.num_microbatches if self.input_specs else '?'}, "
            f"device {self.device.name}, captured by {self.capture_method}",
            "",
            format_stage_table(self.stages),
            "",
            f"imbalance (max/mean stage time): {imbalance(self.stages):.3f}",
            self._prediction(),
            "",
            "schedule:",
            format_schedule(self.schedule),
        ]
        if self.schedule_choice is not None:
            lines[6:6] = ["", format_schedule_choice(self.schedule_choice)]
        if formulas:
            from pipecc.passes.symbolic import format_formulas

            if self.cost_formulas is None:
                raise ConfigError("report(formulas=True): this plan keeps no cost formulas.\n"
                                  "Compile with symbolic_sizes=True (pipecc report --formulas).")
            lines += ["", format_formulas(self.cost_formulas)]
        return "\n".join(lines)

    def simulate(self) -> "Timeline":  # noqa: F821
        """The predicted timeline of one step (see pipecc.passes.simulate)."""
        from pipecc.passes.simulate import simulate

        return simulate(self.schedule, [s.cost for s in self.stages])

    def compare(self, events: Sequence["TimedAction"]) -> str:  # noqa: F821
        """The predicted step beside a measured one (events from measure_local or runner.gather_events()):
        per rank busy time and bubble, and the step time, with measured/predicted ratios."""
        from pipecc.passes.simulate import format_predicted_vs_measured, measured_timeline

        measured = measured_timeline(self.schedule, events, [s.cost for s in self.stages])
        return "predicted vs measured:\n" + format_predicted_vs_measured(self.simulate(), measured)

    def what_if(self, microbatch_size: int, sequence_length: int | None = None) -> "Timeline":  # noqa: F821
        """The predicted timeline of one step with micro-batches of `microbatch_size` (and sequences
        of `sequence_length`, compiled with symbolic_sequence_dim), the same partition and schedule,
        from the cost formulas (compile with symbolic_sizes=True): no re-tracing."""
        from pipecc.passes.simulate import simulate

        return simulate(self.schedule, self.stage_costs_at(microbatch_size, sequence_length))

    def stage_costs_at(self, microbatch_size: int,
                       sequence_length: int | None = None) -> tuple["StageCost", ...]:  # noqa: F821
        """Every stage's cost at micro-batch size `microbatch_size`, from the cost formulas."""
        if self.cost_formulas is None:
            raise ConfigError("this plan keeps no cost formulas.\n"
                              "Compile with symbolic_sizes=True to ask what-if questions about the micro-batch size.")
        return tuple(f.at(microbatch_size, s.cost, sequence_length) for f, s in zip(self.cost_formulas, self.stages))

    def _prediction(self) -> str:
        timeline = self.simulate()
        memory = ", ".join(format_bytes(b) for b in timeline.peak_memory_bytes)
        return (f"predicted step time {timeline.step_time_ms:.3f} ms, bubble {100 * timeline.bubble_ratio:.1f}%, "
                f"peak memory per rank {memory}")

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter of every stage, once, under its name in the original model."""
        return named_stage_parameters(self.stages)

    def check_inputs(self, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> None:
        """ConfigError unless the inputs and target have the shapes and dtypes the plan was compiled for."""
        if len(inputs) != len(self.input_specs):
            raise ConfigError(f"the plan takes {len(self.input_specs)} input{'s' if len(self.input_specs) != 1 else ''}, "
                              f"got {len(inputs)}.\n"
                              "Pass the same inputs as the example_inputs given to pipecc.compile.")
        named = [(f"input {i}", t, s) for i, (t, s) in enumerate(zip(inputs, self.input_specs))]
        for name, tensor, spec in named + [("target", target, self.target_spec)]:
            if not isinstance(tensor, torch.Tensor):
                raise ConfigError(f"{name} is a {type(tensor).__name__}, not a tensor.")
            got = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            if got != (spec.shape, spec.dtype):
                raise ConfigError(
                    f"{name} has shape {got[0]} and dtype {got[1]}, but the plan was compiled for "
                    f"shape {spec.shape} and dtype {spec.dtype}.\n"
                    "Shapes are static in a plan: compile again for the new shape, or pad the batch."
                )

    def run_local(self, *inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One training step of every rank in this process; returns the batch loss. Gradients
        accumulate in the parameters' .grad, exactly as loss.backward() on the whole model would."""
        from pipecc.runtime.local import run_local

        from pipecc.passes.rng import dropout_step

        self.check_inputs(inputs, target)
        with dropout_step(self.dropout_seed, self.num_local_steps):
            loss = run_local(self.stages, self.schedule, inputs, target)
        self.num_local_steps += 1
        return loss

    def measure_local(self, *inputs: torch.Tensor, target: torch.Tensor
                      ) -> tuple[torch.Tensor, tuple["TimedAction", ...]]:  # noqa: F821
        """run_local, also returning when each action ran (ms since the step began). One process runs
        every rank's actions in turn, so the events never overlap: each shows an action's own time."""
        from pipecc.runtime.executor import TimelineRecorder
        from pipecc.runtime.local import run_local

        from pipecc.passes.rng import dropout_step

        self.check_inputs(inputs, target)
        recorder = TimelineRecorder(self.schedule.stage_to_rank)
        with dropout_step(self.dropout_seed, self.num_local_steps):
            loss = run_local(self.stages, self.schedule, inputs, target, recorder=recorder)
        self.num_local_steps += 1
        return loss, recorder.events()

    def runner(self, *, timeout_s: float = 300.0, check_finite: bool = False, record_timeline: bool = False,
               keep_freed_memory: bool = True) -> "DistRunner":  # noqa: F821
        """The runner for this process's rank (needs an initialised torch.distributed group).

        Every wait for another rank gives up after `timeout_s`; a rank that fails posts where, so the
        others' errors name it. `check_finite` checks every stage output and input gradient for nan/inf
        (one reduction per tensor) and names the stage and micro-batch of the first. `record_timeline`
        times every action (runner.gather_events() after a step); off, it costs nothing.
        `keep_freed_memory` (on the CPU) has glibc's malloc keep freed blocks up to 32 MiB for the next
        step instead of returning them to the kernel (pipecc/runtime/memory.py: a GPipe step of the GPT
        example 20-25% faster on this machine); the process then keeps its peak heap."""
        from pipecc.runtime.dist import DistRunner

        return DistRunner(self.stages, self.schedule, timeout_s=timeout_s, validate=self.check_inputs,
                          check_finite=check_finite, dropout_seed=self.dropout_seed, record_timeline=record_timeline,
                          keep_freed_memory=keep_freed_memory)

    def emit(self, directory: str | Path) -> Path:
        """Write plan.json, one Python module per rank and one weight shard per rank into `directory`."""
        from pipecc.passes.codegen import emit

        return emit(self, Path(directory))

    save = emit
