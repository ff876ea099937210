"""Verification: pure functions from draft tokens and target logits to accepted tokens.

Names follow the speculative-decoding papers: p is the target's distribution, q the draft's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edgespec.sampling import Dist, residual


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
    return verify_greedy_by(draft, lambda i: int(p_logits[i].argmax()))


def verify_greedy_by(draft: Sequence[int], argmax: Callable[[int], int]) -> tuple[int, int]:
    """`verify_greedy` with the target's choice at row i given as `argmax(i)` (e.g. under a
    grammar's mask, computed only for the rows verification reaches).

    Row by row, up to the first disagreement: a 64-token draft rejected early does not pay for the
    argmax of every row (each is n_vocab wide).
    """
    n_accepted = 0
    while True:
        token = argmax(n_accepted)
        if n_accepted == len(draft) or draft[n_accepted] != token:
            return n_accepted, token
        n_accepted += 1


def verify_rejection(
    draft: Sequence[int],
    q: Sequence[Dist] | None,
    p: Sequence[Dist],
    uniforms: np.ndarray,
    n_vocab: int,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the accepted tokens are
    distributed exactly as if the target had sampled them one by one.

    Draft token x_i, drawn from q_i, is kept with probability min(1, p_i(x_i) / q_i(x_i)). At the
    first rejection the target's token comes from norm(max(0, p_i − q_i)); when every draft is kept
    it comes from p_k. A drafter without a distribution (n-gram) has q_i = one-hot(x_i): x_i is kept
    with probability p_i(x_i), and a rejection samples p_i with x_i removed.

    Positions are checked in order and p[i] is read only once position i is reached, so `p` may
    be a lazy sequence (`sampling.LazyDists`): a step that rejects at position j processes j + 1
    logits rows instead of k + 1, which is most of the cost of a step on a 152k-token vocabulary.

    Args:
        draft: k proposed token ids.
        q: the k draft distributions, or None for point proposals (one-hot).
        p: k + 1 target distributions; p[i] is for draft position i, p[k] follows a full draft.
        uniforms: k + 1 independent draws from U[0, 1): one acceptance test per draft token, and
            one for the target's own token.
        n_vocab: the target's vocabulary size.

    Returns:
        (n_accepted, next_token) as for `verify_greedy`.
    """
    k = len(draft)
    if len(p) != k + 1 or len(uniforms) != k + 1 or (q is not None and len(q) != k):
        raise ValueError("need k draft distributions, k + 1 target distributions and k + 1 uniforms")
    n_accepted = 0
    while n_accepted < k:
        x = draft[n_accepted]
        px = p[n_accepted].prob(x)
        qx = 1.0 if q is None else q[n_accepted].prob(x)
        # u < p/q, written without a division: q <= p always accepts, q = 0 < p too.
        if not uniforms[n_accepted] * qx < px:
            break
        n_accepted += 1
    if n_accepted == k:
        return k, p[k].sample(float(uniforms[k]))
    q_rejected = Dist.one_hot(draft[n_accepted]) if q is None else q[n_accepted]
    rest = residual(p[n_accepted], q_rejected, n_vocab)
    # rest is None only when p equals q up to rounding: then rejecting had probability 0, and p is
    # the right distribution to fall back on.
    return n_accepted, (rest or p[n_accepted]).sample(float(uniforms[k]))


def verify_exact_match(draft: Sequence[int], p: Sequence[Dist], uniforms: np.ndarray) -> tuple[int, int]:
    """Exact-match acceptance (llama.cpp, llama-cpp-python, mlx-lm): the target samples its own
    token at each position; a draft token is kept only if it equals that sample.

    Also exact in distribution, but wastes drafts whenever sampling is random. Arguments and
    result as for `verify_rejection` (uniforms[i] draws the target's sample at position i).
    """
    k = len(draft)
    if len(p) != k + 1 or len(uniforms) != k + 1:
        raise ValueError("need k + 1 target distributions and k + 1 uniforms")
    for i, x in enumerate(draft):
        y = p[i].sample(float(uniforms[i]))
        if y != x:
            return i, y
    return k, p[k].sample(float(uniforms[k]))
