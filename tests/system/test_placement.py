"""Placement profiles: the built-ins, validation messages, lookup, detection and the `profile` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgespec.cli.main import cli
from edgespec.errors import ProfileError, SettingsError
from edgespec.placement import profiles as placement
from edgespec.placement.hardware import GpuDevice, Hardware
from edgespec.placement.profiles import (
    ALL_LAYERS,
    ModelPlacement,
    Profile,
    TunedCosts,
    builtin_profiles,
    detect_profile,
    list_profiles,
    load_profile,
    parse_profile,
    read_profile,
)

from ..helpers import cuda, machine

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MINIMAL = 'schema = 1\nname = "mine"\ndescription = "A test profile."\n'
GB = 1_000_000_000
MIB = 1 << 20


def parse(text: str, label: str = "my.toml") -> Profile:
    return parse_profile(tomllib.loads(text), label)


def error_of(text: str, label: str = "my.toml") -> str:
    with pytest.raises(ProfileError) as info:
        parse(text, label)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the built-ins -----------------------------------------------------------------------------------


def test_builtins_parse_and_round_trip_through_toml():
    profiles = builtin_profiles()
    assert [p.name for p in profiles] == ["cpu-only", "dovetail", "gpu-all", "partial"]
    for profile in profiles:
        assert (
            profile.builtin and profile.source is not None and profile.source.name == f"{profile.name}.toml"
        )
        again = parse(profile.to_toml(), f"{profile.name}.toml")
        assert again == profile
        assert again.source is None  # source and builtin are not part of ==


def test_builtins_say_what_the_design_says():
    p = {profile.name: profile for profile in builtin_profiles()}
    assert not p["cpu-only"].requires.gpu and p["cpu-only"].target.gpu_layers == 0
    assert p["cpu-only"].speculation.drafters == ("model", "ngram") and not p["cpu-only"].speculation.overlap
    assert p["dovetail"].requires.gpu and p["dovetail"].draft.gpu_layers == ALL_LAYERS
    assert p["dovetail"].target.gpu_layers == 0 and p["dovetail"].speculation.overlap
    assert p["gpu-all"].target.gpu_layers == ALL_LAYERS and p["gpu-all"].target.kernels == "fast"
    assert p["partial"].target.gpu_layers > 0 and p["partial"].draft.gpu_layers == ALL_LAYERS


def test_defaults_of_a_minimal_profile():
    profile = parse(MINIMAL)
    assert profile.target == ModelPlacement(
        gpu_layers=0, threads="physical", threads_batch=None, kernels="fast"
    )
    assert profile.speculation.drafters == ("model", "ngram") and profile.speculation.controller == "goodput"
    assert (profile.speculation.k, profile.speculation.k_max, profile.speculation.overlap) == (4, 64, False)
    assert profile.costs is None and not profile.requires.gpu


def test_costs_round_trip_and_with_costs():
    costs = TunedCosts(
        machine="Test CPU; 8c/16t; 31 GiB; no GPU",
        target="target.gguf:1117320736",
        draft="",
        measured="2026-11-24T19:00:00Z",
        t_verify_ms=tuple(30.0 + 1.5 * n for n in range(17)),
        t_draft_ms=21.9,
        acceptance_model=(0.8, 0.6, 0.4),
    )
    tuned = builtin_profiles()[0].with_costs(costs, "cpu-only-tuned", "Tuned here.")
    assert tuned.name == "cpu-only-tuned" and not tuned.builtin and tuned.source is None
    assert parse(tuned.to_toml()) == tuned
    with pytest.raises(ProfileError, match="must match"):
        tuned.with_costs(costs, "Bad Name", "x")
    # an unquoted TOML date-time is accepted too
    text = tuned.to_toml().replace('"2026-11-24T19:00:00Z"', "2026-11-24T19:00:00Z")
    assert parse(text).costs.measured == "2026-11-24T19:00:00Z"


def test_resolve_threads():
    hw = Hardware("cpu", physical_cores=6, logical_cores=12, total_ram_mib=1, available_ram_mib=1)
    assert ModelPlacement(threads="physical").resolve_threads(hw) == (6, 6)
    assert ModelPlacement(threads="physical", threads_batch="logical").resolve_threads(hw) == (6, 12)
    assert ModelPlacement(threads=3, threads_batch=5).resolve_threads(hw) == (3, 5)


# --- validation ----------------------------------------------------------------------------------------


def test_profile_error_is_a_settings_error():
    assert issubclass(ProfileError, SettingsError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL + "colour = 1\n",
            "my.toml: unknown key colour (known: schema, name, description, requires,",
        ),
        (
            MINIMAL + "[target]\ngpu_layer = 3\n",
            "my.toml: unknown key target.gpu_layer (known: gpu_layers, threads, threads_batch, kernels)",
        ),
        (MINIMAL + "[draft]\nkernels = 'fast'\n", "my.toml: unknown key draft.kernels (known: gpu_layers,"),
        (MINIMAL + "[costs.extra]\n", "my.toml: unknown key costs.extra"),
        (
            MINIMAL + '[speculation]\nk_max = "x"\n',
            'my.toml: speculation.k_max must be an integer from 1 to 64, got "x"',
        ),
        (
            MINIMAL + "[speculation]\nk_max = 65\n",
            "my.toml: speculation.k_max must be an integer from 1 to 64, got 65",
        ),
        (MINIMAL + "[speculation]\nk = 0\n", "my.toml: speculation.k must be an integer from 1 to 64, got 0"),
        (MINIMAL + "[speculation]\nk = true\n", "speculation.k must be an integer from 1 to 64, got true"),
        (
            MINIMAL + "[speculation]\nk = 8\nk_max = 4\n",
            "my.toml: speculation.k (8) must not exceed speculation.k_max (4)",
        ),
        (
            MINIMAL + '[speculation]\ndrafters = ["model", "eagle"]\n',
            'my.toml: speculation.drafters[1] must be one of "model", "ngram", got "eagle"',
        ),
        (
            MINIMAL + '[speculation]\ndrafters = ["ngram", "ngram"]\n',
            'my.toml: speculation.drafters lists "ngram" twice',
        ),
        (
            MINIMAL + '[speculation]\ndrafters = "model"\n',
            'speculation.drafters must be a list of "model", "ngram"',
        ),
        (
            MINIMAL + "[speculation]\nmin_draft_prob = 1.0\n",
            "speculation.min_draft_prob must be a number in [0, 1), got 1.0",
        ),
        (
            MINIMAL + "[speculation]\noverlap = 1\n",
            "my.toml: speculation.overlap must be true or false, got 1",
        ),
        (
            MINIMAL + '[speculation]\ncontroller = "magic"\n',
            'speculation.controller must be one of "goodput", "fixed"',
        ),
        (
            MINIMAL + '[target]\ngpu_layers = "most"\n',
            'my.toml: target.gpu_layers must be an integer >= 0 or "all"',
        ),
        (
            MINIMAL + "[target]\ngpu_layers = -1\n",
            'target.gpu_layers must be an integer >= 0 or "all", got -1',
        ),
        (
            MINIMAL + "[draft]\nthreads = 0\n",
            'my.toml: draft.threads must be an integer >= 1, "physical" or "logical"',
        ),
        (
            MINIMAL + '[target]\nthreads_batch = "all"\n',
            "my.toml: target.threads_batch must be an integer >= 1",
        ),
        (
            MINIMAL + '[target]\nkernels = "quick"\n',
            'target.kernels must be one of "exact", "fast", got "quick"',
        ),
        (
            MINIMAL + "[requires]\nmin_physical_cores = 0\n",
            "requires.min_physical_cores must be an integer >= 1, got 0",
        ),
        (MINIMAL + "[requires]\ngpu = 'yes'\n", 'my.toml: requires.gpu must be true or false, got "yes"'),
        (MINIMAL + "target = 3\n", "my.toml: target must be a table ([target]), got 3"),
        ('name = "x"\ndescription = "y"\n', "my.toml: missing required key schema"),
        ('schema = 2\nname = "x"\ndescription = "y"\n', "my.toml: schema must be 1, got 2"),
        ('schema = 1\ndescription = "y"\n', "my.toml: missing required key name"),
        ('schema = 1\nname = "x"\n', "my.toml: missing required key description"),
        (
            'schema = 1\nname = "My Profile"\ndescription = "y"\n',
            'my.toml: name must match [a-z0-9-]+, got "My Profile"',
        ),
        (MINIMAL + '[costs]\nmachine = "m"\n', "my.toml: missing required key costs.target"),
        (
            MINIMAL
            + '[costs]\nmachine = "m"\ntarget = "t"\nmeasured = "now"\nt_verify_ms = [5.0]\nt_draft_ms = 1\n',
            "my.toml: costs.t_verify_ms must be a list of at least 2 positive numbers, got [5.0]",
        ),
        (
            MINIMAL + '[costs]\nmachine = "m"\ntarget = "t"\nmeasured = "now"\nt_verify_ms = [5, 6]\n'
            "t_draft_ms = 1\nacceptance_ngram = [1.5]\n",
            "my.toml: costs.acceptance_ngram must be a list of numbers in [0, 1], got [1.5]",
        ),
        (
            MINIMAL + '[costs]\nmachine = "m"\ntarget = "t"\nmeasured = "now"\nt_verify_ms = [5, 6]\n'
            "t_draft_ms = 1\nacceptance_ngram = [0.5, 0.5]\n",
            "my.toml: costs.acceptance_ngram must have 6 values, one per match-length bucket",
        ),
    ],
)
def test_validation_errors_name_the_file_and_the_key(text, expected):
    message = error_of(text)
    assert message.startswith("my.toml: ") and expected in message, message


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("schema = 1\nname = \n", encoding="utf-8")
    with pytest.raises(ProfileError, match=r"broken\.toml: not valid TOML \("):
        read_profile(path)
    with pytest.raises(ProfileError, match="no profile file"):
        read_profile(tmp_path / "absent.toml")


# --- finding profiles ---------------------------------------------------------------------------------


@pytest.fixture()
def config_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    folder = tmp_path / "config" / "profiles"
    folder.mkdir(parents=True)
    return folder


def test_user_profile_dir_follows_the_environment(config_dir):
    assert placement.user_profile_dir() == config_dir


def test_a_user_profile_shadows_a_builtin(config_dir):
    (config_dir / "my-dovetail.toml").write_text(
        'schema = 1\nname = "dovetail"\ndescription = "Mine."\n[speculation]\nk = 2\n', encoding="utf-8"
    )
    (config_dir / "extra.toml").write_text(MINIMAL, encoding="utf-8")
    profiles = list_profiles()
    assert [p.name for p in profiles] == ["cpu-only", "dovetail", "gpu-all", "partial", "mine", "dovetail"]
    assert placement.shadowed(profiles) == {"dovetail"}
    loaded = load_profile("dovetail")
    assert (
        loaded.description == "Mine."
        and not loaded.builtin
        and loaded.source == config_dir / "my-dovetail.toml"
    )
    assert load_profile("mine").name == "mine"
    assert load_profile("gpu-all").builtin


def test_two_user_files_with_one_name_are_an_error(config_dir):
    (config_dir / "a.toml").write_text(MINIMAL, encoding="utf-8")
    (config_dir / "b.toml").write_text(MINIMAL, encoding="utf-8")
    with pytest.raises(ProfileError, match="both define profile mine"):
        load_profile("mine")  # the name asked for; the others still load (issue 17)


def test_load_profile_by_path_and_unknown_name(config_dir, tmp_path):
    path = tmp_path / "elsewhere.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_profile(str(path)).name == "mine"
    with pytest.raises(ProfileError) as info:
        load_profile("nosuch")
    assert "no profile named 'nosuch'; known: cpu-only, dovetail, gpu-all, partial" in str(info.value)
    with pytest.raises(ProfileError, match="no profile file"):
        load_profile(str(tmp_path / "missing.toml"))


# --- detection ------------------------------------------------------------------------------------------


TARGET, DRAFT = 1_120 * MIB, 480 * MIB  # 40 MiB per target layer at 28 layers


def test_detect_cpu_only_without_a_gpu():
    found = detect_profile(machine(), TARGET, DRAFT)
    assert found.profile == "cpu-only" and found.target_gpu_layers is None
    assert found.reasons[0] == "no GPU device: llama.cpp was built with CPU only; nvidia-smi not found"
    assert found.fits["cpu-only"] == [] and found.fits["dovetail"][0].startswith("needs a GPU that llama.cpp")


def test_detect_cpu_only_when_llama_cpp_cannot_use_the_nvidia_gpu():
    smi = GpuDevice("CUDA", "NVIDIA GeForce RTX 3060", 6144, 5000, "nvidia-smi")
    hw = machine(offload=False, gpus=(smi,), llama_backends=("CPU",), nvidia_smi="ran")
    found = detect_profile(hw, TARGET, DRAFT)
    assert found.profile == "cpu-only"
    assert found.reasons[0].startswith(
        "no GPU device: llama.cpp was built with CPU only; nvidia-smi sees NVIDIA GeForce RTX 3060 "
        "(5,000 MiB free), which this llama.cpp cannot use: reinstall llama-cpp-python built with CUDA"
    )


def test_detect_gpu_all_when_both_models_fit():
    found = detect_profile(machine(cuda(78_000, "NVIDIA H100")), TARGET, DRAFT)
    assert found.profile == "gpu-all"
    assert found.reasons == [
        "GPU 0 NVIDIA H100 has 78,000 MiB free, enough for both models (1,920 MiB with 20% headroom): gpu-all"
    ]


def test_detect_partial_counts_the_target_layers_that_fit():
    # 1,200 MiB / 1.2 = 1,000 MiB for models; the drafter takes 480, leaving 520 = 13 layers of 40.
    found = detect_profile(machine(cuda(1_200)), TARGET, DRAFT)
    assert found.profile == "partial" and found.target_gpu_layers == 13
    assert (
        "but enough for the drafter and 13 of the target's 28 layers (40 MiB each): partial"
        in found.reasons[0]
    )
    assert detect_profile(machine(cuda(1_200)), TARGET, DRAFT, n_layers=14).target_gpu_layers == 6


def test_detect_dovetail_when_only_the_drafter_fits():
    found = detect_profile(machine(cuda(600)), TARGET, DRAFT)
    assert found.profile == "dovetail" and found.target_gpu_layers is None
    assert "enough for the drafter (576 MiB with 20% headroom) and not one target layer" in found.reasons[0]


def test_detect_cpu_only_when_not_even_the_drafter_fits():
    found = detect_profile(machine(cuda(300)), TARGET, DRAFT)
    assert found.profile == "cpu-only"
    assert found.reasons == [
        "GPU 0 NVIDIA Test GPU has 300 MiB free, not enough for the drafter (576 MiB with 20% headroom): "
        "cpu-only"
    ]


def test_detect_uses_the_gpu_with_most_free_memory_and_handles_unknown_memory():
    hw = machine(cuda(300, "small"), cuda(78_000, "big"))
    assert detect_profile(hw, TARGET, DRAFT).reasons[0].startswith("GPU 1 big has 78,000 MiB free")
    found = detect_profile(machine(cuda(None)), TARGET, DRAFT)
    assert found.profile == "dovetail" and "does not report its free memory" in found.reasons[0]


def test_detect_passes_over_a_profile_whose_requirements_are_unmet():
    strict = parse(
        'schema = 1\nname = "gpu-all"\ndescription = "x"\n[requires]\ngpu = true\nmin_physical_cores = 64\n'
    )
    others = [p for p in builtin_profiles() if p.name != "gpu-all"]
    found = detect_profile(machine(cuda(78_000)), TARGET, DRAFT, profiles=[strict, *others])
    assert found.profile == "partial" and found.target_gpu_layers == 28
    assert (
        found.reasons[1] == "gpu-all does not fit this machine: needs 64 physical cores; this machine has 8"
    )
    assert found.fits["gpu-all"] == ["needs 64 physical cores; this machine has 8"]


def test_check_fits_lists_every_unmet_requirement():
    demanding = parse(
        MINIMAL + "[requires]\ngpu = true\nmin_gpu_free_mib = 4096\nmin_physical_cores = 2\n"
        "min_available_ram_mib = 64000\n"
    )
    assert demanding.check_fits(machine(cuda(1_000))) == [
        "needs 4,096 MiB free on a GPU; NVIDIA Test GPU has 1,000 MiB",
        "needs 64,000 MiB of available RAM; 20,000 MiB is available",
    ]
    assert len(demanding.check_fits(machine())) == 2  # no GPU (one sentence) and RAM
    assert demanding.check_fits(machine(cuda(8_000), available_ram_mib=70_000)) == []


# --- the CLI --------------------------------------------------------------------------------------------


@pytest.fixture()
def runner(tmp_path, monkeypatch) -> CliRunner:
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    return CliRunner()


def test_cli_profile_list(runner):
    result = runner.invoke(cli, ["profile", "list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FROM", "FITS", "DESCRIPTION"]
    assert any(line.startswith("cpu-only") and " built-in " in line and " yes " in line for line in lines)
    assert "user profiles:" in result.stdout


def test_cli_profile_show(runner):
    result = runner.invoke(cli, ["profile", "show", "dovetail"])
    assert result.exit_code == 0, result.output
    assert (
        result.stdout.startswith("# source: built-in ") and "dovetail.toml" in result.stdout.splitlines()[0]
    )
    assert parse(result.stdout) == load_profile("dovetail")


def test_cli_profile_show_unknown_is_one_line(runner):
    result = runner.invoke(cli, ["profile", "show", "nosuch"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no profile named 'nosuch'; known: cpu-only"), lines


def test_cli_profile_detect_json(runner):
    result = runner.invoke(cli, ["profile", "detect", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["profile"] in placement.DETECT_ORDER and record["reasons"]
    assert record["hardware"]["physical_cores"] >= 1 and "CPU" in record["hardware"]["llama_backends"]
    # the default models are not joined in this temporary cache: their pinned sizes are used
    assert record["models"]["target"]["how"] == "pinned" and record["models"]["target"]["bytes"] > GB
    assert record["models"]["draft"]["bytes"] > 0


def test_cli_profile_detect_text_with_a_model_path_and_no_draft(runner, tmp_path):
    missing = runner.invoke(cli, ["profile", "detect", "--target", str(tmp_path / "none.gguf")])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: no target model file")
    result = runner.invoke(cli, ["profile", "detect", "--draft", "ngram"])
    assert result.exit_code == 0, result.output
    assert "profile: " in result.stdout and "draft: none (ngram)" in result.stdout


def test_cli_profile_list_marks_a_shadowed_builtin(runner, tmp_path):
    folder = tmp_path / "config" / "profiles"
    folder.mkdir(parents=True)
    text = 'schema = 1\nname = "gpu-all"\ndescription = "Mine."\n'
    (folder / "mine.toml").write_text(text, encoding="utf-8")
    result = runner.invoke(cli, ["profile", "list"])
    assert result.exit_code == 0, result.output
    assert "built-in (shadowed by a user file)" in result.stdout
    assert f"user file {folder / 'mine.toml'} (shadows the built-in)" in result.stdout


def test_cli_profile_detect_partial_on_a_fabricated_gpu(runner, monkeypatch):
    from edgespec.placement import hardware

    monkeypatch.setattr(hardware, "detect_hardware", lambda: machine(cuda(1_200)))
    result = runner.invoke(cli, ["profile", "detect"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "GPU 0: NVIDIA Test GPU (CUDA, 1,200 of 80,000 MiB free, seen by llama.cpp)" in out
    assert "profile: partial" in out and "the target's layer count is unknown: assumed 28" in out
    assert "target layers that fit on the GPU: 13 (use --gpu-layers 13" in out
    assert "pinned size" in out
