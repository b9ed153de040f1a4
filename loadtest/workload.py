"""What the load tester sends: prompts, the request-kind mix and per-request parameters.

A workload is a list of ``RequestSpec`` built up front from a seed, so two runs with the same
arguments send the same requests in the same order (only the server's timing differs). This
module knows nothing about HTTP, timing or the server's tokenizer: synthetic prompt lengths are
counted in *words* (roughly one to two tokens each for GPT-2-style BPE).

Prompt sources:
- a ``.jsonl`` file: one object per line with the prompt under ``"prompt"``, ``"inputs"`` or
  ``"text"``; optional ``"max_new_tokens"`` and ``"kind"`` override the command line per row;
- any other file: one prompt per non-empty line;
- synthetic: words drawn from a fixed vocabulary with a length distribution (``LengthDist``).
File prompts are used in file order, cycling when more requests than prompts are asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Request kinds and what they measure: "stream" = POST /generate_stream (TTFT, ITL, TPOT),
# "generate" = POST /generate (end-to-end only), "classify" = POST /classify.
KINDS = ("stream", "generate", "classify")

_VOCAB = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "or has had not first one their its new after who they have two been also other year time "
    "city river music team film world state house school water light market model expert merge "
    "curvature router token layer weight signal garden mountain letter story number system "
    "people history language energy station engine winter summer bridge forest ocean island"
).split()


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths: fixed:N | uniform:LO:HI | normal:MEAN:STD."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """Parse ``"32"``, ``"fixed:32"``, ``"uniform:16:64"`` or ``"normal:64:16"``."""
        parts = str(text).split(":")
        try:
            if len(parts) == 1 or (parts[0] == "fixed" and len(parts) == 2):
                dist = cls("fixed", float(parts[-1]))
            elif parts[0] in ("uniform", "normal") and len(parts) == 3:
                dist = cls(parts[0], float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad length distribution {text!r}: use N, fixed:N, uniform:LO:HI "
                f"or normal:MEAN:STD"
            ) from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or dist.b < 0:
            raise ValueError(f"bad length distribution {text!r}: lengths must be >= 1, LO <= HI")
        return dist

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        """n lengths, each >= 1 (normal samples are rounded and clipped at 1)."""
        if self.kind == "fixed":
            values = np.full(n, self.a)
        elif self.kind == "uniform":
            values = rng.integers(int(self.a), int(self.b), size=n, endpoint=True)
        else:
            values = np.maximum(np.rint(rng.normal(self.a, self.b, size=n)), 1)
        return [int(v) for v in values]


@dataclass(frozen=True)
class PromptRow:
    """One prompt from a file, with optional per-row overrides."""

    text: str
    max_new_tokens: int | None = None
    kind: str | None = None


@dataclass(frozen=True)
class RequestSpec:
    """One request to send; built before the run so a seed reproduces the workload."""

    index: int  # position in the workload; also the order of the arrival schedule
    kind: str  # one of KINDS
    prompt: str
    max_new_tokens: int  # ignored for "classify"
    seed: int | None  # sent as parameters.seed so sampled outputs are reproducible per request


def parse_mix(text: str) -> dict[str, float]:
    """``"stream=0.7,generate=0.2,classify=0.1"`` -> normalised weights by kind."""
    weights: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise ValueError(f"unknown request kind {name!r} in mix {text!r}; kinds: {KINDS}")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad weight {value!r} for {name!r} in mix {text!r}") from None
        if weight < 0:
            raise ValueError(f"weight for {name!r} must be >= 0, got {weight}")
        weights[name] = weights.get(name, 0.0) + weight
    return normalise_mix(weights)


def normalise_mix(weights: dict[str, float]) -> dict[str, float]:
    """Check kinds and weights; scale to sum 1, dropping zero weights."""
    for name, weight in weights.items():
        if name not in KINDS:
            raise ValueError(f"unknown request kind {name!r} in mix; kinds: {KINDS}")
        if not weight >= 0:
            raise ValueError(f"weight for {name!r} must be >= 0, got {weight}")
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"mix {weights} has no positive weight")
    return {k: w / total for k, w in weights.items() if w > 0}


def _row_from_json(obj: object, where: str) -> PromptRow:
    if isinstance(obj, str):
        return PromptRow(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object or string")
    text = next((obj[k] for k in ("prompt", "inputs", "text") if k in obj), None)
    if not isinstance(text, str):
        raise ValueError(f"{where}: needs a string under 'prompt', 'inputs' or 'text'")
    kind = obj.get("kind")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; kinds: {KINDS}")
    mnt = obj.get("max_new_tokens")
    if mnt is not None and (not isinstance(mnt, int) or mnt < 1):
        raise ValueError(f"{where}: max_new_tokens must be a positive integer")
    return PromptRow(text, mnt, kind)


def load_prompts(path: str | Path) -> list[PromptRow]:
    """Read prompts from a JSONL file (by suffix) or a text file, one prompt per line."""
    path = Path(path)
    rows: list[PromptRow] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                rows.append(_row_from_json(obj, f"{path}:{lineno}"))
            else:
                rows.append(PromptRow(line.rstrip("\n")))
    if not rows:
        raise ValueError(f"{path}: no prompts found")
    return rows


def synthetic_prompts(n: int, lengths: LengthDist, rng: np.random.Generator) -> list[PromptRow]:
    """n prompts of random vocabulary words with word counts drawn from ``lengths``."""
    rows = []
    for length in lengths.sample(n, rng):
        words = rng.choice(len(_VOCAB), size=length)
        rows.append(PromptRow(" ".join(_VOCAB[i] for i in words)))
    return rows


def build_workload(
    n: int,
    mix: dict[str, float],
    prompts: list[PromptRow] | None = None,
    prompt_len: LengthDist = LengthDist("fixed", 32),
    max_new_tokens: LengthDist = LengthDist("fixed", 16),
    seed: int | None = 0,
) -> list[RequestSpec]:
    """The ``n`` requests of a run: kind by weighted draw (or the row's kind), prompt, limits.

    ``seed`` drives every random choice; request i gets ``parameters.seed = seed + i``
    (``None`` sends no seed at all).
    """
    if n < 0:
        raise ValueError(f"request count must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    mix = normalise_mix(mix)
    kinds = list(mix)
    drawn_kinds = rng.choice(len(kinds), size=n, p=[mix[k] for k in kinds])  # (n,)
    drawn_mnt = max_new_tokens.sample(n, rng)
    rows = prompts if prompts else synthetic_prompts(n, prompt_len, rng)
    specs = []
    for i in range(n):
        row = rows[i % len(rows)]
        specs.append(
            RequestSpec(
                index=i,
                kind=row.kind or kinds[drawn_kinds[i]],
                prompt=row.text,
                max_new_tokens=row.max_new_tokens or drawn_mnt[i],
                seed=None if seed is None else seed + i,
            )
        )
    return specs
