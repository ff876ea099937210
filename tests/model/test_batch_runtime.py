"""Several sequences in one llama.cpp context (`RuntimeSettings.n_seq`, `eval_many`,
`truncate_seq`): the groundwork of continuous batching (issue 20).

Under exact kernels, a sequence's rows in a batch shared with other sequences are compared bit for
bit with the same tokens evaluated one at a time in a context that holds that sequence alone, the
reference an answer served alone is made of.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgespec.errors import PromptError
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..conftest import TINY_SETTINGS

TEXTS = ["the cat sat on", "once upon a time there", "def main(): return", "a b c d e f g"]


@pytest.fixture(scope="module")
def many(tiny_pair):
    with LlamaCppRuntime(tiny_pair[0], replace(TINY_SETTINGS, n_seq=4)) as rt:
        yield rt


def alone_rows(rt: LlamaCppRuntime, tokens: list[int]) -> np.ndarray:
    """Each token's logits row, evaluated one at a time in sequence 0 of `rt`, from empty."""
    rt.truncate(0)
    return np.stack([rt.eval([t], logits="all")[0].copy() for t in tokens])


def prompts(rt: LlamaCppRuntime) -> list[list[int]]:
    return [rt.tokenize(t, add_special=True, parse_special=False) for t in TEXTS]


def test_rows_in_a_shared_batch_are_the_rows_computed_alone(tiny_pair, many):
    sequences = prompts(many)
    with LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS) as one:
        assert one.guarantee == "exact" and one.n_seq == 1
        reference = [alone_rows(one, tokens) for tokens in sequences]
    for seq in range(4):
        many.truncate_seq(seq, 0)
    # Rounds of ragged parts (1 to 3 rows per sequence, 8 rows at most per batch), as a step of
    # continuous batching has: sequences that verify different numbers of drafts, or join late.
    plans = [[3, 2, 1, 2], [1, 3, 0, 2], [2, 0, 3, 1], [1, 1, 1, 1], [3, 3, 2, 0]]
    done = [0, 0, 0, 0]
    checked = 0
    for round_, plan in enumerate(plans):
        parts = []
        for seq, n in enumerate(plan):
            piece = sequences[seq][done[seq] : done[seq] + n]
            if piece:
                parts.append((seq, piece))
        if round_ % 2:
            parts.reverse()  # the batch is laid out in sequence order; rows come back in the caller's
        rows = many.eval_many(parts)
        for (seq, piece), got in zip(parts, rows, strict=True):
            want = reference[seq][done[seq] : done[seq] + len(piece)]
            assert np.array_equal(got, want), f"sequence {seq} rows {done[seq]}…"
            done[seq] += len(piece)
            checked += len(piece)
        assert [len(many.seq_tokens(s)) for s in range(4)] == done
    assert checked >= 20


def test_last_rows_and_rolling_one_sequence_back(tiny_pair, many):
    sequences = prompts(many)
    for seq in range(4):
        many.truncate_seq(seq, 0)
    many.eval_many([(s, sequences[s]) for s in (0, 1)], logits="last")
    rows = many.eval_many([(0, [7, 8]), (1, [9])], logits="last")
    assert [r.shape[0] for r in rows] == [1, 1]
    # "none" evaluates a part without rows (a prompt's chunk): only the other part's row comes back
    rows = many.eval_many([(2, [5, 6, 7]), (3, [8])], logits=["none", "last"])
    assert [r.shape for r in rows] == [(0, many.vocab.n_vocab), (1, many.vocab.n_vocab)]
    assert [len(many.seq_tokens(s)) for s in (2, 3)] == [3, 1]
    assert [r.shape[0] for r in many.eval_many([(2, [9]), (3, [9])], "none")] == [0, 0]
    # Roll sequence 0 back to its prompt and take another continuation: sequence 1 is untouched,
    # and sequence 0's rows are those of a context that never saw the rolled-back tokens.
    many.truncate_seq(0, len(sequences[0]))
    assert list(many.seq_tokens(0)) == sequences[0]
    assert list(many.seq_tokens(1)) == [*sequences[1], 9]
    got = many.eval_many([(0, [11, 12]), (1, [13])])
    with LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS) as one:
        want0 = alone_rows(one, [*sequences[0], 11, 12])[-2:]
        want1 = alone_rows(one, [*sequences[1], 9, 13])[-1:]
    assert np.array_equal(got[0], want0) and np.array_equal(got[1], want1)


def test_bad_calls_change_nothing(many):
    for seq in range(4):
        many.truncate_seq(seq, 0)
    many.eval_many([(2, [5, 6])])
    for parts, error, message in [
        ([(4, [1])], ValueError, "no sequence 4: this context holds 4"),
        ([(0, [1]), (0, [2])], ValueError, "appears twice"),
        ([(0, [])], ValueError, "at least one token"),
        ([(1, [10**6])], ValueError, "outside the vocabulary"),
        ([(0, [5] * 600)], ValueError, "600 tokens do not fit one batch of 512"),
    ]:
        with pytest.raises(error, match=message):
            many.eval_many(parts)
    many.eval_many([(2, [5] * 200)])
    with pytest.raises(PromptError, match="sequence 2: 262 tokens do not fit its context of 256"):
        many.eval_many([(1, [5]), (2, [5] * 60)])
    assert [len(many.seq_tokens(s)) for s in range(4)] == [0, 0, 202, 0]
    with pytest.raises(ValueError, match="no sequence -1"):
        many.truncate_seq(-1, 0)
