"""One configuration for the whole pipeline: every stage's settings in one typed object (`PipelineConfig`) whose
defaults are the library's own, and named presets that override some of them.

Presets are versioned TOML files in `scaffold_lib/presets/` (`micro`, `demo`, …), or a file of one's own given by its
path; a preset may `extends` another.
The Dagster definitions, the `scaffold` CLI and the demo all resolve their settings here, so the same preset gives
the same numbers from any entry point. An instance (a `$DAGSTER_HOME`) records the preset it was set up with in
`scaffold.toml` — scheduled and sensor-started runs use it — until the user changes it (`scaffold init`).

The sections' classes live in `data/config.py`, `student/config.py` and `evaluation/config.py`, which import pydantic
and light modules only: reading a configuration never imports torch, a database or an HTTP client.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from difflib import get_close_matches
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from scaffold_lib.core.errors import UserError
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.config import LabellerConfig, ProblemsConfig, SegmentationConfig, TeacherConfig
from scaffold_lib.evaluation.config import DecontaminationConfig, EvalConfig, PromotionConfig
from scaffold_lib.student.config import ShardsConfig, SignalInjection, StudentConfig, TrainConfig

INSTANCE_FILE = "scaffold.toml"
DEFAULT_PRESET = "demo"  # what an instance that never chose one runs


class ExperimentConfig(BaseModel):
    """Seeds; the grids searched on validation (τ for every seed; signal injection and β on the first seed); test is
    scored once, the OOD suites the warehouse holds too; optional sample-efficiency fractions."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="training seeds per arm")
    taus: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 0.8, 0.9, 0.96],
        description="τ values tried on validation; the best mean Pass@1 is used on test",
    )
    betas: list[float] = Field(
        default_factory=list, description="β values tried on validation (first seed); empty: the train section's β"
    )
    injections: list[SignalInjection] = Field(
        default_factory=list,
        description="signal injections tried on validation (first seed); empty: the student section's",
    )
    fractions: list[float] = Field(
        default_factory=list,
        description="shares of the training data both arms are also trained on (first seed) for the "
        "sample-efficiency curve; the full data is the main run",
    )
    ood_limit: int | None = Field(None, ge=1, description="items per OOD suite (default: all)")
    validation_limit: int | None = Field(None, ge=1, description="validation items (default: all)")
    test_limit: int | None = Field(None, ge=1, description="test items (default: all)")
    bootstrap: int = Field(10_000, ge=100, description="paired bootstrap resamples")
    smallest_effect: float = Field(
        0.03,
        gt=0,
        le=1,
        description="smallest effect of interest (Pass@1 share): a primary interval wholly inside ± it reads "
        "'equivalent', one that straddles 0 and reaches past it 'inconclusive'",
    )


class PipelineConfig(BaseModel):
    """Every setting of the pipeline, one section per stage."""

    problems: ProblemsConfig = Field(default_factory=ProblemsConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    labeller: LabellerConfig = Field(default_factory=LabellerConfig)
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)


SECTIONS: tuple[str, ...] = tuple(PipelineConfig.model_fields)


class ConfigError(UserError):
    """A preset, an instance file or an override is not valid; the message names the file and the setting."""


@dataclass(frozen=True)
class Resolved:
    """A pipeline configuration and where it came from."""

    preset: str
    preset_version: int
    overrides: dict
    config: PipelineConfig

    @property
    def config_hash(self) -> str:
        return content_id("pipeline-config", self.config.model_dump())

    def describe(self) -> str:
        extra = f" with {len(flatten(self.overrides))} override(s)" if self.overrides else ""
        return f"preset {self.preset} v{self.preset_version}{extra} (config {self.config_hash})"


# --- presets -------------------------------------------------------------------------------------------------------


def _preset_files() -> dict[str, Any]:
    folder = resources.files("scaffold_lib").joinpath("presets")
    return {p.name.removesuffix(".toml"): p for p in folder.iterdir() if p.name.endswith(".toml")}


def preset_names() -> list[str]:
    return sorted(_preset_files())


