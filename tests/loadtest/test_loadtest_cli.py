"""The camex-loadtest command line: exit codes (SLO gate), JSON and PNG outputs, --compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loadtest.cli import EXIT_GATE, EXIT_NOTHING_COMPLETED, EXIT_OK, EXIT_USAGE, main
from loadtest.records import RequestRecord
from loadtest.report import Report, build_report

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def prompts_file(tmp_path: Path, rows: list[str]) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    return str(path)


def test_slo_gate_fails_with_exit_1_and_passes_with_exit_0(fresh_fake, tmp_path, capsys):
    prompts = prompts_file(tmp_path, ["ttft=0.1 itl=0.01 n=3"])
    base = ["--url", fresh_fake.url, "-n", "4", "--concurrency", "2", "--prompts", prompts,
            "--no-progress"]
    # every TTFT is >= 100 ms by construction, so a 10 ms TTFT objective cannot be met
    assert main(base + ["--slo", "ttft=10ms", "--slo-min-goodput", "0.5"]) == EXIT_GATE
    assert "gate >= 0.500: FAIL" in capsys.readouterr().out
    assert main(base + ["--slo", "ttft=60s", "--slo-min-goodput", "0.5"]) == EXIT_OK
    assert "PASS" in capsys.readouterr().out
    assert main(base) == EXIT_OK  # no gate: a report, never a failure


def test_gate_counts_failed_requests_against_goodput(fresh_fake, tmp_path):
    prompts = prompts_file(tmp_path, ["n=2", "status=503"])  # half the requests fail
    args = ["--url", fresh_fake.url, "-n", "4", "--prompts", prompts, "--no-progress"]
    assert main(args + ["--slo-min-goodput", "0.5"]) == EXIT_OK
    assert main(args + ["--slo-min-goodput", "0.75"]) == EXIT_GATE


def test_json_and_plots_are_written(fresh_fake, tmp_path, capsys):
    out, plots = tmp_path / "run.json", tmp_path / "plots"
    rc = main(["--url", fresh_fake.url, "-n", "6", "--rate", "100",
               "--mix", "stream=1,generate=1,classify=1", "--prompt-len", "uniform:2:6",
               "--json", str(out), "--plots", str(plots), "--no-progress"])
    assert rc == EXIT_OK
    report = Report.load(out)
    assert report.sent == 6 and len(report.records) == 6 and report.run["mode"] == "open"
    assert "api_key" not in report.run and report.run["client"] == "wire"  # auto, for http://
    assert report.run["client_cpu_s"] > 0
    out_text = capsys.readouterr().out
    assert "read by wire" in out_text and "client CPU" in out_text
    for name in ("latency_cdf.png", "timeline.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_compare_prints_ratios(tmp_path, capsys):
    def report(seconds):
        rec = RequestRecord(index=0, kind="stream", start=0.0, end=seconds, ok=True,
                            token_times=[seconds / 2, seconds], output_tokens=2)
        return build_report([rec], 1, {})

    report(1.0).save(tmp_path / "a.json")
    report(0.25).save(tmp_path / "b.json")
    assert main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == EXIT_OK
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["request_throughput"][-1] == "4.000"
    assert lines["e2e.median"][-1] == "0.250" and lines["ttft.p99"][-1] == "0.250"


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["--url", "http://203.0.113.9:8080", "-n", "1"]) == EXIT_USAGE
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["--prompts", str(tmp_path / "missing.jsonl"), "-n", "1"]) == EXIT_USAGE
    (tmp_path / "x.json").write_text("[]")
    assert main(["--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == EXIT_USAGE
    assert main(["--url", "https://127.0.0.1:8443", "--client", "wire", "-n", "1"]) == EXIT_USAGE
    assert "plain HTTP only" in capsys.readouterr().err


def test_client_flag_chooses_the_reader(fresh_fake, tmp_path):
    out = tmp_path / "run.json"
    args = ["--url", fresh_fake.url, "-n", "3", "--no-progress", "--json", str(out)]
    assert main(args + ["--client", "httpx"]) == EXIT_OK
    report = Report.load(out)
    assert report.completed == 3 and report.run["client"] == "httpx"


def test_nothing_completed_exits_3(fresh_fake, tmp_path):
    prompts = prompts_file(tmp_path, ["status=503"])
    args = ["--url", fresh_fake.url, "-n", "2", "--prompts", prompts, "--no-progress"]
    assert main(args) == EXIT_NOTHING_COMPLETED


def test_real_process_exit_status(fresh_fake, tmp_path):
    """The module entry point as a separate process: the gate's exit code reaches the shell."""
    prompts = prompts_file(tmp_path, ["ttft=0.05 n=2"])
    cmd = [sys.executable, "-m", "loadtest", "--url", fresh_fake.url, "-n", "2",
           "--prompts", prompts, "--slo", "ttft=1ms", "--slo-min-goodput", "1.0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_GATE, proc.stderr
    assert "goodput" in proc.stdout and "camex-loadtest" in proc.stderr  # the tqdm bar
    proc = subprocess.run([sys.executable, "-m", "loadtest", "--url", "http://192.0.2.7"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE and "refusing" in proc.stderr
