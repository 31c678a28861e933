"""environment.yml (conda) and requirements*.txt (pip) list the same packages; the Makefile hands
the notebooks paths that mean what the reader typed."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).parent.parent
CONDA_NAMES = {"pytorch": "torch"}          # conda-forge name -> PyPI name


def requirement_names(path):
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower())
    return names


def conda_names(path):
    names = set()
    dependencies = path.read_text().split("dependencies:", 1)[1]
    for line in dependencies.splitlines():
        match = re.match(r"\s*-\s+([A-Za-z0-9_.-]+)", line.split("#")[0])
        if match and match.group(1) not in ("python", "pip"):
            names.add(CONDA_NAMES.get(match.group(1).lower(), match.group(1).lower()))
    return names


def test_environment_yml_lists_the_same_packages_as_requirements():
    pip = requirement_names(ROOT / "requirements-dev.txt")
    assert "torch" in pip and "nbval" in pip
    assert conda_names(ROOT / "environment.yml") == pip


def test_requirements_use_lower_bounds_only():
    for path in (ROOT / "requirements.txt", ROOT / "requirements-dev.txt"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                assert ">=" in line and "==" not in line and "<" not in line, line


def test_requests_is_a_dependency():
    """utils.fetch_url uses requests: pip and conda users must get it."""
    assert "requests" in requirement_names(ROOT / "requirements.txt")
    assert "requests" in conda_names(ROOT / "environment.yml")


def test_make_demo_passes_absolute_paths_to_the_notebook():
    # the notebook runs in notebooks/, so a relative MODEL_DIR would land in notebooks/out
    root = ROOT.resolve()
    dry_run = subprocess.run(["make", "-n", "demo", "MODEL_DIR=out", "DATA_DIR=../elsewhere", "RUNS_DIR=logs"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
    assert f"MODEL_DIR={root / 'out'} " in dry_run and f"DATA_DIR={root.parent / 'elsewhere'} " in dry_run
    assert f"RUNS_DIR={root / 'logs'} " in dry_run
