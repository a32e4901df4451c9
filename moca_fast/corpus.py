"""Corpus embedding at scale: `moca-fast embed INPUTS --output DIR` writes the embeddings in resumable parquet parts,
sharded by cost across the ranks of `torchrun --nproc_per_node N -m moca_fast.cli embed ...` (or one process).

The inputs are cut into parts of `part_size` consecutive inputs; the cut depends only on the input count, so a run
may resume under another number of ranks. Rank 0 checks DIR/manifest.json (the inputs' digest, the model and a
digest of its weights, so that another model put at the same path is refused, its dtype and processor settings, the
part size; written on the first run) and lists the parts on disk whose bytes match the BLAKE2b-128 checksum written
with them (DIR/checksums/; a damaged part is embedded again); the ranks cost the remaining inputs in turn (tokens,
from text and image headers), gather the costs, and deal the parts out greedily, largest first to the least loaded
rank. Each part is embedded with MocaEmbedder.encode and written as DIR/parts/part-NNNNN.parquet (line, id,
embedding) through a temporary file and a rename: a part on disk is complete, and a killed run resumes without
recomputing it. When all are done, rank 0 writes DIR/index.json (each part with its checksum), and
`load_corpus(DIR)` checks every part's bytes and returns the embeddings in input order. The folder must be shared
by the ranks (one machine, or a shared filesystem).

`output` "multi_vector" (a checkpoint with a multi-vector head) writes each input's token vectors instead, as a
`multi_vector` column holding a list of fp16 vectors per row; "both" writes both columns. `pool_factor` pools each
row's token vectors hierarchically to about 1/pool_factor of them first (moca_fast/token_pooling.py). The manifest
and the index record the output kind and the pool factor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .checksums import file_checksum
from .embed import MocaEmbedder
from .eval.cache import model_key
from .inputs import EmbedInput
from .token_pooling import pool_tokens

log = logging.getLogger(__name__)

MANIFEST, INDEX, PARTS, CHECKSUMS = "manifest.json", "index.json", "parts", "checksums"


def part_ranges(count: int, part_size: int) -> list[range]:
    """Consecutive input ranges of `part_size` (the last one shorter)."""
    return [range(start, min(start + part_size, count)) for start in range(0, count, part_size)]


def deal_parts(costs: dict[int, int], world: int) -> list[list[int]]:
    """Part indices per rank: largest cost first, each to the least loaded rank (ties: lower rank); each rank's
    parts in index order."""
    loads, out = [0] * world, [[] for _ in range(world)]
    for part in sorted(costs, key=lambda p: (-costs[p], p)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += costs[part]
        out[rank].append(part)
    return [sorted(parts) for parts in out]


def part_path(folder: Path, part: int) -> Path:
    return folder / PARTS / f"part-{part:05d}.parquet"


def checksum_path(folder: Path, part: int) -> Path:
    """Where a part's BLAKE2b-128 checksum is kept, written once the part is."""
    return folder / CHECKSUMS / f"part-{part:05d}.b2"


def intact_parts(folder: Path, count: int) -> list[int]:
    """The parts on disk whose bytes match the checksum recorded when they were written; any other part file
    (truncated, emptied, swapped, changed bytes, or without a checksum) is logged, deleted and embedded again."""
    intact = []
    for part in range(count):
        path, recorded = part_path(folder, part), checksum_path(folder, part)
        if not path.is_file():
            continue
        if recorded.is_file() and file_checksum(path) == recorded.read_text().strip():
            intact.append(part)
            continue
        log.warning(
            "%s: its bytes do not match the checksum written with it (damaged or replaced): embedding it again", path
        )
        path.unlink()
        recorded.unlink(missing_ok=True)
    return intact


