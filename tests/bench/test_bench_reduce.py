"""attnzoo bench reduce end to end on its fastest section (the digits ViT, 2 training epochs): every budget has the
random and pooling baselines beside each method, tokens kept match the budget, the report files are written."""

import json

import pytest

from attnzoo.bench import reduce as R
from attnzoo.cli import main


def test_bench_reduce_digits_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "reduce"
    rc = main(["bench", "reduce", "--sections", "digits", "--keeps", "0.5", "0.25", "--quick",
               "--digits-epochs", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == R.SCHEMA and not res["errors"]
    for keep in (0.5, 0.25):
        rows = {r["method"]: r for r in res["rows"] if r["keep"] == keep}
        assert {"fastervlm", "vtc_cls", "tome", "random", "pool"} <= set(rows)
        for r in rows.values():
            assert r["tokens_kept"] == 16 * keep and 0 <= r["accuracy"] <= 1 and r["time_ms"] > 0
    for name in ("summary.md", "report.html", "quality_vs_tokens.png"):
        assert (out / name).exists()
    md = (out / "summary.md").read_text()
    assert "random (baseline)" in md and "pool (baseline)" in md


def test_bench_reduce_rejects_bad_keeps():
    with pytest.raises(ValueError, match="--keeps"):
        R.run(R.parser().parse_args(["--keeps", "1.5", "--sections", "digits"]))
