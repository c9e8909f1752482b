"""Long packed rows on the GPU: documents kept apart by a FlexAttention BlockMask (the CUDA default) give the
numbers of the dense-mask reference, for the student (logits and gradients, bf16) and the Hugging Face teacher,
at 8K tokens with documents that span blocks. Errors are printed before the asserts (the device log is the record).
"""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.sizes import TINY_LLAMA, ZEBRA_1B_MAMBA, ZEBRA_1B_MLA
from models.teachers import adapter_for
from tests.models.tiny import rel_err, tiny_model

DEVICE = "cuda"
LENGTH = 8192
DOCS = [(3000, 200, 4992), (8192,), (129, 4000, 1, 4062)]  # block-spanning, one whole row, a 1-token document
TOL_BF16 = 3e-2  # bf16 logits / gradients against the same model with the dense mask


def _positions() -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS]).to(DEVICE)


def _student(masking: str):
    torch.manual_seed(0)
    return tiny_model(
        mixers=("mla", "mamba", "mla"),
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        mla=ZEBRA_1B_MLA,
        mamba={**ZEBRA_1B_MAMBA, "chunk_size": 256},
        max_position_embeddings=LENGTH,
        document_masking=masking,
    ).to(DEVICE)


def test_student_block_masks_equal_dense_masks_at_8k():
    positions = _positions()
    ids = torch.randint(0, 97, positions.shape, device=DEVICE)
    results = {}
    for masking in ("dense", "flex"):
        model = _student(masking).train()
        with torch.autocast("cuda", torch.bfloat16):
            logits = model(ids, position_ids=positions).logits.float()
        logits.square().mean().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results[masking] = logits.detach(), grads
        if masking == "flex":  # isolation itself: row 0's last document (4,992 tokens) run alone
            start = sum(DOCS[0][:-1])
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                alone = model(ids[:1, start:], position_ids=positions[:1, start:]).logits.float()
            alone_err = rel_err(logits[0, start:].detach(), alone[0])
    logit_err = rel_err(results["flex"][0], results["dense"][0])
    grad_err = max(rel_err(results["flex"][1][n], g) for n, g in results["dense"][1].items())
    print(f"student 8K flex vs dense (bf16): logits rel err {logit_err:.2e}, worst gradient rel err {grad_err:.2e}; "
          f"a packed document vs the same document alone: {alone_err:.2e}")  # fmt: skip
    assert logit_err < TOL_BF16 and grad_err < TOL_BF16 and alone_err < TOL_BF16


def test_teacher_flex_attention_equals_the_dense_mask_at_8k():
    shape = {**TINY_LLAMA, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "head_dim": 64}
    config = LlamaConfig(**{**shape, "num_hidden_layers": 2, "max_position_embeddings": LENGTH})
    torch.manual_seed(0)
    # A config each: _from_config sets the attention implementation on the config it is given, so two models of one
    # config object would both run the last one set (an H100 run of this test compared flex with flex: 0.0).
    sdpa, flex = (
        LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=kind, dtype=torch.bfloat16)
        for kind in ("sdpa", "flex_attention")
    )
    assert (sdpa.config._attn_implementation, flex.config._attn_implementation) == ("sdpa", "flex_attention")
    sdpa, flex = sdpa.to(DEVICE).eval(), flex.to(DEVICE).eval()
    flex.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (len(DOCS), LENGTH), device=DEVICE)
    batch = {"input_ids": ids, "position_ids": _positions()}
    with torch.no_grad():
        expected = adapter_for(sdpa).logits(sdpa, batch).float()
        got = adapter_for(flex).logits(flex, batch).float()
    err = rel_err(got, expected)
    print(f"teacher 8K flex_attention vs dense-mask sdpa (bf16): logits rel err {err:.2e}")
    assert err < TOL_BF16
