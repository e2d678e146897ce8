"""The package's layering, read from the source with ``ast`` (nothing is imported).

* Import direction: a module of sub-package X imports only X itself and
  sub-packages of strictly lower rank (``core``, ``storage``, ``models``,
  ``data``, ``interop`` < ``parallel`` < ``sfpk`` < ``pruners``, ``train`` <
  ``tools``); ``sfpk_jax/__init__.py``, the public API, may import anything.
  Imports inside functions count too: a lazy import is still a dependency.
* The library is not the application: no module of ``sfpk_jax`` imports the
  ``experiments`` or ``benchmarks`` packages, and none names a command-line
  flag (``--resume``, ...) in its code or messages.
* Size: no module is longer than :data:`MAX_LINES` lines.
* Docstrings: every module has one, with a non-empty first line.
* Every ``docs/*.md`` named in the package's source exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "sfpk_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 420

RANKS = {
    "runtime": 0,
    "interop": 1,
    "core": 1,
    "storage": 1,
    "models": 1,
    "data": 1,
    "parallel": 2,
    "sfpk": 3,
    "pruners": 4,
    "train": 4,
    "tools": 5,
}
# The application's packages, beside the library.
APPLICATION = ("experiments", "benchmarks")

# What ``import sfpk_jax`` / ``from sfpk_jax import <public name>`` is reported as.
API = "sfpk_jax (the public API)"

MODULES = sorted(ROOT.rglob("*.py"))
TESTS = Path(__file__).resolve().parent


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` in ``module``."""
    base = module.split(".")
    # A package's __init__ is its own anchor for one dot; a plain module's parent is.
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _is_subpackage(name: str, root: Path) -> bool:
    return name in RANKS or (root / name / "__init__.py").is_file() or (root / f"{name}.py").is_file()


