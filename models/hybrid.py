"""The hybrid decoder: teacher-style pre-norm blocks whose mixer is MLA or Mamba2, and its causal LM.

Reads top to bottom: MLP, decoder layer, pretrained-model base, model, causal LM. Module names match
Hugging Face Llama's (model.embed_tokens, model.layers.i.{input_layernorm, post_attention_layernorm, mlp},
model.norm, lm_head) so the teacher's weights copy by name; the mixer is built by its kind (models/mixers.py)
and kept under the kind's attribute name: `self_attn` (MLA) or `mamba` (Mamba2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import HybridCache
from .compile import compiled_in_training
from .config import HybridConfig
from .documents import (
    Documents,
    document_block_mask,
    documents_from_positions,
    positions_from_attention_mask,
    use_block_mask,
)
from .mixer_kind import MixerKind
from .mixers import kind_of_module, mixer_kind
from .norm import GatedRMSNorm, RMSNorm
from .rope import rope_cos_sin, rope_inv_freq


@compiled_in_training
def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class MLP(nn.Module):
    """The teacher's gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.silu = config.hidden_act == "silu"  # Llama, Qwen, Mistral: a compilable function (models/compile.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_gate(gate, up) if self.silu else self.act_fn(gate) * up)


class HybridDecoderLayer(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.mixer_types[layer_idx]  # the mixer kind's name
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        kind = mixer_kind(self.layer_type)
        setattr(self, kind.attribute, kind.module(config, layer_idx))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    @property
    def kind(self) -> MixerKind:
        return mixer_kind(self.layer_type)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.kind.attribute)

    def mix(self, hidden, cos, sin, docs: Documents, cache=None) -> torch.Tensor:
        """The mixer's output on the normed input (what layer-wise distillation also aligns)."""
        return self.kind.call(self.mixer, self.input_layernorm(hidden), cos, sin, docs, cache)

    def forward_with_mixer(self, hidden, cos, sin, docs: Documents, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer output, mixer output): both are targets of layer-wise distillation."""
        mixed = self.mix(hidden, cos, sin, docs, cache)
        hidden = hidden + mixed
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), mixed

    def forward(self, hidden, cos, sin, docs: Documents, cache=None, with_mixer: bool = False):
        """The layer output, or (layer output, mixer output) with `with_mixer` (layer-wise distillation calls the
        module itself, so hooks such as ZeRO-3's parameter gathering see the call)."""
        out, mixed = self.forward_with_mixer(hidden, cos, sin, docs, cache)
        return (out, mixed) if with_mixer else out


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Random init for from-scratch models; `init.*` skips tensors already loaded from a checkpoint."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            init.ones_(module.weight)
        elif (kind := kind_of_module(module)) is not None and kind.init_weights is not None:
            kind.init_weights(module, self.config)  # e.g. Mamba2's dt_bias, A_log, D
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                init.zeros_(module.bias)


# transformers renamed the output field and forward argument `past_key_values` to `cache` within 5.x;
# outputs use whichever name the installed version declares, and forward accepts both.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, T, head_dim/2) of the teacher's full RoPE table; MLA layers pick their pairs."""
        c = self.config
        inv_freq, scaling = rope_inv_freq(c.rope_parameters, c.head_dim, c.max_position_embeddings, position_ids.device)
        return rope_cos_sin(position_ids, inv_freq, scaling)

    def documents(self, position_ids: torch.Tensor, past: int = 0, cache: HybridCache | None = None) -> Documents:
        """The packed documents of `position_ids` as every layer takes them; without a cache, rows of several
        documents get the BlockMask that `config.document_masking` asks for on this device (ILD calls the layers
        one by one with it)."""
        docs = documents_from_positions(position_ids, past, cache.doc_start if cache is not None else None)
        if (
            cache is None
            and not docs.single_document
            and use_block_mask(self.config.document_masking, position_ids.device)
        ):
            docs.block_mask = document_block_mask(position_ids)
        return docs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        past = cache.seen_tokens if cache is not None else 0
        if cache is not None:
            cache.check_room(length)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "attention_mask must be 2D (batch, past+new tokens), got shape "
                f"{tuple(attention_mask.shape)}; "
                "express packed documents through position_ids that restart at 0"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_attention_mask(attention_mask, length)
            else:
                position_ids = torch.arange(past, past + length, device=hidden.device).expand(batch, length)
        docs = self.documents(position_ids, past, cache)
        cos, sin = self.rope(position_ids)
        all_hidden = [hidden] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, cos, sin, docs, layer_cache)
            else:
                hidden = layer(hidden, cos, sin, docs, layer_cache)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        if cache is not None:
            cache.advance(length, docs.doc_start[:, -1])
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_FIELD: cache},
        )


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def make_cache(self, batch_size: int, max_length: int | None = None) -> HybridCache:
        """An empty cache on this model's device and dtype; `max_length` preallocates it (CUDA-graph decoding).

        Pass a preallocated one to generate() as `cache=model.make_cache(batch, prompt_len + max_new_tokens)`.
        """
        return HybridCache(self.config, batch_size, dtype=self.dtype, device=self.device, max_length=max_length)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """HF causal-LM forward. `labels` are shifted inside (labels[t] is the target of logits[t-1]);
        -100 marks tokens without loss. A cache is created when use_cache=True and none is given."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            cache = self.make_cache(batch)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            output_hidden_states=bool(output_hidden_states),
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: cache})

    # --- generation -------------------------------------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache; prepare_inputs_for_generation makes ours

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: HybridCache | None = None,
        past_key_values: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = self.make_cache(input_ids.shape[0])
        past = cache.seen_tokens if cache is not None else 0
        new_ids = input_ids[:, past:]  # generate() passes the whole sequence; the cache holds the rest
        if position_ids is not None:
            position_ids = position_ids[:, -new_ids.shape[1] :]
        elif attention_mask is not None:
            position_ids = positions_from_attention_mask(attention_mask, new_ids.shape[1])
        inputs = {"position_ids": position_ids, "cache": cache, "use_cache": use_cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = new_ids
        for key in ("output_hidden_states", "return_dict", "logits_to_keep"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _reorder_cache(self, cache: HybridCache, beam_idx: torch.LongTensor) -> HybridCache:
        cache.reorder_cache(beam_idx)
        return cache
