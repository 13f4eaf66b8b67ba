"""The registry-wide conformance suite: every check of attnzoo.testing on every registered mechanism
and each pattern it declares."""

import pytest

import attnzoo
from attnzoo import testing

CASES = [
    pytest.param(mech, pattern, fn, id=f"{mech.name}-{name}" + (f"-{pattern}" if pattern else ""))
    for mech in attnzoo.list_mechanisms()
    for name, pattern, fn in testing.cases(mech)
]


@pytest.mark.parametrize("mech,pattern,check", CASES)
def test_conformance(mech, pattern, check):
    if pattern is None:
        check(mech)
    else:
        check(mech, pattern)
