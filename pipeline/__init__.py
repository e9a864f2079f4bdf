"""Thin DVC stage entry points: read params.yaml, call dddm, write the stage's outputs."""
