"""What every result JSON in bench/results/ carries: the benchmark, device, versions, date, command, shapes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "torchao", "flash-attn", "cut-cross-entropy")
RESULTS = Path(__file__).parent / "results"


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def require_cuda(what: str) -> torch.device:
    """The CUDA device, or exit saying why: CPU timings of GPU code mean nothing, so none is ever reported."""
    if not torch.cuda.is_available():
        sys.exit(
            f"{Path(sys.argv[0]).name} measures {what} on a GPU; there is no CUDA device here "
            "(CPU timings of this code mean nothing)."
        )
    return torch.device("cuda")


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', for result file names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        **{p: package_version(p) for p in PACKAGES},
    }


def command() -> str:
    """The command line that ran this process: `python -m bench.<name> ...` for a bench script (run as a module)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    argv = ["-m", spec.name, *sys.argv[1:]] if spec is not None and spec.name != "__main__" else sys.argv
    return " ".join([Path(sys.executable).name, *argv])


def report(benchmark: str, device: torch.device | str, *, shapes: dict, results, **extra) -> dict:
    return {
        "benchmark": benchmark,
        "device": device_name(device),
        "versions": versions(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command(),
        "shapes": shapes,
        **extra,
        "results": results,
    }


def write_report(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


README = Path(__file__).parent.parent / "README.md"


def with_section(readme: str, begin: str, end: str, section: str) -> str:
    """`readme` with what lies from the marker `begin` to `end` (both included) replaced by `section`."""
    if begin not in readme or end not in readme:
        raise ValueError(f"README.md lacks the markers {begin} ... {end}")
    head, rest = readme.split(begin, 1)
    return head + section + rest.split(end, 1)[1]


def write_section(begin: str, end: str, section: str, *, check: bool, fix: str) -> int:
    """Put `section` between its markers in README.md; with `check`, only say (exit code 1) whether it differs."""
    current = README.read_text()
    wanted = with_section(current, begin, end, section)
    if not check:
        README.write_text(wanted)
    elif wanted != current:
        print(f"README.md's section {begin} is not what its results give: run {fix}", file=sys.stderr)
        return 1
    return 0
