"""LANCE: one-shot HOSVD low-rank activation compression for fine-tuning and continual learning (spec ``lance.md``).

    subs = lrkern.lance.calibrate(model, loader, layers=["conv2", "conv3"], eps=0.7, batches=100)  # forward only
    subs.save("subspaces.safetensors")
    lrkern.lance.compress(model, subs)       # backward now keeps only the cores of those layers' inputs
    with lrkern.lance.SavedBytesMeter(model, ["conv2", "conv3"]) as meter: ...

Continual learning: ``lrkern.lance.ContinualLance`` / ``continual_learning``; baselines: ``compress_per_step``
(per-step HOSVD_eps) and ``lrkern.lance.gpm.GPM``. The kernels are ``torch.ops.lrkern.{mode_gram_accumulate,
lance_project, lance_linear, lance_conv2d, lance_linear_wgrad, lance_conv2d_wgrad}``.
"""
from lrkern.lance.calibrate import calibrate
from lrkern.lance.continual import ContinualLance, continual_learning
from lrkern.lance.memory import SavedBytesMeter, saved_bytes
from lrkern.lance.modules import (LanceConv2d, LanceLinear, compress, compress_per_step, compressed_layers, decompress,
                                  select_layers)
from lrkern.lance.subspaces import LayerSubspace, Subspaces

__all__ = ["calibrate", "compress", "compress_per_step", "decompress", "compressed_layers", "select_layers",
           "Subspaces", "LayerSubspace", "LanceLinear", "LanceConv2d", "SavedBytesMeter", "saved_bytes",
           "ContinualLance", "continual_learning"]
