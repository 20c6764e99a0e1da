"""Queries rewritten in Cyrillic letters: a training-query transform for unseen scripts.

A model whose vocabulary is English-centric (all-MiniLM-L6-v2's uncased WordPiece) reads
Cyrillic as single letters, and nothing in a Latin-script training set teaches it what
those letters spell. Russian and Ukrainian technical text is full of words borrowed from
the languages we do train on (``библиотека`` / Bibliothek, ``сервер`` / server, ``модуль``
/ Modul, ``документация`` / dokumentacija): rewriting some training queries letter by
letter in Cyrillic shows the model those spellings next to the meaning it already knows,
without one word of the languages themselves.

The rewrite is a loose transliteration, closer to how borrowed words are spelled than to a
standard: digraphs first (``sch`` -> ш, ``ch`` -> ч, ``ts`` -> ц), ``c`` -> ц before e/i/y and
к elsewhere, Slavic and German letters by sound (č -> ч, ž -> ж, ü -> ю), other accents
dropped. Words a real query would keep in Latin letters stay as they are: words with a
digit or underscore, acronyms and CamelCase names (``GTK``, ``OpenGL``), and any word the
caller passes in ``keep`` (`cyrillic` passes the positive's words: package and project names
shared with the English description, which Russian queries write in Latin too).

`cyrillic` is the transform the recipe registers with the pipeline
(``data.query_transform = "examples.debian_retrofit.script:cyrillic"``, applied to a
``data.query_transform_rate`` fraction of the training queries). Katakana and Hangul
rewrites of the same kind measured no gain and were deleted (bench/RESULTS.md, "Queries
rewritten in katakana and Hangul too"; the code is in the history before that commit).
"""

from __future__ import annotations

import re
import unicodedata

# Letters with their own sound, looked up before accents are stripped.
_LETTERS = {
    "č": "ч", "ć": "ч", "š": "ш", "ś": "ш", "ž": "ж", "ź": "ж", "ż": "ж", "đ": "дж",
    "ř": "рж", "ł": "л", "ñ": "нь", "ç": "с", "ß": "сс", "ä": "э", "ö": "ё", "ü": "ю",
    "ě": "е", "ý": "и", "ů": "у", "å": "о", "ø": "ё", "æ": "э", "œ": "ё",
}  # fmt: skip
# Longest first: a rule of four letters wins over one of two that starts the same.
_DIGRAPHS = {
    "shch": "щ", "tsch": "ч", "sch": "ш", "ch": "ч", "sh": "ш", "zh": "ж", "kh": "х",
    "ts": "ц", "tz": "ц", "ph": "ф", "th": "т", "qu": "кв", "ck": "к", "ya": "я", "yu": "ю",
    "yo": "ё", "ja": "я", "ju": "ю", "jo": "ё", "ee": "и", "oo": "у", "ou": "у",
}  # fmt: skip
# "c" is not here: it depends on the next letter.
_SINGLE = {
    "a": "а", "b": "б", "d": "д", "e": "е", "f": "ф", "g": "г", "h": "х", "i": "и", "j": "й",
    "k": "к", "l": "л", "m": "м", "n": "н", "o": "о", "p": "п", "q": "к", "r": "р", "s": "с",
    "t": "т", "u": "у", "v": "в", "w": "в", "x": "кс", "y": "и", "z": "з",
}  # fmt: skip
_WORD = re.compile(r"\w+")


def _base(ch: str) -> str:
    """A letter without its accents (é -> e); letters of other scripts keep theirs (й)."""
    if not "a" <= unicodedata.normalize("NFD", ch)[:1] <= "z":
        return ch
    return "".join(c for c in unicodedata.normalize("NFD", ch) if not unicodedata.combining(c))


def _letters(word: str) -> str:
    """A lower-case Latin word in Cyrillic letters (non-Latin letters pass through)."""
    word = "".join(_LETTERS.get(ch) or _base(ch) for ch in word)
    out, i = [], 0
    while i < len(word):
        for n in (4, 3, 2):
            if word[i : i + n] in _DIGRAPHS:
                out.append(_DIGRAPHS[word[i : i + n]])
                i += n
                break
        else:
            ch = word[i]
            if ch == "c":
                out.append("ц" if word[i + 1 : i + 2] in ("e", "i", "y") else "к")
            else:
                out.append(_SINGLE.get(ch, ch))
            i += 1
    return "".join(out)


def keeps_latin(word: str, keep: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether ``word`` stays in Latin letters: a name, an acronym, a number or in ``keep``."""
    return (
        any(ch.isdigit() or ch == "_" for ch in word)
        or any(ch.isupper() for ch in word[1:])
        or word.lower() in keep
    )


def _rewrite_words(text: str, spell, keep) -> str:
    """``text`` with ``spell(word)`` for every word that `keeps_latin` does not protect."""

    def rewrite(m: re.Match) -> str:
        word = m.group(0)
        return word if keeps_latin(word, keep) else spell(word)

    return _WORD.sub(rewrite, text)


def _cyrillic_word(word: str) -> str:
    out = _letters(word.lower())
    return out[:1].upper() + out[1:] if word[:1].isupper() else out


def to_cyrillic(text: str, keep: frozenset[str] | set[str] = frozenset()) -> str:
    """``text`` with every Latin word that `keeps_latin` does not protect in Cyrillic letters.

    ``keep`` holds lower-case words. Case of the first letter, punctuation and spacing are
    kept; ``to_cyrillic("Bibliothek für Audiodateien")`` is ``"Библиотек фюр Аудиодатеиен"``.
    """
    return _rewrite_words(text, _cyrillic_word, keep)


def words(text: str) -> frozenset[str]:
    """The lower-case words of ``text`` (what `to_cyrillic`'s ``keep`` takes)."""
    return frozenset(w.lower() for w in _WORD.findall(text))


def cyrillic(record: dict, rng=None) -> str:
    """The transform: ``record``'s query in Cyrillic letters, the positive's words (names the
    English description shares with the query) kept in Latin. Deterministic: ``rng`` unused."""
    del rng
    return to_cyrillic(record["query"], keep=words(record["positive"]))
