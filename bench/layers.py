"""Per-layer timing at a preset's shapes: MLA and Mamba2 forward+backward (Triton vs pure-torch scan),
and one cached decode step. Random weights; prints a table and writes bench/results/<name>.json.

    python -m bench.layers --name layers_zebra_1b_h100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models import HybridConfig, HybridForCausalLM
from models.documents import documents_from_positions
from models.sizes import LLAMA_3_2_1B, ZEBRA_1B_MAMBA, ZEBRA_1B_MLA


def cuda_time(fn, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of fn() with CUDA events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="layers_zebra_1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = HybridConfig(
        **{**LLAMA_3_2_1B, "num_hidden_layers": 2},  # one MLA and one Mamba2 layer of the 1B shape
        mixer_types=["mla", "mamba"],
        mla=ZEBRA_1B_MLA,
        mamba={**ZEBRA_1B_MAMBA, "chunk_size": 256},
    )
    model = HybridForCausalLM(config).to(device, dtype)
    hidden = torch.randn(args.batch, args.seq, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    positions = torch.arange(args.seq, device=device).expand(args.batch, -1)
    doc_lengths = (args.seq * 3 // 8, args.seq * 3 // 8, args.seq - 2 * (args.seq * 3 // 8))
    packed = torch.cat([torch.arange(n) for n in doc_lengths]).to(device).expand(args.batch, -1)
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "batch": args.batch,
        "seq": args.seq,
        "timings_ms": {},
    }

    def layer_step(layer, pos):
        docs = documents_from_positions(pos)
        cos, sin = model.model.rope(pos)
        out = layer.mix(hidden, cos, sin, docs)
        out.float().square().mean().backward()

    for label, layer in (("mla", model.model.layers[0]), ("mamba2", model.model.layers[1])):
        for doc_label, pos in (("", positions), ("_packed", packed)):
            for use_triton in (True, False) if label == "mamba2" and device == "cuda" else (True,):
                for m in layer.modules():
                    if hasattr(m, "use_triton"):
                        m.use_triton = use_triton
                key = f"{label}{doc_label}_fwd_bwd" + ("" if use_triton else "_torch_ref")
                results["timings_ms"][key] = cuda_time(lambda layer=layer, pos=pos: layer_step(layer, pos))
    # One decode step of the two-layer model with a 4K-token cache.
    with torch.no_grad():
        cache = model.make_cache(args.batch)
        prompt = torch.randint(0, 1000, (args.batch, 4096), device=device)
        model(prompt[:, :2048], cache=cache)
        model(prompt[:, 2048:], cache=cache)
        token = prompt[:, -1:]
        # Each timed call appends one token to the cache (4096 -> ~4111); close enough to a fixed context.
        results["timings_ms"]["decode_step_2_layers_ctx4096"] = cuda_time(lambda: model(token, cache=cache), repeat=5)
    if device == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for key, value in results["timings_ms"].items():
        print(f"{key:40s} {value:9.2f} ms")
    out = Path(__file__).parent / "results" / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
