"""The GGUF header is parsed by one checked parser (edgespec.formats.gguf), once per load.

Loading a pair asks for each file's header several times (memory estimate, the runtime's check,
the VocabTrim map); `check_gguf` keeps the headers of unchanged files, and parses a file again
once it changes. Parses are counted by wrapping the parser (`_Reader.header`), keyed by the size
of the file parsed, which tells the files of a test apart.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgespec.errors import ModelLoadError
from edgespec.exporters import vocab_trim as vt
from edgespec.formats import gguf as ggufcheck
from edgespec.formats.gguf import check_gguf, clear_header_cache
from edgespec.formats.vocabmap import KEY_INPUT_MAP, KEY_KEEP, VocabMap
from edgespec.load.builder import load
from edgespec.load.memory import memory_need
from edgespec.placement.profiles import gguf_block_count
from edgespec.runtimes.base import RuntimeSettings

SETTINGS = RuntimeSettings(n_ctx=64, n_threads=1)
TINY_VOCAB = 554


@pytest.fixture()
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[int]]:
    """Header parses by file size, from an empty cache. Files changed just now are cached too
    (the two-second guard against same-tick rewrites is covered on its own below)."""
    counted: Counter[int] = Counter()
    parse = ggufcheck._Reader.header

    def counting(self: ggufcheck._Reader) -> ggufcheck.GGUFHeader:
        counted[self.size] += 1
        return parse(self)

    monkeypatch.setattr(ggufcheck._Reader, "header", counting)
    monkeypatch.setattr(ggufcheck, "_SETTLED_NS", -3600 * 10**9)
    clear_header_cache()
    yield counted
    clear_header_cache()


def _trim(source: Path, out: Path, n_keep: int) -> Path:
    counts = np.arange(TINY_VOCAB, dtype=np.int64)  # any frequencies will do
    vt.trim_gguf(source, out, counts, n_keep)
    return out


def test_one_load_parses_each_header_once(tiny_pair, tmp_path, parses):
    target = tmp_path / "target.gguf"
    shutil.copyfile(tiny_pair[0], target)
    draft = _trim(tiny_pair[1], tmp_path / "draft.gguf", 400)
    parses.clear()  # the trim read the source drafter
    size = {"target": target.stat().st_size, "draft": draft.stat().st_size}
    assert size["target"] != size["draft"]

    pair = load(target, draft, SETTINGS)
    try:
        # memory estimates, the runtimes' checks and the drafter's vocabulary map: one parse each
        assert pair.draft_runtime is not None and pair.draft_runtime.vocab_map is not None
    finally:
        pair.close()
    assert parses == {size["target"]: 1, size["draft"]: 1}

    pair = load(target, draft, SETTINGS)  # nothing changed: nothing parsed
    pair.close()
    assert parses == {size["target"]: 1, size["draft"]: 1}

    # Trimmed again to another size (written atomically: a new file at the same path).
    _trim(tiny_pair[1], draft, 380)
    parses.clear()
    pair = load(target, draft, SETTINGS)
    try:
        assert pair.draft_runtime is not None
        vmap = pair.draft_runtime.vocab_map
        assert vmap is not None and vmap.n_keep == 380
    finally:
        pair.close()
    assert parses == {draft.stat().st_size: 1}


def test_every_reader_shares_the_parse(tiny_pair, tmp_path, parses):
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_pair[0], path)
    header = check_gguf(path)
    assert memory_need(path, 64) is not None
    assert gguf_block_count(path) == header.metadata["llama.block_count"]
    assert VocabMap.from_gguf(path) is None
    assert check_gguf(str(path)) is header
    assert check_gguf(tmp_path / "." / "model.gguf") is header  # the same file, however named
    link = tmp_path / "link.gguf"
    link.symlink_to(path)
    assert check_gguf(link) is header
    assert sum(parses.values()) == 1


def test_a_file_changed_in_place_is_parsed_again(tiny_pair, tmp_path, parses):
    """Same size, same inode, new contents: its modification time tells."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_pair[0], path)
    os.utime(path, ns=(10**18, 10**18))
    assert check_gguf(path).metadata["llama.context_length"] != 77
    data = bytearray(path.read_bytes())
    key = b"llama.context_length"
    at = data.index(key) + len(key) + 4  # past the key and the value's type (uint32)
    data[at : at + 4] = (77).to_bytes(4, "little")
    with path.open("r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(10**18, 10**18 + 1))
    assert check_gguf(path).metadata["llama.context_length"] == 77
    assert check_gguf(path).metadata["llama.context_length"] == 77
    assert sum(parses.values()) == 2


def test_a_file_changed_just_now_is_not_cached(tiny_pair, tmp_path, parses, monkeypatch):
    """A rewrite within one tick of the file system's clock leaves size and times as they were,
    so a file changed within `_SETTLED_NS` of the check is parsed on every call."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_pair[0], path)
    monkeypatch.setattr(ggufcheck, "_SETTLED_NS", 10**18)  # every file counts as changed just now
    check_gguf(path)
    check_gguf(path)
    assert sum(parses.values()) == 2


def test_the_cache_is_bounded_and_keeps_no_failures(tiny_pair, tmp_path, parses, monkeypatch):
    monkeypatch.setattr(ggufcheck, "_CACHE_SIZE", 2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.gguf")
        shutil.copyfile(tiny_pair[0], paths[-1])
        check_gguf(paths[-1])
    assert len(ggufcheck._cache) == 2
    check_gguf(paths[2])  # kept
    check_gguf(paths[0])  # the oldest, dropped
    assert sum(parses.values()) == 4

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_pair[0].read_bytes()[:5000])
    for _ in range(2):
        with pytest.raises(
            ModelLoadError, match=f"could not load {re.escape(str(bad))}: it claims 554 strings"
        ):
            check_gguf(bad)
    assert sum(parses.values()) == 6


def test_the_shared_header_is_read_only(tiny_pair, tmp_path, parses):
    draft = _trim(tiny_pair[1], tmp_path / "draft.gguf", 400)
    header = check_gguf(draft)
    with pytest.raises(TypeError):
        header.metadata["general.architecture"] = "x"  # type: ignore[index]
    keep = header.arrays[KEY_KEEP]
    assert keep.dtype == np.dtype("<i4") and len(keep) == 400
    assert len(header.arrays[KEY_INPUT_MAP]) == TINY_VOCAB
    with pytest.raises(ValueError):
        keep[0] = 1
    # tokenizer.ggml.token_type is an int32 array; the tokens (strings) are left out
    assert len(header.arrays["tokenizer.ggml.token_type"]) == 400
    assert "tokenizer.ggml.tokens" not in header.arrays
    vmap = VocabMap.from_gguf(draft)
    assert vmap is not None and np.array_equal(vmap.keep, keep) and vmap.keep.flags.writeable
