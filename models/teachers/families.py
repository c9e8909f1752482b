"""The supported teacher families. They share the Hugging Face Llama layout (models/teachers/adapter.py) and
differ in what their configs imply: attention biases, per-head q/k norms, sliding-window defaults."""

from __future__ import annotations

from transformers import PretrainedConfig

from .adapter import TeacherAdapter


class LlamaAdapter(TeacherAdapter):
    """Llama 2/3.x (and SmolLM2): biases only with `attention_bias` (q/k/v and o together)."""

    family = "llama"
    architectures = ("LlamaForCausalLM",)


class MistralAdapter(TeacherAdapter):
    """Mistral: a config that names a sliding window uses it unless it says otherwise (refused by describe)."""

    family = "mistral"
    architectures = ("MistralForCausalLM",)
    sliding_window_default = True


class Qwen2Adapter(TeacherAdapter):
    """Qwen2 / Qwen2.5: q/k/v always carry biases, o never does (the config has no attention_bias)."""

    family = "qwen2"
    architectures = ("Qwen2ForCausalLM",)

    def qkv_bias(self, config: PretrainedConfig) -> bool:
        return True

    def o_bias(self, config: PretrainedConfig) -> bool:
        return False


class Qwen3Adapter(TeacherAdapter):
    """Qwen3 (dense): per-head RMSNorm on q and k before RoPE; biases with `attention_bias`."""

    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    qk_norm = True


FAMILIES: tuple[TeacherAdapter, ...] = (LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter())
