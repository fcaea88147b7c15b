"""Resources: where the warehouse, the MLflow registry and the artifacts live, which teacher and which student.
Defaults are the embedded default below $DAGSTER_HOME; secrets come only from the environment (`EnvVar`)."""

from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field, SecretStr

from scaffold_lib.core import paths
from scaffold_lib.student.model import EMBEDDED, StudentConfig
from scaffold_lib.store.registry import RegistryConfig, sqlite_config
from scaffold_lib.data.endpoint import EndpointConfig
from scaffold_lib.data.label_validation import LabelValidator, ValidatorConfig
from scaffold_lib.data.llm_teachers import EndpointTeacher, HFTeacher, HFTeacherConfig, PromptConfig
from scaffold_lib.data.problems import ProblemFileError
from scaffold_lib.data.signals import LabellerConfig
from scaffold_lib.data.teachers import DEFAULT_PROMPT, ProgrammaticTeacher, ProgrammaticTeacherConfig, Teacher
from scaffold_lib.data.trace_import import ImportedTeacher, TraceFieldMap
from scaffold_lib.store.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB file holding every stage table and the row-level lineage."""

    path: str = Field(default_factory=lambda: str(paths.default_warehouse()))
    lock_timeout_s: float = 600.0

    def open(self) -> Warehouse:
        return Warehouse(self.path, self.lock_timeout_s)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + registry (sqlite under DAGSTER_HOME by default) and the registered model name."""

    tracking_uri: str = Field(default_factory=lambda: sqlite_config(paths.dagster_home()).tracking_uri)
    artifact_location: str = Field(default_factory=lambda: sqlite_config(paths.dagster_home()).artifact_location)
    model_name: str = "scaffold-student"
    promotion_margin: float = Field(0.0, description="accuracy a challenger must add over the champion")
    promotion_suite: str = Field("synthetic-arith", description="the suite whose predicted-signal Pass@1 decides")

    def config(self) -> RegistryConfig:
        return RegistryConfig(tracking_uri=self.tracking_uri, artifact_location=self.artifact_location,
                              model_name=self.model_name)


class EndpointSettings(dg.Config):
    """An OpenAI-compatible endpoint (vLLM, SGLang, Ollama, OpenAI). Set `api_key` with dg.EnvVar: it is never
    logged, stored or part of any id."""

    base_urls: list[str] = Field(default_factory=list, description="e.g. ['http://127.0.0.1:8000/v1']")
    model: str = ""
    api_key: str = Field("EMPTY", description="dg.EnvVar('OPENAI_API_KEY'); local servers accept any")
    concurrency: int = 64
    timeout_s: float = 600.0
    max_attempts: int = 6
    stream: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 4096
    seed: int | None = None

    def build(self, what: str) -> EndpointConfig:
        if not self.base_urls or not self.model:
            raise dg.Failure(f"{what}: set endpoint.base_urls and endpoint.model (see the README's vLLM example)")
        return EndpointConfig(**self.model_dump(exclude={"api_key"}), api_key=SecretStr(self.api_key))


def journal_dir() -> str:
    return str(paths.dagster_home() / "journals")


class TeacherResource(dg.ConfigurableResource):
    """Which teacher writes the traces: `programmatic` (the offline embedded default), `openai` (any
    OpenAI-compatible endpoint), `hf` (a local causal LM) or `import` (an existing trace file / HF dataset)."""

    backend: Literal["programmatic", "openai", "hf", "import"] = "programmatic"
    seed: int = 0
    wrong_fraction: float = 0.1
    endpoint: EndpointSettings = Field(default_factory=EndpointSettings)
    system_prompt: str | None = None
    user_template: str = DEFAULT_PROMPT
    samples: int = Field(1, description="traces per problem")
    hf_model: str = Field("", description="hub id or local path for backend 'hf'")
    hf_batch_size: int = 8
    hf_max_new_tokens: int = 1024
    import_source: str = Field("", description="file path or HF dataset name for backend 'import'")
    import_fields: dict[str, str] = Field(default_factory=dict, description="column names: question, thinking, "
                                          "answer, problem_id (defaults fit open-r1: problem, generation)")
    journal_dir: str = Field(default_factory=journal_dir, description="where completions are journalled")
    progress: bool = True

    def build(self, shard: int | None = None) -> Teacher:
        """The configured teacher; for shard k of a partitioned backfill, an endpoint teacher talks to base URL
        k mod len(base_urls) only, so partitions fan out over the servers and each trace names its server."""
        prompt = PromptConfig(system_prompt=self.system_prompt, user_template=self.user_template, samples=self.samples)
        if self.backend == "programmatic":
            return ProgrammaticTeacher(ProgrammaticTeacherConfig(seed=self.seed, wrong_fraction=self.wrong_fraction))
        if self.backend == "openai":
            endpoint = self.endpoint.build("teacher")
            if shard is not None:
                endpoint = endpoint.model_copy(update={"base_urls": [endpoint.base_urls[shard % len(endpoint.base_urls)]]})
            return EndpointTeacher(endpoint, prompt, self.journal_dir, progress=self.progress)
        if self.backend == "hf":
            if not self.hf_model:
                raise dg.Failure("teacher backend 'hf' needs hf_model (a hub id or a local path)")
            return HFTeacher(HFTeacherConfig(model=self.hf_model, batch_size=self.hf_batch_size,
                                             max_new_tokens=self.hf_max_new_tokens, seed=self.seed),
                             prompt, self.journal_dir, progress=self.progress)
        if not self.import_source:
            raise dg.Failure("teacher backend 'import' needs import_source (a .jsonl/.parquet path or HF dataset name)")
        try:
            return ImportedTeacher(self.import_source, TraceFieldMap(**self.import_fields))
        except (ProblemFileError, ValueError) as exc:
            raise dg.Failure(str(exc)) from exc


class LabellerResource(dg.ConfigurableResource):
    """The signal labeller: keywords (always), then, with `validate_with_llm`, an LLM through an endpoint that
    confirms or corrects each keyword label and labels the steps with no keyword (the paper's second stage)."""

    keywords_path: str | None = Field(None, description="a TOML keyword table; default: the built-in one")
    validate_with_llm: bool = False
    endpoint: EndpointSettings = Field(default_factory=lambda: EndpointSettings(temperature=0.0, max_tokens=64))
    max_reasks: int = 2
    structured_output: bool = False
    journal_dir: str = Field(default_factory=journal_dir)
    progress: bool = True

    def config(self) -> LabellerConfig:
        return LabellerConfig(keywords_path=self.keywords_path)

    def validator(self) -> LabelValidator | None:
        if not self.validate_with_llm:
            return None
        return LabelValidator(ValidatorConfig(endpoint=self.endpoint.build("label validation"),
                                              max_reasks=self.max_reasks, structured_output=self.structured_output),
                              self.journal_dir, progress=self.progress)


class StudentResource(dg.ConfigurableResource):
    """The student's backbone (embedded default, hub id or local path), device and artifacts folder."""

    base_model: str = EMBEDDED
    device: str = "auto"
    artifacts_dir: str = Field(default_factory=lambda: str(paths.dagster_home() / "artifacts"))
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    intermediate_size: int = 512

    def student_config(self) -> StudentConfig:
        return StudentConfig(base_model=self.base_model, hidden_size=self.hidden_size,
                             num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                             intermediate_size=self.intermediate_size)

    def artifacts(self) -> Path:
        return Path(self.artifacts_dir)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={
        "warehouse": WarehouseResource(),
        "mlflow": MlflowResource(),
        "teacher": TeacherResource(),
        "labeller": LabellerResource(),
        "student": StudentResource(),
    })
