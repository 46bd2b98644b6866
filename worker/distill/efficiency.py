"""Size and speed of teacher vs student: parameters, MACs per image, file sizes and CPU latency.

Both models are timed in one call, interleaved, with ONNX Runtime's CPU provider (or both with torch on CPU
when the teacher cannot be exported), so the speedup compares like with like on the same worker.
"""

from __future__ import annotations

import copy as copy_module
import io
import itertools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .export import write_onnx

BATCHES = (1, 32)
MIN_RUNS = 3  # timed runs per model and batch size, whatever the budget
MAX_RUNS = 50  # more does not move a median; keeps tiny models cheap
ORT_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}

Shape = tuple[int, int, int]
Run = Callable[[], object]


def efficiency_report(*, teacher_module: nn.Module | None, teacher_onnx: Path | None, teacher_file: Path,
                      teacher_input: Shape, student: nn.Module, student_onnx: Path | None,
                      student_input: Shape, workdir: Path, budget_seconds: float = 20.0) -> dict[str, Any]:
    """Parameters, MACs per image, file sizes and CPU latency (batch 1 and 32) of teacher and student.

    Inputs are (channels, height, width). Give `teacher_module` (torch-native teachers) or `teacher_onnx`;
    with both, the module gives the counts and the ONNX file the latency. Never raises for a measuring
    failure: what could not be measured is None and `notes` says why. `budget_seconds` bounds the timing
    (not the exports); each model still gets at least 3 timed runs per batch size.
    """
    notes: list[str] = []
    report: dict[str, Any] = {
        "runtime": "onnxruntime", "threads": torch.get_num_threads(),
        "teacher": _empty_figures(), "student": _empty_figures(),
        "speedup": {f"batch_{b}": None for b in BATCHES}, "compression": None, "size_ratio": None,
        "runs": {f"batch_{b}": 0 for b in BATCHES}, "notes": notes,
    }
    try:
        _fill_report(report, notes, teacher_module=teacher_module, teacher_onnx=teacher_onnx,
                     teacher_file=Path(teacher_file), teacher_input=tuple(teacher_input), student=student,
                     student_onnx=student_onnx, student_input=tuple(student_input), workdir=Path(workdir),
                     budget_seconds=budget_seconds)
    except Exception as e:  # belt and braces: every step is guarded, but measuring must never fail a job
        notes.append(f"efficiency measurement stopped early: {_describe_error(e)}")
    return report


def _empty_figures() -> dict[str, Any]:
    return {"parameters": None, "macs": None, "macs_source": None, "file_size_bytes": None,
            "onnx_size_bytes": None, "latency_ms": {f"batch_{b}": None for b in BATCHES}}


def _fill_report(report: dict[str, Any], notes: list[str], *, teacher_module: nn.Module | None,
                 teacher_onnx: Path | None, teacher_file: Path, teacher_input: Shape, student: nn.Module,
                 student_onnx: Path | None, student_input: Shape, workdir: Path, budget_seconds: float) -> None:
    t_fig, s_fig = report["teacher"], report["student"]
    workdir.mkdir(parents=True, exist_ok=True)

    t_mod = s_mod = None
    if teacher_module is not None:
        with _guard(notes, "copying the teacher to the CPU"):
            t_mod = cpu_eval_copy(teacher_module)
    elif teacher_onnx is None:
        notes.append("no teacher module or ONNX file was given; the teacher was not measured")
    with _guard(notes, "copying the student to the CPU"):
        s_mod = cpu_eval_copy(student)

    t_onnx = Path(teacher_onnx) if teacher_onnx is not None else None
    if t_onnx is None and t_mod is not None:
        t_onnx = _export_or_none(t_mod, teacher_input, workdir / "teacher.onnx", notes, "teacher")
    s_onnx = Path(student_onnx) if student_onnx is not None else None
    if s_onnx is None and s_mod is not None:
        s_onnx = _export_or_none(s_mod, student_input, workdir / "student.onnx", notes, "student")

    _count(t_fig, notes, "teacher", t_mod, t_onnx, teacher_input)
    _count(s_fig, notes, "student", s_mod, s_onnx, student_input)
    with _guard(notes, "reading the teacher's file size"):
        t_fig["file_size_bytes"] = teacher_file.stat().st_size
    if t_onnx is not None:
        with _guard(notes, "reading the teacher's ONNX size"):
            t_fig["onnx_size_bytes"] = t_onnx.stat().st_size
    if s_onnx is not None:
        with _guard(notes, "reading the student's ONNX size"):
            # The student's deliverable is its ONNX file, so that is its file size too.
            s_fig["onnx_size_bytes"] = s_fig["file_size_bytes"] = s_onnx.stat().st_size

    with _guard(notes, "timing the models"):
        medians = _time_models(report, notes, t_mod, t_onnx, teacher_input, s_mod, s_onnx, student_input,
                               budget_seconds)
        for b, (t_s, s_s) in medians.items():
            report["speedup"][f"batch_{b}"] = _ratio(t_s, s_s)  # from unrounded medians
    report["compression"] = _ratio(t_fig["parameters"], s_fig["parameters"])
    report["size_ratio"] = _ratio(t_fig["file_size_bytes"], s_fig["onnx_size_bytes"])


