"""Hybrid Mamba2 / MLA student models: config, mixer kinds, layers, cache, accounting."""

from .cache import HybridCache
from .config import HybridConfig
from .flops import CacheBytes, student_cache_bytes, teacher_cache_bytes
from .hybrid import HybridForCausalLM, HybridModel
from .mixer_kind import MixerKind
from .mixer_mamba2 import MambaConfig
from .mixer_mla import MLAConfig
from .mixers import MIXERS, mixer_kind

HybridConfig.register_for_auto_class()
HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")

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
