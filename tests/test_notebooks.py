"""Every notebook's structure: committed without outputs, the course's sections in order, a
`parameters` cell of plain settings, the Colab cell pinned to the course's release, and the
evaluation protocol (the test split untouched before section 5, evaluation loaders unshuffled).

nbval executes the notebooks themselves (`make test` passes `notebooks/` to pytest), and
tests/quickmode.py checks that each one learns; tests/test_readmes.py checks their prose.
"""
import json
import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SECTIONS = ["Setup", "Data", "Network", "Loss function and optimizer", "Training", "Test accuracy",
            "Per-class accuracy", "Sample predictions", "Save the model", "Predict new images"]
EXPECTED = {"CustomCNN", "AlexNet-32", "AlexNet-227", "ZFNet", "AlexNet-Flowers", "LeNet5", "VGG16", "ResNet", "Speedrun",
            "GoogLeNet", "DenseNet", "MobileNetV2", "ViT", "DDP"}
# What every notebook's parameters cell must let papermill and the environment set.
SETTINGS = {"EPOCHS", "SUBSET", "DATA_DIR", "MODEL_DIR", "RUNS_DIR", "PREDICT_URL", "RESUME", "AMP", "SEED", "NAME"}


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell):
    return "".join(cell["source"])


def headings(path):
    return [h for cell in cells(path) if cell["cell_type"] == "markdown"
            for h in re.findall(r"^## (.+?)\s*$", source(cell), re.M)]


def test_the_course_has_its_notebooks():
    from tools import make_tables
    assert NOTEBOOKS, "no notebooks found"
    assert {p.stem for p in NOTEBOOKS} == EXPECTED == set(make_tables.NOTEBOOK_ORDER)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_or_execution_counts(path):
    for i, cell in enumerate(cells(path)):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_valid_nbformat_with_a_unique_id_for_every_cell(path):
    """nbformat 4.5 gives every cell an id; a cell pasted in without one is only a warning today
    (Jupyter quietly adds one on the next save, a diff nobody asked for) and an error later."""
    import nbformat
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbformat.validate(json.loads(path.read_text(encoding="utf-8")))
    ids = [cell.get("id") for cell in cells(path)]
    assert None not in ids, f"cell {ids.index(None)} has no id"
    assert len(set(ids)) == len(ids), "cell ids repeat"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sections_in_order_and_summary_last(path):
    found = headings(path)
    numbered = [h for h in found if re.match(r"\d+\. ", h)]
    assert numbered[:10] == [f"{n}. {title}" for n, title in enumerate(SECTIONS)]
    extra = [h.split(".")[0] for h in numbered[10:]]
    assert extra == [str(n) for n in range(10, 10 + len(extra))]
    assert found[-1] == "Summary"


def parameters_cell(path) -> dict:
    tagged = [c for c in cells(path) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, f"{len(tagged)} cells tagged parameters"
    return tagged[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_plain_settings_in_section_0(path):
    """papermill injects its -p values after the cell tagged `parameters`: the cell must hold
    only settings (one name, one value, each), and nothing may read a setting before it."""
    import ast

    cell = parameters_cell(path)
    assert cell in section_cells(path, 0), "the parameters cell belongs to section 0"
    tree = ast.parse(source(cell))
    assert all(isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
               for node in tree.body), "the parameters cell holds only NAME = value lines"
    names = {node.targets[0].id for node in tree.body}
    assert SETTINGS <= names, f"missing settings: {sorted(SETTINGS - names)}"
    assert all(name.isupper() for name in names), "settings are named in capitals"
    earlier = "\n".join(source(c) for c in cells(path)[:cells(path).index(cell)] if c["cell_type"] == "code")
    assert not set(re.findall(r"\b[A-Z][A-Z_]+\b", earlier)) & names, "a setting used before its cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_setting(path, caplog):
    """`papermill --help-notebook` lists each setting with its comment; a line it cannot parse
    (a comment holding "=" confuses it) is logged and left out."""
    import ast

    import papermill

    inferred = papermill.inspect_notebook(str(path))
    names = {node.targets[0].id for node in ast.parse(source(parameters_cell(path))).body}
    assert set(inferred) == names and "Unable to parse" not in caplog.text
    assert all(inferred[name]["help"] for name in names), "every setting says what it is in a comment"


def colab_release(path) -> str:
    code = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "code")
    found = re.findall(r"git clone .*--branch (\S+)", code)
    assert len(found) == 1, "the Colab cell clones the course at one pinned release"
    return found[0]


def test_every_colab_cell_and_the_readme_pin_one_release():
    releases = {colab_release(path) for path in NOTEBOOKS}
    assert len(releases) == 1, f"the notebooks pin different releases: {sorted(releases)}"
    readme = (ROOT / "README.md").read_text()
    assert f"/blob/{releases.pop()}/notebooks/" in readme, "the README's Colab link opens the same release"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_source_article_bug_returns(path):
    code = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "code")
    assert "import utils" in code
    assert "torch.load(" not in code, "load checkpoints with utils.load_checkpoint (weights_only)"
    assert ".next()" not in code and "transforms.Scale" not in code


