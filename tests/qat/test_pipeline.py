"""qat.pipeline selection: the held-out selection split and --calib-method auto's choice."""
import argparse
import json

import pytest

from qat.calibrate import calibrate, candidate_amaxes
from qat.compat import UserError
from qat.evaluation import selection_split
from qat.pipeline import choose_calibration
from qat.quantize import quantize_model, quantizer_summary
from qat.settings import QuantSettings
from qat_testkit import fp32_model, noise_images


def _opt(**kw):
    return argparse.Namespace(**{"select_split": "", "select_images": 3, "seed": 0, **kw})


def _image_dir(root, n):
    from PIL import Image
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8)).save(root / f"im{i}.jpg")
    return str(root)


def test_selection_split_is_held_out_of_train(tmp_path):
    data = {"train": _image_dir(tmp_path / "images" / "train", 10), "val": "unused"}
    train, select = selection_split(data, _opt(), tmp_path / "run")
    train_files = set(open(train).read().split())
    select_files = set(open(select).read().split())
    assert len(select_files) == 3 and len(train_files) == 7 and not train_files & select_files
    again = selection_split(data, _opt(seed=5), tmp_path / "run")  # a resumed run keeps its split
    assert set(open(again[1]).read().split()) == select_files
    other = selection_split(data, _opt(seed=5), tmp_path / "run2")
    assert set(open(other[1]).read().split()) != select_files
    assert selection_split(data, _opt(select_split=data["train"]), tmp_path / "run3") == (data["train"], data["train"])
    with pytest.raises(UserError, match="--select-split"):
        selection_split(data, _opt(select_split=str(tmp_path / "nothing")), tmp_path / "run4")
    with pytest.raises(UserError, match="too few"):
        selection_split({"train": _image_dir(tmp_path / "one", 1)}, _opt(), tmp_path / "run5")


def test_the_data_yamls_select_split_comes_before_held_out_train_images(tmp_path, caplog):
    """The yaml's `select:` (images the checkpoint never trained on) is used whole and train stays whole;
    a relative one resolves against `path` (an upstream clone's check_dataset leaves it as written)."""
    train = _image_dir(tmp_path / "images" / "train", 10)
    _image_dir(tmp_path / "images" / "select", 4)
    data = {"path": str(tmp_path), "train": train, "val": "unused", "select": "images/select"}
    assert selection_split(data, _opt(), tmp_path / "run") == (train, str(tmp_path / "images" / "select"))
    assert not (tmp_path / "run" / "splits").exists()
    assert selection_split(data, _opt(select_split=train), tmp_path / "run2") == (train, train)  # the option wins
    with pytest.raises(UserError, match="'select:'"):
        selection_split(dict(data, select="images/nothing"), _opt(), tmp_path / "run3")
    # without one: held-out train images, with a warning that the checkpoint most likely trained on them
    caplog.clear()
    data.pop("select")
    with caplog.at_level("WARNING"):
        selection_split(data, _opt(), tmp_path / "run4")
    assert "most likely trained on them" in caplog.text


def test_auto_calibration_picks_the_best_candidate_on_the_selection_split(tmp_path):
    """The candidate with the highest selection mAP50-95 is loaded and named in the settings."""
    s = QuantSettings(calib_method="auto")
    q = quantize_model(fp32_model("gelan-t"), s)
    calibrate(q, [noise_images(2, seed=i) for i in range(2)], s, show=False)
    amaxes = candidate_amaxes(q)
    others = [c for c in amaxes if c != "entropy"]
    first = next(k for k, v in amaxes["entropy"].items()  # a quantizer where entropy's amax is its own
                 if all(abs(amaxes[c][k] - v) > 1e-3 * v for c in others))
    target = amaxes["entropy"][first]

    def select_fn(model):  # best when the first quantizer holds the entropy amax
        a = next(r["amax"] for r in quantizer_summary(model) if r["name"] == first)
        return {"map": 1 - abs(a - target), "map50": 0.5, "mp": 0.5, "mr": 0.5}

    chosen, table = choose_calibration(q, s, select_fn, tmp_path)
    assert len(table) == 6 and chosen.calib_method == "entropy" and q.qat["settings"]["calib_method"] == "entropy"
    assert next(r["amax"] for r in quantizer_summary(q) if r["name"] == first) == pytest.approx(target)
    assert json.loads((tmp_path / "calibration_selection.json").read_text())["chosen"] == "entropy"
    assert "| entropy (chosen) |" in (tmp_path / "calibration_selection.md").read_text()
