"""Loading documents with Hugging Face `datasets`, from the hub or from local files.

`datasets` honours its own offline settings: HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 make it use
only its cache (HF_HOME, HF_DATASETS_CACHE) and never the network.
"""

from __future__ import annotations

from pathlib import Path

from nanogpt.errors import DataError

# local data files -> the `datasets` builder that reads them
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow", ".csv": "csv"}


def load_documents(source: str, split: str, field: str, val_docs: int):
    """A `datasets.Dataset` of documents with a `field` column and more than `val_docs` rows."""
    try:
        import datasets
    except ImportError:
        raise DataError("this dataset needs Hugging Face datasets: pip install 'nanogpt[datasets]'") from None
    local = Path(source).expanduser()
    if local.is_file() and local.stat().st_size == 0:
        raise DataError(f"{source} is empty; point data.hf_dataset at documents")
    try:
        ds = _load(datasets, source, split)
    except Exception as e:  # network, missing files, bad format: one line, with the fix
        first = (str(e).strip().splitlines() or [""])[0][:200]
        fix = "check data.hf_dataset" if local.exists() or local.suffix else (
            "offline, set data.hf_dataset to a local copy (a save_to_disk folder, or .parquet/.jsonl files)")
        raise DataError(f"cannot load dataset {source!r} ({type(e).__name__}: {first}); {fix}") from None
    if field not in ds.column_names:
        raise DataError(f"dataset {source!r} has no column {field!r} (it has {ds.column_names}); "
                        "set data.text_field")
    if len(ds) <= val_docs:
        raise DataError(f"dataset {source!r} has {len(ds)} documents, not more than "
                        f"data.val_docs={val_docs}; lower data.val_docs or use more documents")
    return ds


def _load(datasets, source: str, split: str):
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))  # written by Dataset(Dict).save_to_disk
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    builder = BUILDERS.get(Path(source).suffix.lower())
    if builder:  # local files (a path or a glob) land in the builder's "train" split
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    return datasets.load_dataset(source, split=split)  # a hub id, or a folder of data files
