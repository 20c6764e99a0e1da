"""The Debian builder on a real excerpt of bookworm's index files (tests/fixtures/debian).

No network: the fixture stands in for apt's lists directory, and the one fetch test fakes
``apt-get``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from examples.debian_retrofit import debian
from jaxembed.data.records import check_record

FIXTURE = Path(__file__).parent / "fixtures" / "debian"
LANGS = ["de", "fr", "ja", "pl"]
PREFIX = "deb.debian.org_debian_dists_bookworm_main_"
FIELDS = {"query", "positive", "negatives", "task", "dataset", "instruction"}


@pytest.fixture(scope="module")
def packages():
    pkgs, missing = debian.load_packages(FIXTURE, LANGS)
    assert missing == []
    return {p.name: p for p in pkgs}


@pytest.fixture(scope="module")
def origin(packages):
    """Every text the fixture can contribute -> the (package, language) pairs it comes from."""
    out = defaultdict(set)
    for p in packages.values():
        for lang, desc in p.descs.items():
            for text in (desc.short, desc.long, desc.full):
                out[text].add((p.name, lang))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("debian")
    stats = debian.build(
        out, lists_dir=FIXTURE, langs=LANGS, max_per_task=100, max_eval=50, verbose=False
    )
    return out, stats


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_records(out):
    files = sorted((out / "train").glob("*.jsonl"))
    assert sorted(f.stem for f in files) == sorted(debian.TRAIN_TASKS)
    return [(f, i, r) for f in files for i, r in enumerate(read_jsonl(f), 1)]


def sources(text, origin):
    assert text in origin, f"text not from any fixture package: {text[:80]!r}"
    return origin[text]


# ------------------------------------------------------------------------------------------
# The split rule and the reserved languages


def test_fixture_covers_every_split(packages):
    for name, p in packages.items():
        first = hashlib.md5(name.encode()).hexdigest()[0]
        assert p.split == {"f": "test", "e": "dev"}.get(first, "train")
    splits = defaultdict(set)
    for p in packages.values():
        splits[p.split].add(p.name)
    assert splits["dev"] == {"asc-music", "jmapviewer", "kde-config-cron"}
    assert splits["test"] == {"gwenhywfar-tools", "kdiamond", "libreoffice-common"}
    assert len(splits["train"]) == 13  # 14 in the fixture, minus a transitional package
    assert "acedb-other-belvu" not in packages


def test_train_files_hold_only_train_packages_in_allowed_languages(built, origin):
    out, stats = built
    assert stats["packages"] == {"train": 13, "dev": 3, "test": 3}
    assert stats["withheld_train_descriptions"] == 0  # no shared texts in the fixture
    assert stats["langs"]["train"] == ["en", "de", "fr"]
    labels = set(debian.SECTION_LABELS.values())
    n = 0
    for path, line, record in train_records(out):
        texts = [record["query"]]
        if record["task"] != "classification":  # there positive/negatives are label texts
            texts += [record["positive"], *record["negatives"]]
        for text in texts:
            froms = sources(text, origin)
            splits = {debian.split_of(name) for name, _ in froms}
            assert splits == {"train"}, f"{path}:{line}: text of a {splits} package"
            # Short texts can be shared across languages (an untranslated name); what
            # matters is that some allowed-language source exists.
            langs = {lang for _, lang in froms}
            assert langs - debian.RESERVED_LANGS, f"{path}:{line}: only in reserved {langs}"
            n += 1
        if record["task"] == "classification":
            assert {record["positive"], *record["negatives"]} <= labels
    assert n > 100


def test_reserved_and_eval_texts_never_reach_training(built, packages):
    out, _ = built
    train_texts = set()
    for _, _, record in train_records(out):
        train_texts.update([record["query"], record["positive"], *record["negatives"]])
    allowed = {}
    for p in packages.values():
        for lang, desc in p.descs.items():
            if p.split == "train" and lang not in debian.RESERVED_LANGS:
                allowed.update(dict.fromkeys((desc.short, desc.long, desc.full)))
    forbidden = set()
    for p in packages.values():
        for lang, desc in p.descs.items():
            if p.split != "train" or lang in debian.RESERVED_LANGS:
                forbidden.update({desc.short, desc.long, desc.full} - allowed.keys())
    assert any(any(ord(c) > 0x3000 for c in t) for t in forbidden)  # Japanese is in there
    assert not forbidden & train_texts
    blob = "".join(path.read_text(encoding="utf-8") for path in out.rglob("*.jsonl"))
    assert "Veraltete" not in blob  # the stale-md5 translation joins nothing


def test_texts_shared_with_eval_packages_stay_out_of_training():
    def named(split):
        return next(f"pkg{i}" for i in range(1000) if debian.split_of(f"pkg{i}") == split)

    def desc(short, body):
        return debian.Description(short, body)

    shared = desc("GNU Objective-C compiler", "This is the GNU Objective-C compiler for arm64.")
    pkgs = [
        debian.Package(named("test"), "devel", "test", {"en": shared}),
        debian.Package("sibling", "devel", "train", {"en": shared}),
        debian.Package("gcc-mingw", "devel", "train", {"en": desc("GNU C", "Cross compiler.")}),
        debian.Package("kmines", "games", "train", {"en": desc("Minesweeper", "Find mines.")}),
    ]
    tasks, withheld = debian.build_train(pkgs, ["de"], max_per_task=100, seed=0)
    assert withheld == 1
    texts = {t for rows, _ in tasks.values() for r in rows for t in (r["query"], r["positive"])}
    assert texts and not {shared.short, shared.long, shared.full} & texts


def test_every_record_passes_the_schema(built):
    out, stats = built
    for path, line, record in train_records(out):
        assert set(record) == FIELDS
        assert check_record(record, f"{path}:{line}") == record
        task, instruction = debian.TRAIN_TASKS[record["dataset"]]
        assert (record["task"], record["instruction"]) == (task, instruction)
        assert record["dataset"] == path.stem
        if task == "retrieval":
            assert record["negatives"] == []
    for dataset, s in stats["train"].items():
        assert s["rows"] == len(read_jsonl(out / "train" / f"{dataset}.jsonl"))
        assert s["rows"] == sum(s["by_lang"].values()) > 0


def test_retrieval_pairs(built, origin, packages):
    out, _ = built
    xling = read_jsonl(out / "train" / "debian-xling.jsonl")
    assert {lang for r in xling for _, lang in origin[r["query"]]} >= {"de", "fr"}
    for r in xling:
        names = {name for name, lang in sources(r["query"], origin) if lang != "en"}
        assert any(packages[name].descs["en"].full == r["positive"] for name in names)
    mono = read_jsonl(out / "train" / "debian-mono.jsonl")
    for r in mono:
        pairs = sources(r["query"], origin)
        assert any(packages[n].descs[lang].long == r["positive"] for n, lang in pairs)
    assert len({(r["query"], r["positive"]) for r in xling + mono}) == len(xling + mono)


def test_the_same_draws_with_the_body_alone_or_a_mix(built, origin, packages):
    """debian-xling-body: xling's rows whose English description has a body, the body as the
    positive (no synopsis: the query's translation); debian-xling-mix: one or the other."""
    out, _ = built
    xling = read_jsonl(out / "train" / "debian-xling.jsonl")
    body = read_jsonl(out / "train" / "debian-xling-body.jsonl")
    mix = read_jsonl(out / "train" / "debian-xling-mix.jsonl")
    pairs = {name: {(r["query"], r["positive"]) for r in rows} for name, rows in
             (("full", xling), ("body", body), ("mix", mix))}  # fmt: skip
    assert 0 < len(body) <= len(xling) and len(mix) == len(xling)
    for r in body:
        english = [packages[n].descs["en"] for n, _ in sources(r["query"], origin)]
        assert any(
            d.long == r["positive"] and (r["query"], d.full) in pairs["full"] for d in english
        )
        assert not any(r["positive"].startswith(d.short) for d in english)
    assert pairs["mix"] <= pairs["full"] | pairs["body"]
    assert pairs["mix"] & pairs["full"] and pairs["mix"] & pairs["body"]  # both formats


def test_classification_rows(built, origin, packages):
    out, _ = built
    rows = read_jsonl(out / "train" / "debian-section.jsonl")
    assert len(rows) == 39  # 13 train packages x (en, de, fr)
    for r in rows:
        assert len(r["negatives"]) == 1
        assert r["negatives"][0] != r["positive"]
        sections = {packages[n].section for n, _ in sources(r["query"], origin)}
        assert r["positive"] in {debian.section_label(s) for s in sections}
    assert {r["positive"] for r in rows} == {"Games", "Utilities", "Editors"}


def test_clustering_rows(built, origin, packages):
    out, _ = built
    rows = read_jsonl(out / "train" / "debian-cluster.jsonl")
    assert rows
    for r in rows:
        q = sources(r["query"], origin)
        p = sources(r["positive"], origin)
        assert r["positive"] != r["query"]
        assert {packages[n].section for n, _ in q} == {packages[n].section for n, _ in p}
        assert {lang for _, lang in q} & {lang for _, lang in p}  # same language
        assert 1 <= len(r["negatives"]) <= 7
        assert len({r["query"], r["positive"], *r["negatives"]}) == 2 + len(r["negatives"])
        for neg in r["negatives"]:
            assert {packages[n].section for n, _ in sources(neg, origin)}.isdisjoint(
                {packages[n].section for n, _ in q}
            )


def test_beir_sets(built, origin, packages):
    out, stats = built
    expected = {f"xling-{lang}" for lang in LANGS} | {f"mono-{lang}" for lang in ["en", *LANGS]}
    expected |= {f"xling-body-{lang}" for lang in LANGS}
    for split in ("dev", "test"):
        assert {d.name for d in (out / split).iterdir()} == expected == set(stats[split])
        for folder in (out / split).iterdir():
            corpus = read_jsonl(folder / "corpus.jsonl")
            queries = read_jsonl(folder / "queries.jsonl")
            assert all(set(d) == {"_id", "title", "text"} and d["text"] for d in corpus)
            assert all(set(q) == {"_id", "text"} and q["text"] for q in queries)
            doc_ids = [d["_id"] for d in corpus]
            query_ids = [q["_id"] for q in queries]
            assert len(set(doc_ids)) == len(doc_ids) and len(set(query_ids)) == len(query_ids)
            assert not set(doc_ids) & set(query_ids)  # BEIR evaluators drop id == query id
            lines = (folder / "qrels" / f"{split}.tsv").read_text().splitlines()
            assert lines[0] == "query-id\tcorpus-id\tscore"
            qrels = [line.split("\t") for line in lines[1:]]
            assert all(len(row) == 3 and row[2] == "1" for row in qrels)
            assert {qid for qid, _, _ in qrels} == set(query_ids)
            assert {did for _, did, _ in qrels} <= set(doc_ids)
            # Only this split's packages, in the set's languages.
            for pid in doc_ids + query_ids:
                assert debian.split_of(pid[2:]) == split
            kind, lang = folder.name.rsplit("-", 1)
            doc_lang = lang if kind == "mono" else "en"
            for d in corpus:
                assert doc_lang in {lng for _, lng in sources(d["text"], origin)}
                if kind == "xling-body":  # the body alone: no synopsis, so no translation
                    names = [n for n, lng in sources(d["text"], origin) if lng == "en"]
                    assert all(packages[n].descs["en"].long == d["text"] for n in names)
            for q in queries:
                assert lang in {lng for _, lng in sources(q["text"], origin)}
            s = stats[split][folder.name]
            assert (s["queries"], s["corpus"], s["qrels"]) == (3, 3, 3)


def test_caps_and_determinism(tmp_path):
    a = debian.build(
        tmp_path / "a", FIXTURE, langs=LANGS, max_per_task=5, max_eval=2, verbose=False
    )
    debian.build(tmp_path / "b", FIXTURE, langs=LANGS, max_per_task=5, max_eval=2, verbose=False)
    for s in a["train"].values():
        assert s["rows"] == 5
        counts = [s["by_lang"].get(lang, 0) for lang in ("de", "fr")]
        assert max(counts) - min(counts) <= 1  # languages interleaved, not drawn uniformly
    for s in a["dev"].values():
        assert s["queries"] == 2
    for path in (tmp_path / "a").rglob("*.*"):
        if path.name != "stats.json":
            assert (
                path.read_bytes()
                == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
            )


# ------------------------------------------------------------------------------------------
# Parsing


def test_parse_description_paragraphs_and_verbatim_lines():
    value = "\n".join(
        [
            "subtitle  download manager",
            " SubDownloader is a tool to automatically",
            " download   subtitles.",
            " .",
            " Features:",
            "  * Fast hashing",
            "  * Upload entire series in less than",
            "    1 minute",
            "  * Autodetect language",
            " This package contains the GUI.",
            " .",
            " \u00a0",
            " .",
            " Last paragraph.",
        ]
    )
    desc = debian.parse_description(value)
    assert desc.short == "subtitle download manager"
    assert desc.long == (
        "SubDownloader is a tool to automatically download subtitles.\n\n"
        "Features:\n* Fast hashing\n* Upload entire series in less than 1 minute\n"
        "* Autodetect language\nThis package contains the GUI.\n\n"
        "Last paragraph."
    )
    assert desc.full == f"{desc.short}\n\n{desc.long}"
    assert debian.parse_description("only a synopsis").full == "only a synopsis"


def test_fixture_multiparagraph_translation():
    texts = debian.read_translations(FIXTURE / f"{PREFIX}i18n_Translation-de")
    sub = next(d for (name, _), d in texts.items() if name == "subdownloader")
    assert sub.short == "Download-/Upload-Verwaltung für Untertitel von Videodateien"
    paragraphs = sub.long.split("\n\n")
    assert len(paragraphs) == 3
    assert paragraphs[1].splitlines()[-1] == (
        "* Hochladen gesamter Serien-Staffeln-Untertitel in weniger als einer Minute"
    )


def test_stanzas_tolerate_a_no_break_space_line(tmp_path):
    path = tmp_path / "Translation-fr"
    path.write_text(
        "Package: a\nDescription-md5: 1\nDescription-fr: court\n texte un\n \u00a0\n texte deux\n"
        "\nPackage: b\nDescription-md5: 2\nDescription-fr: autre\n",
        encoding="utf-8",
    )
    texts = debian.read_translations(path)
    assert texts[("a", "1")].long == "texte un texte deux"
    assert texts[("b", "2")].short == "autre"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("Package: a\nDescription-md5: 1\nDescription-de: x\n\nPackage b\n", 5, "Field: value"),
        ("Package: a\nDescription-md5: 1\nDescription-de: x\n\n continued\n", 5, "continuation"),
        ("Package: a\nDescription-de: x\n\nPackage: b\nDescription-md5: 2\n", 1, "Description-md5"),
        ("\n\nPackage: b\nDescription-md5: 2\n", 3, "Description-<lang>"),
    ],
)
def test_malformed_stanza_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / f"{PREFIX}i18n_Translation-de"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(debian.DebianFormatError, match=message) as info:
        debian.read_translations(path)
    assert str(info.value).startswith(f"{path}:{line}:")


