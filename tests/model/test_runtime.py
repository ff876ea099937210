"""The llama.cpp runtime on tiny models: logits rows, rollback, exact kernels, load errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgespec.errors import ModelLoadError, PromptError
from edgespec.runtimes.base import Runtime
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..conftest import TINY_SETTINGS


def greedy(rt: LlamaCppRuntime, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    rt.truncate(0)
    logits = rt.eval(prompt)
    out, rows = [int(logits[0].argmax())], []
    for _ in range(n - 1):
        logits = rt.eval([out[-1]], logits="all")
        rows.append(logits[0].copy())
        out.append(int(logits[0].argmax()))
    return out, rows


def test_runtime_protocol_and_vocab(tiny_runtimes):
    target, _ = tiny_runtimes
    assert isinstance(target, Runtime)
    assert target.vocab.kind == "spm"
    assert target.vocab.bos == 1 and target.vocab.eos == 2
    assert {2, 3} <= target.vocab.eog
    assert target.token_text(3) == b"<|im_end|>"
    assert target.token_bytes(3) == b""  # control tokens add no text
    tokens = target.tokenize("hello world", add_special=True, parse_special=False)
    assert tokens[0] == 1 and b"".join(target.token_bytes(t) for t in tokens[1:]).strip() == b"hello world"


def test_eval_rows_shapes_and_positions(tiny_runtimes):
    target, _ = tiny_runtimes
    prompt = target.tokenize("the cat sat", add_special=True, parse_special=False)
    assert target.eval(prompt, logits="last").shape == (1, target.vocab.n_vocab)
    assert target.n_past == len(prompt)
    rows = target.eval([5, 6, 7], logits="all")
    assert rows.shape == (3, target.vocab.n_vocab) and np.isfinite(rows).all()
    assert target.eval([8], logits="none").shape == (0, target.vocab.n_vocab)
    assert target.n_past == len(prompt) + 4


def test_batched_rows_equal_single_token_decoding_bit_for_bit(tiny_runtimes):
    """Exact kernels: every row of a verification batch (up to 17 here, split into pieces of 7)
    equals what single-token decoding computes, so speculative output can equal target-only."""
    target, _ = tiny_runtimes
    prompt = target.tokenize("a long time ago in a", add_special=True, parse_special=False)
    seq, single_rows = greedy(target, prompt, 24)
    for start, n in [(0, 2), (1, 5), (3, 8), (2, 17)]:
        target.truncate(0)
        target.eval(prompt, logits="none")
        for token in seq[:start]:
            target.eval([token], logits="none")
        batch = target.eval(seq[start : start + n], logits="all").copy()
        for j in range(n - 1):
            assert np.array_equal(batch[j], single_rows[start + j]), (start, n, j)


def test_truncate_rolls_back_exactly(tiny_runtimes):
    target, _ = tiny_runtimes
    prompt = target.tokenize("once upon", add_special=True, parse_special=False)
    first = target.eval(prompt).copy()
    target.eval([10, 11, 12], logits="none")
    target.truncate(len(prompt) - 1)
    again = target.eval(prompt[-1:]).copy()
    assert np.array_equal(first, again)
    assert target.n_past == len(prompt)


def test_ctrl_c_right_after_a_decode_leaves_the_cache_consistent(tiny_runtimes, monkeypatch):
    """A KeyboardInterrupt that lands between llama_decode returning and the runtime's bookkeeping
    must not leave cache cells the runtime does not know about."""
    import llama_cpp

    target, _ = tiny_runtimes
    prompt = target.tokenize("once upon a time", add_special=True, parse_special=False)
    fresh = target.eval(prompt).copy()
    target.truncate(2)
    real_decode = llama_cpp.llama_decode

    def decode_then_interrupt(ctx, batch):
        real_decode(ctx, batch)  # the cells are written ...
        raise KeyboardInterrupt  # ... and Ctrl-C arrives before n_past is updated

    monkeypatch.setattr(llama_cpp, "llama_decode", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        target.eval(prompt[2:])
    monkeypatch.setattr(llama_cpp, "llama_decode", real_decode)
    assert target.n_past == 2 and list(target.tokens) == prompt[:2]
    assert np.array_equal(target.eval(prompt[2:]), fresh)  # as if the interrupted call never ran


def test_eval_refuses_context_overflow_and_bad_ids(tiny_runtimes):
    target, _ = tiny_runtimes
    with pytest.raises(PromptError, match="do not fit"):
        target.eval([5] * (target.n_ctx + 1), logits="none")
    assert target.n_past == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target.eval([target.vocab.n_vocab])


def test_missing_file(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not found"):
        LlamaCppRuntime(tmp_path / "nope.gguf", TINY_SETTINGS)


def test_not_gguf(tmp_path: Path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some text\n")
    with pytest.raises(ModelLoadError, match="not a GGUF model file"):
        LlamaCppRuntime(path, TINY_SETTINGS)


def test_truncated_gguf_names_llama_cpp_reason(tiny_pair, tmp_path: Path):
    data = tiny_pair[0].read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="could not load") as info:
        LlamaCppRuntime(path, TINY_SETTINGS)
    assert "\n" not in str(info.value)


def test_exact_kernels_run_flash_attention_whatever_flash_attn_says(tiny_pair):
    with LlamaCppRuntime(tiny_pair[0], replace(TINY_SETTINGS, flash_attn="off")) as rt:
        assert rt.guarantee == "exact"
    with LlamaCppRuntime(tiny_pair[0], replace(TINY_SETTINGS, flash_attn="off", kernels="fast")) as fast:
        assert fast.guarantee == "distribution"
