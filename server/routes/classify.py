"""`POST /classify` (and `POST /predict`, TEI's route): sequence classification, TEI-shaped.

A string gives a list of `{label, score}` sorted by score; a list of strings is a batch and gives
a list of such lists, in input order. Batches are capped (`max_client_batch_size`); calls run on
the classify queue's own threads (`server.isolation.ClassifyQueue`): at most `max_waiting` wait
(429 beyond), one not started within `queue_timeout_s` gets 504, and one whose client leaves
while it waits is dropped from the queue (499, counted as `dropped`).

`parameters` takes the Hugging Face Inference API's `top_k` and `function_to_apply`. On a server
that serves only a classifier, `POST /` is classification in that API's shape (one text gives a
list holding one list), so `InferenceClient(base_url=URL).text_classification(text)` works; a
server with a text-generation model keeps `/` for TGI's generate.
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
    out = await classify_texts(request, body)
    return out[0] if isinstance(body.inputs, str) else out


# Only on a server without a text-generation model (server.app includes it instead of TGI's `/`).
root_router = APIRouter(tags=["Classification"])


@root_router.post("/", response_model=list[list[LabelScore]], responses=ERROR_RESPONSES)
async def classify_root(request: Request, body: ClassifyRequest):
    """Classify in the Hugging Face Inference API's shape: a list of label lists, one per text
    (one text too), as `huggingface_hub.InferenceClient.text_classification` reads it."""
    return await classify_texts(request, body)


async def classify_texts(request: Request, body: ClassifyRequest) -> list[list[LabelScore]]:
    state = request.app.state.serving
    engine = state.require("classifier")
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    limit = state.settings.max_client_batch_size
    if not texts:
        raise errors.validation("`inputs` must not be an empty list")
    if len(texts) > limit:
        raise errors.validation(f"batch of {len(texts)} texts exceeds the maximum batch size "
                                f"of {limit}")
    if any(not t.strip() for t in texts):
        raise errors.validation("`inputs` must not contain empty texts")
    top_k = body.parameters.top_k
    results = await run_bounded(request, state, partial(
        engine.classify, texts, truncate=body.truncate, raw_scores=body.raw_scores,
        function=body.parameters.function_to_apply))
    state.metrics.classified.inc(len(texts))
    return [[LabelScore(label=label, score=score) for label, score in r.scores[:top_k]]
            for r in results]


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
