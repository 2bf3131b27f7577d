"""A candidate pool on disk: the local picks of every image and their features, written shard by shard.

`sparseseg extract` (one process per GPU) writes it; global selection, scoring and anything else that
needs the pool read it back row by row, so no process ever holds the whole pool in memory. Layout::

    OUT/manifest.json                 what the pool is (below); written by rank 0
    OUT/shards/00003/coords.npy       (capacity, 3) int32: image, y, x of each row (-1 past `rows`)
    OUT/shards/00003/s0.npy           (capacity, D) float16: the features of noise sample 0 (deterministic)
    OUT/shards/00003/s1.npy ...       the noise samples stage 2 needs (1..M, and M+1 for eDALD)
    OUT/shards/00003/labelled_*.npy   labelled pixels of the shard's images and their features (if any)
    OUT/shards/00003/done.json        written last, atomically: {"rows": ..., "seconds": ...}

A shard is a contiguous range of images; its rows are those images' local picks, image by image, in
pick order, so the concatenation of the shards is the single-process pool (`TwoStageStrategy.select`'s
order). Files are plain NumPy `.npy` arrays opened as memory maps: rows are written as they are
computed and read back without loading a file, the header records dtype and shape, and any NumPy reads
them. (safetensors writes a file in one go, so a shard could not be filled row by row; zarr would be
one more pinned dependency for what memmap already does on one filesystem.)

Resuming: a shard is finished when its `done.json` exists; a rerun skips finished shards and rewrites
the others from their first row. The manifest's `config_hash` names the settings that made the pool;
opening it with other settings is an error, never a silent mix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write_text, read_json_object

MANIFEST = "manifest.json"
FORMAT = "sparseseg-pool"
VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class Shard:
    """One shard: images [start, stop) of the split, room for `capacity` rows."""

    index: int
    start: int
    stop: int
    capacity: int

    @property
    def folder(self) -> str:
        return f"shards/{self.index:05d}"


def plan_shards(num_images: int, images_per_shard: int, rows_per_image: int) -> list[Shard]:
    """Contiguous image ranges of `images_per_shard` images (the last one shorter)."""
    if num_images < 1 or images_per_shard < 1:
        raise SparsesegError(f"a pool needs images and images_per_shard >= 1; got {num_images} and {images_per_shard}")
    return [Shard(i, start, min(start + images_per_shard, num_images), (min(start + images_per_shard, num_images) - start) * rows_per_image)
            for i, start in enumerate(range(0, num_images, images_per_shard))]


class ShardWriter:
    """Appends one shard's rows to its memory-mapped files; `close` marks the shard finished."""

    def __init__(self, pool: PoolStore, shard: Shard) -> None:
        self.pool, self.shard = pool, shard
        folder = pool.root / shard.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.json").unlink(missing_ok=True)
        dtype = DTYPES[pool.dtype]
        self.coords = np.lib.format.open_memmap(folder / "coords.npy", mode="w+", dtype=np.int32, shape=(shard.capacity, 3))
        self.coords[:] = -1
        self.features = {s: np.lib.format.open_memmap(folder / f"s{s}.npy", mode="w+", dtype=dtype,
                                                      shape=(shard.capacity, pool.dim))
                         for s in pool.samples}
        self.rows = 0
        self.started = time.perf_counter()
        self.labelled: list[tuple[np.ndarray, np.ndarray]] = []

    def append(self, image: torch.Tensor, y: torch.Tensor, x: torch.Tensor, features: dict[int, torch.Tensor]) -> None:
        """Rows for pixels (image, y, x), each (n,), with their (n, D) features for every stored sample."""
        n = len(image)
        if self.rows + n > self.shard.capacity:
            raise SparsesegError(f"shard {self.shard.index}: {self.rows + n} rows exceed its capacity {self.shard.capacity}")
        if set(features) != set(self.pool.samples):
            raise SparsesegError(f"shard {self.shard.index}: features for samples {sorted(features)}, the pool stores "
                                 f"{self.pool.samples}")
        sl = slice(self.rows, self.rows + n)
        self.coords[sl] = torch.stack([image, y, x], dim=1).numpy().astype(np.int32)
        for s, z in features.items():
            self.features[s][sl] = z.detach().to("cpu", torch.float32).numpy()
        self.rows += n

    def append_labelled(self, image: torch.Tensor, y: torch.Tensor, x: torch.Tensor, features: torch.Tensor) -> None:
        """Labelled pixels of this shard's images with their (n, D) deterministic features (not pool rows)."""
        self.labelled.append((torch.stack([image, y, x], dim=1).numpy().astype(np.int32),
                              features.detach().to("cpu", torch.float32).numpy().astype(DTYPES[self.pool.dtype])))

    def close(self) -> None:
        """Flush every file to disk, then write the done marker (the shard counts as finished only after it)."""
        folder = self.pool.root / self.shard.folder
        for name in ("labelled_coords.npy", "labelled_s0.npy"):
            (folder / name).unlink(missing_ok=True)
        if self.labelled:
            np.save(folder / "labelled_coords.npy", np.concatenate([c for c, _ in self.labelled]))
            np.save(folder / "labelled_s0.npy", np.concatenate([f for _, f in self.labelled]))
        for array in (self.coords, *self.features.values()):
            array.flush()
        info = {"rows": self.rows, "seconds": round(time.perf_counter() - self.started, 3)}
        atomic_write_text(self.pool.root / self.shard.folder / "done.json", json.dumps(info) + "\n")


