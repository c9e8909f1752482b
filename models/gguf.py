"""GGUF teachers: a llama.cpp `.gguf` file (or a directory holding exactly one) as `teacher.name_or_path`.

Transformers reads GGUF files by dequantizing every tensor to float32 (the `gguf` package does the unpacking),
which takes tens of seconds even for a 135M model. So a GGUF teacher is dequantized once into a plain Hugging Face
directory (config.json without quantization_config, model.safetensors in float32, tokenizer files with the chat
template) in a cache keyed by the file's content, and everything downstream loads that directory like any other
local teacher. Config validation only needs the shape: `gguf_config` reads the metadata, never the tensors.

    find_gguf(name_or_path)            the .gguf file, or None for a Hub id / HF directory / "tiny"
    gguf_config(path)                  the PretrainedConfig transformers builds from the metadata (no weights)
    materialize_gguf_teacher(path)     the cached HF directory (written on the first call)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

from transformers import PretrainedConfig

from .errors import first_line

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # v1 (2023) counted in 32 bits; transformers reads v2 and v3
# llama.cpp's `general.architecture` -> our teacher family (models/teachers SUPPORTED_ARCHITECTURES). Mistral
# files usually say "llama"; transformers tells them apart by name and the config's model_type says which it is.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
CACHE_ENV = "ZEBRA_DISTILL_CACHE"  # the tool's cache root; GGUF teachers go to $ZEBRA_DISTILL_CACHE/gguf
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # value types


def _error(name_or_path: str, message: str) -> Exception:
    from .teachers.loading import TeacherLoadError  # loading.py imports this module lazily; no import cycle

    return TeacherLoadError(f"teacher.name_or_path={name_or_path!r}: {message}")


def is_gguf_file(path: Path) -> bool:
    """A regular file starting with the GGUF magic bytes (the name does not matter)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def find_gguf(name_or_path: str) -> Path | None:
    """The GGUF file `name_or_path` means: a `.gguf` file (or any file with the GGUF magic), or a directory with no
    config.json and exactly one `*.gguf`. None for everything else (Hub ids, HF directories, "tiny")."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return None  # a Hugging Face directory, even if a .gguf lies beside it
        files = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(files) > 1:
            raise ValueError(
                f"teacher.name_or_path={name_or_path!r} holds {len(files)} .gguf files "
                f"({', '.join(p.name for p in files)}); point teacher.name_or_path at one file"
            )
        return files[0] if files else None
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" or is_gguf_file(path) else None
    if path.suffix.lower() == ".gguf":  # meant as a file, so "not a Hub id" is the wrong complaint
        raise FileNotFoundError(f"teacher.name_or_path={name_or_path!r}: no such .gguf file")
    return None


def read_gguf_header(path: Path, name_or_path: str | None = None) -> tuple[dict, list[str]]:
    """The metadata's scalars and strings (arrays as their length) and the tensor names, from the header alone.

    Our own reader, not `gguf.GGUFReader`: that one parses the whole vocabulary (~3 s for SmolLM2's 49K tokens),
    while the checks before any dequantization only need a few keys; this walk takes milliseconds."""
    name = name_or_path or str(path)
    with open(path, "rb") as handle:
        head = handle.read(24)
        if head[:4] != GGUF_MAGIC:
            raise _error(name, f"{path.name} is not a GGUF file (it does not start with the magic bytes 'GGUF')")
        if len(head) < 24 or struct.unpack_from("<I", head, 4)[0] not in GGUF_VERSIONS:
            raise _error(name, f"{path.name}: unsupported or damaged GGUF header (readable versions {GGUF_VERSIONS})")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            try:
                return _walk_header(blob)
            except (struct.error, UnicodeDecodeError, ValueError) as e:
                raise _error(
                    name, f"{path.name} has a damaged GGUF header ({first_line(e)}); download or copy it again"
                ) from e


def _walk_header(blob: mmap.mmap) -> tuple[dict, list[str]]:
    """GGUF v2/v3 layout: magic, version u32, tensor count u64, metadata count u64, the key/value pairs, then one
    entry per tensor (name, dims, ggml type, data offset)."""
    tensor_count, kv_count = struct.unpack_from("<QQ", blob, 8)

    def string(pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", blob, pos)
        return blob[pos + 8 : pos + 8 + length].decode("utf-8"), pos + 8 + length

    def value(kind: int, pos: int) -> tuple[object, int]:
        if kind in _FIXED:
            fmt = "<" + _FIXED[kind]
            return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
        if kind == 8:
            return string(pos)
        if kind == 9:  # an array: only its length is kept (vocabularies and merge tables are large)
            element, count = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            if element in _FIXED:
                return count, pos + count * struct.calcsize("<" + _FIXED[element])
            for _ in range(count):
                _, pos = value(element, pos)
            return count, pos
        raise ValueError(f"unknown GGUF value type {kind}")

    pos, metadata, tensors = 24, {}, []
    for _ in range(kv_count):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = value(kind, pos + 4)
    for _ in range(tensor_count):
        tensor, pos = string(pos)
        (dims,) = struct.unpack_from("<I", blob, pos)
        pos += 4 + 8 * dims + 4 + 8  # dims, ggml type, data offset
        tensors.append(tensor)
    return metadata, tensors


def _require_packages(name_or_path: str) -> None:
    """transformers reads GGUF through the `gguf` package and loads it through accelerate."""
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    try:
        import gguf  # noqa: F401  (find_spec misses a module that is present but broken or blocked)
    except ImportError:
        missing = ["gguf", *[m for m in missing if m != "gguf"]]
    if missing:
        raise _error(
            name_or_path,
            f"reading a GGUF teacher needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
            f"pip install {' '.join(missing)} (or pip install -e '.[gguf]')",
        )


def _check_header(path: Path, name_or_path: str) -> None:
    """What transformers would get wrong or refuse, found from the header before anything slow runs."""
    metadata, tensors = read_gguf_header(path, name_or_path)
    arch = metadata.get("general.architecture")
    readable = set(GGUF_ARCHITECTURES)
    try:  # the architectures this transformers version can dequantize
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        readable &= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    if arch not in readable:
        raise _error(
            name_or_path,
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(readable)}",
        )
    if int(metadata.get("split.count", 1)) > 1:
        raise _error(
            name_or_path,
            f"{path.name} is one of {metadata['split.count']} split GGUF parts; merge them first "
            "(llama-gguf-split --merge) and point teacher.name_or_path at the merged file",
        )
    # Llama 3.x files carry llama3 RoPE scaling as a `rope_freqs.weight` tensor, YaRN files as rope.scaling.*
    # keys; transformers' GGUF loader drops both and would build a teacher with plain RoPE, silently different.
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors or scaling not in (None, "none"):
        raise _error(
            name_or_path,
            f"{path.name} uses scaled RoPE ({'rope_freqs.weight' if scaling in (None, 'none') else scaling}), which "
            "transformers' GGUF loader ignores; use the model's Hugging Face checkpoint instead",
        )


@functools.lru_cache(maxsize=8)
def _config_from_metadata(path: str, size: int, mtime_ns: int) -> PretrainedConfig:
    from transformers import AutoConfig

    file = Path(path)
    return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)


def gguf_config(path: str | Path, name_or_path: str | None = None) -> PretrainedConfig:
    """The teacher's config from the GGUF metadata, no dequantization: the same config transformers builds when it
    loads the file (so validation sees the shape the materialized teacher will have), plus `architectures`,
    which GGUF files do not state. Raises TeacherLoadError (one line naming teacher.name_or_path)."""
    from .teachers import SUPPORTED_ARCHITECTURES

    path = Path(path).expanduser().resolve()
    name = name_or_path or str(path)
    _check_header(path, name)
    _require_packages(name)
    stat = path.stat()
    try:  # transformers parses the whole vocabulary here (~5 s for SmolLM2): memoized per file version
        config = copy.deepcopy(_config_from_metadata(str(path), stat.st_size, stat.st_mtime_ns))
    except Exception as e:  # a file transformers cannot read: one line naming the teacher
        raise _error(name, f"cannot read the GGUF metadata of {path.name} ({type(e).__name__}: {first_line(e)})") from e
    by_type = {model_type: arch for arch, model_type in SUPPORTED_ARCHITECTURES.items()}
    if config.model_type not in by_type:
        raise _error(name, f"GGUF model_type {config.model_type!r} is not supported; supported: {sorted(by_type)}")
    config.architectures = [by_type[config.model_type]]
    return config


def default_cache_root() -> Path:
    """$ZEBRA_DISTILL_CACHE/gguf, else ~/.cache/zebra-distill/gguf."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "zebra-distill") / "gguf"


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256, memoized per (path, size, mtime, inode) within the process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def gguf_cache_dir(path: str | Path, cache_root: Path | None = None) -> Path:
    """Where `materialize_gguf_teacher` puts (or finds) this file's directory; its config.json marks it complete, so
    other ranks can wait for that file while one rank materializes."""
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / file_sha256(Path(path).expanduser().resolve())


def materialize_gguf_teacher(path: str | Path, cache_root: Path | None = None, name_or_path: str | None = None) -> Path:
    """The plain Hugging Face directory of a GGUF teacher, dequantized to float32 on the first call and reused after.

    Cached under `cache_root` (default: `default_cache_root()`) in a folder named by the file's sha256. A content
    hash rather than size + mtime + name: hashing costs ~0.3 s per 100 MB (a few seconds for an 8B file, far below
    the dequantization it saves), and a file replaced in place, copied, or renamed never maps to a stale or a
    duplicate teacher. Written to a temporary folder and renamed into place, so readers never see half a teacher;
    when a concurrent writer (another rank, another job) finished first, its folder is kept and ours discarded."""
    path = Path(path).expanduser().resolve()
    name = name_or_path or str(path)
    final = gguf_cache_dir(path, cache_root)
    root = final.parent
    if (final / "config.json").is_file():
        return final
    config = gguf_config(path, name)  # architecture, RoPE, packages and shape checked before the slow part
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name[:12]}-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by a team's jobs
    try:
        _write_hf_directory(path, tmp, name, config)
        (tmp / "gguf_source.json").write_text(json.dumps({"gguf": str(path), "sha256": final.name}, indent=2))
        if not (final / "config.json").is_file():
            if final.exists():  # a folder without config.json was not published by us (publishing is one rename)
                shutil.rmtree(final)
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "config.json").is_file():  # not a writer that won the race: a real error
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_hf_directory(path: Path, out: Path, name_or_path: str, config: PretrainedConfig) -> None:
    """Dequantize through transformers, then save a model no longer marked GGUF-quantized (save_pretrained refuses
    one that is): the same architecture built from the config without quantization_config, the dequantized tensors
    moved in (meta device + assign: no second copy of the weights), loaded strictly so nothing is dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # `config` given: transformers would otherwise parse the metadata again for each (~5 s for SmolLM2)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, config=config)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
        )
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        model.tie_weights()
        del loaded
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except Exception as e:  # one line naming the teacher, whatever transformers raised
        raise _error(name_or_path, f"cannot dequantize {path.name} ({type(e).__name__}: {first_line(e)})") from e
