"""The README's demo section is exactly what bench/demo_section.py makes of the kept demo summary."""

import demo_section
from report import README, with_section


def test_readme_demo_section_is_generated_from_the_kept_summary():
    readme = README.read_text()
    assert with_section(readme, demo_section.BEGIN, demo_section.END, demo_section.render()) == readme, \
        "run: python bench/demo_section.py"
