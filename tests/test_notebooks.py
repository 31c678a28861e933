"""Every notebook: committed without outputs, the course's sections in order, quick-mode settings.

(nbval executes the notebooks themselves: `make test` passes `notebooks/` to pytest.)
"""
import json
import pathlib
import re

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
SECTIONS = ["Setup", "Data", "Network", "Loss function and optimizer", "Training", "Test accuracy",
            "Per-class accuracy", "Sample predictions", "Save the model", "Predict new images"]
EXPECTED = {"CustomCNN", "AlexNet-32", "AlexNet-227", "ZFNet", "AlexNet-Flowers"}


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell):
    return "".join(cell["source"])


def headings(path):
    return [h for cell in cells(path) if cell["cell_type"] == "markdown"
            for h in re.findall(r"^## (.+?)\s*$", source(cell), re.M)]


def test_the_course_has_its_notebooks():
    assert NOTEBOOKS, "no notebooks found"
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_or_execution_counts(path):
    for i, cell in enumerate(cells(path)):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i}"


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
