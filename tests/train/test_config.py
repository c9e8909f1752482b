"""The Hydra config tree: every preset composes and validates, mistakes fail while composing or in
validate_config with one line naming the key and the value. Compose API only, no model or weights load."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.config import (
    CONF_DIR,
    ConfigError,
    MambaSettings,
    MLASettings,
    compose_config,
    student_init_kwargs,
    validate_config,
)
from train.stages import STAGE_NAMES as STAGES

PRESETS = sorted(p.stem for p in (CONF_DIR / "conf").glob("*.yaml"))

# Public config.json shapes of the zebra teachers (no download here): a local dir with this config.json stands in
# for the Hub id, so the presets' student settings are checked against the real shapes.
LLAMA_SHAPES = {
    "meta-llama/Llama-3.2-1B-Instruct": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64
    ),
    "meta-llama/Llama-3.2-3B-Instruct": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128
    ),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128
    ),
}
# KV cache of the student's MLA layers over the teacher's GQA cache, as the Zebra-Llama paper reports it.
PAPER_KV_FRACTION = {"zebra_1b": 0.039, "zebra_3b": 0.020, "zebra_8b": 0.0273}


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory) -> dict[str, Path]:
    """config.json-only teacher dirs with the zebra teachers' shapes (Llama 3.x, 8 KV heads, llama3 RoPE)."""
    from transformers import LlamaConfig

    dirs = {}
    for name, shape in LLAMA_SHAPES.items():
        path = tmp_path_factory.mktemp(name.split("/")[1])
        LlamaConfig(
            vocab_size=128256,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0 if "3.2" in name else 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            architectures=["LlamaForCausalLM"],
            **shape,
        ).save_pretrained(path)
        _add_tokenizer(path)
        dirs[name] = path
    return dirs


def _add_tokenizer(path: Path) -> None:
    """A teacher folder holds its tokenizer (validate_config asks for one); the shipped tiny one stands in."""
    from transformers import AutoTokenizer

    from data.corpus import tiny_tokenizer_path

    AutoTokenizer.from_pretrained(str(tiny_tokenizer_path())).save_pretrained(path)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = compose_config([f"conf={preset}"])
    validate_config(cfg)
    assert cfg.conf == preset  # each preset names itself: run_name and output_dir follow
    assert cfg.output_dir == f"outputs/{preset}"
    assert list(cfg.stages) == [s for s in STAGES if s in cfg.stages]


