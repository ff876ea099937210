"""Which of the models on this machine can draft for a target, and which one to use.

A model can draft for a target when its token ids mean the same (`ModelInfo.vocab_id`, a
fingerprint of the tokenizer taken from the GGUF header: type, BOS insertion, special ids and every
token's text) and it is much smaller (at most `MUCH_SMALLER` of the target's file size: a drafter
that is not pays for itself only rarely). A VocabTrim drafter counts when the model it was trimmed
from (named by sha256 in its metadata) is listed here and fits the target; the full check
(`pair_check.check_compatible`) still runs when the pair loads.

`drafters_to_try` gives `--profile auto`'s candidates when a target is named without `--draft`:
the fitting models, smallest first (at most `MAX_TRIED`). Each is tuned like any pair (once; the
costs are saved), the one whose measured costs and acceptance predict the fastest decoding is
kept, and tuning may still drop it for n-grams or plain decoding; with none, n-gram drafting where
it pays. For the default target the default drafter stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgespec.fileio import size_text
from edgespec.load.registry import LocalModel, describe, find_models

__all__ = ["MAX_TRIED", "MUCH_SMALLER", "Candidate", "drafters_for", "drafters_to_try"]

#: a drafter's file at most this fraction of the target's
MUCH_SMALLER = 0.5
#: most draft models measured for one target (each is tuned once, then its costs are kept)
MAX_TRIED = 3


@dataclass(frozen=True)
class Candidate:
    """A model considered as a drafter, whether it fits, and why."""

    model: LocalModel
    fits: bool
    why: str


def drafters_for(target: LocalModel, found: Sequence[LocalModel]) -> list[Candidate]:
    """Every listed model judged as a drafter for `target`: the fitting ones first, smallest first.

    Raises:
        ValueError: the target itself has no readable header (`target.error`).
    """
    if target.info is None:
        raise ValueError(f"{target.name}: {target.error}")
    own = {p.resolve() for p in target.files}
    by_sha = {m.sha256: m for m in found if m.sha256}
    out = []
    for model in found:
        if own & {p.resolve() for p in model.files}:
            continue
        fits, why = _judge(target, model, by_sha)
        out.append(Candidate(model, fits, why))
    out.sort(key=lambda c: (not c.fits, c.model.size if c.fits else 0, c.model.name))
    return out


def _judge(target: LocalModel, model: LocalModel, by_sha: dict[str, LocalModel]) -> tuple[bool, str]:
    assert target.info is not None
    if model.info is None:
        return False, f"unusable: {model.error}"
    note = ""
    vocab = model.info.vocab_id
    if model.info.trimmed_from:
        source = by_sha.get(model.info.trimmed_from)
        if source is None or source.info is None:
            return False, f"VocabTrim-ed from a model not found here (sha256 {model.info.trimmed_from[:12]}…)"
        vocab, note = source.info.vocab_id, f"VocabTrim-ed from {source.name}, "
    if not vocab or vocab != target.info.vocab_id:
        if model.info.n_vocab != target.info.n_vocab and not model.info.trimmed_from:
            detail = f"{model.info.n_vocab:,} tokens against the target's {target.info.n_vocab:,}"
        else:
            detail = "its tokenizer or token texts differ"
        return False, f"{note}a different vocabulary ({detail})"
    ratio = model.size / max(target.size, 1)
    if ratio > MUCH_SMALLER:
        return False, (
            f"{note}same vocabulary but not much smaller ({size_text(model.size)} against the "
            f"target's {size_text(target.size)})"
        )
    return True, f"{note}same vocabulary, {1 / max(ratio, 1e-9):.1f}x smaller ({size_text(model.size)})"


def drafters_to_try(
    target_path: Path, on_note: Callable[[str], None]
) -> tuple[list[tuple[Path, str, str]], str]:
    """The draft models `--profile auto` measures for a target named without `--draft`: those that
    fit, smallest first, at most `MAX_TRIED`, as (path, name, why it was picked); with none, the
    reason. What was found is told to `on_note`."""
    target = describe(target_path)
    if target.info is None:
        return [], ""  # loading the target reports what is wrong with it
    candidates = drafters_for(target, find_models())
    fitting = [c for c in candidates if c.fits]
    listing = f"`edgespec models --drafters-for {target_path}` lists all {len(candidates)}"
    if fitting:
        tried = fitting[:MAX_TRIED]
        others = f"; measured against {len(tried) - 1} other(s) that fit" if len(tried) > 1 else ""
        if len(fitting) > MAX_TRIED:
            others += f" (the {MAX_TRIED} smallest of {len(fitting)})"
        names = ", ".join(c.model.name for c in tried)
        on_note(f"drafters for {target_path.name}: {names} ({tried[0].why}{others}); {listing}")
        why = "paired from the models here: {}, {}" + others
        return [(c.model.path, c.model.name, why.format(c.model.name, c.why)) for c in tried], ""
    if candidates:
        example = f"e.g. {candidates[0].model.name}: {candidates[0].why}"
        on_note(
            f"no model here can draft for {target_path.name} ({example}); drafting with n-grams where "
            f"they pay; {listing}"
        )
        return [], f"no model here fits ({example})"
    on_note(f"no other models here to draft for {target_path.name}; drafting with n-grams where they pay")
    return [], "no other models here"