# ---- the evaluation protocol: the test split is opened once, in section 5 ----------------------

TEST_NAMES = {"test_set", "test_loader", "test_files", "test_labels"}


def code_before_section_5(path):
    """The code cells above the '## 5. Test accuracy' heading."""
    cells_before = []
    for cell in cells(path):
        if cell["cell_type"] == "markdown" and re.search(r"^## 5\. Test accuracy", source(cell), re.M):
            return cells_before
        if cell["cell_type"] == "code":
            cells_before.append(source(cell))
    raise AssertionError("no section 5")


def early_test_uses(code: str) -> list[str]:
    """Lines that read a test-split name other than to build the test pipeline (an assignment
    to a test_* name) or to count it (`len(...)`)."""
    import ast

    lines = "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%"))
                      else line for line in code.splitlines())             # IPython magics and shell lines
    tree = ast.parse(lines)
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, (ast.Name, ast.Tuple)) and
                                                {n.id for n in ast.walk(t) if isinstance(n, ast.Name)} & TEST_NAMES
                                                for t in node.targets):
            allowed |= {id(n) for n in ast.walk(node.value)}
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "len":
            allowed |= {id(n) for n in ast.walk(node)}
    return [ast.get_source_segment(lines, node) for node in ast.walk(tree)
            if isinstance(node, ast.Name) and node.id in TEST_NAMES and isinstance(node.ctx, ast.Load)
            and id(node) not in allowed]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_test_split_is_not_touched_before_section_5(path):
    touched = [use for code in code_before_section_5(path) for use in early_test_uses(code)]
    assert not touched, f"test split used before section 5: {touched}"


def test_the_protocol_check_catches_an_early_use():
    assert early_test_uses("train_loader = make(train_set)\nx = test_loader.sample(8)") == ["test_loader"]
    assert early_test_uses("history = utils.train(net, train_loader, test_loader, 1)") == ["test_loader"]
    assert early_test_uses("test_loader = utils.make_loader(test_set, 8)\nprint(len(test_set))") == []


def section_cells(path, number) -> list[dict]:
    """The cells of section `number`, from its '## n.' heading to the next '## ' heading."""
    found, inside = [], False
    for cell in cells(path):
        if cell["cell_type"] == "markdown":
            for heading in re.findall(r"^## (.+?)\s*$", source(cell), re.M):
                inside = heading.startswith(f"{number}. ")
        if inside:
            found.append(cell)
    return found


def make_loader_calls(path):
    """(first argument, shuffle keyword) of every utils.make_loader(...) call in the notebook."""
    import ast

    code = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "code")
    code = re.sub(r"^(\s*)[!%].*$", r"\1pass", code, flags=re.M)       # IPython magics and shell lines
    calls = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "make_loader":
            shuffle = next((k.value for k in node.keywords if k.arg == "shuffle"), None)
            calls.append((ast.unparse(node.args[0]), ast.unparse(shuffle) if shuffle else None))
    return calls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_validation_and_test_loaders_are_never_shuffled(path):
    evaluation = [(data, shuffle) for data, shuffle in make_loader_calls(path) if re.search(r"val|test", data)]
    assert evaluation, "the notebook builds its validation and test loaders with utils.make_loader"
    assert all(shuffle == "False" for _, shuffle in evaluation), evaluation
