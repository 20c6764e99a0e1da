"""Multilingual training and evaluation data from Debian's translated package descriptions.

Debian ships every binary package's description in English (``Translation-en``) and, for
many packages, in other languages (``Translation-de``, ``Translation-ja``, ...), all keyed by
``(Package, Description-md5)``; the ``Packages`` index gives each package's ``Section``.
That is real, human-translated, parallel text with a free topic label, which this module
turns into the project's training records and BEIR-style evaluation sets::

    python -m examples.debian_retrofit.debian --out data/debian --langs de,fr,es,ja,pl \
        --max-per-task 2000

writes

    DIR/train/debian-xling.jsonl     short summary in X        -> English full description
    DIR/train/debian-xling-body.jsonl  the same draws             -> its body alone (no synopsis)
    DIR/train/debian-xling-mix.jsonl   the same draws             -> one or the other, per row
    DIR/train/debian-mono.jsonl      short summary in X        -> long description in X
    DIR/train/debian-section.jsonl   description               -> its Section label (1 negative)
    DIR/train/debian-cluster.jsonl   description               -> same-Section description
    DIR/{dev,test}/{xling,xling-body,mono}-<lang>/{corpus,queries}.jsonl, qrels/{dev,test}.tsv
    DIR/stats.json
    DIR/lists/                       apt's index files (only when no --lists was given)

The split is decided by the package name alone (``split_of``): md5 starting with ``f`` is
test, ``e`` is dev, everything else train; train files only ever hold train packages, and
never the languages in ``RESERVED_LANGS``, which exist for zero-shot evaluation only.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import re
import subprocess
import sys
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from jaxembed import cli
from jaxembed.data.records import check_record
from jaxembed.files import atomic_open, write_jsonl

RESERVED_LANGS = frozenset({"pl", "cs", "ja", "ko", "ru", "uk", "zh_CN"})
# The non-English bookworm/main translations with more than a few hundred packages.
DEFAULT_LANGS = (
    "da", "de", "es", "fi", "fr", "it", "pt", "pt_BR", "sk",
    "cs", "ja", "ko", "pl", "ru", "uk", "zh_CN",
)  # fmt: skip
DEFAULT_MAX_PER_TASK = 20000
DEFAULT_MAX_EVAL = 1000
DEFAULT_MAX_CORPUS = 5000

TRAIN_TASKS = {
    # dataset name -> (record task, query-side instruction)
    "debian-xling": (
        "retrieval",
        "Given a short package summary, retrieve the full package description",
    ),
    # The same draws as debian-xling, positives without the English synopsis (a translation
    # of the query, which rewards translation matching): the body alone, rows without one
    # left out; and per row a coin between the two.
    "debian-xling-body": (
        "retrieval",
        "Given a short package summary, retrieve the full package description",
    ),
    "debian-xling-mix": (
        "retrieval",
        "Given a short package summary, retrieve the full package description",
    ),
    "debian-mono": (
        "retrieval",
        "Given a short package summary, retrieve the package's detailed description",
    ),
    "debian-section": (
        "classification",
        "Classify the software package description into its Debian archive section",
    ),
    "debian-cluster": (
        "clustering",
        "Identify the Debian archive section of the software package from its description",
    ),
}

# Debian's own section titles (packages.debian.org), so label texts read like topics.
SECTION_LABELS = {
    "admin": "Administration Utilities",
    "cli-mono": "Mono/CLI",
    "comm": "Communication Programs",
    "database": "Databases",
    "debian-installer": "Debian Installer",
    "debug": "Debug Symbols",
    "devel": "Development",
    "doc": "Documentation",
    "editors": "Editors",
    "education": "Education",
    "electronics": "Electronics",
    "embedded": "Embedded Software",
    "fonts": "Fonts",
    "games": "Games",
    "gnome": "GNOME",
    "gnu-r": "GNU R",
    "gnustep": "GNUstep",
    "golang": "Go",
    "graphics": "Graphics",
    "hamradio": "Ham Radio",
    "haskell": "Haskell",
    "httpd": "Web Servers",
    "interpreters": "Interpreters",
    "introspection": "GObject Introspection",
    "java": "Java",
    "javascript": "JavaScript",
    "kde": "KDE",
    "kernel": "Kernels",
    "libdevel": "Library Development",
    "libs": "Libraries",
    "lisp": "Lisp",
    "localization": "Language Packs",
    "mail": "Mail",
    "math": "Mathematics",
    "metapackages": "Metapackages",
    "misc": "Miscellaneous",
    "net": "Network",
    "news": "Newsgroups",
    "ocaml": "OCaml",
    "oldlibs": "Old Libraries",
    "otherosfs": "Other OS's and File Systems",
    "perl": "Perl",
    "php": "PHP",
    "python": "Python",
    "ruby": "Ruby",
    "rust": "Rust",
    "science": "Science",
    "shells": "Shells",
    "sound": "Sound",
    "tasks": "Tasks",
    "tex": "TeX",
    "text": "Text Processing",
    "utils": "Utilities",
    "vcs": "Version Control Systems",
    "video": "Video",
    "web": "Web Software",
    "x11": "X Window System",
    "xfce": "Xfce",
    "zope": "Zope/Plone Framework",
}

_LANG_RE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?$")
_COMPRESSED = (".gz", ".xz", ".bz2", ".lz4", ".zst")
_TRANSLATION_RE = re.compile(r"_i18n_Translation-([A-Za-z_]+)(\.(?:gz|xz|bz2|lz4|zst))?$")
_PACKAGES_RE = re.compile(r"_binary-[^_]+_Packages(\.(?:gz|xz|bz2|lz4|zst))?$")
# Transitional packages all say the same thing ("transitional package"), in every language:
# thousands of identical queries with different positives teach nothing but noise.
_LIST_ITEM_RE = re.compile(r"([*+o-]|\d+[.)]) ")
_BOILERPLATE_RE = re.compile(r"\btransitional\b|\bdummy package\b", re.IGNORECASE)


class DebianFormatError(ValueError):
    """A malformed index file; the message starts with ``file:line:``."""


class FetchError(OSError):
    """``apt-get update`` failed, or fetched no usable index; the message carries apt's stderr."""


