"""The job spec: what a distillation run needs, validated at the edge (pydantic) with actionable errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError

TeacherFormat = Literal["safetensors", "state_dict", "onnx", "torchscript"]
ExportFormat = Literal["onnx", "torchscript", "torch_export", "onnx_fp16", "onnx_int8"]
# data.augment: True means "standard"; "consistent" is function matching (teacher and student see one view)
AugmentMode = bool | Literal["standard", "consistent"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """What a model eats: channels, square-or-not size, and the per-channel normalisation."""

    channels: Annotated[int, Field(ge=1, le=4)] = 3
    size: tuple[Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)]] = (224, 224)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @field_validator("size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return tuple(float(x) for x in v.split(",") if x.strip())
            except ValueError as e:
                raise ValueError(f"expected comma-separated floats, got {v!r}") from e
        return v

    @field_validator("mean", "std", mode="after")
    @classmethod
    def _per_channel(cls, v: tuple[float, ...] | None, info: ValidationInfo) -> tuple[float, ...] | None:
        # a field validator (not a model one) so that errors name the field: mean or std
        channels = info.data.get("channels", 3)
        if v is not None and len(v) not in (1, channels):
            raise ValueError(f"{info.field_name} has {len(v)} values; give 1 or one per channel ({channels})")
        if info.field_name == "std" and v is not None and any(s <= 0 for s in v):
            raise ValueError("std values must be > 0")
        return v

    def resolved_mean(self) -> tuple[float, ...]:
        return _per_channel(self.mean, self.channels, IMAGENET_MEAN if self.channels == 3 else (0.5,))

    def resolved_std(self) -> tuple[float, ...]:
        return _per_channel(self.std, self.channels, IMAGENET_STD if self.channels == 3 else (0.5,))

    def describe(self) -> dict[str, Any]:
        return {"channels": self.channels, "size": list(self.size),
                "mean": list(self.resolved_mean()), "std": list(self.resolved_std())}


def _per_channel(vals: tuple[float, ...] | None, channels: int, default: tuple[float, ...]) -> tuple[float, ...]:
    vals = vals if vals is not None else default
    if len(vals) == channels:
        return tuple(vals)
    if len(vals) == 1:
        return tuple(vals) * channels
    return (sum(vals) / len(vals),) * channels  # a 3-channel default for a grey model: its average


class TeacherSpec(_Strict):
    path: str
    format: TeacherFormat | None = None  # None: decided by the file's suffix and content
    arch: str | None = None  # required for state dicts
    num_classes: Annotated[int, Field(ge=2)] | None = None
    input: InputSpec = InputSpec()
    # names of outputs 0..N-1; None: read from the file when it carries them, else output i is dataset class i
    classes: list[str] | None = None

    @field_validator("classes", mode="before")
    @classmethod
    def _class_names(cls, v: Any) -> Any:
        from .label_map import parse_class_names

        return None if v is None else parse_class_names(v)


class StudentSpec(_Strict):
    arch: str
    input: InputSpec | None = None  # None: the teacher's input spec
    weights: str | None = None  # initial weights: safetensors or a .pt state dict


def room_to_train(test_fraction: float, info: ValidationInfo) -> float:
    """A `test_fraction` validator: validation and test together must leave labelled data to train on."""
    val = info.data.get("val_fraction", 0.2)
    if test_fraction + val >= 1:
        raise ValueError(f"val_fraction ({val}) and test_fraction ({test_fraction}) leave nothing to train on; "
                         "keep their sum below 1")
    return test_fraction


class DataSpec(_Strict):
    path: str
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # carved from the labelled data when the dataset has no test split; 0 keeps every label for training
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    augment: AugmentMode = False
    max_files: Annotated[int, Field(ge=1)] = 200_000
    max_unpacked_bytes: Annotated[int, Field(ge=1)] = 8 << 30
    max_decoded_bytes: Annotated[int, Field(ge=1)] = 8 << 30

    @field_validator("test_fraction", mode="after")
    @classmethod
    def _room_to_train(cls, v: float, info: ValidationInfo) -> float:
        return room_to_train(v, info)


class Hyperparameters(_Strict):
    """Training and distillation settings; the names are part of the public API contract. Each description is
    the one-line help the dashboard and the OpenAPI document show."""

    epochs: Annotated[int, Field(ge=1, le=10_000, description="passes over the training set")] = 10
    batch_size: Annotated[int, Field(ge=1, le=65_536, description="samples per optimiser step")] = 128
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="sgd (with momentum), adam or adamw")
    learning_rate: Annotated[float, Field(gt=0, le=10, description="peak learning rate of the schedule")] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1, description="SGD momentum (sgd only)")] = 0.9
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only)")
    weight_decay: Annotated[float, Field(ge=0, le=1, description="L2 penalty on the weights")] = 5e-4
    scheduler: Literal["cosine", "step", "onecycle", "constant"] = Field(
        "cosine", description="how the learning rate changes over the epochs")
    warmup_epochs: Annotated[float, Field(ge=0, description="epochs of linear warm-up before the schedule")] = 0.0
    step_size: Annotated[int, Field(ge=1, description="epochs between decays (step schedule)")] = 30
    gamma: Annotated[float, Field(gt=0, le=1, description="factor of each decay (step schedule)")] = 0.1
    grad_clip: Annotated[float, Field(gt=0)] | None = Field(None, description="clip the gradient norm to this; empty: "
                                                            "no clipping")
    temperature: Annotated[float, Field(gt=0, le=100, description="softens both output distributions; the "
                                        "distillation term is scaled by its square (Hinton et al. 2015)")] = 4.0
    alpha: Annotated[float, Field(ge=0, le=1, description="weight of the distillation term; 1 - alpha goes to the "
                                  "labels' cross-entropy")] = 0.9
    distillation: Literal["soft", "hard", "dkd"] = Field(
        "soft", description="soft: KL to the teacher's softened outputs; hard: cross-entropy on its argmax; dkd: "
        "decoupled KD (Zhao et al. 2022)")
    standardize: bool = Field(False, description="z-score both logit vectors before the softmax (soft and dkd; "
                              "Sun et al. 2024)")
    dkd_alpha: Annotated[float, Field(ge=0, le=100, description="DKD: weight of the target-class term")] = 1.0
    dkd_beta: Annotated[float, Field(ge=0, le=100, description="DKD: weight of the non-target term")] = 8.0
    dkd_warmup: Annotated[float, Field(ge=0, le=10_000, description="DKD: epochs over which its weight ramps from "
                                       "0 to 1")] = 1.0
    feature_distillation: Literal["attention"] | None = Field(
        None, description="attention: also match the teacher's attention maps (needs a teacher given as a "
        "registry architecture); empty: logits only")
    # RepDistiller uses 1000 on 32x32 CIFAR; the term grows as the maps shrink (it is a mean over their cells),
    # and 1000 swamps the logit term on 8x8 images (0.64 vs 0.98 held-out on digits), while 100 matches it
    feature_weight: Annotated[float, Field(ge=0, le=1e6, description="weight of the feature term")] = 100.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1, description="label smoothing of the labels' "
                                            "cross-entropy")] = 0.0
    class_weights: Literal["auto"] | list[float] | None = Field(
        None, description='per-class weights of the labels\' cross-entropy; "auto": inverse class frequency')
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training precision; auto: bf16 or fp16 on a GPU that has it, fp32 on the CPU")
    channels_last: bool = Field(False, description="channels-last memory format (faster convolutions on GPUs)")
    seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="seed of every random choice of the run")] = 0
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("class_weights", mode="after")
    @classmethod
    def _positive_weights(cls, v: Any) -> Any:
        # a zero weight would silently drop that class's labels; a negative one would train against them
        if isinstance(v, list):
            bad = [(i, w) for i, w in enumerate(v) if not (w > 0 and math.isfinite(w))]
            if bad:
                i, w = bad[0]
                raise ValueError(f"class weights must be positive numbers; class {i} has {w}. To leave a class "
                                 "out, remove it from the dataset")
        return v

    @field_validator("standardize", mode="after")
    @classmethod
    def _standardize(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("distillation") == "hard":
            raise ValueError("standardize applies to soft and dkd distillation; hard distillation uses the "
                             "teacher's argmax, which standardizing does not change")
        return v

    @field_validator("warmup_epochs", mode="after")
    @classmethod
    def _warmup(cls, v: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")
        if epochs is not None and v > 0 and v >= epochs:
            raise ValueError(f"warmup_epochs ({v}) must be below epochs ({epochs})")
        return v


class Checks(_Strict):
    """What the job does when a pre-training check fails: `fail` stops it, `warn` records a warning."""

    teacher: Literal["fail", "warn"] = "fail"


class JobSpec(_Strict):
    """A whole run: teacher, student, data, hyperparameters, exports and where the files go."""

    teacher: TeacherSpec
    student: StudentSpec
    data: DataSpec
    hyperparameters: Hyperparameters = Hyperparameters()
    export_formats: list[ExportFormat] = ["torchscript", "onnx"]
    export_atol: Annotated[float, Field(gt=0)] = 1e-4
    # onnx_fp16 / onnx_int8 losing more accuracy than this (absolute, vs the fp32 ONNX) are flagged in warnings
    max_export_accuracy_drop: Annotated[float, Field(ge=0, le=1)] = 0.01
    baseline: bool = False
    checks: Checks = Checks()
    output_dir: str = "artifacts"
    checkpoint_dir: str | None = None  # None: <output_dir>/checkpoints
    progress_interval: Annotated[float, Field(ge=0)] = 1.0  # seconds between progress reports
    allow_torchscript_teacher: bool = True


def parse_model(model: type[BaseModel], data: Any, *, prefix: str = "") -> Any:
    """Validate `data` as `model`, turning pydantic's error into a ConfigError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise config_error_from(e, prefix=prefix) from None


