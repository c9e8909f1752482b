"""torch.compile for the memory-bound pieces of a block: RMSNorm, the gated MLP's activation, Mamba2's conv.

Eager PyTorch runs each of these as a chain of elementwise kernels that read and write the whole activation
(RMSNorm's fp32 upcast, pow, mean, rsqrt and two multiplies, ~10 more in backward; the document-masked conv's
four masked multiply-adds). Inductor fuses each into one kernel per direction. Only these pure functions are
compiled (fullgraph, so anything untraceable fails loudly), never mamba-ssm's Triton scan or a whole layer.

Off unless `set_compile(True)` (the pipeline does it for `student.compile=true`); then only where it pays and
is safe: tensors on the enabled devices (CUDA) while autograd records, i.e. training steps. Evaluation,
prefill and CUDA-graph decoding stay eager, computing the same function.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

log = logging.getLogger(__name__)
# Inductor's Triton kernels assume the 16-byte alignment their example inputs had, and parameters (static inputs)
# are not re-checked per call. DeepSpeed's bf16 ZeRO-1/2 turns parameters into views of one flat buffer, so a
# parameter after an odd-sized one (SmolLM2's 9-head Mamba2 A_log / dt_bias / D) starts 2 bytes off: the
# compiled RMSNorm then died with "CUDA error: misaligned address". Such inputs are copied (see _aligned).
ALIGNMENT_BYTES = 16
_devices: frozenset[str] = frozenset()
_wrappers: list[Callable] = []


def set_compile(enabled: bool, devices: Sequence[str] = ("cuda",)) -> None:
    """Compile the decorated functions for training steps on `devices` (tests add "cpu")."""
    global _devices
    _devices = frozenset(devices) if enabled else frozenset()
    for wrapper in _wrappers:
        wrapper.hit_limit = False


def compile_enabled() -> bool:
    return bool(_devices)


def _aligned(value):
    """`value`, or an aligned copy of a tensor whose storage does not start on a 16-byte boundary (a clone is
    differentiable, so gradients still reach the original parameter; only small misaligned tensors pay it)."""
    if isinstance(value, torch.Tensor) and value.data_ptr() % ALIGNMENT_BYTES:
        return value.clone()
    return value


def compiled_in_training(fn: Callable) -> Callable:
    """`fn(x, ...)`, run through torch.compile when enabled, `x` is on an enabled device and grad is on."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        nonlocal compiled
        if x.device.type not in _devices or not torch.is_grad_enabled():
            return fn(x, *args, **kwargs)
        if compiled is None:
            # dynamic=None: static kernels for the fixed training shapes; a batch of another shape (DPO's
            # padded pairs, a last partial batch) recompiles once with symbolic sizes instead of per shape.
            compiled = torch.compile(fn, fullgraph=True, dynamic=None)
        x, args, kwargs = _aligned(x), tuple(_aligned(a) for a in args), {k: _aligned(v) for k, v in kwargs.items()}
        try:
            return compiled(x, *args, **kwargs)
        except FailOnRecompileLimitHit:
            # Each new combination of dtype, requires_grad, autocast or shape adds a compiled variant; past
            # Dynamo's recompile_limit, fullgraph raises instead of running eagerly. Run this call eagerly
            # (same function) and say so once; variants compiled so far keep running compiled.
            if not wrapper.hit_limit:
                wrapper.hit_limit = True
                log.warning(
                    "student.compile: %s reached torch._dynamo.config.recompile_limit (%d variants); new variants "
                    "run eagerly (raise the limit to compile them)",
                    fn.__name__,
                    torch._dynamo.config.recompile_limit,
                )
            return fn(x, *args, **kwargs)

    wrapper.eager = fn
    wrapper.hit_limit = False
    _wrappers.append(wrapper)
    return wrapper
