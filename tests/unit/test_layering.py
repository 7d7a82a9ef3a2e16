"""Layers and models take tensors only: nothing in seqrec/nn or seqrec/models imports the data, training or
evaluation side (imports flow data/nn -> models -> train/eval -> run)."""

import ast
from pathlib import Path

import pytest

SEQREC = Path(__file__).resolve().parents[2] / "seqrec"
ABOVE_MODELS = ("seqrec.data", "seqrec.train", "seqrec.eval", "seqrec.run", "seqrec.launch", "seqrec.predict")


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a file of `package` imports, anywhere in it (function-local imports too), as absolute names."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from seqrec import data`
    return names


def violations(files) -> list[str]:
    return sorted(
        f"{path.relative_to(SEQREC.parent)} imports {name}"
        for path in files
        for name in imported_modules(path.read_text(), ".".join(path.relative_to(SEQREC.parent).parts[:-1]))
        if any(name == bad or name.startswith(bad + ".") for bad in ABOVE_MODELS)
    )


@pytest.mark.parametrize("layer", ["nn", "models"])
def test_layers_and_models_do_not_import_the_data_or_training_side(layer):
    files = sorted((SEQREC / layer).rglob("*.py"))
    assert files
    assert violations(files) == []


def test_the_check_sees_every_form_of_import():
    sources = {
        "import seqrec.data.windows": "seqrec.data.windows",
        "from seqrec.data.windows import user_time_scale": "seqrec.data.windows",
        "from seqrec import data": "seqrec.data",
        "from ..data import windows": "seqrec.data",
        "def f():\n    from seqrec.train.losses import BCE": "seqrec.train.losses",
    }
    for source, module in sources.items():
        assert module in imported_modules(source, "seqrec.models"), source
    assert imported_modules("from .head import ItemHead", "seqrec.models") == {
        "seqrec.models.head",
        "seqrec.models.head.ItemHead",
    }


def test_the_launcher_does_not_import_the_run_it_launches():
    """seqrec.run imports seqrec.launch; the launcher receives the run function instead of importing it back."""
    source = (SEQREC / "launch.py").read_text()
    assert not {n for n in imported_modules(source, "seqrec") if n == "seqrec.run" or n.startswith("seqrec.run.")}
