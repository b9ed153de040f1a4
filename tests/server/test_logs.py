"""The server's stderr is JSON lines only: our records, Python warnings, transformers' logger
and any stray line a library prints all arrive as one JSON object per line."""

import json
import logging
import sys
import warnings

import pytest

from server.logs import JsonLinesWriter, adopt_library_logging, configure_logging


@pytest.fixture
def json_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.stderr)
    try:
        yield
    finally:
        root.handlers[:], _, sys.stderr = saved[0], None, saved[2]
        root.setLevel(saved[1])
        logging.captureWarnings(False)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]  # raises if not JSON


def test_library_output_becomes_json_lines(json_logging, capsys):
    from transformers.utils import logging as hf_logging

    configure_logging("info")
    adopt_library_logging()
    logging.getLogger("camex.server").info("ours", extra={"request_id": "r1"})
    hf_logging.get_logger("transformers.tokenization_utils_base").warning("a transformers warning")
    warnings.warn("a python warning", UserWarning, stacklevel=1)
    print("a stray print\nand a second line", file=sys.stderr)
    sys.stderr.write("progress 10%\rprogress 100%\n")
    out = records(capsys.readouterr().err)
    by_msg = {r["msg"]: r for r in out}
    assert by_msg["ours"]["request_id"] == "r1"
    assert by_msg["a transformers warning"]["logger"].startswith("transformers")
    assert any("a python warning" in r["msg"] and r["logger"] == "py.warnings" for r in out)
    assert by_msg["a stray print"]["logger"] == "stderr"
    assert "and a second line" in by_msg and "progress 100%" in by_msg
    assert "progress 10%" not in by_msg  # a redrawn progress bar keeps its last state


def test_writer_never_loops_when_its_handler_writes_to_stderr(capfd):
    logger = logging.getLogger("test.loop")
    logger.propagate = False
    writer = JsonLinesWriter(logger)

    class Echo(logging.Handler):
        def emit(self, record):
            writer.write("echo: " + record.getMessage() + "\n")  # as handleError would

    logger.addHandler(Echo())
    writer.write("hello\n")
    assert capfd.readouterr().err == "echo: hello\n"  # went straight to the real stderr
