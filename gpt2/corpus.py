"""The built-in `python-docs` corpus: English educational text that every Python installation carries.

Two parts, in this order:
1. `pydoc_data.topics` — the Python Language Reference and library topics that `help("assert")`, `help("if")`, ...
   print (one document per topic, topics sorted by name);
2. the standard library's docstrings, one document per public module: the module docstring, then each public
   function, class and method with its signature and docstring, in source order.

Docstrings are read from the `.py` sources with `ast`, never by importing modules (importing the whole standard
library has side effects, e.g. `antigravity` opens a browser). The text depends on the Python version; for a given
installation it is the same on every run and in the same order.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics
from typing import NamedTuple

# Standard-library folders left out: tests and demos, GUI/IDE code, and packages whose docstrings are mostly
# internal plumbing (codecs tables, installers, the deprecated 2to3). Private modules (leading `_`) are left out too.
SKIPPED_STDLIB_DIRS = frozenset(
    "test tests idlelib turtledemo tkinter lib2to3 ensurepip encodings pydoc_data site-packages dist-packages".split()
)


class Document(NamedTuple):
    source: str  # where the text came from, e.g. "pydoc_data.topics['assert']" or "stdlib json"
    text: str


@functools.lru_cache(maxsize=1)
def python_docs_documents() -> tuple[Document, ...]:
    """The whole corpus, topics first, then modules sorted by dotted name (on Python 3.11: 422 documents,
    1.76 MB of text, 520K GPT-2 tokens). Parsing the sources takes a few seconds, so the result is cached."""
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    return tuple(_topic_documents()) + tuple(stdlib_documents(stdlib_dir))


def _topic_documents() -> Iterator[Document]:
    for name in sorted(topics):
        yield Document(f"pydoc_data.topics[{name!r}]", topics[name])


def stdlib_documents(stdlib_dir: Path) -> Iterator[Document]:
    """One document per public module under `stdlib_dir` that has docstrings, sorted by dotted module name."""
    modules = []
    for folder, subfolders, files in os.walk(stdlib_dir):
        # Prune while walking: the skipped folders (tests above all) hold most of the standard library's files.
        subfolders[:] = [
            d for d in subfolders if d not in SKIPPED_STDLIB_DIRS and not d.startswith(("_", ".")) and "-" not in d
        ]  # `config-3.11-x86_64-linux-gnu` is build data, not a package
        for file in files:
            if not file.endswith(".py") or (file.startswith("_") and file != "__init__.py"):
                continue
            parts = Path(folder, file).relative_to(stdlib_dir).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            if parts:
                modules.append((".".join(parts), Path(folder, file)))
    for module, path in sorted(modules):
        text = _module_text(module, path)
        if text:
            yield Document(f"stdlib {module}", text)


def _module_text(module: str, path: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # e.g. a stray file written for another Python version
        return ""
    sections = []
    if doc := ast.get_docstring(tree):
        sections.append(f"Module {module}\n\n{doc}")
    for node in tree.body:
        sections += _definition_sections(node, module)
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for member in node.body:
                sections += _definition_sections(member, f"{module}.{node.name}")
    return "\n\n\n".join(sections)


def _definition_sections(node: ast.AST, prefix: str) -> list[str]:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
        return []
    doc = ast.get_docstring(node)
    if not doc:
        return []
    if isinstance(node, ast.ClassDef):
        heading = f"class {prefix}.{node.name}"
    else:
        heading = f"{prefix}.{node.name}({ast.unparse(node.args)})"
    return [f"{heading}\n\n{doc}"]