class PoolStore:
    """A pool folder: its manifest, its shards and their files (module docstring).

    Build with `PoolStore.create` (the first process, or a rerun) or `PoolStore.open` (any reader).
    """

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.dtype = str(manifest["dtype"])
        self.samples = [int(s) for s in manifest["samples"]]
        self.shards = [Shard(s["index"], s["images"][0], s["images"][1], s["capacity"]) for s in manifest["shards"]]
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._rows: list[int] | None = None

    # ---------------------------------------------------------------- building and opening
    @classmethod
    def create(cls, root: Path, header: dict, num_images: int, images_per_shard: int, rows_per_image: int,
               samples: list[int], dim: int, dtype: str = "float16") -> PoolStore:
        """Write the manifest of a new pool, or reopen the pool already there when it was made alike.

        Args:
            root: the pool folder (created).
            header: what made the pool; must hold `config_hash` (compared on reuse) and is stored as is.
            num_images, images_per_shard, rows_per_image: the shard layout (rows_per_image = K).
            samples: the noise samples stored (0 first).
            dim: feature dimension D.
            dtype: "float16" (half the disk) or "float32" (the features exactly as computed).

        Raises:
            SparsesegError: the folder holds a pool of other settings, or something that is not a pool.
        """
        root = Path(root)
        if dtype not in DTYPES:
            raise SparsesegError(f"pool dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        shards = plan_shards(num_images, images_per_shard, rows_per_image)
        files = {"coords": "coords.npy", **{str(s): f"s{s}.npy" for s in samples}}
        manifest = {
            "format": FORMAT, "version": VERSION, **header,
            "images": num_images, "rows_per_image": rows_per_image, "dim": dim, "dtype": dtype, "samples": list(samples),
            "shards": [{"index": s.index, "images": [s.start, s.stop], "capacity": s.capacity,
                        "files": {k: f"{s.folder}/{v}" for k, v in files.items()},
                        "shapes": {"coords": [s.capacity, 3], **{str(x): [s.capacity, dim] for x in samples}},
                        "done": False, "rows": None} for s in shards],
        }
        path = root / MANIFEST
        if path.exists():
            old = cls.open(root, check_done=False)
            if old.manifest["config_hash"] != header["config_hash"]:
                raise SparsesegError(
                    f"{path}: holds a pool made with other settings (config hash {old.manifest['config_hash']}, "
                    f"now {header['config_hash']}); give another --out or delete the folder")
            if old.shards != shards or old.samples != list(samples) or old.dtype != dtype:
                raise SparsesegError(f"{path}: holds a pool of another layout (shards, samples or dtype); "
                                     f"rerun with the same --images-per-shard and --dtype, or give another --out")
            return old
        if root.exists() and any(root.iterdir()):
            raise SparsesegError(f"{root}: not empty and holds no {MANIFEST}; give an empty or new folder")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
        return cls(root, manifest)

    @classmethod
    def open(cls, root: Path, check_done: bool = True) -> PoolStore:
        """Read a pool's manifest; with `check_done`, fail unless every shard is finished."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise SparsesegError(f"{path}: not found; is {root} a pool written by `sparseseg extract`?")
        manifest = read_json_object(path)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise SparsesegError(f"{path}: not a {FORMAT} manifest of version {VERSION}")
        for key in ("dim", "dtype", "samples", "shards", "config_hash"):
            if key not in manifest:
                raise SparsesegError(f"{path}: field {key!r} missing")
        pool = cls(root, manifest)
        if check_done:
            missing = [s.index for s in pool.shards if not pool.is_done(s)]
            if missing:
                raise SparsesegError(f"{root}: shard(s) {missing[:10]} of {len(pool.shards)} not finished; "
                                     "run `sparseseg extract` again with the same config and --out to finish them")
        return pool

    def is_done(self, shard: Shard) -> bool:
        return (self.root / shard.folder / "done.json").is_file()

    def writer(self, shard: Shard) -> ShardWriter:
        """A writer that (re)starts `shard` from its first row."""
        self._maps.clear()
        self._rows = None
        return ShardWriter(self, shard)

    def finish(self) -> None:
        """Rewrite the manifest with each shard's done flag and row count (call once every writer closed)."""
        for entry, shard in zip(self.manifest["shards"], self.shards, strict=True):
            done = self.is_done(shard)
            entry["done"] = done
            entry["rows"] = read_json_object(self.root / shard.folder / "done.json")["rows"] if done else None
        atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")
        self._rows = None

    # ---------------------------------------------------------------- reading
    @property
    def shard_rows(self) -> list[int]:
        """Rows written in each shard (finished shards only)."""
        if self._rows is None:
            self._rows = [int(read_json_object(self.root / s.folder / "done.json")["rows"]) for s in self.shards]
        return self._rows

    def __len__(self) -> int:
        """Rows of the whole pool."""
        return sum(self.shard_rows)

    def _map(self, shard: Shard, name: str) -> np.ndarray:
        key = (shard.index, name)
        if key not in self._maps:
            path = self.root / shard.folder / name
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise SparsesegError(f"{path}: cannot read ({exc})") from None
            width = 3 if name == "coords.npy" else self.dim
            if array.shape != (shard.capacity, width):
                raise SparsesegError(f"{path}: shape {array.shape}, the manifest says {(shard.capacity, width)}")
            self._maps[key] = array
        return self._maps[key]

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= len(self):
            raise SparsesegError(f"{self.root}: rows {start}..{stop} asked of a pool of {len(self)}")
        parts, offset = [], 0
        for shard, rows in zip(self.shards, self.shard_rows, strict=True):
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if lo < hi:
                parts.append(self._map(shard, name)[lo:hi])
            offset += rows
        if not parts:
            return np.empty((0, 3 if name == "coords.npy" else self.dim), dtype=np.int32 if name == "coords.npy"
                            else DTYPES[self.dtype])
        return np.concatenate(parts)

    def coords(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(n, 3) int64 image, y, x of pool rows [start, stop)."""
        return torch.from_numpy(self._read("coords.npy", start, len(self) if stop is None else stop).astype(np.int64))

    def features(self, sample: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(n, D) float32 features of pool rows [start, stop) under noise sample `sample`."""
        if sample not in self.samples:
            raise SparsesegError(f"{self.root}: noise sample {sample} not stored (the pool holds {self.samples})")
        rows = self._read(f"s{sample}.npy", start, len(self) if stop is None else stop)
        return torch.from_numpy(rows.astype(np.float32))

    def labelled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, 3) int64 image, y, x and (m, D) float32 deterministic features of the labelled pixels
        the pool was extracted with (empty without labels)."""
        coords, feats = [torch.empty(0, 3, dtype=torch.long)], [torch.empty(0, self.dim)]
        for shard in self.shards:
            path = self.root / shard.folder / "labelled_coords.npy"
            if path.is_file():
                coords.append(torch.from_numpy(np.load(path).astype(np.int64)))
                feats.append(torch.from_numpy(np.load(path.with_name("labelled_s0.npy")).astype(np.float32)))
        return torch.cat(coords), torch.cat(feats)

    def rows_of(self, sample: int, index: torch.Tensor) -> torch.Tensor:
        """(len(index), D) float32 features of arbitrary pool rows (sorted reads, input order kept)."""
        out = torch.empty(len(index), self.dim)
        if len(index) == 0:
            return out
        order = torch.argsort(index)
        sorted_idx = index[order]
        bounds = np.cumsum([0, *self.shard_rows])
        for shard, lo, hi in zip(self.shards, bounds[:-1], bounds[1:], strict=True):
            sel = (sorted_idx >= int(lo)) & (sorted_idx < int(hi))
            if bool(sel.any()):
                local = (sorted_idx[sel] - int(lo)).numpy()
                out[order[sel]] = torch.from_numpy(self._map(shard, f"s{sample}.npy")[local].astype(np.float32))
        return out
