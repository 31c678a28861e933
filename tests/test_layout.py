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
