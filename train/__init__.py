"""Training entry points (the distillation pipeline lands here: ILD, KD, DPO, eval, export)."""
