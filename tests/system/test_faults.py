"""Reliability: every bad input or fault a person or an app can meet ends as one line, never as a
traceback, a hung process or a half-written file (issue 8, the CLI and API rows of RELIABILITY.md).

Each test names its row. Faults are made for real where that is cheap: damaged GGUF files, a real
SIGINT to a real process, writes to /dev/full (ENOSPC from the kernel) and a file-size limit that
stops a real export half-way. Where the fault cannot be made here (a machine without a GPU on a
machine with one, too little RAM), the probe that reports it is replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections import namedtuple
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from edgespec import Engine
from edgespec.cli.main import cli
from edgespec.errors import (
    EdgespecError,
    ExportError,
    IncompatibleModelsError,
    ModelCacheError,
    ModelLoadError,
    PromptError,
    SettingsError,
)
from edgespec.exporters import vocab_trim as vt
from edgespec.load import models
from edgespec.load.memory import KV_BYTES, check_memory, memory_need
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..conftest import tiny_model_args
from ..helpers import assert_one_line_error, machine

ROOT = Path(__file__).resolve().parents[2]
HAS_DEV_FULL = Path("/dev/full").exists()
needs_dev_full = pytest.mark.skipif(not HAS_DEV_FULL, reason="needs /dev/full (Linux) to fill a disk")
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and resource limits")


@pytest.fixture()
def runner(tmp_path, monkeypatch) -> CliRunner:
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("EDGESPEC_SKIP_MEMORY_CHECK", raising=False)
    return CliRunner()


@pytest.fixture()
def api_env(tmp_path, monkeypatch):
    """A private user folder (tuned profiles) and cache for Engine tests."""
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("EDGESPEC_SKIP_MEMORY_CHECK", raising=False)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def run_args(tiny_pair, *extra: str, ctx: int = 256) -> list[str]:
    return ["run", *tiny_model_args(tiny_pair, ctx), *extra]


def engine(target, draft="none", **kwargs) -> Engine:
    return Engine(target, draft, n_ctx=kwargs.pop("n_ctx", 256), threads=1, **kwargs)


# --- damaged GGUF files ------------------------------------------------------------------------------


def rewrite_gguf(source: Path, out: Path, *, arch: str | None = None, values: dict | None = None) -> Path:
    """A copy of a GGUF with another architecture name and/or other metadata values."""
    reader = gguf.GGUFReader(str(source))
    old = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    new = arch or old
    writer = gguf.GGUFWriter(str(out), new)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = new + key[len(old) :] if key.startswith(old + ".") else key
        value = (values or {}).get(name, field.contents())
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, field.types[0], field.types[-1])
        else:
            writer.add_key_value(name, value, field.types[0])
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return out


def damage_tensor(source: Path, out: Path, name: str, fill: int) -> Path:
    """A copy whose tensor `name` has every byte of its data set to `fill` (header intact)."""
    tensor = next(t for t in gguf.GGUFReader(str(source)).tensors if t.name == name)
    data = bytearray(source.read_bytes())
    data[tensor.data_offset : tensor.data_offset + tensor.n_bytes] = bytes([fill]) * tensor.n_bytes
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def broken(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    """Bad model files, by what is wrong with them."""
    folder = tmp_path_factory.mktemp("broken")
    target = tiny_pair[0]
    data = target.read_bytes()
    (folder / "not-gguf.gguf").write_bytes(b"PK\x03\x04 a zip file, not a model")
    (folder / "empty.gguf").write_bytes(b"")
    (folder / "cut-header.gguf").write_bytes(data[:5000])
    (folder / "cut-data.gguf").write_bytes(data[: len(data) // 2])
    return {
        "missing": folder / "missing.gguf",
        "not-gguf": folder / "not-gguf.gguf",
        "empty": folder / "empty.gguf",
        "cut-header": folder / "cut-header.gguf",
        "cut-data": folder / "cut-data.gguf",
        "arch": rewrite_gguf(target, folder / "arch.gguf", arch="madeup"),
        # valid headers, damaged values: llama.cpp's own checks refuse these
        "blocks": rewrite_gguf(target, folder / "blocks.gguf", values={"llama.block_count": 7}),
        "width": rewrite_gguf(target, folder / "width.gguf", values={"llama.embedding_length": 128}),
        # valid header, damaged tensor data: Q8_0 scales of 0xFFFF are NaN
        "nan": damage_tensor(target, folder / "nan.gguf", "output.weight", 0xFF),
        "inf": damage_tensor(target, folder / "inf.gguf", "blk.1.attn_q.weight", 0x7C),
    }


FILE_FAULTS = {
    "missing": "model file not found",
    "not-gguf": "not a GGUF model file",
    "empty": "",
    "cut-header": "",
    "cut-data": "",
    "arch": "unknown model architecture: 'madeup'",
    "blocks": "blk.3",
    "width": "n_rot",
    "nan": "is damaged: its weights give NaN or infinite scores",
    "inf": "is damaged: its weights give NaN or infinite scores",
}


@pytest.mark.parametrize("fault", sorted(FILE_FAULTS))
def test_bad_target_file_api(api_env, broken, tiny_pair, fault):
    """Rows: missing, non-GGUF, truncated, corrupt model files; an unsupported architecture (API)."""
    with pytest.raises(ModelLoadError) as info:
        engine(broken[fault], tiny_pair[1])
    message = one_line(info.value)
    assert FILE_FAULTS[fault] in message and broken[fault].name in message


@pytest.mark.parametrize("fault", ["not-gguf", "cut-data", "arch", "nan"])
def test_bad_draft_file_api(api_env, broken, tiny_pair, fault):
    with pytest.raises(ModelLoadError) as info:
        engine(tiny_pair[0], broken[fault])
    assert FILE_FAULTS[fault] in one_line(info.value)


@pytest.mark.parametrize("fault", ["empty", "cut-header", "arch", "blocks", "width", "nan", "inf"])
def test_bad_target_file_cli(runner, broken, fault):
    """Rows as above, through `edgespec run` (missing, non-GGUF, truncated: tests/system/test_cli.py)."""
    result = runner.invoke(cli, ["run", "--target", str(broken[fault]), "--draft", "none", "hi"])
    assert result.exit_code == 1
    assert_one_line_error(result, FILE_FAULTS[fault])


@pytest.mark.parametrize("fault", ["missing", "cut-data", "arch"])
def test_bad_draft_file_cli(runner, broken, tiny_pair, fault):
    result = runner.invoke(cli, ["run", "--target", str(tiny_pair[0]), "--draft", str(broken[fault]), "hi"])
    assert result.exit_code == 1
    assert_one_line_error(result, FILE_FAULTS[fault])


def test_damage_that_leaves_finite_scores_is_not_detectable(api_env, tiny_pair, tmp_path):
    """Row: corrupt tensor data that stays finite. GGUF has no checksums: the model loads and writes
    other text, without crashing. (Default models are sha256-checked: see the cache rows.)"""
    damaged = damage_tensor(tiny_pair[0], tmp_path / "finite.gguf", "blk.0.ffn_up.weight", 0x11)
    with engine(damaged, tiny_pair[1]) as e:
        result = e.generate("the cat sat", max_tokens=12, raw=True)
    with engine(tiny_pair[0], tiny_pair[1]) as e:
        healthy = e.generate("the cat sat", max_tokens=12, raw=True)
    assert result.finish_reason == "length" and len(result.tokens) == 12
    assert result.tokens != healthy.tokens


# --- pairs that do not go together -------------------------------------------------------------------


def test_incompatible_pair_api(api_env, tiny_pair, tiny_changed_vocab):
    """Row: an incompatible draft/target pair (CLI: tests/system/test_cli.py::test_incompatible_pair)."""
    with pytest.raises(IncompatibleModelsError) as info:
        engine(tiny_pair[0], tiny_changed_vocab)
    assert "token 300 differs" in one_line(info.value)


@pytest.fixture(scope="module")
def trimmed(tiny_pair, tmp_path_factory) -> Path:
    """The tiny drafter trimmed to 400 tokens (frequencies all zero: kept by id)."""
    out = tmp_path_factory.mktemp("trim") / "draft-400.gguf"
    vt.trim_gguf(tiny_pair[1], out, np.zeros(554, dtype=np.int64), 400)
    return out


def test_trimmed_drafter_for_another_target_api_and_cli(runner, tiny_changed_vocab, trimmed):
    """Row: a trimmed drafter whose map does not fit the target (load: tests/model/test_vocab_trim.py)."""
    with pytest.raises(IncompatibleModelsError) as info:
        engine(tiny_changed_vocab, trimmed)
    assert "should be target token 300" in one_line(info.value)
    result = runner.invoke(cli, ["run", "--target", str(tiny_changed_vocab), "--draft", str(trimmed), "hi"])
    assert_one_line_error(result, "should be target token 300")


# --- prompts and settings ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_engine(tiny_pair):
    with Engine(tiny_pair[0], tiny_pair[1], n_ctx=256, threads=1, cache_prompt=False) as e:
        yield e


@pytest.mark.parametrize("prompt", ["", "   \n", []])
def test_empty_prompt_api(shared_engine, prompt):
    """Row: an empty prompt (CLI: tests/system/test_cli.py::test_empty_prompt)."""
    with pytest.raises(PromptError) as info:
        shared_engine.generate(prompt)
    assert "empty" in one_line(info.value)
    assert not shared_engine.busy


def test_prompt_longer_than_the_context_api(shared_engine):
    """Row: a prompt longer than the context (CLI: tests/system/test_cli.py::test_prompt_longer_than_context;
    text prompts: tests/model/test_api.py::test_prompt_too_long_is_a_prompt_error)."""
    with pytest.raises(PromptError) as info:
        shared_engine.generate([5] * 300)
    assert "context holds 256" in one_line(info.value)
    assert shared_engine.generate("hi", max_tokens=3).completion_tokens == 3  # still usable


BAD_SAMPLING = [
    ("temperature", -0.5, "--temperature", "-0.5"),
    ("top_p", 0.0, "--top-p", "0"),
    ("top_p", 1.5, "--top-p", "1.5"),
    ("top_k", -1, "--top-k", "-1"),
    ("min_p", 1.0, "--min-p", "1"),
]


@pytest.mark.parametrize(("key", "value", "flag", "text"), BAD_SAMPLING)
def test_invalid_sampling_values(runner, shared_engine, tiny_pair, key, value, flag, text):
    """Row: invalid sampling values: SettingsError naming the option (API), exit 2 naming the
    flag (CLI), before any model is loaded or any token generated."""
    with pytest.raises(SettingsError) as info:
        shared_engine.generate("hi", **{key: value})
    assert key in one_line(info.value)
    assert not shared_engine.busy
    result = runner.invoke(cli, run_args(tiny_pair, f"{flag}={text}", "hi"))
    assert result.exit_code == 2
    assert_one_line_error(result, flag)


def test_context_filling_up_mid_generation(runner, api_env, tiny_pair):
    """Row: the context fills up mid-generation: finish reason "length", every token up to the
    last cell, output identical to target-only, no crash (API and CLI)."""
    with Engine(tiny_pair[0], tiny_pair[1], n_ctx=48, threads=1, draft_max=8) as e:
        prompt = e.tokenize("the cat sat on the mat", raw=True)
        spec = e.generate(prompt, max_tokens=1000)
    with Engine(tiny_pair[0], "none", n_ctx=48, threads=1) as e:
        alone = e.generate(prompt, max_tokens=1000)
    assert spec.finish_reason == "length" and len(prompt) + len(spec.tokens) == 48
    assert spec.tokens == alone.tokens
    result = runner.invoke(
        cli, run_args(tiny_pair, "--raw", "--max-tokens", "1000", "--json", "the cat sat on the mat", ctx=48)
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["finish_reason"] == "length" and record["tokens"] == spec.tokens


# --- not enough RAM ----------------------------------------------------------------------------------


def fake_available(monkeypatch, n_bytes: int) -> None:
    import psutil

    memory = namedtuple("svmem", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(64 << 30, n_bytes))


def no_llama_load(monkeypatch) -> None:
    """Make any llama.cpp load fail loudly: the memory check must refuse before one starts."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("llama.cpp was asked to load a model")

    monkeypatch.setattr(LlamaCppRuntime, "__init__", refuse)


