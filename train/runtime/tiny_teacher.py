"""The `tiny` preset's teacher: a small Llama trained here on the embedded corpus (about a minute on two
CPU cores), saved like a Hub model (config, safetensors, tokenizer) and reused while its settings match."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from data.config import DataConfig
from data.corpus import tiny_tokenizer_path
from data.datamodule import DistillDataModule
from models.teachers import adapter_for
from train.config import tiny_teacher_positions

log = logging.getLogger(__name__)


def tiny_teacher_dir(settings: dict, data_cfg: DataConfig) -> Path:
    shape = {k: v for k, v in settings.items() if k != "cache_dir"}
    positions = tiny_teacher_positions(settings["seq_len"], data_cfg.seq_len)
    # Everything the trained weights depend on; max positions too, so a longer data.seq_len never reuses a
    # teacher that cannot take it.
    key = json.dumps(
        {"teacher": shape, "data": repr(data_cfg.sources), "seed": data_cfg.seed, "positions": positions},
        sort_keys=True,
    )
    return Path(settings["cache_dir"]) / f"tiny_teacher_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def ensure_tiny_teacher(settings: dict, data_cfg: DataConfig, seed: int) -> Path:
    """Path of a trained tiny teacher; trains and saves one (atomically) if none with these settings exists.
    `settings` is `teacher.tiny` (shape, steps, lr, batch_size, seq_len, cache_dir)."""
    path = tiny_teacher_dir(settings, data_cfg)
    if (path / "config.json").exists():
        log.info("reusing the tiny teacher at %s", path)
        return path
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_path()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_layers"],
        num_attention_heads=settings["num_heads"],
        num_key_value_heads=settings["num_kv_heads"],
        max_position_embeddings=tiny_teacher_positions(settings["seq_len"], data_cfg.seq_len),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    data_cfg = dataclasses.replace(
        data_cfg, seq_len=settings["seq_len"], micro_batch_size=settings["batch_size"], tokenizer=None
    )
    data = DistillDataModule(data_cfg, tokenizer, phase="kd")
    loader = data.train_dataloader()
    steps, lr = settings["train_steps"], settings["lr"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s / steps, 1))))
    )
    model.train()
    start = time.perf_counter()
    batches = _cycle(loader)
    for step in range(steps):
        batch = next(batches)
        loss = model(**adapter_for(model).forward_inputs(model, batch), labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "tiny teacher step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - start
            )
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)  # atomic: a half-written teacher is never reused
    except OSError:
        if not (path / "config.json").exists():
            raise
        # Another run sharing this cache published the same teacher first (same settings, same seed): use it.
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("another run saved the tiny teacher at %s first; using it", path)
    return path


def _cycle(loader):
    """Epoch after epoch of the stream (the sampler continues where the last pass ended)."""
    while True:
        yield from loader
