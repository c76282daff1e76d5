"""Test fixtures: tiny random-weight VLMs of every supported family and inputs laid out for them."""

from csp_compile.testing.tiny_vlms import FAMILIES, build_tiny_vlm, family_of, make_inputs

__all__ = ["FAMILIES", "build_tiny_vlm", "family_of", "make_inputs"]