def test_memory_need_from_the_gguf_metadata(tiny_pair, broken):
    need = memory_need(tiny_pair[0], 256)
    # tiny target: 3 layers, 2 KV heads of 96 / 4 = 24 values for K and for V
    assert need.weights == tiny_pair[0].stat().st_size
    assert need.kv_cache == KV_BYTES * 3 * 256 * 2 * (24 + 24) and need.total == need.weights + need.kv_cache
    assert memory_need(tiny_pair[0], 1024).kv_cache == 4 * need.kv_cache
    on_gpu = memory_need(tiny_pair[0], 256, gpu_layers=-1, gpu_usable=True)
    assert on_gpu.weights == 0 and on_gpu.kv_cache == 0
    assert memory_need(tiny_pair[0], 256, gpu_layers=-1, gpu_usable=False) == need  # no GPU: all in RAM
    part = memory_need(tiny_pair[0], 256, gpu_layers=1, gpu_usable=True)
    assert part.kv_cache == need.kv_cache * 2 // 3
    for fault in ("missing", "not-gguf", "empty", "cut-header"):
        assert memory_need(broken[fault], 256) is None  # loading reports what is wrong


def test_model_larger_than_the_available_ram_api(api_env, tiny_pair, monkeypatch):
    """Row: a model larger than the available RAM: refused before llama.cpp loads anything, with
    the numbers and what to do; EDGESPEC_SKIP_MEMORY_CHECK=1 loads anyway."""
    fake_available(monkeypatch, 300 << 10)
    with monkeypatch.context() as patch:
        no_llama_load(patch)
        with pytest.raises(ModelLoadError) as info:
            engine(tiny_pair[0], tiny_pair[1])
        message = one_line(info.value)
        assert re.match(
            r"not enough memory: target.gguf and draft.gguf need about [\d,]+ KiB together "
            r"\([\d,]+ KiB \+ [\d,]+ KiB: weights and KV caches for 256 tokens\)",
            message,
        ), message
        assert "only 300 KiB of RAM is available" in message and "--gpu-layers" in message
        assert "EDGESPEC_SKIP_MEMORY_CHECK=1" in message
        with pytest.raises(ModelLoadError, match="target.gguf needs about"):
            engine(tiny_pair[0], "ngram")  # a profile's path checks the same way:
        with pytest.raises(ModelLoadError, match="not enough memory"):
            Engine(tiny_pair[0], tiny_pair[1], profile="cpu-only", n_ctx=256, threads=1)
    monkeypatch.setenv("EDGESPEC_SKIP_MEMORY_CHECK", "1")
    with engine(tiny_pair[0], tiny_pair[1]) as e:
        assert e.generate("hi", max_tokens=2).completion_tokens == 2


