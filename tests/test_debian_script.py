"""The Debian example's query transform: training queries in Cyrillic letters
(examples/debian_retrofit/script.py), checked against spellings written here, not against
the module's own output."""

import numpy as np
import pytest

from examples.debian_retrofit.script import cyrillic, keeps_latin, to_cyrillic, words

# Words Russian borrowed, as Russian spells them (a dictionary's spelling: only words with
# no soft sign, which a letter-by-letter rewrite cannot know to add).
RUSSIAN = {
    "server": "сервер", "paket": "пакет", "protokol": "протокол", "biblioteka": "библиотека",
    "sistema": "система", "terminal": "терминал", "format": "формат", "programma": "программа",
    "dokument": "документ", "tekst": "текст", "arkhiv": "архив", "shrift": "шрифт",
    "zhurnal": "журнал", "chat": "чат", "tsentr": "центр", "redaktor": "редактор",
}  # fmt: skip
# One Latin letter, one Cyrillic letter (the module docstring's convention), for the letters
# no digraph starts and no neighbour changes.
PLAIN = dict(zip("abdefgiklmnoprstuvz", "абдефгиклмнопрстувз", strict=True))


def test_borrowed_words_come_out_as_russian_spells_them():
    assert to_cyrillic(" ".join(RUSSIAN)) == " ".join(RUSSIAN.values())
    assert to_cyrillic("Sistema Format") == "Система Формат"  # the first letter's case kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_letters_map_one_to_one(seed):
    """Random words of the plain letters, without the pairs a digraph reads (ts, tz, ee, oo,
    ou): each letter comes out as the table's."""
    rng = np.random.default_rng(seed)
    letters = list(PLAIN)
    for _ in range(200):
        word = "".join(rng.choice(letters, rng.integers(1, 9)))
        if any(pair in word for pair in ("ts", "tz", "ee", "oo", "ou")):
            continue
        assert to_cyrillic(word) == "".join(PLAIN[ch] for ch in word), word


def test_names_acronyms_numbers_and_kept_words_stay_latin():
    keep = words("GNOME bindings for the Telepathy framework")
    out = to_cyrillic("Enlaces de Telepathy para GNOME 3, libgtk_4 y OpenGL", keep)
    assert out.split()[2:4] == ["Telepathy", "пара"] and "GNOME 3, libgtk_4" in out
    assert out.endswith("OpenGL") and out.startswith("Ен")
    assert keeps_latin("KDE") and keeps_latin("OpenGL") and keeps_latin("x11")
    assert not keeps_latin("Bibliothek") and keeps_latin("bibliothek", {"bibliothek"})
    # Text already in another script, punctuation and spacing pass through unchanged.
    assert to_cyrillic("библиотека — 日本語, (ok)!") == "библиотека — 日本語, (ок)!"


def test_the_transform_keeps_the_positives_words():
    """What the recipe registers (data.query_transform): the query rewritten, the words the
    English description shares with it (names: "server" here) left in Latin."""
    record = {"query": "paket server", "positive": "A server for chat"}
    assert cyrillic(record, np.random.default_rng(0)) == "пакет server"
    assert cyrillic({"query": "paket server", "positive": "nothing shared"}) == "пакет сервер"
