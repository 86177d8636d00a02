"""Evaluation metrics: COCO caption tokenisation, CIDEr-D, BLEU, short-answer and multiple-choice scores.

Reference values come from hand arithmetic (shown next to each case) and from the COCO caption
toolkit's own scorers (``pycocoevalcap``, a test dependency: pure Python, run on the same tokens).
The tokeniser's expected outputs were produced with the Stanford PTBTokenizer 3.4.1 jar that
``pycocoevalcap`` ships (Java is not needed to run these tests).
"""

from __future__ import annotations

import math
import random

import pytest

from mmtrain.eval.metrics import (
    COCO_PUNCTUATION,
    bleu,
    caption_tokens,
    choice_from_text,
    cider_d,
    exact_match,
    multiple_choice_accuracy,
    normalize_answer,
)

# ---------------------------------------------------------------------------------------------
# Caption tokenisation
# ---------------------------------------------------------------------------------------------

# Expected tokens are what pycocoevalcap produces: the Stanford PTBTokenizer 3.4.1 jar run with
# -preserveLines -lowerCase, then its punctuation filter. Each was checked against the jar.
TOKENIZER_CASES = [
    ("A US 25 cent piece ($.25) called a quarter.",
     ["a", "us", "25", "cent", "piece", "-lrb-", "$", ".25", "-rrb-", "called", "a", "quarter"]),
    ("It's a dog's toy-box!", ["it", "'s", "a", "dog", "'s", "toy-box"]),
    ("Don't can't won't gonna I'm we'll they've she'd",
     ["do", "n't", "ca", "n't", "wo", "n't", "gon", "na", "i", "'m", "we", "'ll", "they", "'ve", "she", "'d"]),
    ("Cannot gotta lemme wanna 'tis 'twas",
     ["can", "not", "got", "ta", "lem", "me", "wan", "na", "'t", "is", "'t", "was"]),
    ("Mr. Smith met Dr. Who on St. Patrick's day at 5th Ave. near Mt. Fuji.",
     ["mr.", "smith", "met", "dr.", "who", "on", "st.", "patrick", "'s", "day", "at", "5th", "ave.", "near",
      "mt.", "fuji"]),
    ("The U.S. army in D.C. at 5 p.m. e.g. now",
     ["the", "u.s.", "army", "in", "d.c.", "at", "5", "p.m.", "e.g.", "now"]),
    # A one-letter acronym before a capitalised sentence starter is a letter and a full stop.
    ("Vitamin C. A dog. Plan B. then", ["vitamin", "c", "a", "dog", "plan", "b.", "then"]),
    ("\"Hello,\" she said... and left -- fast -- — – ok", ["hello", "she", "said", "and", "left", "fast", "ok"]),
    ("A 'quoted' word, ‘curly’ “double” quotes", ["a", "quoted", "word", "curly", "double", "quotes"]),
    ("What?! Really?? No!!! Yes.", ["what", "?!", "really", "??", "no", "!!!", "yes"]),
    ("a man (and a hat) [with] {braces} / slash * star",
     ["a", "man", "-lrb-", "and", "a", "hat", "-rrb-", "-lsb-", "with", "-rsb-", "-lcb-", "braces", "-rcb-",
      "/", "slash", "*", "star"]),
    ("The £5 note, €10 coin and 50¢ ½ cup; 100% & more",
     ["the", "#", "5", "note", "$", "10", "coin", "and", "50", "cents", "1/2", "cup", "100", "%", "&", "more"]),
    ("1,000,000 dollars 3.14 pi 12:30 24/7 and/or 1990s '90s o'clock rock'n'roll",
     ["1,000,000", "dollars", "3.14", "pi", "12:30", "24/7", "and/or", "1990s", "'90s", "o'clock", "rock",
      "'n'", "roll"]),
    ("black-and-white x-ray t-shirt a 2-year-old -word word- dogs.The",
     ["black-and-white", "x-ray", "t-shirt", "a", "2-year-old", "word", "word", "dogs.the"]),
    ("see www.google.com or mail foo@bar.com #tag @user :) ^_^",
     ["see", "www.google.com", "or", "mail", "foo@bar.com", "#tag", "@user", ":-rrb-", "^_^"]),
    ("The colour of the theatre was grey.", ["the", "colour", "of", "the", "theatre", "was", "grey"]),
    ("  multiple   spaces\tand a\nnewline  ", ["multiple", "spaces", "and", "a", "newline"]),
    ("", []),
]