def test_model_larger_than_the_available_ram_cli(runner, tiny_pair, monkeypatch):
    fake_available(monkeypatch, 600 << 10)  # enough for the target alone, not for both
    no_llama_load(monkeypatch)
    result = runner.invoke(cli, run_args(tiny_pair, "hi"))
    assert result.exit_code == 1
    assert_one_line_error(result, "only 600 KiB of RAM is available")


def test_check_memory_counts_weights_and_kv_cache(tiny_pair):
    need = memory_need(tiny_pair[0], 4096)
    check_memory([need], available=need.total)  # exactly enough is enough
    with pytest.raises(ModelLoadError) as info:
        check_memory([need, None], available=need.total - 1)
    assert "KV cache for 4096 tokens" in one_line(info.value)


# --- a GPU profile without a usable GPU --------------------------------------------------------------


@pytest.fixture()
def cpu_only_machine(monkeypatch):
    """This machine as one whose llama.cpp has no GPU (as CI's, and on a GPU machine too)."""
    import edgespec.placement.hardware

    hw = machine(cpu_model="Test CPU without GPU", physical_cores=2, logical_cores=2)
    monkeypatch.setattr(edgespec.placement.hardware, "detect_hardware", lambda: hw)
    return hw


@pytest.fixture(scope="module")
def shared_config(tmp_path_factory):
    """One user folder for the fallback tests: the tiny pair is tuned for cpu-only once."""
    return tmp_path_factory.mktemp("config")


