"""docs/training.md agrees with the code: every preset is listed with its actual settings."""

from __future__ import annotations

import pytest

from camex_runtime.training.presets import PRESETS, preset

from .conftest import REPO

DOC = REPO / "docs" / "training.md"
# Columns of the preset table after `| preset | data |`, in order.
COLUMNS = ["task", "steps × batch", "lr", "warmup", "block", "vocab", "d/layers/heads/d_ff",
           "experts", "T", "rank", "dropout", "held out"]


def expected_cells(name: str) -> list[str]:
    c = preset(name)
    m = c.model
    # an upcycling preset's architecture and tokenizer are the dense model's
    dense = "dense model" if c.from_dense else None
    return [c.task, f"{c.steps} × {c.batch_size}", f"{c.lr:g}", str(c.warmup),
            str(c.block_size), dense or str(c.vocab_size),
            dense or f"{m.d_model}/{m.n_layer}/{m.n_head}/{m.d_ff}",
            f"{m.num_experts} + base", str(m.segment_len), str(m.curvature_rank),
            f"{m.dropout:g}", f"{c.eval_fraction:g}"]


def table_row(name: str) -> list[str] | None:
    for line in DOC.read_text().splitlines():
        if line.startswith(f"| `{name}` |"):
            return [cell.strip() for cell in line.strip().strip("|").split("|")]
    return None


def test_preset_table_header_matches_the_columns_checked_here():
    header = next(line for line in DOC.read_text().splitlines() if line.startswith("| preset |"))
    assert [c.strip() for c in header.strip().strip("|").split("|")] == \
        ["preset", "data", *COLUMNS]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_documented_with_its_settings(name):
    row = table_row(name)
    assert row is not None, f"docs/training.md has no preset table row for {name}"
    assert row[2:] == expected_cells(name), f"docs/training.md row for {name} is stale"
