"""The trainer LoRA factory writes what the trainers write, and its expected changes are right.

Each family x format: the file loads with safetensors; every key follows the trainer's grammar
(the regexes below, written from the trainers' code, not from the factory); tensors have the
trainer's dtypes and shapes; every expected change is for a real module of the tiny pipeline,
in its weight's shape; the same seed writes the same bytes. Where diffusers can load a format
itself (PEFT, PEFT DoRA, XLabs, Kohya LoCon), fusing it with diffusers gives the factory's
expected weights: an independent check of the factory's maths and of where layers land.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests.factories.family_models import Family, build_family_pipeline
from tests.factories.trainer_loras import (
    TRAINER_CASES,
    TrainerCase,
    TrainerFormat,
    WrittenLoRA,
    default_dtype,
    write_trainer_lora,
)

CASES = [pytest.param(case, id=case.id) for case in TRAINER_CASES]

_CLIP = r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
_T5 = r"encoder_block_\d+_layer_\d+_(SelfAttention_[qkvo]|DenseReluDense_(wi_0|wi_1|wo))"
_KOHYA_TEXT: dict[Family, str] = {
    "sd1": f"lora_te_{_CLIP}",
    "sd2": f"lora_te_{_CLIP}",
    "sdxl": f"lora_te[12]_{_CLIP}",
    "sd3": f"(lora_te[12]_{_CLIP}|lora_te3_{_T5})",
    "flux-dev": f"(lora_te1_{_CLIP}|lora_te3_{_T5})",
    "flux-schnell": f"(lora_te1_{_CLIP}|lora_te3_{_T5})",
}
_DIFFUSERS_UNET = (
    r"lora_unet_(conv_in|conv_out|time_embedding_linear_[12]"
    r"|(down_blocks_\d+|mid_block|up_blocks_\d+)_\w+)"
)
_BFL = (  # the BFL module paths; Kohya writes them with "_" for "."
    r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)"
    r"|single_blocks\.\d+\.(linear[12]|modulation\.lin)"
)
_KOHYA_UNET: dict[Family, str] = {
    "sd1": _DIFFUSERS_UNET,
    "sd2": _DIFFUSERS_UNET,
    "sdxl": r"lora_unet_(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_\w+",
    "sd3": r"lora_unet_joint_blocks_\d+_(x_block|context_block)_"
    r"(attn_(qkv|proj)|mlp_fc[12]|adaLN_modulation_1)",
    "flux-dev": "lora_unet_(" + _BFL.replace(r"\.", "_") + ")",
    "flux-schnell": "lora_unet_(" + _BFL.replace(r"\.", "_") + ")",
}
_SUFFIXES: dict[TrainerFormat, str] = {
    "kohya": r"lora_down\.weight|lora_up\.weight|alpha",
    "kohya-locon": r"lora_down\.weight|lora_up\.weight|alpha",
    "lycoris-locon": r"lora_down\.weight|lora_mid\.weight|lora_up\.weight|alpha",
    "lycoris-loha": r"hada_w[12]_[ab]|hada_t[12]|alpha",
    "lycoris-lokr": r"lokr_w1|lokr_w2|lokr_w2_[ab]|lokr_t2|alpha",
    "lycoris-full": r"diff|diff_b",
    "lycoris-dora": r"lora_down\.weight|lora_up\.weight|alpha|dora_scale",
    "lycoris-dora-input": r"lora_down\.weight|lora_up\.weight|alpha|dora_scale",
    "lycoris-norm": r"lora_down\.weight|lora_up\.weight|alpha|w_norm|b_norm",
}
_PEFT_TEXT = (
    r"text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\."
    r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
)
_PEFT_DENOISER = (
    r"unet\.(down_blocks|mid_block|up_blocks)\.[\w.]+"
    r"|transformer\.(transformer_blocks|single_transformer_blocks)\.\d+\.[\w.]+"
)


def grammar(family: Family, fmt: TrainerFormat) -> re.Pattern[str]:
    """Every key a ``fmt`` trainer writes for ``family``."""
    if fmt.startswith("peft"):
        roles = r"lora_A\.weight|lora_B\.weight" + (
            "|lora_magnitude_vector" if "dora" in fmt else ""
        )
        return re.compile(rf"({_PEFT_DENOISER}|{_PEFT_TEXT})\.({roles})")
    if fmt == "bfl":
        return re.compile(rf"diffusion_model\.({_BFL})\.lora_[AB]\.weight")
    if fmt == "xlabs":
        modules = (
            r"double_blocks\.\d+\.processor\.(qkv|proj)_lora[12]"
            r"|single_blocks\.\d+\.processor\.(qkv|proj)_lora"
        )
        return re.compile(rf"({modules})\.(down|up)\.weight")
    return re.compile(rf"({_KOHYA_UNET[family]}|{_KOHYA_TEXT[family]})\.({_SUFFIXES[fmt]})")


@pytest.fixture(scope="module")
def pipelines() -> Callable[[Family], Any]:
    built: dict[Family, Any] = {}
    return lambda family: built.setdefault(family, build_family_pipeline(family))


def _write(
    pipelines: Callable[[Family], Any], case: TrainerCase, path: Path, seed: int = 0
) -> WrittenLoRA:
    return write_trainer_lora(
        pipelines(case.family), case.family, case.trainer_format, path, seed=seed, alpha=case.alpha
    )


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        keys = handle.keys()
        return {key: handle.get_tensor(key) for key in keys}, handle.metadata() or {}


def _stems(tensors: dict[str, torch.Tensor], suffix: str) -> Iterator[str]:
    return (key.removesuffix(suffix) for key in tensors if key.endswith(suffix))


@pytest.mark.parametrize("case", CASES)
def test_keys_follow_the_trainers_grammar(
    case: TrainerCase, pipelines: Callable[[Family], Any], tmp_path: Path
) -> None:
    written = _write(pipelines, case, tmp_path / "lora.safetensors")
    tensors, metadata = _read(written.path)
    pattern = grammar(case.family, case.trainer_format)
    assert tensors
    assert [key for key in tensors if not pattern.fullmatch(key)] == []
    dtype = default_dtype(case.family, case.trainer_format)
    assert {t.dtype for t in tensors.values()} == {dtype}
    for stem in _stems(tensors, ".lora_down.weight"):
        assert f"{stem}.lora_up.weight" in tensors
        assert tensors[f"{stem}.alpha"].shape == ()
    for stem in _stems(tensors, ".lora_A.weight"):
        assert (
            tensors[f"{stem}.lora_B.weight"].shape[1] == tensors[f"{stem}.lora_A.weight"].shape[0]
        )
    fmt = case.trainer_format
    if fmt.startswith(("kohya", "lycoris")):
        module = "lycoris.kohya" if fmt.startswith("lycoris") else "networks.lora"
        assert metadata["ss_network_module"].startswith(module)
        assert metadata["ss_network_dim"] == "4"
        assert metadata["ss_base_model_version"]
        if fmt.startswith("lycoris"):
            assert json.loads(metadata["ss_network_args"])["algo"] in (
                "locon",
                "loha",
                "lokr",
                "full",
            )
    elif fmt.startswith("peft"):
        assert metadata["format"] == "pt"
        adapter = metadata.get("lora_adapter_metadata")
        assert (adapter is not None) == (case.alpha is not None)
        if adapter is not None:
            config = json.loads(adapter)
            assert {v for k, v in config.items() if k.endswith(".lora_alpha")} == {case.alpha}
    else:
        assert metadata == {}


@pytest.mark.parametrize("case", CASES)
def test_expected_changes_are_for_real_modules(
    case: TrainerCase, pipelines: Callable[[Family], Any], tmp_path: Path
) -> None:
    pipeline = pipelines(case.family)
    written = _write(pipelines, case, tmp_path / "lora.safetensors")
    assert written.expected
    for (component, name), change in written.expected.items():
        module = getattr(pipeline, component).get_submodule(name)
        assert change.weight.shape == module.weight.shape, (component, name)
        assert change.weight.dtype == torch.float32
        assert torch.isfinite(change.weight).all()
        assert change.weight.abs().max() > 0
        if change.bias is not None:
            assert change.bias.shape == module.bias.shape, (component, name)


@pytest.mark.parametrize("case", CASES)
def test_same_seed_same_bytes(
    case: TrainerCase, pipelines: Callable[[Family], Any], tmp_path: Path
) -> None:
    first = _write(pipelines, case, tmp_path / "a.safetensors")
    again = _write(pipelines, case, tmp_path / "b.safetensors")
    other = _write(pipelines, case, tmp_path / "c.safetensors", seed=1)
    assert first.path.read_bytes() == again.path.read_bytes()
    assert first.path.read_bytes() != other.path.read_bytes()


@pytest.fixture
def read(
    pipelines: Callable[[Family], Any], tmp_path: Path
) -> Callable[[Family, TrainerFormat], dict[str, torch.Tensor]]:
    def read(family: Family, fmt: TrainerFormat) -> dict[str, torch.Tensor]:
        written = _write(pipelines, TrainerCase(family, fmt), tmp_path / f"{family}-{fmt}.st")
        return _read(written.path)[0]

    return read


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_variant_of_a_format_occurs(
    family: Family, read: Callable[[Family, TrainerFormat], dict[str, torch.Tensor]]
) -> None:
    """Tucker cores, full and decomposed LoKr factors, both DoRA layouts, norm layers, Kohya
    ranks and alphas that differ between layers, 3x3 LoCon convs."""
    locon = read(family, "lycoris-locon")
    assert any(t.shape[2:] == (3, 3) for k, t in locon.items() if k.endswith("lora_mid.weight"))
    loha = read(family, "lycoris-loha")
    assert any(k.endswith(".hada_t1") for k in loha)
    assert any(k.endswith(".hada_w1_a") and t.dim() == 2 for k, t in loha.items())
    lokr = read(family, "lycoris-lokr")
    assert {"lokr_w2", "lokr_w2_a", "lokr_t2"} <= {k.rsplit(".", 1)[1] for k in lokr}
    norms = read(family, "lycoris-norm")
    assert any(k.endswith(".w_norm") for k in norms)
    assert any(k.endswith(".b_norm") for k in norms)
    out = read(family, "lycoris-dora")
    columns = read(family, "lycoris-dora-input")
    for stem in _stems(out, ".dora_scale"):
        down, up = out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"]
        assert out[f"{stem}.dora_scale"].shape[:2] == (up.shape[0], 1)
        assert columns[f"{stem}.dora_scale"].shape[:2] == (1, down.shape[1])
    kohya = read(family, "kohya-locon")
    ranks = {t.shape[0] for k, t in kohya.items() if k.endswith(".lora_down.weight")}
    alphas = {t.item() for k, t in kohya.items() if k.endswith(".alpha")}
    assert len(ranks) >= 3
    assert len(alphas) >= 3
    assert any(k.endswith(".lora_down.weight") and t.shape[2:] == (3, 3) for k, t in kohya.items())
    dora = read(family, "peft-dora")
    magnitudes = [t.shape for k, t in dora.items() if k.endswith(".lora_magnitude_vector")]
    assert any(len(s) == 1 for s in magnitudes)
    assert any(len(s) == 4 and s[0] == 1 for s in magnitudes)


def test_sgm_fused_and_swapped_layers(
    pipelines: Callable[[Family], Any],
    read: Callable[[Family, TrainerFormat], dict[str, torch.Tensor]],
    tmp_path: Path,
) -> None:
    """SDXL's SGM names for the tiny U-Net, FLUX's fused layers, SD3's swapped modulation."""
    sdxl = read("sdxl", "kohya-locon")
    assert "lora_unet_input_blocks_2_0_op.lora_down.weight" in sdxl  # the tiny SDXL's downsampler
    assert "lora_unet_output_blocks_1_2_conv.lora_down.weight" in sdxl  # upsampler after attention
    assert "lora_unet_input_blocks_3_0_skip_connection.lora_down.weight" in sdxl
    flux = read("flux-dev", "kohya")
    assert flux["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 3 * 32 + 4 * 32
    assert flux["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape[0] == 3 * 32
    sd3 = _write(pipelines, TrainerCase("sd3", "kohya"), tmp_path / "sd3.st")
    swapped = sd3.expected[("transformer", "transformer_blocks.1.norm1_context.linear")]
    tensors = _read(sd3.path)[0]
    stem = "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"
    up = tensors[f"{stem}.lora_up.weight"].float()
    down = tensors[f"{stem}.lora_down.weight"].float()
    delta = up @ down * tensors[f"{stem}.alpha"].item() / down.shape[0]
    # SAI writes shift, scale; diffusers' norm1_context holds scale, shift
    assert torch.allclose(swapped.weight, torch.cat([delta[32:], delta[:32]]))


_DIFFUSERS_CASES = [
    pytest.param(case, id=case.id)
    for case in TRAINER_CASES
    if case.trainer_format in ("peft", "peft-dora", "xlabs", "kohya-locon")
]


@pytest.mark.parametrize("case", _DIFFUSERS_CASES)
def test_diffusers_fuses_the_expected_change(case: TrainerCase, tmp_path: Path) -> None:
    """diffusers' own loader, at weight 0.7, changes exactly the expected modules as expected.

    Two diffusers limitations are left out of the comparison: it drops DoRA magnitudes of text
    encoders under transformers 5 (its keys keep ``text_model.``), and it scales Kohya attention
    projections by the default alpha when alphas differ between layers (its ``alpha_pattern``
    keys, ``...attn1.processor.to_q_lora.down.weight``, match no module).
    """
    pipeline = build_family_pipeline(case.family)
    written = write_trainer_lora(
        pipeline, case.family, case.trainer_format, tmp_path / "lora.safetensors", alpha=case.alpha
    )
    components = [
        c for c in pipeline._lora_loadable_modules if getattr(pipeline, c, None) is not None
    ]
    before = {
        (c, n): p.detach().clone()
        for c in components
        for n, p in getattr(pipeline, c).named_parameters()
    }
    pipeline.load_lora_weights(str(written.path))
    pipeline.fuse_lora(lora_scale=0.7, components=components)
    pipeline.unload_lora_weights()
    compared = 0
    for (component, name), base in before.items():
        module, _, kind = name.rpartition(".")
        change = written.expected.get((component, module))
        if case.trainer_format == "peft-dora" and component.startswith("text_encoder"):
            continue
        if case.trainer_format == "kohya-locon" and re.search(r"attn[12]\.to_(q|k|v|out)", module):
            continue
        compared += change is not None
        now = getattr(pipeline, component).get_parameter(name)
        if change is None:
            assert torch.equal(now, base), name
        elif kind == "weight":
            torch.testing.assert_close(now, change.new_weight(base, 0.7), atol=2e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(now, change.new_bias(base, 0.7), atol=2e-5, rtol=1e-4)
    assert compared >= len(written.expected) // 2
