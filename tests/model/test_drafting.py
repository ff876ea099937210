from __future__ import annotations

import pytest

from edgespec.drafting import Drafter, ModelDrafter, NgramDrafter, common_prefix, reuse_prefix


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


class _Cuts:
    """Records the truncations a runtime is asked for."""

    def __init__(self) -> None:
        self.cuts: list[int] = []

    def truncate(self, n: int) -> None:
        self.cuts.append(n)


@pytest.mark.parametrize(
    "held, tokens, redo_last, keep",
    [
        ([1, 2, 3], [1, 2, 4, 5], False, 2),
        ([1, 2, 3], [1, 2, 4, 5], True, 2),
        ([1, 2, 3], [1, 2, 3], False, 3),  # all held: nothing to evaluate
        ([1, 2, 3], [1, 2, 3], True, 2),  # all held, but the last token's logits are wanted
        ([1, 2, 3, 4], [1, 2], True, 1),
        ([], [7], True, 0),
        ([5], [7], False, 0),
        ([], [], True, 0),  # never a negative cut
    ],
)
def test_reuse_prefix_cuts_the_cache_to_what_stays(held, tokens, redo_last, keep):
    runtime = _Cuts()
    assert reuse_prefix(runtime, held, tokens, redo_last=redo_last) == keep
    assert runtime.cuts == [keep]


def test_ngram_proposes_what_followed_the_latest_match():
    d = NgramDrafter(n_min=2, n_max=3)
    assert isinstance(d, Drafter)
    context = [1, 2, 3, 4, 5, 9, 9, 2, 3]
    assert d.propose(context, 3).tokens == [4, 5, 9]
    # the longest n-gram wins: [7, 2, 3] occurs later with a different continuation
    context = [7, 2, 3, 8, 8, 1, 2, 3, 4, 4, 7, 2, 3]
    assert d.propose(context, 2).tokens == [8, 8]


def test_ngram_prefers_latest_occurrence_and_grows_incrementally():
    d = NgramDrafter(n_min=2, n_max=2)
    context = [5, 6, 1, 5, 6, 2]
    assert d.propose(context + [5, 6], 1).tokens == [2]
    # appending keeps the index in sync; a non-extension rebuilds it
    assert d.propose(context + [5, 6, 2, 7, 5, 6], 2).tokens == [2, 7]
    assert d.propose([9, 9, 8, 9, 9], 4).tokens == [8, 9, 9]


def test_ngram_returns_nothing_without_a_match_or_room():
    d = NgramDrafter()
    assert d.propose([1, 2, 3, 4], 4).tokens == []
    assert d.propose([1, 2, 1, 2], 0).tokens == []
    with pytest.raises(ValueError):
        NgramDrafter(n_min=3, n_max=2)


def test_model_drafter_keeps_its_cache_in_step(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    drafter = ModelDrafter(draft_rt, max_id=target.vocab.n_vocab)
    prompt = draft_rt.tokenize("the cat sat on", add_special=True, parse_special=False)
    first = drafter.propose(prompt, 4).tokens
    assert len(first) == 4
    # drafts are greedy continuations of the draft model
    draft_rt.truncate(0)
    logits = draft_rt.eval(prompt)
    reference = [int(logits[0].argmax())]
    for _ in range(3):
        reference.append(int(draft_rt.eval([reference[-1]])[0].argmax()))
    assert first == reference
    # pretend the target accepted 2 and corrected the third: the cache follows the new context
    drafter.begin(prompt)
    assert draft_rt.n_past == len(prompt)
    drafter.propose(prompt, 4)
    context = prompt + first[:2] + [42]
    second = drafter.propose(context, 3).tokens
    assert drafter._state.cached == context + second[:-1]
    assert draft_rt.n_past == len(context) + len(second) - 1


def test_model_drafter_stops_at_tokens_the_target_lacks(tiny_runtimes):
    _, draft_rt = tiny_runtimes
    prompt = draft_rt.tokenize("the cat", add_special=True, parse_special=False)
    free = ModelDrafter(draft_rt).propose(prompt, 3).tokens
    assert ModelDrafter(draft_rt, max_id=free[0]).propose(prompt, 3).tokens == []
    assert ModelDrafter(draft_rt, max_id=max(free) + 1).propose(prompt, 3).tokens == free
