"""Write the README's demo sections from measured demo summaries: the figures are generated, never typed.

    moca-fast demo && python -m bench.demo_section runs/demo/summary.json   # keep that run, rewrite its section
    python -m bench.demo_section --check                                     # exit 1 if README.md differs (CI)

Two sections: the default demo's (kept as bench/results/demo-cpu.json) and the `--multi-vector` demo's (kept as
bench/results/demo-multi-vector-cpu.json, in the README's multi-vector section); a summary goes to the section of
the settings it ran with. A summary is what `moca-fast demo` wrote: scores, chance from each task's candidate counts,
the wall time, machine, torch version, date and the settings that ran; the section names the command that ran and
shows the summary as the demo prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

from bench.report import RESULTS, write_section
from moca_fast.demo import DemoSettings, format_summary

SUMMARY = RESULTS / "demo-cpu.json"
BEGIN, END = "<!-- demo:begin (bench/demo_section.py writes this) -->", "<!-- demo:end -->"
MULTI_VECTOR_SUMMARY = RESULTS / "demo-multi-vector-cpu.json"
MULTI_VECTOR_BEGIN = "<!-- demo-multi-vector:begin (bench/demo_section.py writes this) -->"
MULTI_VECTOR_END = "<!-- demo-multi-vector:end -->"


def section_of(summary: dict) -> tuple[Path, str, str]:
    """(kept summary, begin marker, end marker) of the section a summary belongs to, by the settings it ran with."""
    if summary["run"]["settings"].get("multi_vector"):
        return MULTI_VECTOR_SUMMARY, MULTI_VECTOR_BEGIN, MULTI_VECTOR_END
    return SUMMARY, BEGIN, END


def demo_command(settings: dict) -> str:
    """The `moca-fast demo` command line that ran, from the settings its summary recorded; settings that no option
    sets (changed in code) follow as key=value. Summaries written before a setting existed lack it: its default."""
    defaults = {f.name: f.default for f in fields(DemoSettings) if f.default is not MISSING}
    ran = {**defaults, **{k: v for k, v in settings.items() if k in defaults}}
    words = ["moca-fast demo"]
    if settings.get("out", "runs/demo") != "runs/demo":
        words.append(f"--out {settings['out']}")
    if (ran["cpt_steps"], ran["cl_steps"]) != (defaults["cpt_steps"], defaults["cl_steps"]):
        words.append(f"--steps {ran['cpt_steps']} {ran['cl_steps']}")
    if ran["device"] is not None:
        words.append(f"--device {ran['device']}")
    if ran["seed"] != defaults["seed"]:
        words.append(f"--seed {ran['seed']}")
    if ran["multi_vector"]:
        words.append("--multi-vector")
    optioned = {"cpt_steps", "cl_steps", "device", "seed", "multi_vector"}
    changed = [f"{k}={v}" for k, v in ran.items() if k not in optioned and v != defaults[k]]
    return " ".join(words) + (f" (in code: {', '.join(changed)})" if changed else "")


def render(summary_path: Path = SUMMARY) -> str:
    summary = json.loads(summary_path.read_text())
    run, settings = summary["run"], summary["run"]["settings"]
    kept, begin, end = section_of(summary)
    minutes, seconds = divmod(round(run["seconds"]), 60)
    heads = ", stage 2 with the multi-vector head and Matryoshka dimensions" if settings.get("multi_vector") else ""
    text = textwrap.fill(
        f"Measured on {run['device']}, {run['date']}, torch {run['torch']}, 5-minute load average "
        f"{run['load_average']} at the end: `{demo_command(settings)}` took {minutes} min {seconds} s "
        f"({settings['cpt_steps']} stage-1 and {settings['cl_steps']} stage-2 steps, seed {settings['seed']}{heads}). "
        "Chance is the expected score of a random ranking, from each task's own candidate counts. Kept in "
        f"`bench/{kept.relative_to(RESULTS.parent)}`.",
        width=116,
    )
    return "\n".join(
        [
            begin,
            text,
            "",
            "```",
            format_summary(summary).strip("\n"),
            "```",
            end,
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", nargs="?", type=Path, help="a demo's summary.json to keep as the measured one")
    parser.add_argument("--check", action="store_true", help="fail if README.md differs from the kept summary")
    args = parser.parse_args()
    if args.summary is not None:
        shutil.copyfile(args.summary, section_of(json.loads(args.summary.read_text()))[0])
    failed = 0
    for kept in (SUMMARY, MULTI_VECTOR_SUMMARY):
        _, begin, end = section_of(json.loads(kept.read_text()))
        failed |= write_section(begin, end, render(kept), check=args.check, fix="python -m bench.demo_section")
    return failed


if __name__ == "__main__":
    sys.exit(main())