@pytest.mark.parametrize("text,expected", TOKENIZER_CASES, ids=[case[0][:30] for case in TOKENIZER_CASES])
def test_caption_tokens_match_the_coco_tokenizer(text, expected):
    assert caption_tokens(text) == expected


def test_caption_tokens_drop_exactly_the_toolkit_punctuation():
    tokens = caption_tokens("a . , ; : ! ? ... - -- ` `` ' '' b")
    assert tokens == ["a", "b"]
    # Brackets are in the toolkit's list in upper case but the tokenizer lower-cases first, so they stay.
    assert "-LRB-" in COCO_PUNCTUATION and caption_tokens("(") == ["-lrb-"]


def _random_caption_lines(seed: int, count: int) -> list[str]:
    """Caption-like lines mixing the constructs where tokenizers disagree."""
    rng = random.Random(seed)
    pieces = [
        "a man dog cats on the red bus street is sitting next to of with two".split(),
        "A The Two He It In There I Who So An TV USA London Mr St".split(),
        "Mr. Dr. St. U.S. U.S a.m. etc. e.g. vs. Inc. no. No. Jan. A. C. I. D.C. fig. Calif. Pa. Co. Ph.D.".split(),
        "'s 're 'll n't ’s ' ’ s' 'n' 'em '90s o'clock don't can't it's I'm y'all cannot gonna 'tis DON'T".split(),
        ". , ; : ! ? ... .... .. - -- --- ( ) [ ] { } \" ' ` `` '' “ ” ‘ ’ / & $ % # @ * + = < > ?! | _ ~ « » … "
        "° ½ £ €".split(),
        "3 3.5 1,000 12:30 .25 $.25 1/2 2nd 100% -5 5-10 1990s 24/7 4x4 mp3 2-year-old 12/25/2012 555-123-4567".split(),
        "toy-box x-ray and/or w/o AT&T www.google.com foo@bar.com http://x.org/a #tag @user <b> &amp; photo.jpg "
        "dogs.The :) :-( ^_^ non-U.S. pro-".split(),
    ]
    weights = [30, 8, 6, 6, 14, 6, 5]
    lines = []
    for _ in range(count):
        line = ""
        for index in range(rng.randint(1, 12)):
            piece = rng.choice(rng.choices(pieces, weights)[0])
            if rng.random() < 0.1:
                piece = piece.upper()
            separator = "" if index == 0 else (" " if rng.random() < 0.75 else "")
            line += separator + piece
        lines.append(line)
    return lines


def test_cider_d_identical_captions_score_ten():
    # Every n-gram order has non-zero weights (>= 4 words, each image has words of its own), and a
    # candidate equal to each of its references has cosine 1 at every order, no length penalty.
    references = {
        "beach.jpg": ["a dog runs along the beach", "a dog runs along the beach"],
        "kitchen.jpg": ["a woman cooks pasta in a kitchen"],
        "street.jpg": ["two red buses wait at the corner", "two red buses wait at the corner"],
    }
    candidates = {key: refs[0] for key, refs in references.items()}
    score, per_item = cider_d(candidates, references)
    assert per_item == pytest.approx({key: 10.0 for key in references}, rel=1e-12)
    assert score == pytest.approx(10.0, rel=1e-12)


