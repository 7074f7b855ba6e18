"""The documentation points at things that exist: every Sphinx-style reference in a docstring
(:func:`...`, :mod:`...`, :class:`...`, :meth:`...`, :data:`...`) resolves, and every relative link in the
README and docs/ names a file of the repository."""
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import tinybn

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r":(?:func|mod|class|meth|data|attr):`~?([\w.]+)`")


def _modules():
    yield tinybn
    for info in pkgutil.walk_packages(tinybn.__path__, "tinybn."):
        yield importlib.import_module(info.name)


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
        except ImportError:
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
