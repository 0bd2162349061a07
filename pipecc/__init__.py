"""pipecc: a pipeline-parallelism compiler for PyTorch."""

from pipecc.api import compile, load
from pipecc.costs import DeviceSpec
from pipecc.errors import (CaptureError, CodegenError, ConfigError, PartitionError, PipeccError,
                           PipelineRuntimeError, PlanFileError, ScheduleError)
from pipecc.plan import Plan

__all__ = ["compile", "load", "Plan", "DeviceSpec", "PipeccError", "ConfigError", "CaptureError", "PartitionError",
           "ScheduleError", "CodegenError", "PlanFileError", "PipelineRuntimeError"]
__version__ = "0.1.0"
