"""Pairing a drafter from the models on disk: same vocabulary and much smaller, VocabTrim variants
included; `edgespec models --drafters-for` and `edgespec run --target NAME` without `--draft`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgespec.cli.main import cli
from edgespec.exporters import vocab_trim
from edgespec.load import pairing, registry

from ..stores import ollama_put
from ..tinymodels import build_tiny_model


@pytest.fixture()
def machine(isolated_home, tmp_path, monkeypatch, tiny_pair, tiny_changed_vocab):
    """A target of ~2 MB in a folder of the user's, beside: a small model with another vocabulary,
    a compatible one not much smaller, a small compatible one in Ollama's store, and a VocabTrim
    variant of that one."""
    mine = tmp_path / "mine"
    mine.mkdir()
    target = build_tiny_model(mine / "target.gguf", seed=11, n_embd=256, n_ff=512)
    shutil.copy(tiny_changed_vocab, mine / "other-vocab.gguf")
    build_tiny_model(mine / "big-draft.gguf", seed=12, n_embd=192, n_layer=3, n_ff=384)
    store = tmp_path / "ollama"
    small = ollama_put(store, tiny_pair[1], "registry.ollama.ai", "library", "small", "latest")
    vocab_trim.trim_gguf(small, mine / "small-trim.gguf", np.ones(554), 400)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv(registry.MODEL_DIRS_ENV, str(mine))
    return target


def judged(target):
    return {c.model.name: c for c in pairing.drafters_for(registry.describe(target), registry.find_models())}


def test_the_small_compatible_models_fit_and_the_others_say_why(machine):
    candidates = judged(machine)
    assert [name for name, c in candidates.items() if c.fits] == [
        "folder:small-trim.gguf",  # smallest first
        "ollama:small:latest",
    ]
    assert candidates["folder:small-trim.gguf"].why.startswith(
        "VocabTrim-ed from ollama:small:latest, same vocabulary, "
    )
    assert candidates["ollama:small:latest"].why.startswith("same vocabulary, ")
    assert (
        candidates["folder:other-vocab.gguf"].why
        == "a different vocabulary (its tokenizer or token texts differ)"
    )
    assert candidates["folder:big-draft.gguf"].why.startswith("same vocabulary but not much smaller (")
    assert "folder:target.gguf" not in candidates


def test_the_drafters_to_try_are_those_that_fit_smallest_first(machine, tmp_path):
    notes: list[str] = []
    tries, _ = pairing.drafters_to_try(machine, notes.append)
    assert [(path, name) for path, name, _ in tries] == [
        (tmp_path / "mine" / "small-trim.gguf", "folder:small-trim.gguf"),
        (registry.resolve("ollama:small").path, "ollama:small:latest"),
    ]
    assert tries[0][2].startswith("paired from the models here: folder:small-trim.gguf, VocabTrim-ed from ")
    assert tries[0][2].endswith("; measured against 1 other(s) that fit")
    assert notes[0].startswith("drafters for target.gguf: folder:small-trim.gguf, ollama:small:latest (")
    # Without the Ollama model the trimmed one's source is unknown, and nothing else fits.
    shutil.rmtree(tmp_path / "ollama")
    assert judged(machine)["folder:small-trim.gguf"].why.startswith(
        "VocabTrim-ed from a model not found here (sha256 "
    )
    notes.clear()
    tries, why = pairing.drafters_to_try(machine, notes.append)
    assert tries == [] and why.startswith("no model here fits (e.g. ")
    assert notes[0].startswith("no model here can draft for target.gguf (e.g. ")
    assert "drafting with n-grams where they pay" in notes[0]


def test_drafters_for_on_the_command_line(machine):
    result = CliRunner().invoke(cli, ["models", "--drafters-for", "folder:target"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith("  fits  folder:small-trim.gguf: VocabTrim-ed from ollama:small:latest")
    assert lines[2].startswith("  fits  ollama:small:latest: same vocabulary")
    assert any(
        line.startswith("  no    folder:big-draft.gguf: same vocabulary but not much smaller")
        for line in lines
    )
    assert lines[-1] == (
        "--profile auto tunes folder:small-trim.gguf, ollama:small:latest and drafts with the one "
        "predicted fastest, where it pays"
    )


def test_run_with_a_named_target_and_no_draft_pairs_one(machine, tmp_path):
    """--profile auto (no --draft): the drafter comes from the models here, tuning measures it."""
    args = ["run", "--target", "folder:target", "--threads", "1", "--ctx", "256", "--max-tokens", "8"]
    result = CliRunner().invoke(cli, [*args, "--raw", "the cat"])
    assert result.exit_code == 0, result.output
    notes = result.stderr.splitlines()
    assert notes[0].startswith("drafters for target.gguf: folder:small-trim.gguf, ollama:small:latest ("), (
        notes
    )
    # both were tuned, and the one predicted fastest kept (a tie here: the smaller)
    assert sum(n.startswith("tuned ") for n in notes) == 2, notes
    chosen = next(n for n in notes if n.startswith("drafter for target.gguf: "))
    assert chosen.startswith("drafter for target.gguf: folder:small-trim.gguf, the fastest (predicted ")
    # A second run reuses both tunes: nothing is measured again.
    second = CliRunner().invoke(cli, [*args, "--raw", "the cat"])
    assert second.exit_code == 0 and not any(n.startswith("tuned ") for n in second.stderr.splitlines())
    assert second.stdout == result.stdout
    # tuning measured the chosen drafter and says whether it pays (on these tiny models, not);
    # the tuned profile keeps the choice and the reason, and `profile show` states them
    tuned = [n for n in notes if n.startswith("tuned ")][0]  # the candidates are tuned in order
    shown = CliRunner().invoke(cli, ["profile", "show", tuned.rsplit("saved ", 1)[1]])
    assert shown.exit_code == 0, shown.output
    drafting = next(line for line in shown.stdout.splitlines() if line.startswith("# drafting: "))
    assert drafting.startswith(
        "# drafting: drafter small-trim.gguf (paired from the models here: folder:small-trim.gguf, "
    )
    assert "; model drafter " in drafting and 'choice = "drafter small-trim.gguf' in shown.stdout
    assert drafting.endswith(chosen.split("the fastest (", 1)[1].removesuffix(" over plain decoding)"))
    # The same with nothing that fits: n-grams where they pay, and the run still answers.
    shutil.rmtree(tmp_path / "ollama")
    again = CliRunner().invoke(cli, [*args, "--raw", "the cat"])
    assert again.exit_code == 0, again.output
    assert any(n.startswith("no model here can draft for target.gguf") for n in again.stderr.splitlines())


def test_the_candidate_predicted_fastest_wins(machine, monkeypatch):
    """Of the drafters that fit, the one whose tuned costs predict the most speed is kept, even
    when it is not the smallest."""
    from edgespec.placement import tuning

    def gain(profile):
        return 1.3 if profile.costs is not None and profile.costs.draft.startswith("sha256-") else 1.1

    monkeypatch.setattr(tuning, "predicted_gain", gain)
    args = ["run", "--target", "folder:target", "--threads", "1", "--ctx", "256", "--max-tokens", "4"]
    result = CliRunner().invoke(cli, [*args, "--raw", "the cat"])
    assert result.exit_code == 0, result.output
    chosen = next(n for n in result.stderr.splitlines() if n.startswith("drafter for target.gguf: "))
    assert chosen == (
        "drafter for target.gguf: ollama:small:latest, the fastest (predicted folder:small-trim.gguf 1.10x, "
        "ollama:small:latest 1.30x over plain decoding)"
    )
