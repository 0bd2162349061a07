"""Cluster: what each rank can do (speed, memory) and how fast it talks to the others.

Data only. The partitioner reads it to balance time rather than layers across unequal ranks
and to hold each rank to its own memory; the simulator reads the stage costs it produced.
Speeds are relative to the device the costs were estimated (or profiled) on, so one cost
table serves every rank: a rank of speed 0.5 takes twice the table's time for any node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from pipecc.costs import DeviceSpec
from pipecc.errors import ConfigError


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point link: bandwidth and per-message latency.

    >>> LinkSpec(bandwidth_bytes_per_s=1e9, latency_ms=0.1).transfer_ms(2_000_000, 2)
    2.2
    """

    bandwidth_bytes_per_s: float
    latency_ms: float

    def __post_init__(self) -> None:
        if not _is_number(self.bandwidth_bytes_per_s) or self.bandwidth_bytes_per_s <= 0:
            raise ConfigError(f"link bandwidth_bytes_per_s={self.bandwidth_bytes_per_s!r}; it must be a positive number.")
        if not _is_number(self.latency_ms) or self.latency_ms < 0:
            raise ConfigError(f"link latency_ms={self.latency_ms!r}; it must be a non-negative number.")

    def transfer_ms(self, num_bytes: float, num_messages: float) -> float:
        """Time to move `num_bytes` in `num_messages` messages (0 for none). Works on tensors too."""
        return num_messages * self.latency_ms + num_bytes / self.bandwidth_bytes_per_s * 1e3

    @staticmethod
    def of(device: DeviceSpec) -> LinkSpec:
        """The link a DeviceSpec describes (rank to next rank)."""
        return LinkSpec(device.link_bandwidth_bytes_per_s, device.link_latency_ms)


@dataclass(frozen=True)
class RankSpec:
    """One rank: how fast it computes relative to the cost table's device, its memory, its link.

    `speed=0.5` means every node takes twice its estimated time there. `memory_capacity_bytes=None`
    leaves the rank unlimited (up to `max_memory_bytes`); `link=None` uses the cost device's link.
    """

    speed: float = 1.0
    memory_capacity_bytes: int | None = None
    link: LinkSpec | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not _is_number(self.speed) or self.speed <= 0:
            raise ConfigError(f"rank {self.name or '?'}: speed={self.speed!r}; it must be a positive number "
                              "(1.0 is the cost device's speed, 0.5 half of it).")
        cap = self.memory_capacity_bytes
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0):
            raise ConfigError(f"rank {self.name or '?'}: memory_capacity_bytes={cap!r}; it must be a positive "
                              "integer, or None for no limit.")


@dataclass(frozen=True)
class Cluster:
    """One RankSpec per rank, in rank order.

    >>> Cluster.of(speeds=[1.0, 0.5]).ranks[1].speed
    0.5
    """

    ranks: tuple[RankSpec, ...]
    name: str = field(default="cluster")

    def __post_init__(self) -> None:
        if not self.ranks:
            raise ConfigError("a cluster needs at least one rank.")

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @staticmethod
    def of(speeds: Sequence[float], memory_capacity_bytes: Sequence[int | None] | None = None) -> Cluster:
        """Ranks with the given speeds (and memories), every link the cost device's."""
        memories = list(memory_capacity_bytes) if memory_capacity_bytes is not None else [None] * len(speeds)
        if len(memories) != len(speeds):
            raise ConfigError(f"{len(speeds)} speeds but {len(memories)} memory capacities; give one per rank.")
        return Cluster(tuple(RankSpec(float(s), m, name=f"rank{r}") for r, (s, m) in enumerate(zip(speeds, memories))))

    @staticmethod
    def uniform(num_ranks: int) -> Cluster:
        return Cluster.of([1.0] * num_ranks)

    def link(self, a: int, b: int, default: LinkSpec) -> LinkSpec:
        """The link between ranks `a` and `b`: the slower end's bandwidth and latency."""
        ends = [self.ranks[r].link or default for r in (a, b)]
        return LinkSpec(min(e.bandwidth_bytes_per_s for e in ends), max(e.latency_ms for e in ends))

    def memory_limit(self, rank: int, max_memory_bytes: int | None) -> int | None:
        """What rank `rank` may hold: its capacity, and at most `max_memory_bytes`; None for no limit."""
        limits = [x for x in (self.ranks[rank].memory_capacity_bytes, max_memory_bytes) if x is not None]
        return min(limits) if limits else None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "ranks": [
            {"name": r.name, "speed": r.speed, "memory_capacity_bytes": r.memory_capacity_bytes,
             "link": None if r.link is None else {"bandwidth_bytes_per_s": r.link.bandwidth_bytes_per_s,
                                                  "latency_ms": r.link.latency_ms}}
            for r in self.ranks]}

    @staticmethod
    def from_json(data: Mapping[str, object]) -> Cluster:
        """A Cluster from `to_json`'s form: {"ranks": [{"speed": 1.0, "memory_capacity_bytes": ..., "link": ...}]}."""
        try:
            ranks = []
            for r, item in enumerate(data["ranks"]):  # type: ignore[union-attr]
                unknown = sorted(set(item) - {"name", "speed", "memory_capacity_bytes", "link"})
                if unknown:
                    raise ConfigError(f"cluster rank {r} has unknown fields {unknown}.\n"
                                      "A rank has name, speed, memory_capacity_bytes and link.")
                link = item.get("link")
                ranks.append(RankSpec(speed=item.get("speed", 1.0), memory_capacity_bytes=item.get("memory_capacity_bytes"),
                                      link=None if link is None else LinkSpec(**link), name=item.get("name", f"rank{r}")))
            return Cluster(tuple(ranks), name=str(data.get("name", "cluster")))
        except (KeyError, TypeError, AttributeError) as err:
            raise ConfigError(
                f"cannot read the cluster description: {err!r}.\n"
                'A cluster is {"ranks": [{"speed": 1.0, "memory_capacity_bytes": null, '
                '"link": {"bandwidth_bytes_per_s": 2e9, "latency_ms": 0.05}}, ...]}.'
            ) from None

    @staticmethod
    def load(path: str | Path) -> Cluster:
        """Read a cluster JSON file (see `from_json`)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read cluster file {str(path)!r}: {err}.\n"
                              "Pass the path of a JSON file written by Cluster.to_json.") from None
        return Cluster.from_json(data)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
