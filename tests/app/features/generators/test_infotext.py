"""The A1111 ``parameters`` text chunk of generated PNGs, read back with Pillow and parsed the
way A1111's PNG Info does (``parse_generation_parameters``)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from app.config import EMBEDDED_MODEL_ID, Settings
from app.cores.lora_engine import LoRARequest
from app.features.generators.infotext import build_infotext, lora_alias, lora_token, quote
from app.features.generators.schemas import GeneratorConfig
from tests.factories.lora_files import write_lora

# A1111's modules/infotext_utils.py: one "Key: value" pair, the value plain or JSON-quoted.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA_TOKEN = re.compile(r"<lora:([^:>]+):([^>]+)>")


def parse_infotext(text: str) -> dict[str, str]:
    """Prompt, negative prompt and the last line's fields, as A1111 reads them."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        fields[key] = json.loads(value) if value[:1] == value[-1:] == '"' else value
    return fields


def payload_sha256(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0] :]).hexdigest()


# ---------------------------------------------------------------------------------------------
# The text itself


def lora(
    name: str,
    weight: float,
    autov3: str | None,
    *,
    unet_weight: float | None = None,
    text_encoder_weight: float | None = None,
) -> LoRARequest:
    """A request as generation builds it; its AutoV3 hash is ``tensor_sha256``'s start."""
    return LoRARequest(
        id=1,
        name=name,
        path=Path(f"{name}.safetensors"),
        content_key=name,
        weight=weight,
        unet_weight=unet_weight,
        text_encoder_weight=text_encoder_weight,
        tensor_sha256=None if autov3 is None else autov3 + "0" * 52,
    )


def config(**overrides: Any) -> GeneratorConfig:
    base: dict[str, Any] = {"prompt": "a red fox", "negative_prompt": "blurry", "steps": 20}
    return GeneratorConfig.model_validate({**base, **overrides})


def test_a_plain_infotext_round_trips() -> None:
    text = build_infotext(config(seed=5), 5, "org/model", 512, 768, model_hash="0123456789")
    assert text.splitlines() == [
        "a red fox",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler A, CFG scale: 7.5, Seed: 5, Size: 512x768, "
        "Model hash: 0123456789, Model: org/model",
    ]
    fields = parse_infotext(text)
    assert fields["Prompt"] == "a red fox"
    assert fields["Model hash"] == "0123456789"
    assert "Lora hashes" not in fields


def test_loras_appear_as_prompt_tokens_and_hashes() -> None:
    loras = [
        lora("Film Grain", 0.15000000000000002, "aaaaaaaaaaaa"),
        lora("retro: 80s, v2", 1.0, "bbbbbbbbbbbb"),
        lora("no hash", 2.0, None),
    ]
    text = build_infotext(config(), 1, "m", 64, 64, loras=loras)
    fields = parse_infotext(text)
    assert fields["Prompt"] == (
        "a red fox <lora:Film Grain:0.15> <lora:retro 80s v2:1> <lora:no hash:2>"
    )
    assert fields["Lora hashes"] == "Film Grain: aaaaaaaaaaaa, retro 80s v2: bbbbbbbbbbbb"
    assert 'Lora hashes: "Film Grain: aaaaaaaaaaaa, retro 80s v2: bbbbbbbbbbbb"' in text
    assert fields["Model"] == "m"


def test_component_weights_are_a1111_te_unet_tokens() -> None:
    assert lora_token(lora("full", 0.8, None)) == "<lora:full:0.8>"
    assert lora_token(lora("full", 0.8, None, unet_weight=1.25)) == "<lora:full:0.8:1.25>"
    assert lora_token(lora("full", 0.8, None, text_encoder_weight=0)) == "<lora:full:0:0.8>"
    text = build_infotext(config(), 1, "m", 64, 64, loras=[lora("a:b", 1, None, unet_weight=0)])
    assert parse_infotext(text)["Prompt"] == "a red fox <lora:ab:1:0>"


def test_values_that_would_break_the_line_are_quoted() -> None:
    assert quote("plain") == "plain"
    assert quote('a, "b": c') == '"a, \\"b\\": c"'
    text = build_infotext(config(), 1, "local: my, model", 64, 64)
    assert parse_infotext(text)["Model"] == "local: my, model"
    assert lora_alias("<x>:,y\nz") == "xy z"


# ---------------------------------------------------------------------------------------------
# In the PNGs the server writes


async def test_generated_pngs_carry_a1111_parameters(
    loaded_client: httpx.AsyncClient, tiny_pipeline: Any, tmp_path: Path, settings: Settings
) -> None:
    files = [
        write_lora(tmp_path / "Film Grain.safetensors", tiny_pipeline, seed=1),
        write_lora(tmp_path / "retro, 80s.safetensors", tiny_pipeline, fmt="peft", seed=2),
    ]
    ids = []
    for path in files:
        response = await loaded_client.post("/loras/upload", json={"file_path": str(path)})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    request = {
        "prompt": "a lighthouse, dusk",
        "negative_prompt": "text",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 99,
        "number_of_images": 2,
        "sampler": "EULER",
        "loras": [{"lora_id": ids[0], "weight": 0.7}, {"lora_id": ids[1], "weight": 1.25}],
    }
    history = await loaded_client.post("/histories", json=request)
    response = await loaded_client.post(
        "/generators", json={"history_id": history.json(), "config": request}
    )
    assert response.status_code == 200, response.text

    unet = settings.cache_dir / "models" / "embedded--tiny-sd" / "unet"
    model_hash = hashlib.sha256((unet / "diffusion_pytorch_model.safetensors").read_bytes())
    for seed, item in zip((99, 100), response.json()["items"], strict=True):
        png = await loaded_client.get(f"/{item['path']}")
        fields = parse_infotext(Image.open(io.BytesIO(png.content)).info["parameters"])
        assert fields["Prompt"] == "a lighthouse, dusk <lora:Film Grain:0.7> <lora:retro 80s:1.25>"
        assert _LORA_TOKEN.findall(fields["Prompt"]) == [
            ("Film Grain", "0.7"),
            ("retro 80s", "1.25"),
        ]
        assert fields["Negative prompt"] == "text"
        assert fields["Steps"] == "2"
        assert fields["Sampler"] == "Euler"
        assert fields["CFG scale"] == "7.5"
        assert fields["Seed"] == str(seed)
        assert fields["Size"] == "64x64"
        assert fields["Model hash"] == model_hash.hexdigest()[:10]
        assert fields["Model"] == EMBEDDED_MODEL_ID
        hashes = dict(entry.split(": ") for entry in fields["Lora hashes"].split(", "))
        assert hashes == {
            "Film Grain": payload_sha256(files[0])[:12],
            "retro 80s": payload_sha256(files[1])[:12],
        }


async def test_without_loras_the_prompt_is_unchanged(loaded_client: httpx.AsyncClient) -> None:
    request = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "seed": 4}
    history = await loaded_client.post("/histories", json=request)
    response = await loaded_client.post(
        "/generators", json={"history_id": history.json(), "config": request}
    )
    assert response.status_code == 200, response.text
    png = await loaded_client.get(f"/{response.json()['items'][0]['path']}")
    text = Image.open(io.BytesIO(png.content)).info["parameters"]
    fields = parse_infotext(text)
    assert text.splitlines()[0] == "a cat"
    assert "Lora hashes" not in fields
    assert len(fields["Model hash"]) == 10
