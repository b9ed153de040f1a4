"""Per-request measurements: the one record the runner writes and the report reads.

Times are seconds on the client's monotonic clock, relative to the start of the run, so a
record is meaningful on its own and serialises to JSON without loss. Definitions (the same as
vLLM's ``benchmark_serving`` where one exists):

- e2e  = end - start (request written -> last byte of the response read);
- TTFT = first token event received - start (streamed requests only);
- ITL  = gaps between consecutive token events of one streamed request;
- TPOT = (e2e - TTFT) / (output_tokens - 1), streamed requests with >= 2 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """What happened to one sent request."""

    index: int  # RequestSpec.index: ties the record to the workload
    kind: str  # "stream" | "generate" | "classify"
    start: float  # seconds since run start when the request was handed to the HTTP client
    end: float | None = None  # when the response (or the failure) was complete
    ok: bool = False
    status: int | None = None  # HTTP status, None when no response arrived
    # Why it failed, the key of Report.failures_by_status: the HTTP status as a string ("429"),
    # or "timeout", "connect_error", "transport_error", "stream_error", "bad_response", "cancelled".
    failure: str | None = None
    error: str | None = None  # the server's "error_type: error", or the exception text
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed token event
    output_tokens: int = 0  # streamed: token events; /generate: details.generated_tokens
    finish_reason: str | None = None
    prompt_chars: int = 0

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if self.kind != "stream" or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def fail(self, failure: str, end: float, error: str | None = None, status: int | None = None):
        """Mark as failed; the first failure wins (a cancel after a timeout stays a timeout)."""
        if self.failure is None:
            self.ok, self.failure, self.error, self.end = False, failure, error, end
            self.status = status if status is not None else self.status
