"""Training metrics on disk: an append-only JSONL log and the loss-curve PNG drawn from it.

Each line of `metrics.jsonl` is one JSON object with a `step` and a `kind`: "train" (loss, lr,
grad_norm, tokens, elapsed_s) or "eval" (eval_loss and perplexity | accuracy). On resume the
lines past the checkpoint's step are dropped, so the log always describes one history.
Matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled  # only rank 0 writes

    def truncate_after(self, step: int) -> None:
        """Drop records newer than `step` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(out_dir: str | Path, title: str = "") -> Path:
    """Draw train loss (and held-out loss where evaluated) against step into loss_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(out_dir) / METRICS_FILE)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    held = [(r["step"], r["eval_loss"]) for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title or str(out_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_dir) / PLOT_FILE
    fig.savefig(out)
    plt.close(fig)
    return out
