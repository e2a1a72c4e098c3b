"""Serving (DESIGN.md: serve/): `Session` — a trained run with per-person LSTM state, numpy in/out, safe
from many threads — and the HTTP service (`fastinterest serve RUN`, `fastinterest.serve.app`)."""
from .eventlog import EventLog, LogCorrupt
from .events import EncodedEvents, EventEncoder, EventError
from .session import Session
from .state import StateMismatch, StateStore

__all__ = ["EncodedEvents", "EventEncoder", "EventError", "EventLog", "LogCorrupt", "Session", "StateMismatch",
           "StateStore"]
