"""tools/notebook_code.py, the one route from tests and benchmarks into a notebook's code, and
papermill, the route for running a whole notebook with other settings."""
import json
import os
import pathlib

import nbformat
import pytest
import torch

import utils
from tools import notebook_code


def test_network_class_is_the_class_the_notebook_defines():
    network_class = notebook_code.network_class("CustomCNN.ipynb", "MyNet")
    network = network_class(num_classes=10)
    assert utils.count_parameters(network) == 5_499_434
    with torch.no_grad():
        assert network.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", list(notebook_code.NETWORKS))
def test_every_listed_network_builds(name):
    network, size = notebook_code.build_network(name)
    assert isinstance(network, torch.nn.Module) and size in (32, 224, 227)


def write_notebook(path: pathlib.Path, *sources: str) -> pathlib.Path:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nbformat.write(notebook, path)
    return path


def test_only_definitions_run(tmp_path):
    """Instantiating, training and Colab's shell lines are left out; literals and imports stay."""
    path = write_notebook(
        tmp_path / "Tiny.ipynb",
        "import sys\n!git clone nothing\n%cd nowhere\nWIDTHS = (4, 8)\nraise SystemExit('not a definition')",
        "class Tiny(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(*WIDTHS)\n\nnet = Tiny().to(device)   # device is not defined here")
    namespace = notebook_code.definitions(path)
    assert namespace["WIDTHS"] == (4, 8) and "net" not in namespace and "sys" in namespace
    assert utils.count_parameters(namespace["Tiny"]()) == 4 * 8 + 8


def test_a_class_the_notebook_does_not_define_is_a_lookup_error(tmp_path):
    path = write_notebook(tmp_path / "Empty.ipynb", "NUMBER = 1")
    with pytest.raises(LookupError, match="Empty.ipynb defines no nn.Module named Missing"):
        notebook_code.network_class(path, "Missing")


def test_papermill_runs_a_notebook_with_settings_and_amp_is_one_of_them(tmp_path):
    """The course's way to run a long recipe: `papermill ... -p EPOCHS 2 -p AMP True`. LeNet5 on
    the generated data, with mixed precision (bfloat16 on the CPU) switched on as a setting."""
    import papermill

    model_dir = tmp_path / "model"
    environment = {**os.environ, "MODEL_DIR": str(model_dir), "RUNS_DIR": str(tmp_path / "runs")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        papermill.execute_notebook(utils.REPO_DIR / "notebooks" / "LeNet5.ipynb", tmp_path / "out.ipynb",
                                   parameters={"EPOCHS": 2, "AMP": True, "SEED": 1},
                                   cwd=str(utils.REPO_DIR / "notebooks"), progress_bar=False)
    history = json.loads((model_dir / "LeNet5_history.json").read_text())
    assert len(history["epoch"]) == 2 and history["info"]["amp"] == "bfloat16"
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "AMP = True" in injected[0].source


def test_sections_keeps_only_the_numbered_sections_asked_for(tmp_path):
    markdown, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    cells = [markdown("# Title\n\n## 0. Setup"), code("setup = 0"), markdown("## 1. Data"), code("data = 1"),
             markdown("## 2. Network"), code("net = 2"), markdown("More on the network"), code("net2 = 2"),
             markdown("## 10. Ablation"), code("ablation = 10"), markdown("## Summary"), code("summary = None")]
    path = tmp_path / "Sections.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    kept = [cell.source for cell in notebook_code.sections(path, (0, 2, 10)).cells]
    assert kept == ["# Title\n\n## 0. Setup", "setup = 0", "## 2. Network", "net = 2", "More on the network",
                    "net2 = 2", "## 10. Ablation", "ablation = 10"]
    assert [cell.source for cell in notebook_code.sections(path, (1,)).cells] == ["## 1. Data", "data = 1"]
