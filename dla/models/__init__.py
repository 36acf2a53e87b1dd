"""Hugging Face models (needs ``transformers``): importing this package registers ``model_type="dla"``
with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``, and marks the classes so that
``save_pretrained`` writes their code and an ``auto_map`` (a saved directory then also loads with
``trust_remote_code=True`` where ``dla`` is installed but not imported)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from dla.models.cache_dla import DLACache
from dla.models.configuration_dla import DLAConfig
from dla.models.modeling_dla import DLAForCausalLM, DLAModel, DLAPreTrainedModel

AutoConfig.register(DLAConfig.model_type, DLAConfig, exist_ok=True)
AutoModel.register(DLAConfig, DLAModel, exist_ok=True)
AutoModelForCausalLM.register(DLAConfig, DLAForCausalLM, exist_ok=True)
DLAConfig.register_for_auto_class()
DLAModel.register_for_auto_class("AutoModel")
DLAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["DLACache", "DLAConfig", "DLAForCausalLM", "DLAModel", "DLAPreTrainedModel"]
