"""Baton's library: wire models, the task state machine, backends and config."""
