"""Embeddings for a binary index, on the retrofit recipe: all-MiniLM-L6-v2 trained with the
loss of its +-1 codes added to the float loss.

``loss.quantization="binary"``: each embedding (scaled to unit RMS) is also binarised with
a straight-through estimator (forward: the codes sentence-transformers' quantize_embeddings
deploys; backward: the identity) and the same InfoNCE scores the codes, added to the
float loss with ``loss.quantization_weight`` (1.0: the weights 2 and 4 did no better on
Debian dev, bench/RESULTS.md "Binary quantization-aware training"). The float embeddings
stay good for rescoring; the run's dev evaluations log the index alone and rescored.

Everything else is examples/debian_retrofit/config.py's recipe (mined-linked batch groups,
symmetric InfoNCE with false-negative masking, lr 1e-4, packing, the Cyrillic rewrite), on
its data: build and mine it as that file says (retrofit.sh), then

    .venv/bin/python -m jaxembed.train --config configs/binary.py --workdir runs/binary
    .venv/bin/python -m jaxembed.evaluate --model runs/binary --data data/debian/dev \\
        --quantization binary --rescore-multiplier 4
    .venv/bin/python -m jaxembed.mine --model runs/binary \\
        --input data/debian/train/debian-xling-mix.jsonl --out runs/binary-mined.jsonl
    .venv/bin/python -m jaxembed.convert --checkpoint runs/binary --out exported/binary

The export is a plain sentence-transformers folder (float embeddings);
``quantize_embeddings(model.encode(texts), "ubinary")`` there gives the index evaluated
here. ``loss.quantization="int8"`` trains for an int8 index the same way (the batch's
per-dimension ranges; ``jaxembed.convert --calibration CORPUS`` saves the ranges at export).
"""

from pathlib import Path

from jaxembed.config import load

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "debian_retrofit" / "config.py"


def get_config():
    c = load(str(RECIPE))
    c.loss.quantization = "binary"
    c.loss.quantization_weight = 1.0
    return c
