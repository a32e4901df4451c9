"""The README's demo sections are exactly what bench/demo_section.py makes of the kept demo summaries."""

import json

import pytest

from bench import demo_section
from bench.report import README, with_section


@pytest.mark.parametrize("kept", [demo_section.SUMMARY, demo_section.MULTI_VECTOR_SUMMARY], ids=lambda p: p.name)
def test_readme_demo_section_is_generated_from_the_kept_summary(kept):
    readme = README.read_text()
    kept_path, begin, end = demo_section.section_of(json.loads(kept.read_text()))
    assert kept_path == kept and begin in readme and end in readme
    assert with_section(readme, begin, end, demo_section.render(kept)) == readme, "run: python -m bench.demo_section"


def test_the_section_names_what_ran(tmp_path):
    """The section's first paragraph is the command line the summary's settings amount to, not "the defaults"."""
    summary = json.loads(demo_section.SUMMARY.read_text())
    assert "`moca-fast demo` took" in " ".join(demo_section.render().split())  # the kept run: the defaults
    summary["run"]["settings"].update(cpt_steps=2, cl_steps=3, device="cpu", seed=5, multi_vector=True, documents=64)
    changed = tmp_path / "summary.json"
    changed.write_text(json.dumps(summary))
    text = " ".join(demo_section.render(changed).split())
    assert (
        "`moca-fast demo --steps 2 3 --device cpu --seed 5 --multi-vector (in code: documents=64)` took" in text
        and "(2 stage-1 and 3 stage-2 steps, seed 5, stage 2 with the multi-vector head" in text
    ), text
