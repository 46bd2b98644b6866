"""FP16 and INT8 ONNX exports of a digits-trained student: what the files hold (float16 weights, per-channel QDQ
int8), that they are verified before publishing, and that their accuracy change, size and latency are measured."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from digits_data import DIGITS_MEAN, DIGITS_STD
from torch import nn

from worker.distill.errors import ExportError
from worker.distill.export import class_agreement, export_student, sha256_file
from worker.distill.quantize import file_metadata, measure_exports

FORMATS = ["onnx", "onnx_fp16", "onnx_int8"]
NAMES = {"safetensors": "student.safetensors", "onnx": "student.onnx", "onnx_fp16": "student.fp16.onnx",
         "onnx_int8": "student.int8.onnx"}
CALIBRATION = 512
BUDGET = 0.5  # seconds of latency timing per measure_exports call


def normalise(images: np.ndarray) -> np.ndarray:
    return ((images[:, None].astype(np.float32) / 255.0 - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)


def run(path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # tiny inputs; extra threads only spin on a busy CI machine
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def trained(digits):
    """resnet8 trained for a few seconds on digits: accuracy is meaningful, so its change is too."""
    from worker.distill.students import create_model

    x_all, y_all = normalise(digits.x_train), digits.y_train
    x_tr, y_tr, x_val, y_val = x_all[:-200], y_all[:-200], x_all[-200:], y_all[-200:]
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    xs, ys = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 8x8 images: one thread is as fast, and spin-waiting threads cost 10x on a busy box
    try:
        for _ in range(4):
            for idx in torch.randperm(len(xs)).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    splits = {"validation": (x_val, y_val), "test": (normalise(digits.x_test), digits.y_test)}
    return {"model": model, "x_train": x_tr, "splits": splits}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("quantized") / "artifacts"
    example = torch.from_numpy(trained["splits"]["validation"][0][:16])
    calibration = torch.from_numpy(trained["x_train"][:CALIBRATION])
    files = export_student(trained["model"], example, out_dir, FORMATS, calibration=calibration)
    return {"files": files, "out_dir": out_dir, "by_format": {f.format: f for f in files}}


@pytest.fixture(scope="module")
def measured(exported, trained):
    return measure_exports(exported["files"], trained["splits"], max_drop=0.02, budget_seconds=BUDGET)


# ------------------------------------------------------------------------------------------ the files


def test_every_format_is_published_under_its_name(exported):
    files = exported["files"]
    assert [f.format for f in files] == ["safetensors", *FORMATS]
    assert [f.name for f in files] == [NAMES[f.format] for f in files]
    for f in files:
        assert f.path == exported["out_dir"] / f.name
        assert f.size_bytes == f.path.stat().st_size
        assert f.sha256 == sha256_file(f.path)
    # the converters' and quantiser's scratch folders are gone
    assert sorted(p.name for p in exported["out_dir"].iterdir()) == sorted(f.name for f in files)


def test_fp16_file_holds_float16_weights_and_keeps_float32_io(exported, trained):
    model = onnx.load(str(exported["by_format"]["onnx_fp16"].path))
    types = [onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer]
    assert "FLOAT" not in types
    assert types.count("FLOAT16") >= 9  # every conv and the classifier
    float32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [float32]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [float32]
    x = trained["splits"]["test"][0][:64]
    out, ref = run(exported["by_format"]["onnx_fp16"].path, x), run(exported["by_format"]["onnx"].path, x)
    assert out.dtype == np.float32 and out.shape == ref.shape == (64, 10)
    assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()


def test_int8_file_is_qdq_with_per_channel_weight_scales(exported):
    model = onnx.load(str(exported["by_format"]["onnx_int8"].path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    init = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 10  # resnet8: 9 convs (batch norm folded in) and the classifier
    for node in weighted:
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        weight, scale = init[dq.input[0]], init[dq.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert axis == 0
        assert list(scale.dims) == [weight.dims[0]]  # one scale per output channel
        assert len(set(onnx.numpy_helper.to_array(scale).tolist())) > 1


def test_int8_file_is_much_smaller_than_fp32(exported):
    fp32, int8 = exported["by_format"]["onnx"].size_bytes, exported["by_format"]["onnx_int8"].size_bytes
    # about 0.34x on this student: int8 weights plus float32 biases, scales and graph
    assert int8 < 0.4 * fp32
    assert exported["by_format"]["onnx_fp16"].size_bytes < 0.6 * fp32


def test_int8_file_records_its_calibration(exported):
    props = file_metadata(exported["by_format"]["onnx_int8"].path)
    assert props["kdistill.calibration_method"] == "minmax"
    assert props["kdistill.calibration_images"] == str(CALIBRATION)


# ------------------------------------------------------------------------------------------ measuring


def test_measured_accuracy_change_matches_the_files_and_is_small(measured, exported, trained):
    report, warnings = measured
    assert set(report) == {"onnx", *FORMATS}
    fp32 = report["onnx"]
    assert fp32["published"] is True and fp32["size_bytes"] == exported["by_format"]["onnx"].size_bytes
    for split, (x, y) in trained["splits"].items():
        base = run(exported["by_format"]["onnx"].path, x).argmax(1)
        assert fp32["splits"][split]["accuracy"] == pytest.approx((base == y).mean(), abs=1e-6)
        assert fp32["splits"][split]["accuracy"] > 0.85  # a trained model, so the change means something
        for fmt in ("onnx_fp16", "onnx_int8"):
            preds = run(exported["by_format"][fmt].path, x).argmax(1)
            figures = report[fmt]["splits"][split]
            assert figures["samples"] == len(y)
            assert figures["accuracy"] == pytest.approx((preds == y).mean(), abs=1e-6)
            assert figures["accuracy_change"] == pytest.approx((preds == y).mean() - (base == y).mean(), abs=1e-6)
            assert figures["agreement"] == pytest.approx((preds == base).mean(), abs=1e-6)
            assert abs(figures["accuracy_change"]) <= 0.02
            assert figures["agreement"] >= 0.97
    assert warnings == []  # nothing lost more than 0.02


def test_measured_size_and_latency(measured, exported):
    report, _ = measured
    fp32_size = exported["by_format"]["onnx"].size_bytes
    for fmt in ("onnx_fp16", "onnx_int8"):
        entry = report[fmt]
        assert entry["size_bytes"] == exported["by_format"][fmt].size_bytes
        assert entry["size_ratio"] == pytest.approx(fp32_size / entry["size_bytes"], abs=1e-3)
        assert "error" not in entry
        for key in ("batch_1", "batch_32"):
            assert entry["latency_ms"][key] > 0 and entry["speedup"][key] > 0
            assert report["onnx"]["latency_ms"][key] > 0
    assert report["onnx_int8"]["size_ratio"] > 2.5
    assert report["onnx_int8"]["calibration"] == {"method": "minmax", "images": CALIBRATION}


def disagreeing_inputs(exported, n: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images (near ties abound) with the fp32 and int8 predictions on them."""
    x = np.random.default_rng(0).standard_normal((n, 1, 8, 8)).astype(np.float32)
    base = run(exported["by_format"]["onnx"].path, x).argmax(1)
    int8 = run(exported["by_format"]["onnx_int8"].path, x).argmax(1)
    return x, base, int8


