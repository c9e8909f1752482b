"""Hybrid Mamba2 / MLA student models: config, layers, cache, accounting."""

from .cache import HybridCache
from .config import HybridConfig, MambaConfig, MLAConfig
from .flops import CacheBytes, student_cache_bytes, teacher_cache_bytes
from .hybrid import HybridForCausalLM, HybridModel

HybridConfig.register_for_auto_class()
HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CacheBytes",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "MLAConfig",
    "MambaConfig",
    "student_cache_bytes",
    "teacher_cache_bytes",
]
