"""pytest plugin (loaded by pytest.ini): quick mode for the whole suite.

Before any test runs it generates the offline data sets, serves one image on 127.0.0.1 and
sets the environment variables that every notebook's settings cell reads, so that nbval
executes each notebook in seconds, offline, without touching the repository's data/ or model/.
"""
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image

from tests import fakedata

QUICK_SETTINGS = {
    "EPOCHS": "1",     # epochs per notebook
    "SUBSET": "200",   # images per split at most
    "RUN_ABLATION": "1",   # Speedrun.ipynb: run section 10's ablation (one epoch per row) instead of showing results/
}


def pytest_configure(config):
    root = pathlib.Path(tempfile.mkdtemp(prefix="course-quickmode-"))
    config._quickmode_root = root
    data_dir = root / "data"
    fakedata.write_cifar10_folder(data_dir)
    fakedata.write_flower_photos(data_dir)
    served = root / "served"
    served.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(fakedata.class_image(3, 10, (120, 160), rng)).save(served / "cat.jpg")
    base_url, config._quickmode_server = fakedata.serve_directory(served)
    os.environ.update(QUICK_SETTINGS)
    os.environ.update({
        "DATA_DIR": str(data_dir),
        "MODEL_DIR": str(root / "model"),
        "RUNS_DIR": str(root / "runs"),
        "PREDICT_URL": f"{base_url}/cat.jpg",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",   # never through a proxy
    })


def pytest_unconfigure(config):
    server = getattr(config, "_quickmode_server", None)
    if server is not None:
        server.shutdown()
    root = getattr(config, "_quickmode_root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
