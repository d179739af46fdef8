"""Incremental detokenization (serving.detokenize): the same text as one whole decode, for linear work."""

from __future__ import annotations

import random

import pytest

from serving.detokenize import IncrementalText

TEXTS = [
    "Hello, world! The answer is 42.",
    "naïve café — déjà vu 😀👍🏽 日本語のテキスト,  spaces   and\ttabs\nnew lines",
    "  leading spaces, 'quotes' and \"double quotes\" ... ellipses !? ¿¡",
]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tok(request, tiny_model_dir):
    from transformers import AutoTokenizer

    if request.param == "tiny":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    from pipelines.model.loading import materialize_smollm2

    return AutoTokenizer.from_pretrained(materialize_smollm2(log=lambda *_: None))


def _streamed(tok, ids):
    text = IncrementalText(tok)
    seen = []
    for i in range(1, len(ids) + 1):
        text.add(ids[:i], final=i == len(ids))
        assert text.text.startswith("".join(seen))  # committed text is never taken back
        seen = [text.text]
        assert not text.text.endswith("\ufffd") or i == len(ids)  # no half character before the end
    return text.text


def test_streamed_text_equals_one_whole_decode(tok):
    r = random.Random(0)
    special = list(tok.all_special_ids)
    cases = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    cases.append(cases[1] + special[:1] + cases[0])  # a special token mid-text is skipped, as in a decode
    vocab = len(tok)
    cases += [[r.randrange(vocab) for _ in range(r.randint(1, 60))] for _ in range(30)]  # byte-level debris too
    for ids in cases:
        assert _streamed(tok, ids) == tok.decode(ids, skip_special_tokens=True), ids


def test_each_token_decodes_a_bounded_window(tok):
    """The old engine decoded the whole output on every token (quadratic); this decodes a few tokens."""
    ids = tok(TEXTS[0] * 40, add_special_tokens=False)["input_ids"]
    decoded = []
    text = IncrementalText(tok)
    original = text._decode
    text._decode = lambda window: decoded.append(len(window)) or original(window)
    for i in range(1, len(ids) + 1):
        text.add(ids[:i])
    assert len(ids) > 300 and max(decoded) <= 4, max(decoded)


def test_stop_strings_are_found_where_a_whole_search_finds_them(tok):
    r = random.Random(1)
    stops = ["world", "42.", "é", "zzz-never"]
    for t in TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        text = IncrementalText(tok, stops + [""])  # an empty stop string is ignored
        first = -1
        for i in range(1, len(ids) + 1):
            text.add(ids[:i])
            if r.random() < 0.5 and i < len(ids):
                continue  # searched every few tokens, as rows that skip nothing would not be
            first = text.find_stop()
            if first >= 0:
                break
        whole = tok.decode(ids, skip_special_tokens=True)
        hits = [whole.find(s) for s in stops if s in whole]
        assert first == (min(hits) if hits else -1), (t, first, hits)
