"""Evaluation metrics as pure functions: COCO caption tokenisation, CIDEr-D, BLEU, QA and multiple-choice scores.

Captions are scored the way the COCO caption toolkit (``pycocoevalcap``) scores them:
``caption_tokens`` reproduces, in Python, its tokenisation (Stanford PTBTokenizer 3.4.1 run with
``-preserveLines -lowerCase``, then removal of the toolkit's punctuation tokens), and ``cider_d`` /
``bleu`` reproduce its ``CiderScorer`` / ``BleuScorer`` arithmetic. Nothing here needs Java,
NumPy or a model; every function is deterministic.
"""

from __future__ import annotations

import math
import numbers
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "bleu",
    "caption_tokens",
    "choice_from_text",
    "cider_d",
    "exact_match",
    "multiple_choice_accuracy",
    "normalize_answer",
]

# ---------------------------------------------------------------------------------------------
# Caption tokenisation (Penn Treebank style, as the COCO caption toolkit applies it)
# ---------------------------------------------------------------------------------------------

# Tokens the COCO toolkit drops after tokenising (pycocoevalcap/tokenizer/ptbtokenizer.py). The
# bracket names are upper case there while the tokenizer's output is lower-cased, so "-lrb-" and
# friends survive in the toolkit; they survive here too.
COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# Characters Python counts as alphanumeric but that are neither letters nor decimal digits
# (superscripts, vulgar fractions, roman numerals, ...); the tokenizer treats them as symbols.
_NUMERIC_SYMBOLS = re.escape("".join(
    ch for ch in map(chr, range(0x80, 0x10000)) if ch.isnumeric() and not ch.isdecimal() and not ch.isalpha()))
_L = rf"[^\W\d_{_NUMERIC_SYMBOLS}]"            # a letter
_LD = rf"[^\W_{_NUMERIC_SYMBOLS}]"             # a letter or a decimal digit
# Letters for words also take these marks and modifiers (Java does not count all of them as letters).
_LETTER_EXTRA = ("\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385"
                 "\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd"
                 "\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef"
                 "\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903"
                 "\u093c\u093e-\u094e\u0951-\u0955\u0962\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd"
                 "\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2"
                 "\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a"
                 "\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd")
_LETTER = rf"(?:{_L}|[{_LETTER_EXTRA}]|&[aeiouAEIOU](?i:acute|grave|uml);)"
_SPACE = r"[ \t\u00a0\u2000-\u200a\u3000]"
_SPACENL = r"[ \t\u00a0\u2000-\u200a\u3000\r\n\u2028\u2029\u000b\u000c\u0085]"
_NOT_SPACENL = r"[^ \t\u00a0\u2000-\u200a\u3000\r\n\u2028\u2029\u000b\u000c\u0085]"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201b])"
_HYPHEN = r"[-_\u058a\u2010\u2011]"
_WORD = rf"{_LETTER}(?:{_LETTER}|\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\d)*)*"
_SWORD = rf"(?:{_L}|\u00ad)*[A-MO-Za-mo-z]\u00ad*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_NUM = r"\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+"
_NUMBER = rf"[-+]?(?:{_NUM})"
_ACRO_SPECIAL = r"(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-)(?i:u\.k|u\.s\.s\.r)"
_ACRO = rf"[A-Za-z](?:\.[A-Za-z])*|{_ACRO_SPECIAL}"
_ACRO2 = rf"[A-Za-z](?:\.[A-Za-z])+|{_ACRO_SPECIAL}"
_ABBREV1 = (r"(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu(?:rs)?|fri"
            r"|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va"
            r"|vt|wisc?|wyo|inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext"
            r"|sq|jr|sr|bros|esq|blvd|rd|etc|al|seq|bldg|(?:ed|ph)\.d)"
            r"|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash))\.")
