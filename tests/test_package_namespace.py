"""`attnzoo.mechanisms` stays the registry function after a mechanism module is imported directly."""

import importlib

import attnzoo


def test_importing_a_mechanism_module_keeps_the_function():
    importlib.import_module("attnzoo.mechanisms.local.sliding_window")
    assert callable(attnzoo.mechanisms)
    assert any(m.name == "sliding_window" for m in attnzoo.mechanisms())
