"""The engine protocol and records, defined where their callers (composers) live; re-exported here
for engine implementations."""

from composer.engine_protocol import (  # noqa: F401
    Emit,
    Engine,
    EngineError,
    FinishReason,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
)
