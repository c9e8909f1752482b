"""Hybrid Mamba2 / MLA student models: config, mixer kinds, layers, cache, accounting."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import HybridCache
from .config import HybridConfig
from .flops import CacheBytes, student_cache_bytes, teacher_cache_bytes
from .hybrid import HybridForCausalLM, HybridModel
from .mixer_kind import MixerKind
from .mixer_mamba2 import MambaConfig
from .mixer_mla import MLAConfig
from .mixers import MIXERS, mixer_kind

# Saved students carry their code (auto_map) for users who have only transformers ...
HybridConfig.register_for_auto_class()
HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# ... and where this package is imported, the Auto classes know the type: transformers 5 reads config.json before
# a tokenizer, so without this `AutoTokenizer.from_pretrained(student)` asks to run the folder's config code.
AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = [
    "MIXERS",
    "CacheBytes",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "MLAConfig",
    "MambaConfig",
    "MixerKind",
    "mixer_kind",
    "student_cache_bytes",
    "teacher_cache_bytes",
]
