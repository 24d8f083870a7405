"""Prompt lists of any size: prompt sources, and an on-disk cache of their embeddings.

``onestep-train cache --teacher T --prompts SOURCE --output DIR`` encodes the prompts once, with the teacher's own
text encoders, into sharded safetensors files; ``onestep-train distill --cache DIR`` then trains from them: rows are
read memory-mapped when a batch draws them, so the memory of the data side does not grow with the number of prompts,
and the text encoders stay off the training device (they visit it only for previews and validation samples).

A SOURCE is a text file (one prompt per line), a ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` file (``--prompt-column``,
default ``prompt``, else ``text`` or ``caption``), or, with the ``datasets`` package installed, a ``.parquet`` file, a
folder written by ``Dataset.save_to_disk`` or a Hugging Face Hub dataset name (read as a stream). The cache holds:

- ``cache.json``: the teacher, its architecture, the resolution, the prompt count ``N``, the row shape and dtype of each
  embedding, and the shards;
- ``embeddings-00000.safetensors``, ...: ``shard_rows`` rows each, one tensor per embedding (the empty prompt, the
  classifier-free guidance's unconditional row, is row ``N``); variable-length embeddings (Qwen-Image, Z-Image) are
  padded per shard, and padded again to the longest row of a batch when read;
- ``prompts.txt`` and ``prompts.offsets.npy``: the prompts and where each line starts (read one at a time).

Shards are written atomically; an interrupted ``cache`` run continues after its last complete shard.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CACHE_FILE = "cache.json"
FORMAT = 1
COLUMNS = ("prompt", "text", "caption")  # tried in order when --prompt-column is not given
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def _clean(text) -> str:
    return " ".join(str(text).split())


def _column(record: dict, column: str, source: str) -> str:
    names = [column] if column else [c for c in COLUMNS if c in record]
    if not names or names[0] not in record:
        raise ValueError(f"--prompts {source}: its records have no {column or ' / '.join(COLUMNS)} field (fields: {sorted(record)[:8]}); "
                         "name the prompt's with --prompt-column.")
    return record[names[0]]


def iter_prompts(source: str, column: str = "") -> Iterator[str]:
    """The non-empty prompts of ``source`` (see the module docstring), read one at a time, whitespace collapsed."""
    suffix = os.path.splitext(source)[1].lower()
    if os.path.isfile(source) and suffix in TEXT_SUFFIXES:
        with open(source, encoding="utf-8", newline="") as f:
            if suffix == ".json":
                records = json.load(f)
            elif suffix == ".jsonl":
                records = (json.loads(line) for line in f if line.strip())
            else:
                records = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for record in records:
                text = _clean(record if isinstance(record, str) else _column(record, column, source))
                if text:
                    yield text
        return
    if os.path.isfile(source) and suffix != ".parquet":
        with open(source, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield _clean(line)
        return
    yield from _dataset_prompts(source, column)


def _dataset_prompts(source: str, column: str) -> Iterator[str]:
    """Prompts of a parquet file, a ``save_to_disk`` folder or a Hub dataset, through the ``datasets`` package."""
    for record in _dataset_records(source, "--prompts"):
        text = _clean(_column(record, column, source))
        if text:
            yield text


def _dataset_records(source: str, flag: str):
    """The records of a parquet file, WebDataset shards, a ``save_to_disk`` folder or a Hub dataset (``datasets``;
    streamed where the source is large)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{flag} {source}: parquet files, WebDataset shards, dataset folders and Hub datasets are read with the datasets "
                         "package: pip install datasets (or pass a text / .jsonl / .csv file, or a folder of captioned images).") from None
    shards = sorted(os.path.join(source, n) for n in os.listdir(source) if n.endswith(".tar")) if os.path.isdir(source) else []
    if source.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=source, split="train", streaming=True)
    if source.endswith(".tar") or shards:
        return datasets.load_dataset("webdataset", data_files=shards or source, split="train", streaming=True)
    if os.path.isdir(source):
        try:
            rows = datasets.load_from_disk(source)
        except FileNotFoundError:
            raise ValueError(f"{flag} {source}: a folder with neither captioned images (name.png + name.txt), WebDataset .tar shards "
                             "nor a saved dataset.") from None
        return rows["train"] if isinstance(rows, datasets.DatasetDict) else rows
    try:
        return datasets.load_dataset(source, split="train", streaming=True)
    except Exception as error:  # the Hub, a missing or private dataset
        raise ValueError(f"{flag} {source}: neither a file, a folder nor a loadable Hub dataset ({error}).") from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")