def imported_subpackages(path: Path, root: Path = ROOT) -> set[str]:
    """The ``sfpk_jax`` sub-packages (first component below it) that ``path`` imports.

    Counts ``import sfpk_jax.X``, ``from sfpk_jax.X... import``, ``from
    sfpk_jax import X`` and relative imports, at any depth of the syntax tree
    (imports inside functions included). ``import sfpk_jax`` and ``from
    sfpk_jax import <public name>`` import the public API, reported as
    :data:`API`.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path, root)
    found: set[str] = set()

    def add(name: str) -> None:
        parts = name.split(".")
        if parts[0] != PACKAGE:
            return
        found.add(parts[1] if len(parts) > 1 else API)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
            else:
                source = node.module or ""
            if source == PACKAGE:
                # ``from sfpk_jax import X``: a sub-package, or a name of the public API.
                for alias in node.names:
                    add(f"{PACKAGE}.{alias.name}" if _is_subpackage(alias.name, root) else PACKAGE)
            else:
                add(source)
    return found


def layering_violations(root: Path = ROOT) -> list[str]:
    """``module: imports X (rank a -> rank b)`` for every import that goes up or sideways.

    Importing the public API (``sfpk_jax/__init__.py``) counts as importing
    everything it imports: its rank is the highest of theirs.
    """
    api_imports = imported_subpackages(root / "__init__.py", root) - {API}
    ranks = dict(RANKS)
    ranks[API] = max((RANKS.get(x, max(RANKS.values())) for x in api_imports), default=0)
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        parts = module.split(".")
        if len(parts) == 1:
            continue  # sfpk_jax/__init__.py: the public API may import anything
        own = parts[1]
        if own not in RANKS:
            problems.append(f"{module}: sub-package {own!r} has no rank in RANKS")
            continue
        for other in sorted(imported_subpackages(path, root) - {own}):
            if other not in ranks:
                problems.append(f"{module}: imports {other} (rank {RANKS[own]} -> no rank)")
            elif ranks[other] >= RANKS[own]:
                problems.append(f"{module}: imports {other} (rank {RANKS[own]} -> rank {ranks[other]})")
    return problems


def test_every_subpackage_has_a_rank():
    subpackages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(RANKS), (
        f"sub-packages without a rank: {sorted(subpackages - set(RANKS))}; "
        f"ranked but missing: {sorted(set(RANKS) - subpackages)}"
    )


def test_imports_only_go_down_the_layers():
    problems = layering_violations()
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_module_size():
    too_long = []
    for path in MODULES:
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            too_long.append(f"{_module_name(path)}: {lines} lines")
    assert not too_long, f"modules over {MAX_LINES} lines:\n" + "\n".join(too_long)


def test_every_module_has_a_docstring():
    missing = []
    for path in MODULES:
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if doc is None:
            missing.append(f"{_module_name(path)}: no docstring")
        elif not doc.split("\n", 1)[0].strip():
            missing.append(f"{_module_name(path)}: empty first docstring line")
    assert not missing, "\n".join(missing)


# --- the checker itself: it must catch what it claims to catch -------------------


@pytest.mark.parametrize(
    "source, module_path, expected",
    [
        ("from sfpk_jax.sfpk.config import SFPKConfig\n", "core/x.py", {"sfpk"}),
        ("import sfpk_jax.tools.plots\n", "core/x.py", {"tools"}),
        ("from sfpk_jax import tools\n", "core/x.py", {"tools"}),
        ("def f():\n    from sfpk_jax.train import loop\n", "core/x.py", {"train"}),
        ("from ..pruners import registry\n", "core/x.py", {"pruners"}),
        ("from . import channels\n", "core/__init__.py", {"core"}),
        ("import jax\nimport numpy\n", "core/x.py", set()),
        ("import sfpk_jax\n", "core/x.py", {API}),
        ("from sfpk_jax import prune\n", "core/x.py", {API}),
    ],
)
def test_checker_sees_every_import_form(tmp_path, source, module_path, expected):
    path = tmp_path / PACKAGE / module_path
    path.parent.mkdir(parents=True)
    path.write_text(source)
    assert imported_subpackages(path, tmp_path / PACKAGE) == expected


def test_checker_flags_a_sideways_import(tmp_path):
    # Two rank-1 packages may not import each other; the message names both ranks.
    root = tmp_path / PACKAGE
    (root / "core").mkdir(parents=True)
    (root / "core" / "bad.py").write_text('"""Doc."""\nfrom sfpk_jax.data import load\n')
    (root / "__init__.py").write_text('"""API."""\nfrom sfpk_jax.tools import runs\n')
    assert layering_violations(root) == ["sfpk_jax.core.bad: imports data (rank 1 -> rank 1)"]


def test_checker_ranks_the_public_api_as_what_it_imports(tmp_path):
    # The API imports pruners (rank 4): tools (5) may import it, train (4) may not.
    root = tmp_path / PACKAGE
    for sub in ("pruners", "train", "tools"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text('"""Doc."""\n')
    (root / "__init__.py").write_text('"""API."""\nfrom sfpk_jax.pruners import prune\n')
    for sub in ("train", "tools"):
        (root / sub / "user.py").write_text('"""Doc."""\nfrom sfpk_jax import prune\n')
    assert layering_violations(root) == [f"sfpk_jax.train.user: imports {API} (rank 4 -> rank 4)"]


def test_docs_named_in_the_source_exist():
    # Docstrings and error messages send readers to docs/*.md; a moved or
    # missing page leaves them at a dead end.
    missing = []
    for path in MODULES:
        for page in sorted(set(re.findall(r"docs/[\w./-]+\.md", path.read_text()))):
            if not (ROOT.parent / page).is_file():
                missing.append(f"{_module_name(path)}: {page}")
    assert not missing, "docs named but missing:\n" + "\n".join(missing)


def test_the_library_does_not_import_the_application():
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{_module_name(path)}: {n}" for n in names if n.split(".")[0] in APPLICATION]
    assert not found, "the library imports the application:\n" + "\n".join(found)


# A command-line flag in a string: "--resume", "--particle-mode"; XLA's own
# flags (--xla_...) are program settings, not the user's command line.
_FLAG = re.compile(r"(?<![\w-])--(?!xla_)[a-z][a-z0-9]*(-[a-z0-9]+)*\b")


def test_the_library_names_no_command_line_flag():
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += [f"{_module_name(path)}:{node.lineno}: {m.group(0)}"
                          for m in _FLAG.finditer(node.value)]
    assert not found, "flags named in the library:\n" + "\n".join(found)


def test_the_flag_check_sees_flags_and_spares_xla_settings():
    assert [m.group(0) for m in _FLAG.finditer("rerun with --resume or --particle-mode loop")] == [
        "--resume", "--particle-mode"]
    assert not list(_FLAG.finditer("--xla_cpu_multi_thread_eigen=false, x--y, -- z"))
