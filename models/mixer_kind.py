"""MixerKind: what the model, the cache, the accounting and initialization need to know about one kind of mixer.

A kind is one file, `models/mixer_<name>.py` (the module, its settings, its cache slot, its initialization from a
teacher attention layer), ending in its `MixerKind`; `models/mixers.py` collects them in the registry `MIXERS`.
Code outside the mixer files asks the kind (`kind.call(...)`, `kind.cache_bytes(...)`) instead of switching on its
name, as transformers' models ask `ALL_ATTENTION_FUNCTIONS` for an attention implementation.

This file imports no mixer (each mixer file imports it), so the registry has no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .attention_weights import AttentionWeights
    from .config import HybridConfig
    from .documents import Documents
    from .teacher_spec import TeacherSpec


@dataclass(frozen=True)
class CacheBytes:
    per_token: int  # bytes added per token per sequence
    constant: int  # bytes per sequence, independent of length

    def total(self, tokens: int, batch: int = 1) -> int:
        return batch * (self.per_token * tokens + self.constant)


@dataclass(frozen=True)
class CacheRequest:
    """What `HybridCache` asks of every layer's slot."""

    batch_size: int
    dtype: torch.dtype  # of growing state (latents, conv inputs)
    device: torch.device | str | None
    state_dtype: torch.dtype  # of recurrent state (fp32, so long decodes do not drift)
    max_length: int | None  # set: preallocate per-token buffers for this many tokens and write in place
    position: torch.Tensor | None  # with max_length: the cache's shared 0-d device counter of tokens written


class CacheSlot(Protocol):
    """One layer's decoding state."""

    def tensors(self) -> list[torch.Tensor]: ...

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search)."""


class Calibration(Protocol):
    """Fits, on real text, what a kind's initialization from attention cannot set from the weights alone
    (models/init/calibrate.py feeds it every calibration batch, then applies it once)."""

    def add(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        docs: Documents,
        target: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        """One batch: the mixer's normed input (B, T, D), as `MixerKind.call` takes it, the teacher attention's
        output on it (B, T, D) and the real (not padding) tokens (B, T)."""

    def apply(self) -> dict[str, float]:
        """Write the fitted weights into the module; report entries (e.g. the relative error before and after)."""


@dataclass(frozen=True)
class InitOptions:
    """Initialization choices from `student.*` that are not model settings; each kind reads the ones it has."""

    lossless: bool = False  # student.mla.lossless: MLA settings that reproduce the teacher's GQA exactly
    energy: float | None = None  # student.mla.energy: per-layer latent ranks keeping this share of the spectrum
    rope_pairs: str = "energy"  # student.mla.rope_pairs: which teacher frequency pairs stay RoPE
    conv_init: str = "identity"  # student.mamba.conv_init


@dataclass(frozen=True)
class MixerKind:
    """One kind of sequence mixer. `name` is its value in `HybridConfig.mixer_types` and the key under which
    config.json (and the `student.*` config) keeps its settings; both are part of saved students, never renamed."""

    name: str
    module: type[nn.Module]  # built as module(config, layer_idx)
    attribute: str  # the decoder layer's attribute holding it: state-dict keys model.layers.<i>.<attribute>.*
    settings: type  # dataclass of its dimensions and switches
    # Settings against the model's shapes; raises ValueError naming "<name>.<key>".
    validate: Callable[[Any, HybridConfig], None]
    # The uniform forward: (module, normed hidden (B, T, D), cos, sin (B, T, head_dim/2), docs, cache slot or None).
    call: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Documents, CacheSlot | None], torch.Tensor]
    make_cache: Callable[[HybridConfig, int, CacheRequest], CacheSlot]  # (config, layer_idx, request)
    # Bytes its cache slot of layer `layer_idx` holds: (config, layer_idx, dtype, state_dtype). Equals make_cache's.
    cache_bytes: Callable[[HybridConfig, int, torch.dtype, torch.dtype], CacheBytes]
    # Forward FLOPs per token beyond its nn.Linear layers, at a mean attended context (models/flops.py's rules).
    extra_flops: Callable[[nn.Module, float], int]
    # Random init of what nn.Linear / nn.Conv1d / norm init does not cover (HybridPreTrainedModel._init_weights).
    init_weights: Callable[[nn.Module, HybridConfig], None] | None
    # The user's settings dict completed from the teacher (biases, head sizes, ...) -> the settings dataclass.
    student_settings: Callable[[TeacherSpec, dict, InitOptions], Any]
    # Raise ValueError naming the `student.<name>.<key>` that cannot be initialized from this teacher.
    check_fits: Callable[[TeacherSpec, Any, InitOptions], None]
    # Before the student exists: choices made from the teacher's weights of this kind's layers ({layer: weights}).
    # May update the kind's settings in `config`; returns per-layer data handed to init_from_attention.
    plan_init: Callable[[HybridConfig, TeacherSpec, dict[int, AttentionWeights], InitOptions], dict[int, Any]]
    # Write the module's weights from the teacher layer's attention: (module, weights, config, planned, options)
    # -> report entries (relative errors of the maps it reproduces, ranks, ...).
    init_from_attention: Callable[[nn.Module, AttentionWeights, HybridConfig, Any, InitOptions], dict[str, Any]]
    reproduces_attention: bool  # initialized as the teacher's attention itself: init reports its output error
    # After init_from_attention, a fit on the teacher's attention outputs over real text (module -> Calibration);
    # None: nothing of the kind is left to fit.
    calibration: Callable[[nn.Module], Calibration] | None
    constant_state: bool  # its cache does not grow with the context (HybridCache.is_linear)
    # In the default candidate set (models/mixers.py candidate_kinds(None)): ILD aligns an all-<name> student and
    # SMART compares it; `select.fill_kinds` names the set of a run.
    candidate: bool = True


def config_from_dict(cls, value: Any):
    """A settings dataclass from a dict (or the dataclass itself), naming unknown keys."""
    if isinstance(value, cls):
        return value
    value = dict(value or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(known)}")
    return cls(**value)