_ABBREV4 = (r"(?:(?i:mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl"
            r"|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens"
            r"|insp|mlle|mme|msgr|sfc|vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph|invt|elec|natl|m[ft]g|dept)"
            rf"|M(?i:iss)|v|{_ACRO})")
# Capitalised words after which a one-letter acronym ("C.") is read as a letter plus a full stop.
_SENTENCE_STARTERS = ("About According Additionally After An A As At But Earlier He Her Here However If In It "
                      "Last Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Then There "
                      "These They This We When While What Yet You").split()
_STARTER = "|".join(re.escape(w[0]) + "(?i:" + re.escape(w[1:]) + ")" if len(w) > 1 else re.escape(w)
                    for w in sorted(_SENTENCE_STARTERS, key=len, reverse=True))
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:(?:{_ACRO2})\.|[A-Za-z0-9\u00ad]+))+"  # hyphenated
_THING = rf"(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+)*"
_FILE_EXTENSION = (r"(?i:bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif|gz|h|html?|jar|java|jpe?g|mov|mp3|pdf|php|pl"
                   r"|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")
_PHONE = (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])[0-9]{3,4}"
          r"[- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
_SGML = (r"<(?:[!?][A-Za-z-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*"
         r"(?:[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.-]*))?))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.-]*)[ ]*>")
_QUOTES = rf"(?:''|[`\u2018-\u201f\u0091-\u0094\u2039\u203a\u00ab\u00bb]{{1,2}}|{_APOS})"
_DBLQUOT = r"(?:\"|(?i:&quot;))"
_MISC_SYMBOL = (r"[+%&~^|\\\u2030\u2031\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be"
                r"\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d"
                r"\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b"
                r"\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb"
                r"\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")


def _latex_quotes(text: str, probably_left: bool) -> str:
    """The tokenizer's quote normalisation: straight and curly quotes become ` `` ' ''."""
    text = text.replace("&apos;", "'").replace("&quot;", '"')
    text = text.replace("'", "`" if probably_left else "'").replace('"', "``" if probably_left else "''")
    text = re.sub("[\u0082\u008b\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u009b\u2019\u203a]", "'", text)
    text = re.sub("[\u0084\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u0080": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# An action maps the matched token text to (output tokens, characters consumed); consuming fewer
# characters than the token has is the lexer's "push back": the rest is scanned again.
_Action = Callable[[str], tuple[list[str], int]]


def _keep(tok: str) -> tuple[list[str], int]:
    return [tok], len(tok)


def _skip(tok: str) -> tuple[list[str], int]:
    return [], len(tok)


def _emit(make: Callable[[str], str]) -> _Action:
    return lambda tok: ([make(tok)], len(tok))


def _give_back(count: int) -> _Action:
    """Emit the token without its last `count` characters and scan those again."""
    return lambda tok: ([tok[:-count]], len(tok) - count)


def _unsoft(tok: str) -> tuple[list[str], int]:
    """Words lose their soft hyphens; a lone soft hyphen is dropped."""
    word = tok.replace("\u00ad", "")
    return ([word] if word else []), len(tok)


def _then_full_stop(tok: str) -> tuple[list[str], int]:
    """An abbreviation ending a sentence: the abbreviation, and its period again as a full stop."""
    return [tok], len(tok) - 1


def _acronym_before_sentence(tok: str) -> tuple[list[str], int]:
    """"I." before "The": the letter then a full stop; "U.S." before "The": "U.S." then a full stop."""
    return ([tok[:-1]] if len(tok) == 2 else [tok]), len(tok) - 1


def _nbsp(tok: str) -> str:
    return tok.replace(" ", "\u00a0")


def _amp(tok: str) -> str:
    return re.sub("(?i)&amp;", "&", tok)


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]  # group "tok" is the token; whatever follows it is trailing context
    action: _Action


def _rule(token: str, action: _Action = _keep, context: str = "") -> _Rule:
    return _Rule(re.compile(f"(?P<tok>{token}){context}", re.DOTALL), action)


