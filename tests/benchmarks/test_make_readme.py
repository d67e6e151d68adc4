"""benchmarks/make_readme.py: the README results section is generated from the results JSON."""
import json

from benchmarks.make_readme import END, START, section, update


def _latency_result():
    row = lambda ms, s, i: {"latency_ms": ms, "imgs_per_s": 1000 / ms, "speedup": s, "int8_convs": i,  # noqa: E731
                            "convs": 145}
    return {"name": "gelan-c", "model": "gelan-c, random weights", "imgsz": 640, "threads": 2,
            "date": "2026-01-01T00:00:00", "sizes_mb": {"FP32 .pt": 96.6},
            "machine": {"cpu": "Test CPU", "logical_cpus": 2, "int8": "no VNNI/AMX", "openvino": "2026.0",
                        "torch": "2.x", "python": "3.11"},
            "batches": {"1": {"FP32 ONNX": row(700.0, 1.0, 0), "QAT Q/DQ ONNX (u8 form)": row(350.0, 2.0, 144),
                              "NNCF PTQ INT8": row(400.0, 1.75, 142)}}}


def test_section_and_readme_update(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "gelan-c.json").write_text(json.dumps(_latency_result()))
    text = section(res, tmp_path)
    assert text.startswith(START) and text.rstrip().endswith(END)
    assert "**2.00x** the FP32 ONNX at batch 1" in text and "QAT 1.14x NNCF's speed" in text
    assert "| QAT Q/DQ ONNX (u8 form) | 1 | - | 350.0 | 2.86 | 2.00x | 144/145 |" in text  # a result from before
    assert "Machines: Test CPU, 2 logical CPUs, no VNNI/AMX" in text

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    assert "appended" in update(readme, text)
    readme.write_text(readme.read_text() + "\n## After\n")
    assert "replaced" in update(readme, text.replace("2.00x", "9.99x"))
    out = readme.read_text()
    assert out.count(START) == 1 and "9.99x" in out and out.endswith("## After\n") and out.startswith("# title")