def _export_or_none(module: nn.Module, shape: Shape, path: Path, notes: list[str], who: str) -> Path | None:
    try:
        export_onnx(module, shape, path)
    except Exception as e:  # exporters raise a zoo of types; timing then falls back to torch
        notes.append(f"exporting the {who} to ONNX failed: {_describe_error(e)}")
        path.unlink(missing_ok=True)
        return None
    return path


def _count(fig: dict[str, Any], notes: list[str], who: str, module: nn.Module | None, onnx_path: Path | None,
           shape: Shape) -> None:
    """Parameters and MACs: from the torch module when there is one, else from its ONNX graph."""
    if module is not None:
        with _guard(notes, f"counting the {who}'s parameters"):
            fig["parameters"] = count_parameters(module)
        with _guard(notes, f"counting the {who}'s MACs with FlopCounterMode"):
            fig["macs"], fig["macs_source"] = flop_counter_macs(module, shape), "flop_counter"
    elif onnx_path is not None:
        with _guard(notes, f"counting the {who}'s ONNX parameters"):
            fig["parameters"] = onnx_parameters(_load_onnx(onnx_path))
    if fig["macs"] is None and onnx_path is not None:
        with _guard(notes, f"estimating the {who}'s MACs from its ONNX graph"):
            macs, skipped = onnx_graph_macs(_load_onnx(onnx_path), shape)
            fig["macs"], fig["macs_source"] = macs, "onnx_graph_estimate"
            if skipped:
                notes.append(f"{skipped} conv/matmul node(s) of the {who}'s ONNX graph had unknown shapes "
                             "and are missing from its MAC estimate")


# ------------------------------------------------------------------------------------------ counting


def cpu_eval_copy(module: nn.Module) -> nn.Module:
    """A float32 CPU copy of `module` in eval mode; the caller's module (maybe on a GPU, maybe training)
    is left untouched."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(module, torch.jit.ScriptModule):
            buf = io.BytesIO()  # a save/load round trip never materialises a second copy on the GPU
            torch.jit.save(module, buf)
            buf.seek(0)
            copy = torch.jit.load(buf, map_location="cpu")
        else:
            # Seeding deepcopy's memo with CPU clones copies the weights straight to the host.
            memo: dict[int, Any] = {}
            for t in itertools.chain(module.parameters(), module.buffers()):
                clone = t.detach().to("cpu", copy=True)
                memo[id(t)] = nn.Parameter(clone, requires_grad=False) if isinstance(t, nn.Parameter) else clone
            copy = copy_module.deepcopy(module, memo)
    copy.float().eval()
    return copy


def count_parameters(module: nn.Module) -> int:
    """Elements in the module's (deduplicated) parameters; ScriptModules included."""
    return int(sum(p.numel() for p in module.parameters()))


