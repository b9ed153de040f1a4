"""Demo models: train and export the `demo-lm` and `demo-classifier` presets once, then reuse.

    python -m camex_runtime.training.demo [--root DIR] [--force]

Layout under root (default `$CAMEX_DEMO_DIR`, else `~/.cache/camex-serve/demo`):

    runs/demo-lm/  runs/demo-classifier/   training checkpoints (resumable, metrics, loss curves)
    demo-lm/  demo-classifier/             folded serving checkpoints (what the server loads)
    demo-lm.stamp.json  demo-classifier.stamp.json   which code built them

A folded checkpoint counts as present when `load_folded` accepts it *and* its stamp matches
this code. The stamp holds:
- `demo_format`: `DEMO_FORMAT` below, bumped by hand when a change to the model, trainer or
  export code changes what the demo presets produce (weights, numbers, layout);
- `checkpoint_format`: the folded format version (`camex_runtime.config.FORMAT_VERSION`);
- `preset`: a digest of the preset's full TrainConfig, so changing a preset rebuilds;
- for the classifier, the build id of the LM whose tokenizer and body it was trained from;
- for people, not for the check: the package version, git commit and build time.
A missing stamp (a demo built before stamps existed) or any difference means "built by other
code": the model is rebuilt, and the reason is printed.

Why an explicit constant rather than a hash of the source files: a hash rebuilds the demo (minutes
of CPU on every server start after a pull) for any edit, comments included, and still misses
what matters outside the hashed list; the parts that can be computed exactly (the preset, the
folded format) are in the stamp automatically, and what is left is a judgement, made once,
by whoever changes what training produces.

The classifier reuses the LM's tokenizer and starts from the LM's weights (the LM is trained
first when missing, and a rebuilt LM always rebuilds the classifier).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

LM_NAME, CLF_NAME = "demo-lm", "demo-classifier"

# Bump when the demo presets would produce a different model with unchanged presets: a fix in
# the model, merge, trainer or export code. 2: first stamped demos (after the segment-1
# stop-gradient fix, 4eb469a).
DEMO_FORMAT = 2
_CONFIG_KEYS_IGNORED = ("out_dir", "export_dir", "progress", "overwrite", "resume", "tokenizer",
                        "init_from")  # where a run writes and reads, not what it produces


def default_root() -> Path:
    env = os.environ.get("CAMEX_DEMO_DIR")
    return Path(env) if env else Path.home() / ".cache" / "camex-serve" / "demo"


def is_ready(path: Path) -> bool:
    """True when `path` holds a folded checkpoint the runtime accepts (stamp not checked)."""
    return _unreadable(path) is None


def _unreadable(path: Path) -> str | None:
    from camex_runtime.checkpoint import CheckpointError, load_folded

    if not (path / "config.json").is_file():
        return "missing"
    try:
        load_folded(path)
    except CheckpointError as e:
        return f"unreadable ({e})"
    return None


# -- stamps -----------------------------------------------------------------------------------


def stamp_path(root: Path, name: str) -> Path:
    return root / f"{name}.stamp.json"


def read_stamp(root: Path, name: str) -> dict | None:
    try:
        return json.loads(stamp_path(root, name).read_text())
    except (OSError, ValueError):
        return None


def expected_stamp(name: str, lm_build: str | None = None) -> dict:
    """The fields a demo model built by this code carries (the ones that are compared)."""
    from camex_runtime.config import FORMAT_VERSION

    from .presets import preset

    cfg = preset(name).to_dict()
    for key in _CONFIG_KEYS_IGNORED:
        cfg.pop(key, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    stamp = {"demo_format": DEMO_FORMAT, "checkpoint_format": FORMAT_VERSION, "preset": digest}
    if name == CLF_NAME:
        stamp["lm_build"] = lm_build
    return stamp


def stale_reason(root: Path, name: str) -> str | None:
    """Why the demo model `name` under `root` must be (re)built, or None when it is current."""
    problem = _unreadable(root / name)
    if problem:
        return problem
    stamp = read_stamp(root, name)
    if stamp is None:
        return "built before demo checkpoints were stamped"
    lm_build = (read_stamp(root, LM_NAME) or {}).get("build_id") if name == CLF_NAME else None
    want = expected_stamp(name, lm_build)
    diffs = [f"{k} {stamp.get(k)!r}, this code needs {v!r}" for k, v in want.items()
             if stamp.get(k) != v]
    if diffs:
        built_by = stamp.get("commit") or "an unknown commit"
        return f"built by other code ({built_by}): " + "; ".join(diffs)
    return None


def write_stamp(root: Path, name: str) -> dict:
    lm_build = (read_stamp(root, LM_NAME) or {}).get("build_id") if name == CLF_NAME else None
    stamp = {**expected_stamp(name, lm_build), "build_id": uuid.uuid4().hex,
             "version": _package_version(), "commit": _git_commit(),
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = stamp_path(root, name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader sees the old stamp or the new one, never half
    return stamp


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("camex-serve")
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the checkout this code runs from (with -dirty), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, text=True,
                              capture_output=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, text=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# -- building -------------------------------------------------------------------------------


def ensure_demo_models(root: str | Path | None = None, progress: bool = True,
                       force: bool = False) -> tuple[Path, Path]:
    """(lm_dir, clf_dir) of folded demo checkpoints under `root`, training what is missing or
    was built by other code (see the module docstring)."""
    from .chat_template import ensure_chat_template  # chat works on the demo out of the box

    root = Path(root) if root is not None else default_root()
    lm_dir, clf_dir = root / LM_NAME, root / CLF_NAME
    if not force and stale_reason(root, LM_NAME) is None and stale_reason(root, CLF_NAME) is None:
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
    """Train + export what is stale (re-checked under the lock: another process may be done)."""
    from .loop import train
    from .presets import preset

    lm_dir, clf_dir = root / LM_NAME, root / CLF_NAME
    lm_run, clf_run = root / "runs" / LM_NAME, root / "runs" / CLF_NAME
    why = "--force" if force else stale_reason(root, LM_NAME)
    if why:
        _say(progress, f"{LM_NAME} in {lm_dir}: {why}; training it (a few minutes)")
        stamp_path(root, LM_NAME).unlink(missing_ok=True)  # a crash mid-build leaves it stale
        result = train(preset(LM_NAME, out_dir=str(lm_run), export_dir=str(lm_dir),
                              overwrite=True, progress=progress))
        write_stamp(root, LM_NAME)
        _report(progress, LM_NAME, result)
    why = "--force" if force else stale_reason(root, CLF_NAME)  # a new LM makes it stale
    if why:
        if not (lm_run / "model.safetensors").is_file():
            # The folded LM exists but its training run is gone: its tokenizer and body still serve.
            lm_run = lm_dir
        _say(progress, f"{CLF_NAME} in {clf_dir}: {why}; training it")
        stamp_path(root, CLF_NAME).unlink(missing_ok=True)
        result = train(preset(CLF_NAME, out_dir=str(clf_run), export_dir=str(clf_dir),
                              overwrite=True, tokenizer=str(lm_run), init_from=str(lm_run),
                              progress=progress))
        write_stamp(root, CLF_NAME)
        _report(progress, CLF_NAME, result)


def _report(progress: bool, name: str, result) -> None:
    numbers = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
    _say(progress, f"{name}: {result.steps} steps in {result.seconds:.0f} s; held-out {numbers}")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[camex demo] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m camex_runtime.training.demo",
        description="Train and export the demo models if missing or built by other code; "
                    "print their two directories.")
    p.add_argument("--root", help="demo directory (default: $CAMEX_DEMO_DIR, else "
                                  "~/.cache/camex-serve/demo)")
    p.add_argument("--force", action="store_true", help="retrain both even if current")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    lm_dir, clf_dir = ensure_demo_models(args.root, progress=not args.quiet, force=args.force)
    print(lm_dir)
    print(clf_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
