"""The data stages' settings: the `problems`, `teacher`, `segmentation` and `labeller` sections of `PipelineConfig`,
and the settings of the clients they nest (an OpenAI-compatible endpoint, a prompt, a local HF model).

This module imports pydantic and light modules only (never a database, an HTTP client or a model library), so the
configuration can be read anywhere — by `scaffold --help`, and on a machine that has none of those installed.
A settings class that only shapes one light module (the generator's, the keyword labeller's, the programmatic
teacher's, a trace file's columns) stays beside the code it shapes.
"""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, SecretStr, field_validator

from scaffold_lib.core.errors import UserError
from scaffold_lib.data.problem_files import FieldMap
from scaffold_lib.data.problems import OOD_SPLITS, SPLITS, SplitConfig
from scaffold_lib.data.reasoning_gym_problems import ReasoningGymConfig
from scaffold_lib.data.signals import KeywordLabellerConfig
from scaffold_lib.data.synthetic import GeneratorConfig, OODConfig
from scaffold_lib.data.teachers import DEFAULT_PROMPT, ProgrammaticTeacherConfig
from scaffold_lib.data.trace_formats import TraceFieldMap, TraceFormat

TeacherBackend = Literal["auto", "programmatic", "reference", "openai", "hf", "import"]
Segmenter = Literal["blank_line", "line", "auto"]
SEGMENTERS: tuple[str, ...] = get_args(Segmenter)


