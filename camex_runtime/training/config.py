"""What a training run is: `TrainConfig` (every knob) and `TrainResult` (what it produced).

`ModelSpec` is the architecture part; it becomes a `CamexConfig` once the tokenizer (vocab size,
special ids) and the labels are known. Presets (`presets.py`) and the CLI (`cli.py`) only ever
build these dataclasses; `loop.train` is the one consumer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from .readers import ReadOptions

TASKS = ("lm", "classify")
SCHEDULES = ("cosine", "linear", "constant")


# ModelSpec fields that describe the CAMEx layers (kept when upcycling); the others describe the
# transformer around them and come from the dense checkpoint when upcycling.
CAMEX_KNOBS = ("num_experts", "moe_layers", "segment_len", "alpha", "curvature_rank",
               "merge_method", "ties_density", "dare_p", "dynamic", "routing", "dropout")


@dataclass
class ModelSpec:
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 512
    num_experts: int = 4                 # routed experts per MoE FFN; 0 = dense baseline
    moe_layers: list[int] | None = None  # None = every block
    segment_len: int = 32
    alpha: float = 1.0
    curvature_rank: int = 1
    merge_method: str = "domain_specific"
    ties_density: float = 1.0
    dare_p: float = 0.1
    dynamic: bool = False
    routing: str = "segment"             # default inference routing written into the checkpoint
    dropout: float = 0.0
    max_position_embeddings: int | None = None  # None = the run's block_size

    def camex_config(self, *, vocab_size: int, block_size: int, tokenizer=None,
                     label_names: Sequence[str] | None = None):
        """The CamexConfig for this spec, the tokenizer's ids and (classifiers) the labels."""
        from camex_runtime import CamexConfig  # model code is only needed once we build a model

        kwargs: dict[str, Any] = {k: v for k, v in asdict(self).items()
                                  if k != "max_position_embeddings"}
        kwargs["max_position_embeddings"] = self.max_position_embeddings or block_size
        if tokenizer is not None:
            kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        if label_names is not None:
            kwargs.update(num_labels=len(label_names),
                          id2label=dict(enumerate(label_names)),
                          label2id={n: i for i, n in enumerate(label_names)},
                          problem_type="single_label_classification")
        return CamexConfig(vocab_size=vocab_size, **kwargs)


@dataclass
class TrainConfig:
    task: str = "lm"                        # "lm" (causal LM) or "classify" (sequence classifier)
    data: list[str] = field(default_factory=list)       # sources, see data.load_examples
    eval_data: list[str] = field(default_factory=list)  # explicit held-out set; else a split
    eval_fraction: float = 0.05
    balance_labels: bool = False            # classify: downsample labels to the rarest one
    max_examples_per_label: int | None = None
    data_description: str | None = None     # provenance text; default: derived from `data`
    # How files are read (data.ReadOptions): plain-text split into documents, chunk size, and
    # the JSONL/JSON/CSV/TSV/hf field names of the text and the label.
    text_split: str = "auto"
    chunk_chars: int = 2000
    text_field: str = "text"
    label_field: str = "label"
    # Tokenizer: load `tokenizer` (a directory) or train a byte-level BPE of `vocab_size`.
    tokenizer: str | None = None
    vocab_size: int = 4096
    block_size: int = 128                   # LM block length; classifier max tokens per text
    model: ModelSpec = field(default_factory=ModelSpec)
    init_from: str | None = None            # checkpoint dir whose matching weights seed the model
    # A dense Hugging Face checkpoint directory (gpt2, llama, mistral, qwen2, qwen3, phi3,
    # smollm3, granite, gemma2, gemma3_text, gemma3, olmo2, olmo3; sparse: mixtral, qwen3_moe,
    # olmoe, gpt_oss) to upcycle:
    # its architecture, weights, tokenizer and generation config replace ModelSpec's
    # architecture fields; ModelSpec still sets the CAMEx knobs (experts, layers, curvature...).
    from_dense: str | None = None
    verify_upcycle: bool = True             # compare the upcycled model with the dense one first
    # Optimisation.
    steps: int = 200                        # optimizer steps; also the length of the LR schedule
    batch_size: int = 16                    # per process and micro-step
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1               # final LR = lr * min_lr_ratio
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0                  # max global grad norm; 0 = no clipping
    bf16: bool = False                      # bf16 autocast (CUDA with bf16, or CPU when asked)
    seed: int = 0
    device: str | None = None               # None: cuda:LOCAL_RANK if available, else cpu
    threads: int | None = None              # torch CPU threads per process; None: torch default
    # Evaluation, logging and checkpoints.
    eval_every: int = 0                     # 0 = only at the end
    eval_batches: int | None = 50           # cap on held-out batches per evaluation
    eval_batch_size: int | None = None      # default: batch_size
    log_every: int = 1
    out_dir: str = "runs/camex"
    save_every: int = 0                     # 0 = only at the end
    resume: bool = False                    # continue from out_dir's checkpoint if there is one
    overwrite: bool = False                 # start over even if out_dir holds a checkpoint
    stop_after: int | None = None           # stop (resumably) once this step is reached, e.g. to
                                            # fit a job time limit; the schedule still uses `steps`
    export_dir: str | None = None           # write a folded serving checkpoint here at the end
    progress: bool = True                   # tqdm bar on rank 0

    def validate(self) -> None:
        """Raise ValueError naming the field when a knob is out of range."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("steps", "batch_size", "grad_accum", "block_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.data:
            raise ValueError("no training data: set data (paths, JSONL files or hf: names)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")
        if self.from_dense and self.init_from:
            raise ValueError("from_dense and init_from both initialise the model; give one")
        # Raises DataError (a ValueError) naming the field.
        ReadOptions(self.text_split, self.chunk_chars, self.text_field, self.label_field)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TrainConfig:
        doc = dict(doc)
        doc["model"] = ModelSpec(**doc.get("model", {}))
        if "betas" in doc:
            doc["betas"] = tuple(doc["betas"])
        return cls(**doc)

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)


@dataclass
class TrainResult:
    model: Any                  # the trained training-form model (unwrapped from DDP), eval mode
    tokenizer: Any              # PreTrainedTokenizerFast used for training
    metrics: dict[str, float]   # final held-out eval: eval_loss and perplexity | accuracy
    seconds: float              # training wall time of this run (excludes data prep)
    out_dir: str                # the training checkpoint directory
    steps: int = 0              # optimizer steps completed
    export_dir: str | None = None