@pytest.mark.parametrize("name", ["gpu-all", "partial", "dovetail"])
def test_gpu_profile_without_a_gpu_falls_back_to_cpu_cli(
    runner, tiny_pair, cpu_only_machine, shared_config, monkeypatch, name
):
    """Row: a GPU profile on a machine without a usable GPU: one warning line naming the profile
    and why, then it runs on the CPU (the cpu-only profile) with output identical to target-only."""
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(shared_config))
    args = run_args(tiny_pair, "--max-tokens", "12", "--json", "the cat sat")
    result = runner.invoke(cli, [*args[:1], "--profile", name, *args[1:]])
    assert result.exit_code == 0, result.output
    warning = (
        f"profile {name} needs a GPU, but there is none llama.cpp can use (llama.cpp was built with CPU "
        "only; nvidia-smi not found): running on the CPU with the cpu-only profile instead"
    )
    assert warning in result.stderr.splitlines()
    alone = runner.invoke(
        cli, run_args(tiny_pair, "--draft", "none", "--max-tokens", "12", "--json", "the cat sat")
    )
    assert json.loads(result.stdout)["tokens"] == json.loads(alone.stdout)["tokens"]
    assert json.loads(result.stdout)["draft"].startswith("profile tuned-cpu-only-")


def test_gpu_profile_without_a_gpu_falls_back_to_cpu_api(api_env, tiny_pair, cpu_only_machine, caplog):
    notes: list[str] = []
    with Engine(
        tiny_pair[0], tiny_pair[1], profile="dovetail", n_ctx=256, threads=1, on_note=notes.append
    ) as e:
        assert e.profile is not None and e.profile.name == "tuned-cpu-only-" + e.profile.name.split("-")[-1]
        assert e._pair.engine.target.settings.gpu_layers == 0
        assert e.generate("hi", max_tokens=4).completion_tokens == 4
    assert any(line.startswith("profile dovetail needs a GPU") for line in notes)
    # Without on_note the warning goes to the "edgespec" logger (stderr when logging is not set up).
    with caplog.at_level(logging.WARNING, logger="edgespec"):
        Engine(tiny_pair[0], tiny_pair[1], profile="gpu-all", n_ctx=256, threads=1).close()
    assert [r.getMessage() for r in caplog.records if r.name == "edgespec"][0].startswith(
        "profile gpu-all needs a GPU"
    )


