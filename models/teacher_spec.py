"""TeacherSpec: the shapes and quirks of a teacher that the student copies, read from its config alone (made by
the teacher's adapter, models/teachers/).

Its own file, importing nothing of ours, so that mixer files can name it without the exported student
(which carries models/*.py it imports) carrying the teacher-loading code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TeacherSpec:
    family: str  # the adapter's family, the Hugging Face model_type ("llama", "mistral", "qwen2", "qwen3")
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    rope_parameters: dict
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    bos_token_id: int | list[int] | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None

    def to_dict(self) -> dict:
        return asdict(self)