def test_cider_d_no_shared_ngram_scores_zero():
    score, per_item = cider_d({"a.png": "purple elephant dancing", "b.png": "green kite flying high"},
                              {"a.png": ["a dog on grass"], "b.png": ["two cats sleeping on a sofa"]})
    assert score == 0.0 and per_item == {"a.png": 0.0, "b.png": 0.0}


def test_cider_d_single_image_is_zero_as_in_the_toolkit():
    # log(N) = log(1) = 0 zeroes every tf-idf weight.
    assert cider_d({"x": "a dog"}, {"x": ["a dog"]}) == (0.0, {"x": 0.0})


def test_cider_d_tokenises_like_coco_by_default():
    references = {1: ["A dog runs on the beach."], 2: ["Two cats sleep on a sofa."]}
    messy = {1: "A DOG runs on the beach!", 2: "two cats, sleep on a sofa"}
    clean = {1: "a dog runs on the beach", 2: "two cats sleep on a sofa"}
    assert cider_d(messy, references) == cider_d(clean, references)
    assert cider_d(clean, references)[0] == pytest.approx(10.0, rel=1e-12)


def test_cider_d_rejects_mismatched_or_malformed_input():
    with pytest.raises(ValueError, match="same keys.*'b'"):
        cider_d({"a": "x", "b": "y"}, {"a": ["x"]})
    with pytest.raises(ValueError, match="same keys.*'c'"):
        cider_d({"a": "x"}, {"a": ["x"], "c": ["z"]})
    with pytest.raises(ValueError, match="'b'.*empty"):
        cider_d({"a": "x", "b": "y"}, {"a": ["x"], "b": []})
    with pytest.raises(ValueError, match="empty"):
        cider_d({}, {})
    with pytest.raises(TypeError, match="'a'.*list of strings"):
        cider_d({"a": "x"}, {"a": "x"})
    with pytest.raises(TypeError, match="'a'.*must be a string"):
        cider_d({"a": ["x"]}, {"a": ["x"]})


def _random_corpus(rng: random.Random) -> tuple[dict[str, str], dict[str, list[str]]]:
    vocab = "a the dog cat man on in red sits runs grass table big of with".split()

    def sentence(shortest: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(shortest, 14)))

    candidates = {f"img{i}": sentence(0) for i in range(rng.randint(2, 12))}
    references = {key: [sentence(1) for _ in range(rng.randint(1, 6))] for key in candidates}
    return candidates, references


def test_cider_d_equals_pycocoevalcap_cider_scorer():
    from pycocoevalcap.cider import cider_scorer
    rng = random.Random(0)
    for _ in range(60):
        candidates, references = _random_corpus(rng)
        scorer = cider_scorer.CiderScorer(n=4, sigma=6.0)
        for key in candidates:
            scorer += (candidates[key], references[key])
        expected, expected_items = scorer.compute_score()
        score, per_item = cider_d(candidates, references, tokenize=str.split)
        assert score == pytest.approx(float(expected), rel=1e-12, abs=1e-12)
        assert list(per_item.values()) == pytest.approx([float(v) for v in expected_items], rel=1e-12, abs=1e-12)


