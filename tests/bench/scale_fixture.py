"""67 throw-away copies of existing mechanisms, to check that ``attnzoo bench --quick`` scales to a ~70-entry
registry within its 5-minute budget (not a test; run it by hand):

    attnzoo bench --quick --import tests/bench/scale_fixture.py --import tests/bench/fake_mechanisms.py

The copies reuse the real forms (softmax, sliding_window, sink_window) and the fixture modules of every
layout, so every code path of the harness is exercised at registry scale.
"""

import dataclasses
import importlib.util
import os

from attnzoo import registry

_here = os.path.dirname(os.path.abspath(__file__))
if "bench_fake_module" not in registry._REGISTRY:
    spec = importlib.util.spec_from_file_location("attnzoo_user_fake_mechanisms", os.path.join(_here,
                                                                                          "fake_mechanisms.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

SOURCES = ["softmax", "sliding_window", "sink_window", "bench_fake_module", "bench_fake_grid", "bench_fake_channel"]
for i in range(67):
    src = registry.get(SOURCES[i % len(SOURCES)])
    registry.register(dataclasses.replace(src, name=f"scale_copy_{i:02d}_{src.name}", aliases=()))