def test_preset_list_covers_the_contract():
    needed = {"tiny", "zebra_1b", "zebra_1b_8mla", "zebra_3b", "zebra_8b", "lossless"}
    needed |= {"tiny_all_mla", "tiny_all_mamba", "zebra_1b_all_mla", "zebra_1b_all_mamba"}
    assert needed <= set(PRESETS)
    for preset in PRESETS:
        text = (CONF_DIR / "conf" / f"{preset}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), preset


def test_default_is_the_tiny_cpu_run():
    cfg = compose_config([])
    validate_config(cfg)
    assert cfg.conf == "tiny" and cfg.teacher.name_or_path == "tiny"
    assert cfg.trainer.accelerator == "cpu" and cfg.strategy.name == "auto" and cfg.logger.kind == "csv"
    assert list(cfg.student.mla_layers) == [0, 2] and cfg.teacher.tiny.num_layers == 4
    assert cfg.data.sources == []  # the embedded corpus
    assert cfg.ild.max_steps + cfg.kd.max_steps <= 500  # minutes on 2 CPU cores
    assert not cfg.student.compile and cfg.kd.use_triton


def test_gpu_presets_compile_the_student_where_it_was_measured():
    # docs/performance.md: measured with ZeRO-2 (zebra_1b); zebra_8b's ZeRO-3 + checkpointing is not.
    compiled = {p: compose_config([f"conf={p}"]).student.compile for p in ("zebra_1b", "zebra_3b", "zebra_8b")}
    assert compiled == {"zebra_1b": True, "zebra_3b": True, "zebra_8b": False}


@pytest.mark.parametrize(
    "preset", ["zebra_1b", "zebra_1b_8mla", "zebra_1b_all_mla", "zebra_1b_all_mamba", "zebra_3b", "zebra_8b"]
)
def test_zebra_presets_fit_their_teachers(preset, teacher_dirs):
    """The Hub teacher replaced by a local config.json of the same shape: the full student check runs."""
    cfg = compose_config([f"conf={preset}"])
    local = teacher_dirs[cfg.teacher.name_or_path]
    validate_config(compose_config([f"conf={preset}", f"teacher.name_or_path={local}"]))
    if preset in PAPER_KV_FRACTION:
        t, mla = LLAMA_SHAPES[cfg.teacher.name_or_path], cfg.student.mla
        student = len(cfg.student.mla_layers) * (mla.kv_lora_rank + mla.qk_rope_head_dim)  # one shared RoPE head
        teacher = t["num_hidden_layers"] * 2 * 8 * t["head_dim"]
        assert student / teacher == pytest.approx(PAPER_KV_FRACTION[preset], abs=5e-4)


def test_a_preset_on_the_wrong_teacher_names_the_key(teacher_dirs):
    local = teacher_dirs["meta-llama/Llama-3.2-3B-Instruct"]  # head_dim 128, zebra_1b's MLA dims are for 64
    message = _error(["conf=zebra_1b", f"teacher.name_or_path={local}"])
    assert "student.mla." in message and "head_dim 128" in message


def test_hub_teachers_are_not_fetched(monkeypatch):
    """A Hub id gets every check that needs no teacher shape; config.json is read only for local dirs."""
    import models.teachers.loading

    def offline(*args, **kwargs):
        raise AssertionError("validate_config tried to read a Hub config")

    monkeypatch.setattr(models.teachers.loading, "load_teacher_config", offline)
    validate_config(compose_config(["conf=zebra_1b"]))
    assert "stages" in _error(["conf=zebra_1b", "stages=[kd,ild]"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # unknown keys and wrong types: rejected while composing (the schema)
        (["student.mla.kv_lora_rnk=3"], ["kv_lora_rnk", "student.mla"]),
        (["ild.lr_max=1"], ["lr_max", "ild"]),
        (["ild.max_steps=abc"], ["ild.max_steps", "abc", "Integer"]),
        (["+student.mla.kv_lora_rnk=3"], ["student.mla.kv_lora_rnk=3", "kv_lora_rank"]),  # `+` bypasses composing
        (["conf=nope"], ["conf='nope'", "tiny", "zebra_1b"]),
        (["strategy=deepspeed_zero4"], ["strategy='deepspeed_zero4'", "deepspeed_zero3"]),
        (["conf=zebra_8b", "strategy.stge=3"], ["strategy.stge"]),
        # the student against the tiny teacher (4 layers, head_dim 32, 2 KV heads)
        (["student.mla_layers=[0,9]"], ["student.mla_layers", "[9]", "0..3"]),
        (["student.mla.kv_lora_rank=97"], ["student.mla.kv_lora_rank=97", "1..96"]),
        (["student.mla.q_lora_rank=1000"], ["student.mla.q_lora_rank=1000", "1..128"]),
        (["student.mla.qk_rope_head_dim=8"], ["qk_rope_head_dim", "head_dim 32"]),
        (["student.mamba.d_state=16"], ["student.mamba.d_state=16", "32"]),
        (["student.mla_layers=some"], ["student.mla_layers='some'", "all"]),
        (["student.mla.rope_pairs=random"], ["student.mla.rope_pairs='random'", "energy"]),
        (["student.document_masking=varlen"], ["student.document_masking='varlen'", "auto", "dense", "flex"]),
        (["student.document_masking=flex"], ["student.document_masking='flex'", "flex not on cpu"]),
        # student.layers, the general map (the tiny preset's own map is student.mla_layers=[0, 2])
        (["student.layers=[mla,mamba,mamba,mla]"], ["student.layers=", "student.mla_layers=all"]),
        (["student.mla_layers=all", "student.layers=[mla,mamba,gru,mla]"], ["student.layers contains ['gru']", "mla"]),
        (["student.mla_layers=all", "student.layers=[mla,mamba]"], ["student.layers has 2 entries", "4"]),
        (["student.mla_layers=all", "student.layers={0:mla,7:mla}"], ["student.layers names layers [7]", "0..3"]),
        (["student.mla_layers=all", "student.layers=mla"], ["student.layers='mla'", "a map {layer: kind}"]),
        (
            ["student.mla_layers=all", "student.layers=[mla,mamba,mamba,mla]", "stages=[init,ild,select,kd]"],
            ["student.layers=", "select stage"],
        ),
        # stages
        (["stages=[init,distill]"], ["'distill'", "init, ild, select, kd, dpo, eval, export"]),
        (["stages=[init,kd,ild]"], ["'ild' after 'kd'", "init, ild, select, kd, dpo, eval, export"]),
        (["stages=[init,init]"], ["'init' after 'init'"]),
        (["stages=[]"], ["stages=[]"]),
        (["stages=[init,select,kd]"], ["'select' needs 'ild'"]),
        (["stages=[init,ild,select,kd]", "ild.candidates=assigned"], ["ild.candidates='assigned'"]),
        # The tiny teacher has embedded preference pairs; any other teacher needs dpo.sources.
        (["stages=[init,ild,kd,dpo]", "teacher.name_or_path=meta-llama/Llama-3.2-1B-Instruct"], ["dpo.sources=[]"]),
        # values
        (["kd.divergence=kl"], ["kd.divergence='kl'", "forward_kl | reverse_kl | jsd"]),
        (["ild.loss=l1"], ["ild.loss='l1'", "mse | l2"]),
        (["kd.warmup_steps=500"], ["kd.warmup_steps=500", "kd.max_steps (200)"]),
        (["teacher.dtype=fp8"], ["teacher.dtype='fp8'", "bfloat16"]),
        (["teacher.name_or_path=/no/such/dir"], ["teacher.name_or_path='/no/such/dir'", "Hub id"]),
        (["teacher.tiny.num_kv_heads=3"], ["teacher.tiny.num_kv_heads=3"]),
        (["data.seq_len=1"], ["data.seq_len=1", ">= 2"]),
        (["trainer.precision=bf17"], ["trainer.precision='bf17'", "bf16-mixed"]),
        (["student.calibration_rows=-1"], ["student.calibration_rows=-1", ">= 0"]),
        (["student.calibration_rows=4", "student.mixer_init=random"], ["student.calibration_rows=4", "mixer_init"]),
        (["student.calibration_rows=4", "data.ild_fraction=0"], ["student.calibration_rows=4", "ild_fraction=0"]),
        (["student.mamba.gate_init=zero"], ["student.mamba.gate_init='zero'", "constant", "random"]),
        (
            ["strategy=deepspeed_zero3", "teacher.shard=true", "student.calibration_rows=4"],
            ["student.calibration_rows=4", "teacher.shard=true"],
        ),
        (["strategy=deepspeed_zero2", "trainer.precision=bf16-mixed"], ["trainer.precision='bf16-mixed'", "32-true"]),
    ],
)
def test_mistakes_name_the_key_and_value(overrides, expected):
    message = _error(overrides)
    for text in expected:
        assert text in message, (overrides, message)


def test_resolved_yaml_has_the_keys():
    """What `python -m train --cfg job` prints, resolved."""
    text = OmegaConf.to_yaml(compose_config(["conf=tiny", "run_name=probe", "kd.lr=2e-3"]), resolve=True)
    for line in [
        "conf: tiny",
        "run_name: probe",
        "output_dir: outputs/probe",
        "cache_dir: outputs/probe/../tiny_teacher",
        "name_or_path: tiny",
        "kv_lora_rank: 32",
        "seed: 1234",  # data.seed follows the run's seed
        "lr: 0.002",
        "kind: csv",
    ]:
        assert line in text, line
    wandb = compose_config(["conf=zebra_3b", "logger=wandb", "logger.tags=[a,b]"])
    validate_config(wandb)
    assert wandb.logger.name == "zebra_3b" and list(wandb.logger.tags) == ["a", "b"]


def test_hydra_writes_into_output_dir():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=["output_dir=/tmp/run"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "/tmp/run" and cfg.hydra.job.chdir is False and cfg.hydra.output_subdir == ".hydra"
    file_log = cfg.hydra.job_logging.handlers.file  # hydra.runtime.* is only filled in a running job
    assert OmegaConf.to_container(file_log)["filename"] == "${hydra.runtime.output_dir}/.hydra/${hydra.job.name}.log"
    defaults = [d for d in OmegaConf.load(CONF_DIR / "train.yaml").defaults if "override" not in str(d)]
    assert defaults[0] == "_self_" and dict(defaults[-1]) == {"conf": "tiny"}  # the preset comes last


def test_saved_untyped_config_validates_again():
    """`.hydra/config.yaml` loads untyped; validate_config types it and still rejects typos."""
    plain = OmegaConf.create(OmegaConf.to_container(compose_config(["conf=zebra_8b"]), resolve=True))
    validate_config(plain)
    plain.student.mla.kv_lora_rnk = 3
    with pytest.raises(ConfigError, match="kv_lora_rnk"):
        validate_config(plain)


def test_schema_follows_the_model_configs():
    from models import MambaConfig, MLAConfig

    assert issubclass(MLASettings, MLAConfig) and issubclass(MambaSettings, MambaConfig)  # one definition
    mla = {f.name for f in fields(MLASettings)}
    mamba = {f.name for f in fields(MambaSettings)}
    assert mla - {f.name for f in fields(MLAConfig)} == {"energy", "rope_pairs"}
    assert {f.name for f in fields(MLAConfig)} <= mla
    assert mamba - {f.name for f in fields(MambaConfig)} == {"conv_init"}
    assert {f.name for f in fields(MambaConfig)} <= mamba


@pytest.mark.parametrize(
    "layers,expected",
    [("[mla,mamba,mamba,mla]", ["mla", "mamba", "mamba", "mla"]), ("{1:mla,3:mla}", ["mamba", "mla", "mamba", "mla"])],
)
def test_student_layers_is_the_map_the_student_is_built_with(layers, expected):
    """`student.layers` as a list (one kind per layer) or a map {layer: kind} (others Mamba2) reaches the init code."""
    from models.init import build_student_config
    from train.config import teacher_spec

    cfg = validate_config(compose_config(["student.mla_layers=all", f"student.layers={layers}"]))
    kwargs = student_init_kwargs(cfg.student)
    assert kwargs["mla_layers"] is None
    for init_only in ("rope_pairs", "conv_init", "mixer_init"):
        kwargs.pop(init_only)
    assert build_student_config(teacher_spec(cfg.teacher), **kwargs).mixer_types == expected


def test_student_init_kwargs_feed_the_init_code():
    from models import MambaConfig, MLAConfig
    from models.init import build_student_config
    from models.init.transfer import convert_teacher
    from models.mixer_kind import config_from_dict
    from train.config import teacher_spec, typed_config

    cfg = typed_config(compose_config(["conf=lossless"]))
    kwargs = student_init_kwargs(cfg.student)
    inspect.signature(convert_teacher).bind(None, None, **kwargs)  # every key is an argument
    assert kwargs["lossless"] is True and kwargs["mla_layers"] == "all"
    assert "qkv_bias" not in kwargs["mla"] and "in_proj_bias" not in kwargs["mamba"]  # None: the teacher's
    config_from_dict(MLAConfig, kwargs["mla"])
    config_from_dict(MambaConfig, kwargs["mamba"])
    kwargs.pop("rope_pairs"), kwargs.pop("conv_init"), kwargs.pop("mixer_init")
    student = build_student_config(teacher_spec(cfg.teacher), **kwargs)
    mla = student.mixer_settings("mla")
    assert mla.kv_lora_rank == 2 * 32 and mla.qk_rope_head_dim == 32  # exact GQA


STRATEGIES = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_group_entries_build_what_they_say(name):
    """Each conf/strategy entry composes and becomes the Lightning strategy its name promises: ZeRO stage and which
    of optimizer state and parameters leave the GPU (zero3_offload_optimizer keeps the parameters there)."""
    from train.runtime.deepspeed_strategy import offloads_optimizer
    from train.runtime.trainer import make_strategy

    settings = OmegaConf.to_container(compose_config([f"strategy={name}"]).strategy, resolve=True)
    assert settings["name"] == name
    strategy = make_strategy(settings)
    if not name.startswith("deepspeed"):
        return
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == (3 if "zero3" in name else 2)
    assert offloads_optimizer(strategy) == ("offload" in name)
    params_offloaded = zero.get("offload_param", {}).get("device", "none") != "none"
    assert params_offloaded == name.endswith("zero3_offload")


def test_smollm2_preset_fits_its_teacher_within_the_kv_budget(tmp_path):
    """SmolLM2-135M-Instruct's public config.json shape: 8 SMART MLA layers stay under 12 % of the teacher's KV."""
    from transformers import LlamaConfig

    from models.sizes import SMOLLM2_135M

    LlamaConfig(**SMOLLM2_135M, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    _add_tokenizer(tmp_path)
    cfg = compose_config(["conf=smollm2_135m", f"teacher.name_or_path={tmp_path}"])
    validate_config(cfg)
    mla = cfg.student.mla
    assert mla.rope_heads == "per_kv_head"  # one RoPE key per teacher KV head (3) is cached beside the latent
    student = cfg.student.num_mla_layers * (mla.kv_lora_rank + 3 * mla.qk_rope_head_dim)
    teacher = 30 * 2 * 3 * 64
    assert cfg.student.mla_layers == "smart" and "select" in cfg.stages
    assert student / teacher == pytest.approx(0.111, abs=1e-3) and student / teacher <= 0.12


@pytest.fixture(scope="module")
def short_teacher(tmp_path_factory) -> Path:
    """A config.json-only Llama pretrained to 256 positions, RoPE unscaled (as SmolLM2's 8K); head_dim 32 fits the
    default MLA dims."""
    from transformers import LlamaConfig

    from models.sizes import TINY_LLAMA

    path = tmp_path_factory.mktemp("short_teacher")
    shape = {**TINY_LLAMA, "hidden_size": 128, "head_dim": 32, "max_position_embeddings": 256}
    LlamaConfig(**shape, architectures=["LlamaForCausalLM"]).save_pretrained(path)
    _add_tokenizer(path)
    return path


def _short(teacher: Path, *extra: str) -> list[str]:
    return [f"teacher.name_or_path={teacher}", "student.mla_layers=all", "stages=[init]", *extra]


def test_seq_len_beyond_the_teachers_positions_needs_rope_scaling(short_teacher):
    message = _error(_short(short_teacher, "data.seq_len=1024"))
    assert "data.seq_len=1024" in message and "max_position_embeddings 256" in message
    assert "teacher.rope_scaling={rope_type:yarn,factor:4}" in message  # what to set, with the factor needed
    cfg = validate_config(
        compose_config(_short(short_teacher, "data.seq_len=1024", "teacher.rope_scaling={rope_type:yarn,factor:4}"))
    )
    assert cfg.teacher.rope_scaling.as_dict() == {"rope_type": "yarn", "factor": 4.0}
    message = _error(_short(short_teacher, "data.seq_len=2048", "teacher.rope_scaling={rope_type:yarn,factor:4}"))
    assert "max_position_embeddings 1024" in message  # 256 x 4: still too short


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        (
            "{rope_type:default,factor:4}",
            "teacher.rope_scaling.rope_type='default' is invalid; allowed: ['linear', 'yarn']",
        ),
        ("{rope_type:yarn,factor:0.5}", "teacher.rope_scaling.factor=0.5 is invalid; allowed: a number > 1"),
        ("{rope_type:yarn}", "teacher.rope_scaling.factor=None is invalid"),
    ],
)
def test_bad_rope_scaling_is_named(short_teacher, scaling, expected):
    assert expected in _error(_short(short_teacher, f"teacher.rope_scaling={scaling}"))


def test_rope_scaling_is_refused_where_it_cannot_apply(teacher_dirs):
    assert "teacher.rope_scaling" in _error(["conf=tiny", "teacher.rope_scaling={rope_type:yarn,factor:2}"])
    llama3 = teacher_dirs["meta-llama/Llama-3.2-1B-Instruct"]  # already scaled (llama3 RoPE, 131072 positions)
    message = _error(
        ["conf=zebra_1b", f"teacher.name_or_path={llama3}", "teacher.rope_scaling={rope_type:yarn,factor:2}"]
    )
    assert "already scaled (llama3)" in message and "131072" in message


def test_the_documented_long_context_overrides_validate(teacher_dirs):
    """docs/performance.md's 8K / 16K / 32K commands, read from the page, compose and validate on the 1B's shapes."""
    import re
    import shlex

    page = (Path(__file__).resolve().parents[2] / "docs" / "performance.md").read_text()
    section = page.split("### Training at 8K, 16K and 32K")[1].split("```")[1]
    commands = [shlex.split(c) for c in re.sub(r"\\\n\s*", " ", section).splitlines() if c.startswith("python")]
    assert [c[c.index("conf=zebra_1b") + 1] for c in commands] == [f"data.seq_len={n}" for n in (8192, 16384, 32768)]
    local = teacher_dirs["meta-llama/Llama-3.2-1B-Instruct"]
    for command in commands:
        cfg = compose_config([*command[3:], f"teacher.name_or_path={local}"])
        validate_config(cfg)
        assert cfg.student.document_masking == "auto" and cfg.teacher.attn_implementation == "auto"
        assert cfg.data.seq_len * cfg.data.micro_batch_size <= 32768
