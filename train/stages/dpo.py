"""dpo: sigmoid preference loss against a frozen reference (the KD student as it entered this stage).

loss = -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]) over a pair's answer
tokens (the prompt is masked). The implicit rewards beta * (log pi - log ref) give the logged reward margin
and preference accuracy. The reference sits in the frozen slot of DistillModule: never trained, never
checkpointed.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data.batch import shift_labels
from data.preferences import collate_pairs, preference_splits
from models import HybridForCausalLM
from train.runtime.ranks import is_rank_zero

from .context import Context
from .module import DistillModule

log = logging.getLogger(__name__)


def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over labelled tokens, per row (right padding needs no mask: it comes after)."""
    logits = model(input_ids=input_ids).logits.float()
    targets = shift_labels(labels)
    valid = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * valid).sum(-1)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """policy / reference: (2B,) log-probs, chosen rows first."""
    half = policy.shape[0] // 2
    rewards = beta * (policy - reference)
    margin = rewards[:half] - rewards[half:]
    return {
        "loss": -F.logsigmoid(margin).mean(),
        "margin": margin.mean().detach(),
        "accuracy": (margin > 0).float().mean().detach(),
        "chosen_reward": rewards[:half].mean().detach(),
        "rejected_reward": rewards[half:].mean().detach(),
    }


class DPOModule(DistillModule):
    def __init__(self, policy: HybridForCausalLM, reference: HybridForCausalLM, optim: dict, beta: float):
        super().__init__(reference, optim)
        self.policy = policy
        self.beta = beta

    def _terms(self, batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            reference = sequence_logprobs(self.teacher, batch["input_ids"], batch["labels"])
        policy = sequence_logprobs(self.policy, batch["input_ids"], batch["labels"])
        return dpo_terms(policy, reference, self.beta)

    def training_step(self, batch, batch_idx):
        terms = self._terms(batch)
        for key, value in terms.items():
            self.log(
                f"train/dpo/{key}" if key != "loss" else "train/loss",
                value.detach(),
                on_step=True,
                prog_bar=key in ("loss", "accuracy"),
            )
        self.log_throughput({"attention_mask": torch.ones_like(batch["input_ids"])})
        return terms["loss"]

    def validation_step(self, batch, batch_idx):
        terms = self._terms(batch)
        self.log("val/loss", terms["loss"], on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/dpo/margin", terms["margin"], on_epoch=True, sync_dist=True)
        self.log("val/dpo/accuracy", terms["accuracy"], on_epoch=True, sync_dist=True)


@torch.no_grad()
def preference_metrics(policy, reference, batches, beta: float) -> dict[str, float]:
    """Held-out reward margin and accuracy, plus how often the policy itself prefers the chosen answer."""
    margins, wins, likes, count = 0.0, 0.0, 0.0, 0
    for batch in batches:
        p = sequence_logprobs(policy, batch["input_ids"], batch["labels"])
        r = sequence_logprobs(reference, batch["input_ids"], batch["labels"])
        terms = dpo_terms(p, r, beta)
        half = p.shape[0] // 2
        margins += terms["margin"].item() * half
        wins += terms["accuracy"].item() * half
        likes += (p[:half] > p[half:]).float().sum().item()
        count += half
    return {"reward_margin": margins / count, "reward_accuracy": wins / count, "likelihood_accuracy": likes / count}


def run(ctx: Context) -> dict:
    """Preference tuning of the latest student against a frozen copy of itself."""
    c = ctx.cfg.dpo
    source = ctx.latest_student_dir()
    policy, reference = ctx.load_student(source), ctx.load_student(source)
    train_pairs, eval_pairs = preference_splits(list(c.sources), ctx.tokenizer, ctx.data_cfg.seq_len, ctx.cfg.seed)
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    collate = functools.partial(collate_pairs, pad_id=pad)
    batch = ctx.data_cfg.micro_batch_size
    generator = torch.Generator().manual_seed(ctx.cfg.seed)
    loaders = {
        "train": DataLoader(train_pairs, batch_size=batch, shuffle=True, generator=generator, collate_fn=collate),
        "val": DataLoader(eval_pairs, batch_size=batch, collate_fn=collate),
    }
    before = preference_metrics(policy, reference, loaders["val"], c.beta)
    module = DPOModule(policy, reference, c.optimizer(), c.beta)
    trainer = ctx.fit("dpo", module, None, loaders)
    if not is_rank_zero():
        return {}
    policy = ctx.trained_student("dpo", trainer, module.policy, "policy.", source)
    after = preference_metrics(policy, reference.to(policy.device), loaders["val"], c.beta)
    log.info("dpo held-out: before %s, after %s", before, after)
    ctx.save_student(policy, ctx.stage_dir("dpo") / "student")
    ctx.report["dpo"] = {
        "pairs": {"train": len(train_pairs), "held_out": len(eval_pairs)},
        "before": before,
        "after": after,
    }
    return {"before": before, "after": after}
