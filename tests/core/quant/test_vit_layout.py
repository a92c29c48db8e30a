"""The ViT quantizer's two parts: public import paths, state-dict keys (calibration caches) and module boundaries."""

from __future__ import annotations

import ast
from pathlib import Path

import timm
import torch

import zoa_lightning.core.quant as quant
from zoa_lightning.core.quant.vit import calibration, modules

QUANT_DIR = Path(quant.__file__).parent


def test_public_names_import_from_every_earlier_path() -> None:
    import zoa_lightning.core.quant.vit as quant_vit

    homes = {  # name importable from zoa_lightning.core.quant -> the module that defines it
        "quantize_vit": calibration,
        "calibrate_vit_quantization": calibration,
        "prepare_vit_quantization": modules,
        "quantization_disabled": modules,
        "set_quantization_enabled": modules,
        "vit_quant_modules": modules,
    }
    for name, home in homes.items():
        assert getattr(quant, name) is getattr(home, name), name
    for name in ("QuantAttention", "QuantLinear", "SoftmaxQuantMatMul"):  # zoa_lightning.core.quant.vit
        assert getattr(quant_vit, name) is getattr(modules, name), name


def test_state_dict_keys_are_those_calibration_caches_were_written_with() -> None:
    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32, patch_size=8)
    keys = set(modules.prepare_vit_quantization(net, 8, 8).state_dict())
    quantizer_keys = {k for k in keys if k.endswith(("_delta", ".split", ".calibrated", ".bits"))}
    block = {k.removeprefix("blocks.0.") for k in quantizer_keys if k.startswith("blocks.0.")}
    assert block == {
        f"{layer}.{buffer}"
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        for buffer in ("w_delta", "a_delta", "calibrated", "bits")
    } | {
        "attn.matmul_qk.a_delta",
        "attn.matmul_qk.b_delta",
        "attn.matmul_qk.calibrated",
        "attn.matmul_qk.bits",
        "attn.matmul_av.b_delta",
        "attn.matmul_av.split",
        "attn.matmul_av.calibrated",
        "attn.matmul_av.bits",
    }
    assert {k for k in quantizer_keys if not k.startswith("blocks.")} == {
        "patch_embed.proj.w_delta",
        "patch_embed.proj.calibrated",
        "patch_embed.proj.bits",
        "head.w_delta",
        "head.a_delta",
        "head.calibrated",
        "head.bits",
    }
    assert {"blocks.0.attn.qkv.weight", "blocks.0.norm1.weight", "head.weight", "cls_token"} <= keys


def test_no_quantizer_file_imports_a_private_name_from_another_module() -> None:
    offenders = []
    for path in QUANT_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders


def test_the_split_files_stay_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (QUANT_DIR / "vit").glob("*.py")}
    assert set(sizes) == {"__init__.py", "modules.py", "calibration.py"}
    assert max(sizes.values()) < 750