def captioned_images(folder: str) -> list[str]:
    """Image files of ``folder`` that have a ``.txt`` caption beside them, sorted."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    return [n for n in names if os.path.isfile(os.path.join(folder, os.path.splitext(n)[0] + ".txt"))]


CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")


def iter_image_captions(source: str, image_column: str = "", caption_column: str = "") -> Iterator[tuple]:
    """``(PIL image, caption)`` pairs of ``source``: a folder of images with a ``.txt`` caption each, or (``datasets``
    package) a ``.parquet`` file, a ``save_to_disk`` folder, WebDataset ``.tar`` shards (a file, or a folder of them) or
    a Hub dataset; records name their image and caption by ``image_column`` / ``caption_column`` (default: the first of
    image / jpg / jpeg / png / webp, and of caption / text / txt / prompt)."""
    from PIL import Image

    if os.path.isdir(source) and captioned_images(source):
        for name in captioned_images(source):
            with open(os.path.join(source, os.path.splitext(name)[0] + ".txt"), encoding="utf-8") as f:
                yield Image.open(os.path.join(source, name)), _clean(f.read()) or " "
        return
    for record in _dataset_records(source, "--data"):
        image = _field(record, image_column, IMAGE_COLUMNS, source, "--image-column")
        if isinstance(image, dict) and image.get("bytes") is not None:
            import io

            image = Image.open(io.BytesIO(image["bytes"]))
        elif isinstance(image, (bytes, bytearray)):
            import io

            image = Image.open(io.BytesIO(image))
        yield image, _clean(_field(record, caption_column, CAPTION_COLUMNS, source, "--caption-column")) or " "


def _field(record: dict, column: str, defaults: tuple, source: str, flag: str):
    name = column or next((c for c in defaults if c in record), None)
    if name is None or name not in record:
        raise ValueError(f"--data {source}: its records have no {column or ' / '.join(defaults)} field (fields: {sorted(record)[:8]}); name it with {flag}.")
    return record[name]


# ------------------------------------------------------------------------------------------------------- writing
def write_cache(teacher, source: str, output: str, column: str = "", shard_rows: int = 4096, batch_size: int = 64, limit: int = 0,
                images: bool = False, image_column: str = "") -> dict:
    """Encode the prompts of ``source`` with ``teacher`` (a :class:`~onestep_pipelines.training.teachers.Teacher`) into a
    cache folder ``output``; returns its ``cache.json`` record. ``limit`` > 0 stops after that many prompts. With
    ``images``, ``source`` holds captioned images (:func:`iter_image_captions`, ``column`` naming the caption): each row
    also holds the image's latents (``latents``, as ``--data`` encodes them; zeros in the unconditional row)."""
    import numpy as np
    import torch
    from onestep_pipelines.pipelines.loading import atomic_path, write_atomically
    from safetensors.torch import save_file

    from .teachers import encode_prompts

    if shard_rows < 1 or batch_size < 1:
        raise ValueError("--shard-rows and --batch-size must be at least 1.")
    os.makedirs(output, exist_ok=True)
    record = {"format": FORMAT, "teacher": teacher.source, "architecture": teacher.architecture, "resolution": teacher.resolution,
              "source": source, "column": column, "images": images, "shard_rows": shard_rows}
    progress_path = os.path.join(output, "progress.json")
    done = _completed_shards(output, progress_path, record)
    skip = done * shard_rows
    offsets, shards = [], [f"embeddings-{i:05d}.safetensors" for i in range(done)]
    buffers: dict[str, list] = {}
    chunk: list[tuple] = []  # (image or None, prompt) records waiting to be encoded
    keys: dict[str, dict] = {}

    def flush_shard(final: bool = False):
        tensors = {k: _pad_cat(v) for k, v in buffers.items()}
        keys.update({k: {"dtype": str(v.dtype).removeprefix("torch."), "row_shape": list(v.shape[1:])} for k, v in tensors.items() if k not in keys})
        name = f"embeddings-{len(shards):05d}.safetensors"
        with atomic_path(os.path.join(output, name)) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
        shards.append(name)
        buffers.clear()
        if not final:
            write_atomically(progress_path, json.dumps({**record, "shards": len(shards)}))

    def encode(chunk: list[tuple]):
        with torch.no_grad():
            rows = encode_prompts(teacher, [text for _, text in chunk])
            if images:  # one image at a time, as --data encodes them
                rows["latents"] = torch.cat([image_latents(teacher, image) if image is not None else torch.zeros(1, *teacher.sample_shape)
                                             for image, _ in chunk])
        for key, value in rows.items():
            buffers.setdefault(key, []).append(value.cpu())

    prompts_path = os.path.join(output, "prompts.txt")
    count = 0
    records = iter_image_captions(source, image_column, column) if images else ((None, p) for p in iter_prompts(source, column))
    with atomic_path(prompts_path) as tmp, open(tmp, "w", encoding="utf-8") as text:
        for image, prompt in records:
            offsets.append(text.tell())
            text.write(prompt + "\n")
            count += 1
            if count > skip:
                chunk.append((image, prompt))
                if len(chunk) == batch_size or (count - skip) % shard_rows == 0:
                    encode(chunk)
                    chunk = []
                if (count - skip) % shard_rows == 0:
                    flush_shard()
            if count == limit:
                break
        offsets.append(text.tell())
    flag, what = ("--data", "captioned image") if images else ("--prompts", "prompt")
    if count == 0:
        raise ValueError(f"{flag} {source} holds no {what}.")
    if count < skip:
        raise ValueError(f"{output} holds {done} shards of {skip} {what}s, but {flag} {source} has only {count}: another source? "
                         "Remove the folder to start again.")
    encode(chunk + [(None, "")])  # the rest, and the unconditional row N
    flush_shard(final=True)
    np.save(os.path.join(output, "prompts.offsets.npy"), np.asarray(offsets, dtype=np.int64))
    record.update(count=count, shards=shards, keys=keys)
    write_atomically(os.path.join(output, CACHE_FILE), json.dumps(record, indent=2) + "\n")
    if os.path.exists(progress_path):
        os.remove(progress_path)
    return record