def split_of(package: str) -> str:
    """Returns ``"test"``, ``"dev"`` or ``"train"`` for a package name (the project split rule)."""
    first = hashlib.md5(package.encode()).hexdigest()[0]
    return "test" if first == "f" else "dev" if first == "e" else "train"


def section_label(section: str) -> str:
    """Readable label text for a Section, e.g. ``"utils"`` -> ``"Utilities"``."""
    return SECTION_LABELS.get(section) or section.replace("-", " ").capitalize()


# ------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class Description:
    """One package description in one language: the synopsis line and the unfolded body."""

    short: str
    long: str

    @property
    def full(self) -> str:
        return f"{self.short}\n\n{self.long}" if self.long else self.short


def parse_description(value: str) -> Description:
    """Parses a ``Description*`` field value (synopsis, then the raw continuation lines).

    Follows Debian policy 5.6.13: a line of one space and a dot is a paragraph break, lines
    indented by one space are wrapped text (unfolded into one line per paragraph), lines
    indented by more are verbatim (lists, code) and keep their own line, except the wrapped
    tail of a list item (``"  * long item"`` then ``"    continued"``), which joins its item.
    Runs of whitespace inside a line collapse to one space; paragraphs are separated by a
    blank line.
    """
    first, *rest = value.split("\n")
    paragraphs: list[list[str]] = [[]]
    last_verbatim, last_indent = False, 0
    for raw in rest:
        if raw.strip() == ".":
            paragraphs.append([])
            last_verbatim = False
            continue
        text = " ".join(raw.split())
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        verbatim = indent > 1
        para = paragraphs[-1]
        deeper = verbatim and last_verbatim and indent > last_indent
        if para and deeper and not _LIST_ITEM_RE.match(text):
            # The item's indent stays the reference, so a third wrapped line joins too.
            para[-1] = f"{para[-1]} {text}"
            continue
        if para and not verbatim and not last_verbatim:
            para[-1] = f"{para[-1]} {text}"
        else:
            para.append(text)
        last_verbatim, last_indent = verbatim, indent
    body = "\n\n".join("\n".join(p) for p in paragraphs if p)
    return Description(short=" ".join(first.split()), long=body)


