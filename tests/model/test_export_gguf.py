"""HF checkpoint → GGUF: tiny random Qwen2 and Llama checkpoints, checked against transformers itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from edgespec.errors import ExportError
from edgespec.exporters.gguf import export_gguf, quant_names
from edgespec.runtimes.base import RuntimeSettings
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..conftest import ProgressRecorder
from ..hfmodels import CHAT_TEMPLATE

SETTINGS = RuntimeSettings(n_ctx=128, n_threads=1)

TEXTS = [
    "Hello, world! How are you today?",
    "def fibonacci(n):\n    a, b = 0, 1\n    return a",
    "It's 2024; 3.14159 and 1000000 are numbers.   Spaces\n\n\ttabs",
    "naïve café – ünïcödé ✓ 漢字",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]
"""Prose, code, digits, runs of whitespace, non-ASCII (NFC already) and special tokens."""

# Max |logit difference| between llama.cpp (F16 GGUF, one thread) and transformers (float32) over all
# ~105 positions of ROUND_TRIP_TEXT, measured on the fixtures' checkpoints (logits up to ~3.8):
#   qwen2 0.0183, llama 0.0111 with the runtime's default "exact" kernels (they keep V in BF16),
#   qwen2 0.0029, llama 0.0037 with kernels="fast".
# Broken exports measured on the same checkpoints: llama without the q/k permutation 2.76, qwen2 with
# its biases zeroed 3.00. The tolerance leaves >5x margin for other CPUs' kernels and stays ~30x below
# those failures.
F16_TOLERANCE = 0.1
ROUND_TRIP_TEXT = TEXTS[1] + " " + TEXTS[0] + " " + TEXTS[2]


@pytest.fixture(scope="module")
def hf():
    """The `export` extra, or skip: torch and transformers run the reference model."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from .. import hfmodels

    return hfmodels


@pytest.fixture(scope="module")
def checkpoints(hf, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qwen2: tied embeddings, float32, one file. llama: untied, bfloat16, sharded, padded vocab."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "qwen2": hf.build_tiny_hf(root / "qwen2", "qwen2", seed=1),
        "llama": hf.build_tiny_hf(
            root / "llama", "llama", seed=2, dtype="bfloat16", max_shard_size="100KB", vocab_padding=5
        ),
    }


