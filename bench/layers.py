"""Per-layer timing at a preset's shapes: MLA, Mamba2 and Gated DeltaNet forward+backward (Triton vs pure-torch
reference), the GDN forward alone, peak memory per layer, and one cached decode step per mixer kind. Random
weights; prints a table and writes bench/results/<name>.json.

    python -m bench.layers --name layers_zebra_1b_h100
    python -m bench.layers --shape smollm2_135m --batch 16 --name layers_smollm2_135m_h100   # the real teacher's
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from models import HybridConfig, HybridForCausalLM
from models.documents import documents_from_positions
from models.sizes import LLAMA_3_2_1B, SMOLLM2_135M, ZEBRA_1B_MAMBA, ZEBRA_1B_MLA

# Model shapes and the student settings of their presets (conf/conf/zebra_1b.yaml, smollm2_135m.yaml).
SHAPES = {
    "zebra_1b": dict(LLAMA_3_2_1B, mla=ZEBRA_1B_MLA, mamba=ZEBRA_1B_MAMBA),
    "smollm2_135m": dict(SMOLLM2_135M, mla=ZEBRA_1B_MLA, mamba=ZEBRA_1B_MAMBA),
}
KINDS = ("mla", "mamba", "gdn")


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


def use_triton_kernels(layer: torch.nn.Module, enabled: bool) -> None:
    """Switch a layer's mixers between their Triton kernels and the pure-torch reference."""
    for module in layer.modules():
        if hasattr(module, "use_triton"):
            module.use_triton = enabled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="layers_zebra_1b")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="zebra_1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = {**SHAPES[args.shape], "num_hidden_layers": len(KINDS)}
    shape["mamba"] = {**shape["mamba"], "chunk_size": 256}
    config = HybridConfig(**shape, mixer_types=list(KINDS))  # one layer of each kind
    model = HybridForCausalLM(config).to(device, dtype)
    hidden = torch.randn(args.batch, args.seq, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    positions = torch.arange(args.seq, device=device).expand(args.batch, -1)
    doc_lengths = (args.seq * 3 // 8, args.seq * 3 // 8, args.seq - 2 * (args.seq * 3 // 8))
    packed = torch.cat([torch.arange(n) for n in doc_lengths]).to(device).expand(args.batch, -1)
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": args.shape,
        "dtype": str(dtype),
        "batch": args.batch,
        "seq": args.seq,
        "timings_ms": {},
        "peak_memory_gib": {},
    }

    def layer_step(layer, pos, backward: bool = True):
        docs = documents_from_positions(pos)
        cos, sin = model.model.rope(pos)
        with torch.set_grad_enabled(backward):
            out = layer.mix(hidden, cos, sin, docs)
            if backward:
                out.float().square().mean().backward()

    names = {"mla": "mla", "mamba": "mamba2", "gdn": "gdn"}
    for kind, layer in zip(KINDS, model.model.layers, strict=True):
        label = names[kind]
        for doc_label, pos in (("", positions), ("_packed", packed)):
            # Triton (mamba-ssm, fla) and the pure-torch reference; on Hopper with Triton < 3.7.1 GDN's backward
            # is the reference either way (models/gated_delta.py), its forward alone still fla's
            for use_triton in (True, False) if kind in ("mamba", "gdn") and device == "cuda" else (True,):
                use_triton_kernels(layer, use_triton)
                key = f"{label}{doc_label}_fwd_bwd" + ("" if use_triton else "_torch_ref")
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                results["timings_ms"][key] = cuda_time(lambda layer=layer, pos=pos: layer_step(layer, pos))
                if device == "cuda":
                    results["peak_memory_gib"][key] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if kind == "gdn":
                    results["timings_ms"][key.replace("fwd_bwd", "fwd")] = cuda_time(
                        lambda layer=layer, pos=pos: layer_step(layer, pos, backward=False)
                    )
        use_triton_kernels(layer, True)
    # One decode step per mixer kind with a 4K-token cache: a one-layer model of each (embedding and head included).
    with torch.no_grad():
        for kind in KINDS:
            single = HybridForCausalLM(HybridConfig(**{**shape, "num_hidden_layers": 1}, mixer_types=[kind]))
            single = single.to(device, dtype)
            cache = single.make_cache(args.batch)
            prompt = torch.randint(0, 1000, (args.batch, 4096), device=device)
            single(prompt[:, :2048], cache=cache)
            single(prompt[:, 2048:], cache=cache)
            token = prompt[:, -1:]
            # Each timed call appends one token to the cache (4096 -> ~4111); close enough to a fixed context.
            key = f"decode_step_1_layer_{names[kind]}_ctx4096"
            step = functools.partial(single, token, cache=cache)
            results["timings_ms"][key] = cuda_time(step, repeat=5)
    for key, value in results["timings_ms"].items():
        print(f"{key:40s} {value:9.2f} ms")
    out = Path(__file__).parent / "results" / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
