"""The documentation points at things that exist: every Sphinx-style reference in a docstring
(:func:`...`, :mod:`...`, :class:`...`, :meth:`...`, :data:`...`) resolves, and every relative link in the
README and docs/ names a file of the repository."""
import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import tinybn

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("numba", "mpi4py", "cupy", "torch", "matplotlib")
REFERENCE = re.compile(r":(?:func|mod|class|meth|data|attr):`~?([\w.]+)`")


def _modules():
    yield tinybn
    for info in pkgutil.walk_packages(tinybn.__path__, "tinybn."):
        try:
            yield importlib.import_module(info.name)
        except ModuleNotFoundError as missing:     # a module of an optional extra (numba) where it is not installed
            if missing.name not in OPTIONAL:
                raise


def _docstrings():
    """(where, docstring) for every module, class, function and method of tinybn."""
    for module in _modules():
        yield module.__name__, module.__doc__ or ""
        for name, value in vars(module).items():
            if getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                yield f"{module.__name__}.{name}", value.__doc__ or ""
            if inspect.isclass(value):
                for attribute, member in vars(value).items():
                    member = getattr(member, "__func__", member)
                    if inspect.isfunction(member) or isinstance(member, property):
                        yield f"{module.__name__}.{name}.{attribute}", member.__doc__ or ""


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError as error:
            if getattr(error, "name", None) in OPTIONAL and importlib.util.find_spec(".".join(parts[:split])):
                return True                 # a module of an extra that is not installed here: it is there
            continue
        try:
            for attribute in parts[split:]:
                target = getattr(target, attribute)
        except AttributeError:
            return False
        return True
    return False


def _resolves_from(where: str, target: str) -> bool:
    """As Sphinx reads a reference: absolute, or relative to the enclosing class or module."""
    scopes = [where.rsplit(".", k)[0] for k in range(1, where.count(".") + 1)] + [where]
    return _resolves(target) or any(_resolves(f"{scope}.{target}") for scope in scopes)


def test_every_docstring_reference_resolves():
    broken = [f"{where}: {target}" for where, doc in _docstrings() for target in REFERENCE.findall(doc)
              if not _resolves_from(where, target)]
    checked = sum(len(REFERENCE.findall(doc)) for _, doc in _docstrings())
    assert checked > 20, "the walk found too few references: is it reading the docstrings?"
    assert not broken, "docstring references to nothing:\n  " + "\n  ".join(broken)


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_name_existing_files(page):
    text = (ROOT / page).read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [link for link in links if "://" not in link and not (ROOT / page).parent.joinpath(link).exists()]
    assert not missing, f"{page} links to missing files: {missing}"


COMMAND = re.compile(r"(?:^|[\s`(])(?:python3? (?:-m tinybn|-m pytest|examples/)|(?<!-m )pip install|mpiexec (?:-\S+ \S+ )+python)")


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_every_command_the_docs_show_runs_after_the_readmes_set_up(page):
    """A newcomer ran `python examples/bias_before_bn.py` after the README's set-up and met ModuleNotFoundError:
    the set-up makes .venv and never activates it. Every command that runs tinybn, an example, the tests, pip or
    MPI names the venv's own program."""
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    bare = [f"{page}:{number}: {line.strip()}" for number, line in enumerate(path.read_text().splitlines(), 1)
            if COMMAND.search(line)]
    assert not bare, "\n".join(bare)


def test_the_readmes_reading_path_counts_its_lines_truly():
    """The reading order's line counts are the files' own (a row that names a whole file), and the path stays
    under 1,500 lines, the target that keeps it shorter than DeZero's."""
    rows = re.findall(r"^\| (\d) \| [^|]+ \| ([^|]+) \| (\d+) \|$", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) == 6 and sum(int(count) for *_, count in rows) <= 1500
    for _, where, count in rows:
        link = re.fullmatch(r"\[([\w/.]+)\]\(\1\)", where.strip())
        if link and link.group(1).endswith(".py"):      # a whole file
            assert len((ROOT / link.group(1)).read_text().splitlines()) == int(count), where
