"""The README's demo section is exactly what bench/demo_section.py makes of the kept demo summary."""

from bench import demo_section
from bench.report import README, with_section


def test_readme_demo_section_is_generated_from_the_kept_summary():
    readme = README.read_text()
    assert with_section(readme, demo_section.BEGIN, demo_section.END, demo_section.render()) == readme, \
        "run: python -m bench.demo_section"
