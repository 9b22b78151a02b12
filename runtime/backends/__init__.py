"""Inference backends, one file each; the heavy library is imported only when a backend is activated."""