def _completed_shards(output: str, progress_path: str, record: dict) -> int:
    """Shards an interrupted run of the same cache finished (0 for a new folder); refuses another cache's folder."""
    if os.path.isfile(os.path.join(output, CACHE_FILE)):
        raise ValueError(f"{output} already holds a finished cache; choose another --output (or remove it).")
    if not os.path.isfile(progress_path):
        return 0
    with open(progress_path, encoding="utf-8") as f:
        progress = json.load(f)
    if {k: progress.get(k) for k in record} != record:
        raise ValueError(f"{output} holds an unfinished cache of another teacher, source or shard size; choose another --output.")
    return int(progress["shards"])


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several batches as one tensor, sequence dimensions (dim 1) zero-padded to the longest."""
    import torch

    if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
        length = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]) for t in tensors]
    return torch.cat(tensors)


def image_latents(teacher, image) -> torch.Tensor:
    """The teacher's latents ``x`` of one image, resized to the training resolution (as ``--data`` encodes them)."""
    from .families import to_latents

    pipe, size = teacher.pipeline, teacher.resolution
    pixels = pipe.image_processor.preprocess(image.convert("RGB").resize((size, size))).to(pipe.vae.device, pipe.vae.dtype)
    return to_latents(pipe, teacher.architecture, pixels).float()


