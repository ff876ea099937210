"""Can this draft model draft for this target? Checked once, at load, with the reason on failure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgespec.errors import IncompatibleModelsError

if TYPE_CHECKING:
    from edgespec.runtimes.base import Runtime

# Vocabularies may differ by padding rows added for matrix alignment (llama.cpp tolerates 128).
MAX_VOCAB_PADDING = 128


def check_compatible(target: Runtime, draft: Runtime) -> None:
    """Raise IncompatibleModelsError unless the draft's tokens mean the same as the target's.

    Checks tokenizer type, BOS/EOS/EOT ids and BOS insertion, vocabulary sizes (a difference of at
    most MAX_VOCAB_PADDING), and identical token texts over the shared id range. A VocabTrim
    drafter (`vocab_map`) must have been trimmed from this vocabulary: a trimmed GGUF's N tokens
    must be the target's tokens keep[0 … N-1]; a drafter whose outputs alone are trimmed (it
    reads target ids) is otherwise checked like an untrimmed one.
    """
    t, d = target.vocab, draft.vocab
    names = f"draft {draft.path.name} cannot draft for target {target.path.name}"
    vmap = draft.vocab_map
    # the map of a drafter whose own ids are trimmed ids (None: it reads the target's ids)
    trimmed = vmap if vmap is not None and not draft.inputs_in_target_ids else None
    if t.kind != d.kind:
        raise IncompatibleModelsError(f"{names}: tokenizer types differ (target {t.kind}, draft {d.kind})")
    if t.add_bos != d.add_bos:
        raise IncompatibleModelsError(f"{names}: one adds a BOS token to prompts and the other does not")
    if vmap is not None:
        vmap.check_target_size(t.n_vocab, names)
    if trimmed is not None:
        if trimmed.n_keep != d.n_vocab:
            raise IncompatibleModelsError(
                f"{names}: its vocabulary map has {trimmed.n_keep} tokens, the model {d.n_vocab}"
            )
        trimmed.check_fits(target.token_text, draft.token_text, names)
    for label in ("bos", "eos", "eot"):
        d_id = getattr(d, label)
        if trimmed is not None and d_id is not None:
            d_id = trimmed.to_target(d_id)  # the draft's own ids are trimmed ids
        if getattr(t, label) != d_id:
            raise IncompatibleModelsError(
                f"{names}: {label.upper()} token ids differ (target {getattr(t, label)}, draft {d_id})"
            )
    if trimmed is not None:
        return
    # A drafter whose outputs alone are trimmed still reads (and tokenizes) the full vocabulary.
    d_n_vocab = draft.n_input_vocab if vmap is not None else d.n_vocab
    if abs(t.n_vocab - d_n_vocab) > MAX_VOCAB_PADDING:
        raise IncompatibleModelsError(
            f"{names}: vocabulary sizes differ by more than padding (target {t.n_vocab}, draft {d_n_vocab})"
        )
    for token in range(min(t.n_vocab, d_n_vocab)):
        t_text, d_text = target.token_text(token), draft.token_text(token)
        if t_text != d_text:
            raise IncompatibleModelsError(
                f"{names}: token {token} differs (target {t_text.decode('utf-8', 'replace')!r}, "
                f"draft {d_text.decode('utf-8', 'replace')!r})"
            )
