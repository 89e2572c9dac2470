"""One reader for the rows of ``path`` and ``hf`` sources, used by every stage (data, RewardBench, Best-of-N).

* :func:`expand_paths`: a file, glob or URI into the files it names (a local pattern matching nothing is an error
  naming it; URIs are resolved by pyarrow's filesystems inside Ray).
* :func:`file_rows`: one file's bytes into ``(location, row)`` pairs: Parquet by row index (``path#i``), a JSON
  array by element (``path#i``), JSON Lines by physical line (``path:n``), gzip undone first. A line or element
  that is not a JSON object comes back as a quarantine record in its place (see :mod:`pipeline.formats`).
* :func:`read_path`: the same for a local file read here; with ``strict`` a bad row raises naming its location.
* :func:`load_hf`: a ``datasets.Dataset`` from a ``save_to_disk`` folder or the hub.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Any

from pipeline import formats


def expand_paths(pattern: str) -> list[str]:
    if "://" in pattern:
        return [pattern]
    matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
    if not matches:
        raise FileNotFoundError(f"{pattern!r}: no such file")
    return matches


def file_rows(data: bytes, path: str) -> list[tuple[str, Any]]:
    """``(location, raw row or quarantine record)`` of one file, in file order."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(formats.iter_indexed_rows(pq.read_table(io.BytesIO(data)).to_pylist(), path))
    return list(formats.iter_file_rows(data, path))


def read_path(path: str, *, strict: bool = True) -> list[tuple[str, Any]]:
    """The rows of one local file; ``strict``: a row that is not a JSON object raises, naming file and line."""
    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{path}: no such file")
    located = file_rows(Path(path).expanduser().read_bytes(), path)
    if strict:
        for where, row in located:
            if formats.is_quarantine(row):
                raise ValueError(f"{where}: {row['reason']}: {row['detail']}")
    return located


def load_hf(target: str, *, name: str | None = None, data_dir: str | None = None, split: str | None = None,
            revision: str | None = None) -> Any:
    """A ``datasets.Dataset``: ``target`` is a ``save_to_disk`` folder (a DatasetDict picks ``split``, default
    train) or a hub id (``split`` default train)."""
    import datasets

    folder = Path(target)
    if folder.is_dir() and any((folder / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(folder))
        return ds[split or "train"] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(target, name=name, data_dir=data_dir, split=split or "train", revision=revision)
