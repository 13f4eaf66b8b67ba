"""Exact softmax attention (the baseline every other mechanism is measured against)."""