def flop_counter_macs(module: nn.Module, shape: Shape) -> int:
    """Multiply-accumulates for one image of `shape` (C, H, W), by PyTorch's FlopCounterMode (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *shape)
    counter = FlopCounterMode(display=False)
    with warnings.catch_warnings(), torch.no_grad(), counter:
        warnings.simplefilter("ignore")
        module(x)
    return int(counter.get_total_flops()) // 2


# ONNX types that hold weights; int64/int32/bool initializers are shapes, axes and indices.
_WEIGHT_TYPES = {"FLOAT", "FLOAT16", "DOUBLE", "BFLOAT16", "INT8", "UINT8", "INT4", "UINT4",
                 "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"}


def onnx_parameters(model: Any) -> int:
    """Elements in the weight-typed initializers of an ONNX ModelProto, subgraphs included (shape and
    index constants are not parameters). Unfolded BatchNorm running statistics count too."""
    import onnx

    weight_types = {getattr(onnx.TensorProto, n) for n in _WEIGHT_TYPES if hasattr(onnx.TensorProto, n)}
    return int(sum(math.prod(t.dims) for t in _initializers(model.graph) if t.data_type in weight_types))


def _initializers(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values  # the stored non-zeros: what the file really holds
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _initializers(sub)


def onnx_graph_macs(model: Any, shape: Shape | None = None) -> tuple[int, int]:
    """Estimate MACs per image of an ONNX ModelProto: (MACs, nodes skipped for unknown shapes).

    The batch is fixed to 1 (a fixed batch b is kept and the total divided by b), symbolic C/H/W dims are
    set from `shape`, shapes are inferred, then Conv, ConvTranspose, Gemm and MatMul (and their quantised
    forms) are counted; everything else is treated as free, as FlopCounterMode does.
    """
    import onnx
    from onnx import inliner

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if m.functions:
        m = inliner.inline_local_functions(m)
    init_names = {t.name for t in m.graph.initializer}
    batch = 1
    inputs = [i for i in m.graph.input if i.name not in init_names]
    if inputs:
        dims = inputs[0].type.tensor_type.shape.dim
        want = [1, *shape] if shape is not None else [1]
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                if axis == 0:
                    batch = d.dim_value
            elif axis < len(want):
                d.dim_value = want[axis]
    with suppress(Exception):  # partial shapes still count; unknown ones are reported as skipped
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    macs, skipped = _graph_macs(m.graph, {})
    return round(macs / batch), skipped


def _graph_macs(graph: Any, outer: dict[str, list[int] | None]) -> tuple[int, int]:
    shapes = dict(outer)
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    for vi in itertools.chain(graph.input, graph.value_info, graph.output):
        shapes[vi.name] = _static_shape(vi)
    macs = skipped = 0
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                sub_macs, sub_skipped = _graph_macs(sub, shapes)
                macs, skipped = macs + sub_macs, skipped + sub_skipped
        if node.op_type not in _MAC_RULES:
            continue
        a_idx, w_idx = _MAC_RULES[node.op_type]
        x = _lookup(shapes, node.input, a_idx)
        w = _lookup(shapes, node.input, w_idx)
        y = _lookup(shapes, node.output, 0)
        n = _node_macs(node, x, w, y)
        if n is None:
            skipped += 1
        else:
            macs += n
    return macs, skipped


# op -> (index of the data/A input, index of the weight/B input)
_MAC_RULES = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "ConvTranspose": (0, 1),
              "Gemm": (0, 1), "MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


def _lookup(shapes: dict[str, list[int] | None], names: Any, i: int) -> list[int] | None:
    return shapes.get(names[i]) if i < len(names) and names[i] else None


def _static_shape(vi: Any) -> list[int] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = t.shape.dim
    return None if any(not d.HasField("dim_value") for d in dims) else [d.dim_value for d in dims]


def _node_macs(node: Any, x: list[int] | None, w: list[int] | None, y: list[int] | None) -> int | None:
    op = node.op_type
    if op == "ConvTranspose":  # each input element meets Cout/groups x kernel weights
        return None if x is None or w is None else math.prod(x) * math.prod(w[1:])
    if op in ("Conv", "ConvInteger", "QLinearConv"):  # each output element: Cin/groups x kernel area
        return None if y is None or w is None else math.prod(y) * math.prod(w[1:])
    if y is None or x is None:
        return None
    if op == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = x[0] if trans_a else x[-1]
    else:
        k = x[-1]
    return math.prod(y) * k


def _load_onnx(path: Path) -> Any:
    import onnx

    # External data would make us read files named inside an untrusted model.
    return onnx.load(str(path), load_external_data=False)


# ------------------------------------------------------------------------------------------ exporting


def export_onnx(module: nn.Module, shape: Shape, path: Path) -> None:
    """Export a CPU eval module to ONNX with a dynamic batch (TorchScript exporter for ScriptModules) and
    check the file reproduces the module's output; raise on any failure."""
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(module, torch.jit.ScriptModule):
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        else:
            write_onnx(module, example, path)
        with torch.inference_mode():
            ref = module(example)
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"the model returns {type(ref).__name__}, not a tensor")
    session = _ort_session(_load_onnx(path), torch.get_num_threads())
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    ref_np = ref.float().numpy()
    # Loose on purpose: this only guards against timing a graph that computes something else.
    atol = 1e-3 * max(1.0, float(np.abs(ref_np).max()))
    if got.shape != ref_np.shape or not np.allclose(got, ref_np, rtol=1e-2, atol=atol):
        raise ValueError("the exported ONNX file does not reproduce the model's output")