def test_user_gpu_profile_without_a_gpu_keeps_its_drafting(api_env, tiny_pair, cpu_only_machine, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text(
        'schema = 1\nname = "mine"\ndescription = "test"\n[requires]\ngpu = true\n[target]\n'
        'gpu_layers = "all"\n[draft]\ngpu_layers = 2\n[speculation]\ndrafters = ["ngram"]\n'
        'controller = "fixed"\nk = 3\n'
    )
    notes: list[str] = []
    with Engine(tiny_pair[0], tiny_pair[1], profile=mine, n_ctx=256, threads=1, on_note=notes.append) as e:
        assert e.profile.name == "mine" and e.profile.target.gpu_layers == 0 and e.draft_max == 3
        assert e._pair.engine.target.settings.gpu_layers == 0
        assert type(e.drafter).__name__ == "NgramDrafter"
    assert notes == [
        "profile mine needs a GPU, but there is none llama.cpp can use (llama.cpp was built with CPU only; "
        "nvidia-smi not found): running on the CPU with both models moved to the CPU (gpu_layers = 0)"
    ]


def test_cpu_fallback_only_where_there_is_no_usable_gpu(api_env):
    from edgespec.placement.profiles import cpu_fallback, load_profile

    from ..helpers import cuda

    gpu_all, cpu_only = load_profile("gpu-all"), load_profile("cpu-only")
    assert cpu_fallback(gpu_all, machine(cuda(8_000))) is None  # a GPU: run as it says
    assert cpu_fallback(cpu_only, machine()) is None  # nothing on a GPU: nothing to say
    fallback, warning = cpu_fallback(gpu_all, machine())
    assert fallback == cpu_only and warning.startswith("profile gpu-all needs a GPU")


def test_gpu_layers_without_a_gpu_warn_and_run_on_cpu(runner, tiny_pair, cpu_only_machine):
    result = runner.invoke(cli, run_args(tiny_pair, "--gpu-layers", "-1", "--max-tokens", "3", "hi"))
    assert result.exit_code == 0, result.output
    assert (
        "GPU offload asked for (gpu_layers -1), but there is no GPU llama.cpp can use (llama.cpp was built "
        "with CPU only; nvidia-smi not found): running on the CPU"
    ) in result.stderr


# --- the default model cache -------------------------------------------------------------------------


@pytest.fixture()
def tiny_default_target(tiny_pair, tmp_path, monkeypatch) -> models.DefaultModel:
    """The tiny target shipped as the default target: three importable part packages."""
    data = tiny_pair[0].read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    site = tmp_path / "site"
    packages = []
    for i in range(3):
        package = site / f"tinypart{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / "part.bin").write_bytes(data[cuts[i] : cuts[i + 1]])
        packages.append((f"tinypart{i}", "data/part.bin"))
    monkeypatch.syspath_prepend(str(site))
    model = models.DefaultModel(
        name="tiny-target",
        role="target",
        description="tiny target",
        packages=tuple(packages),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setitem(models.DEFAULT_MODELS, "target", model)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    yield model
    for i in range(3):
        sys.modules.pop(f"tinypart{i}", None)


def test_corrupted_model_cache_is_detected_and_rebuilt_cli(runner, tiny_default_target):
    """Row: a corrupted model cache: a changed file is hashed again and joined again from its parts
    (API: tests/unit/test_models.py::test_corrupt_cache_is_detected_and_rebuilt)."""
    args = ["run", "--target", "default", "--draft", "none", "--threads", "1", "--ctx", "256"]
    args += ["--raw", "--max-tokens", "8", "--json", "the cat"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    path = models.cached_path(tiny_default_target)
    flip_a_byte(path)
    again = runner.invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["tokens"] == json.loads(first.stdout)["tokens"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tiny_default_target.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".verified.json"]


def test_silent_bit_rot_in_the_cache_is_found_by_models_verify(runner, tiny_default_target):
    """Row: cache damage that keeps the file's size and mtime (its stamp still matches, so a run
    does not re-hash 1 GB): `edgespec models --verify` finds it, and the next use rebuilds it."""
    path = models.resolve(tiny_default_target)
    flip_a_byte(path, keep_mtime=True)
    assert models.is_verified(tiny_default_target)  # the stamp cannot tell
    check = runner.invoke(cli, ["models", "--verify", "--json"])
    row = next(m for m in json.loads(check.stdout)["default_pair"] if m["role"] == "target")
    assert row["cached"] and not row["verified"] and row["damaged"]
    assert (
        "damaged (wrong sha256): joined again on next use"
        in runner.invoke(cli, ["models", "--verify"]).stdout
    )
    models.resolve(tiny_default_target)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tiny_default_target.sha256


def flip_a_byte(path: Path, keep_mtime: bool = False) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the tensor data: the header still parses
    path.write_bytes(bytes(data))
    # Set the mtime explicitly: file systems with coarse timestamps could keep it unchanged.
    mtime = stat.st_mtime_ns if keep_mtime else stat.st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(stat.st_atime_ns, mtime))


# --- disk full ---------------------------------------------------------------------------------------


@pytest.fixture()
def full_disk(monkeypatch):
    """Make the temporary files that writers create (tempfile.mkstemp) point at /dev/full, where
    every write fails with ENOSPC, as on a full disk. `full_disk(predicate)` limits it to some names."""

    def arm(when=lambda name: True):
        real = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            fd, name = real(*args, **kwargs)
            if when(name):
                os.close(fd)
                os.unlink(name)
                os.symlink("/dev/full", name)
                fd = os.open(name, os.O_WRONLY)
            return fd, name

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    return arm


def old_output(folder: Path, name: str = "out.gguf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"the previous export")
    return path


def assert_untouched(path: Path) -> None:
    """The earlier output is as it was, and nothing else is in its folder (no temporary files)."""
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@needs_dev_full
def test_disk_full_during_vocab_trim_api(tiny_pair, tmp_path, full_disk):
    """Row: the disk fills up during an export: ExportError (also an OSError) naming the full disk;
    no partial output, the old output untouched."""
    out = old_output(tmp_path / "out")
    full_disk()
    with pytest.raises(ExportError) as info:
        vt.trim_gguf(tiny_pair[1], out, np.zeros(554, dtype=np.int64), 400)
    assert isinstance(info.value, OSError)
    message = one_line(info.value)
    assert (
        message.startswith(f"cannot write {out}: the disk is full (")
        and "no partial file was left" in message
    )
    assert_untouched(out)


@needs_dev_full
def test_disk_full_during_vocab_trim_cli(runner, tiny_pair, tmp_path, full_disk):
    out = old_output(tmp_path / "out")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 20)
    full_disk()
    result = runner.invoke(cli, trim_args(tiny_pair, out, "--corpus", str(corpus)))
    assert result.exit_code == 1
    assert_one_line_error(result, "the disk is full")
    assert_untouched(out)


def test_too_little_free_space_is_refused_before_writing(tiny_pair, tmp_path, monkeypatch):
    import shutil

    out = old_output(tmp_path / "out")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 100 << 10))
    with pytest.raises(ExportError) as info:
        vt.trim_gguf(tiny_pair[1], out, np.zeros(554, dtype=np.int64), 400)
    assert "and only 100 KiB is free in" in one_line(info.value)
    assert_untouched(out)


