"""Serving (DESIGN.md: serve/): `Session` — a trained run with per-person LSTM state, numpy in/out, safe
from many threads — and the HTTP service (`fastinterest serve RUN`, `fastinterest.serve.app`)."""
from .events import EncodedEvents, EventEncoder, EventError
from .session import Session
from .state import StateMismatch, StateStore

__all__ = ["EncodedEvents", "EventEncoder", "EventError", "Session", "StateMismatch", "StateStore"]
