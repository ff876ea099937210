"""Continuous batching (`edgespec.batching`) on the tiny models: several generations at once on
one target context and one draft context, each answer compared with the same generation served
alone (a context of its own, nothing beside it), under exact kernels.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from edgespec.batching import NEAR, Batcher, SeqView, Slots
from edgespec.control import ControlledDrafter, GoodputController
from edgespec.drafting import ModelDrafter, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.errors import EngineBusy
from edgespec.runtimes.llama_cpp import LlamaCppRuntime
from edgespec.sampling import SamplingSettings

from ..conftest import TINY_SETTINGS

N = 4
TEXTS = [
    "the cat sat on the",
    "once upon a time there was a",
    "a b c a b c a b",
    "hello world, the",
    "def main(): return main",
    "one two three four one two",
]


def requests() -> list[tuple[str, str, GenerationSettings]]:
    """(prompt, drafter kind, settings): model drafts with different k, n-grams, none; greedy and
    seeded sampling."""
    greedy = GenerationSettings(max_tokens=40)
    sampled = replace(greedy, sampling=SamplingSettings(temperature=0.8, top_k=40))
    return [
        (TEXTS[0], "model", replace(greedy, draft_max=4)),
        (TEXTS[1], "ngram", replace(greedy, draft_max=5)),
        (TEXTS[2], "model", replace(sampled, draft_max=2, seed=7)),
        (TEXTS[3], "none", replace(greedy, draft_max=0)),
        (TEXTS[4], "model", replace(sampled, draft_max=3, seed=11)),
        (TEXTS[5], "ngram", replace(greedy, draft_max=3)),
    ]


def drafter(kind: str, view, n_vocab: int):
    if kind == "model":
        return ModelDrafter(view, max_id=n_vocab)
    return NgramDrafter() if kind == "ngram" else None


def drafting_requests() -> list[tuple[str, str, GenerationSettings]]:
    """One request per slot, each drafting with the model, k from 1 to N; greedy and seeded."""
    greedy = GenerationSettings(max_tokens=40)
    sampled = replace(greedy, sampling=SamplingSettings(temperature=0.8, top_k=40))
    return [
        (TEXTS[i], "model", replace(sampled if i % 2 else greedy, draft_max=i + 1, seed=i)) for i in range(N)
    ]


@pytest.fixture(scope="module")
def alone(tiny_pair) -> list[list[int]]:
    return served_alone(tiny_pair, requests())


def served_alone(tiny_pair, asked: list[tuple[str, str, GenerationSettings]]) -> list[list[int]]:
    """Each request's tokens, served alone."""
    out = []
    with (
        LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS) as target,
        LlamaCppRuntime(tiny_pair[1], TINY_SETTINGS) as draft,
    ):
        for text, kind, settings in asked:
            target.truncate(0)
            draft.truncate(0)
            prompt = target.tokenize(text, add_special=True, parse_special=False)
            engine = SpeculativeEngine(target, drafter(kind, draft, target.vocab.n_vocab))
            out.append(engine.generate(prompt, settings).run().tokens)
    return out


@pytest.fixture()
def contexts(tiny_pair):
    settings = replace(TINY_SETTINGS, n_seq=N)
    with LlamaCppRuntime(tiny_pair[0], settings) as target, LlamaCppRuntime(tiny_pair[1], settings) as draft:
        yield target, draft


