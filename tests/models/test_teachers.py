"""Teacher adapters: every registered family, built tiny from its transformers config, saved and loaded the way users
load teachers (`load_teacher`), then read only through its adapter and checked against the model itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from data.batch import collate_rows
from models.sizes import TINY_LLAMA
from models.teachers import (
    ADAPTERS,
    SUPPORTED_ARCHITECTURES,
    AttentionWeights,
    adapter_for,
    adapter_for_config,
    describe_teacher,
    load_teacher,
)

from .tiny import rel_err

COMMON = {
    **TINY_LLAMA,
    "vocab_size": 101,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON, attention_bias=True),  # biases on q/k/v and o
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3": lambda: Qwen3Config(**{**COMMON, "tie_word_embeddings": True}),  # q/k norms, tied head
}
DOC_LENS = [[5, 12, 7], [20, 9]]  # two packed rows; the first is padded to SEQ_LEN
SEQ_LEN = 29


def saved_teacher(family: str, tmp_path, attn_implementation: str = "sdpa"):
    """(model, spec): random weights with visible biases and norm weights, saved, then loaded by `load_teacher`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.3)
    path = tmp_path / family
    model.save_pretrained(path)
    return load_teacher(str(path), attn_implementation=attn_implementation)


def packed_batch() -> tuple[dict[str, torch.Tensor], list[list[np.ndarray]]]:
    """A collated packed batch (data/batch.py) and each row's documents."""
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, COMMON["vocab_size"], n) for n in lens] for lens in DOC_LENS]
    rows = [
        {"input_ids": np.concatenate(d), "loss_mask": np.ones(sum(lens), bool), "doc_lens": lens}
        for d, lens in zip(docs, DOC_LENS, strict=True)
    ]
    return collate_rows(rows, SEQ_LEN, pad_id=0), docs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_by_hand(
    w: AttentionWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor, eps: float
) -> torch.Tensor:
    """GQA attention from the adapter's per-head weights alone, in float64, causal within each document."""
    x, cos, sin = x.double(), cos.double()[:, None], sin.double()[:, None]  # cos/sin (B, 1, T, hd)

    def project(weight, bias, norm):
        out = torch.einsum("btd,hed->bhte", x, weight)  # (B, H, T, hd)
        if bias is not None:
            out = out + bias[None, :, None, :]
        return out if norm is None else rms_norm(out, norm, eps)

    q = project(w.q, w.q_bias, w.q_norm)
    k = project(w.k, w.k_bias, w.k_norm)
    v = project(w.v, w.v_bias, None)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    doc = torch.cumsum(position_ids == 0, dim=1)  # (B, T)
    t = x.shape[1]
    keep = (doc[:, :, None] == doc[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).flatten(2)  # (B, T, H * hd)
    out = out @ w.o.T
    return out if w.o_bias is None else out + w.o_bias


def test_the_registry_is_keyed_by_model_type_and_finds_every_family():
    assert set(ADAPTERS) == set(FAMILIES) == set(SUPPORTED_ARCHITECTURES.values())
    for family, build in FAMILIES.items():
        config = build()
        assert adapter_for_config(config) is ADAPTERS[config.model_type] is ADAPTERS[family]  # no architectures: type
        named = build()
        named.architectures = [next(a for a, f in SUPPORTED_ARCHITECTURES.items() if f == family)]
        assert adapter_for_config(named) is ADAPTERS[family]
        assert adapter_for(AutoModelForCausalLM.from_config(config)) is ADAPTERS[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_describe_reports_each_familys_quirks(family, tmp_path):
    model, spec = saved_teacher(family, tmp_path)
    adapter = adapter_for(model)
    assert adapter.family == spec.family == family
    assert spec == adapter.describe(model.config) == describe_teacher(AutoConfig.from_pretrained(tmp_path / family))
    attn = adapter.attention(adapter.layers(model)[0])
    assert spec.qkv_bias == (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None)
    assert spec.o_bias == (attn.o_proj.bias is not None)
    assert spec.qk_norm == hasattr(attn, "q_norm") == (family == "qwen3")
    assert (spec.qkv_bias, spec.o_bias) == {"llama": (True, True), "qwen2": (True, False)}.get(family, (False, False))
    assert len(adapter.layers(model)) == spec.num_layers
    assert adapter.lm_head(model).weight.shape == (spec.vocab_size, spec.hidden_size)
    assert adapter.final_norm(model).weight.shape == (spec.hidden_size,)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_weights_reproduce_the_teachers_attention(family, tmp_path):
    model, spec = saved_teacher(family, tmp_path)
    adapter = adapter_for(model)
    weights = adapter.attention_weights(model)
    assert len(weights) == spec.num_layers
    hidden = torch.randn(2, 24, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(24)[None].expand(2, 24) * 7  # spread positions, so RoPE is exercised
    cos, sin = adapter.rotary(model, hidden, positions)
    one_document = torch.arange(24)[None].expand(2, 24)
    for i, w in enumerate(weights):
        assert w.q.shape == (spec.num_heads, spec.head_dim, spec.hidden_size)
        assert w.k.shape == w.v.shape == (spec.num_kv_heads, spec.head_dim, spec.hidden_size)
        with torch.no_grad():
            expected = adapter.attention_forward(model, i, hidden, positions)
        got = attention_by_hand(w, hidden, cos, sin, one_document, spec.rms_norm_eps)
        err = rel_err(got, expected)
        print(f"{family} layer {i}: attention from the adapter's weights vs the module, rel err {err:.1e}")
        assert err < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_layers_equal_a_manual_pass(family, tmp_path):
    """The hooks' per-layer inputs, attention outputs and outputs equal a pass written out by hand on a packed
    batch (attention from the adapter's weights, documents kept apart), and so do the final hidden states."""
    model, spec = saved_teacher(family, tmp_path)
    adapter = adapter_for(model)
    batch, _ = packed_batch()
    positions = batch["position_ids"]
    trace = adapter.capture(model, batch)
    weights = adapter.attention_weights(model)
    with torch.no_grad():
        hidden = model.model.embed_tokens(batch["input_ids"])
        cos, sin = adapter.rotary(model, hidden, positions)
        for i, layer in enumerate(model.model.layers):
            assert rel_err(trace.inputs[i], hidden) < 1e-6
            attn = attention_by_hand(weights[i], layer.input_layernorm(hidden), cos, sin, positions, spec.rms_norm_eps)
            err = rel_err(trace.attn_outputs[i], attn)
            print(f"{family} layer {i}: captured attention output vs by hand, rel err {err:.1e}")
            assert err < 1e-5
            hidden = hidden + attn.float()
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            assert rel_err(trace.outputs[i], hidden) < 1e-5
        assert rel_err(trace.final_hidden, model.model.norm(hidden)) < 1e-5
        assert rel_err(adapter.final_hidden(model, batch), trace.final_hidden) == 0
        assert rel_err(adapter.lm_head(model)(trace.final_hidden), adapter.logits(model, batch)) < 1e-6
    partial = adapter.capture(model, batch, layers=[1])
    assert partial.inputs[0] is None and partial.attn_outputs[0] is None and partial.outputs[0] is None
    assert torch.equal(partial.attn_outputs[1], trace.attn_outputs[1])


@pytest.mark.parametrize(("family", "attn"), [*((f, "sdpa") for f in FAMILIES), ("llama", "eager"), ("qwen3", "eager")])
def test_packed_forward_inputs_give_each_document_its_own_logits(family, attn, tmp_path):
    model, _ = saved_teacher(family, tmp_path, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    adapter = adapter_for(model)
    batch, docs = packed_batch()
    with torch.no_grad():
        logits = adapter.logits(model, batch)  # (B, T, V)
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        worst = worst_leaky = 0.0
        for b, row in enumerate(docs):
            start = 0
            for ids in row:
                alone = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
                worst = max(worst, (logits[b, start : start + len(ids)] - alone).abs().max().item())
                worst_leaky = max(worst_leaky, (leaky[b, start : start + len(ids)] - alone).abs().max().item())
                start += len(ids)
    print(f"{family} {attn}: packed vs alone max abs diff {worst:.2e}; position ids only {worst_leaky:.2e}")
    assert worst < 1e-4
    assert worst_leaky > 1e-3 and worst_leaky > 1e3 * worst  # the comparison can fail: position ids alone leak


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trunk_is_everything_but_attention(family, tmp_path):
    model, spec = saved_teacher(family, tmp_path)
    trunk = adapter_for(model).trunk_state_dict(model)
    state = model.state_dict()
    assert set(trunk) == {name for name in state if ".self_attn." not in name}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"} <= set(trunk)
    assert all(trunk[name].data_ptr() == state[name].data_ptr() for name in trunk)  # views, not copies


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, architectures=["GPT2LMHeadModel"])
    supported = sorted(SUPPORTED_ARCHITECTURES)
    for call in (
        lambda: adapter_for_config(config),
        lambda: adapter_for(GPT2LMHeadModel(config)),
        lambda: describe_teacher(config),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        print(message)
        assert "\n" not in message and "GPT2LMHeadModel" in message and str(supported) in message
    assert supported == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    # A supported model_type with an unsupported head is refused too: architectures decide when a config names them.
    head = LlamaConfig(**COMMON, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match=r"'LlamaForSequenceClassification'\] is not supported; supported: \["):
        adapter_for_config(head)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="is not supported; supported: "):  # before any weight is read
        load_teacher(str(tmp_path / "gpt2"))


def test_flex_attention_teachers_get_the_same_documents_through_a_block_mask(tmp_path):
    """`teacher.attn_implementation=flex_attention` (what `auto` picks on CUDA): the packed batch's documents are
    kept apart by a BlockMask, with the dense-mask SDPA teacher's logits (checked against documents run alone
    above) as the reference. Forward only (FlexAttention has no CPU backward); CPU compiles it once."""
    from torch.nn.attention.flex_attention import BlockMask

    sdpa, _ = saved_teacher("llama", tmp_path, attn_implementation="sdpa")
    flex, _ = load_teacher(str(tmp_path / "llama"), attn_implementation="flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    batch, _ = packed_batch()
    inputs = adapter_for(flex).forward_inputs(flex, batch)
    assert isinstance(inputs["attention_mask"], BlockMask)
    with torch.no_grad():
        expected = adapter_for(sdpa).logits(sdpa, batch)
        got = flex(**inputs).logits
        leaky = flex(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        traces = [adapter_for(m).capture(m, batch) for m in (sdpa, flex)]  # ILD's per-layer trace
    err, leak = (got - expected).abs().max().item(), (leaky - expected).abs().max().item()
    trace_err = max(
        (b - a).abs().max().item()
        for field in ("inputs", "attn_outputs", "outputs")
        for a, b in zip(getattr(traces[0], field), getattr(traces[1], field), strict=True)
    )
    print(
        f"flex_attention teacher vs dense-mask sdpa: max abs diff {err:.1e} (position ids only: {leak:.1e}), "
        f"ILD trace {trace_err:.1e}"
    )
    assert err < 1e-4 and leak > 1e3 * max(err, 1e-7) and trace_err < 1e-4


def test_flex_teachers_decode_through_sdpa_and_keep_flex_for_training(tmp_path):
    """Eval's greedy generations (train/stages/eval.py `side_by_side`) run a FlexAttention teacher through SDPA
    (cached decoding: one document per row, one query per step) and hand it back with FlexAttention."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from train.stages.eval import side_by_side

    sdpa, _ = saved_teacher("llama", tmp_path, attn_implementation="sdpa")
    flex, _ = load_teacher(str(tmp_path / "llama"), attn_implementation="flex_attention")
    seen = []
    generate = flex.generate
    flex.generate = lambda *a, **k: (seen.append(flex.config._attn_implementation), generate(*a, **k))[1]
    vocab = {f"t{i}": i for i in range(COMMON["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", unk_token="t0"
    )
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    rows = side_by_side({"flex": flex, "sdpa": sdpa}, tokenizer, ["t5 t9 t3 t7", "t1 t2"], max_new_tokens=6)
    assert seen == ["sdpa", "sdpa"] and flex.config._attn_implementation == "flex_attention"
    assert all(row["flex"] == row["sdpa"] and row["flex"] for row in rows), rows


def test_init_probes_a_flex_teacher_through_sdpa(tmp_path):
    """The init's per-layer attention probes (one document each) run a FlexAttention teacher through SDPA, whose
    numbers they equal, and leave it FlexAttention (on the CPU, FlexAttention compiles per probe: SmolLM2's init
    stage took 61 s instead of 7 on an H100 machine)."""
    from models.init.transfer import convert_teacher

    sdpa, spec = saved_teacher("llama", tmp_path, attn_implementation="sdpa")
    flex, _ = load_teacher(str(tmp_path / "llama"), attn_implementation="flex_attention")
    seen = []
    flex.model.layers[1].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(flex.config._attn_implementation)
    )
    _, flex_report = convert_teacher(flex, spec, mla_layers=[1], lossless=True)
    _, sdpa_report = convert_teacher(sdpa, spec, mla_layers=[1], lossless=True)
    assert seen == ["sdpa"] and flex.config._attn_implementation == "flex_attention"
    assert flex_report.layers[1]["attn_out_rel_err"] == sdpa_report.layers[1]["attn_out_rel_err"]


def test_auto_attention_follows_the_runs_accelerator(tmp_path, monkeypatch):
    """`teacher.attn_implementation=auto` means FlexAttention only where the run trains on CUDA: a run with
    trainer.accelerator=cpu on a GPU machine keeps SDPA."""
    from train.config import compose_config, typed_config
    from train.runtime.teachers import load_resolved

    saved_teacher("llama", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for accelerator, expected in [("cpu", "sdpa"), ("gpu", "flex_attention")]:
        cfg = typed_config(compose_config([f"trainer.accelerator={accelerator}"]))
        model, _ = load_resolved(str(tmp_path / "llama"), str(tmp_path / "llama"), "float32", cfg)
        assert model.config._attn_implementation == expected, accelerator
