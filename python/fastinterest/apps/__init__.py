"""Applications on a trained run (DESIGN.md: apps/): `Run` (load a run dir for inference; serving reuses
it) and `InterestApp` (predict interests, recommend, target users, similar users, explain)."""
from .interests import InterestApp, cosine_top_k  # noqa: F401
from .run import ArrayBatch, Run  # noqa: F401