# ------------------------------------------------------------------------------------------ timing


def _time_models(report: dict[str, Any], notes: list[str], t_mod: nn.Module | None, t_onnx: Path | None,
                 t_shape: Shape, s_mod: nn.Module | None, s_onnx: Path | None, s_shape: Shape,
                 budget: float) -> dict[int, tuple[float, float]]:
    """Fill the latencies in `report`; return the unrounded medians (seconds) per batch size."""
    threads = report["threads"]
    runners: tuple[dict[int, Run], dict[int, Run]] | None = None
    why_not_ort = None
    if t_onnx is not None and s_onnx is not None:
        try:
            t_runs, t_note = ort_runs(t_onnx, t_shape, threads)
            s_runs, s_note = ort_runs(s_onnx, s_shape, threads)
            runners = (t_runs, s_runs)
            notes.extend(f"{who} {n}" for who, n in (("teacher", t_note), ("student", s_note)) if n)
        except Exception as e:  # onnxruntime could not load or run one of them
            why_not_ort = f"onnxruntime could not run both models ({_describe_error(e)})"
    else:
        missing = " and ".join(w for w, p in (("teacher", t_onnx), ("student", s_onnx)) if p is None)
        why_not_ort = f"there is no ONNX file of the {missing}"
    if runners is None:
        if t_mod is None or s_mod is None:
            notes.append(f"latency was not measured: {why_not_ort}, and a torch comparison needs both modules")
            return {}
        report["runtime"] = "torch"
        notes.append(f"latency measured with torch on CPU for both models: {why_not_ort}")
        runners = (torch_runs(t_mod, t_shape), torch_runs(s_mod, s_shape))
    result = measure_latency(*runners, budget_seconds=budget)
    for b in BATCHES:
        key = f"batch_{b}"
        report["runs"][key] = result["runs"][b]
        for who, i in (("teacher", 0), ("student", 1)):
            report[who]["latency_ms"][key] = round(result["median_s"][b][i] * 1000, 3)
    return result["median_s"]


