"""Property-based API fuzzing: schemathesis generates requests from the live server's
/openapi.json, schema-valid and schema-violating, for every operation, and checks that none
gets a 5xx. At least 500 cases run in total; tight token limits keep each case cheap.

(Driven through schemathesis's Python API with hypothesis: its pytest plugin does not load
under pytest 9, so each operation's strategy is run with `@given` here.)
"""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from tests.server.live_server import live_server

pytestmark = pytest.mark.e2e
MIN_CASES = 500
EXAMPLES = {GenerationMode.POSITIVE: 70, GenerationMode.NEGATIVE: 30}


@pytest.fixture(scope="module")
def fuzz_server(tiny_lm_dir, tiny_classifier_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    with live_server(tmp_path_factory.mktemp("srv"), "--model", str(tiny_lm_dir),
                     "--classifier", str(tiny_classifier_dir), "--max-total-tokens", "48",
                     "--max-batch-size", "4", "--max-body-bytes", "65536",
                     "--chat-template", str(template)) as srv:
        yield srv


def fuzz(operation, mode: GenerationMode, base_url: str, counts: dict) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(base_url=base_url, timeout=60)
        counts["total"] += 1
        case.validate_response(response, checks=[not_a_server_error])

    run()


def test_fuzzed_requests_never_get_5xx(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    counts = {"total": 0}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /generate", "POST /generate_stream", "POST /", "POST /classify",
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
        "GET /v1/models/{model}",
        "POST /tokenize", "POST /detokenize", "GET /tokenizer_info", "GET /health",
        "GET /info"}
    for op in operations:
        for mode in EXAMPLES:
            if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # parameterless GETs have nothing to break
            fuzz(op, mode, fuzz_server.base_url, counts)
    print(f"schemathesis: {counts['total']} cases over {len(operations)} operations")
    assert counts["total"] >= MIN_CASES, counts
    assert httpx.get(fuzz_server.base_url + "/health").status_code == 200  # still alive
