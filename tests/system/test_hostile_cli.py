"""The command line against a hostile user (issue 17): faults found by trying edgespec as one.

Each test names the fault it covers; RELIABILITY.md lists them. Faults that need a real process
(standard input that is not UTF-8, signals, FIFOs) run `python -m edgespec`.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgespec.cli.main import cli
from edgespec.placement import profiles as profiles_module
from edgespec.placement.profiles import MAX_PROFILE_BYTES, list_profiles, load_profile

from ..conftest import real_pair_paths
from ..helpers import assert_one_line_error, fast_model_args

MINIMAL = 'schema = 1\nname = "{name}"\ndescription = "Mine."\n[speculation]\nk = 2\n'


def tuned_run_args(tiny_pair, max_tokens: int) -> list[str]:
    """`run` on the tiny pair under the built-in cpu-only profile, which tunes on first use."""
    draft = str(tiny_pair[1])
    return [
        "run",
        *fast_model_args(tiny_pair, draft=draft),
        "--profile",
        "cpu-only",
        "--max-tokens",
        str(max_tokens),
    ]


def edgespec(args: list[str], stdin: bytes = b"", env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "edgespec", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture()
def config_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "config" / "profiles"
    folder.mkdir(parents=True)
    return folder


# -- fault 1: a config folder that cannot be written ---------------------------------------------


def test_an_unwritable_profile_folder_tunes_in_memory_and_says_so_once(config_dir, tiny_pair, monkeypatch):
    """The save of the tuned profile fails as on a read-only mount (EROFS): the run goes on with
    the profile in memory, one warning line says where it would have gone, and the next run
    (still unwritable) does the same instead of failing."""

    def read_only(path: Path, _text: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path.parent))

    monkeypatch.setattr("edgespec.placement.tuning.write_text_atomic", read_only)
    args = tuned_run_args(tiny_pair, 8)
    for _ in range(2):
        result = CliRunner().invoke(cli, [*args, "hi"])
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if "could not save it" in line]
        assert len(warnings) == 1, result.stderr
        assert "Read-only file system" in warnings[0] and str(config_dir) in warnings[0]
        assert "for this run only" in warnings[0] and result.stdout.strip()
    assert not list(config_dir.iterdir())


def test_a_config_folder_that_is_a_file_still_runs(tiny_pair, tmp_path):
    """The same fault with a real OS error in a real process: EDGESPEC_CONFIG_DIR below a file."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {"EDGESPEC_CONFIG_DIR": str(blocker / "config"), "EDGESPEC_CACHE_DIR": str(tmp_path / "cache")}
    args = tuned_run_args(tiny_pair, 4)
    done = edgespec([*args, "hi"], env=env)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "could not save it" in stderr and "Traceback" not in stderr


# -- fault 2: text without a UTF-8 form --------------------------------------------------------


def test_stdin_that_is_not_utf8_is_one_line_naming_the_byte(tiny_pair):
    done = edgespec(["run", *fast_model_args(tiny_pair), "--max-tokens", "4"], stdin=b"hi \xff\xfe")
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert stderr.strip().splitlines() == [
        "error: the prompt is not valid Unicode: character 3 is the byte 0xFF, which is not UTF-8; "
        "send UTF-8 text"
    ]


def test_a_chat_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tiny_pair):
    lines = b"hello\nbad \xff line\nagain\n"
    done = edgespec(["chat", *fast_model_args(tiny_pair), "--max-tokens", "4"], stdin=lines)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert stderr.count("is not valid Unicode: character 4 is the byte 0xFF") == 1, stderr
    assert "Traceback" not in stderr
    answers = [line for line in stderr.splitlines() if "tokens/s" in line]
    assert len(answers) == 2, stderr  # the lines before and after the bad one were answered


# -- fault 5: Ctrl-C while a model loads ---------------------------------------------------------


def test_ctrl_c_while_the_real_target_loads_exits_130_without_a_traceback(tmp_path):
    """SIGINT once llama.cpp has started logging the load (its log callback runs Python): before
    the fix, KeyboardInterrupt was raised inside the callback, printed as "Exception ignored" and
    dropped, and the run answered in full and exited 0."""
    target, _draft = real_pair_paths()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgespec", "run", "--target", str(target), "--draft", "none",
         "--kernels", "fast", "--verbose", "--max-tokens", "64", "Say hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "EDGESPEC_CACHE_DIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.stderr is not None
    seen = b""
    while b"llama_model_loader" not in seen:  # the load has begun
        line = proc.stderr.readline()
        assert line, seen.decode(errors="replace")
        seen += line
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=120)
    stderr = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, stderr[-2000:]
    assert "Exception ignored" not in stderr and "Traceback" not in stderr
    assert out == b""  # nothing was answered


# -- fault 6: more threads than cores --------------------------------------------------------------


