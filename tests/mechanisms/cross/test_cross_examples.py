"""The docstring examples of the cross family run (doctest over every module of ``attnzoo.mechanisms.cross``), every
module has one (an example is part of a recipe's documentation, so it must run as written), and the 24 CATALOG papers
of the cross-recipes issue are registered in the family."""

import doctest
import importlib
import pkgutil

import pytest

import attnzoo.mechanisms.cross as family
from attnzoo.registry import mechanisms

MODULES = sorted(info.name for info in pkgutil.iter_modules(family.__path__, prefix=family.__name__ + ".")
                 if not info.name.rsplit(".", 1)[1].startswith("_"))
RECIPES = ("P001", "P003", "P004", "P017", "P021", "P024", "P030", "P038", "P043", "P047", "P054", "P055", "P062",
           "P063", "P084", "P087", "P095", "P099", "P101", "P105", "P106", "P107", "P108", "P112")


def _catalog_ids(module_name: str) -> set[str]:
    return {m.catalog for m in mechanisms(family="cross")
            if m.module is not None and getattr(m.module, "__module__", None) == module_name}


def test_every_recipe_of_the_issue_is_registered_in_the_family():
    found = {m.catalog for m in mechanisms(family="cross")}
    assert set(RECIPES) <= found, f"missing: {sorted(set(RECIPES) - found)}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    assert tests, f"{name} ({sorted(_catalog_ids(name))}): no docstring example (every module shows its use)"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"
