"""Fixtures for trainer tests: tiny corpora written into tmp dirs and a tiny TrainConfig.

Models are 2 blocks of width 32 with 3 experts and T=4, so a few dozen steps take well under a
second; the corpora are a few short, repetitive documents so that loss visibly falls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from camex_runtime.training import ModelSpec, TrainConfig

REPO = Path(__file__).resolve().parents[2]

TOPICS = {
    "fruit": ["apples and pears are sweet fruit", "a ripe banana and a red apple",
              "fresh pears, plums and cherries", "orange juice from sweet oranges"],
    "vehicles": ["the red truck drove down the road", "a fast car and a slow bus",
                 "trains and trucks carry heavy loads", "the bus stopped near the car park"],
}


def write_fortune_file(path: Path, docs: list[str]) -> Path:
    path.write_text("\n%\n".join(docs) + "\n%\n")
    return path


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """One `%`-separated file per topic, each doc repeated so a tiny LM can learn it."""
    root = tmp_path / "corpus"
    root.mkdir()
    for topic, docs in TOPICS.items():
        write_fortune_file(root / topic, docs * 6)
    return root


@pytest.fixture
def labeled_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "labeled.jsonl"
    with open(path, "w") as f:
        for _ in range(6):
            for topic, docs in TOPICS.items():
                for d in docs:
                    f.write(json.dumps({"text": d, "label": topic}) + "\n")
    return path


TINY_MODEL = ModelSpec(d_model=32, n_layer=2, n_head=4, d_ff=64, num_experts=3, segment_len=4,
                       curvature_rank=1)


def tiny_config(out_dir: Path, data: list[str], **overrides) -> TrainConfig:
    base = dict(task="lm", data=data, vocab_size=300, block_size=16, model=TINY_MODEL,
                steps=12, batch_size=4, lr=3e-3, warmup=2, eval_fraction=0.2, eval_batches=4,
                out_dir=str(out_dir), progress=False, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: the repo importable, one thread, loopback only."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", GLOO_SOCKET_IFNAME="lo")
    return env