def test_more_threads_than_cores_is_capped_with_a_warning(tiny_pair):
    cores = os.cpu_count() or 1
    args = fast_model_args(tiny_pair)
    args[args.index("--threads") + 1] = "1000"
    result = CliRunner().invoke(cli, ["run", *args, "--max-tokens", "4", "hi"])
    assert result.exit_code == 0, result.output
    assert f"threads 1000 is more than this machine's {cores} logical cores: using {cores}" in result.stderr


# -- fault 7: profile files ----------------------------------------------------------------------


def test_a_device_or_a_fifo_as_profile_is_refused_at_once(config_dir, tmp_path):
    fifo = tmp_path / "profile.toml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        started = time.monotonic()
        result = CliRunner().invoke(cli, ["profile", "show", path])
        assert_one_line_error(result, f"cannot read profile file {path}: not a regular file")
        assert time.monotonic() - started < 30  # before the fix: never returned


def test_an_oversized_profile_file_is_refused(config_dir):
    big = config_dir.parent / "big.toml"
    big.write_bytes(b"#" * (MAX_PROFILE_BYTES + 1))
    result = CliRunner().invoke(cli, ["profile", "show", str(big)])
    assert_one_line_error(result, f"more than a profile may hold ({MAX_PROFILE_BYTES})")


def test_stray_files_in_the_profile_folder_are_skipped_with_a_warning(config_dir, caplog):
    (config_dir / "notes.toml").write_text("this is not = = toml\n", encoding="utf-8")
    os.mkfifo(config_dir / "pipe.toml")
    (config_dir / "mine.toml").write_text(MINIMAL.format(name="mine"), encoding="utf-8")
    names = [p.name for p in list_profiles()]
    assert names == ["cpu-only", "dovetail", "gpu-all", "partial", "mine"]
    skipped = [r.getMessage() for r in caplog.records if "skipped profile file" in r.getMessage()]
    assert (
        len(skipped) == 2
        and any("notes.toml" in m for m in skipped)
        and any("pipe.toml" in m for m in skipped)
    )
    assert load_profile("cpu-only").builtin  # built-ins never depend on other files parsing
    assert load_profile("mine").name == "mine"
    with pytest.raises(profiles_module.ProfileError, match=r"notes\.toml: not valid TOML"):
        load_profile("notes")  # the broken file is the one asked for: its own error
    listing = CliRunner().invoke(cli, ["profile", "list"])
    assert listing.exit_code == 0 and "mine" in listing.stdout and "skipped profile file" in listing.stderr


def test_two_user_files_with_one_name_break_only_that_name(config_dir):
    (config_dir / "a.toml").write_text(MINIMAL.format(name="mine"), encoding="utf-8")
    (config_dir / "b.toml").write_text(MINIMAL.format(name="mine"), encoding="utf-8")
    with pytest.raises(profiles_module.ProfileError, match="both define profile mine"):
        load_profile("mine")
    assert load_profile("gpu-all").builtin
    assert "mine" not in [p.name for p in list_profiles()]


def test_a_broken_user_profile_does_not_stop_a_builtin_run(config_dir, tiny_pair):
    (config_dir / "notes.toml").write_text("[[[\n", encoding="utf-8")
    args = tuned_run_args(tiny_pair, 4)
    result = CliRunner().invoke(cli, [*args, "hi"])
    assert result.exit_code == 0, result.output
    assert "skipped profile file" in result.stderr and "notes.toml" in result.stderr


# -- fault 9: bad option values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--logit-bias", "13=nan", "the bias must be a finite number or -inf"),
        ("--logit-bias", "13=inf", "the bias must be a finite number or -inf"),
        ("--logit-bias", "-1=2", "the token id must be 0 or more"),
        ("--repeat-penalty", "nan", "'nan' is not a finite number"),
        ("--temperature", "nan", "'nan' is not a finite number"),
        ("-t", "inf", "inf is not in the range 0<=x<=100"),
        ("--repeat-penalty", "inf", "'inf' is not a finite number"),
        ("--top-p", "nan", "'nan' is not a finite number"),
        ("--frequency-penalty", "11", "not in the range"),
        ("--seed", str(2**64), "not in the range"),
        ("--seed", "-1", "not in the range"),
    ],
)
def test_bad_option_values_exit_2_naming_the_flag_before_loading(tmp_path, flag, value, says):
    missing = tmp_path / "absent.gguf"  # loading it would fail: the option must be refused first
    result = CliRunner().invoke(cli, ["run", "--target", str(missing), "--draft", "none", flag, value, "hi"])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, says)
    assert flag.lstrip("-") in result.stderr or "'-t'" in result.stderr


# -- fault 10: an API key that no request can match -------------------------------------------


@pytest.mark.parametrize("key", [" spaced-key ", "key\n", "\tkey"])
def test_an_api_key_with_surrounding_white_space_is_refused_at_start_up(key):
    result = CliRunner().invoke(cli, ["serve", "--api-key", key])
    assert result.exit_code == 2
    assert_one_line_error(result, "the API key starts or ends with white space")
