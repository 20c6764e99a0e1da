"""Latin-script text rewritten in Cyrillic, katakana or Hangul: augmentations for unseen scripts.

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
caller passes in ``keep`` (the pipeline passes the positive's words: package and project
names shared with the English description, which Russian queries write in Latin too).
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


# Katakana and Hangul: Japanese and Korean write borrowed words by sound (ライブラリ and
# 라이브러리 are "library", サーバー and 서버 "server", プログラム and 프로그램 "program"). Both
# rewrites read a Latin word as a string of sounds (`_sounds`) and spell those the way
# each script spells loanwords: consonant + vowel as one kana or one Hangul block, a
# consonant with no vowel after it as its own syllable (ク, 크) or, in Korean, as the
# block's final consonant (프로그람). English-style "er"/"ar"/"or" before a consonant or at
# the end become a long vowel (サーバー, 서버). Approximate on purpose: what matters is that
# the model sees the scripts' spellings of words whose meaning it already knows.

_SOUND_LETTERS = {
    "č": "ch", "ć": "ch", "š": "sh", "ś": "sh", "ž": "j", "ź": "j", "ż": "j", "đ": "j",
    "ř": "rj", "ł": "l", "ñ": "ny", "ç": "s", "ß": "ss", "ä": "e", "ö": "o", "ü": "u",
    "ø": "o", "å": "o", "æ": "e", "œ": "e",
}  # fmt: skip
# Letter groups that are one consonant sound, longest first ("qu" and "x" are two sounds).
_CONSONANT_GROUPS = (
    ("tsch", ("ch",)), ("sch", ("sh",)), ("sh", ("sh",)), ("ch", ("ch",)), ("ph", ("f",)),
    ("th", ("s",)), ("ck", ("k",)), ("ts", ("ts",)), ("tz", ("ts",)), ("qu", ("k", "w")),
    ("x", ("k", "s")),
)  # fmt: skip
_VOWELS = "aeiou"
_STOPS = {"k", "t", "p", "s", "ch", "sh", "ts", "d", "g", "b"}  # doubled: a short pause (ッ)


def _vowel(ch: str) -> bool:
    return ch != "" and ch in "aeiouy"


def _sounds(word: str) -> list[tuple[str, str]]:
    """A lower-case Latin word as sounds: ("C", consonant) and ("V", vowel) in order.

    Vowels are a, e, i, o, u, plus "a:", "o:", "u:", "i:" (long) and "er" (the vowel of
    English "server"); y is a vowel unless one follows it. Doubled consonants come once,
    after a ("Q", "") pause when they stop. Other characters come as ("O", character).
    """
    w = "".join(_SOUND_LETTERS.get(ch) or _base(ch) for ch in word)
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(w):
        ch, nxt, after = w[i], w[i + 1 : i + 2], w[i + 2 : i + 3]
        step = 1
        if group := next((g for g in _CONSONANT_GROUPS if w.startswith(g[0], i)), None):
            out += [("C", c) for c in group[1]]
            step = len(group[0])
        elif ch in _VOWELS or (ch == "y" and not _vowel(nxt)):
            v = "i" if ch == "y" else ch
            if nxt == v and v in "eo":  # ee, oo: long i, long u
                out.append(("V", "i:" if v == "e" else "u:"))
                step = 2
            elif nxt == "r" and not _vowel(after):  # English "-er", "-ar", "-or": long
                out.append(("V", {"a": "a:", "o": "o:"}.get(v, "er")))
                step = 2
            else:
                out.append(("V", v))
        elif ch == "c":
            out.append(("C", "s" if nxt in ("e", "i", "y") else "k"))
        elif ch == "n" and nxt == "g" and not _vowel(after):
            out.append(("C", "ng"))
            step = 2
        elif ch == "h" and out and out[-1][0] == "V" and not _vowel(nxt):
            pass  # a lengthening h (German "ohne"): no sound of its own
        elif "a" <= ch <= "z":
            if nxt == ch:  # a doubled consonant sounds once, after a pause if it stops
                if ch in _STOPS and out and out[-1][0] == "V":
                    out.append(("Q", ""))
            else:
                out.append(("C", "r" if ch == "l" else ch))
        else:
            out.append(("O", ch))
        i += step
    return out


_KANA_VOWEL = {"a": 0, "i": 1, "u": 2, "e": 3, "o": 4, "a:": 0, "i:": 1, "u:": 2, "o:": 4, "er": 0}
_KANA = {
    "": "ア イ ウ エ オ", "k": "カ キ ク ケ コ", "g": "ガ ギ グ ゲ ゴ", "s": "サ シ ス セ ソ",
    "z": "ザ ジ ズ ゼ ゾ", "t": "タ ティ トウ テ ト", "d": "ダ ディ ドウ デ ド",
    "n": "ナ ニ ヌ ネ ノ",
    "h": "ハ ヒ フ ヘ ホ", "b": "バ ビ ブ ベ ボ", "p": "パ ピ プ ペ ポ", "m": "マ ミ ム メ モ",
    "y": "ヤ イ ユ イェ ヨ", "r": "ラ リ ル レ ロ", "w": "ワ ウィ ウ ウェ ウオ",
    "f": "ファ フィ フ フェ フオ", "v": "ヴァ ヴィ ヴ ヴェ ヴオ", "j": "ジャ ジ ジュ ジェ ジョ",
    "sh": "シャ シ シュ シェ ショ", "ch": "チャ チ チュ チェ チョ", "ts": "ツァ ツィ ツ ツェ ツオ",
}  # fmt: skip
# Large オ and ウ where Japanese writes small ones (フォ, トゥ, ツォ): the vocabulary lacks
# the small forms, and WordPiece reads a word with one letter it lacks as a single [UNK].
_KANA = {c: row.split() for c, row in _KANA.items()}
# A consonant with no vowel after it: the "u" column, but o after t and d, i after ch and j.
_KANA_ALONE = {"t": "ト", "d": "ド", "ch": "チ", "j": "ジ", "n": "ン", "ng": "ング"}


def _kana(sounds: list[tuple[str, str]]) -> str:
    out, i = [], 0
    while i < len(sounds):
        kind, s = sounds[i]
        nxt = sounds[i + 1] if i + 1 < len(sounds) else ("", "")
        if kind == "C" and nxt[0] == "V" and s in _KANA:
            out.append(_KANA[s][_KANA_VOWEL[nxt[1]]] + ("ー" if nxt[1][-1:] in ":r" else ""))
            i += 2
            continue
        if kind == "C":
            out.append(_KANA_ALONE.get(s) or _KANA.get(s, _KANA["r"])[2])
        elif kind == "V":
            out.append(_KANA[""][_KANA_VOWEL[s]] + ("ー" if s[-1:] in ":r" else ""))
        elif kind == "Q":
            out.append("ッ")
        else:
            out.append(s)
        i += 1
    return "".join(out)


# Hangul blocks: 0xAC00 + (initial * 21 + vowel) * 28 + final.
_INITIAL = {
    "g": 0, "k": 15, "n": 2, "d": 3, "t": 16, "r": 5, "m": 6, "b": 7, "v": 7, "p": 17,
    "f": 17, "s": 9, "sh": 9, "z": 12, "j": 12, "ch": 14, "ts": 14, "h": 18, "": 11, "w": 11,
    "y": 11, "ng": 11,
}  # fmt: skip
_MEDIAL = {"a": 0, "a:": 0, "e": 5, "i": 20, "i:": 20, "o": 8, "o:": 8, "u": 13, "u:": 13,
           "er": 4}  # fmt: skip
# Only letters all-MiniLM-L6-v2's vocabulary holds (WordPiece reads a word with one unknown
# letter as a single [UNK]): its jamo lack the vowels ya, ye, we, wi, and the finals other
# than ㄱ ㄴ ㄹ ㅁ ㅂ ㅇ. After w, y and sh the vowel takes the glide where one exists (와, 쇼).
_GLIDE = {
    "w": {"a": 9, "o": 14, "er": 14},
    "y": {"o": 12, "u": 17, "er": 6},
    "sh": {"o": 12, "u": 17, "er": 6},
}
_FINAL = {"k": 1, "n": 4, "r": 8, "m": 16, "p": 17, "ng": 21}
_ALONE_VOWEL = {"j": 20, "ch": 20, "sh": 20}  # 지, 치, 시; every other lone consonant: 으


def _hangul(sounds: list[tuple[str, str]]) -> str:
    blocks: list[list[int] | str] = []  # [initial, vowel, final] or a character passed through
    i = 0
    while i < len(sounds):
        kind, s = sounds[i]
        nxt = sounds[i + 1] if i + 1 < len(sounds) else ("", "")
        prev = sounds[i - 1] if i else ("", "")
        if kind == "C" and nxt[0] == "V":
            v = nxt[1]
            vowel = _GLIDE.get(s, {}).get(v.rstrip(":"), _MEDIAL[v])
            blocks.append([_INITIAL.get(s, 11), vowel, 0])
            i += 2
            continue
        if kind == "C":
            last = blocks[-1] if blocks else None
            if prev[0] == "V" and isinstance(last, list) and not last[2] and s in _FINAL:
                last[2] = _FINAL[s]  # 프로그람: the m closes the block before it
            else:
                blocks.append([_INITIAL.get(s, 11), _ALONE_VOWEL.get(s, 18), 0])
        elif kind == "V":
            blocks.append([11, _MEDIAL[s], 0])
        elif kind == "O":
            blocks.append(s)
        i += 1  # a pause ("Q") has no letter in Hangul
    return "".join(
        b if isinstance(b, str) else chr(0xAC00 + (b[0] * 21 + b[1]) * 28 + b[2]) for b in blocks
    )


def to_katakana(text: str, keep: frozenset[str] | set[str] = frozenset()) -> str:
    """``text`` with its Latin words (those `keeps_latin` does not protect) in katakana.

    Words keep their spaces: WordPiece reads a run of kana with one letter outside the
    vocabulary as a single [UNK], so a run per word loses less.
    ``to_katakana("server program")`` is ``"サーヴァー プログラム"``.
    """
    return _rewrite_words(text, lambda word: _kana(_sounds(word.lower())), keep)


def to_hangul(text: str, keep: frozenset[str] | set[str] = frozenset()) -> str:
    """``text`` with its Latin words (those `keeps_latin` does not protect) in Hangul.

    ``to_hangul("server program")`` is ``"서버 프로그람"``.
    """
    return _rewrite_words(text, lambda word: _hangul(_sounds(word.lower())), keep)


# The rewrites the pipeline offers, in the order its coin stacks their fractions
# (``config.data.<name>_queries``).
SCRIPTS = {"cyrillic": to_cyrillic, "katakana": to_katakana, "hangul": to_hangul}