def test_cider_d_on_raw_captions_equals_the_toolkit_pipeline():
    # The toolkit tokenises (PTBTokenizer), joins the tokens with spaces and scores the strings.
    from pycocoevalcap.cider import cider_scorer
    candidates = {"1": "A man rides a wave on a surfboard.", "2": "Two dogs play in the grass!",
                  "3": "A kitchen with a stove, a sink and (white) cabinets."}
    references = {"1": ["A surfer riding a big wave.", "A man on a surfboard riding a wave."],
                  "2": ["Two dogs playing on the grass.", "A pair of dogs run in a field."],
                  "3": ["A clean kitchen with white cabinets.", "The kitchen has a stove and a sink."]}
    scorer = cider_scorer.CiderScorer(n=4, sigma=6.0)
    for key in candidates:
        scorer += (" ".join(caption_tokens(candidates[key])), [" ".join(caption_tokens(r)) for r in references[key]])
    expected, _ = scorer.compute_score()
    assert cider_d(candidates, references)[0] == pytest.approx(float(expected), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------

def test_bleu_brevity_penalty_by_hand():
    # Every n-gram of the 4-word candidate is in the 6-word reference: precisions 4/4, 3/3, 2/2, 1/1,
    # so BLEU-4 is the brevity penalty exp(1 - 6/4) (up to the toolkit's 1e-9 smoothing).
    score, per_item = bleu({"x": "the cat sat on"}, {"x": ["the cat sat on the mat"]})
    assert score == pytest.approx(math.exp(1 - 6 / 4), rel=1e-8)
    assert per_item["x"] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-8)


def test_bleu_equals_pycocoevalcap_bleu_scorer():
    from pycocoevalcap.bleu import bleu_scorer
    rng = random.Random(1)
    for _ in range(60):
        candidates, references = _random_corpus(rng)
        scorer = bleu_scorer.BleuScorer(n=4)
        for key in candidates:
            scorer += (candidates[key], references[key])
        expected, expected_items = scorer.compute_score(option="closest", verbose=0)
        score, per_item = bleu(candidates, references, tokenize=str.split)
        assert score == pytest.approx(expected[3], rel=1e-12, abs=1e-15)
        assert list(per_item.values()) == pytest.approx(expected_items[3], rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Short answers and multiple choice
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("The Dog's toy-box!", "dogs toy box"),
    ("  An  apple  ", "apple"),
    ("1,000 people", "1000 people"),
    ("3.5 kg.", "3.5 kg"),
    ("$5", "5"),
    ("Two", "2"),
    ("ten or eleven", "10 or eleven"),
    ("don’t", "dont"),
    ("Qatar.", "qatar"),
    ("red/white", "red white"),
    ("theater", "theater"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Qatar.", "qatar")
    assert exact_match("the answer is two", ["The answer is 2", "three"])
    assert exact_match(" A  dog ", ["cat", "dog"])
    assert not exact_match("a dog", "a cat")
    assert not exact_match("dogs", "dog")
    with pytest.raises(ValueError, match="at least one"):
        exact_match("x", [])


def test_multiple_choice_accuracy_uses_argmax_with_first_on_ties():
    scores = [[-1.0, -0.5, -2.0], [0.3, 0.3, 0.1], [0.0, 1.0]]
    assert multiple_choice_accuracy(scores, [1, 0, 0]) == pytest.approx(2 / 3)
    assert multiple_choice_accuracy([[0.3, 0.3]], [1]) == 0.0  # tie -> first option, not the answer


def test_multiple_choice_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="2 questions.*1"):
        multiple_choice_accuracy([[0.0], [0.0]], [0])
    with pytest.raises(ValueError, match="question 1.*answer 3"):
        multiple_choice_accuracy([[0.0, 1.0], [0.0, 1.0]], [0, 3])
    with pytest.raises(ValueError, match="question 0.*NaN"):
        multiple_choice_accuracy([[float("nan"), 1.0]], [0])
    with pytest.raises(ValueError, match="empty"):
        multiple_choice_accuracy([], [])


@pytest.mark.parametrize("generated,expected", [
    ("B", 1), ("B.", 1), ("(b)", 1), ("[C]", 2), ("b)", 1), ("c:", 2),
    ("Answer: B", 1), ("The answer is (C).", 2), ("option a", 0),
    ("B. a blue bike", 1), ("(A) a red car", 0),
    ("a blue bike", 1), ("The green boat.", 2),
    ("D", None), ("a purple plane", None), ("", None), ("I think so", None),
])
def test_choice_from_text(generated, expected):
    assert choice_from_text(generated, ["a red car", "a blue bike", "the green boat"]) == expected