class ProblemsConfig(BaseModel):
    """Where the problems come from and how they are split."""

    source: Literal["synthetic", "reasoning_gym", "files"] = Field(
        "synthetic",
        description="synthetic: the built-in generator; reasoning_gym: a reasoning-gym dataset; "
        "files: only the problem files",
    )
    synthetic: GeneratorConfig = Field(default_factory=GeneratorConfig)
    ood: OODConfig = Field(default_factory=OODConfig)
    reasoning_gym: ReasoningGymConfig = Field(default_factory=ReasoningGymConfig)
    files: list[str] = Field(default_factory=list, description="problem files (JSONL/Parquet), loaded with `fields`")
    fields: FieldMap = Field(default_factory=FieldMap)
    watch_dir: str | None = Field(
        None,
        description="every problem file here is loaded too (default: "
        "$DAGSTER_HOME/incoming, which the file sensor watches)",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    lenient: bool = Field(True, description="quarantine bad rows of problem files instead of failing")


# --- clients of the teacher and the labeller ----------------------------------------------------------------------


class EndpointConfigError(UserError):
    """The endpoint refuses every request (bad key, unknown model, wrong URL): stop instead of failing each one."""


class EndpointConfig(BaseModel):
    """Where and how to call the endpoint. The API key is a secret: it comes from the environment variable named by
    `api_key_env` (or is handed in at run time as `api_key`, e.g. from a Dagster `EnvVar`), is excluded from every
    dump of this config, and never enters ids, params or logs."""

    base_urls: list[str] = Field(
        default_factory=list, description="one or more /v1 base URLs; requests are spread over them"
    )
    model: str = Field("", description="the model name the endpoint serves")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    api_key: SecretStr | None = Field(None, exclude=True, repr=False)
    concurrency: int = Field(64, ge=1, description="requests in flight at once, over all base URLs")
    timeout_s: float = Field(600.0, gt=0, description="per request")
    max_attempts: int = Field(6, ge=1, description="tries per request, the first included")
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    stream: bool = Field(False, description="stream tokens (keeps long generations alive behind proxies)")
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = Field(4096, ge=1)
    seed: int | None = None

    def require(self, what: str) -> EndpointConfig:
        """This config, or a clear error when it cannot reach anything."""
        if not self.base_urls or not self.model:
            raise EndpointConfigError(
                f"{what}: set endpoint.base_urls and endpoint.model (e.g. "
                "base_urls=['http://127.0.0.1:8000/v1'], model='deepseek-ai/DeepSeek-R1-Distill-Qwen-7B')"
            )
        return self

    def secret(self) -> str:
        """The API key: handed in, else from the environment, else "EMPTY" (local servers accept any)."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(self.api_key_env) or "EMPTY"

    def sampling(self) -> dict[str, Any]:
        """What decides the output, for content ids: never the URL (any replica serves the same model) nor the key."""
        return {
            "model": self.model,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }


class PromptConfig(BaseModel):
    system_prompt: str | None = None
    user_template: str = Field(DEFAULT_PROMPT, description="must contain {question}")
    samples: int = Field(1, ge=1, description="traces per problem (one request each, so each resumes alone)")

    @field_validator("user_template")
    @classmethod
    def _has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("user_template must contain the placeholder {question}")
        return value

    def messages(self, problem) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": self.user_template.replace("{question}", problem.question)}]


class HFTeacherConfig(BaseModel):
    model: str = Field("", description="hub id or local path of a causal LM")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = 1.0
    device: str = "auto"
    seed: int = 0


# --- the teacher, segmentation and labeller sections --------------------------------------------------------------


class TeacherConfig(BaseModel):
    """Which teacher writes the traces, and how."""

    backend: TeacherBackend = Field(
        "auto",
        description="auto: per source (programmatic for the built-in problems; for the others the configured "
        "endpoint or local model, else their worked solutions); programmatic: the built-in teacher of the synthetic "
        "problems; reference: the worked solutions shipped with the problems; openai: any OpenAI-compatible endpoint; "
        "hf: a local causal LM; import: an existing trace file or HF dataset",
        json_schema_extra={"flag": "teacher"},
    )
    programmatic: ProgrammaticTeacherConfig = Field(default_factory=ProgrammaticTeacherConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    hf: HFTeacherConfig = Field(default_factory=HFTeacherConfig)
    import_source: str = Field(
        "",
        description="for backend 'import': a .jsonl/.parquet file or a folder of them, a dataset saved with "
        "save_to_disk, or an HF dataset name; its problems and gold answers are loaded too when it has them",
    )
    import_format: TraceFormat = Field(
        "auto",
        description="the shape of the import: openr1 (generations lists), s1k (thinking/attempt columns), columns "
        "(one trace column), messages (role/content chats), sharegpt (from/value chats), or auto (detected, and said)",
        json_schema_extra={"flag": "format"},
    )
    import_fields: TraceFieldMap = Field(default_factory=TraceFieldMap)
    import_split: str = Field("train", description="the split of a saved or hub dataset to import")
    splits: list[str] = Field(
        default_factory=lambda: [*SPLITS, *OOD_SPLITS],
        description="problems of these splits are traced (held-out traces give golden signals)",
    )
    journal_dir: str | None = Field(None, description="completions are journalled here; default <home>/journals")
    batch_problems: int = Field(
        10_000, ge=1, description="problems per batch (traces are written as each batch completes; bounds memory)"
    )
    progress: bool = True


class SegmentationConfig(BaseModel):
    """How traces are cut into steps: one segmenter for all teachers, or one per teacher identity."""

    segmenter: Segmenter = Field("auto", description="blank_line (the paper, R1-style), line (GSM8K-style), or auto")
    per_teacher: dict[str, Segmenter] = Field(default_factory=dict, description="teacher identity -> segmenter")

    def for_teacher(self, teacher: str) -> str:
        return self.per_teacher.get(teacher, self.segmenter)


class LabellerConfig(KeywordLabellerConfig):
    """The keyword labeller (always), then, with `validate_with_llm`, an LLM through an endpoint that confirms or
    corrects each keyword label and labels the steps no keyword matched (the paper's second stage)."""

    validate_with_llm: bool = False
    endpoint: EndpointConfig = Field(default_factory=lambda: EndpointConfig(temperature=0.0, max_tokens=64))
    max_reasks: int = Field(2, ge=0)
    structured_output: bool = False
    progress: bool = True
