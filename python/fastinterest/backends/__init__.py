"""Backend implementations. Importing this package registers every implementation with _dispatch.

Each op family has one module per backend (`reference_<op>.py`, `ext_<op>.py`; Triton and Numba
kernels live in `fastinterest.triton` / `fastinterest.numba`) and a `registry_<op>.py` that
registers them. Adding an op family = adding its registry module to `_FAMILIES`.
"""
import importlib

_FAMILIES = ["embedding", "lstm"]

for _fam in _FAMILIES:
    try:
        importlib.import_module(f"fastinterest.backends.registry_{_fam}")
    except ModuleNotFoundError as _exc:  # a family not written yet
        if _exc.name != f"fastinterest.backends.registry_{_fam}":
            raise
