"""qat.calibrate: methods, the amax tables, and statistics merged across DDP ranks (2 gloo processes)."""
import json
import os
import socket
import warnings

import pytest
import torch

from qat.calibrate import calibrate, write_summary
from qat.compat import UserError
from qat.quantize import quantize_model, quantizer_summary, unique_quantizers
from qat.settings import QuantSettings
from qat_models import fp32_model, images


def _acts(model):
    return {r["name"]: r["amax"] for r in quantizer_summary(model) if r["kind"] == "input" and r["enabled"]}


def test_methods_and_tables(tmp_path):
    batches = [images(2, seed=s) for s in range(3)]
    amax = {}
    for method in ("max", "percentile"):
        s = QuantSettings(calib_method=method, percentile=99.0)
        q = quantize_model(fp32_model("gelan-t"), s)
        summary = calibrate(q, batches, s, show=False)
        amax[method] = _acts(q)
        assert all(v is not None and v > 0 for v in amax[method].values())
        assert all(q._calibrator._calib_hist is None for _, q, _ in unique_quantizers(q)
                   if hasattr(q._calibrator, "_calib_hist"))  # histograms freed after calibration
    assert all(amax["percentile"][k] <= amax["max"][k] * 1.001 for k in amax["max"])
    assert any(amax["percentile"][k] < amax["max"][k] * 0.99 for k in amax["max"])

    f = write_summary(summary, tmp_path)
    rows = json.loads((tmp_path / "calibration.json").read_text())
    assert rows == json.loads(json.dumps(summary))
    text = f.read_text()
    assert "| model.2.cat_quantizer | 4 |" in text and "# Weight quantizers" in text


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_search_methods(method):
    """mse / entropy search the histogram (seconds per quantizer: a few quantizers here)."""
    only_first = QuantSettings(calib_method=method, skip_layers=[r"^model\.([1-9]|\d\d)\."])
    q = quantize_model(fp32_model("gelan-t"), only_first)
    calibrate(q, [images(2, seed=s) for s in range(2)], only_first, show=False)
    got = _acts(q)
    assert list(got) == ["model.0.conv.input_quantizer"] and 0 < got["model.0.conv.input_quantizer"] <= 1.0


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match="--calib-method 'minmax' is unknown"):
        QuantSettings(calib_method="minmax")
    with pytest.raises(UserError, match="--weight-bits 4"):
        QuantSettings(weight_bits=4)


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = {}
        for method in ("max", "percentile"):
            s = QuantSettings(calib_method=method)
            q = quantize_model(fp32_model("gelan-t"), s)
            batches = [images(2, seed=s_) for s_ in range(4)][rank::world]  # each rank its shard
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                calibrate(q, batches, s, show=False)
            result[method] = _acts(q)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_merge(tmp_path):
    """Two ranks on different halves of the data load the same amax; for max it is the
    single-process amax over all the data, for a histogram method the same up to the bin edges
    (DDP bins into fixed edges [0, global max], one process grows its edges as data comes)."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0 == r1
    for method in ("max", "percentile"):
        s = QuantSettings(calib_method=method)
        q = quantize_model(fp32_model("gelan-t"), s)
        calibrate(q, [images(2, seed=s_) for s_ in range(4)], s, show=False)
        single, ddp = _acts(q), r0[method]
        assert single.keys() == ddp.keys()
        for k in single:  # max: same images, only the conv arithmetic (1 vs 2 threads) differs
            assert ddp[k] == pytest.approx(single[k], rel=1e-5 if method == "max" else 0.02), (method, k)
