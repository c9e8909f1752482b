"""Named model sizes (torchtitan style): HybridConfig keyword arguments for the shapes benchmarks and tests use.

`LLAMA_3_2_1B` is the teacher trunk of Llama-3.2-1B (16 layers, 32 heads, 8 KV heads of 64, Llama-3 RoPE);
`ZEBRA_1B_MLA` / `ZEBRA_1B_MAMBA` are the Zebra-Llama 1B mixer sizes (conf/conf/zebra_1b.yaml holds the preset).
"""

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_parameters=LLAMA3_ROPE,
)

ZEBRA_1B_MLA = dict(kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64)
ZEBRA_1B_MAMBA = dict(d_state=64, headdim=64)

# Llama-3.1-8B (Zebra-Llama 8B's teacher and the public recipe's KD teacher for the 1B student).
LLAMA_3_1_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_parameters={**LLAMA3_ROPE, "factor": 8.0},
)

# Llama-3.2-3B (Zebra-Llama 3B's teacher).
LLAMA_3_2_3B = dict(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_parameters=LLAMA3_ROPE,
)

# A Llama trunk small enough for CPU tests and smoke benchmarks (2 query heads per KV head, as in GQA teachers);
# tests override what they vary (vocabulary, depth, positions, tied embeddings).
TINY_LLAMA = dict(
    vocab_size=1024,  # the embedded tokenizer's
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)

# SmolLM2-135M-Instruct (the real teacher of bench/fidelity.py and conf/conf/smollm2_135m.yaml), tied embeddings.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
)
