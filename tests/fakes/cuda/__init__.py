"""Fake ``cuda`` namespace (cuda-python); see ``cuda.bindings.runtime``."""