@pytest.fixture(scope="module")
def f16_exports(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {arch: export_gguf(path, out / f"{arch}-f16.gguf").path for arch, path in checkpoints.items()}


@pytest.fixture(scope="module")
def wide_checkpoint(hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Widths that are multiples of 256, so that K-quants apply to every matrix."""
    root = tmp_path_factory.mktemp("wide")
    return hf.build_tiny_hf(root / "qwen2-wide", "qwen2", seed=3, hidden_size=256, intermediate_size=512)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_f16_logits_match_transformers(hf, checkpoints, f16_exports, arch: str) -> None:
    import torch

    model, tokenizer = hf.load_hf(checkpoints[arch])
    ids = tokenizer(ROUND_TRIP_TEXT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCppRuntime(f16_exports[arch], SETTINGS) as runtime:
        assert runtime.vocab.n_vocab == expected.shape[1]
        got = runtime.eval(ids, logits="all").copy()
    assert got.shape == expected.shape
    diff = float(np.abs(got - expected).max())
    assert diff < F16_TOLERANCE, f"{arch}: max |Δlogit| {diff:.4f} over {len(ids)} positions"
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() > 0.9


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tokenizer_and_template_carried(hf, checkpoints, f16_exports, arch: str) -> None:
    _, tokenizer = hf.load_hf(checkpoints[arch])
    with LlamaCppRuntime(f16_exports[arch], SETTINGS) as runtime:
        for text in TEXTS:
            expected = tokenizer(text)["input_ids"]
            assert runtime.tokenize(text, add_special=True, parse_special=True) == expected, text
            pieces = b"".join(
                runtime.token_bytes(t) for t in runtime.tokenize(text, add_special=False, parse_special=False)
            )
            assert pieces.decode("utf-8") == text
        assert runtime.chat_template() == CHAT_TEMPLATE
        assert runtime.metadata("tokenizer.ggml.pre") == ("qwen2" if arch == "qwen2" else "llama-bpe")
        vocab = runtime.vocab
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert vocab.eos == im_end and im_end in vocab.eog
        assert vocab.add_bos == (arch == "llama")
        im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert runtime.token_bytes(im_start) == b""  # CONTROL: never printed
        if arch == "llama":  # 5 padding rows beyond the tokenizer's ids
            assert vocab.n_vocab == len(tokenizer) + 5
            assert runtime.token_text(vocab.n_vocab - 1) == f"[PAD{vocab.n_vocab - 1}]".encode()


def test_tied_embeddings_have_no_output_tensor(f16_exports) -> None:
    names = {t.name for t in GGUFReader(f16_exports["qwen2"]).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert "blk.0.attn_q.bias" in names
    llama = {t.name: t.tensor_type.name for t in GGUFReader(f16_exports["llama"]).tensors}
    assert llama["output.weight"] == "F16" and llama["blk.1.ffn_norm.weight"] == "F32"


def _greedy(path: Path, n: int) -> tuple[list[int], np.ndarray]:
    with LlamaCppRuntime(path, SETTINGS) as runtime:
        prompt = runtime.tokenize(TEXTS[-1], add_special=True, parse_special=True)
        logits = runtime.eval(prompt).copy()
        first = logits[-1].copy()
        tokens: list[int] = []
        for _ in range(n):
            tokens.append(int(np.argmax(logits[-1])))
            logits = runtime.eval(tokens[-1:])
        return tokens, first


@pytest.mark.parametrize(("quant", "matrix_type"), [("Q8_0", "Q8_0"), ("Q4_K_M", "Q4_K")])
def test_quantized_export_loads_and_generates(
    wide_checkpoint, tmp_path: Path, quant: str, matrix_type: str
) -> None:
    report = export_gguf(wide_checkpoint, tmp_path / f"m-{quant}.gguf", quant, threads=1)
    assert report.quant == quant and report.architecture == "qwen2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m-{quant}.gguf"]  # the F16 step is gone
    types = {t.name: t.tensor_type.name for t in GGUFReader(report.path).tensors}
    assert types["blk.0.attn_q.weight"] == matrix_type
    assert types["blk.0.attn_norm.weight"] == "F32"
    f16 = export_gguf(wide_checkpoint, tmp_path / "m-f16.gguf")
    tokens, first = _greedy(report.path, 8)
    _, first_f16 = _greedy(f16.path, 1)
    assert len(tokens) == 8 and all(0 <= t < report.n_vocab for t in tokens)
    # Quantization noise, not a broken model: the next-token logits track the F16 model's.
    assert np.corrcoef(first, first_f16)[0, 1] > 0.9


def test_k_quant_falls_back_on_narrow_rows(checkpoints, tmp_path: Path) -> None:
    """64-wide rows are not a multiple of 256: llama.cpp picks Q5_0 / Q8_0 for those tensors."""
    report = export_gguf(checkpoints["qwen2"], tmp_path / "narrow.gguf", "Q4_K_M", threads=1)
    types = {t.tensor_type.name for t in GGUFReader(report.path).tensors}
    assert "Q4_K" not in types and types <= {"F32", "Q5_0", "Q8_0", "Q6_K"}
    tokens, _ = _greedy(report.path, 3)
    assert len(tokens) == 3


def test_progress_counts_tensors(checkpoints, tmp_path: Path) -> None:
    recorder = ProgressRecorder()
    report = export_gguf(checkpoints["qwen2"], tmp_path / "p.gguf", "Q8_0", recorder, threads=1)
    assert recorder.calls[0] == (report.n_tensors, "writing p.gguf") and recorder.calls[1] == (
        1,
        "quantizing to Q8_0",
    )
    assert sum(recorder.updates) == report.n_tensors + 1


# ----------------------------------------------------------------------------------- errors


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def _assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", "config.json not found"),
        ("model.safetensors", "model.safetensors"),
        ("tokenizer.json", "tokenizer.json not found"),
        ("tokenizer_config.json", "tokenizer_config.json not found"),
    ],
)
def test_missing_file_is_named(checkpoints, tmp_path: Path, remove: str, message: str) -> None:
    checkpoint = _copy(checkpoints["qwen2"], tmp_path)
    (checkpoint / remove).unlink()
    out_dir = tmp_path / "out"
    with pytest.raises(ExportError, match=message):
        export_gguf(checkpoint, out_dir / "m.gguf")
    _assert_nothing_written(out_dir)


def test_missing_shard_is_named(checkpoints, tmp_path: Path) -> None:
    checkpoint = _copy(checkpoints["llama"], tmp_path)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (checkpoint / shard).unlink()
    with pytest.raises(ExportError, match=f"weight shard {shard}"):
        export_gguf(checkpoint, tmp_path / "out" / "m.gguf", "Q8_0")
    _assert_nothing_written(tmp_path / "out")


def test_unsupported_architecture(checkpoints, tmp_path: Path) -> None:
    checkpoint = _copy(checkpoints["qwen2"], tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM"):
        export_gguf(checkpoint, tmp_path / "out" / "m.gguf")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t["model"].update(type="Unigram"), "Unigram tokenizer"),
        (lambda t: t["model"].update(byte_fallback=True), "SentencePiece-style tokenizer"),
        (lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"), "regex"),
    ],
    ids=["unigram", "sentencepiece", "regex"],
)
def test_unsupported_tokenizer(checkpoints, tmp_path: Path, edit, message: str) -> None:
    checkpoint = _copy(checkpoints["qwen2"], tmp_path)
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    edit(tokenizer)
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExportError, match=message):
        export_gguf(checkpoint, tmp_path / "out" / "m.gguf")
    _assert_nothing_written(tmp_path / "out")


def test_unknown_quant_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown quant 'Q9_9'.*F16.*Q4_K_M"):
        export_gguf(tmp_path, tmp_path / "out" / "m.gguf", "Q9_9")
    _assert_nothing_written(tmp_path / "out")
    assert {"F16", "Q8_0", "Q4_K_M"} <= set(quant_names())


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_failure_midway_leaves_no_file_and_keeps_the_old_one(checkpoints, tmp_path: Path, quant: str) -> None:
    """An exception while tensors are being written (here from the progress bar) cleans up everything."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "m.gguf").write_bytes(b"old")

    class Boom:
        def __init__(self) -> None:
            self.n = 0

        def __enter__(self) -> Boom:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            self.n += n
            if self.n == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_gguf(checkpoints["qwen2"], out_dir / "m.gguf", quant, lambda total, label: Boom())
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]
    assert (out_dir / "m.gguf").read_bytes() == b"old"


def test_cli_export_gguf(checkpoints, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from edgespec.cli.main import cli

    from ..helpers import assert_one_line_error

    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "q8.gguf"
    args = ["export", "gguf", "--model", str(checkpoints["qwen2"]), "--out", str(out), "--quant", "q8_0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "qwen2, Q8_0" in result.stdout
    with LlamaCppRuntime(out, RuntimeSettings(n_ctx=64, n_threads=1)) as rt:
        assert rt.eval([1, 2, 3]).shape == (1, rt.vocab.n_vocab)
    result = CliRunner().invoke(cli, ["export", "gguf", "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert_one_line_error(result, "checkpoint folder not found")
    result = CliRunner().invoke(cli, [*args[:-1], "Q9_9"])
    assert_one_line_error(result, "unknown quant 'Q9_9'")
