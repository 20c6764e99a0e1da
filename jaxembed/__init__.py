"""jaxembed: text-embedding models trained in JAX/Flax NNX.

``enc = jaxembed.load(path)`` loads a local Hugging Face / sentence-transformers folder;
``enc.encode(texts)`` returns float32 unit vectors.
"""

__all__ = ["Encoder", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: a process that needs only the data readers (a Grain worker, a
    # validating process) does not pay for importing JAX and Flax (~2.5 s, ~200 MB).
    if name in __all__:
        from jaxembed import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module 'jaxembed' has no attribute {name!r}")
