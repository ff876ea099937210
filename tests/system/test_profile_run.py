"""Profiles at run time: `profile tune`, `run --profile`, `bench --config auto` on the tiny pair."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgespec.cli.main import cli
from edgespec.load.builder import ProfileOverrides, load_with_profile
from edgespec.load.drafters import DraftSetup, make_drafter
from edgespec.placement.hardware import detect_hardware
from edgespec.placement.profiles import load_profile, read_profile, user_profile_dir
from edgespec.placement.tuning import tuned_name

from ..helpers import assert_one_line_error


@pytest.fixture()
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "config"


def pair_args(tiny_pair) -> list[str]:
    return ["--target", str(tiny_pair[0]), "--draft", str(tiny_pair[1]), "--threads", "1", "--ctx", "256"]


def test_tune_writes_a_tuned_profile_that_run_uses(config_dir, tiny_pair):
    runner = CliRunner()
    result = runner.invoke(cli, ["profile", "tune", "--profile", "cpu-only", *pair_args(tiny_pair)[:-2]])
    assert result.exit_code == 0, result.output
    saved = list(user_profile_dir().glob("tuned-cpu-only-*.toml"))
    assert len(saved) == 1
    tuned = read_profile(saved[0])
    costs = tuned.costs
    assert costs is not None and len(costs.t_verify_ms) == tuned.speculation.k_max + 1
    assert all(t > 0 for t in costs.t_verify_ms) and costs.t_draft_ms > 0
    assert costs.machine == detect_hardware().fingerprint()
    assert costs.target.startswith(tiny_pair[0].name + ":")
    assert tuned.name == tuned_name(load_profile("cpu-only"), detect_hardware(), tiny_pair[0], tiny_pair[1])
    assert "T(n)/T(1)" in result.stdout and "drafters the controller may use" in result.stdout
    # `profile list` shows it as a user profile
    listing = runner.invoke(cli, ["profile", "list"])
    assert tuned.name in listing.stdout

    # run --profile cpu-only finds the tuned profile: no tuning, output identical to target-only
    base = runner.invoke(
        cli, ["run", *pair_args(tiny_pair), "--draft", "none", "--max-tokens", "30", "--json", "hi"]
    )
    spec = runner.invoke(
        cli,
        [
            "run",
            *pair_args(tiny_pair),
            "--profile",
            "cpu-only",
            "--max-tokens",
            "30",
            "--json",
            "--stats",
            "hi",
        ],
    )
    assert spec.exit_code == 0, spec.output
    assert "on this machine" not in spec.stderr  # it was found, not measured again
    assert json.loads(spec.stdout)["tokens"] == json.loads(base.stdout)["tokens"]
    assert json.loads(spec.stdout)["draft"] == f"profile {tuned.name}"
    assert "[controller]" in spec.stderr
    # the saved tune decides whether the draft model is loaded at all
    pair, used = load_with_profile("cpu-only", tiny_pair[0], tiny_pair[1], n_ctx=256)
    try:
        assert used.name == tuned.name
        assert (pair.draft_runtime is not None) == ("model" in tuned.speculation.drafters)
    finally:
        pair.close()


def test_run_profile_auto_tunes_on_first_use(config_dir, tiny_pair):
    runner = CliRunner()
    args = ["run", *pair_args(tiny_pair), "--profile", "auto", "--max-tokens", "20", "--json", "a b c a b c"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "profile cpu-only: no GPU device" in first.stderr  # why this placement
    assert "tuned cpu-only on this machine" in first.stderr
    assert len(list(user_profile_dir().glob("*.toml"))) == 1
    second = runner.invoke(cli, args)
    assert "on this machine" not in second.stderr
    assert json.loads(second.stdout)["tokens"] == json.loads(first.stdout)["tokens"]


def test_load_with_profile_applies_the_profile_and_flag_overrides(config_dir, tiny_pair, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text(
        'schema = 1\nname = "mine"\ndescription = "test"\n[target]\nthreads = 1\nkernels = "fast"\n'
        '[speculation]\ndrafters = ["ngram"]\ncontroller = "fixed"\nk = 3\n'
    )
    pair, profile = load_with_profile(str(mine), tiny_pair[0], tiny_pair[1], n_ctx=256)
    try:
        assert pair.engine.target.settings.kernels == "fast" and pair.engine.target.settings.n_threads == 1
        assert pair.draft_runtime is None  # n-grams only: the draft model is not loaded
        assert type(pair.engine.drafter).__name__ == "NgramDrafter"
        assert profile.costs is None  # a fixed controller needs no measurement
    finally:
        pair.close()
    pair, _ = load_with_profile(
        str(mine), tiny_pair[0], tiny_pair[1], n_ctx=256, overrides=ProfileOverrides(kernels="exact")
    )
    assert pair.engine.target.settings.kernels == "exact"
    pair.close()


def test_profile_errors_are_one_line(config_dir, tiny_pair, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["run", *pair_args(tiny_pair)[:2], "--draft", "ngram", "--profile", "cpu-only", "hi"]
    )
    assert_one_line_error(result, "cannot be combined with a profile")
    result = runner.invoke(cli, ["run", *pair_args(tiny_pair), "--profile", "nosuch", "hi"])
    assert_one_line_error(result, "no profile named 'nosuch'")
    bad = tmp_path / "bad.toml"
    bad.write_text('schema = 1\nname = "bad"\ndescription = "x"\n[speculation]\nk_max = 0\n')
    result = runner.invoke(cli, ["run", *pair_args(tiny_pair), "--profile", str(bad), "hi"])
    assert_one_line_error(result, "speculation.k_max")


def test_make_drafter_refuses_what_it_cannot_build(tiny_runtimes):
    from dataclasses import replace

    from edgespec.drafting import ModelDrafter
    from edgespec.errors import ProfileError, SettingsError

    target, draft_rt = tiny_runtimes
    profile = load_profile("cpu-only")
    with pytest.raises(ProfileError, match="no draft model was loaded"):
        make_drafter("auto", DraftSetup(profile=profile))
    with pytest.raises(ProfileError, match="no measured costs"):
        make_drafter("auto", DraftSetup(ModelDrafter(draft_rt), profile))
    fixed = replace(profile, speculation=replace(profile.speculation, controller="fixed"))
    with pytest.raises(ProfileError, match="one source"):
        make_drafter("auto", DraftSetup(ModelDrafter(draft_rt), fixed))
    with pytest.raises(SettingsError, match="unknown drafter 'eagle'"):
        make_drafter("eagle")


def test_bench_auto_config_matches_target_only(config_dir, tiny_pair, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a b c a b c a b c", "category": "x"}\n{"prompt": "the cat sat", "category": "y"}\n'
    )
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        cli,
        [
            "bench",
            "--dataset",
            str(prompts),
            *pair_args(tiny_pair),
            "--config",
            "target-only",
            "--config",
            "auto",
            "--config",
            "draft:k=3,overlap=1",
            "--max-tokens",
            "24",
            "--no-peers",
            "--no-ceiling",
            "--warmup",
            "0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "auto k=64" in result.stdout and "draft k=3 overlap=1" in result.stdout
    data = json.loads((out / "results.json").read_text())
    auto = [r for r in data["records"] if r["config"] == "auto k=64"]
    assert len(auto) == 2 and all(r["identical_to_target_only"] for r in auto)
    assert all(set(r["sources"]) == {"model", "ngram", "none"} for r in auto)
    assert data["settings"]["auto_profile"]["costs"]["t_verify_ms"]


def test_a_tune_measured_by_an_earlier_method_is_measured_again(config_dir, tiny_pair):
    """Costs from an earlier tuning method (a file without `method`, as edgespec wrote them before
    every pass ran on one native thread) are not trusted: the next run tunes again and saves the
    new method; a current tune is used as it is."""
    from edgespec.placement.profiles import COSTS_METHOD

    runner = CliRunner()
    tuned = runner.invoke(cli, ["profile", "tune", "--profile", "cpu-only", *pair_args(tiny_pair)[:-2]])
    assert tuned.exit_code == 0, tuned.output
    (saved,) = user_profile_dir().glob("tuned-cpu-only-*.toml")
    text = saved.read_text()
    assert f"method = {COSTS_METHOD}" in text and read_profile(saved).costs.method == COSTS_METHOD
    saved.write_text(text.replace(f"method = {COSTS_METHOD}\n", ""))
    assert read_profile(saved).costs.method == 1
    args = ["run", *pair_args(tiny_pair), "--profile", "cpu-only", "--max-tokens", "4", "hi"]
    again = runner.invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "on this machine" in again.stderr  # measured again
    assert read_profile(saved).costs.method == COSTS_METHOD
    kept = runner.invoke(cli, args)
    assert kept.exit_code == 0 and "on this machine" not in kept.stderr
