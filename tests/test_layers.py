"""The layers point one way: the library (moca_fast) <- the trainers (moca_fast.trainers) <- the wiring (moca_fast.cli,
moca_fast.demo). Read from each module's own import statements, function-level imports included, so a lazy import
that would only run on some path is caught too."""

import ast
import importlib
import importlib.util
import pkgutil
import tomllib
from pathlib import Path

import pytest

import moca_fast

TRAINERS = "moca_fast.trainers"
WIRING = ("moca_fast.cli", "moca_fast.demo")


def declared_packages() -> set[str]:
    """The packages pyproject.toml installs (kernels/ and trainers/ are mapped in as moca_fast.kernels, .trainers)."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    return set(pyproject["tool"]["setuptools"]["packages"])


def _raise(name):
    raise ImportError(f"walking the package: {name} failed to import")


def all_modules() -> list[str]:
    """Every module of every installed package: moca_fast's own folder walked, and the folders mapped in beside it."""
    names = set()
    for package in sorted(declared_packages()):
        root = importlib.import_module(package)
        names.add(package)
        names.update(info.name for info in pkgutil.walk_packages(root.__path__, package + ".", onerror=_raise))
    return sorted(names)


def imported_names(module: str) -> set[str]:
    """What `module`'s source imports, relative imports resolved: each `from X import a` gives X and X.a (a may be
    a submodule)."""
    spec = importlib.util.find_spec(module)
    package = module if spec.submodule_search_locations is not None else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text(), spec.origin)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def reaches(names: set[str], package: str) -> list[str]:
    return sorted(name for name in names if name == package or name.startswith(package + "."))


MODULES = all_modules()


def test_the_walk_finds_every_package_and_the_known_modules():
    found = {name for name in MODULES if importlib.util.find_spec(name).submodule_search_locations is not None}
    assert found == declared_packages(), "a package folder pyproject.toml does not install, or one missing"
    for name in ("moca_fast.embed", "moca_fast.kernels.info_nce", "moca_fast.trainers.loop", *WIRING):
        assert name in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_library_never_imports_the_trainers():
    library = [m for m in MODULES if m not in WIRING and not (m == TRAINERS or m.startswith(TRAINERS + "."))]
    offenders = {m: reaches(imported_names(m), TRAINERS) for m in library}
    assert not {m: names for m, names in offenders.items() if names}


def test_the_trainers_never_import_the_wiring():
    trainers = [m for m in MODULES if m == TRAINERS or m.startswith(TRAINERS + ".")]
    offenders = {m: [name for wiring in WIRING for name in reaches(imported_names(m), wiring)] for m in trainers}
    assert not {m: names for m, names in offenders.items() if names}


def test_relative_imports_are_resolved():
    """The checks above see `from .trainers.run import run` in moca_fast/cli.py as moca_fast.trainers.run."""
    assert "moca_fast.trainers.run" in imported_names("moca_fast.cli")
    assert "moca_fast.config" in imported_names("moca_fast.parallel.parallelize")
    assert moca_fast.__name__ in {name.rpartition(".")[0] for name in imported_names("moca_fast.corpus")}
