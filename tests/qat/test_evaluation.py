"""qat/evaluation.py: the selection split is evaluated in the deployed protocol."""
from types import SimpleNamespace

import numpy as np

from qat.evaluation import load_data, make_select_loader
from qat.options import default_opt, load_hyp
from utils.demo_data import generate


def test_selection_batches_are_square_letterboxed_like_the_deployed_input(tmp_path):
    """Square --imgsz letterbox (val_trt.py, a static-shape engine), never val.py's rectangular batches,
    which would run a square image at imgsz + one stride and a wide one below imgsz."""
    data = load_data(str(generate(tmp_path / "data", n_train=2, n_val=12, imgsz=96)))
    opt = SimpleNamespace(batch_size=2, workers=0)
    loader = make_select_loader(data["val"], int(data["nc"]), 64, 32, opt, load_hyp(default_opt().hyp))
    shapes = np.asarray(loader.dataset.shapes)  # (w, h) of the source images
    assert (shapes[:, 0] == shapes[:, 1]).any() and (shapes[:, 0] != shapes[:, 1]).any()
    batches = [imgs.shape for imgs, *_ in loader]
    assert sum(b[0] for b in batches) == len(shapes) and {tuple(b[1:]) for b in batches} == {(3, 64, 64)}