def test_a_format_that_loses_accuracy_is_warned_about_and_still_published(exported):
    x, base, int8 = disagreeing_inputs(exported)
    lost = np.flatnonzero(base != int8)
    assert len(lost) >= 5, "noise should put some rows on a knife edge"
    kept = np.flatnonzero(base == int8)[:100]
    idx = np.concatenate([lost[:5], kept])
    int8_only = [f for f in exported["files"] if f.format in ("onnx", "onnx_int8")]
    # labels = the fp32 predictions: fp32 scores 1.0, int8 loses exactly the 5 rows where it disagrees
    splits = {"validation": (x[kept], base[kept]), "test": (x[idx], base[idx])}
    report, warnings = measure_exports(int8_only, splits, max_drop=0.0, budget_seconds=BUDGET)
    assert report["onnx_int8"]["splits"]["validation"]["accuracy_change"] == 0.0
    assert report["onnx_int8"]["splits"]["test"]["accuracy_change"] == pytest.approx(-5 / len(idx), abs=1e-6)
    assert [w["code"] for w in warnings] == ["export_accuracy_drop"]  # only the split that lost anything
    message = warnings[0]["message"]
    assert "onnx_int8" in message and "test" in message and "validation" not in message
    assert f"{1.0:.4f}" in message and f"{1 - 5 / len(idx):.4f}" in message
    assert "student.int8.onnx is still published" in message
    assert exported["by_format"]["onnx_int8"].path.is_file()
    # a drop within the allowance is not a warning
    _, allowed = measure_exports(int8_only, splits, max_drop=5 / len(idx), budget_seconds=BUDGET)
    assert allowed == []