def config_error_from(e: ValidationError, *, prefix: str = "") -> ConfigError:
    first = e.errors()[0]
    field = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    code = "invalid_hyperparameter" if field.startswith("hyperparameters") else "invalid_config"
    msg = first["msg"].removeprefix("Value error, ")
    if first.get("input") is not None and first["type"] != "missing":
        msg += f" (got {first['input']!r})"
    return ConfigError(f"{field or 'spec'}: {msg}", field=field or None, code=code)


def load_spec(path: str | Path) -> JobSpec:
    """Read a job spec from YAML or JSON; relative paths inside it are taken from the spec's folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read job spec {p}: {e.strerror}", code="spec_not_found") from None
    try:
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping at the top level")
    return resolve_paths(parse_model(JobSpec, raw), p.parent)


def resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    def rel(s: str | None) -> str | None:
        return None if s is None else str((base / s).resolve()) if not Path(s).is_absolute() else s

    return spec.model_copy(update={
        "teacher": spec.teacher.model_copy(update={"path": rel(spec.teacher.path)}),
        "student": spec.student.model_copy(update={"weights": rel(spec.student.weights)}),
        "data": spec.data.model_copy(update={"path": rel(spec.data.path)}),
        "output_dir": rel(spec.output_dir),
        "checkpoint_dir": rel(spec.checkpoint_dir),
    })


def augment_mode(augment: AugmentMode) -> Literal["none", "standard", "consistent"]:
    """`data.augment` as one of three modes (the API keeps accepting true/false)."""
    if augment is True:
        return "standard"
    return "none" if augment is False else augment


def checkpoint_folder(spec: JobSpec) -> Path:
    """Where a run keeps its per-epoch checkpoints: `checkpoint_dir`, else `<output_dir>/checkpoints`."""
    return Path(spec.checkpoint_dir) if spec.checkpoint_dir else Path(spec.output_dir) / "checkpoints"
