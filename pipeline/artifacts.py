"""Run directory layout and per-stage manifests.

Layout of one pipeline run::

    <root>/<run-name>/
        config.yaml              the fully resolved config
        run.json                 MLflow parent run id (so a rerun continues the same run)
        <stage>/manifest.json    stage, hash, outputs {name: path}, mlflow_run_id, timestamps
        <stage>/...              the stage's own files

Stages hand each other paths (Parquet tables, ``save_pretrained`` folders, JSON), never live
objects. A stage whose manifest hash matches is skipped, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Manifest:
    stage: str
    hash: str
    outputs: dict[str, str]
    mlflow_run_id: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> str:
        """Path of output ``name``; a clear error if the stage does not produce it."""
        if name not in self.outputs:
            raise KeyError(f"stage {self.stage!r} has no output {name!r} (it has: {', '.join(self.outputs)})")
        return self.outputs[name]


def manifest_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / "manifest.json"


def read_manifest(run_dir: Path, stage: str) -> Manifest | None:
    """The stage's manifest, or None when the stage has not finished in this run directory."""
    path = manifest_path(run_dir, stage)
    if not path.is_file():
        return None
    return Manifest(**json.loads(path.read_text()))


def write_manifest(run_dir: Path, manifest: Manifest) -> Path:
    """Atomic write (temp file + rename): a crash never leaves a half manifest that looks finished."""
    path = manifest_path(run_dir, manifest.stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def save_png(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Lay out a matplotlib figure and write it as a PNG (parent folders created); the path written."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def write_json(path: Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def now() -> float:
    return time.time()
