"""utils.py reads top to bottom: every module-level name a definition uses is defined above it."""
import ast
import pathlib

UTILS = pathlib.Path(__file__).parent.parent / "utils.py"


def used_before_defined(source: str) -> list[str]:
    tree = ast.parse(source)
    top_level = {}
    for index, node in enumerate(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top_level[node.name] = index
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    top_level.setdefault(target.id, index)
    problems = []
    for index, node in enumerate(tree.body):
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and inner.id not in local and top_level.get(inner.id, -1) > index:
                problems.append(f"line {inner.lineno}: {inner.id} is defined below")
    return problems


def test_utils_uses_nothing_above_its_definition():
    assert used_before_defined(UTILS.read_text()) == []


def test_the_check_finds_a_forward_use():
    assert used_before_defined("def a():\n    return b()\n\ndef b():\n    return 1\n") == ["line 2: b is defined below"]


def private_uses_of_utils(source: str) -> list[str]:
    """`utils._name` anywhere in `source`: a private name of utils.py used from outside it."""
    tree = ast.parse(source)
    return [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "utils" and node.attr.startswith("_")]


def test_nothing_outside_utils_calls_its_private_names():
    import json
    import re

    root = UTILS.parent
    sources = {path: path.read_text() for folder in ("tests", "benchmarks", "tools")
               for path in (root / folder).glob("*.py")}
    for path in (root / "notebooks").glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        sources[path] = re.sub(r"^(\s*)[!%].*$", r"\1pass", code, flags=re.M)     # IPython lines
    found = {path.name: names for path, source in sources.items() if (names := private_uses_of_utils(source))}
    assert found == {}
    assert private_uses_of_utils("import utils\nutils._hidden()") == ["_hidden"]


def test_results_hold_data_and_the_lab_book_only():
    kinds = {path.suffix for path in (UTILS.parent / "results").iterdir()}
    assert kinds <= {".json", ".png", ".md"}, kinds
