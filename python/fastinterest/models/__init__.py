"""Interest models (DESIGN.md: models/): `InterestModel` (EmbeddingLSTM) and the MLP baseline."""
from .encoder import FIELDS, LSTMEncoder, PooledEncoder, resolve_layers  # noqa: F401
from .interest import InterestModel, MLPInterestModel, as_id_tensors  # noqa: F401
from .scoring import ModelScorer  # noqa: F401
