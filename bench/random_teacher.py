"""A random-weight teacher of a named Llama size, saved like a Hub checkpoint (config, safetensors, tokenizer), so the
whole pipeline runs at full shape on machines without Hub access (speed, memory and multi-GPU checks):

    python -m bench.random_teacher --size llama_3_2_1b --out /tmp/teacher_1b
    python -m train conf=zebra_1b teacher.name_or_path=/tmp/teacher_1b data=default data.seq_len=2048

The tokenizer is the embedded corpus's (1024 tokens): its ids are valid for any of these vocabularies, and
`data=default` (the embedded corpus) then needs no download either.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from data.corpus import tiny_tokenizer_path

from .train import TEACHERS, build_teacher


def save_random_teacher(size: str, out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Build `size` (bench.train.TEACHERS) with random weights and save it with the corpus tokenizer; atomic."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_teacher(size, device, dtype)
    model.config.architectures = ["LlamaForCausalLM"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_path())).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="llama_3_2_1b", choices=list(TEACHERS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    path = save_random_teacher(args.size, Path(args.out), getattr(torch, args.dtype))
    print(f"saved a random-weight {args.size} teacher to {path}")


if __name__ == "__main__":
    main()