# ------------------------------------------------------------------------------------------ refusals


def test_int8_without_calibration_is_refused_before_anything_is_written(trained, tmp_path):
    example = torch.from_numpy(trained["splits"]["validation"][0][:16])
    with pytest.raises(ExportError, match="calibration") as err:
        export_student(trained["model"], example, tmp_path / "out", ["onnx", "onnx_int8"])
    assert err.value.code == "export_failed"
    with pytest.raises(ExportError, match=r"\[N, 1, 8, 8\]"):
        export_student(trained["model"], example, tmp_path / "out", ["onnx_int8"],
                       calibration=torch.zeros(8, 3, 8, 8))
    assert not (tmp_path / "out").exists()


def test_int8_calibrated_on_the_wrong_scale_is_refused(trained, tmp_path):
    """Calibration images 1000x too small clip every real input: the file no longer predicts the student's
    classes, so verification refuses it and nothing is left behind."""
    example = torch.from_numpy(trained["splits"]["validation"][0][:16])
    calibration = torch.from_numpy(trained["x_train"][:256]) * 1e-3
    out_dir = tmp_path / "out"
    with pytest.raises(ExportError, match="onnx_int8 file picks the trained student's class on only"):
        export_student(trained["model"], example, out_dir, ["onnx_int8"], calibration=calibration)
    assert not (out_dir / "student.int8.onnx").exists()
    assert sorted(p.name for p in out_dir.iterdir()) == ["student.safetensors"]


def test_class_agreement_counts_near_ties_only():
    ref = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.99], [1.0, 0.0, -1.0]])
    assert class_agreement(ref, ref) == 1.0
    swapped = torch.tensor([[3.0, 0.0, 1.0], [0.0, 1.98, 2.0], [0.0, 1.0, -1.0]])
    # row 2 swaps a near tie (0.01 of a spread of 2); row 3 swaps a clear winner
    assert class_agreement(swapped, ref) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------ without fp32


def test_reduced_formats_alone_use_a_temporary_fp32_file(tmp_path):
    """Only the reduced files are published, and measuring exports an fp32 reference of its own. The student's
    first activations span a few float32 steps, which histogram calibrators refuse and MinMax takes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e-7)
        model[0].bias.fill_(1.0)
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out_dir = tmp_path / "out"
    files = export_student(model, x[:16], out_dir, ["onnx_int8", "onnx_fp16"], calibration=x[:64])
    assert [f.format for f in files] == ["safetensors", "onnx_int8", "onnx_fp16"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f.name for f in files)
    assert file_metadata(out_dir / "student.int8.onnx")["kdistill.calibration_images"] == "64"
    with pytest.raises(ValueError, match="fp32 ONNX"):
        measure_exports(files, {"validation": (x[64:].numpy(), np.zeros(32, dtype=np.int64))}, max_drop=0.01)
    labels = model(x[64:]).argmax(1).detach().numpy()
    report, _ = measure_exports(files, {"validation": (x[64:].numpy(), labels)}, max_drop=0.01, student=model,
                                budget_seconds=BUDGET)
    assert report["onnx"]["published"] is False and report["onnx"]["file"] is None
    assert report["onnx"]["splits"]["validation"]["accuracy"] == 1.0
    assert set(report) == {"onnx", "onnx_fp16", "onnx_int8"}
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f.name for f in files)
