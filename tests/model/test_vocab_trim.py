"""VocabTrim: trimmed drafters load in llama.cpp, map ids both ways, and never change the output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgespec.chat import prompt_tokens
from edgespec.cli.main import cli
from edgespec.engine import GenerationSettings
from edgespec.errors import ExportError, IncompatibleModelsError, ModelLoadError
from edgespec.exporters import vocab_trim as vt
from edgespec.formats.vocabmap import VocabMap
from edgespec.load.builder import load
from edgespec.sampling import SamplingSettings

from ..conftest import TINY_SETTINGS
from ..helpers import assert_one_line_error

CALIBRATION = ["the cat sat on the mat", "tell me a story", "a dog runs far", "one two three", "the sea"]
N_KEEP = 400  # of 554: the 261 always-kept tokens (bytes, control) and 139 by frequency


@pytest.fixture(scope="module")
def counts(tiny_pair) -> np.ndarray:
    pair = load(tiny_pair[0], "none", TINY_SETTINGS)
    try:
        prompts = [prompt_tokens(pair.engine.target, text) for text in CALIBRATION]
        counts = vt.count_generated(pair.engine, prompts, 48)
        for tokens in prompts:
            counts += vt.count_prompt(tokens, len(counts))
    finally:
        pair.close()
    return counts


@pytest.fixture(scope="module")
def trimmed(tiny_pair, counts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trim") / "draft-trim.gguf"
    report = vt.trim_gguf(tiny_pair[1], out, counts, N_KEEP, target_sha256="t" * 64, frequency_source="test")
    assert report.n_keep == N_KEEP and report.n_source_vocab == 554
    assert report.coverage == 1.0  # every calibration token fits in 139 free places
    assert report.out_bytes < report.source_bytes
    return out


def test_trimmed_gguf_loads_with_a_smaller_self_consistent_vocabulary(tiny_pair, trimmed):
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    # llama.cpp's own kernels, the same for both files. Under exact kernels each file runs the KV
    # types its own invariance probe timed fastest, which may differ between the two files (F16
    # against BF16 values change every row from the first), so bitwise rows are compared here.
    same = dataclasses.replace(TINY_SETTINGS, kernels="fast", flash_attn="off")
    with (
        LlamaCppRuntime(tiny_pair[1], same) as full,
        LlamaCppRuntime(trimmed, same) as small,
    ):
        vmap = small.vocab_map
        assert vmap is not None and full.vocab_map is None
        assert small.vocab.n_vocab == vmap.n_keep == N_KEEP
        assert (
            vmap.target_n_vocab == 554 and vmap.target_sha256 == "t" * 64 and vmap.frequency_source == "test"
        )
        for i, token in enumerate(vmap.keep.tolist()):
            assert small.token_text(i) == full.token_text(token)
        # Special tokens keep their meaning under their new ids.
        assert vmap.to_target(small.vocab.eos) == full.vocab.eos
        assert vmap.to_target(small.vocab.bos) == full.vocab.bos
        # Rows of the trimmed head are the kept rows of the full head, bit for bit.
        tokens = [full.vocab.bos, *vmap.keep[300:306].tolist()]
        rows_full = full.eval(tokens, logits="all")[:, vmap.keep]
        rows_small = small.eval(vmap.to_draft(tokens), logits="all")
        np.testing.assert_array_equal(rows_small, rows_full)


def test_map_is_in_the_metadata_and_dropped_tokens_read_their_longest_kept_prefix(trimmed, counts):
    vmap = VocabMap.from_gguf(trimmed)
    assert vmap is not None
    assert np.all(counts[vmap.keep] >= 0) and set(np.flatnonzero(counts).tolist()) <= set(vmap.keep.tolist())
    import gguf

    texts = gguf.GGUFReader(str(trimmed)).fields["tokenizer.ggml.tokens"].contents()
    assert len(texts) == N_KEEP
    vocab = vt.SourceVocab(
        "llama", ["a", "ab", "abc", "abd", "x", "<0x61>"], np.array([1, 1, 1, 1, 1, 6]), {}
    )
    keep = np.array([1, 4, 5], dtype=np.int32)  # "ab", "x", the byte 'a'
    input_map = vt.input_map_for(keep, vocab)
    assert input_map.tolist() == [2, 0, 0, 0, 1, 2]  # "abc" → "ab"; "a" has no kept prefix → byte 0x61


def test_choose_keep_forces_specials_and_bytes_then_ranks_by_frequency_then_id():
    texts = ["<s>", "</s>", "!", "Ġ", "Ġthe", "Ġcat", "Ġdog", "ing", "ĠĠ"]
    types = np.array([3, 3, 1, 1, 1, 1, 1, 1, 1])
    vocab = vt.SourceVocab("gpt2", texts, types, {"tokenizer.ggml.eos_token_id": 1})
    assert vt.forced_ids(vocab).tolist() == [0, 1, 2, 3]  # controls and the byte-level '!' and 'Ġ'
    counts = np.array([0, 0, 0, 0, 1, 5, 0, 5, 0])
    assert vt.choose_keep(counts, vocab, 6).tolist() == [0, 1, 2, 3, 5, 7]  # the two 5s
    assert vt.choose_keep(counts, vocab, 7).tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert vt.choose_keep(np.zeros(9), vocab, 5).tolist() == [0, 1, 2, 3, 4]  # unseen: lower id first
    with pytest.raises(ExportError, match="smaller than the 4 tokens every trim keeps"):
        vt.choose_keep(counts, vocab, 3)
    with pytest.raises(ExportError, match="nothing to trim"):
        vt.choose_keep(counts, vocab, 9)


@pytest.mark.parametrize("draft_max", [2, 4])
def test_trimmed_drafter_output_is_identical_to_target_only(tiny_pair, trimmed, draft_max):
    reference = load(tiny_pair[0], "none", TINY_SETTINGS)
    pair = load(tiny_pair[0], trimmed, TINY_SETTINGS)
    try:
        accepted = 0
        for text in [*CALIBRATION, "what is the sea", "the dog and the cat"]:
            prompt = prompt_tokens(reference.engine.target, text)
            expected = reference.engine.generate(prompt, GenerationSettings(max_tokens=40, draft_max=0)).run()
            got = pair.engine.generate(prompt, GenerationSettings(max_tokens=40, draft_max=draft_max)).run()
            assert got.tokens == expected.tokens
            accepted += got.stats.n_accepted
        assert accepted > 0  # the trimmed drafter still drafts tokens the target keeps
    finally:
        reference.close()
        pair.close()


def test_trimmed_drafter_samples_only_kept_tokens(tiny_pair, trimmed):
    pair = load(tiny_pair[0], trimmed, TINY_SETTINGS)
    try:
        drafter = pair.engine.drafter
        kept = set(pair.draft_runtime.vocab_map.keep.tolist())
        settings = GenerationSettings(
            max_tokens=40, draft_max=4, seed=7, sampling=SamplingSettings(temperature=1.0)
        )
        prompt = prompt_tokens(pair.engine.target, "the cat")
        first = pair.engine.generate(prompt, settings).run()
        again = pair.engine.generate(prompt, settings).run()
        assert first.tokens == again.tokens and first.stats.n_drafted > 0
        from edgespec.sampling import TokenSampler

        sampler = TokenSampler(SamplingSettings(temperature=1.0), np.random.default_rng(0))
        drafter.begin(prompt)
        draft = drafter.propose(prompt, 8, sampler)
        assert len(draft.tokens) == 8 and set(draft.tokens) <= kept
        assert draft.q is not None and len(draft.q) == 8
        for dist in draft.q:  # q puts no mass on dropped tokens
            assert set(np.flatnonzero(dist.as_dense(554) > 0).tolist()) <= kept
    finally:
        pair.close()


def test_trimmed_drafter_for_another_target_is_refused(tiny_changed_vocab, trimmed):
    with pytest.raises(IncompatibleModelsError, match=r"trimmed token \d+ should be target token 300"):
        load(tiny_changed_vocab, trimmed, TINY_SETTINGS)


def test_trim_errors_leave_nothing_behind(tiny_pair, trimmed, counts, tmp_path, monkeypatch):
    out = tmp_path / "t.gguf"
    with pytest.raises(ExportError, match="already trimmed"):
        vt.trim_gguf(trimmed, out, counts, 300)
    with pytest.raises(ExportError, match="drafter not found"):
        vt.trim_gguf(tmp_path / "missing.gguf", out, counts, 300)
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a readable GGUF"):
        vt.trim_gguf(tmp_path / "junk.gguf", out, counts, 300)

    import gguf

    def fail(self, tensor):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail)
    with pytest.raises(OSError, match="disk full"):
        vt.trim_gguf(tiny_pair[1], out, counts, N_KEEP)
    assert list(tmp_path.iterdir()) == [tmp_path / "junk.gguf"]


def test_a_damaged_map_is_refused():
    with pytest.raises(ModelLoadError, match="does not map to itself"):
        VocabMap(keep=np.array([0, 2], dtype=np.int32), input_map=np.array([0, 0, 0], dtype=np.int32))
    with pytest.raises(ModelLoadError, match="not strictly increasing"):
        VocabMap(keep=np.array([2, 1], dtype=np.int32), input_map=np.array([0, 1, 0], dtype=np.int32))


@pytest.fixture()
def runner(tmp_path, monkeypatch) -> CliRunner:
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    return CliRunner()


def trim_args(tiny_pair) -> list[str]:
    return [
        "export",
        "vocab-trim",
        "--target",
        str(tiny_pair[0]),
        "--draft",
        str(tiny_pair[1]),
        "--threads",
        "1",
    ]


def test_cli_vocab_trim_from_generation_and_from_a_corpus(runner, tiny_pair, tmp_path):
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in CALIBRATION))
    base = trim_args(tiny_pair)
    out = tmp_path / "trims"
    result = runner.invoke(
        cli,
        [
            *base,
            "--keep",
            "300",
            "--keep",
            "400",
            "--out",
            str(out),
            "--calibration",
            str(calibration),
            "--generate",
            "16",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    for n in (300, 400):
        vmap = VocabMap.from_gguf(out / f"draft-trim{n}.gguf")
        assert vmap is not None and vmap.n_keep == n and vmap.frequency_source.startswith("generated:")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 20)
    result = runner.invoke(
        cli, [*base, "--keep", "300", "--out", str(tmp_path / "c.gguf"), "--corpus", str(corpus)]
    )
    assert result.exit_code == 0, result.output
    assert VocabMap.from_gguf(tmp_path / "c.gguf").frequency_source.startswith("corpus: corpus.txt")


def test_cli_vocab_trim_errors_are_one_line(runner, tiny_pair, tmp_path):
    base = trim_args(tiny_pair)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat")
    result = runner.invoke(
        cli, [*base, "--keep", "100", "--out", str(tmp_path / "x.gguf"), "--corpus", str(corpus)]
    )
    assert_one_line_error(result, "smaller than the 261 tokens every trim keeps")
    result = runner.invoke(cli, [*base, "--keep", "300", "--keep", "400", "--out", str(tmp_path / "x.gguf")])
    assert_one_line_error(result, "--out is a directory")
    missing = ["export", "vocab-trim", "--draft", str(tmp_path / "nope.gguf"), "--target", str(tiny_pair[0])]
    result = runner.invoke(
        cli, [*missing, "--keep", "300", "--out", str(tmp_path / "y.gguf"), "--corpus", str(corpus)]
    )
    assert_one_line_error(result, "drafter not found")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_bench_compares_a_trimmed_drafter_with_the_untrimmed_one(tiny_pair, trimmed, tmp_path):
    from ..helpers import bench_args

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": t, "category": "c"}) + "\n" for t in CALIBRATION[:3]))
    out = tmp_path / "b"
    extra = ["--no-ceiling", "--no-peers", "--drafter", f"t400={trimmed}", "--config", "draft:k=3"]
    result = CliRunner().invoke(
        cli, bench_args(tiny_pair, dataset, out, *extra, "--config", "draft:k=3,model=t400")
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    rows = {row["config"]: row for row in data["summary"]}
    assert set(rows) == {"target-only", "draft k=3", "draft k=3 model=t400"}
    assert (
        rows["draft k=3 model=t400"]["draft_ms_per_token"] > 0
        and rows["draft k=3 model=t400"]["mismatches"] == 0
    )
    assert data["settings"]["drafters"] == {"t400": str(trimmed)}
    bad = CliRunner().invoke(cli, bench_args(tiny_pair, dataset, out, *extra, "--config", "draft:model=nope"))
    assert_one_line_error(bad, "no drafter named 'nope' (known: t400)")
    bad = CliRunner().invoke(
        cli, bench_args(tiny_pair, dataset, out, "--drafter", "oops", "--config", "draft")
    )
    assert_one_line_error(bad, "expected NAME=PATH")


def test_onnx_export_refuses_a_trimmed_gguf(trimmed, tmp_path):
    from edgespec.exporters.onnx import export_onnx

    with pytest.raises(ExportError, match="is a VocabTrim drafter; export the untrimmed drafter"):
        export_onnx(trimmed, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
