"""Which documents go where: held-out / ILD / KD splits per source, then the weighted mixture.

Both are pure functions of the seed and the sources' document lengths, so every rank and every
rerun computes the same document order without talking to each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from data.config import DataConfig

log = logging.getLogger(__name__)

VERSION = 1  # bump when the split or mixture rule changes: invalidates cached rows
PHASES = ("ild", "kd", "eval")
_SALT = {"split": 1, "ild": 2, "kd": 3, "eval": 4}  # independent random streams from one seed


def split_documents(num_docs: int, cfg: DataConfig, source_index: int) -> dict[str, np.ndarray]:
    """Disjoint document indices of one source for "eval", "ild" and "kd".

    The held-out set is drawn first, so changing ild_fraction never moves a document into it.
    Sources are told apart by their position in the config: reordering them redraws the splits.
    """
    perm = np.random.default_rng([cfg.seed, _SALT["split"], source_index]).permutation(num_docs)
    n_eval = round(num_docs * cfg.eval_fraction)
    if cfg.eval_fraction > 0 and n_eval == 0 and num_docs >= 2:
        n_eval = 1  # a requested held-out set is never silently empty
    rest = perm[n_eval:]
    n_ild = round(len(rest) * cfg.ild_fraction)
    return {"eval": perm[:n_eval], "ild": rest[:n_ild], "kd": rest[n_ild:]}


@dataclass
class Mixture:
    """Documents of one phase in training order."""

    source: np.ndarray  # (N,) source index of each document
    doc: np.ndarray  # (N,) document index within its source


def _take(candidates: np.ndarray, sizes: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Shuffled candidates (reshuffled on each repetition) until their sizes reach `target`."""
    total = float(sizes[candidates].sum())
    reps = max(1, int(np.ceil(target / total - 1e-9)))
    order = np.concatenate([rng.permutation(candidates) for _ in range(reps)])
    cum = np.cumsum(sizes[order])
    k = int(np.searchsorted(cum, target * (1 - 1e-9), side="left")) + 1
    return order[: min(k, len(order))]


def mix(
    candidates: list[np.ndarray], lengths: list[np.ndarray], weights: list[float], cfg: DataConfig, phase: str
) -> Mixture:
    """Draw each source's share of the phase by weight, then interleave all documents at random.

    Shares are exact up to one document: source i contributes weight_i / sum(weights) of the tokens
    (mixture_unit="tokens") or documents ("documents"). With "first_exhausted" the source that runs
    out first sets the size and no document repeats; with "all_exhausted" every document appears and
    sources whose share asks for more than they have are repeated (reshuffled each time).
    """
    rng = np.random.default_rng([cfg.seed, _SALT[phase]])
    sizes = [ln if cfg.mixture_unit == "tokens" else np.ones_like(ln) for ln in lengths]
    avail = np.array([float(s[c].sum()) for s, c in zip(sizes, candidates, strict=True)])
    w = np.array(weights, dtype=np.float64)
    if not avail.any():
        return Mixture(np.zeros(0, np.int64), np.zeros(0, np.int64))
    if (avail == 0).any():
        log.warning(
            "phase %s: sources %s have no documents in this phase and are left out",
            phase,
            np.flatnonzero(avail == 0).tolist(),
        )
        w = np.where(avail > 0, w, 0.0)
    p = w / w.sum()
    live = p > 0
    scale = avail[live] / p[live]
    total = scale.min() if cfg.mixture_stop == "first_exhausted" else scale.max()
    src, doc = [], []
    for i in np.flatnonzero(live):
        chosen = _take(candidates[i], sizes[i], p[i] * total, rng)
        src.append(np.full(len(chosen), i, np.int64))
        doc.append(chosen.astype(np.int64))
    src_all, doc_all = np.concatenate(src), np.concatenate(doc)
    order = rng.permutation(len(src_all))
    return Mixture(src_all[order], doc_all[order])