def preset_info(name: str) -> dict:
    """The raw preset: description, version, extends and its settings. `name` is a preset's name, or the path of a
    preset file of one's own (a `.toml`, which may extend a named preset)."""
    files = _preset_files()
    if name.endswith(".toml"):
        source, label = Path(name), name
    elif name in files:
        source, label = files[name], f"presets/{name}.toml"
    else:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(files))}")
    try:
        data = tomllib.loads(source.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from exc
    if not name.endswith(".toml"):  # one of ours: described and versioned; a file of one's own need not be
        for key in ("description", "version"):
            if key not in data:
                raise ConfigError(f"{label}: missing {key!r}")
    return {"description": f"the preset file {name}", "version": 0, **data}


def preset_settings(name: str, _seen: tuple[str, ...] = ()) -> tuple[dict, int]:
    """(settings of the preset with those of what it extends underneath, its version)."""
    if name in _seen:
        raise ConfigError(f"presets extend each other in a circle: {' -> '.join((*_seen, name))}")
    data = preset_info(name)
    own = {k: v for k, v in data.items() if k not in ("description", "version", "extends")}
    check_keys(PipelineConfig, own, name if name.endswith(".toml") else f"presets/{name}.toml")
    if data.get("extends"):
        below, _ = preset_settings(data["extends"], (*_seen, name))
        own = deep_merge(below, own)
    return own, int(data["version"])


def load_preset(name: str, overrides: dict | None = None) -> Resolved:
    settings, version = preset_settings(name)
    overrides = overrides or {}
    check_keys(PipelineConfig, overrides, "overrides")
    try:
        config = PipelineConfig.model_validate(deep_merge(settings, overrides))
    except ValidationError as exc:
        raise ConfigError(f"preset {name!r}{' with overrides' if overrides else ''}: {_errors(exc)}") from exc
    return Resolved(name, version, overrides, config)


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


# --- settings as nested dicts ------------------------------------------------------------------------------------


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_path(tree: dict, path: str, value: Any) -> dict:
    """Put `value` at the dotted `path` (`train.max_steps`) of a nested dict, creating the sections on the way."""
    *parents, last = path.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return tree


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def check_keys(model: type[BaseModel], data: dict, where: str, prefix: str = "") -> None:
    """Every key names a setting (a typo must not be ignored), with a suggestion when one is close."""
    for key, value in data.items():
        fields = model.model_fields
        path = f"{prefix}{key}"
        if key not in fields:
            close = get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; settings here: {', '.join(fields)}"
            raise ConfigError(f"{where}: unknown setting {path!r}{hint}")
        annotation = fields[key].annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            check_keys(annotation, value, where, f"{path}.")


def parse_assignments(assignments: list[str]) -> dict:
    """`["train.max_steps=400", "eval.suites=['heldout','gsm8k']"]` -> nested dict; values are TOML literals (a bare
    word is a string)."""
    out: dict = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, raw = (part.strip() for part in item.split("=", 1))
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        set_path(out, path, value)
    return out


# --- the instance's choice -----------------------------------------------------------------------------------------


def instance_file(home: str | Path) -> Path:
    return Path(home) / INSTANCE_FILE


def instance_settings(home: str | Path) -> tuple[str, dict]:
    """(preset, overrides) recorded for the instance at `home`; the default preset when it never chose one."""
    path = instance_file(home)
    if not path.exists():
        return DEFAULT_PRESET, {}
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the instance settings: {exc}") from exc
    preset = data.get("preset", DEFAULT_PRESET)
    overrides: dict = {}
    for key, value in data.get("overrides", {}).items():
        set_path(overrides, key, value)
    check_keys(PipelineConfig, overrides, str(path))
    return preset, overrides


def save_instance_settings(home: str | Path, preset: str, overrides: dict | None = None) -> Path:
    """Record the preset (and overrides) the instance at `home` runs with; validated first."""
    load_preset(preset, overrides)
    path = instance_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# The settings this instance runs with: scheduled and sensor-started runs, `scaffold` commands and the",
        "# Dagster launchpad's defaults. Change with `scaffold init --preset NAME [--set section.key=value]`.",
        f"preset = {json.dumps(preset)}",
        "",
        "[overrides]",
    ]
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in flatten(overrides or {}).items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", "utf-8")
    tmp.replace(path)
    return path


def resolve(home: str | Path, preset: str | None = None, overrides: dict | None = None) -> Resolved:
    """The configuration of a run: `preset` (default: the instance's), its recorded overrides when the preset is the
    instance's own, then `overrides`."""
    recorded_preset, recorded = instance_settings(home)
    name = preset or recorded_preset
    base = recorded if name == recorded_preset else {}
    return load_preset(name, deep_merge(base, overrides or {}))
