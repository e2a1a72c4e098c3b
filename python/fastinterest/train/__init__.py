"""Training (DESIGN.md: train/): `Trainer`, `TrainConfig`, run-directory checkpoints (safetensors + JSON)."""
from .checkpoint import FORMAT, FORMAT_VERSION, latest_checkpoint, load_checkpoint, read_config  # noqa: F401
from .trainer import InterestLoss, TrainConfig, Trainer, vocab_sizes  # noqa: F401
