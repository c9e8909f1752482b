"""DPO: sigmoid preference loss against a frozen reference (the KD student as it entered this stage).

loss = -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]) over a pair's answer
tokens (the prompt is masked). The implicit rewards beta * (log pi - log ref) give the logged reward margin
and preference accuracy. The reference sits in the frozen slot of DistillModule: never trained, never
checkpointed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.batch import shift_labels
from models import HybridForCausalLM

from .distill_module import DistillModule


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