def embed_corpus(
    embedder: MocaEmbedder,
    inputs: Sequence[EmbedInput],
    ids: Sequence,
    folder: Path,
    *,
    source: Path,
    model: str,
    part_size: int,
    overwrite: bool = False,
    output: str = "pooled",
    pool_factor: int | None = None,
) -> None:
    """Embed `inputs` (ids kept beside them) into `folder`, resuming what is there; under torchrun every rank calls
    it with its own embedder. `source` (the inputs file) and `model` go into the manifest a resumed run must match;
    `overwrite` starts over in a folder that holds another run's embeddings. `output`: "pooled", "multi_vector" or
    "both" (MocaEmbedder.encode's); `pool_factor`: hierarchical pooling of the multi-vectors (None: none)."""
    import torch.distributed as dist

    embedder.check_output(output)
    if pool_factor is not None and (output == "pooled" or pool_factor < 1):
        raise ValueError(
            f"pool_factor {pool_factor}: token pooling takes a positive factor and a multi-vector output "
            f"(output={output!r})"
        )

    from .parallel.distributed import finish_distributed, init_distributed

    rank, world = init_distributed(embedder.device.type)
    parts = part_ranges(len(inputs), part_size)
    state = [None]
    if rank == 0:
        try:
            manifest = {
                "inputs": str(source),
                "inputs_sha256": file_digest(source),
                "count": len(inputs),
                "part_size": part_size,
                "model": model,
                "model_key": model_key(embedder),
                **embedder_settings(embedder),
                **({} if output == "pooled" else {"output": output, "pool_factor": pool_factor}),
            }
            check_manifest(folder, manifest, overwrite=overwrite)
            state[0] = intact_parts(folder, len(parts))
        except ValueError as error:
            state[0] = str(error)
    if world > 1:
        dist.broadcast_object_list(state, src=0)
    if isinstance(state[0], str):
        raise ValueError(state[0])
    done = set(state[0])
    pending = [p for p in range(len(parts)) if p not in done]
    if done:
        log.info("%s: %d of %d parts already embedded, skipped", folder, len(done), len(parts))
    costs = part_costs(embedder, inputs, parts, pending, rank, world)
    mine = deal_parts(costs, world)[rank]
    log.info(
        "rank %d/%d: %d of the %d parts left, %d tokens",
        rank,
        world,
        len(mine),
        len(pending),
        sum(costs[p] for p in mine),
    )
    for part in mine:
        start = time.perf_counter()
        lines = parts[part]
        embeddings = embedder.encode([inputs[i] for i in lines], output=output)
        if output != "pooled" and pool_factor is not None:
            pooled = {"multi_vector": [pool_tokens(v, pool_factor) for v in multi_vectors(embeddings)]}
            embeddings = {**embeddings, **pooled} if output == "both" else pooled["multi_vector"]
        write_part(part_path(folder, part), lines, [ids[i] for i in lines], embeddings)
        log.info(
            "rank %d: part %d (lines %d-%d) in %.1f s", rank, part, lines[0], lines[-1], time.perf_counter() - start
        )
    finish_distributed()
    if rank == 0:
        write_index(folder, parts, embedder.dim, output, embedder.multi_vector_dim)


def part_costs(
    embedder: MocaEmbedder, inputs: Sequence[EmbedInput], parts: list[range], pending: list[int], rank: int, world: int
) -> dict[int, int]:
    """Tokens of each pending part; each rank costs every world-th input (headers only), the ranks share them."""
    lines = [i for p in pending for i in parts[p]]
    mine = {i: embedder.cost(inputs[i]) for i in lines[rank::world]}
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {i: c for costs in gathered for i, c in costs.items()}
    return {p: sum(mine[i] for i in parts[p]) for p in pending}


def embedder_settings(embedder: MocaEmbedder) -> dict:
    """What changes the embeddings besides the weights: the dtype, the processor's budget, the dimension."""
    processor = embedder.processor
    return {
        "dtype": str(next(embedder.model.parameters()).dtype).removeprefix("torch."),
        "min_pixels": processor.min_pixels,
        "max_pixels": processor.max_pixels,
        "max_length": processor.max_length,
        "dim": embedder.dim,
    }


def check_manifest(folder: Path, manifest: dict, *, overwrite: bool = False) -> None:
    """Write the manifest into a new folder; in an existing one, refuse a run that differs (naming the keys; with
    `overwrite`, delete that run's files instead) and remove temporary files a killed run left."""
    path = folder / MANIFEST
    if path.is_file() and overwrite:
        shutil.rmtree(folder / PARTS, ignore_errors=True)
        shutil.rmtree(folder / CHECKSUMS, ignore_errors=True)
        for name in (INDEX, MANIFEST):
            (folder / name).unlink(missing_ok=True)
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in manifest.keys() | saved.keys() if k != "inputs" and saved.get(k) != manifest.get(k))
        if changed:
            raise ValueError(
                f"--output {folder} holds the embeddings of another run (differing: "
                f"{', '.join(changed)}); remove it or choose another folder"
            )
        for stale in (folder / PARTS).glob(".*.tmp*"):
            stale.unlink()
        return
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"--output {folder} is a folder that holds other files; choose a new or empty one")
    (folder / PARTS).mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(manifest, indent=2).encode())


def multi_vectors(embeddings) -> list[np.ndarray]:
    """The multi-vectors of what `encode` returned for output "multi_vector" (a list) or "both" (a dict)."""
    return embeddings["multi_vector"] if isinstance(embeddings, dict) else embeddings


