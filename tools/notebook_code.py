"""The one route by which tests, benchmarks and tools reach code defined in a notebook.

A notebook defines its network in a code cell, because the class is the lesson. Code outside
the notebook that needs the class (a unit test of its parameter count, a benchmark of its
training step) loads it from there, so that there is never a second copy to drift:

    from tools import notebook_code
    ResNet = notebook_code.network_class("ResNet.ipynb", "ResNet")
    speedrun = notebook_code.definitions("Speedrun.ipynb")      # every definition, by name

Only definitions run: classes, functions, imports and names bound to literals. Everything else
in a cell (building the data, training, plotting, IPython's `!` and `%` lines) is left out, so
loading takes milliseconds and touches no data. Executing a notebook with settings is
papermill's job (`papermill notebooks/X.ipynb out.ipynb -p EPOCHS 1`), not this module's;
`sections` cuts a notebook down to some of its numbered sections for papermill to execute.
"""
from __future__ import annotations

import ast
import collections
import json
import math
import pathlib
import re

import nbformat
import torch
import torch.nn as nn
import torch.nn.functional as F

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
# The names a notebook's definitions may use without importing them in the same cell.
NOTEBOOK_GLOBALS = {"torch": torch, "nn": nn, "F": F, "math": math,
                    "collections": collections, "OrderedDict": collections.OrderedDict}
MODULE_CLASS = re.compile(r"^class \w+\((?:torch\.)?nn\.Module\):", re.MULTILINE)
SECTION_HEADING = re.compile(r"^## (?:(\d+)\.|\w)", re.MULTILINE)   # "## 4. Training" or "## Summary"
# Each notebook's network as its notebook builds it: notebook file, class, constructor keyword
# arguments, input side in pixels. A new notebook joins the measurements with one line here.
NETWORKS = {
    "CustomCNN": ("CustomCNN.ipynb", "MyNet", {"num_classes": 10}, 32),
    "AlexNet-32": ("AlexNet-32.ipynb", "AlexNet32", {"num_classes": 10}, 32),
    "AlexNet-227": ("AlexNet-227.ipynb", "AlexNet", {"num_classes": 10}, 227),
    "ZFNet": ("ZFNet.ipynb", "ZFNet", {"num_classes": 10}, 224),
    "AlexNet-Flowers": ("AlexNet-Flowers.ipynb", "AlexNet", {"num_classes": 5, "init_weights": True}, 224),
    "LeNet5": ("LeNet5.ipynb", "LeNet5", {"num_classes": 10}, 32),
    "VGG16": ("VGG16.ipynb", "VGG16", {"num_classes": 10}, 32),
    "ResNet": ("ResNet.ipynb", "ResNet", {"depth": 20, "num_classes": 10}, 32),
    "Speedrun": ("Speedrun.ipynb", "SpeedNet", {"widths": (32, 128, 128), "num_classes": 10}, 32),
    "GoogLeNet": ("GoogLeNet.ipynb", "GoogLeNet", {"num_classes": 10}, 32),
    "DenseNet": ("DenseNet.ipynb", "DenseNet", {"num_classes": 10}, 32),
    "MobileNetV2": ("MobileNetV2.ipynb", "MobileNetV2", {"num_classes": 10}, 32),
    "ViT": ("ViT.ipynb", "ViT", {"num_classes": 10}, 32),
}


def is_definition(node: ast.stmt) -> bool:
    """A statement that only defines something: a class, a function, an import, or a name bound
    to a literal. `net = MyNet(num_classes=len(classes)).to(device)` is not one."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        try:
            ast.literal_eval(node.value)
        except ValueError:
            return False
        return True
    return False


def without_magics(source: str) -> str:
    """A code cell's source with IPython's `!` and `%` lines made inert (they only matter on Colab)."""
    return re.sub(r"^(\s*)([%!])", r"\1pass  # \2", source, flags=re.MULTILINE)


def definitions(notebook: str | pathlib.Path, cell_filter=None) -> dict:
    """The definitions of `notebook`'s code cells (a file name in notebooks/ or a path), run in
    order in a namespace that holds torch, nn, F, math and collections; returns the namespace.
    `cell_filter`, a function of a cell's source, picks the cells (all by default)."""
    path = pathlib.Path(notebook) if pathlib.Path(notebook).is_absolute() else NOTEBOOK_DIR / notebook
    namespace = dict(NOTEBOOK_GLOBALS)
    for index, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or (cell_filter and not cell_filter(source)):
            continue
        name = f"{path.name} cell {index}"
        tree = ast.parse(without_magics(source), filename=name)
        tree.body = [node for node in tree.body if is_definition(node)]
        exec(compile(tree, name, "exec"), namespace)
    return namespace


def network_class(notebook: str | pathlib.Path, class_name: str) -> type[nn.Module]:
    """The `nn.Module` subclass `class_name` as `notebook` defines it (the definitions of the
    cells that define an `nn.Module`). Raises `LookupError` when the notebook has no such class."""
    network = definitions(notebook, MODULE_CLASS.search).get(class_name)
    if not (isinstance(network, type) and issubclass(network, nn.Module)):
        raise LookupError(f"{pathlib.Path(notebook).name} defines no nn.Module named {class_name}")
    return network


def build_network(name: str) -> tuple[nn.Module, int]:
    """The network of notebook `name` (a key of `NETWORKS`), freshly initialised, and its input side."""
    notebook, class_name, kwargs, size = NETWORKS[name]
    return network_class(notebook, class_name)(**kwargs), size


def sections(notebook: str | pathlib.Path, numbers) -> nbformat.NotebookNode:
    """`notebook` (a file name in notebooks/ or a path) with only the cells of its sections
    numbered in `numbers`: a cell belongs to the last `## N.` heading in or above it, and an
    unnumbered one (`## Summary`) belongs to none."""
    path = pathlib.Path(notebook) if pathlib.Path(notebook).is_absolute() else NOTEBOOK_DIR / notebook
    cut = nbformat.read(path, as_version=4)
    kept, section = [], None
    for cell in cut.cells:
        headings = SECTION_HEADING.findall(cell.source) if cell.cell_type == "markdown" else []
        if headings:
            section = int(headings[-1]) if headings[-1] else None
        if section in numbers:
            kept.append(cell)
    cut.cells = kept
    return cut
