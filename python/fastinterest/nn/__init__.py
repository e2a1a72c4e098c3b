"""Drop-in modules: `Embedding`, `EmbeddingBag` (embedding.py), `LSTM`, `EmbeddingLSTM` (lstm.py)."""
from .embedding import Embedding, EmbeddingBag  # noqa: F401

try:
    from .lstm import LSTM, EmbeddingLSTM  # noqa: F401
except ModuleNotFoundError as _exc:  # the LSTM family not written yet
    if _exc.name != "fastinterest.nn.lstm":
        raise
