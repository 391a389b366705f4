"""Import layering: the library packages never import the modules built on top of them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level modules that build on lora/, util/ and datasets/: those packages must not import them.
UPPER = ("models_vit_lora", "main_finetune_lora", "predict", "checkpoints", "export",
         "engine_finetune")
# The extension points: the registries of fine-tuning methods and of weights formats, which
# the model code asks; above lora/ and util/, below everything in UPPER.
REGISTRIES = ("methods", "weights")
ENTRY_SCRIPT = "main_finetune_lora"


def python_files(*folders: str) -> list[Path]:
    """Every .py file under the given folders of the repository."""
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Absolute module names ``path`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from util import checkpoint` imports the module util.checkpoint.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def top_level(name: str) -> str:
    """'models_vit_lora.x' -> 'models_vit_lora'."""
    return name.split(".")[0]


def test_imported_modules_sees_function_level_and_from_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import a.b\nfrom c import d\n\ndef f():\n    from e.f import g\n"
                      "    import h\nfrom . import rel\n")
    assert imported_modules(source) == {"a.b", "c", "c.d", "e.f", "e.f.g", "h"}


@pytest.mark.parametrize("package", ["lora", "util", "datasets", *REGISTRIES])
def test_library_packages_import_nothing_above_them(package):
    above = UPPER if package in REGISTRIES else (*UPPER, *REGISTRIES)
    offenders = {}
    for path in python_files(package):
        bad = sorted(n for n in imported_modules(path) if top_level(n) in above)
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"{package}/ imports modules built on top of it: {offenders}"


def test_lora_imports_no_other_package_of_the_repository():
    # lora/ is self-contained: a LoRA layer needs torch only.
    for path in python_files("lora"):
        ours = sorted(n for n in imported_modules(path) if top_level(n) in ("util", "datasets"))
        assert not ours, f"{path.relative_to(ROOT)} imports {ours}"


def test_no_module_imports_the_entry_script():
    sources = [p for p in ROOT.glob("*.py")] + python_files("lora", "util", "datasets", "bench",
                                                              "scripts", *REGISTRIES)
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if p.stem != ENTRY_SCRIPT and ENTRY_SCRIPT in map(top_level, imported_modules(p))]
    assert not offenders, f"modules that import the entry script {ENTRY_SCRIPT}: {offenders}"


def test_util_imports_nothing_from_datasets():
    # util/ is what the other packages import: an import of datasets/ would run back up.
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported_modules(p)
                                                   if top_level(n) == "datasets")
                 for p in python_files("util")}
    assert not {k: v for k, v in offenders.items() if v}, offenders
