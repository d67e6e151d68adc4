"""models.yolo: a malformed model yaml (a file, or the yaml a stranger's checkpoint carries) is a
one-line UserError naming the layer, never a traceback from inside a module (issue 16.9)."""
import copy

import pytest

from models.yolo import DetectionModel
from tests.peer import one_thread  # noqa: F401  (fixture)
from utils.general import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
        "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "ELAN1", [32, 32, 16]],
                     [-1, 1, "AConv", [32]], [-1, 1, "AConv", [32]], [-1, 1, "AConv", [32]]],
        "head": [[[3, 4, 5], 1, "DDetect", ["nc"]]]}


def _with(row_index, row, key="backbone"):
    cfg = copy.deepcopy(TINY)
    cfg[key][row_index] = row
    return cfg


@pytest.mark.parametrize("cfg, message", [
    (_with(1, [-1, 1, "Conv", ["2*nc", 3, 2]]), r"layer 1 .*argument '2\*nc' is not a literal"),
    (_with(1, [-1, 1, "Conv", ["__import__('os').system('true')", 3, 2]]), r"layer 1 .*is not a literal"),
    (_with(1, [-1, 1, "Conv"]), r"layer 1 .*\[from, number, module, args\] \(4 fields\)"),
    (_with(1, [99, 1, "Conv", [32, 3, 2]]), r"layer 1 .*'from' 99 is not an earlier layer"),
    (_with(1, [-7, 1, "Conv", [32, 3, 2]]), r"layer 1 .*'from' -7 is not an earlier layer"),
    (_with(0, [[3, 4, 9], 1, "DDetect", ["nc"]], key="head"), r"layer 6 .*'from' 9 is not an earlier layer"),
    (_with(1, [-1, 1, "Conv", [32, 3, 2, 1, 1, 1, True, 7, 7]]), r"layer 1 .*Conv cannot be built"),
    (_with(1, [-1, 1, "Conv", []]), r"layer 1 .*Conv cannot be built"),
    (_with(1, [-1, "two", "Conv", [32, 3, 2]]), r"layer 1 .*'number' must be"),
    (_with(1, [-1, 1, "Conv", {"c2": 32}]), r"layer 1 .*'args' must be a list"),
    (dict(TINY, nc="six"), r"nc must be the number of classes"),
    (dict(TINY, nc=0), r"nc must be the number of classes"),
    (dict(TINY, width_multiple="wide"), r"width_multiple must be a number"),
    (dict(TINY, backbone=[], head=[]), r"non-empty lists"),
    (dict(TINY, backbone="Conv"), r"needs 'backbone' and 'head' lists"),
    (_with(0, [0, 1, "Conv", [16, 3, 2]]), r"layer 0 .*the first layer reads the input image"),
])
def test_malformed_model_yaml_is_one_line(cfg, message):
    with pytest.raises(UserError, match=message) as e:
        DetectionModel(cfg)
    assert "\n" not in str(e.value)


def test_layers_that_do_not_fit_together(tmp_path):
    """Rows each valid alone whose shapes clash are found by the stride probe: one line too."""
    cfg = copy.deepcopy(TINY)
    cfg["head"] = [[[3, 4, 5], 1, "DDetect", ["nc", [16, 16, 16]]]]  # channel list of the wrong widths
    with pytest.raises(UserError, match="model yaml") as e:
        DetectionModel(cfg)
    assert "\n" not in str(e.value)


def test_every_shipped_config_still_builds():
    from pathlib import Path
    for f in sorted((Path(__file__).resolve().parents[2] / "models/detect").glob("*.yaml"))[:3]:
        DetectionModel(f)