def trim_args(tiny_pair, out: Path, *extra: str) -> list[str]:
    return [
        "export", "vocab-trim", "--target", str(tiny_pair[0]), "--draft", str(tiny_pair[1]),
        "--threads", "1", "--keep", "400", "--out", str(out), *extra,
    ]  # fmt: skip


@posix_only
def test_disk_filling_half_way_in_a_real_process(tiny_pair, tmp_path):
    """Row: the disk fills up half-way through writing (a file-size limit makes the kernel refuse
    writes past 64 KiB, in a real `edgespec export vocab-trim` process): exit 1, one line, nothing
    half-written left."""
    import resource

    out = old_output(tmp_path / "out")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 20)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run(
        [sys.executable, "-m", "edgespec", *trim_args(tiny_pair, out, "--corpus", str(corpus))],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
        env=child_env(tmp_path),
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot write {out}: ") and "no partial file was left" in lines[-1]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert_untouched(out)


@needs_dev_full
def test_disk_full_while_joining_a_default_model(tiny_default_target, full_disk, monkeypatch):
    """Row (cache): no room to join a default model on first use: ModelCacheError, nothing left."""
    full_disk()
    with pytest.raises(ModelCacheError) as info:
        models.resolve(tiny_default_target)
    message = one_line(info.value)
    assert "the disk is full" in message and "EDGESPEC_CACHE_DIR" in message
    assert not any(models.cache_dir().iterdir())


def test_too_little_room_to_join_a_default_model_is_refused_first(tiny_default_target, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 100 << 10))
    with pytest.raises(
        ModelCacheError, match=r"needs about [\d,]+ KiB, and only 100 KiB is free in .*EDGESPEC_CACHE_DIR"
    ):
        models.resolve(tiny_default_target)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Hugging Face Qwen2 checkpoint (the export extra), or skip."""
    for module in ("torch", "transformers", "tokenizers", "safetensors"):
        pytest.importorskip(module)
    from .. import hfmodels

    return hfmodels.build_tiny_hf(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=1)


@needs_dev_full
@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_disk_full_during_gguf_export(checkpoint, tmp_path, full_disk, quant):
    """Row: disk full during `export gguf`: while writing the F16 file, or inside llama.cpp's
    quantizer (its output write fails): ExportError, old output untouched, no temporary files."""
    from edgespec.exporters.gguf import export_gguf

    out = old_output(tmp_path / "out")
    full_disk(lambda name: not name.endswith(".f16.gguf"))  # the quantizer's input still fits
    with pytest.raises(ExportError) as info:
        export_gguf(checkpoint, out, quant)
    message = one_line(info.value)
    assert "the disk is full" in message if quant == "F16" else "could not quantize to Q8_0" in message
    assert_untouched(out)


# --- Ctrl-C ------------------------------------------------------------------------------------------


def child_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(EDGESPEC_CACHE_DIR=str(tmp_path / "cache"), EDGESPEC_CONFIG_DIR=str(tmp_path / "config"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("EDGESPEC_DEBUG", None)
    return env


DRIVER = textwrap.dedent(
    """
    # `edgespec` in a real process, with a slowed-down step so that a signal lands mid-way.
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if inherited ignored
    what = sys.argv.pop(1)
    if what == "generate":
        from edgespec.runtimes.llama_cpp import LlamaCppRuntime as cls
        name = "eval"
    else:
        import gguf
        cls, name = gguf.GGUFWriter, "write_tensor_data"
    real = getattr(cls, name)
    def slow(*args, **kwargs):
        if what == "export":
            print("writing", flush=True)
        time.sleep(0.05)
        return real(*args, **kwargs)
    setattr(cls, name, slow)
    from edgespec.cli.main import main
    sys.argv[0] = "edgespec"
    main()
    """
)


def interrupt(tmp_path: Path, what: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run `edgespec ARGS`, send SIGINT once it prints something, and collect what it did."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(driver), what, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(tmp_path),
    )
    try:
        first = proc.stdout.read(1)  # the first streamed token, or the first tensor being written
        assert first, proc.stderr.read().decode()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, (first + out).decode(), err.decode())


@posix_only
def test_ctrl_c_during_generation_real_process(tiny_pair, tmp_path):
    """Row: Ctrl-C during `edgespec run`: exit 130, "interrupted", no traceback, within seconds."""
    done = interrupt(tmp_path, "generate", run_args(tiny_pair, "--max-tokens", "5000", "hi", ctx=8192))
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert done.stdout  # what was generated before the signal was shown


@posix_only
def test_ctrl_c_during_vocab_trim_real_process(tiny_pair, tmp_path):
    """Row: Ctrl-C during an export: exit 130, no partial output, the old output untouched."""
    out = old_output(tmp_path / "out")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 20)
    done = interrupt(tmp_path, "export", trim_args(tiny_pair, out, "--corpus", str(corpus)))
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert_untouched(out)


def test_ctrl_c_during_generation_api(api_env, tiny_pair, monkeypatch):
    """Row: KeyboardInterrupt inside Engine.generate reaches the app, the engine is released and
    its next answer is exactly what a fresh engine gives."""
    with engine(tiny_pair[0], tiny_pair[1]) as e:
        expected = e.generate("the cat sat", max_tokens=30, raw=True).tokens
    with engine(tiny_pair[0], tiny_pair[1]) as e:
        real = LlamaCppRuntime.eval
        calls = []

        def eval_then_interrupt(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 12:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(LlamaCppRuntime, "eval", eval_then_interrupt)
            with pytest.raises(KeyboardInterrupt):
                e.generate("the cat sat", max_tokens=30, raw=True)
        assert not e.busy
        assert e.generate("the cat sat", max_tokens=30, raw=True).tokens == expected


def test_ctrl_c_during_generation_cli(runner, tiny_pair, monkeypatch):
    real = LlamaCppRuntime.eval
    calls = []

    def eval_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaCppRuntime, "eval", eval_then_interrupt)
    result = runner.invoke(cli, run_args(tiny_pair, "--max-tokens", "200", "hi"))
    assert result.exit_code == 130
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.strip().splitlines()[-1] == "interrupted"


def test_ctrl_c_during_gguf_export_cli(runner, checkpoint, tmp_path, monkeypatch):
    """Row: Ctrl-C during `edgespec export gguf` (F16 and the quantizer's input): exit 130, nothing left
    (API: tests/model/test_export_gguf.py::test_failure_midway_leaves_no_file_and_keeps_the_old_one)."""
    import edgespec.exporters.gguf as exporter

    real = exporter._convert
    calls = []

    def convert_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(exporter, "_convert", convert_then_interrupt)
    for quant in ("F16", "Q8_0"):
        calls.clear()
        out = old_output(tmp_path / quant)
        args = ["export", "gguf", "--model", str(checkpoint), "--out", str(out), "--quant", quant]
        result = runner.invoke(cli, args)
        assert result.exit_code == 130 and result.stderr.strip().splitlines()[-1] == "interrupted"
        assert_untouched(out)


# --- the contract ------------------------------------------------------------------------------------


def test_every_error_above_is_an_edgespec_error():
    """What the rows raise is what an embedding app catches: one base class, one-line messages."""
    for cls in (
        ModelLoadError,
        ModelCacheError,
        IncompatibleModelsError,
        PromptError,
        SettingsError,
        ExportError,
    ):
        assert issubclass(cls, EdgespecError)
    from edgespec.fileio import ExportWriteError, describe_write_error

    assert issubclass(ExportWriteError, ExportError) and issubclass(ExportWriteError, OSError)
    full = OSError(errno.ENOSPC, "No space left on device")
    assert "the disk is full" in describe_write_error(full, Path("/x/y.gguf"))
