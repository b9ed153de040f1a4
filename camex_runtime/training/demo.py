"""Demo models: train and export the `demo-lm` and `demo-classifier` presets once, then reuse.

    python -m camex_runtime.training.demo [--root DIR] [--force]

Layout under root (default `$CAMEX_DEMO_DIR`, else `~/.cache/camex-serve/demo`):

    runs/demo-lm/  runs/demo-classifier/   training checkpoints (resumable, metrics, loss curves)
    demo-lm/  demo-classifier/             folded serving checkpoints (what the server loads)

A folded checkpoint counts as present when `load_folded` accepts it. The classifier reuses the
LM's tokenizer and starts from the LM's weights (the LM is trained first when missing).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path

LM_NAME, CLF_NAME = "demo-lm", "demo-classifier"


def default_root() -> Path:
    env = os.environ.get("CAMEX_DEMO_DIR")
    return Path(env) if env else Path.home() / ".cache" / "camex-serve" / "demo"


def is_ready(path: Path) -> bool:
    """True when `path` holds a folded checkpoint the runtime accepts."""
    from camex_runtime.checkpoint import CheckpointError, load_folded

    if not (path / "config.json").is_file():
        return False
    try:
        load_folded(path)
    except CheckpointError:
        return False
    return True


def ensure_demo_models(root: str | Path | None = None, progress: bool = True,
                       force: bool = False) -> tuple[Path, Path]:
    """(lm_dir, clf_dir) of folded demo checkpoints under `root`, training what is missing."""
    from .chat_template import ensure_chat_template  # chat works on the demo out of the box

    root = Path(root) if root is not None else default_root()
    lm_dir, clf_dir = root / LM_NAME, root / CLF_NAME
    if not force and is_ready(lm_dir) and is_ready(clf_dir):
        return ensure_chat_template(lm_dir), clf_dir
    with _exclusive(root):  # two servers starting at once must not train into the same dirs
        _build(root, progress, force)
    return ensure_chat_template(lm_dir), clf_dir


@contextmanager
def _exclusive(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(root: Path, progress: bool, force: bool) -> None:
    """Train + export what is missing (re-checked under the lock: another process may be done)."""
    from .loop import train
    from .presets import preset

    lm_dir, clf_dir = root / LM_NAME, root / CLF_NAME
    lm_run, clf_run = root / "runs" / LM_NAME, root / "runs" / CLF_NAME
    if force or not is_ready(lm_dir):
        _say(progress, f"training {LM_NAME} -> {lm_dir}")
        result = train(preset(LM_NAME, out_dir=str(lm_run), export_dir=str(lm_dir),
                              overwrite=True, progress=progress))
        _report(progress, LM_NAME, result)
        force = True  # a new LM means a new tokenizer: the classifier must follow
    if force or not is_ready(clf_dir):
        if not (lm_run / "model.safetensors").is_file():
            # The folded LM exists but its training run is gone: its tokenizer and body still serve.
            lm_run = lm_dir
        _say(progress, f"training {CLF_NAME} -> {clf_dir}")
        result = train(preset(CLF_NAME, out_dir=str(clf_run), export_dir=str(clf_dir),
                              overwrite=True, tokenizer=str(lm_run), init_from=str(lm_run),
                              progress=progress))
        _report(progress, CLF_NAME, result)


def _report(progress: bool, name: str, result) -> None:
    numbers = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
    _say(progress, f"{name}: {result.steps} steps in {result.seconds:.0f} s; held-out {numbers}")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[camex demo] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m camex_runtime.training.demo",
                                description="Train and export the demo models if missing.")
    p.add_argument("--root", help="demo directory (default $CAMEX_DEMO_DIR or ~/.cache/camex-serve/demo)")
    p.add_argument("--force", action="store_true", help="retrain both even if present")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    lm_dir, clf_dir = ensure_demo_models(args.root, progress=not args.quiet, force=args.force)
    print(lm_dir)
    print(clf_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