def embeddings_table(lines: Sequence[int], ids: Sequence, embeddings):
    """A pyarrow table (line, id, embedding) of embeddings [N, dim]: the parquet `embed` writes, whole or in parts.
    Multi-vectors (a list of [n_i, dim] arrays, or `encode`'s "both" dict) go in a `multi_vector` column: per row a
    list of fp16 vectors."""
    import pyarrow as pa

    columns = {
        "line": pa.array(lines, type=pa.int64()),
        "id": pa.array([None if i is None else str(i) for i in ids], type=pa.string()),
    }
    pooled = embeddings["pooled"] if isinstance(embeddings, dict) else embeddings
    if isinstance(pooled, np.ndarray):
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(pooled.reshape(-1)), pooled.shape[1])
    if not isinstance(embeddings, np.ndarray):
        rows = multi_vectors(embeddings)
        dim = rows[0].shape[1] if rows else 0
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
        flat = np.concatenate(rows).astype(np.float16) if rows else np.zeros((0, dim), np.float16)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
        columns["multi_vector"] = pa.ListArray.from_arrays(pa.array(offsets), vectors)
    return pa.table(columns)


def write_part(path: Path, lines: range, ids: list, embeddings) -> None:
    """One part as parquet (line, id, embedding), complete or absent."""
    import pyarrow.parquet as pq

    with written_atomically(path) as tmp:
        pq.write_table(embeddings_table(lines, ids, embeddings), tmp)
    part = int(path.stem.removeprefix("part-"))
    checksums = path.parent.parent / CHECKSUMS
    checksums.mkdir(exist_ok=True)
    write_atomically(checksum_path(path.parent.parent, part), file_checksum(path).encode())


def write_index(
    folder: Path, parts: list[range], dim: int, output: str = "pooled", multi_vector_dim: int | None = None
) -> None:
    missing = [p for p in range(len(parts)) if not part_path(folder, p).is_file()]
    if missing:
        raise RuntimeError(f"{folder}: parts {missing} are missing after every rank finished")
    kind = {} if output == "pooled" else {"output": output, "multi_vector_dim": multi_vector_dim}
    index = {
        "count": sum(map(len, parts)),
        "dim": dim,
        **kind,
        "parts": [
            {
                "file": str(part_path(folder, p).relative_to(folder)),
                "first_line": r.start,
                "rows": len(r),
                "blake2b": checksum_path(folder, p).read_text().strip(),
            }
            for p, r in enumerate(parts)
        ],
    }
    write_atomically(folder / INDEX, json.dumps(index, indent=2).encode())
    log.info("wrote %d embeddings of dimension %d in %d parts to %s", index["count"], dim, len(parts), folder)


def load_corpus(folder: str | os.PathLike) -> tuple:
    """(embeddings, ids) of a finished corpus folder, in input order: embeddings [N, dim] float32; for a
    multi-vector corpus a list of [n_i, multi_vector_dim] float32 arrays (the fp16 values stored); for "both" a
    dict {"pooled": ..., "multi_vector": ...}, as MocaEmbedder.encode returns them."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise FileNotFoundError(f"{folder}: no {INDEX}; the run has not finished (run it again to resume)")
    index = json.loads((folder / INDEX).read_text())
    output = index.get("output", "pooled")
    embeddings, ids = np.empty((index["count"], index["dim"]), dtype=np.float32), []
    vectors = [None] * index["count"]
    for part in index["parts"]:
        if "blake2b" in part and file_checksum(folder / part["file"]) != part["blake2b"]:
            raise ValueError(
                f"{folder / part['file']}: its bytes do not match the checksum in {INDEX} (damaged or "
                "replaced): run the embedding again to redo it"
            )
        table = pq.read_table(folder / part["file"])
        lines = table.column("line").to_numpy()
        if len(lines) != part["rows"] or lines[0] != part["first_line"]:
            raise ValueError(f"{folder / part['file']}: does not hold lines {part['first_line']}.. as indexed")
        if output != "multi_vector":
            values = table.column("embedding").combine_chunks().flatten().to_numpy()
            embeddings[lines] = values.reshape(len(lines), index["dim"])
        if output != "pooled":
            column = table.column("multi_vector").combine_chunks()
            flat = column.flatten().flatten().to_numpy().astype(np.float32).reshape(-1, index["multi_vector_dim"])
            offsets = column.offsets.to_numpy() - column.offsets[0].as_py()  # flatten() starts at the first offset
            for line, start, stop in zip(lines, offsets[:-1], offsets[1:]):
                vectors[line] = flat[start:stop]
        ids += table.column("id").to_pylist()
    if output == "pooled":
        return embeddings, ids
    return (vectors if output == "multi_vector" else {"pooled": embeddings, "multi_vector": vectors}), ids


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed to `path` once the block has written it: a reader, or a
    later run, never sees a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    yield tmp
    os.replace(tmp, path)


def write_atomically(path: Path, data: bytes) -> None:
    with written_atomically(path) as tmp:
        tmp.write_bytes(data)
