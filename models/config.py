"""HybridConfig: the student's architecture, a transformers `PretrainedConfig`.

The student keeps the teacher's trunk (embeddings, norms, SwiGLU MLPs, RoPE table) and replaces every
attention layer by a mixer of the kind `mixer_types` names (models/mixers.py: MLA or Mamba2). Each kind's
settings live in a plain dict under the kind's name (`mla`, `mamba`: config.json stays readable and round-trips);
`mixer_settings(name)` gives them back as the kind's typed, validated dataclass.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from transformers import PretrainedConfig

from .documents import DOCUMENT_MASKINGS
from .mixer_kind import config_from_dict
from .mixers import MIXERS, PLACED_KIND, check_mixer_types, mixer_kind


class HybridConfig(PretrainedConfig):
    """Configuration of `HybridForCausalLM`: a decoder whose layer i has the mixer kind `mixer_types[i]`.

    (Not `layer_types`: transformers validates and rewrites that attribute for its own attention kinds.)
    Keyword `<kind name>=dict(...)` (e.g. `mla=dict(kv_lora_rank=64)`) sets that kind's settings; every
    registered kind's settings are stored, with defaults for those not given.
    """

    model_type = "zebra_hybrid"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        mlp_bias: bool = False,
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 2048,
        rope_parameters: dict | None = None,
        mixer_types: list[str] | None = None,
        document_masking: str = "auto",
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.mlp_bias = mlp_bias
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        # The teacher's RoPE (transformers 5 `rope_parameters` form): rope_type, rope_theta and scaling keys.
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.mixer_types = list(mixer_types) if mixer_types is not None else [PLACED_KIND.name] * num_hidden_layers
        for name, kind in MIXERS.items():
            setattr(self, name, asdict(config_from_dict(kind.settings, kwargs.pop(name, None))))
        # How MLA keeps packed documents apart without a cache (models/documents.py DOCUMENT_MASKINGS): a run-time
        # choice like transformers' attn_implementation; every value gives the same numbers. "auto": block masks on
        # CUDA, equal to the dense mask and not slower from 2K to 32K (docs/performance.md, long packed rows).
        self.document_masking = document_masking
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_hybrid()

    def mixer_settings(self, name: str) -> Any:
        """Kind `name`'s settings as a new dataclass (to change them: edit it, then `set_mixer_settings`)."""
        return config_from_dict(mixer_kind(name).settings, getattr(self, name))

    def set_mixer_settings(self, name: str, settings: Any) -> None:
        setattr(self, name, asdict(config_from_dict(mixer_kind(name).settings, settings)))
        self.validate_hybrid()

    @property
    def mla_layers(self) -> list[int]:
        """The layers of the kind `student.mla_layers` places (MLA)."""
        return [i for i, t in enumerate(self.mixer_types) if t == PLACED_KIND.name]

    def validate_hybrid(self) -> None:
        """Raise ValueError naming the key and what is allowed; called on construction."""
        check_mixer_types(self.mixer_types, self.num_hidden_layers)
        if self.document_masking not in DOCUMENT_MASKINGS:
            allowed = list(DOCUMENT_MASKINGS)
            raise ValueError(f"document_masking={self.document_masking!r} is invalid; allowed: {allowed}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        for name, kind in MIXERS.items():
            if name in self.mixer_types:
                kind.validate(self.mixer_settings(name), self)


__all__ = ["HybridConfig"]
