"""The README's demo section is exactly what bench/demo_section.py makes of the kept demo summary."""

import demo_section


def test_readme_demo_section_is_generated_from_the_kept_summary():
    readme = demo_section.README.read_text()
    assert demo_section.readme_with_section(readme, demo_section.render()) == readme, \
        "run: python bench/demo_section.py"