def _ort_session(model: Any, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # Spinning threads of one session would steal cores from the other between interleaved runs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_runs(path: Path, shape: Shape, threads: int) -> tuple[dict[int, Run], str | None]:
    """One ONNX Runtime (CPU) call per batch size in BATCHES on random inputs, plus a note when the model's
    batch is fixed: then a batch of n is ceil(n / fixed) calls of the fixed batch, as a distiller runs it."""
    session = _ort_session(_load_onnx(path), threads)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"{path.name} takes {len(inputs)} inputs; an image classifier takes one")
    inp = inputs[0]
    dtype = ORT_INPUT_TYPES.get(inp.type)
    if dtype is None:
        raise ValueError(f"{path.name} takes {inp.type} input, not float images")
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    rng = np.random.default_rng(0)
    runs: dict[int, Run] = {}
    for b in BATCHES:
        rows = fixed or b
        calls = math.ceil(b / rows)
        feed = {inp.name: rng.standard_normal((rows, *shape)).astype(dtype)}
        runs[b] = _repeat(session.run, None, feed, calls)
    runs[1]()  # fail here, not mid-timing, if the model cannot run this input
    note = None
    if fixed:
        note = (f"ONNX file has a fixed batch of {fixed}: a batch of n is timed as ceil(n/{fixed}) calls "
                f"of {fixed} (batch 1: {math.ceil(1 / fixed)} call, batch 32: {math.ceil(32 / fixed)} calls)")
    return runs, note


def _repeat(fn: Callable[..., object], a: object, b: object, calls: int) -> Run:
    if calls == 1:
        return lambda: fn(a, b)

    def run() -> None:
        for _ in range(calls):
            fn(a, b)

    return run


def torch_runs(module: nn.Module, shape: Shape) -> dict[int, Run]:
    """One torch CPU forward per batch size in BATCHES on random inputs, under inference_mode."""
    g = torch.Generator().manual_seed(0)
    runs: dict[int, Run] = {}
    for b in BATCHES:
        x = torch.randn(b, *shape, generator=g)

        def run(x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return module(x)

        runs[b] = run
    return runs


def measure_latency(teacher: dict[int, Run], student: dict[int, Run], *,
                    budget_seconds: float) -> dict[str, Any]:
    """Time teacher and student interleaved (teacher, student, teacher, ...) per batch size after warm-up;
    returns {"median_s": {batch: (teacher, student)}, "runs": {batch: n}}.

    At least MIN_RUNS timed runs each, then more (up to MAX_RUNS) while the budget, split across batch
    sizes in proportion to their cost, allows; so a slow model overruns the budget by at most 3 runs.
    """
    start = time.perf_counter()
    pair_cost: dict[int, float] = {}
    for b in BATCHES:
        for _ in range(2 if b == 1 else 1):  # the first runs allocate; batch 1 is cheap enough for two
            t0 = time.perf_counter()
            teacher[b]()
            student[b]()
            pair_cost[b] = time.perf_counter() - t0
    medians: dict[int, tuple[float, float]] = {}
    runs: dict[int, int] = {}
    for i, b in enumerate(BATCHES):
        left = budget_seconds - (time.perf_counter() - start)
        share = left * pair_cost[b] / max(sum(pair_cost[c] for c in BATCHES[i:]), 1e-9)
        deadline = time.perf_counter() + share
        times: tuple[list[float], list[float]] = ([], [])
        last = pair_cost[b]
        while len(times[0]) < MIN_RUNS or (len(times[0]) < MAX_RUNS and time.perf_counter() + last <= deadline):
            pair_start = time.perf_counter()
            for fn, out in ((teacher[b], times[0]), (student[b], times[1])):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            last = time.perf_counter() - pair_start
        medians[b] = (statistics.median(times[0]), statistics.median(times[1]))
        runs[b] = len(times[0])
    return {"median_s": medians, "runs": runs}


# ------------------------------------------------------------------------------------------ helpers


@contextmanager
def _guard(notes: list[str], what: str) -> Iterator[None]:
    """Turn any failure inside into a note; KeyboardInterrupt and SystemExit pass through."""
    try:
        yield
    except Exception as e:  # measuring must never fail the job
        notes.append(f"{what} failed: {_describe_error(e)}")


def _describe_error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None
