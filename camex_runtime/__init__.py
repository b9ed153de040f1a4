"""camex_runtime: the CAMEx model (training and folded form), export, and the serving runtime.

Importing this package registers ``model_type="camex"`` with ``AutoConfig``,
``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .config import CamexConfig
from .modeling import (CamexForCausalLM, CamexForSequenceClassification, CamexModel,
                       ExpertBank, LinearBank)

AutoConfig.register("camex", CamexConfig, exist_ok=True)
AutoModel.register(CamexConfig, CamexModel, exist_ok=True)
AutoModelForCausalLM.register(CamexConfig, CamexForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(CamexConfig, CamexForSequenceClassification, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "CamexConfig", "CamexForCausalLM", "CamexForSequenceClassification", "CamexModel",
    "ExpertBank", "LinearBank", "__version__",
]
