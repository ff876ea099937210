"""Verification: pure functions from draft tokens and target logits to accepted tokens.

Names follow the speculative-decoding papers: p is the target's distribution, q the draft's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def verify_greedy(draft: Sequence[int], p_logits: np.ndarray) -> tuple[int, int]:
    """Greedy verification: keep the longest draft prefix the target's argmax agrees with.

    The target scored the last accepted token followed by the k draft tokens, so row i of p_logits
    predicts the token at draft position i, and row k predicts the token after a fully accepted
    draft. The result equals what target-only greedy decoding would produce.

    Args:
        draft: k proposed token ids.
        p_logits: target logits, shape (k + 1, n_vocab).

    Returns:
        (n_accepted, next_token): how many draft tokens are kept (0 … k) and the target's own token
        that follows them (a correction on a mismatch, a bonus token when all k were accepted).
    """
    k = len(draft)
    if p_logits.shape[0] != k + 1:
        raise ValueError(f"need k + 1 = {k + 1} rows of target logits, got {p_logits.shape[0]}")
    p_argmax = p_logits.argmax(axis=1)
    n_accepted = 0
    while n_accepted < k and draft[n_accepted] == p_argmax[n_accepted]:
        n_accepted += 1
    return n_accepted, int(p_argmax[n_accepted])
