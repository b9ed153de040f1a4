"""TGI parameters -> SamplingParams: TGI's sampling rules, limits, and clear refusals."""

import pytest

from server.errors import ApiError
from server.generation import to_sampling
from server.protocol import CompatGenerateRequest, GenerateParameters


def convert(**kw):
    return to_sampling(GenerateParameters(**kw), max_stop_sequences=2, queue_timeout_s=5.0)


def test_greedy_by_default_and_no_seed_reported():
    params, seed = convert()
    assert params.do_sample is False and params.max_new_tokens == 20 and seed is None
    assert params.queue_timeout_s == 5.0


def test_temperature_alone_turns_sampling_on_with_a_reported_seed():
    params, seed = convert(temperature=0.7)
    assert params.do_sample and params.temperature == 0.7
    assert seed is not None and params.seed == seed


def test_neutral_warpers_stay_greedy():
    assert convert(temperature=1.0, top_p=1.0)[0].do_sample is False
    assert convert(top_k=3)[0].do_sample is True


def test_extensions_pass_through():
    params, _ = convert(ignore_eos=True, return_routing=True, routing="prompt")
    assert params.ignore_eos and params.return_routing and params.routing == "prompt"


def test_tgi_frequency_penalty_and_typical_p_map_to_their_tgi_rules():
    """TGI's frequency penalty is its own (over prompt and generated tokens, per length), not
    OpenAI's; typical_p is a warper, so it switches sampling on as TGI's warpers do."""
    params, seed = convert(frequency_penalty=0.5, typical_p=0.4)
    assert params.sequence_frequency_penalty == 0.5 and params.frequency_penalty == 0.0
    assert params.typical_p == 0.4 and params.do_sample and seed is not None
    plain, _ = convert()
    assert plain.sequence_frequency_penalty == 0.0 and plain.typical_p is None
    assert not plain.do_sample


@pytest.mark.parametrize("kw", [{"frequency_penalty": 2.5}, {"typical_p": 1.0},
                                {"typical_p": 0.0}])
def test_tgi_ranges_of_frequency_penalty_and_typical_p(kw):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=next(iter(kw))):
        GenerateParameters(**kw)


def test_explicit_seed_is_kept():
    params, seed = convert(do_sample=True, seed=42, top_k=5, top_p=0.9, stop=["\n"])
    assert (params.seed, seed, params.top_k, params.top_p, tuple(params.stop)) == \
        (42, 42, 5, 0.9, ("\n",))


@pytest.mark.parametrize("kw,needle", [
    ({"best_of": 2}, "best_of"), ({"watermark": True}, "watermark"),
    ({"grammar": {"type": "regex"}}, "grammar"),
    ({"stop": ["a", "b", "c"]}, "at most 2"), ({"stop": [""]}, "non-empty"),
])
def test_unsupported_or_too_many_is_422(kw, needle):
    with pytest.raises(ApiError) as err:
        convert(**kw)
    assert err.value.status == 422 and needle in err.value.message


CLIENT_PAYLOAD = {"inputs": "hi", "stream": False, "parameters": {
    # What `text_generation.Client.generate` sends (Request.dict()), every field it knows.
    "best_of": None, "details": True, "decoder_input_details": False, "do_sample": False,
    "max_new_tokens": 5, "repetition_penalty": None, "frequency_penalty": None,
    "return_full_text": False, "seed": None, "stop": [], "temperature": None, "top_k": None,
    "top_p": None, "truncate": None, "typical_p": None, "watermark": False,
    "top_n_tokens": None, "grammar": None, "adapter_id": None}}


def test_text_generation_client_payload_parses():
    req = CompatGenerateRequest.model_validate(CLIENT_PAYLOAD)
    params, _ = to_sampling(req.parameters, max_stop_sequences=4, queue_timeout_s=1.0)
    assert params.max_new_tokens == 5 and not params.do_sample


def test_unknown_parameter_is_refused_unless_lenient():
    from pydantic import ValidationError

    from server.protocol import LENIENT_FIELDS
    payload = {**CLIENT_PAYLOAD, "parameters": {**CLIENT_PAYLOAD["parameters"],
                                                "max_new_token": 9}}
    with pytest.raises(ValidationError) as err:
        CompatGenerateRequest.model_validate(payload)
    (e,) = err.value.errors()
    assert e["type"] == "unknown_field" and e["loc"] == ("parameters",)
    assert e["ctx"]["hints"] == {"max_new_token": "max_new_tokens"}
    token = LENIENT_FIELDS.set(True)
    try:
        req = CompatGenerateRequest.model_validate(payload)
    finally:
        LENIENT_FIELDS.reset(token)
    assert req.parameters.max_new_tokens == 5 and not req.parameters.model_extra


def test_top_n_tokens_and_decoder_input_details_reach_the_engine():
    params, _ = convert(top_n_tokens=3, decoder_input_details=True)
    assert params.logprobs == 3 and params.prompt_logprobs == 0
    params, _ = convert()
    assert params.logprobs == 0 and params.prompt_logprobs is None
