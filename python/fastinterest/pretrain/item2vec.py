"""item2vec (Barkan & Koenigstein, 2016): word2vec on behaviour sequences, via gensim.

Each person's training sequence of item (or category) ids is a "sentence". Vectors come back as a
[V, D] float32 array aligned to our vocabulary: row i is the vector of id i; ids never seen in the
training sequences (padding, unknown, cold items) get a zero row (the model keeps its own random
initialisation for those rows, see `InterestModel.load_pretrained`).
"""
from __future__ import annotations

import zlib

import numpy as np

__all__ = ["train_item2vec"]


def _stable_hash(s) -> int:
    # gensim seeds each word's initial vector with hashfxn(word + str(seed)); Python's hash() of a str
    # changes per process (PYTHONHASHSEED), so use a stable one for reproducible vectors
    return zlib.crc32(str(s).encode())


def train_item2vec(sequences, vocab_size: int, dim: int = 64, *, window: int = 5, sg: bool = True,
                   negative: int = 5, epochs: int = 5, min_count: int = 1, seed: int = 0,
                   workers: int = 1) -> np.ndarray:
    """Train word2vec (skip-gram when sg=True, else CBOW) and return [vocab_size, dim] float32 vectors.

    sequences: iterable of 1-D integer arrays (ids into the vocabulary; ids 0/1 = pad/unk are dropped).
    workers=1 makes the result deterministic for a given seed.
    """
    from gensim.models import Word2Vec

    sentences = [[str(int(i)) for i in s if int(i) >= 2] for s in sequences]
    sentences = [s for s in sentences if s]
    out = np.zeros((vocab_size, dim), dtype=np.float32)
    if not sentences:
        return out
    model = Word2Vec(sentences=sentences, vector_size=dim, window=window, sg=int(bool(sg)), negative=negative,
                     min_count=min_count, epochs=epochs, seed=seed, workers=workers, hashfxn=_stable_hash)
    for word, idx in model.wv.key_to_index.items():
        out[int(word)] = model.wv.vectors[idx]
    return out