def test_agreement_results_get_their_own_section(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    agreement = {"name": "demo-gelan", "onnx": "x/qat_best.onnx", "images": 1000, "imgsz": 320, "date": "2026-01-01",
                 "seconds": 10.0, "layer_flips": [],
                 "noise": {"repeats": 2, "sigma": 1e-4, "mAP50-95": [0.47, 0.48], "mean": 0.475, "std": 0.007},
                 "rows": [{"model": "ONNX Runtime (reference)", "mAP50-95": 0.48, "mAP50": 0.6, "delta_vs_reference": 0.0,
                           "delta_vs_noise_mean_in_std": 0.7, "outputs_vs_reference": None}]}
    (res / "agreement-demo-gelan.json").write_text(json.dumps(agreement))
    (res / "gelan-c.json").write_text(json.dumps(_latency_result()))
    text = section(res, tmp_path)
    assert "### Deployment agreement (demo-gelan): qat_best.onnx, 1000 val images, 320 px" in text
    assert "| ONNX Runtime (reference) | 0.4800 | 0.6000 | +0.0000 | +0.7 | - | - |" in text
    assert "QAT 1.14x NNCF's speed" in text  # the latency section is still there


def test_new_latency_results_show_the_headline_against_the_fastest_float(tmp_path):
    from benchmarks.bench_latency import headline

    res = tmp_path / "results"
    res.mkdir()
    row = lambda ms, i=0, prec="f32": {"latency_ms": ms, "imgs_per_s": 1000 / ms, "int8_convs": i, "convs": 186,  # noqa: E731
                                       "precision": prec}
    rows = {"FP32 ONNX, default (bf16)": row(8.0, prec="bf16"), "FP32 ONNX, f32": row(13.0),
            "QAT Q/DQ, int8 form": row(9.0, 185), "QAT Q/DQ, uint8 form (deployed)": row(8.5, 185),
            "NNCF PTQ INT8": row(9.5, 183)}
    from qat.deploy.latency import versus_float

    r = {"name": "demo-gelan-avx2", "model": "demo", "imgsz": 320, "threads": 2, "date": "2026-01-01",
         "sizes_mb": {}, "deployed": "QAT Q/DQ, uint8 form (deployed)", "float_rows": list(rows)[:2],
         "choice": {"act_form": "uint8", "weight_bits": 7, "reason": "AVX2 without VNNI"},
         "machine": {"cpu": "Test CPU", "logical_cpus": 2, "int8": "AVX2, no VNNI under ONEDNN_MAX_CPU_ISA=AVX2",
                     "flags": ["avx2"], "openvino": "2026.4", "torch": "2.x", "python": "3.11"},
         "batches": {"1": rows}, "fastest_float": {"1": versus_float(rows, ["FP32 ONNX, default (bf16)", "FP32 ONNX, f32"])}}
    r["headline"] = headline(r)
    (res / "demo-gelan-avx2.json").write_text(json.dumps(r))
    text = section(res, tmp_path)
    assert "### demo-gelan-avx2: CPU latency on OpenVINO (AVX2, no VNNI under ONEDNN_MAX_CPU_ISA=AVX2)" in text
    assert "**1.06x slower** than the fastest float row (FP32 ONNX, default (bf16), 8.0 ms)" in text
    assert "| FP32 ONNX, default (bf16) | 1 | bf16 | 8.0 | 125.00 | 1.00x (fastest float) | 0/186 |" in text
    assert "| QAT Q/DQ, uint8 form (deployed) | 1 | f32 | 8.5 | 117.65 | 0.94x **slower** | 185/186 |" in text
    assert "| FP32 ONNX, f32 | 1 | f32 | 13.0 | 76.92 | 0.62x | 0/186 |" in text  # a float row is not 'slower'
    assert "Deployed form: uint8 activations, 7-bit weights (AVX2 without VNNI)" in text


def test_qat_speed_result_gets_its_table(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    speed = {"device": "cpu", "imgsz": 320, "batch_size": 8, "fp32": 0.3, "qat_distill": 0.45, "qat_distill_vs_fp32": 1.5,
             "qat_distill_fixed": 0.42, "qat_distill_fixed_vs_fp32": 1.4, "qat_det": 0.36, "qat_det_vs_fp32": 1.2,
             "model": "models/detect/gelan-t.yaml", "command": "python -m qat.speed --imgsz 320",
             "machine": {"device": "Test CPU", "torch_threads": 2, "logical_cpus": 2, "torch": "2.x"}}
    (res / "qat-speed.json").write_text(json.dumps(speed))
    text = section(res, tmp_path)
    assert "### QAT step time (gelan-t, 320 px, batch 8, cpu)" in text
    assert "`python -m qat.speed --imgsz 320` on Test CPU, 2 torch threads" in text and "take turns" in text
    assert "| QAT, distillation (default) | 450.0 | 1.50x |" in text


def test_footer_names_every_cpu_the_latency_results_ran_on(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    epyc, xeon, capped = _latency_result(), _latency_result(), _latency_result()
    xeon["machine"] = {**xeon["machine"], "cpu": "Other CPU", "int8": "AMX"}
    capped["machine"] = {**capped["machine"], "int8": "AVX2 under ONEDNN_MAX_CPU_ISA=AVX2", "isa_cap": "AVX2"}
    for name, r in (("a-avx2", capped), ("b", epyc), ("c-amx", xeon)):
        (res / f"{name}.json").write_text(json.dumps({**r, "name": name}))
    footer = section(res, tmp_path).split("Machines: ", 1)[1].split("\n", 1)[0]
    # the uncapped reading of the test CPU replaces the capped one; the other CPU is named too
    assert footer.startswith("Test CPU, 2 logical CPUs, no VNNI/AMX, OpenVINO 2026.0") and "Other CPU" in footer
    assert "ONEDNN_MAX_CPU_ISA" not in footer


def test_each_accuracy_result_is_named_in_its_heading(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    for name, value in (("demo-a", "0.5001"), ("demo-b", "0.5002")):
        (res / f"accuracy-{name}.json").write_text(json.dumps({"per_seed": {}}))
        (res / f"accuracy-{name}.md").write_text(
            f"# INT8 accuracy: calibration methods\n\nsettings\n\n## demo (weights 8-bit)\n\n| FP32 | {value} |\n")
    text = section(res, tmp_path)
    assert "### demo-a: INT8 accuracy: calibration methods\n\nsettings\n\n#### demo (weights 8-bit)" in text
    assert "### demo-b: INT8 accuracy: calibration methods" in text and "| FP32 | 0.5002 |" in text
