"""The course's prose, checked for structure and for its figures, never for its wording.

- README.md is the front door: at most 150 lines, one link to the lab book.
- Every relative link in README.md, the lab book and the notebooks' prose leads to a file that
  exists and, with a `#anchor`, to a heading in it.
- A figure with two decimals (89.34 %) is either measured, and then it comes from results/, or
  cited, and then a bracketed source follows it at once: `94.01 % [airbench94]` or
  `91.25 % ([He et al. 2015](https://arxiv.org/abs/1512.03385))`. Notebook prose quotes no
  measured figure at all: the notebooks print them from results/ (`utils.print_measured_runs`).
"""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LAB_BOOK = ROOT / "results" / "README.md"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_README_LINES = 150
FIGURE = re.compile(r"\b(\d{1,3}\.\d{2}) ?%")
ROUNDED_FIGURE = re.compile(r"\b(\d{1,3}\.\d) ?%")
CITATION = re.compile(r" ?\(?\[")                      # what follows a cited figure at once
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(path: pathlib.Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


def uncited(pattern: re.Pattern, text: str) -> set[str]:
    """The figures `pattern` finds in `text` that no bracketed source follows."""
    return {m.group(1) for m in pattern.finditer(text) if not CITATION.match(text, m.end())}


def measured_figures() -> set[str]:
    """Every accuracy the course measured, as it prints them: results/*.json to two decimals."""
    figures = set()

    def collect(value, key=""):
        if isinstance(value, dict):
            for k, v in value.items():
                collect(v, k if k.startswith(("val_acc", "test_acc", "train_acc", "acc")) else key)
        elif isinstance(value, list):
            for v in value:
                collect(v, key)
        elif key and isinstance(value, float) and 0 <= value <= 1:
            figures.add(f"{100 * value:.2f}")

    for path in (ROOT / "results").glob("*.json"):
        collect(json.loads(path.read_text()))
    return figures


def test_the_collector_finds_figures_where_the_results_keep_them():
    assert {"89.34", "90.02"} <= measured_figures()               # ResNet's 90- and 120-epoch test reads
    assert all(re.fullmatch(r"\d{1,3}\.\d{2}", figure) for figure in measured_figures())


def test_citations_are_told_from_claims():
    text = "ours 89.34 %, theirs 94.01 % [airbench94] and 91.25 % ([He et al.](https://arxiv.org))"
    assert uncited(FIGURE, text) == {"89.34"}


def test_readme_is_a_front_door_that_links_the_lab_book_once():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    assert len(re.findall(r"\]\(results/README\.md[#)]", text)) == 1
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in text, f"the README's course map lacks {path.name}"


@pytest.mark.parametrize("path", [README, LAB_BOOK], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_in_the_readmes_is_measured_or_cited(path):
    unknown = uncited(FIGURE, prose(path)) - measured_figures()
    assert not unknown, f"figures neither in results/ nor cited: {sorted(unknown)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_prose_quotes_no_measured_figure(path):
    text = prose(path)
    assert not uncited(FIGURE, text), "a figure in prose: print it from results/, or cite its source"
    rounded = {f"{float(figure):.1f}" for figure in measured_figures()}
    assert not uncited(ROUNDED_FIGURE, text) & rounded, "a measured figure, rounded, in prose"


def headings(path: pathlib.Path) -> set[str]:
    """The anchors of the Markdown headings of a file or notebook: GitHub's (`#5-test-accuracy`)
    and, in a notebook, Jupyter's (`#5.-Test-accuracy`)."""
    titles = re.findall(r"^#+ (.+?)\s*$", prose(path), flags=re.M)
    anchors = {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles}
    if path.suffix == ".ipynb":
        anchors |= {title.replace(" ", "-") for title in titles}
    return anchors


@pytest.mark.parametrize("path", [README, LAB_BOOK] + NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(path):
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z]+:", target):
            continue                                            # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{target}: no such file"
        if anchor and linked.suffix in (".md", ".ipynb"):
            assert anchor in headings(linked), f"{target}: no such heading in {linked.name}"


def test_the_lab_book_has_a_section_for_every_notebook():
    assert {path.stem.lower() for path in NOTEBOOKS} <= headings(LAB_BOOK)
