"""camex_runtime: the CAMEx model (training and folded form), export, and the serving runtime.

Importing this package registers ``model_type="camex"`` with ``AutoConfig``,
``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``.
"""

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,
                          AutoModelForSequenceClassification)

from .checkpoint import CheckpointError, FoldedCheckpoint, load_folded
from .config import CamexConfig
from .export import ExportError, ExportReport, export
from .modeling import (CamexForCausalLM, CamexForSequenceClassification, CamexModel,
                       ExpertBank, LinearBank)

AutoConfig.register("camex", CamexConfig, exist_ok=True)
AutoModel.register(CamexConfig, CamexModel, exist_ok=True)
AutoModelForCausalLM.register(CamexConfig, CamexForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(CamexConfig, CamexForSequenceClassification,
                                            exist_ok=True)

from .upcycle import upcycle_from_dense  # noqa: E402  (needs the registration above)

__version__ = "0.1.0"

__all__ = [
    "CamexConfig", "CamexForCausalLM", "CamexForSequenceClassification", "CamexModel",
    "CheckpointError", "ExpertBank", "ExportError", "ExportReport", "FoldedCheckpoint",
    "LinearBank", "export", "load_folded", "upcycle_from_dense", "__version__",
]

# --- serving engine (owned by camex_runtime/engine; appended, see docs/INTERFACES.md §2) ---
from .engine import (ClassificationResult, Constraint, Engine, GenerationResult,  # noqa: E402
                     SamplingParams, TokenEvent)

__all__ += ["ClassificationResult", "Constraint", "Engine", "GenerationResult", "SamplingParams",
            "TokenEvent"]
