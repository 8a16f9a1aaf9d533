"""``KVLinCAdapters``: the per-layer feature maps of the linear correction (phi for queries, psi for keys), saved as
safetensors together with everything they were fitted for.

An adapter file is only meaningful for the model and the quantization settings it was calibrated under (the
correction learns that model's quantization error at those bits / group / window), so loading checks both and
refuses a mismatch with a message that names the differing settings.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lrkern.feature_map import FeatureMap
from lrkern.kvlinc.cache import model_geometry
from lrkern.quantized_kv import KVConfig

FORMAT = "lrkern-kvlinc-adapters/1"


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's first-layer key projection, rounded to fp16 so the same checkpoint loaded in fp32,
    fp16 or bf16... gives the same value when the weights agree to fp16 precision (bf16 loads differ; so do other models)."""
    for name, p in model.named_parameters():
        if name.endswith("k_proj.weight"):
            data = p.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
            return hashlib.sha256(data).hexdigest()[:16]
    raise ValueError("model has no parameter named *k_proj.weight; cannot fingerprint it")


def _model_identity(config, fingerprint: Optional[str]) -> dict:
    num_layers, heads, kv_heads, head_dim = model_geometry(config)
    return dict(model_type=config.model_type, num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads,
                head_dim=head_dim, fingerprint=fingerprint)


class KVLinCAdapters(nn.Module):
    """phi[l]: FeatureMap(Hq, d, D), psi[l]: FeatureMap(Hkv, d, D) for every decoder layer l.

    Args:
        model_config: the model's transformers config (geometry and architecture are recorded).
        kv_config: the cache settings the adapters are (to be) fitted for; its ``feature_dim`` is D (> 0).
        activation: the feature maps' nonlinearity (see ``lrkern.FeatureMap``; calibration uses "exp").
        fingerprint: ``model_fingerprint(model)``, checked by ``check_model``.
    """

    def __init__(self, model_config, kv_config: KVConfig, activation: str = "exp",
                 fingerprint: Optional[str] = None):
        super().__init__()
        if not kv_config.feature_dim:
            raise ValueError("kv_config.feature_dim must be > 0 for adapters (it is the correction's D)")
        self.identity = _model_identity(model_config, fingerprint)
        if (self.identity["num_kv_heads"], self.identity["head_dim"]) != (kv_config.num_kv_heads, kv_config.head_dim):
            raise ValueError(f"kv_config ({kv_config.num_kv_heads} KV heads, dim {kv_config.head_dim}) does not "
                             f"match the model ({self.identity['num_kv_heads']}, {self.identity['head_dim']})")
        self.config, self.activation = kv_config, activation
        L, Hq, d, D = self.identity["num_layers"], self.identity["num_heads"], kv_config.head_dim, kv_config.feature_dim
        self.phi = nn.ModuleList(FeatureMap(Hq, d, D, activation=activation) for _ in range(L))
        self.psi = nn.ModuleList(FeatureMap(kv_config.num_kv_heads, d, D, activation=activation) for _ in range(L))

    # ------------------------------------------------------------------------------------------------ checks

    def check_compatible(self, model_config, kv_config: KVConfig) -> None:
        """Raise ValueError unless these adapters were fitted for this model geometry and exactly these settings."""
        ident = _model_identity(model_config, self.identity["fingerprint"])
        diff = [f"{k}: adapters {self.identity[k]!r} vs model {ident[k]!r}" for k in ident
                if k != "fingerprint" and ident[k] != self.identity[k]]
        if diff:
            raise ValueError("these KVLinC adapters were calibrated for another model (" + "; ".join(diff) + ")")
        if kv_config != self.config:
            mine, theirs = asdict(self.config), asdict(kv_config)
            diff = [f"{k}={mine[k]!r} (requested {theirs[k]!r})" for k in mine if mine[k] != theirs[k]]
            raise ValueError("these KVLinC adapters were calibrated under other cache settings: " + ", ".join(diff)
                             + "; recalibrate with `lrkern kvlinc calibrate` for these settings")

    def check_model(self, model: nn.Module) -> None:
        """Also compare weights: the same architecture with other weights (another checkpoint) is refused."""
        self.check_compatible(model.config, self.config)
        got = model_fingerprint(model)
        if self.identity["fingerprint"] is not None and got != self.identity["fingerprint"]:
            raise ValueError(f"these KVLinC adapters were calibrated for another checkpoint (weight fingerprint "
                             f"{self.identity['fingerprint']}, this model {got})")

    # --------------------------------------------------------------------------------------------------- I/O

    def save(self, path: str | Path, extra: Optional[dict] = None) -> None:
        """safetensors file: tensors phi.<l>.weight/bias, psi.<l>.weight/bias; metadata: format, kv_config, model,
        activation and ``extra`` (e.g. how calibration ran)."""
        from safetensors.torch import save_file
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "kv_config": json.dumps(asdict(self.config)), "model": json.dumps(self.identity),
                "activation": self.activation, "extra": json.dumps(extra or {})}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model=None, kv_config: Optional[KVConfig] = None) -> "KVLinCAdapters":
        """Load adapters; with ``model`` (a transformers model) or ``kv_config`` given, refuse a mismatch."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a lrkern KVLinC adapter file (format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = KVConfig(**json.loads(meta["kv_config"]))
        ident = json.loads(meta["model"])
        shell = _ConfigShell(ident)
        adapters = cls(shell, config, activation=meta.get("activation", "softplus"), fingerprint=ident["fingerprint"])
        adapters.load_state_dict(tensors)
        adapters.extra = json.loads(meta.get("extra", "{}"))
        if model is not None:
            adapters.check_model(model)
        if kv_config is not None:
            adapters.check_compatible(model.config if model is not None else shell, kv_config)
        return adapters


class _ConfigShell:
    """The fields of a transformers config that adapters record, rebuilt from a file's metadata."""

    def __init__(self, ident: dict):
        self.model_type = ident["model_type"]
        self.num_hidden_layers = ident["num_layers"]
        self.num_attention_heads = ident["num_heads"]
        self.num_key_value_heads = ident["num_kv_heads"]
        self.head_dim = ident["head_dim"]
        self.hidden_size = ident["num_heads"] * ident["head_dim"]
