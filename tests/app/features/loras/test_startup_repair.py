"""Start-up repair of the LoRA folder: leftovers removed, missing files reported."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from app.config import Settings
from tests.api import generate, list_loras, load_model, upload_ok
from tests.app.features.loras.helpers import UserFiles, captured_warnings, stored_entries
from tests.harness import running_app

# ---------------------------------------------------------------------------------------------
# Start-up repair


async def test_startup_removes_leftovers_and_reports_missing_files(
    settings: Settings, user_files: UserFiles
) -> None:
    kept_source = user_files("peft_unet")
    lost_source = user_files("kohya_unet", "lost style.safetensors")
    async with running_app(settings) as (_, client):
        kept = await upload_ok(client, kept_source)
        lost = await upload_ok(client, lost_source)

    loras_dir = settings.loras_dir
    Path(lost["file_path"]).unlink()  # (d) a row whose file is gone
    shutil.copyfile(lost_source, loras_dir / "stray.safetensors")  # (a) a file with no row
    (loras_dir / ".tmp-xyz.safetensors").write_bytes(b"half a copy")  # (b)
    in_use = loras_dir / ".inuse-abc"  # (c) pinned copies of a crashed generation
    in_use.mkdir()
    os.link(kept["file_path"], in_use / "0.safetensors")

    with captured_warnings("app.features.loras.service") as warnings:
        async with running_app(settings) as (_, client):
            assert stored_entries(settings) == {Path(kept["file_path"]).name}
            assert Path(kept["file_path"]).read_bytes() == kept_source.read_bytes()

            listed = await list_loras(client)
            assert [lora["id"] for lora in listed] == [kept["id"], lost["id"]]
            assert [lora["file_missing"] for lora in listed] == [False, True]
            response = await client.get(f"/loras/{lost['id']}")
            assert response.status_code == 200
            assert response.json() == {**lost, "file_missing": True}

            # Generating with it is refused with a reason, before the pipeline is touched.
            await load_model(client)
            response = await generate(client, [{"lora_id": lost["id"], "weight": 1}])
            assert response.status_code == 400, response.text
            detail = response.json()["detail"]
            assert "missing" in detail
            assert f"'lost style' (id {lost['id']})" in detail
            assert not any(name.startswith(".inuse-") for name in stored_entries(settings))

            # A LoRA whose file is gone can still be deleted.
            response = await client.delete(f"/loras/{lost['id']}")
            assert response.status_code == 200, response.text
            assert [lora["id"] for lora in await list_loras(client)] == [kept["id"]]

    messages = [record.getMessage() for record in warnings]
    assert any(
        "lost style" in message and f"id {lost['id']}" in message and "missing" in message
        for message in messages
    ), messages
