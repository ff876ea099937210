import numpy as np
import pytest

from edgespec.verify import verify_greedy


def logits_for(argmaxes: list[int], n_vocab: int = 10) -> np.ndarray:
    rows = np.zeros((len(argmaxes), n_vocab), dtype=np.float32)
    for i, token in enumerate(argmaxes):
        rows[i, token] = 5.0
    return rows


def test_all_accepted_gives_bonus_token():
    assert verify_greedy([3, 4, 5], logits_for([3, 4, 5, 6])) == (3, 6)


def test_first_mismatch_gives_target_correction():
    assert verify_greedy([3, 9, 5], logits_for([3, 4, 5, 6])) == (1, 4)


def test_first_token_rejected():
    assert verify_greedy([7, 4], logits_for([3, 4, 5])) == (0, 3)


def test_empty_draft_is_plain_decoding():
    assert verify_greedy([], logits_for([8])) == (0, 8)


def test_accepted_prefix_stops_at_first_mismatch_even_if_later_tokens_match():
    # draft position 1 is wrong; position 2 matching again must not count
    assert verify_greedy([3, 0, 5], logits_for([3, 4, 5, 6])) == (1, 4)


def test_wrong_row_count_is_an_error():
    with pytest.raises(ValueError, match="k \\+ 1"):
        verify_greedy([1, 2], logits_for([1, 2]))
