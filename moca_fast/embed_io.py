"""The `embed` command's files: JSON-lines inputs in, embeddings out to one .npy / .parquet file or to a folder of
parquet parts (moca_fast.corpus); `output_is_folder` is the one rule that tells which an --output path names."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .embed import MocaEmbedder
from .inputs import EmbedInput, as_input

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".npy", ".parquet")


def output_is_folder(output: Path) -> bool:
    """Whether an --output path names a folder of parquet parts (sharded across torchrun's ranks, resumable) rather
    than one file: it does when it has no suffix (`embeddings/` and `embeddings` are folders, `embeddings.npy` a
    file). A path without a suffix that is an existing file is refused (ValueError): it is neither."""
    if output.suffix:
        return False
    if output.exists() and not output.is_dir():
        raise ValueError(
            f"--output {output} is a file without a suffix: a path without a suffix names a folder "
            "of parts; name a .npy or .parquet file, or a folder"
        )
    return True


def embed_to_file(
    make_embedder: Callable[[], MocaEmbedder],
    inputs: Path,
    output: Path,
    image_root: Path,
    *,
    overwrite: bool,
    output_kind: str = "pooled",
    pool_factor: int | None = None,
) -> None:
    """Embed the JSON-lines file `inputs` into the .npy or .parquet file `output`; every check on the paths and
    options comes before `make_embedder` loads the model."""
    if output_kind != "pooled" or pool_factor is not None:
        raise ValueError(f"--output {output}: multi-vectors and --pool-factor go to a folder --output")
    check_output(output, FILE_SUFFIXES, overwrite=overwrite)
    items, ids = read_jsonl_inputs(inputs, image_root)
    embeddings = make_embedder().encode(items, show_progress_bar=True)
    write_embeddings(output, embeddings, ids)
    log.info("wrote %d embeddings of dimension %d to %s", *embeddings.shape, output)


def embed_to_folder(
    make_embedder: Callable[[], MocaEmbedder],
    inputs: Path,
    output: Path,
    image_root: Path,
    *,
    model: str,
    part_size: int,
    overwrite: bool,
    output_kind: str = "pooled",
    pool_factor: int | None = None,
) -> None:
    """Embed the JSON-lines file `inputs` into the folder `output`, in parts of `part_size` inputs shared out among
    torchrun's ranks (moca_fast.corpus.embed_corpus: resumable); `make_embedder` loads this rank's model."""
    if part_size < 1:
        raise ValueError(f"--part-size must be positive, got {part_size}")
    from .corpus import embed_corpus

    items, ids = read_jsonl_inputs(inputs, image_root)
    embed_corpus(
        make_embedder(),
        items,
        ids,
        output,
        source=inputs,
        model=model,
        part_size=part_size,
        overwrite=overwrite,
        output=output_kind,
        pool_factor=pool_factor,
    )


def read_jsonl_inputs(path: Path, image_root: Path) -> tuple[list[EmbedInput], list]:
    """(inputs, ids) from a JSON-lines file; blank lines are skipped; a bad line raises naming it."""
    inputs, ids = [], []
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON: {error}") from error
            if not isinstance(record, dict):
                raise ValueError(f'{where}: expected an object with "text" and/or "image"')
            ids.append(record.pop("id", None))
            if not isinstance(record.get("text", ""), str) or not isinstance(record.get("image", ""), str):
                raise ValueError(f'{where}: "text" and "image" must be strings')
            if not record.get("text") and not record.get("image"):
                raise ValueError(f'{where}: neither "text" nor "image"')
            if record.get("image"):
                record["image"] = str(image_root / record["image"])
            inputs.append(as_input(record, where))
    if not inputs:
        raise ValueError(f"{path}: no inputs")
    return inputs, ids


def check_output(path: Path, suffixes: tuple[str, ...], *, overwrite: bool) -> None:
    """Before any work: `path` has one of `suffixes`, is not a folder, does not exist unless `overwrite`, and its
    folder can be written (created if missing)."""
    if path.suffix not in suffixes:
        raise ValueError(f"--output must end in {' or '.join(suffixes)}, got {path}")
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise ValueError(f"--output {path} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output {path}: cannot create its folder: {error.strerror}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path}: its folder {path.parent} is not writable")


def write_embeddings(path: Path, embeddings, ids: list) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted write leaves no partial output. Parquet
    holds (line, id, embedding) as the parts of a folder --output do, without the id column when no line has one."""
    import numpy as np

    from .corpus import embeddings_table, written_atomically

    with written_atomically(path) as tmp:
        if path.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, embeddings)
        else:
            import pyarrow.parquet as pq

            table = embeddings_table(range(len(embeddings)), ids, embeddings)
            pq.write_table(table if any(i is not None for i in ids) else table.drop_columns(["id"]), tmp)
