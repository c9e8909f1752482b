"""TeacherAdapter: everything the framework reads from a teacher model, in one object per family.

Initialization, layer-wise distillation, KD and evaluation never name a teacher's modules; they ask the
teacher's adapter (`adapter_for(model)` in models/teachers/registry.py): its description (TeacherSpec), its
decoder layers and attention modules, its attention weights per head, the trunk that copies into the student,
its rotary embedding, the forward inputs for a packed batch, and the per-layer trace ILD aligns to.

This base class reads the Hugging Face Llama layout, which Llama, Mistral, Qwen2 and Qwen3 share:

    model.embed_tokens, model.rotary_emb, model.norm, lm_head
    model.layers[i].{input_layernorm, post_attention_layernorm, mlp.{gate,up,down}_proj}
    model.layers[i].self_attn.{q,k,v,o}_proj (+ q_norm/k_norm in Qwen3)

The families (models/teachers/families.py) differ only in what `describe` reports (attention biases, q/k
norms, sliding-window default); a family with another layout overrides the accessors below.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PretrainedConfig

from ..attention_weights import AttentionWeights
from ..documents import document_block_mask, packed_causal_mask
from ..rope import SUPPORTED_ROPE_TYPES
from ..teacher_spec import TeacherSpec
from .attention_weights import attention_weights
from .capture import TeacherTrace, capture_trace


def rope_parameters(config: PretrainedConfig) -> dict:
    """transformers 5 keeps RoPE in `rope_parameters`; older configs use rope_theta + rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        params["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"teacher rope_type={params['rope_type']!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    return params


class TeacherAdapter:
    family = "llama"  # TeacherSpec.family and the Hugging Face model_type the registry keys it by
    architectures: tuple[str, ...] = ("LlamaForCausalLM",)  # config.architectures values it reads
    sliding_window_default = False  # whether a config with `sliding_window` but no `use_sliding_window` uses it
    qk_norm = False  # per-head RMSNorm on q and k before RoPE

    # --- description (config only, before any weight loads)

    def qkv_bias(self, config: PretrainedConfig) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def o_bias(self, config: PretrainedConfig) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def describe(self, config: PretrainedConfig) -> TeacherSpec:
        """What the student copies; refuses teachers it cannot reproduce (sliding windows, unknown RoPE)."""
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", self.sliding_window_default):
            raise ValueError(
                f"teacher uses sliding-window attention (sliding_window={window}); the student's MLA attends over "
                "the whole context, so only full-attention teachers are supported"
            )
        heads = config.num_attention_heads
        return TeacherSpec(
            family=self.family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_act=config.hidden_act,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            rope_parameters=rope_parameters(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias(config),
            o_bias=self.o_bias(config),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=self.qk_norm,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )

    # --- modules

    def decoder(self, model: nn.Module) -> nn.Module:
        """The trunk without the LM head: forward(input_ids, position_ids, attention_mask) -> last_hidden_state."""
        return model.model

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        """A decoder layer's attention module, whose output (first element) ILD aligns the student mixer to."""
        return layer.self_attn

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def rotary(
        self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, T, head_dim), as the teacher's attention layers receive them."""
        return model.model.rotary_emb(hidden, position_ids)

    # --- weights

    def attention_weights(self, model: nn.Module) -> list[AttentionWeights]:
        """Every layer's q/k/v/o per head in float64 (with biases and q/k norms), for initialization."""
        spec = self.describe(model.config)
        return [
            attention_weights(self.attention(layer), spec.num_heads, spec.num_kv_heads, spec.head_dim)
            for layer in self.layers(model)
        ]

    def trunk_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Everything but the attention modules (embeddings, norms, MLPs, LM head), under the names the student
        uses: models/hybrid.py follows the Llama layout, so here they are the teacher's own. A tied LM head may be
        absent."""
        attention = {id(self.attention(layer)) for layer in self.layers(model)}
        prefixes = tuple(f"{name}." for name, module in model.named_modules() if id(module) in attention)
        return {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(prefixes)}

    # --- running

    def document_mask(self, model: nn.Module, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The attention mask that keeps the packed documents of `position_ids` (restarting at 0) apart, in the
        form the model's attention implementation takes: "sdpa" a bool block-diagonal causal mask, "eager" the
        additive one in the model's dtype, "flex_attention" a FlexAttention BlockMask of the same boundaries,
        "flash_attention_*" none at all (HF's flash path splits packed rows by the restarting position_ids itself;
        not verified on CPU here)."""
        impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if impl == "flex_attention":  # a BlockMask: no quadratic mask, empty blocks skipped (long packed rows)
            return document_block_mask(position_ids)
        if impl == "sdpa":
            return packed_causal_mask(position_ids)
        if impl == "eager":
            return packed_causal_mask(position_ids, dtype=model.dtype)
        if impl.startswith("flash_attention"):
            return None
        raise ValueError(
            f"teacher attention {impl!r} has no packed-document mask here; use sdpa, eager, flex_attention or flash"
        )

    def forward_inputs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keyword arguments for the teacher's forward on a packed batch (`input_ids`; `position_ids` restarting
        at 0 per document) that keep its documents apart; no labels, so no HF loss. Restarting position ids
        alone do not isolate documents under sdpa or eager (tests/data/test_data_packing.py shows the leak)."""
        out = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        mask = self.document_mask(model, batch["position_ids"])
        if mask is not None:
            out["attention_mask"] = mask
        return out

    def final_hidden(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, D) hidden states after the final norm, the LM head's input, on a packed batch."""
        return self.decoder(model)(**self.forward_inputs(model, batch)).last_hidden_state

    def logits(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, V) next-token logits on a packed batch."""
        return model(**self.forward_inputs(model, batch)).logits

    def attention_forward(
        self, model: nn.Module, index: int, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Layer `index`'s attention alone on `hidden` (B, T, D), causal over each row (one document); RoPE at
        `position_ids` (B, T)."""
        cos, sin = self.rotary(model, hidden, position_ids)
        batch, length = position_ids.shape
        mask = self.document_mask(model, torch.arange(length, device=hidden.device).expand(batch, length))
        attention = self.attention(self.layers(model)[index])
        return attention(hidden, position_embeddings=(cos, sin), attention_mask=mask)[0]

    def capture(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], layers: list[int] | None = None
    ) -> TeacherTrace:
        """One no-grad forward recording, per decoder layer (all, or `layers`), its input, its attention output
        and its output, plus the final hidden states (models/teachers/capture.py)."""
        return capture_trace(self, model, batch, layers)
