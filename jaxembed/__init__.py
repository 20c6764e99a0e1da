"""jaxembed: text-embedding models trained in JAX/Flax NNX.

``enc = jaxembed.load(path)`` loads a local Hugging Face / sentence-transformers folder;
``enc.encode(texts)`` returns float32 unit vectors.
"""

from jaxembed.encoder import Encoder, load

__all__ = ["Encoder", "load"]
__version__ = "0.1.0"