# The rules of the Java lexer, in its priority order for equally long matches; otherwise the
# longest match (trailing context included) wins, as in JFlex.
_RULES = [
    _rule(r"(?i:c\+\+|[cf]#)"),                                                   # C++, C#, F#
    _rule(r"(?i:cannot|'twas)", _give_back(3)),                                   # can|not, 't|was
    _rule(r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)", _give_back(2)),             # gon|na, ...
    _rule(_SGML, _emit(_nbsp)),                                                   # <b>, </a>
    _rule(r"(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", _emit(lambda t: "--")),  # dashes
    _rule(r"(?i:&amp;)", _emit(lambda t: "&")),
    _rule(r"(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)"),                    # SGML entities
    _rule(_WORD, _unsoft, context=_REDAUX),                                       # dog|'s
    _rule(_SWORD, _unsoft, context=_SREDAUX),                                     # do|n't
    _rule(_WORD, _unsoft),
    # Words with an apostrophe inside or at an edge ("'n'", "d'", "'em", "o'er", "'90s", ...).
    *(_rule(alternative) for alternative in (
        rf"{_APOS}(?i:n){_APOS}?", rf"[lLdDjJ]{_APOS}", rf"(?i:dunkin|somethin|ol){_APOS}", rf"{_APOS}(?i:em)",
        rf"[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*", rf"{_APOS}[2-9]0(?i:s)", rf"{_APOS}(?i:till?)",
        rf"{_L}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*", rf"{_APOS}(?i:cause)", r"(?i:cont'd)\.?",
        r"(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)")),
    _rule(rf"[yY]{_APOS}", context=_L),                                           # y'|all
    _rule(r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"),     # URL
    _rule(r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+"
          r"(?i:com|net|org|edu))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"),   # likely URL
    _rule(r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
          r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:(?i:&gt;)|>)?"),                       # e-mail
    _rule(rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+"),                               # @name, #tag
    _rule(_REDAUX, _emit(lambda t: _latex_quotes(t, False)), context=r"[^A-Za-z]"),    # 's 're 've 'll 'd 'm
    _rule(_SREDAUX, _emit(lambda t: _latex_quotes(t, False)), context=r"[^A-Za-z]"),   # n't
    _rule(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"),                                       # date
    _rule(_NUMBER, _emit(lambda t: t.replace("\u00ad", ""))),
    _rule(r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"),  # ² ₂
    _rule(r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", _emit(_nbsp)),  # 1/2, 5 1/2
    _rule(r"[\u00bc\u00bd\u00be\u2153-\u215e]", _emit(lambda t: _FRACTIONS.get(t, t))),    # ½ -> 1/2
    _rule(rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls"
          rf"|cap{_APOS}n|c{_APOS}est)", _emit(_amp)),                            # treebank specials
    _rule(r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),  # and/or, km/h
    _rule(r"[A-Z]*\$|#"),                                                          # $, US$, #
    _rule(r"[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
          _emit(lambda t: _CURRENCY.get(t, t))),                                   # ¢ £ € ...
    _rule(rf"(?:{_ACRO})\.", _acronym_before_sentence,
          context=rf"{_SPACENL}+(?:{_STARTER}|{_SGML}){_SPACENL}"),                # "C. The" -> C | .
    _rule(r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.", context=rf"{_SPACENL}?\d"),     # "no. 5"
    _rule(r"(?i:pt[ey]|co)\.", context=rf"{_SPACE}(?i:ltd|lim)"),                  # "Pty. Ltd"
    _rule(_ABBREV1, _then_full_stop, context=rf"{_SPACENL}(?:{_SPACENL}|[A-Z]|<)"),    # "etc." ending a sentence
    _rule(_ABBREV1, context=r"(?s:..)"),                                           # "etc." inside one
    _rule(_ABBREV1, _then_full_stop),                                              # "etc." at the end
    _rule(rf"{_ABBREV4}\."),                                                       # Mr. U.S. a.m.
    _rule(_ABBREV4, context=_SPACE),
    _rule(_ACRO, context=_SPACENL),                                                # U.S without period
    _rule(rf"{_APOS}[0-9][0-9]", context=_SPACENL),                                # '90
    _rule(rf"{_LD}+(?:\.{_LD}+)*\.{_FILE_EXTENSION}", context=rf"(?:{_SPACENL}|[.?!,])"),   # photo1.jpg
    _rule(rf"{_WORD}\.", context=r"[,;:\u3001]"),                                  # "dogs.," keeps its period
    _rule(_PHONE, _emit(lambda t: _parens(_nbsp(t)))),
    _rule(_DBLQUOT, _emit(lambda t: _latex_quotes(t, True)), context=rf"(?:{_LD}|\$)"),     # opening "
    _rule(_DBLQUOT, _emit(lambda t: _latex_quotes(t, False))),                     # closing "
    _rule("\x7f", _skip),
    _rule(r"<|(?i:&lt;)", _emit(lambda t: "<")),
    _rule(r">|(?i:&gt;)", _emit(lambda t: ">")),
    _rule(r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", _emit(_parens), context=r"[^A-Za-z0-9]"),   # :) ;-(
    _rule(r"[-^x=~<>']_[-^x=~<>']|\([-^x=~<>'][_.]?[-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)",
          _emit(_parens)),                                                         # ^_^
    _rule(r"[{}\[\]()]", _emit(lambda t: _BRACKETS[t])),
    _rule(r"-+", _emit(lambda t: "--" if 3 <= len(t) <= 4 else t)),                # --- -> --
    _rule(r"\.\.\.+|[\u0085\u2026]|\.[ \u00a0](?:\.[ \u00a0])+\.", _emit(lambda t: "...")),  # ellipsis
    _rule(r"@+|#+|_+"),
    _rule(r"\*+|(?:\\\*){1,3}"),
    _rule(r"[,;:\u3001]"),
    _rule(r"[?!]+"),                                                               # "?!" stays one token
    _rule(r"[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
    _rule(r"="),
    _rule(r"/"),
    _rule(_HTHING),                                                                # black-and-white
    _rule(rf"{_HTHING}\.", context=r"[,;:]"),
    _rule(_THING),                                                                 # o'clock, 4x4
    _rule(rf"{_THING}\.", context=r"[,;:]"),
    _rule(r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+", _emit(_amp)),                   # AT&T
    _rule(r"'|&apos;", _emit(lambda t: "`"), context=rf"{_LETTER}{_NOT_SPACENL}"), # opening '
    _rule(_QUOTES, _emit(lambda t: _latex_quotes(t, False))),
    _rule(_REDAUX, _emit(lambda t: _latex_quotes(t, False))),
    _rule(_SREDAUX, _emit(lambda t: _latex_quotes(t, False))),
    _rule(r"<<|>>"),
    _rule(_MISC_SYMBOL),
    _rule(rf"{_SPACENL}+|[\x00\u200b\u200e\u200f\ufeff]", _skip),
]


_PLAIN_WORD = re.compile(r"[A-Za-z]+(?= )")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _ptb_tokens(text: str) -> list[str]:
    """Penn Treebank tokens of `text` (before lower-casing and punctuation removal)."""
    # The toolkit tokenises all captions as one newline-separated file: a caption is followed by a
    # line break, which some rules look at (e.g. "etc." before a break also yields a full stop).
    text = text.replace("\n", " ") + "\n"
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        # Fast path: a run of ASCII letters ending at a space is a word whatever else could match,
        # except for the few words the tokenizer splits ("cannot", "gonna", ...).
        plain = _PLAIN_WORD.match(text, pos)
        if plain and plain.group().lower() not in _SPLIT_WORDS:
            tokens.append(plain.group())
            pos = plain.end() + 1
            continue
        best: tuple[int, _Rule, re.Match[str]] | None = None
        for rule in _RULES:
            match = rule.pattern.match(text, pos)
            if match and match.end() > pos and (best is None or match.end() > best[0]):
                best = (match.end(), rule, match)
        if best is None:  # a character the tokenizer does not know: dropped, as the Java tool does
            pos += 1
            continue
        produced, consumed = best[1].action(best[2].group("tok"))
        tokens.extend(produced)
        pos += consumed
    return tokens


def caption_tokens(text: str) -> list[str]:
    """Tokenise a caption the way the COCO caption evaluation does before scoring.

    Reproduces pycocoevalcap's ``PTBTokenizer`` (Stanford PTBTokenizer 3.4.1, ``-preserveLines
    -lowerCase``) without Java: Penn Treebank splitting (clitics such as ``'s`` and ``n't``
    separated, "cannot" -> "can not", brackets -> ``-lrb-`` etc., quotes -> `` and '', abbreviations
    such as "mr." and "u.s." keep their period), lower-casing, then removal of the toolkit's
    punctuation tokens (``COCO_PUNCTUATION``). Tokens are finally split on whitespace, as the CIDEr
    and BLEU scorers split the joined caption.

    Each caption is tokenised on its own. The toolkit runs all captions of a batch through Java as
    one file, so there a caption ending in a one-letter abbreviation ("vitamin C.") followed by one
    starting with a capitalised function word ("A ...", "The ...") loses that period; here it keeps
    it. Characters added to Unicode after 2014 may also be treated differently.

    Args:
        text: One caption; newlines count as spaces.

    Returns:
        The tokens, e.g. ``"It's a dog's toy-box!"`` -> ``["it", "'s", "a", "dog", "'s", "toy-box"]``.

    Raises:
        TypeError: `text` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption_tokens expects a string, got {type(text).__name__}")
    lowered = (tok.lower() for tok in _ptb_tokens(text))
    return " ".join(tok for tok in lowered if tok not in COCO_PUNCTUATION).split()


# ---------------------------------------------------------------------------------------------
# CIDEr-D and BLEU (the COCO caption toolkit's arithmetic)
# ---------------------------------------------------------------------------------------------

NGram = tuple[str, ...]


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[NGram]:
    """How often each 1..max_n-gram occurs in `tokens`."""
    counts: Counter[NGram] = Counter()
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - n + 1):
            counts[tuple(tokens[start:start + n])] += 1
    return counts


def _paired_keys(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list[Hashable]:
    """The keys to score, in `candidates` order, after checking both mappings describe the same items."""
    if not isinstance(candidates, Mapping) or not isinstance(references, Mapping):
        raise TypeError("candidates and references must be dicts keyed by item (e.g. image path), got "
                        f"{type(candidates).__name__} and {type(references).__name__}")
    no_refs = [key for key in candidates if key not in references]
    no_candidate = [key for key in references if key not in candidates]
    if no_refs or no_candidate:
        raise ValueError(f"candidates and references must have the same keys: {len(no_refs)} candidate key(s) have "
                         f"no references (e.g. {no_refs[:3]}), {len(no_candidate)} reference key(s) have no "
                         f"candidate (e.g. {no_candidate[:3]})")
    if not candidates:
        raise ValueError("nothing to score: candidates and references are empty")
    for key, candidate in candidates.items():
        if not isinstance(candidate, str):
            raise TypeError(f"candidate for key {key!r} must be a string, got {type(candidate).__name__}")
        refs = references[key]
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(f"references for key {key!r} must be a list of strings, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"references for key {key!r} are empty: every item needs at least one reference caption")
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(f"references for key {key!r} must be strings, got a {type(ref).__name__}")
    return list(candidates)


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
            tokenize: Callable[[str], list[str]] = caption_tokens, max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of generated captions, computed exactly as the COCO caption toolkit's ``CiderScorer``.

    For each n in 1..max_n, every caption becomes a TF-IDF vector of its n-grams: term frequency
    times ``log(N) - log(max(1, df))``, where N is the number of items scored and df the number of
    items whose references contain the n-gram (document frequencies come from the references of
    the evaluated set only). The score of an item is the mean over n, and over its references, of
    the clipped cosine ``sum(min(c, r) * r) / (|c| * |r|)`` multiplied by the length penalty
    ``exp(-delta**2 / (2 * sigma**2))``, times 10. ``delta`` is the difference in length; the toolkit
    counts bigrams, as done here, which only differs from counting words for empty captions (whose
    similarity is 0 anyway). With a single item ``log(N) = 0`` makes every weight zero and the
    score 0, as in the toolkit.

    Args:
        candidates: One generated caption per item (e.g. per image path).
        references: The reference captions of each item; the same keys as `candidates`.
        tokenize: Turns a caption into tokens; the default is the COCO tokenisation. Pass
            ``str.split`` for captions that are already tokenised.
        max_n: Longest n-gram.
        sigma: Width of the length penalty.

    Returns:
        The corpus score (mean over items) and the score of each item.

    Raises:
        ValueError: The two mappings have different keys, are empty, or an item has no references.
        TypeError: A caption is not a string or an item's references are not a list of strings.
    """
    keys = _paired_keys(candidates, references)
    candidate_counts = [_ngram_counts(tokenize(candidates[key]), max_n) for key in keys]
    reference_counts = [[_ngram_counts(tokenize(ref), max_n) for ref in references[key]] for key in keys]
    document_frequency: Counter[NGram] = Counter()
    for refs in reference_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_items = math.log(float(len(keys)))

    def tfidf(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float], int]:
        vectors: list[dict[NGram, float]] = [{} for _ in range(max_n)]
        squared_norms = [0.0] * max_n
        bigrams = 0
        for ngram, term_frequency in counts.items():
            order = len(ngram) - 1
            weight = float(term_frequency) * (log_items - math.log(max(1.0, document_frequency[ngram])))
            vectors[order][ngram] = weight
            squared_norms[order] += weight ** 2
            if order == 1:  # the toolkit's "length" counts bigrams
                bigrams += term_frequency
        return vectors, [math.sqrt(value) for value in squared_norms], bigrams

    def similarity(candidate: tuple[list[dict[NGram, float]], list[float], int],
                   reference: tuple[list[dict[NGram, float]], list[float], int]) -> list[float]:
        (cand_vec, cand_norm, cand_len), (ref_vec, ref_norm, ref_len) = candidate, reference
        penalty = math.e ** (-(float(cand_len - ref_len) ** 2) / (2 * sigma ** 2))
        values = []
        for order in range(max_n):
            value = 0.0
            for ngram, weight in cand_vec[order].items():
                ref_weight = ref_vec[order].get(ngram, 0.0)
                value += min(weight, ref_weight) * ref_weight  # clipped: repeating an n-gram does not pay
            if cand_norm[order] != 0 and ref_norm[order] != 0:
                value /= cand_norm[order] * ref_norm[order]
            values.append(value * penalty)
        return values

    per_item: dict[Hashable, float] = {}
    for key, cand_counts, refs in zip(keys, candidate_counts, reference_counts):
        candidate = tfidf(cand_counts)
        summed = [0.0] * max_n
        for ref_counts in refs:
            summed = [total + value for total, value in zip(summed, similarity(candidate, tfidf(ref_counts)))]
        per_item[key] = sum(summed) / max_n / len(refs) * 10.0
    return sum(per_item.values()) / len(per_item), per_item


def bleu(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
         tokenize: Callable[[str], list[str]] = caption_tokens, max_n: int = 4) -> tuple[float, dict[Hashable, float]]:
    """BLEU-`max_n` of generated captions, computed as the COCO caption toolkit's ``Bleu`` scorer does.

    Corpus BLEU: clipped n-gram precisions summed over all items, their geometric mean, and a
    brevity penalty from the total candidate length against the total of each item's reference
    length closest to its candidate (the shorter one on ties). The per-item values are the
    toolkit's sentence BLEU (same formula on one item, with its 1e-15 / 1e-9 smoothing).

    Args:
        candidates: One generated caption per item.
        references: The reference captions of each item; the same keys as `candidates`.
        tokenize: Turns a caption into tokens (default: the COCO tokenisation).
        max_n: Longest n-gram (4 for BLEU-4).

    Returns:
        The corpus BLEU and the sentence BLEU of each item.

    Raises:
        ValueError: The two mappings have different keys, are empty, or an item has no references.
        TypeError: A caption is not a string or an item's references are not a list of strings.
    """
    keys = _paired_keys(candidates, references)
    tiny, small = 1e-15, 1e-9
    total_guess, total_correct = [0] * max_n, [0] * max_n
    total_test_len = total_ref_len = 0
    per_item: dict[Hashable, float] = {}
    for key in keys:
        tokens = tokenize(candidates[key])
        counts = _ngram_counts(tokens, max_n)
        ref_tokens = [tokenize(ref) for ref in references[key]]
        max_ref_counts: Counter[NGram] = Counter()
        for ref in ref_tokens:
            max_ref_counts |= _ngram_counts(ref, max_n)  # | keeps the larger count of each n-gram
        test_len = len(tokens)
        ref_len = min((abs(len(ref) - test_len), len(ref)) for ref in ref_tokens)[1]
        guess = [max(0, test_len - n + 1) for n in range(1, max_n + 1)]
        correct = [0] * max_n
        for ngram, count in counts.items():
            correct[len(ngram) - 1] += min(max_ref_counts[ngram], count)
        product = 1.0
        for n in range(max_n):
            product *= (correct[n] + tiny) / (guess[n] + small)
            total_guess[n] += guess[n]
            total_correct[n] += correct[n]
        score = product ** (1.0 / max_n)
        ratio = (test_len + tiny) / (ref_len + small)
        per_item[key] = score * math.exp(1 - 1 / ratio) if ratio < 1 else score
        total_test_len += test_len
        total_ref_len += ref_len
    product = 1.0
    for n in range(max_n):
        product *= (total_correct[n] + tiny) / (total_guess[n] + small)
    corpus = product ** (1.0 / max_n)
    ratio = (total_test_len + tiny) / (total_ref_len + small)
    return (corpus * math.exp(1 - 1 / ratio) if ratio < 1 else corpus), per_item


# ---------------------------------------------------------------------------------------------
# Short answers and multiple choice
# ---------------------------------------------------------------------------------------------

_ARTICLES = frozenset(["a", "an", "the"])
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text: str) -> str:
    """Normalise a short answer for comparison, VQA style.

    The rules, in order:

    1. lower-case;
    2. a comma between two digits is deleted ("1,000" -> "1000");
    3. apostrophes and backquotes (``'`` ``\\u2019`` ``\\u2018`` `````) are deleted ("don't" -> "dont");
    4. a period between two digits is kept ("3.5"); every other character of Unicode category
       punctuation (P*) or symbol (S*) becomes a space ("toy-box" -> "toy box", "$5" -> "5");
    5. the words "a", "an", "the" are removed;
    6. the number words "zero" to "ten" become digits ("two" -> "2");
    7. runs of whitespace become one space; leading and trailing spaces are removed.

    Args:
        text: The answer.

    Returns:
        The normalised answer, e.g. ``"The Dog's toy-box!"`` -> ``"dogs toy box"``.

    Raises:
        TypeError: `text` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a string, got {type(text).__name__}")
    text = text.lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub("['\u2019\u2018`]", "", text)
    chars = []
    for index, ch in enumerate(text):
        between_digits = 0 < index < len(text) - 1 and text[index - 1].isdigit() and text[index + 1].isdigit()
        if ch == "." and between_digits:
            chars.append(ch)
        else:
            chars.append(" " if unicodedata.category(ch)[0] in "PS" else ch)
    words = [_NUMBER_WORDS.get(word, word) for word in "".join(chars).split() if word not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """Whether a predicted answer equals a reference answer after ``normalize_answer``.

    Args:
        prediction: The generated answer.
        answers: The reference answer, or several acceptable ones.

    Returns:
        True if the normalised prediction equals any normalised answer.

    Raises:
        ValueError: `answers` is an empty list.
    """
    options = [answers] if isinstance(answers, str) else list(answers)
    if not options:
        raise ValueError("exact_match needs at least one reference answer, got an empty list")
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(answer) for answer in options)


def multiple_choice_accuracy(option_scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Fraction of questions whose highest-scoring option is the correct one.

    The chosen option is the argmax of the question's scores; on a tie the first (lowest-index)
    of the tied options is chosen (so a model scoring all options equally is right exactly on the
    questions whose answer is option 0).

    Args:
        option_scores: For each question, one score per option (e.g. log-probabilities).
        answers: For each question, the index of the correct option.

    Returns:
        The accuracy in [0, 1].

    Raises:
        ValueError: The lists differ in length or are empty, a question has no options or a NaN
            score, or an answer index is not a valid option index.
    """
    if len(option_scores) != len(answers):
        raise ValueError(f"option_scores has {len(option_scores)} questions but answers has {len(answers)}")
    if len(answers) == 0:
        raise ValueError("no questions to score: option_scores and answers are empty")
    correct = 0
    for question, (scores, answer) in enumerate(zip(option_scores, answers)):
        if len(scores) == 0:
            raise ValueError(f"question {question} has no option scores")
        if any(math.isnan(score) for score in scores):
            raise ValueError(f"question {question} has a NaN option score: {list(scores)}")
        if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= answer < len(scores):
            raise ValueError(f"question {question}: answer {answer!r} is not an option index in "
                             f"0..{len(scores) - 1}")
        chosen = max(range(len(scores)), key=lambda option: (float(scores[option]), -option))
        correct += chosen == answer
    return correct / len(answers)


# "B", "B.", "(b)", "[B]", "b)", "B:", "Answer: B", "The answer is (B).", "Option C"
_LETTER_ANSWER = re.compile(r"(?:the\s+)?(?:correct\s+)?(?:(?:answer|option|choice)\s*(?:is\s*)?[:\-]?\s*)?"
                            r"[(\[]?(?P<letter>[a-z])[)\]]?\s*[.:]?", re.IGNORECASE)
# "B. a dog", "(B) a dog", "B) a dog", "B: a dog"
_LETTER_THEN_TEXT = re.compile(r"[(\[]?(?P<letter>[a-z])(?:[)\]]|[.:])\s+\S.*", re.IGNORECASE | re.DOTALL)


def choice_from_text(generated: str, options: Sequence[str]) -> int | None:
    """The option a generated answer names, or None if it names none unambiguously.

    In order: the answer's ``normalize_answer`` form equals exactly one option's (the option's
    text); then the answer is an option letter, alone or with brackets, a period or a colon
    ("B", "B.", "(b)", "b)", "Answer: B", "The answer is (B).") or followed by text ("B. a dog");
    letters are case-insensitive and count from A for option 0.

    Args:
        generated: The model's answer.
        options: The option texts, in order.

    Returns:
        The option index, or None.
    """
    normalized = normalize_answer(generated)
    same_text = [index for index, option in enumerate(options) if normalize_answer(option) == normalized]
    if len(same_text) == 1:
        return same_text[0]
    stripped = generated.strip()
    match = _LETTER_ANSWER.fullmatch(stripped) or _LETTER_THEN_TEXT.fullmatch(stripped)
    if match:
        index = ord(match.group("letter").lower()) - ord("a")
        if index < len(options):
            return index
    return None
