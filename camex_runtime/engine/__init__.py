"""The serving runtime: Engine facade, tensor-free scheduler, model runner, caches, sampling.

`Engine` (engine.py) is the only entry point the server uses; see docs/INTERFACES.md §2.
"""
from camex_runtime.engine.engine import Engine
from camex_runtime.engine.outputs import (ClassificationResult, EngineStats, GenerationResult,
                                          MergeCacheStats, RequestTimings, RoutingTrace,
                                          TokenEvent)
from camex_runtime.engine.request import Constraint, RequestHandle, SamplingParams

__all__ = ["ClassificationResult", "Constraint", "Engine", "EngineStats", "GenerationResult",
           "MergeCacheStats", "RequestHandle", "RequestTimings", "RoutingTrace",
           "SamplingParams", "TokenEvent"]
