"""qat.calibrate: methods, the amax tables, and statistics merged across DDP ranks (2 gloo processes)."""
import json
import os
import socket
import warnings

import pytest
import torch

from modelopt.torch.quantization.calib.histogram import _compute_amax_entropy

from qat.calibrate import (amax_entropy, auto_candidates, calibrate, candidate_amaxes, free_histograms, histogram_amax,
                           kl_divergences, load_amaxes, quantization_mse, write_summary)
from qat.modules import NUM_BINS, RangeHistogram, make_input_quantizer
from qat.compat import UserError
from qat.quantize import quantize_model, quantizer_summary, unique_quantizers
from qat.settings import QuantSettings
from qat_testkit import fp32_model, noise_images


def _acts(model):
    return {r["name"]: r["amax"] for r in quantizer_summary(model) if r["kind"] == "input" and r["enabled"]}


def test_methods_and_tables(tmp_path):
    batches = [noise_images(2, seed=s) for s in range(3)]
    amax = {}
    for method in ("max", "percentile", "mse", "entropy"):
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


def _samples(kind, n=400_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform01":
        return torch.rand(n, generator=g)
    if kind == "normal3":
        return torch.randn(n, generator=g) * 3
    if kind == "relu":  # half the values exactly 0
        return torch.relu(torch.randn(n, generator=g) * 2)
    return torch.nn.functional.silu(torch.randn(n, generator=g) * 2)  # one-sided, long positive tail


def _histogram(x, chunks=4):
    cal = RangeHistogram()
    for c in x.chunk(chunks):
        cal.collect(c)
    return cal


def _brute_force_mse(x, amaxes):
    """Mean squared error of the product's own activation quantizer at each amax, on the samples."""
    q = make_input_quantizer("max")
    out = []
    for a in amaxes:
        q.amax = torch.tensor(float(a))
        out.append(float(((q(x) - x) ** 2).mean()))
    return torch.tensor(out)


@pytest.mark.parametrize("kind", ["uniform01", "normal3", "silu", "relu"])
def test_mse_rule_minimises_quantization_error(kind):
    """The histogram-MSE amax is (within 0.3 %) as good as the best amax found by quantizing the
    samples themselves over a fine grid; modelopt 0.47's own rule is far off."""
    x = _samples(kind)
    cal = _histogram(x)
    amax = histogram_amax(cal, "mse")
    top = float(x.abs().max())
    grid = torch.linspace(0.2, 1.0, 321) * top
    brute = _brute_force_mse(x, grid)
    ours = float(_brute_force_mse(x, [amax])[0])
    assert ours <= 1.003 * float(brute.min()), (kind, amax, float(grid[brute.argmin()]))
    predicted = float(quantization_mse(cal._calib_hist, cal._calib_bin_edges, [amax])[0])
    if kind != "relu":  # relu's zeros are not spread over bin 0 as the closed form assumes
        assert predicted == pytest.approx(ours, rel=0.05)  # the closed form models the real quantizer
    if kind == "uniform01":
        assert 0.98 < amax <= 1.0


@pytest.mark.parametrize("kind", ["uniform01", "normal3", "silu", "relu"])
def test_entropy_rule_matches_tensorrt_kl(kind):
    """Vectorised KL rule == the bin-by-bin loop (modelopt's implementation of TensorRT's rule),
    run here on a 512-bin histogram so the loop stays fast; and its KL is the smallest of all stops."""
    x = _samples(kind, n=100_000)
    hist = torch.histc(x.abs(), bins=512, min=0, max=float(x.abs().max()))
    edges = torch.linspace(0, float(x.abs().max()), 513)
    ours = amax_entropy(hist, edges)
    reference = float(_compute_amax_entropy(hist.int().numpy(), edges.numpy(), 8, False, 1, 128))
    assert ours == pytest.approx(reference, rel=1e-6), kind
    kl = kl_divergences(hist, torch.arange(128, 513))
    assert float(kl[int(torch.searchsorted(edges, torch.tensor(ours))) - 128]) <= float(kl.min()) + 1e-12


@pytest.mark.parametrize("kind", ["uniform01", "normal3", "silu"])
def test_percentile_rule(kind):
    x = _samples(kind)
    cal = _histogram(x)
    width = float(cal._calib_bin_edges[1])
    for pct in (99.0, 99.99):
        expect = \
            float(torch.sort(x.abs()).values[int(round(pct / 100 * (len(x) - 1)))])
        assert histogram_amax(cal, "percentile", pct) == pytest.approx(expect, abs=width)
    assert histogram_amax(cal, "max") == float(x.abs().max())


def test_histogram_grows_exactly():
    """Later, larger batches double the range and merge bins: the counts equal one histogram of all
    the data over the final range (modelopt's growth re-bins misaligned)."""
    x = torch.cat([torch.rand(50_000), torch.rand(50_000) * 5, torch.rand(50_000) * 40])
    cal = _histogram(x, chunks=3)
    top = cal._calib_range
    assert top >= 40 > top / 2
    direct = torch.histc(x, bins=NUM_BINS, min=0, max=top).double()
    assert float((cal._calib_hist - direct).abs().sum()) <= 4  # a value on a bin edge may land either side
    assert float(cal._calib_hist.sum()) == len(x)


def test_activation_grid_is_signed():
    """A non-negative tensor still uses the signed grid [-amax, amax]: 128 levels on [0, amax]."""
    q = make_input_quantizer("mse")
    q.amax = torch.tensor(1.0)
    levels = torch.unique(q(torch.linspace(0, 1, 100_001)))
    assert len(levels) == 128 and float(levels[1]) == pytest.approx(1 / 127)


def test_auto_candidates_from_one_pass():
    """auto collects once; every rule's amax comes from the kept histograms, and the 'max' candidate
    equals max calibration."""
    batches = [noise_images(2, seed=s) for s in range(2)]
    s = QuantSettings(calib_method="auto")
    q = quantize_model(fp32_model("gelan-t"), s)
    calibrate(q, batches, s, show=False)
    cands = candidate_amaxes(q)
    assert set(cands) == {name for name, _, _ in auto_candidates()}
    ref = QuantSettings(calib_method="max")
    qm = quantize_model(fp32_model("gelan-t"), ref)
    calibrate(qm, batches, ref, show=False)
    maxes = _acts(qm)
    assert cands["max"].keys() == maxes.keys()
    assert all(cands["max"][k] == pytest.approx(v, rel=1e-5) for k, v in maxes.items())
    assert all(cands["percentile 99.9"][k] <= cands["max"][k] for k in maxes)
    load_amaxes(q, cands["mse"])
    assert _acts(q) == pytest.approx(cands["mse"])
    free_histograms(q)
    assert all(qq._calibrator._calib_hist is None for _, qq, _ in unique_quantizers(q)
               if hasattr(qq._calibrator, "_calib_hist"))


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
            batches = [noise_images(2, seed=s_) for s_ in range(4)][rank::world]  # each rank its shard
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
        calibrate(q, [noise_images(2, seed=s_) for s_ in range(4)], s, show=False)
        single, ddp = _acts(q), r0[method]
        assert single.keys() == ddp.keys()
        for k in single:  # max: same images, only the conv arithmetic (1 vs 2 threads) differs
            assert ddp[k] == pytest.approx(single[k], rel=1e-5 if method == "max" else 0.02), (method, k)
