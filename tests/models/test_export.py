"""A saved student loads through AutoModelForCausalLM with trust_remote_code, without importing our code."""

import torch

from .tiny import run_exported, tiny_model


def test_save_and_load_with_auto_class(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "check.pt")
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "hybrid.py", "config.py", "ssd.py", "kernels.py"} <= files
    # A fresh interpreter whose sys.path does not hold this repository: only the exported files are used.
    run_exported(
        tmp_path,
        """
        with torch.no_grad():
            logits = model(check["ids"]).logits
        assert torch.allclose(logits, check["logits"], atol=1e-5), (logits - check["logits"]).abs().max()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "ties lost"
        out = model.generate(check["ids"], max_new_tokens=4, do_sample=False)
        assert out.shape == (2, 13)
        """,
    )
