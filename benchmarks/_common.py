"""Measuring helpers shared by the benchmarks: saved-activation bytes, stage timing, medians, tables.

Kept apart from any one benchmark so that every benchmark measures memory and time the same way.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn


class SavedActivationMeter:
    """Context manager: the peak bytes of tensors autograd saves for backward while it is active.

    Saved-tensor hooks see every tensor autograd keeps; a tensor counts from the forward op that
    saves it until the autograd graph holding it is freed (after its backward). Parameters (and
    views of them, such as the transposed weight a linear layer saves) are excluded: they are
    weights, not activations. Tensors sharing one storage count once, at their largest size.

    >>> meter = SavedActivationMeter(parameters=[])
    >>> x = torch.ones(256, requires_grad=True)
    >>> with meter:
    ...     y = (x * x).sum()
    >>> meter.peak_bytes   # x * x saves x twice: one storage of 256 float32
    1024
    """

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        self._param_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes counted]
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> object:
        key = tensor.untyped_storage().data_ptr()
        if key in self._param_storages or tensor.numel() == 0:
            return tensor
        num_bytes = tensor.numel() * tensor.element_size()
        entry = self._live.setdefault(key, [0, 0])
        entry[0] += 1
        if num_bytes > entry[1]:
            self.live_bytes += num_bytes - entry[1]
            entry[1] = num_bytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return _Saved(tensor, key, self)

    @staticmethod
    def _unpack(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed  # type: ignore[return-value]

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._live[key]


class _Saved:
    """One saved tensor as autograd holds it; its meter stops counting it when autograd drops it."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: SavedActivationMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


# A stage as the timing sees it: the activations received from the previous stage -> its outputs
# (the loss, for the last stage). Stage 0 ignores its argument and reads the model inputs itself.
StageFn = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]


def stage_times_ms(stages: Sequence[StageFn], *, repeats: int) -> list[float]:
    """Median forward + backward time of each stage on one micro-batch, run alone in this process.

    The stages run as a chain (stage s receives stage s-1's outputs, detached, as leaves that
    need gradients where they are floating point), and each backward starts from gradients of
    ones, so every stage does exactly the work it does inside the pipeline, without waiting.

    With one intra-op thread the clock is this process's CPU time: other processes sharing the
    cores then hardly move the samples (wall time would count the time this one waits for a core)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    received: list[torch.Tensor] = []
    samples: list[list[float]] = [[] for _ in stages]
    for s, stage in enumerate(stages):
        for _ in range(repeats + 1):  # the first run warms up caches and allocator
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in received]
            start = clock()
            outputs = [o for o in stage(leaves) if isinstance(o, torch.Tensor) and o.requires_grad]
            torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
            samples[s].append((clock() - start) * 1e3)
        received = [o.detach() for o in stage([t.detach() for t in received])]
    return [statistics.median(times[1:]) for times in samples]


def imbalance(times: Sequence[float]) -> float:
    """max / mean of per-stage times: 1.0 is perfectly balanced."""
    mean = sum(times) / len(times)
    return max(times) / mean if mean > 0 else 1.0


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as aligned text columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def parameters_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Every parameter of `modules`, each once."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())
