"""HybridCache: the student's compressed decoding state, one slot per layer.

MLA layers keep only the KV latent (kv_lora_rank values per token) and the rotated RoPE key
(rope heads x qk_rope_head_dim per token); keys and values are never decompressed from it (decoding uses
the absorbed form). Mamba2 layers keep a constant-size conv state (last d_conv-1 inputs) and SSM state.
The object is passed through `forward(cache=...)` like a transformers cache; `generate()` creates one.

Two MLA storage modes, one class: growing (default; each call appends with torch.cat) or preallocated
(`max_length=N`: fixed (B, N, ...) buffers written in place at a device-side position counter). The
preallocated mode never changes a tensor's address and never reads the position on the host, so a decode
step over it can be captured in a CUDA graph and replayed; MLA masks the slots not yet written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HybridConfig


@dataclass
class MLALayerCache:
    latent: torch.Tensor | None = None  # (B, S, kv_lora_rank)
    rope_key: torch.Tensor | None = None  # (B, S, rope_heads, qk_rope_head_dim), already rotated
    # Preallocated mode: the model's shared 0-d device counter of tokens written (S above is then max_length).
    position: torch.Tensor | None = None

    def update(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's tokens; return everything cached so far (preallocated: the whole buffers)."""
        if self.position is not None:
            index = self.position + torch.arange(latent.shape[1], device=latent.device)
            self.latent.index_copy_(1, index, latent.to(self.latent.dtype))
            self.rope_key.index_copy_(1, index, rope_key.to(self.rope_key.dtype))
        elif self.latent is None:
            self.latent, self.rope_key = latent, rope_key
        else:
            self.latent = torch.cat([self.latent, latent], dim=1)
            self.rope_key = torch.cat([self.rope_key, rope_key], dim=1)
        return self.latent, self.rope_key

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.latent, self.rope_key) if t is not None]


@dataclass
class MambaLayerCache:
    conv_state: torch.Tensor  # (B, conv_dim, d_conv - 1), the last inputs of the causal conv
    ssm_state: torch.Tensor  # (B, nheads, headdim, d_state), fp32 so long decodes do not drift

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_state, self.ssm_state]


class HybridCache:
    """Per-layer MLA latents and Mamba2 states for a batch, plus the bookkeeping both need."""

    is_compileable = False  # read by transformers' generate()
    is_croppable = False

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether its state has constant size (read by generate() when a user passes a cache)."""
        return [kind == "mamba" for kind in self.config.mixer_types]

    def __init__(
        self,
        config: HybridConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        ssm_state_dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ):
        """`max_length` preallocates MLA buffers for that many tokens (prompt + generated) and writes in place."""
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length
        self.seen_tokens = 0  # host-side count; a replayed CUDA graph advances only `position`
        self.position = None if max_length is None else torch.zeros((), dtype=torch.long, device=device)
        # Absolute index where each row's current document starts (left padding, packed prompts).
        self.doc_start = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.layers: list[MLALayerCache | MambaLayerCache] = []
        d_conv, dims = config.mamba_config.d_conv, config.mamba_dims
        for kind in config.mixer_types:
            if kind == "mla":
                self.layers.append(self._mla_layer(len(self.layers), dtype, device))
                continue
            conv_state = torch.zeros(batch_size, dims.conv_dim, d_conv - 1, dtype=dtype, device=device)
            ssm_state = torch.zeros(
                batch_size, dims.nheads, dims.headdim, dims.d_state, dtype=ssm_state_dtype, device=device
            )
            self.layers.append(MambaLayerCache(conv_state=conv_state, ssm_state=ssm_state))

    def _mla_layer(self, layer_idx: int, dtype: torch.dtype, device) -> MLALayerCache:
        if self.max_length is None:
            return MLALayerCache()
        c, shape = self.config.mla_config, (self.batch_size, self.max_length)
        rope_heads = c.num_rope_heads(self.config.num_key_value_heads)
        return MLALayerCache(
            latent=torch.zeros(*shape, c.rank(layer_idx), dtype=dtype, device=device),
            rope_key=torch.zeros(*shape, rope_heads, c.qk_rope_head_dim, dtype=dtype, device=device),
            position=self.position,
        )

    def check_room(self, length: int) -> None:
        """Raise before writing `length` more tokens past a preallocated cache's end."""
        if self.max_length is not None and self.seen_tokens + length > self.max_length:
            raise ValueError(
                f"HybridCache(max_length={self.max_length}) holds {self.seen_tokens} tokens; "
                f"{length} more do not fit: allocate it with a larger max_length"
            )

    def advance(self, length: int, doc_start: torch.Tensor) -> None:
        """After a forward of `length` tokens: move both counters; doc_start is updated in place (graph-safe)."""
        self.seen_tokens += length
        if self.position is not None:
            self.position.add_(length)
        self.doc_start.copy_(doc_start)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> MLALayerCache | MambaLayerCache:
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers:
            if isinstance(layer, MLALayerCache):
                if layer.latent is not None:
                    layer.latent = layer.latent.index_select(0, beam_idx.to(layer.latent.device))
                    layer.rope_key = layer.rope_key.index_select(0, beam_idx.to(layer.rope_key.device))
            else:
                layer.conv_state = layer.conv_state.index_select(0, beam_idx.to(layer.conv_state.device))
                layer.ssm_state = layer.ssm_state.index_select(0, beam_idx.to(layer.ssm_state.device))
        self.doc_start = self.doc_start.index_select(0, beam_idx.to(self.doc_start.device))

    batch_select_indices = reorder_cache

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(self.batch_size, device=self.doc_start.device).repeat_interleave(repeats)
        self.reorder_cache(index)
        self.batch_size *= repeats
