"""The registry listing is `attnzoo.list_mechanisms()`; `attnzoo.mechanisms` is the package of mechanism files.
Importing a mechanism module directly changes neither."""

import importlib
import types

import attnzoo


def test_importing_a_mechanism_module_keeps_the_listing():
    importlib.import_module("attnzoo.mechanisms.local.sliding_window")
    assert isinstance(attnzoo.mechanisms, types.ModuleType)
    assert any(m.name == "sliding_window" for m in attnzoo.list_mechanisms())
