"""HybridCache: the student's compressed decoding state, one slot per layer.

MLA layers keep only the KV latent (kv_lora_rank values per token) and the rotated RoPE key
(rope heads x qk_rope_head_dim per token); keys and values are never decompressed from it (decoding uses
the absorbed form). Mamba2 layers keep a constant-size conv state (last d_conv-1 inputs) and SSM state.
The object is passed through `forward(cache=...)` like a transformers cache; `generate()` creates one.
Each kind's slot class and how it is made live in the kind's file (models/mixer_*.py).

Two MLA storage modes, one class: growing (default; each call appends with torch.cat) or preallocated
(`max_length=N`: fixed (B, N, ...) buffers written in place at a device-side position counter). The
preallocated mode never changes a tensor's address and never reads the position on the host, so a decode
step over it can be captured in a CUDA graph and replayed; MLA masks the slots not yet written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .mixer_kind import CacheRequest, CacheSlot
from .mixers import mixer_kind

if TYPE_CHECKING:
    from .config import HybridConfig


class HybridCache:
    """One slot per layer, made by the layer's mixer kind (MLA latents, Mamba2 states), plus the bookkeeping
    they share: tokens seen, the preallocated write position, where each row's document starts."""

    is_compileable = False  # read by transformers' generate()
    is_croppable = False

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether its state has constant size (read by generate() when a user passes a cache)."""
        return [mixer_kind(name).constant_state for name in self.config.mixer_types]

    def __init__(
        self,
        config: HybridConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        ssm_state_dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ):
        """`max_length` preallocates per-token buffers (MLA) for that many tokens (prompt + generated), written in
        place; `ssm_state_dtype` is the dtype of recurrent state (Mamba2's SSM state)."""
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length
        self.seen_tokens = 0  # host-side count; a replayed CUDA graph advances only `position`
        self.position = None if max_length is None else torch.zeros((), dtype=torch.long, device=device)
        # Absolute index where each row's current document starts (left padding, packed prompts).
        self.doc_start = torch.zeros(batch_size, dtype=torch.long, device=device)
        request = CacheRequest(batch_size, dtype, device, ssm_state_dtype, max_length, self.position)
        self.layers: list[CacheSlot] = [
            mixer_kind(name).make_cache(config, i, request) for i, name in enumerate(config.mixer_types)
        ]

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

    def __getitem__(self, layer_idx: int) -> CacheSlot:
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers:
            layer.reorder(beam_idx)
        self.doc_start = self.doc_start.index_select(0, beam_idx.to(self.doc_start.device))

    batch_select_indices = reorder_cache

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(self.batch_size, device=self.doc_start.device).repeat_interleave(repeats)
        self.reorder_cache(index)
        self.batch_size *= repeats
