"""Latin text rewritten in Cyrillic letters (the ``data.cyrillic_queries`` augmentation)."""

from jaxembed.data.script import keeps_latin, to_cyrillic, words


def test_borrowed_words_come_out_as_their_cyrillic_spelling():
    # Words that Russian borrowed come out as Russian spells them (modulo soft signs).
    assert to_cyrillic("server paket protokol biblioteka") == "сервер пакет протокол библиотека"
    assert to_cyrillic("Sistema de processamento") == "Система де процессаменто"  # c -> ц before e
    assert to_cyrillic("Datenformat für Audiodateien") == "Датенформат фюр Аудиодатеиен"
    # Digraphs before letters, Slavic and Nordic letters by sound, other accents dropped.
    assert to_cyrillic("schach tschüss přístup Łódź miljø") == "шач чюсс пржиступ Лодж милйё"
    assert to_cyrillic("édition crédito") == "едитион кредито"


def test_names_acronyms_numbers_and_kept_words_stay_latin():
    keep = words("GNOME bindings for the Telepathy framework")
    out = to_cyrillic("Enlaces de Telepathy para GNOME 3, libgtk_4 y OpenGL", keep)
    assert out == "Енлацес де Telepathy пара GNOME 3, libgtk_4 и OpenGL"
    assert keeps_latin("KDE") and keeps_latin("OpenGL") and keeps_latin("x11")
    assert not keeps_latin("Bibliothek") and keeps_latin("bibliothek", {"bibliothek"})
    # Text already in another script, punctuation and spacing pass through unchanged.
    assert to_cyrillic("библиотека — 日本語, (ok)!") == "библиотека — 日本語, (ок)!"
