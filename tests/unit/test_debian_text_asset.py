"""The `debian-text` asset's reStructuredText reader: prose paragraphs in, markup, code and lists out."""

from __future__ import annotations

from mmtrain.assets import debian_text
from mmtrain.data.manifest import parse_record

RST = """\
Memory barriers
===============

The kernel uses :c:func:`smp_mb` and ``READ_ONCE()`` to order accesses, as described in
`the memory model <https://example.org/lkmm>`_. This paragraph is *real* prose that continues
for long enough to be kept by the reader, over **two** sentences.

.. note::

   A directive body is indented and never prose, however long it is and whatever it says here.

An example follows::

    int x = READ_ONCE(y);  /* code is dropped */

- a list item that is long enough to pass the word count if it were prose at all, but is a list

+------+------+
| a    | b    |
+------+------+

Short paragraph.
"""


def test_paragraphs_keep_prose_and_reduce_markup():
    found = list(debian_text.paragraphs(RST))
    assert found == ["The kernel uses smp_mb and READ_ONCE() to order accesses, as described in the memory model. "
                     "This paragraph is real prose that continues for long enough to be kept by the reader, over "
                     "two sentences.", "Short paragraph."]


def test_texts_are_cut_at_sentence_ends_within_the_word_limits():
    sentence = " ".join(["word"] * 29) + " end."  # 30 words
    paragraph = " ".join(sentence[0].upper() + sentence[1:] for _ in range(7))  # 210 words
    texts = debian_text.texts_of(paragraph)
    assert [len(t.split()) for t in texts] == [150, 60]
    assert all(t.endswith("end.") for t in texts)
    assert debian_text.texts_of("Too short to keep.") == []
    assert debian_text.texts_of(" ".join(["Word"] * 200) + ".") == []  # one sentence over the limit


def test_continuation_samples_are_valid_text_only_records(tmp_path):
    text = " ".join(f"w{i}" for i in range(40))
    sample = debian_text.continuation_sample(text, "train", 7)
    human, gpt = sample["conversations"]
    assert human["value"] == "Continue this text: " + " ".join(f"w{i}" for i in range(10))
    assert gpt["value"] == " ".join(f"w{i}" for i in range(10, 40))
    record = parse_record(sample, tmp_path / "train.jsonl", 1)
    assert record.image is None and sample["id"] == "debian-text-train-000007"


def test_sentences_for_the_word_converter():
    text = "A short one. " + "This sentence has exactly seven words here. " + " ".join(["Long"] * 41) + "."
    assert debian_text.sentences_of(text) == ["This sentence has exactly seven words here."]
