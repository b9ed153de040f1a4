"""`POST /classify` (and `POST /predict`, TEI's route): sequence classification, TEI-shaped.

A string gives a list of `{label, score}` sorted by score; a list of strings is a batch and gives
a list of such lists, in input order. Batches are capped (`max_client_batch_size`); calls run on
the classify queue's own threads (`server.isolation.ClassifyQueue`): at most `max_waiting` wait
(429 beyond), one not started within `queue_timeout_s` gets 504, and one whose client leaves
while it waits is dropped from the queue (499, counted as `dropped`).
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request

from server import errors
from server.generation import until_disconnect, wait_for_disconnect
from server.protocol import ClassifyRequest, LabelScore
from server.routes.tgi import ERROR_RESPONSES

router = APIRouter(tags=["Classification"])


@router.post("/classify", response_model=list[LabelScore] | list[list[LabelScore]],
             responses=ERROR_RESPONSES)
@router.post("/predict", response_model=list[LabelScore] | list[list[LabelScore]],
             responses=ERROR_RESPONSES)
async def classify(request: Request, body: ClassifyRequest):
    """Classify one text or a batch of texts (`/predict`: TEI's name for it)."""
    state = request.app.state.serving
    engine = state.require("classifier")
    single = isinstance(body.inputs, str)
    texts = [body.inputs] if single else list(body.inputs)
    limit = state.settings.max_client_batch_size
    if not texts:
        raise errors.validation("`inputs` must not be an empty list")
    if len(texts) > limit:
        raise errors.validation(f"batch of {len(texts)} texts exceeds the maximum batch size "
                                f"of {limit}")
    if any(not t.strip() for t in texts):
        raise errors.validation("`inputs` must not contain empty texts")
    results = await run_bounded(request, state, partial(
        engine.classify, texts, truncate=body.truncate, raw_scores=body.raw_scores))
    state.metrics.classified.inc(len(texts))
    out = [[LabelScore(label=label, score=score) for label, score in r.scores] for r in results]
    return out[0] if single else out


async def run_bounded(request: Request, state, call):
    """engine.classify on the classify queue, given up if the client leaves while queued."""
    try:
        with errors.engine_errors():
            return await until_disconnect(state.classify_queue.run(call),
                                          wait_for_disconnect(request.receive))
    except errors.ApiError as err:
        if err.status == 499:
            state.metrics.record_failure("dropped")
        raise
