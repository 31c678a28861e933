"""Every notebook: committed without outputs, the course's sections in order, quick-mode settings.

(nbval executes the notebooks themselves: `make test` passes `notebooks/` to pytest.)
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
EXPECTED = {"CustomCNN", "AlexNet-32", "AlexNet-227", "ZFNet", "AlexNet-Flowers", "LeNet5", "VGG16", "ResNet", "Speedrun"}


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell):
    return "".join(cell["source"])


def headings(path):
    return [h for cell in cells(path) if cell["cell_type"] == "markdown"
            for h in re.findall(r"^## (.+?)\s*$", source(cell), re.M)]


def test_the_course_has_its_notebooks():
    from results import make_table
    assert NOTEBOOKS, "no notebooks found"
    assert {p.stem for p in NOTEBOOKS} == EXPECTED == set(make_table.NOTEBOOK_ORDER)
    readme = (ROOT / "README.md").read_text()
    assert all(f"(notebooks/{name}.ipynb)" in readme for name in EXPECTED), "the README lists every notebook"


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_settings_follow_the_environment_and_utils_is_shared(path):
    code = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "code")
    for variable in ("EPOCHS", "SUBSET", "DATA_DIR", "PREDICT_URL", "MODEL_DIR"):
        assert re.search(rf'{variable} = utils\.env_\w+\("{variable}"', code), variable
    assert "import utils" in code and "REPO_URL" in code
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


def section_code(path, number):
    """The code cells of section `number`, from its '## n.' heading to the next '## ' heading."""
    code, inside = [], False
    for cell in cells(path):
        if cell["cell_type"] == "markdown":
            for heading in re.findall(r"^## (.+?)\s*$", source(cell), re.M):
                inside = heading.startswith(f"{number}. ")
        elif inside:
            code.append(source(cell))
    return "\n".join(code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_training_chooses_on_validation_and_can_resume(path):
    code = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "code")
    assert re.search(r"utils\.train\(\w+, train_loader, val_loader,", code)
    assert re.search(r"RESUME = False +# ", code) and "resume=RESUME" in code
    section_5 = section_code(path, 5)
    best = section_5.find("utils.load_checkpoint(files.best")
    first_test = re.search(r"predict_loader\(\w+, test_loader\)", section_5)
    assert best != -1 and first_test and best < first_test.start(), \
        "section 5 loads the checkpoint validation chose, then tests it"


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


# ---- figures in prose come from results/ ---------------------------------------------------------

# Figures the course cites but did not measure, each labelled as a reference where it appears:
# the source articles (CustomCNN 79.43 and 50.54 after one epoch, AlexNet-32 60.80, ZFNet 73.95),
# the original series (LeNet-5 59.31, VGG-16 81.81), kuangliu/pytorch-cifar (VGG-16 92.64),
# He et al. 2015 (ResNet-20/56/110: 91.25, 93.03, 93.39), airbench94 (94.01), hlb-CIFAR10 (94.05).
REFERENCE_FIGURES = {"79.43", "50.54", "60.80", "73.95", "59.31", "81.81", "92.64", "91.25", "93.03",
                     "93.39", "94.01", "94.05"}
FIGURE = re.compile(r"\b(\d{1,3}\.\d{2}) ?%")
ROUNDED_FIGURE = re.compile(r"\b(\d{1,3}\.\d) ?%")   # a figure rounded to one decimal


def measured_figures() -> set[str]:
    import utils
    from results import make_table
    figures = set()
    for name in make_table.NOTEBOOK_ORDER:
        for run in utils.measured_runs(name):
            figures |= {f"{100 * a:.2f}" for a in run["val_acc"]}
            if run.get("test_acc") is not None:
                figures.add(f"{100 * run['test_acc']:.2f}")
            for key, value in run["info"].items():      # e.g. val_acc_by_tta_level, test_acc_without_tta
                if key.startswith(("val_acc", "test_acc")):
                    values = value.values() if isinstance(value, dict) else [value]
                    figures |= {f"{100 * a:.2f}" for a in values}
    for path in (ROOT / "results").glob("*-ablation.json"):             # Speedrun.ipynb's section 10
        figures |= {f"{100 * row['val_acc']:.2f}" for row in json.loads(path.read_text())["rows"]}
    return figures


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_prose_quotes_no_measured_figure(path):
    """The course's own figures are printed from results/ (utils.print_measured_runs), never
    typed into prose, so they cannot drift; prose may cite reference figures only."""
    prose = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")
    assert set(FIGURE.findall(prose)) <= REFERENCE_FIGURES
    rounded = {f"{float(figure):.1f}" for figure in measured_figures() - REFERENCE_FIGURES}
    references = {f"{float(figure):.1f}" for figure in REFERENCE_FIGURES}
    assert not set(ROUNDED_FIGURE.findall(prose)) & (rounded - references)
    code = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "code")
    assert f'utils.print_measured_runs(NAME)' in code and f'NAME = "{path.stem}"' in code


def test_readme_table_is_generated_from_results_and_figures_agree():
    from results import make_table
    assert make_table.table_in_readme() == make_table.rows(), "run: python results/make_table.py"
    readme = (ROOT / "README.md").read_text()
    outside_table = readme.split(make_table.START)[0] + readme.split(make_table.END)[1]
    assert set(FIGURE.findall(outside_table)) <= REFERENCE_FIGURES | measured_figures()


def test_results_carry_no_machine_paths():
    for path in (ROOT / "results").glob("*.json"):
        text = path.read_text()
        assert "/tmp/" not in text and "/home/" not in text and "/work/" not in text, path.name
