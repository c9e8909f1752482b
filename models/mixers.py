"""The mixer registry: kind name -> MixerKind (models/mixer_kind.py), one entry per models/mixer_<name>.py.

Everything outside the mixer files asks this registry rather than naming a kind. Adding a kind: write its file
ending in a MixerKind, add it to MIXERS, give it a `student.<name>` config group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .mixer_gdn import GDN_KIND
from .mixer_kind import MixerKind
from .mixer_mamba2 import MAMBA2_KIND
from .mixer_mla import MLA_KIND

MIXERS: dict[str, MixerKind] = {kind.name: kind for kind in (MLA_KIND, MAMBA2_KIND, GDN_KIND)}

# `student.mla_layers` (the outside contract) places PLACED_KIND; every other layer is FILL_KIND. SMART scores how
# much the placed kind is worth per layer, and budgets count its cache bytes.
PLACED_KIND = MLA_KIND
FILL_KIND = MAMBA2_KIND


def mixer_kind(name: str) -> MixerKind:
    """The registry entry of `name`; a ValueError naming the allowed kinds otherwise."""
    kind = MIXERS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"mixer kind {name!r} is unknown; allowed: {list(MIXERS)}")
    return kind


def kind_of_module(module: nn.Module) -> MixerKind | None:
    """The kind whose module `module` is, or None (e.g. a teacher's attention)."""
    return next((kind for kind in MIXERS.values() if isinstance(module, kind.module)), None)


def candidate_kinds(fill_kinds: Sequence[str] | None = None, key: str = "select.fill_kinds") -> list[str]:
    """Kinds that ILD aligns as whole candidate students and SMART compares: PLACED_KIND, then `fill_kinds` (the
    kinds a layer not placed may take, `select.fill_kinds`); None: the kinds marked `candidate` (the default set).
    A ValueError naming `key`, the value and the allowed kinds otherwise."""
    if fill_kinds is None:
        return [name for name, kind in MIXERS.items() if kind.candidate]
    allowed = [name for name in MIXERS if name != PLACED_KIND.name]
    fills = [fill_kinds] if isinstance(fill_kinds, str) else list(fill_kinds)
    if not fills or len(set(fills)) != len(fills) or any(name not in allowed for name in fills):
        raise ValueError(f"{key}={fills} is invalid: one or more distinct kinds of {allowed}")
    return [PLACED_KIND.name, *fills]


def mixer_map(num_layers: int, placed_layers: Sequence[int]) -> list[str]:
    """Per layer the kind name: PLACED_KIND at `placed_layers`, FILL_KIND elsewhere."""
    placed = set(placed_layers)
    return [PLACED_KIND.name if i in placed else FILL_KIND.name for i in range(num_layers)]


def check_mixer_types(mixer_types: Any, num_layers: int, key: str = "mixer_types") -> list[str]:
    """A per-layer list of kind names, checked: one entry per layer, every entry a registered kind; or a map
    {layer: kind name} whose other layers are FILL_KIND. Errors name `key`, the offending entries and what is
    allowed."""
    if isinstance(mixer_types, Mapping):
        bad = [i for i in mixer_types if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"{key} names layers {bad}; allowed: layer indices 0..{num_layers - 1}")
        mixer_types = [mixer_types.get(i, FILL_KIND.name) for i in range(num_layers)]
    if isinstance(mixer_types, str) or not isinstance(mixer_types, Sequence):
        raise ValueError(f"{key}={mixer_types!r} is invalid: a list of one mixer kind per layer, of {list(MIXERS)}")
    kinds = list(mixer_types)
    if len(kinds) != num_layers:
        raise ValueError(f"{key} has {len(kinds)} entries, num_hidden_layers={num_layers}")
    bad = [t for t in kinds if not (isinstance(t, str) and t in MIXERS)]
    if bad:
        raise ValueError(f"{key} contains {bad}; allowed: {list(MIXERS)}")
    return kinds


__all__ = [
    "FILL_KIND",
    "MIXERS",
    "PLACED_KIND",
    "candidate_kinds",
    "check_mixer_types",
    "kind_of_module",
    "mixer_kind",
    "mixer_map",
]
