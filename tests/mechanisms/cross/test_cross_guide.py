"""docs/cross.md is generated from the registry (attnzoo.mechanisms.cross.guide): the committed page is up to date,
every record of the family is placed under a job and in the table with its build call, the build calls build, and the
records declared as sharing an implementation do build the same module class."""

import torch

import attnzoo
from attnzoo.mechanisms.cross.guide import DOC, JOBS, SHARED, family_records, guide_markdown
from attnzoo.testing import Sizes


def test_committed_page_is_the_generated_one():
    assert DOC.exists(), "docs/cross.md missing: python -m attnzoo.mechanisms.cross.guide --write"
    assert DOC.read_text() == guide_markdown(), (
        "docs/cross.md is stale: run `PYTHONPATH=src python -m attnzoo.mechanisms.cross.guide --write`")


def test_every_record_has_a_job_and_a_row():
    recs = family_records()
    assert len(recs) >= 41
    placed = {n for _, _, names in JOBS for n in names}
    assert placed <= set(recs), f"unknown records in JOBS: {sorted(placed - set(recs))}"
    assert set(recs) <= placed, f"records without a job: {sorted(set(recs) - placed)}"
    page = guide_markdown()
    for name in recs:
        assert f'| `{name}` |' in page and f'attnzoo.build("{name}", dim, heads)' in page


def test_shared_implementations_are_one_class():
    for alias, impl, why in SHARED:
        assert why
        mods = []
        for name in (alias, impl):
            s = Sizes.of(attnzoo.get(name))
            torch.manual_seed(0)
            mods.append(attnzoo.build(name, s.dim, s.heads, **attnzoo.get(name).test_options))
        assert type(mods[0]) is type(mods[1]), f"{alias} does not share {impl}'s implementation"