def test_packages_section_area_prefix_and_md5(tmp_path):
    path = tmp_path / f"{PREFIX}binary-amd64_Packages"
    path.write_text(
        "Package: a\nDescription: A\nDescription-md5: 11\nSection: contrib/games\n\n"
        "Package: b\nDescription: B thing\n more text\nSection: non-free/utils\n\n"
        "Package: c\nDescription-md5: 33\n",
        encoding="utf-8",
    )
    out = debian.read_packages(path)
    b_md5 = hashlib.md5(b"B thing\n more text\n").hexdigest()  # dak's Description-md5
    assert out == {"a": {"11": "games"}, "b": {b_md5: "utils"}}


def test_missing_translation_en_names_dir_and_what_was_found(tmp_path):
    shutil.copy(FIXTURE / f"{PREFIX}binary-amd64_Packages", tmp_path)
    shutil.copy(FIXTURE / f"{PREFIX}i18n_Translation-de", tmp_path)
    with pytest.raises(debian.DebianFormatError) as info:
        debian.build(tmp_path / "out", lists_dir=tmp_path, langs=["de"], verbose=False)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}:")
    assert "Translation-en" in message and f"{PREFIX}i18n_Translation-de" in message
    assert not (tmp_path / "out" / "stats.json").exists()


def test_find_lists_unescapes_apt_file_names(tmp_path):
    # What apt-get update really writes for pt_BR (seen on bookworm).
    pt_br = tmp_path / f"{PREFIX}i18n_Translation-pt%5fBR"
    shutil.copy(FIXTURE / f"{PREFIX}i18n_Translation-de", pt_br)
    shutil.copy(FIXTURE / f"{PREFIX}binary-amd64_Packages", tmp_path)
    (tmp_path / "deb.debian.org_debian_dists_bookworm_InRelease").write_text("")
    packages, translations = debian.find_lists(tmp_path)
    assert packages == [tmp_path / f"{PREFIX}binary-amd64_Packages"]
    assert translations == {"pt_BR": [pt_br]}


