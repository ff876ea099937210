"""Can this draft model draft for this target? Checked once, at load, with the reason on failure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import IncompatibleModelsError

if TYPE_CHECKING:
    from .runtimes.base import Runtime

# Vocabularies may differ by padding rows added for matrix alignment (llama.cpp tolerates 128).
MAX_VOCAB_PADDING = 128


def check_compatible(target: Runtime, draft: Runtime) -> None:
    """Raise IncompatibleModelsError unless the draft's tokens mean the same as the target's.

    Checks tokenizer type, BOS/EOS/EOT ids and BOS insertion, vocabulary sizes (a difference of at
    most MAX_VOCAB_PADDING), and identical token texts over the shared id range.
    """
    t, d = target.vocab, draft.vocab
    names = f"draft {draft.path.name} cannot draft for target {target.path.name}"
    if t.kind != d.kind:
        raise IncompatibleModelsError(f"{names}: tokenizer types differ (target {t.kind}, draft {d.kind})")
    for label in ("bos", "eos", "eot"):
        if getattr(t, label) != getattr(d, label):
            raise IncompatibleModelsError(
                f"{names}: {label.upper()} token ids differ (target {getattr(t, label)}, "
                f"draft {getattr(d, label)})"
            )
    if t.add_bos != d.add_bos:
        raise IncompatibleModelsError(f"{names}: one adds a BOS token to prompts and the other does not")
    if abs(t.n_vocab - d.n_vocab) > MAX_VOCAB_PADDING:
        raise IncompatibleModelsError(
            f"{names}: vocabulary sizes differ by more than padding (target {t.n_vocab}, draft {d.n_vocab})"
        )
    for token in range(min(t.n_vocab, d.n_vocab)):
        t_text, d_text = target.token_text(token), draft.token_text(token)
        if t_text != d_text:
            raise IncompatibleModelsError(
                f"{names}: token {token} differs (target {t_text.decode('utf-8', 'replace')!r}, "
                f"draft {d_text.decode('utf-8', 'replace')!r})"
            )
