"""The two guarantees: llama.cpp's kernels by default, `exact` opt-in and verified by a probe."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from edgespec.errors import SettingsError
from edgespec.runtimes import invariance
from edgespec.runtimes.base import RuntimeSettings
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..tinymodels import build_tiny_model

SETTINGS = RuntimeSettings(n_ctx=256, n_threads=1)


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with F32 weights: llama.cpp's F32 matmul rounds a row otherwise in a batch."""
    return build_tiny_model(tmp_path_factory.mktemp("f32") / "f32.gguf", seed=11, quantized=False)


@pytest.fixture()
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


def test_the_default_is_llama_cpps_kernels(tiny_pair, config_dir):
    assert RuntimeSettings().kernels == "fast"
    assert RuntimeSettings().flash_attn == "off"  # llama-cpp-python's Llama default
    with LlamaCppRuntime(tiny_pair[0], SETTINGS) as rt:
        assert rt.guarantee == "distribution"
        assert rt.invariance is None
    assert not (config_dir / "invariance").exists()  # nothing probed


def test_exact_is_probed_on_the_loaded_model_and_cached(tiny_pair, config_dir, monkeypatch):
    with LlamaCppRuntime(tiny_pair[0], replace(SETTINGS, kernels="exact")) as rt:
        assert rt.guarantee == "exact"
        result = rt.invariance
        assert result is not None and result.passed
        assert {(c.type_k, c.type_v) for c in result.candidates} == set(invariance.CANDIDATES)
        chosen = result.chosen
        assert chosen is not None and chosen.max_rows >= 2 and chosen.step_ms > 0
        # verification is sent in pieces no larger than the probe found row-invariant
        assert rt._max_rows == chosen.max_rows
    cached = list((config_dir / "invariance").glob("*.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["chosen"]["max_rows"] == chosen.max_rows

    # a second load reads the cache and does not probe again
    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(invariance, "probe", no_probe)
    with LlamaCppRuntime(tiny_pair[0], replace(SETTINGS, kernels="exact")) as rt:
        assert rt.invariance == result


def test_a_probe_finds_the_row_invariant_batch_sizes(tiny_pair):
    """On the quantized tiny model the probe's exact configuration really is exact: a batch of the
    largest size it allows gives single-token decoding's rows bit for bit."""
    import numpy as np

    with LlamaCppRuntime(tiny_pair[0], replace(SETTINGS, kernels="exact")) as rt:
        m = rt.invariance.chosen.max_rows
        tokens = invariance.probe_tokens(rt.vocab.n_vocab, 40)
        rt.eval(tokens[:30], logits="none")
        singles = np.concatenate([rt.eval([t], logits="all").copy() for t in tokens[30 : 30 + m]])
        rt.truncate(30)
        batch = rt.eval(tokens[30 : 30 + m], logits="all").copy()
        assert np.array_equal(batch, singles)


def test_exact_fails_in_one_line_where_no_configuration_is_row_invariant(tiny_f32, config_dir):
    with pytest.raises(SettingsError) as info:
        LlamaCppRuntime(tiny_f32, replace(SETTINGS, kernels="exact"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("exact output is not available for f32.gguf: no row-invariant kernel")
    assert "a 2-row batch differs" in message
    # the failure is cached too, and reported again without probing
    assert len(list((config_dir / "invariance").glob("*.json"))) == 1
    # llama.cpp's kernels still load it
    with LlamaCppRuntime(tiny_f32, SETTINGS) as rt:
        assert rt.guarantee == "distribution"


def test_probe_results_depend_on_threads_and_placement(tiny_pair):
    a = invariance.cache_key(tiny_pair[0], 0, 1, 1)
    assert a == invariance.cache_key(tiny_pair[0], 0, 1, 1)
    assert a != invariance.cache_key(tiny_pair[0], 0, 2, 2)
    assert a != invariance.cache_key(tiny_pair[0], 99, 1, 1)
    assert a != invariance.cache_key(tiny_pair[1], 0, 1, 1)


def test_an_unwritable_cache_is_a_warning_not_a_failure(tiny_pair, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(blocker))
    with (
        caplog.at_level(logging.WARNING, logger="edgespec"),
        LlamaCppRuntime(tiny_pair[0], replace(SETTINGS, kernels="exact")) as rt,
    ):
        assert rt.guarantee == "exact"
    assert any("could not save the invariance probe" in r.getMessage() for r in caplog.records)


def test_probe_result_round_trips():
    result = invariance.ProbeResult(
        (
            invariance.CandidateResult("f16", "f16", 1, None, "a 2-row batch differs after 520 cells"),
            invariance.CandidateResult("bf16", "f16", 3, 31.5),
        ),
        invariance.CandidateResult("bf16", "f16", 3, 31.5),
        "CPU",
    )
    assert invariance.ProbeResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert result.summary() == "exact: K bf16, V f16, verification pieces of at most 3 rows"


def _run(args: list[str]):
    from click.testing import CliRunner

    from edgespec.cli.main import cli

    return CliRunner().invoke(cli, args)


def test_the_run_reports_its_guarantee(tiny_pair, config_dir):
    base = [
        "run",
        "--target",
        str(tiny_pair[0]),
        "--draft",
        str(tiny_pair[1]),
        "--threads",
        "1",
        "--ctx",
        "256",
        "--max-tokens",
        "6",
    ]
    fast = _run([*base, "--json", "the cat sat"])
    assert fast.exit_code == 0, fast.output
    assert json.loads(fast.stdout)["stats"]["guarantee"] == "distribution"
    exact = _run([*base, "--kernels", "exact", "--json", "the cat sat"])
    assert json.loads(exact.stdout)["stats"]["guarantee"] == "exact"
    stats = _run([*base, "--kernels", "exact", "--stats", "the cat sat"])
    assert "tokens per target pass, exact guarantee" in stats.stderr


def test_asking_for_exact_where_it_cannot_hold_is_one_line_exit_1(tiny_f32, config_dir):
    """A model on which exactness cannot hold is a model error: exit 1, one line, no traceback."""
    result = _run(
        [
            "run",
            "--target",
            str(tiny_f32),
            "--draft",
            "none",
            "--threads",
            "1",
            "--ctx",
            "256",
            "--kernels",
            "exact",
            "--max-tokens",
            "4",
            "hi",
        ]
    )
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: exact output is not available for f32.gguf")


def test_the_api_takes_and_reports_the_guarantee(tiny_pair, config_dir):
    from edgespec import Engine

    with Engine(str(tiny_pair[0]), "ngram", n_ctx=256, threads=1) as engine:
        assert engine.guarantee == "distribution"
        assert engine.generate("hi", max_tokens=4).stats.guarantee == "distribution"
    with Engine(str(tiny_pair[0]), "ngram", n_ctx=256, threads=1, kernels="exact") as engine:
        assert engine.guarantee == "exact"


def test_profile_show_states_the_guarantee(tmp_path, config_dir):
    from edgespec.placement.profiles import load_profile

    shown = _run(["profile", "show", "cpu-only"])
    assert shown.exit_code == 0
    assert shown.stdout.splitlines()[1].startswith("# guarantee: distribution (llama.cpp's kernels")
    # no built-in profile claims exactness: it is verified on the loaded model when asked for
    for name in ("cpu-only", "dovetail", "partial", "gpu-all"):
        assert load_profile(name).target.kernels == "fast"
    mine = tmp_path / "mine.toml"
    mine.write_text(shown.stdout.replace('kernels = "fast"', 'kernels = "exact"').replace("cpu-only", "mine"))
    assert _run(["profile", "show", str(mine)]).stdout.splitlines()[1].startswith("# guarantee: exact")


def test_tuned_profiles_are_kept_apart_by_kernels(tmp_path):
    from edgespec.placement.hardware import detect_hardware
    from edgespec.placement.profiles import load_profile
    from edgespec.placement.tuning import tuned_name

    base = load_profile("cpu-only")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    hw = detect_hardware()
    exact = replace(base, target=replace(base.target, kernels="exact"))
    assert tuned_name(base, hw, model, None) != tuned_name(exact, hw, model, None)