def test_compressed_lists_read_like_plain_ones(tmp_path, packages):
    openers = [(".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)]
    for i, path in enumerate(sorted(p for p in FIXTURE.iterdir() if "_" in p.name)):
        ext, opener = openers[i % len(openers)]
        with opener(tmp_path / f"{path.name}{ext}", "wb") as f:
            f.write(path.read_bytes())
    if shutil.which("lz4") and Path("/usr/lib/apt/apt-helper").exists():
        en = tmp_path / f"{PREFIX}i18n_Translation-en"
        subprocess.run(
            ["lz4", "-q", FIXTURE / en.name, f"{en}.lz4"], check=True, capture_output=True
        )
        next(tmp_path.glob(f"{en.name}.[gxb]*")).unlink()
    got, missing = debian.load_packages(tmp_path, LANGS)
    assert missing == []
    assert {p.name: p for p in got} == packages


# ------------------------------------------------------------------------------------------
# Writing and fetching


def test_failure_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    calls = []

    def failing_check(record, where):
        calls.append(where)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return check_record(record, where)

    monkeypatch.setattr(debian, "check_record", failing_check)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        debian.build(out, lists_dir=FIXTURE, langs=LANGS, verbose=False)
    # The fifth record is in the first training file, which must not exist at all.
    assert calls[-1] == f"{out / 'train' / 'debian-xling.jsonl'}:5"
    assert not (out / "train").exists() or not list((out / "train").iterdir())
    assert not (out / "stats.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_fetch_failure_carries_apt_stderr(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: The repository is unreachable")

    monkeypatch.setattr(debian.subprocess, "run", fake_run)
    with pytest.raises(debian.FetchError, match="E: The repository is unreachable"):
        debian.fetch_lists(tmp_path / "lists", ["de", "pt_BR"])
    cmd = " ".join(seen[0])
    assert cmd.startswith("apt-get update")
    assert f"Dir::State::Lists={(tmp_path / 'lists').resolve()}" in cmd
    assert "Acquire::Languages=en,de,pt_BR" in cmd
    with pytest.raises(ValueError, match="bad language code"):
        debian.fetch_lists(tmp_path / "lists", ["de,fr"])


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        debian.main(["--help"])
    assert info.value.code == 0
    assert "--max-per-task" in capsys.readouterr().out
    stats = debian.main(
        ["--out", str(tmp_path), "--lists", str(FIXTURE), "--langs", "de,ja", "--seed", "3"]
    )
    printed = capsys.readouterr().out
    assert "debian-xling" in printed and "xling-ja" in printed
    assert json.loads((tmp_path / "stats.json").read_text())["train"] == stats["train"]
    assert stats["langs"]["train"] == ["en", "de"]
    with pytest.raises(SystemExit) as info:
        debian.main(["--out", str(tmp_path / "o"), "--lists", str(tmp_path / "nowhere")])
    assert info.value.code == 2 and "Translation-en" in capsys.readouterr().err


def test_build_says_each_stage_on_stderr(tmp_path, capsys):
    debian.build(tmp_path / "out", FIXTURE, langs=LANGS, max_per_task=5, max_eval=2)
    err = capsys.readouterr().err
    stages = ["reading the Packages", "building the training files", "building the dev", "test"]
    assert all(s in err for s in stages), err
