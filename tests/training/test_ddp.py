"""Data-parallel training: 2 processes under torchrun with gloo on CPU, over 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from camex_runtime.training import train
from camex_runtime.training.metrics import read_metrics

from .conftest import REPO, subprocess_env, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_weights(tmp_path, corpus_dir):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(Path(__file__).with_name("ddp_worker.py")), str(corpus_dir), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"hash-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # eval sums reduced over both ranks

    # The two ranks read disjoint halves of one global batch: their mean first-step loss is the
    # loss of a single process reading the whole global batch (before any update differs).
    single = train(tiny_config(tmp_path / "single", [str(corpus_dir)], steps=1, batch_size=8))
    ddp_first = read_metrics(out / "run")[0]
    single_first = read_metrics(single.out_dir)[0]
    assert ddp_first["tokens"] == single_first["tokens"] == 8 * 16
    assert ddp_first["loss"] == pytest.approx(single_first["loss"], rel=1e-5)
    assert (out / "run" / "trainer_state.json").is_file()  # rank 0 wrote the checkpoint
