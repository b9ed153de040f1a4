"""`camex-train` end to end: flags -> training -> a folded export the runtime accepts; the data
shapes people have; help texts; input errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from camex_runtime import load_folded
from camex_runtime.training.cli import build_parser, config_from_args, main

TINY_FLAGS = ["--d-model", "32", "--n-layer", "2", "--n-head", "4", "--d-ff", "64",
              "--num-experts", "3", "--segment-len", "4", "--block-size", "16",
              "--batch-size", "4", "--warmup", "1", "--no-progress"]


def run_cli(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_lm_with_export_produces_a_folded_checkpoint(tmp_path, capsys, corpus_dir):
    out, export = tmp_path / "run", tmp_path / "folded"
    summary = run_cli(capsys, ["--task", "lm", "--data", str(corpus_dir), "--train-tokenizer",
                               "--vocab-size", "300", "--steps", "3", "--curvature-rank", "1",
                               "--moe-layers", "1", "--out", str(out), "--export", str(export),
                               *TINY_FLAGS])
    assert summary["steps"] == 3 and summary["export_dir"] == str(export)
    ckpt = load_folded(export)
    assert ckpt.kind == "causal-lm" and ckpt.config.folded
    assert ckpt.config.moe_layers == [1] and ckpt.config.num_experts == 3
    assert not any("curvature" in k for k in ckpt.state_dict)
    prov = ckpt.config.provenance
    assert str(corpus_dir) in prov["training_data"]
    assert prov["eval_metrics"]["perplexity"] == pytest.approx(summary["metrics"]["perplexity"])
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.eos_token == "<|endoftext|>" and len(tok) == ckpt.config.vocab_size


def test_cli_classifier_reuses_a_tokenizer_and_exports(tmp_path, capsys, labeled_jsonl, corpus_dir):
    lm = tmp_path / "lm"
    run_cli(capsys, ["--data", str(corpus_dir), "--vocab-size", "300", "--steps", "1",
                     "--out", str(lm), *TINY_FLAGS])
    export = tmp_path / "clf-folded"
    summary = run_cli(capsys, ["--task", "classify", "--data", str(labeled_jsonl),
                               "--tokenizer", str(lm), "--merge-method", "ties", "--dynamic",
                               "--steps", "2", "--out", str(tmp_path / "clf"),
                               "--export", str(export), *TINY_FLAGS])
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    ckpt = load_folded(export)
    assert ckpt.kind == "classifier"
    assert ckpt.config.id2label == {0: "fruit", 1: "vehicles"}
    assert ckpt.config.merge_method == "ties" and ckpt.config.dynamic
    lm_tok, clf_tok = AutoTokenizer.from_pretrained(lm), AutoTokenizer.from_pretrained(export)
    assert lm_tok.get_vocab() == clf_tok.get_vocab()


@pytest.mark.parametrize("argv, message", [
    ([], "give --preset NAME or --data"),
    (["--data", "/nonexistent/corpus"], "data path /nonexistent/corpus does not exist"),
    (["--data", "x", "--steps", "0"], "steps must be >= 1"),
    (["--data", "x", "--moe-layers", "1,a"], "--moe-layers must be"),
])
def test_cli_input_errors_exit_2_with_a_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_a_device_this_machine_lacks_exits_2_before_reading_the_data(capsys, tmp_path):
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last, on any machine
    empty = tmp_path / "empty.txt"
    empty.write_text("")  # (would be a data error, were the data read first)
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(empty), "--device", device, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"device '{device}'" in err
    assert ("no CUDA" in err) != torch.cuda.is_available()


def test_cli_missing_tokenizer_dir_and_conflicting_flags(capsys, corpus_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(corpus_dir), "--tokenizer", str(tmp_path / "none")])
    assert exc.value.code == 2 and "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(corpus_dir), "--tokenizer", "x", "--train-tokenizer"])
    assert "not allowed with" in capsys.readouterr().err


def test_preset_with_overrides_maps_every_flag():
    args = build_parser().parse_args(
        ["--preset", "demo-lm", "--steps", "7", "--d-model", "64", "--moe-layers", "all",
         "--curvature-rank", "0", "--no-dynamic", "--bf16", "--export", "e", "--out", "o",
         "--resume", "--lr", "0.01", "--grad-accum", "2", "--eval-every", "3", "--threads", "1"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.lr, cfg.grad_accum, cfg.eval_every, cfg.threads) == (7, 0.01, 2, 3, 1)
    assert (cfg.out_dir, cfg.export_dir, cfg.resume, cfg.bf16) == ("o", "e", True, True)
    assert cfg.model.d_model == 64 and cfg.model.moe_layers is None
    assert cfg.model.curvature_rank == 0 and cfg.model.dynamic is False
    assert cfg.model.n_layer == 4  # untouched preset value
    assert cfg.data and "fortunes" in cfg.data_description


def test_every_flag_has_a_help_text_with_its_default():
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 50
    for action in flags:
        assert action.help and "(default: " in action.help, action.option_strings
    by_flag = {a.option_strings[0]: a.help for a in flags}
    assert by_flag["--steps"].endswith("(default: 200)")        # read from TrainConfig
    assert by_flag["--num-experts"].endswith("(default: 4)")    # read from ModelSpec
    assert "(default: auto)" in by_flag["--text-split"]


def test_one_plain_text_file_trains_and_no_progress_prints_each_eval(tmp_path, capsys):
    """The first thing a user tries: `--data book.txt` (no `%`, no blank lines)."""
    book = tmp_path / "book.txt"
    book.write_text("".join(f"the red truck {i % 7} drove down the road past car {i % 5}.\n"
                            for i in range(300)))
    assert main(["--data", str(book), "--vocab-size", "300", "--steps", "3", "--eval-every",
                 "1", "--chunk-chars", "400", "--out", str(tmp_path / "run"), *TINY_FLAGS]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["metrics"]["perplexity"] > 1.0
    evals = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in evals] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all("perplexity" in line for line in evals)


def test_csv_classifier_takes_labels_from_the_label_column(tmp_path, capsys):
    from .conftest import TOPICS

    data = tmp_path / "topics.csv"
    rows = [f'"{text}",{topic}' for _ in range(6) for topic, docs in TOPICS.items()
            for text in docs]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    export = tmp_path / "clf"
    run_cli(capsys, ["--task", "classify", "--data", str(data), "--vocab-size", "300",
                     "--steps", "2", "--out", str(tmp_path / "run"), "--export", str(export),
                     *TINY_FLAGS])
    assert load_folded(export).config.id2label == {0: "fruit", 1: "vehicles"}


def test_unusable_data_exits_2_and_lists_the_accepted_shapes(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("only one label here\nand another line\n")
    with pytest.raises(SystemExit) as exc:
        main(["--task", "classify", "--data", str(notes), "--out", str(tmp_path / "o"),
              *TINY_FLAGS])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "two distinct labels" in err and "accepted:" in err and "CSV/TSV" in err
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(notes), "--text-split", "sentences"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