# ------------------------------------------------------------------------------------------------------- reading
class CachedPrompts:
    """The prompts of a cache as a read-only sequence (one line read per item; only the offsets are in memory)."""

    def __init__(self, folder: str, count: int):
        import numpy as np

        self.path, self.count = os.path.join(folder, "prompts.txt"), count
        self.offsets = np.load(os.path.join(folder, "prompts.offsets.npy"), mmap_mode="r")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(self.count))]
        if not -self.count <= item < self.count:
            raise IndexError(item)
        item %= self.count
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[item]))
            return f.read(int(self.offsets[item + 1] - self.offsets[item])).decode("utf-8").rstrip("\n")


class CachedColumn:
    """One embedding of every cached row, gathered on demand: ``column.to(device)[index]`` is the rows of ``index``
    (a tensor of row numbers) on ``device``, as a dict of in-memory tensors would give them."""

    def __init__(self, cache: "PromptCache", key: str, device=None):
        import torch

        self.cache, self.key, self.device = cache, key, device
        self.dtype = getattr(torch, cache.record["keys"][key]["dtype"])

    def to(self, device) -> "CachedColumn":
        return CachedColumn(self.cache, self.key, device)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.cache.gather(self.key, tuple(index.reshape(-1).tolist()), self.device or "cpu")


class PromptCache:
    """A cache folder written by :func:`write_cache`, opened for reading (shards memory-mapped, opened when first read)."""

    def __init__(self, folder: str):
        path = os.path.join(folder, CACHE_FILE)
        if not os.path.isfile(path):
            hint = " (an unfinished cache: run the cache command again to finish it)" if os.path.isfile(os.path.join(folder, "progress.json")) else ""
            raise ValueError(f"--cache {folder}: no {CACHE_FILE}, not a prompt cache written by `onestep-train cache`{hint}.")
        with open(path, encoding="utf-8") as f:
            self.record = json.load(f)
        if self.record.get("format", FORMAT) > FORMAT:
            raise ValueError(f"--cache {folder} was written by a newer onestep-pipelines (format {self.record['format']}); upgrade.")
        self.folder, self.shard_rows = folder, self.record["shard_rows"]
        self._open: dict[int, object] = {}
        self._last: dict[tuple, tuple] = {}  # (key, device) -> (rows, tensor) of the last gather
        self.prompts = CachedPrompts(folder, self.record["count"])
        self.columns = {key: CachedColumn(self, key) for key in self.record["keys"] if key != "latents"}  # the prompt embeddings
        self.images = CachedColumn(self, "latents") if "latents" in self.record["keys"] else None  # an image cache's latents

    def check(self, teacher) -> None:
        """Refuse a cache of another teacher, architecture or resolution (SDXL's embeddings hold the image size)."""
        mine = {"teacher": teacher.source, "architecture": teacher.architecture, "resolution": teacher.resolution}
        theirs = {k: self.record[k] for k in mine}
        same_teacher = theirs["teacher"] == mine["teacher"] or (os.path.exists(theirs["teacher"]) and os.path.exists(mine["teacher"])
                                                                and os.path.samefile(theirs["teacher"], mine["teacher"]))
        if not same_teacher or (theirs["architecture"], theirs["resolution"]) != (mine["architecture"], mine["resolution"]):
            raise ValueError(f"--cache {self.folder} holds embeddings of teacher {self.record['teacher']} ({theirs}); this run's is "
                             f"{teacher.source} ({mine}). Write a cache for it: onestep-train cache --teacher {teacher.source} ...")

    def gather(self, key: str, rows: tuple[int, ...], device) -> torch.Tensor:
        """Rows ``rows`` of embedding ``key`` on ``device``, sequence dimensions padded to the longest. The last gather of
        each key is kept: within one update the teacher, the student and the fake score read the same rows."""
        last = self._last.get((key, str(device)))
        if last is not None and last[0] == rows:
            return last[1]
        tensor = _pad_cat([self.row(key, i) for i in rows]).to(device, non_blocking=True)
        self._last[(key, str(device))] = (rows, tensor)
        return tensor

    def row(self, key: str, index: int) -> torch.Tensor:
        shard, offset = divmod(index, self.shard_rows)
        handle = self._open.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = self._open[shard] = safe_open(os.path.join(self.folder, self.record["shards"][shard]), framework="pt")
        return handle.get_slice(key)[offset : offset + 1]
