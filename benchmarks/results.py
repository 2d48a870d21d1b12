"""``benchmarks/results/latest.json``: every benchmark's latest rows, one section each.

``make bench`` runs several benchmarks one after the other (LoRA speed, CPU step, HTTP
costs, memory estimate); each replaces its own section and keeps the others', so the file
always holds the latest run of each, with what it was measured on, for a script to compare.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import Row

DEFAULT_PATH = Path(__file__).parent / "results" / "latest.json"


def versions() -> dict[str, str]:
    import diffusers
    import peft

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
    }


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load_line(label: str) -> str:
    """The machine's load average: other work on a shared machine inflates every timing."""
    one, five, fifteen = os.getloadavg()
    return f"load average {label}: {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def local_time() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def write_section(
    path: Path,
    benchmark: str,
    *,
    device: str,
    machine: str,
    load: str,
    rows: Sequence[Row],
    extra: dict[str, Any] | None = None,
) -> None:
    """Replace ``benchmark``'s section of the results file (created if missing). Rows of
    models this run did not measure (``--models sdxl`` alone, say) are kept from the last
    run: each row says when it was measured, on what load."""
    document: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(ValueError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict) and isinstance(loaded.get("benchmarks"), dict):
                document = loaded
    sections: dict[str, Any] = document.setdefault("benchmarks", {})
    written_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    measured = {row.model for row in rows}
    previous = sections.get(benchmark, {}).get("rows", [])
    kept = [r for r in previous if isinstance(r, dict) and r.get("model") not in measured]
    new_rows = [
        {**row.as_json(), "device": device, "measured_at": written_at, "load": load} for row in rows
    ]
    sections[benchmark] = {
        "written_at": written_at,
        "device": device,
        "machine": machine,
        "load": load,
        "versions": versions(),
        "rows": kept + new_rows,
        **(extra or {}),
    }
    document["written_at"] = written_at
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    temporary.replace(path)
    print(f"Rows written to {path} (section {benchmark!r})")


# Rows the README's table shows (the JSON has them all): what a reader compares.
_README_ROWS = (
    "naive: apply + remove",
    "app, cache off",
    "ours:",
    "floor:",
    "machine: memory bandwidth",
    "machine: matmul rate",
    "step:",
    "peak memory: apply",
    "memory: RSS growth after malloc_trim",
    "machine: CPU used",
    "step 512x512",
    "minor page faults",
    "fraction of the matmul rate",
    "preview:",
    "PNG:",
    "HTTP:",
)


def markdown_table(path: Path = DEFAULT_PATH) -> str:
    """The README's benchmark table, from the results file: ``python -m benchmarks.results``."""
    document = json.loads(path.read_text())
    lines = ["| benchmark | model | row | median | spread |", "|---|---|---|---:|---|"]
    for name, section in document["benchmarks"].items():
        for row in section["rows"]:
            if row["row"].startswith(_README_ROWS):
                lines.append(
                    f"| {name} | {row['model']} | {row['row']} | {row['value']} | {row['spread']} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
