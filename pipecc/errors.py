"""Every error pipecc raises on purpose. Line one says what and where, line two how to fix it."""

from __future__ import annotations


class PipeccError(Exception):
    """Base of every error pipecc raises on purpose."""


class ConfigError(PipeccError, ValueError):
    """The user asked for something that cannot work (bad option, bad input shapes)."""


class CaptureError(PipeccError):
    """No tracing path could turn the model into a graph."""


class PartitionError(PipeccError):
    """No partition of the graph satisfies the request (stage count, memory limit)."""


class ScheduleError(PipeccError):
    """A schedule misses, repeats or deadlocks an action, or cannot be built."""


class CodegenError(PipeccError):
    """A plan could not be written out, or an emitted plan could not be read back."""


class PlanFileError(CodegenError, ValueError):
    """A plan file is corrupt, truncated, or from an incompatible version."""


class PipelineRuntimeError(PipeccError):
    """A pipelined step failed at run time: bad inputs, a dead peer, a timeout."""


class PeerLostError(PipelineRuntimeError):
    """A message from (or to) another rank failed or timed out: a symptom of a failure elsewhere."""