def _open_text(path: Path) -> IO[str]:
    """Opens an apt index file as UTF-8 text, whatever compression apt stored it with."""
    suffix = path.suffix
    if suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if suffix in (".lz4", ".zst"):
        # The standard library has no lz4/zstd; apt's own helper reads every format apt writes.
        proc = subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", str(path)],
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise DebianFormatError(
                f"{path}:0: cannot decompress: {proc.stderr.decode(errors='replace').strip()}"
            )
        try:
            return io.StringIO(proc.stdout.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DebianFormatError(f"{path}:0: not UTF-8: {e}") from e
    return open(path, encoding="utf-8")


def iter_stanzas(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields ``(first_line_number, fields)`` for each deb822 stanza of an index file.

    A field's value is its first line, then each continuation line verbatim (leading space
    kept) after a newline, which is what ``parse_description`` and the Description-md5
    both work on.

    Raises:
      DebianFormatError: ``file:line: ...`` for a line that is neither ``Key: value`` nor a
        continuation of one, or undecodable bytes.
    """
    path = Path(path)
    fields: dict[str, str] = {}
    start = 0
    key = None
    lineno = 0
    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                # Only ASCII blanks end a stanza: translators leave lines of a space and a
                # no-break space, which str.strip() would take for a blank line.
                if not line.strip(" \t\r"):
                    if fields:
                        yield start, fields
                    fields, key = {}, None
                    continue
                if line[0] in " \t":
                    if key is None:
                        raise DebianFormatError(
                            f"{path}:{lineno}: continuation line outside any field: {line!r}"
                        )
                    fields[key] += "\n" + line
                    continue
                name, sep, value = line.partition(":")
                if not sep or not name or " " in name:
                    raise DebianFormatError(
                        f"{path}:{lineno}: expected 'Field: value' or an indented "
                        f"continuation line, got {line!r}"
                    )
                if not fields:
                    start = lineno
                key = name
                fields[key] = value.strip()
        except UnicodeDecodeError as e:
            raise DebianFormatError(f"{path}:{lineno + 1}: not UTF-8: {e}") from e
    if fields:
        yield start, fields


def read_translations(path: str | os.PathLike) -> dict[tuple[str, str], Description]:
    """Reads a ``Translation-<lang>`` file into ``{(package, description_md5): Description}``.

    Raises:
      DebianFormatError: ``file:line: ...`` for a malformed stanza or one missing a field.
    """
    out: dict[tuple[str, str], Description] = {}
    for start, fields in iter_stanzas(path):
        desc_key = next(
            (k for k in fields if k.startswith("Description-") and k != "Description-md5"),
            None,
        )
        missing = [k for k in ("Package", "Description-md5") if not fields.get(k)]
        if desc_key is None:
            missing.append("Description-<lang>")
        if missing:
            raise DebianFormatError(
                f"{path}:{start}: stanza lacks {', '.join(missing)} (has {', '.join(fields)})"
            )
        out[(fields["Package"], fields["Description-md5"])] = parse_description(fields[desc_key])
    return out


def read_packages(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Reads a ``Packages`` index into ``{package: {description_md5: section}}``.

    The area prefix of a Section (``contrib/``, ``non-free/``) is dropped: it says where a
    package lives, not what it is. Stanzas without a Section are skipped; a missing
    Description-md5 is computed from a full Description the way dak does (md5 of the field
    value plus a newline).

    Raises:
      DebianFormatError: ``file:line: ...`` for a malformed stanza or one without Package.
    """
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for start, fields in iter_stanzas(path):
        name = fields.get("Package")
        if not name:
            raise DebianFormatError(f"{path}:{start}: stanza lacks Package")
        section = fields.get("Section", "").rsplit("/", 1)[-1].strip()
        md5 = fields.get("Description-md5")
        if md5 is None and "Description" in fields:
            md5 = hashlib.md5((fields["Description"] + "\n").encode()).hexdigest()
        if section and md5:
            out[name].setdefault(md5, section)
    return dict(out)


def find_lists(lists_dir: str | os.PathLike) -> tuple[list[Path], dict[str, list[Path]]]:
    """Finds apt's ``Packages`` and ``Translation-<lang>`` files in a lists directory.

    Returns:
      ``(packages_files, {lang: translation_files})``, sorted by name.
    """
    lists_dir = Path(lists_dir)
    packages: list[Path] = []
    translations: dict[str, list[Path]] = defaultdict(list)
    if lists_dir.is_dir():
        for path in sorted(lists_dir.iterdir()):
            if not path.is_file():
                continue
            # apt escapes URIs into file names: Translation-pt_BR is stored as
            # ...Translation-pt%5fBR.
            if m := _TRANSLATION_RE.search(urllib.parse.unquote(path.name)):
                translations[m.group(1)].append(path)
            elif _PACKAGES_RE.search(path.name):
                packages.append(path)
    return packages, dict(translations)


# ------------------------------------------------------------------------------------------
# Fetching


def _check_langs(langs: Iterable[str]) -> list[str]:
    """English first, then the other languages in the given order, validated and deduped."""
    out = ["en"]
    for lang in langs:
        lang = lang.strip()
        if not lang or lang in out:
            continue
        if not _LANG_RE.match(lang):
            raise ValueError(f"bad language code {lang!r}: expected e.g. 'de' or 'pt_BR'")
        out.append(lang)
    return out


def fetch_lists(lists_dir: str | os.PathLike, langs: Iterable[str]) -> Path:
    """Runs ``apt-get update`` into a private lists directory, with translations for ``langs``.

    Uses apt's configured sources (no mirror is named here) and leaves the system's own lists
    and caches alone. Files are stored uncompressed. Needs root, like any apt-get update.

    Args:
      lists_dir: where apt puts the index files (created if missing).
      langs: language codes besides English, e.g. ``["de", "pt_BR"]``.

    Returns:
      The lists directory.

    Raises:
      FetchError: apt failed or produced no Translation-en / Packages; carries apt's stderr.
    """
    lists_dir = Path(lists_dir).resolve()
    (lists_dir / "partial").mkdir(parents=True, exist_ok=True)
    cmd = [
        "apt-get",
        "update",
        "-q",
        "-o", f"Dir::State::Lists={lists_dir}",
        "-o", f"Acquire::Languages={','.join(_check_langs(langs))}",
        # Docker images set GzipIndexes=true (and apt may pick lz4); plain files are simpler
        # to read and to inspect.
        "-o", "Acquire::GzipIndexes=false",
        # Empty cache paths keep apt from rebuilding the system's binary cache from our lists.
        "-o", "Dir::Cache::pkgcache=",
        "-o", "Dir::Cache::srcpkgcache=",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise FetchError(f"apt-get not found ({e}); pass --lists DIR with the index files") from e
    packages, translations = find_lists(lists_dir)
    if proc.returncode != 0 or not packages or "en" not in translations:
        raise FetchError(
            f"apt-get update into {lists_dir} failed (exit {proc.returncode}; found "
            f"{len(packages)} Packages files, translations {sorted(translations)}).\n"
            f"command: {' '.join(cmd)}\nstderr:\n{proc.stderr.strip()}"
        )
    return lists_dir


# ------------------------------------------------------------------------------------------
# Joining


@dataclass(frozen=True)
class Package:
    """A package with its Section, split and usable descriptions by language."""

    name: str
    section: str
    split: str
    descs: dict[str, Description]


def _usable(desc: Description, need_long: bool = False) -> bool:
    """False for empty or garbage texts (no letters, a couple of characters)."""
    if len(desc.short) < 3 or not any(c.isalpha() for c in desc.short):
        return False
    return not need_long or (len(desc.long) >= 20 and any(c.isalpha() for c in desc.long))


def load_packages(
    lists_dir: str | os.PathLike, langs: Sequence[str]
) -> tuple[list[Package], list[str]]:
    """Joins Packages and Translation files of ``lists_dir`` by ``(package, Description-md5)``.

    Each package gets one description version: when the configured suites disagree (a
    security update that changed the text), the one translated into the most languages wins.
    Packages without a usable English description, transitional packages, and translations
    identical to the English text are dropped.

    Returns:
      ``(packages sorted by name, languages asked for but not found)``.

    Raises:
      DebianFormatError: no Translation-en or no Packages file in ``lists_dir`` (the message
        lists what was there), or a malformed file.
    """
    langs = _check_langs(langs)
    packages_files, translation_files = find_lists(lists_dir)
    if "en" not in translation_files or not packages_files:
        where = Path(lists_dir)
        found = sorted(p.name for p in where.iterdir()) if where.is_dir() else []
        raise DebianFormatError(
            f"{lists_dir}: need a '*_i18n_Translation-en' and a '*_binary-<arch>_Packages' file "
            f"(plain or {'/'.join(_COMPRESSED)}); found {found or 'nothing'}. Omit --lists to "
            "fetch them with apt-get."
        )
    missing = [lang for lang in langs if lang not in translation_files]
    sections: dict[str, dict[str, str]] = {}
    for path in packages_files:
        for name, by_md5 in read_packages(path).items():
            for md5, section in by_md5.items():
                sections.setdefault(name, {}).setdefault(md5, section)
    texts: dict[str, dict[tuple[str, str], Description]] = {}
    for lang in langs:
        texts[lang] = {}
        for path in translation_files.get(lang, []):
            for key, desc in read_translations(path).items():
                texts[lang].setdefault(key, desc)

    out = []
    for name in sorted(sections):

        def coverage(md5: str, name: str = name) -> tuple[int, str]:
            # Most languages first; the md5 itself only breaks ties, deterministically.
            return (-sum((name, md5) in texts[lang] for lang in langs), md5)

        md5 = min(sections[name], key=coverage)
        english = texts["en"].get((name, md5))
        if english is None or not _usable(english) or _BOILERPLATE_RE.search(english.short):
            continue
        descs = {"en": english}
        for lang in langs[1:]:
            desc = texts[lang].get((name, md5))
            # A "translation" that repeats the English text is not one.
            if desc is not None and _usable(desc) and desc.full != english.full:
                descs[lang] = desc
        out.append(Package(name, sections[name][md5], split_of(name), descs))
    return out, missing


# ------------------------------------------------------------------------------------------
# Writing


def _write_records(path: Path, records: Iterable[dict]) -> int:
    """Writes validated training records as JSONL, atomically; returns the count."""
    n = 0
    with atomic_open(path) as f:
        for n, record in enumerate(records, 1):
            record = check_record(record, f"{path}:{n}")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return n


# ------------------------------------------------------------------------------------------
# Training tasks


def _round_robin(by_lang: dict[str, list], rng: random.Random) -> Iterator[tuple[str, object]]:
    """Shuffles each language's items and interleaves the languages.

    A uniform sample would be mostly English (it covers every package); interleaving keeps
    a capped task balanced across languages until the small ones run out.
    """
    queues = []
    for lang in sorted(by_lang):
        items = list(by_lang[lang])
        rng.shuffle(items)
        queues.append((lang, iter(items)))
    while queues:
        alive = []
        for lang, it in queues:
            item = next(it, None)
            if item is not None:
                yield lang, item
                alive.append((lang, it))
        queues = alive


def _record(dataset: str, query: str, positive: str, negatives: list[str]) -> dict:
    task, instruction = TRAIN_TASKS[dataset]
    return {
        "query": query,
        "positive": positive,
        "negatives": negatives,
        "task": task,
        "dataset": dataset,
        "instruction": instruction,
    }


def _take(
    dataset: str,
    by_lang: dict[str, list],
    make,
    max_rows: int,
    rng: random.Random,
) -> tuple[list[dict], dict[str, int]]:
    """Builds up to ``max_rows`` deduplicated records from balanced (lang, item) draws."""
    rows, counts, seen = [], defaultdict(int), set()
    for lang, item in _round_robin(by_lang, rng):
        if len(rows) >= max_rows:
            break
        made = make(lang, item)
        if made is None:
            continue
        query, positive, negatives = made
        if (query, positive) in seen or query == positive:
            continue
        seen.add((query, positive))
        rows.append(_record(dataset, query, positive, negatives))
        counts[lang] += 1
    return rows, dict(sorted(counts.items()))


def _train_view(packages: Sequence[Package], allowed: Sequence[str]) -> tuple[list[Package], int]:
    """Train packages with only the descriptions training may use; also how many were cut.

    Names decide the split, but sibling packages share texts (a ``-data`` package repeating
    its program's description, forty cross compilers with one synopsis). A train text equal
    to a dev/test text would put that evaluation text into training, so such descriptions
    are withheld from training too.
    """
    held_out = {
        text
        for p in packages
        if p.split != "train"
        for d in p.descs.values()
        for text in (d.short, d.long, d.full)
        if text
    }
    train, withheld = [], 0
    for p in packages:
        if p.split != "train":
            continue
        descs = {}
        for lang, d in p.descs.items():
            if lang not in allowed:
                continue
            if held_out.isdisjoint((d.short, d.long, d.full)):
                descs[lang] = d
            else:
                withheld += 1
        if descs:
            train.append(Package(p.name, p.section, p.split, descs))
    return train, withheld


def build_train(
    packages: Sequence[Package], langs: Sequence[str], max_per_task: int, seed: int
) -> tuple[dict[str, tuple[list[dict], dict[str, int]]], int]:
    """Makes the four training tasks from train packages in non-reserved languages only.

    Args:
      packages: all packages (dev/test ones included: their texts are kept out of training).
      langs: language codes; reserved ones are ignored here.
      max_per_task: rows per task.
      seed: sampling seed.

    Returns:
      ``({dataset: (records, {lang: count})}, descriptions withheld for sharing a text with
      a dev/test package)``.
    """
    allowed = [lang for lang in _check_langs(langs) if lang not in RESERVED_LANGS]
    train, withheld = _train_view(packages, allowed)
    out = {}

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    # Cross-lingual: a non-English summary must find the English description.
    by_lang = {
        lang: [p for p in train if lang in p.descs and "en" in p.descs]
        for lang in allowed
        if lang != "en"
    }
    out["debian-xling"] = _take(
        "debian-xling",
        by_lang,
        lambda lang, p: (p.descs[lang].short, p.descs["en"].full, []),
        max_per_task,
        rng("debian-xling"),
    )

    def body(lang: str, p: Package):
        en = p.descs["en"]
        return (p.descs[lang].short, en.long, []) if _usable(en, need_long=True) else None

    def mix(lang: str, p: Package):
        coin = random.Random(f"{seed}:debian-xling-mix:{p.name}:{lang}").random() < 0.5
        made = body(lang, p)
        return made if coin and made else (p.descs[lang].short, p.descs["en"].full, [])

    # The same draws (the same seed): what differs is the positive's format.
    for name, make in (("debian-xling-body", body), ("debian-xling-mix", mix)):
        out[name] = _take(name, by_lang, make, max_per_task, rng("debian-xling"))

    # Monolingual: the positive is the body alone, or the query would be in it verbatim.
    by_lang = {
        lang: [p for p in train if lang in p.descs and _usable(p.descs[lang], need_long=True)]
        for lang in allowed
    }
    out["debian-mono"] = _take(
        "debian-mono",
        by_lang,
        lambda lang, p: (p.descs[lang].short, p.descs[lang].long, []),
        max_per_task,
        rng("debian-mono"),
    )

    # Classification: the label texts of all train Sections are the candidate classes.
    labels = sorted({section_label(p.section) for p in train})
    by_lang = {lang: [p for p in train if lang in p.descs] for lang in allowed}
    cls_rng = rng("debian-section:negatives")

    def classify(lang: str, p: Package):
        positive = section_label(p.section)
        others = [label for label in labels if label != positive]
        if not others:
            return None
        return p.descs[lang].full, positive, [cls_rng.choice(others)]

    out["debian-section"] = _take(
        "debian-section", by_lang, classify, max_per_task, rng("debian-section")
    )

    # Clustering: same-Section description as positive, other Sections' as negatives, all in
    # the query's language so the language is no shortcut.
    pools: dict[str, dict[str, list[Package]]] = {}
    for lang in allowed:
        pool: dict[str, list[Package]] = defaultdict(list)
        for p in train:
            if lang in p.descs:
                pool[p.section].append(p)
        pools[lang] = dict(pool)
    clu_rng = rng("debian-cluster:pairs")

    def cluster(lang: str, p: Package):
        pool = pools[lang]
        query = p.descs[lang].full
        others = sorted(s for s in pool if s != p.section)
        # A few draws rather than filtering the whole Section (libs has thousands of members):
        # only near-identical sibling packages (foo, foo-data) make a draw miss.
        positive = None
        for _ in range(8):
            text = clu_rng.choice(pool[p.section]).descs[lang].full
            if text != query:
                positive = text
                break
        if positive is None or not others:
            return None
        negatives = []
        for section in clu_rng.sample(others, min(7, len(others))):
            text = clu_rng.choice(pool[section]).descs[lang].full
            if text not in (query, positive) and text not in negatives:
                negatives.append(text)
        return (query, positive, negatives) if negatives else None

    by_lang = {
        lang: [p for ps in pools[lang].values() if len(ps) > 1 for p in ps] for lang in allowed
    }
    # Pools are dicts keyed by Section; sort so the draw does not depend on insertion order.
    by_lang = {lang: sorted(ps, key=lambda p: p.name) for lang, ps in by_lang.items()}
    out["debian-cluster"] = _take(
        "debian-cluster", by_lang, cluster, max_per_task, rng("debian-cluster")
    )
    return out, withheld


# ------------------------------------------------------------------------------------------
# Evaluation sets


@dataclass
class EvalSet:
    """One BEIR-layout retrieval set."""

    name: str
    corpus: list[dict]
    queries: list[dict]
    qrels: list[tuple[str, str, int]]


def build_eval(
    packages: Sequence[Package],
    split: str,
    langs: Sequence[str],
    max_eval: int,
    max_corpus: int,
    seed: int,
) -> list[EvalSet]:
    """Makes ``xling-<lang>``, ``xling-body-<lang>`` and ``mono-<lang>`` retrieval sets from one
    split's packages: a summary in ``lang`` -> the English description (``xling``: the
    synopsis, a translation of the query, then the body), its body alone (``xling-body``:
    retrieval by what the document says; packages without a body left out), or the body in
    ``lang`` (``mono``).

    Reserved languages are included: these sets are where zero-shot languages get measured.
    Identical corpus texts are stored once, and identical query texts become one query that
    has all their documents as relevant, so no query has a correct answer marked wrong.
    Ids are ``q-<package>`` and ``d-<package>``: BEIR-style evaluators skip hits whose id
    equals the query id.
    """
    pkgs = [p for p in packages if p.split == split]
    langs = _check_langs(langs)
    others = [lang for lang in langs if lang != "en"]
    kinds = [("xling", lang) for lang in others] + [("xling-body", lang) for lang in others]
    kinds += [("mono", lang) for lang in langs]
    sets = []
    for kind, lang in kinds:
        target = lang if kind == "mono" else "en"
        need_long = kind != "xling"

        def doc_text(p: Package, target: str = target, kind: str = kind) -> str:
            return p.descs[target].full if kind == "xling" else p.descs[target].long

        docs = [
            p for p in pkgs if target in p.descs and _usable(p.descs[target], need_long=need_long)
        ]
        askers = [p for p in docs if lang in p.descs]
        if not askers:
            continue
        rng = random.Random(f"{seed}:{split}:{kind}-{lang}")
        doc_id: dict[str, str] = {}  # text -> id of the first package with that text
        for p in docs:
            doc_id.setdefault(doc_text(p), f"d-{p.name}")
        groups: dict[str, list[Package]] = defaultdict(list)
        for p in askers:
            groups[p.descs[lang].short].append(p)
        chosen = sorted(groups)
        rng.shuffle(chosen)
        chosen = chosen[:max_eval]

        queries, qrels, relevant = [], [], set()
        for text in chosen:
            qid = f"q-{groups[text][0].name}"
            queries.append({"_id": qid, "text": text})
            for did in sorted({doc_id[doc_text(p)] for p in groups[text]}):
                qrels.append((qid, did, 1))
                relevant.add(did)
        # Every relevant document, then distractors from the same split up to max_corpus.
        distractors = sorted(set(doc_id.values()) - relevant)
        rng.shuffle(distractors)
        keep = relevant | set(distractors[: max(0, max_corpus - len(relevant))])
        corpus = [
            {"_id": did, "title": "", "text": text}
            for text, did in sorted(doc_id.items(), key=lambda kv: kv[1])
            if did in keep
        ]
        sets.append(EvalSet(f"{kind}-{lang}", corpus, queries, qrels))
    return sets


def _write_eval(root: Path, split: str, s: EvalSet) -> None:
    folder = root / split / s.name
    write_jsonl(folder / "corpus.jsonl", s.corpus)
    write_jsonl(folder / "queries.jsonl", s.queries)
    with atomic_open(folder / "qrels" / f"{split}.tsv") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, did, score in s.qrels:
            f.write(f"{qid}\t{did}\t{score}\n")


# ------------------------------------------------------------------------------------------
# Entry points


def build(
    out_dir: str | os.PathLike,
    lists_dir: str | os.PathLike | None = None,
    langs: Sequence[str] = DEFAULT_LANGS,
    max_per_task: int = DEFAULT_MAX_PER_TASK,
    max_eval: int = DEFAULT_MAX_EVAL,
    max_corpus: int = DEFAULT_MAX_CORPUS,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Builds the training files and evaluation sets; returns the stats also in stats.json.

    Args:
      out_dir: output directory (see the module docstring for its layout).
      lists_dir: apt lists directory that already holds the index files; None fetches them
        with ``fetch_lists`` into ``out_dir/lists``.
      langs: language codes besides English. Those in ``RESERVED_LANGS`` go to evaluation
        sets only.
      max_per_task: rows per training file (a seeded, language-balanced sample).
      max_eval: queries per evaluation set.
      max_corpus: documents per evaluation corpus (relevant ones always kept).
      seed: seeds every sampling decision; same inputs and seed give the same files.
      verbose: say each stage on stderr as it starts, then print the count tables.
    """
    t0 = time.time()

    def stage(what: str) -> None:  # each step takes seconds to minutes: say which one runs
        if verbose:
            print(f"[{time.time() - t0:5.0f}s] {what}", file=sys.stderr, flush=True)

    out_dir = Path(out_dir)
    langs = _check_langs(langs)
    if lists_dir is None:
        stage(f"fetching the package lists (apt-get update, {len(langs)} languages) ...")
        lists_dir = fetch_lists(out_dir / "lists", langs[1:])
    stage(f"reading the Packages and Translation files of {lists_dir} ...")
    packages, missing = load_packages(lists_dir, langs)
    if missing:
        print(f"warning: no Translation-{{{','.join(missing)}}} in {lists_dir}", file=sys.stderr)
    langs = [lang for lang in langs if lang not in missing]

    stats: dict = {
        "lists_dir": str(lists_dir),
        "seed": seed,
        "max_per_task": max_per_task,
        "max_eval": max_eval,
        "max_corpus": max_corpus,
        "langs": {
            "train": [lang for lang in langs if lang not in RESERVED_LANGS],
            "eval": langs,
            "missing": missing,
        },
        "packages": {
            split: sum(p.split == split for p in packages) for split in ("train", "dev", "test")
        },
        "train": {},
        "dev": {},
        "test": {},
    }
    stage(f"{len(packages):,} packages; building the training files ...")
    tasks, stats["withheld_train_descriptions"] = build_train(packages, langs, max_per_task, seed)
    for dataset, (rows, counts) in tasks.items():
        n = _write_records(out_dir / "train" / f"{dataset}.jsonl", rows)
        stats["train"][dataset] = {"task": TRAIN_TASKS[dataset][0], "rows": n, "by_lang": counts}
    for split in ("dev", "test"):
        stage(f"building the {split} evaluation sets ...")
        for s in build_eval(packages, split, langs, max_eval, max_corpus, seed):
            _write_eval(out_dir, split, s)
            stats[split][s.name] = {
                "queries": len(s.queries),
                "corpus": len(s.corpus),
                "qrels": len(s.qrels),
            }
    stats["seconds"] = round(time.time() - t0, 1)
    with atomic_open(out_dir / "stats.json") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if verbose:
        print(format_stats(stats))
    return stats


def format_stats(stats: dict) -> str:
    """The count tables: training rows per task and language, then each evaluation set."""
    langs = stats["langs"]["train"]
    head = f"{'train':<20}{'rows':>7}" + "".join(f"{lang:>7}" for lang in langs)
    lines = [head, "-" * len(head)]
    for dataset, s in stats["train"].items():
        cells = "".join(f"{s['by_lang'].get(lang, 0):>7}" for lang in langs)
        lines.append(f"{dataset:<20}{s['rows']:>7}{cells}")
    lines.append("")
    head = f"{'eval set':<18}{'dev q':>8}{'dev docs':>10}{'test q':>8}{'test docs':>11}"
    lines += [head, "-" * len(head)]
    for name in sorted(set(stats["dev"]) | set(stats["test"])):
        dev, test = stats["dev"].get(name, {}), stats["test"].get(name, {})
        lines.append(
            f"{name:<18}{dev.get('queries', 0):>8}{dev.get('corpus', 0):>10}"
            f"{test.get('queries', 0):>8}{test.get('corpus', 0):>11}"
        )
    p = stats["packages"]
    lines.append(
        f"\npackages: {p['train']} train, {p['dev']} dev, {p['test']} test; "
        f"{stats['withheld_train_descriptions']} train descriptions withheld for sharing a text "
        f"with a dev/test package; {stats['seconds']} s"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line; see ``--help``. Returns the stats that ``build`` returns."""
    parser = cli.parser(
        "examples.debian_retrofit.debian",
        (
            "Build multilingual training records (JSONL) and BEIR retrieval sets from Debian's "
            "translated package descriptions. Split by package name: md5 starting with 'f' is "
            "test, 'e' dev, the rest train. Languages "
            f"{', '.join(sorted(RESERVED_LANGS))} appear in dev/test sets only."
        ),
        epilog=(
            "writes OUT/train/debian-{xling,xling-body,xling-mix,mono,section,cluster}.jsonl, "
            "OUT/{dev,test}/{xling,xling-body,mono}-<lang>/{corpus,queries}.jsonl + "
            "qrels/<split>.tsv, "
            "OUT/stats.json. Example: python -m examples.debian_retrofit.debian --out data/debian "
            "--langs de,fr,es,ja,pl --max-per-task 2000"
        ),
        multihost=False,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--lists",
        metavar="DIR",
        help="apt lists directory already holding *_Packages and *_i18n_Translation-<lang> "
        "files (plain, .gz, .xz, .bz2, .lz4); without it, apt-get update fetches them into "
        "OUT/lists (needs root; uses apt's configured sources)",
    )
    parser.add_argument(
        "--langs",
        default=",".join(DEFAULT_LANGS),
        metavar="L1,L2",
        help="comma-separated language codes besides English (default: %(default)s)",
    )
    parser.add_argument(
        "--max-per-task",
        type=int,
        default=DEFAULT_MAX_PER_TASK,
        metavar="N",
        help="rows per training file, a seeded language-balanced sample (default: %(default)s)",
    )
    parser.add_argument(
        "--max-eval",
        type=int,
        default=DEFAULT_MAX_EVAL,
        metavar="N",
        help="queries per evaluation set (default: %(default)s)",
    )
    parser.add_argument(
        "--max-corpus",
        type=int,
        default=DEFAULT_MAX_CORPUS,
        metavar="N",
        help="documents per evaluation corpus; relevant ones are always kept "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for every sampling choice (default: 0)"
    )
    return cli.main(parser, _main, argv)


def _main(args) -> dict:
    for flag in ("max_per_task", "max_eval", "max_corpus"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    return build(
        args.out,
        lists_dir=args.lists,
        langs=[lang for lang in args.langs.split(",") if lang.strip()],
        max_per_task=args.max_per_task,
        max_eval=args.max_eval,
        max_corpus=args.max_corpus,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