def serve_together(target, draft, cap: int | None = None, linked: bool = True, asked=None):
    """Every request (`requests()` unless `asked`) at once, each in its own thread on a slot of its
    own kind of drafter."""
    asked = requests() if asked is None else asked
    target_batcher, draft_batcher = Batcher(target, cap=cap), Batcher(draft, cap=cap)
    if linked:
        target_batcher.link(draft_batcher)
    views = [(SeqView(target_batcher, i), SeqView(draft_batcher, i)) for i in range(N)]
    results: dict[int, list[int]] = {}
    free = list(range(N))
    lock = threading.Condition()
    start = threading.Barrier(len(asked))

    def serve(index: int, text: str, kind: str, settings: GenerationSettings) -> None:
        start.wait()
        with lock:
            lock.wait_for(lambda: free)
            slot = free.pop(0)
        target_view, draft_view = views[slot]
        target_view.truncate(0)
        draft_view.truncate(0)
        prompt = target.tokenize(text, add_special=True, parse_special=False)
        engine = SpeculativeEngine(target_view, drafter(kind, draft_view, target.vocab.n_vocab))
        results[index] = engine.generate(prompt, settings).run().tokens
        target_batcher.leave(slot)
        draft_batcher.leave(slot)
        with lock:
            free.append(slot)
            lock.notify_all()

    threads = [threading.Thread(target=serve, args=(i, *r)) for i, r in enumerate(asked)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return [results[i] for i in range(len(threads))], target_batcher, draft_batcher


def test_each_answer_is_the_one_served_alone(contexts, alone):
    target, draft = contexts
    assert target.guarantee == "exact" and target.batch_rows >= 4
    answers, target_batcher, draft_batcher = serve_together(target, draft)
    assert answers == alone
    # The passes were shared: sequences with different numbers of drafts in one llama_decode.
    assert target_batcher.stats.shared > 10 and target_batcher.stats.widest >= 2
    assert max(p.seqs for p in target_batcher.stats.history) <= N
    passes = target_batcher.stats.history  # each pass timed, for `benchmarks/batch_steps.py`
    assert all(p.seconds > 0 for p in passes) and target_batcher.stats.busy == pytest.approx(
        sum(p.seconds for p in passes)
    )
    assert draft_batcher.stats.passes > 0  # the drafters drafted through their views


def test_the_model_drafter_drafts_for_all_its_sequences_in_one_batch(tiny_pair):
    # Under llama.cpp's own kernels a pass holds every sequence's verification (under the exact
    # ones the tiny target's cap of 8 rows splits 2 + 3 + 4 + 5 rows, and its halves alternate).
    settings = replace(TINY_SETTINGS, n_seq=N, kernels="fast")
    with LlamaCppRuntime(tiny_pair[0], settings) as target, LlamaCppRuntime(tiny_pair[1], settings) as draft:
        _, apart, _ = serve_together(target, draft, linked=False, asked=drafting_requests())
        _, verified, drafted = serve_together(target, draft, asked=drafting_requests())
    # Linked, the sequences keep in step: the draft passes hold every sequence still drafting (k
    # from 1 to 4), and one verification pass waits for the longest draft instead of running
    # without it (unlinked, the sequences drift apart into passes of their own).
    together = [p for p in verified.stats.history if p.seqs == N]
    assert len(together) >= verified.stats.passes / 3 and drafted.stats.widest == N
    assert verified.stats.passes < 0.8 * apart.stats.passes
    rounds = verified.stats.passes
    assert drafted.stats.passes <= N * rounds  # at most k_max draft passes per verification


def test_a_narrow_cap_splits_passes_and_changes_no_answer(contexts, alone):
    target, draft = contexts
    answers, batcher, _ = serve_together(target, draft, cap=2)
    assert answers == alone
    assert (
        batcher.cap == 2
        and max(p.rows for p in batcher.stats.history if p.seqs > 1) <= 2
        and batcher.stats.shared > 0
    )


def test_slots_lend_the_slot_with_the_longest_cached_prefix(contexts):
    target, _ = contexts
    slots = Slots(Batcher(target), lambda view: NgramDrafter())
    first = target.tokenize("the cat sat on the mat", add_special=True, parse_special=False)
    other = target.tokenize("once upon a time", add_special=True, parse_special=False)
    a = slots.acquire(first)
    slots.engines[a].generate(first, GenerationSettings(max_tokens=3)).run()
    b = slots.acquire(other)
    slots.engines[b].generate(other, GenerationSettings(max_tokens=3)).run()
    slots.release(a)
    slots.release(b)
    assert slots.acquire([*first, 5, 6]) == a  # the next turn of the first conversation
    assert slots.acquire([*other, 7]) == b
    held = [slots.acquire([9]), slots.acquire([9])]
    assert sorted({a, b, *held}) == list(range(N)) and slots.busy == N
    with pytest.raises(EngineBusy, match="every slot is busy"):
        slots.acquire([9], timeout=0.05)
    slots.release(held[0])
    assert slots.acquire([9], timeout=0.05) == held[0]


def test_a_prompt_joining_others_is_chunked_under_the_distribution_guarantee(tiny_pair):
    with LlamaCppRuntime(tiny_pair[0], replace(TINY_SETTINGS, n_seq=2, kernels="fast")) as rt:
        assert rt.guarantee == "distribution"
        batcher = Batcher(rt, chunk=4)
        running, joining = SeqView(batcher, 0), SeqView(batcher, 1)
        prompt = list(range(5, 35))  # 30 tokens
        assert joining.eval(prompt).shape == (1, rt.vocab.n_vocab)
        assert batcher.stats.history[-1].rows == 30  # nobody else generating: one pass, whole
        joining.truncate(0)
        running.eval([1, 2, 3])
        stop = threading.Event()

        def generate() -> None:  # a stream's steps, one row each
            while not stop.is_set():
                running.eval([7], "all")
                running.truncate(3)

        thread = threading.Thread(target=generate)
        thread.start()
        try:
            while not batcher.others(1):
                threading.Event().wait(0.001)
            before = batcher.stats.passes
            rows = joining.eval(prompt, "last")
        finally:
            stop.set()
            thread.join()
        passes = list(batcher.stats.history)[before - batcher.stats.passes :]
        assert rows.shape == (1, rt.vocab.n_vocab) and list(rt.seq_tokens(1)) == prompt
        # 7 chunks of 4 rows, then the last 2, beside the running stream's steps (a step late for
        # the window on a loaded machine goes in the next pass)
        assert len(passes) >= 8 and max(p.rows for p in passes) <= 5
        assert sum(p.seqs == 2 for p in passes) >= 4
    with LlamaCppRuntime(tiny_pair[0], replace(TINY_SETTINGS, n_seq=2)) as exact:
        assert Batcher(exact, chunk=4).chunk is None  # never under the exact guarantee


def test_each_slots_controller_prices_the_passes_it_shares(contexts):
    target, _ = contexts

    def controlled(view):
        return ControlledDrafter(GoodputController([0.08, 0.13, 0.17], 0.0, k_max=2), None, NgramDrafter())

    batcher = Batcher(target)
    slots = Slots(batcher, controlled)
    sharing = [engine.drafter.sharing for engine in slots.engines]  # type: ignore[union-attr]
    assert all(s is not None for s in sharing) and [s() for s in sharing] == [0] * N  # type: ignore[misc]
    with batcher._cond:  # as after a pass of sequences 0, 1 and 3
        batcher._last = {0, 1, 3}
    assert [s() for s in sharing] == [2, 2, 3, 2]  # type: ignore[misc]
    batcher.leave(1)
    assert [s() for s in sharing] == [1, 2, 2, 1]  # type: ignore[misc]


def test_slots_keep_the_busy_ids_consecutive_unless_a_long_prefix_is_cached(contexts):
    target, _ = contexts
    slots = Slots(Batcher(target), lambda view: None)
    for engine in slots.engines:
        engine.forget()
    long = list(range(10, 10 + NEAR + 16))
    assert [slots.acquire([9], reuse=False) for _ in range(N)] == [0, 1, 2, 3]
    slots.engines[3].generate(long, GenerationSettings(max_tokens=1)).run()
    slots.release(1)
    slots.release(3)
    # busy 0 and 2: a prompt sharing a few tokens with slot 3 takes 1, closing the gap
    assert slots.acquire([*long[:5], 7]) == 1
    slots.release(1)
    # one sharing more than NEAR tokens with slot 3 takes it, gap or not
    assert slots.acquire([*long, 7]) == 3
    slots.release(3)
    assert slots.acquire([*long, 7], reuse=False) == 1  # without reuse the prefix counts for nothing
