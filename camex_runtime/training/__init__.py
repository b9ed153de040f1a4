"""The offline trainer: data, tokenizer, training loop, presets, CLI and demo models.

    from camex_runtime.training import TrainConfig, ModelSpec, train
    result = train(TrainConfig(task="lm", data=["corpus/"], steps=100, out_dir="runs/x"))

Its only output contract is the checkpoint directory (docs/INTERFACES.md §4); the serving side
never imports this package.
"""

from .config import ModelSpec, TrainConfig, TrainResult
from .loop import train

__all__ = ["ModelSpec", "TrainConfig", "TrainResult", "train"]
