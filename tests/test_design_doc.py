"""docs/design.md is true to the code: its module map lists every module of ``opd_kernels`` with
the package modules it really imports, every code reference in it resolves, and its GPU
cost-model tables are what ``opd_kernels/ops/_route.py`` computes."""
import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "opd_kernels"
DESIGN = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
SEARCH = [PKG, ROOT / "opd_train", ROOT / "tests", ROOT / "benchmarks", ROOT / "csrc", ROOT / "docs", ROOT]


# ------------------------------------------------------------------------------ the module map
def _module_file(dotted: str) -> str:
    """``a.b.c`` (within opd_kernels) -> the path of the module that defines it, relative to PKG."""
    parts = dotted.split(".")
    while parts:
        path = PKG.joinpath(*parts)
        if path.with_suffix(".py").is_file():
            return str(path.with_suffix(".py").relative_to(PKG))
        if (path / "__init__.py").is_file():
            return str((path / "__init__.py").relative_to(PKG))
        parts = parts[:-1]
    return "__init__.py"


def package_imports(path: Path) -> set:
    """The opd_kernels modules ``path`` imports (at any depth of its code), as paths relative to PKG."""
    rel = path.relative_to(PKG).with_suffix("")
    pkg = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            prefix = ".".join(base + ([node.module] if node.module else []))
            names = [f"{prefix}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "opd_kernels":
            names = [f"{node.module}.{a.name}"[len("opd_kernels."):] if node.module != "opd_kernels"
                     else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name[len("opd_kernels."):] if a.name != "opd_kernels" else "" for a in node.names
                     if a.name.split(".")[0] == "opd_kernels"]
        found |= {_module_file(n) if n else "__init__.py" for n in names}
    found.discard(str(path.relative_to(PKG)))
    return found


def documented_map() -> dict:
    block = DESIGN.split("<!-- module-map -->", 1)[1].split("<!-- module-map: end -->", 1)[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        imports = set(re.findall(r"`([\w/]+\.py)`", cells[3]))
        rows[cells[0].strip("`")] = imports
    return rows


MODULES = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py"))


def test_module_map_names_every_module():
    assert sorted(documented_map()) == MODULES, "docs/design.md's module map and opd_kernels/ disagree"


@pytest.mark.parametrize("module", MODULES)
def test_module_map_imports_are_the_real_ones(module):
    documented = documented_map().get(module)
    assert documented is not None, f"{module} is missing from docs/design.md's module map"
    assert documented == package_imports(PKG / module), f"the module map's imports of {module} are stale"


# ------------------------------------------------------------------------------ references
def _find_file(name: str):
    for base in SEARCH:
        for cand in (base / name, *(base.rglob(name) if "/" not in name else ())):
            if cand.is_file():
                return cand
    return None


def _defines(path: Path, name: str) -> bool:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return True
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return True
        return False
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


FILE_REFS = sorted(set(re.findall(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|cu|cuh|cpp|h|md|json|sh|png))`", DESIGN)))
NAME_REFS = sorted(set(re.findall(r"`((?:[\w-]+/)*[\w-]+\.(?:py|cu|cuh|cpp))(?::|::)\s*(\w+)", DESIGN)))
DOTTED_REFS = sorted({ref for ref in re.findall(r"`(_?[a-z]\w*)\.(_?\w+)(?:\(|`)", DESIGN)
                      if ref[1] not in ("py", "cu", "cuh", "cpp", "h", "md", "json", "sh", "png")})


def test_the_doc_has_references():
    assert len(FILE_REFS) > 20 and len(NAME_REFS) > 5 and len(DOTTED_REFS) > 10


@pytest.mark.parametrize("name", FILE_REFS)
def test_file_reference_exists(name):
    assert _find_file(name) is not None, f"docs/design.md names `{name}`, which does not exist"


@pytest.mark.parametrize("name,symbol", NAME_REFS, ids=[f"{a}:{b}" for a, b in NAME_REFS])
def test_file_symbol_reference_resolves(name, symbol):
    path = _find_file(name)
    assert path is not None and _defines(path, symbol), f"docs/design.md names `{name}: {symbol}`, which does not exist"


MODULE_FILES = {Path(m).stem if Path(m).stem != "__init__" else Path(m).parent.name: PKG / m for m in MODULES}


@pytest.mark.parametrize("module,symbol", DOTTED_REFS, ids=[f"{a}.{b}" for a, b in DOTTED_REFS])
def test_module_symbol_reference_resolves(module, symbol):
    """``module.name`` where ``module`` is an opd_kernels module (``_stats.rebase``, ``parallel.shard_of``)."""
    if module not in MODULE_FILES:
        pytest.skip(f"`{module}` is not an opd_kernels module (e.g. torch.*, ok.*)")
    assert _defines(MODULE_FILES[module], symbol), f"docs/design.md names `{module}.{symbol}`, which does not exist"


def test_test_names_exist():
    tests_text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    named = set(re.findall(r"`(test_\w+)`", DESIGN)) | set(re.findall(r"::(test_\w+)", DESIGN))
    missing = sorted(n for n in named if f"def {n}(" not in tests_text)
    assert not missing, f"docs/design.md names tests that do not exist: {missing}"


# ------------------------------------------------------------------------------ cost model
def test_cost_model_tables_are_rendered_from_the_model():
    sys.path.insert(0, str(ROOT / "docs"))
    import cost_model

    assert "<!-- cost-model: predictions -->" in DESIGN
    assert cost_model.render(DESIGN) == DESIGN, "docs/design.md's cost tables are stale: run python docs/cost_model.py"
