"""Caches that make repeated trials cheap, exactly.

* pristine backbones (weights read and verified once, then copied per trial);
* encoded inputs per (data, preprocessing);
* frozen-prefix outputs per (backbone weights, split point, data rows, preprocessing): the output
  of a frozen prefix in eval mode is the same in every epoch and every trial, so it is computed
  once.  When every stage is frozen the pooled feature vector is kept instead (much smaller).

Frozen-prefix outputs live in memory (least-recently-used entries are dropped once ``max_bytes``
is exceeded) and, unless disabled, on disk too, so that other processes, parallel workers and a
resumed search reuse them.  See :class:`DiskCache` for the disk layout, the key and the eviction
policy.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import stat
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch

from autoft.data.datasets import LabelledData
from autoft.data.encode import encode
from autoft.zoo import get_backbone
from autoft.zoo.base import Backbone, Preprocessing, State, cat_states, index_state, text_mask

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump whenever what is stored (or how it is computed) changes
DEFAULT_DISK_BYTES = 4 << 30
_OFF = ("0", "off", "none", "false", "no", "")


def state_nbytes(state: State) -> int:
    if isinstance(state, tuple):
        return sum(s.element_size() * s.nelement() for s in state)
    return state.element_size() * state.nelement()


def state_digest(state: State) -> str:
    h = hashlib.sha256()
    for t in (state if isinstance(state, tuple) else (state,)):
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.contiguous().numpy())  # the buffer itself: no copy of a dataset-sized tensor
    return h.hexdigest()[:16]


def rows_digest(rows: torch.Tensor | None) -> str:
    if rows is None:
        return "all"
    return hashlib.sha256(rows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def trim_text(state: State) -> State:
    """Drop padding columns that no example in this batch uses (exact under the attention mask)."""
    mask = text_mask(state)
    if mask is not None:
        if mask.dtype == torch.int32:  # token ids cached as int32 (FeatureCache.tokens): int64, as tokenized
            state = tuple(s.long() if s.dtype == torch.int32 else s for s in state)
        longest = max(int(mask.sum(1).max()), 1)
        if longest < mask.shape[1]:
            return tuple(s[:, :longest] for s in state)
    return state


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


# -- weights fingerprints -------------------------------------------------------------------------
def _module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.state_dict(keep_vars=True).items())


def _versions(backbone: Backbone) -> tuple:
    """In-place version counters of every stage tensor: they change whenever a weight is modified."""
    return tuple(t._version for st in backbone.stages for _, t in _module_tensors(st))


def _tensor_ids(backbone: Backbone) -> tuple:
    return tuple(id(t) for st in backbone.stages for _, t in _module_tensors(st))


def stage_digests(backbone: Backbone) -> list[str]:
    """One sha256 per stage over its parameters and buffers (names, dtypes, shapes, values).

    Memoised on the module and checked against the tensors' identities and in-place version
    counters, so a backbone whose weights were changed (optimizer steps, ``load_state_dict``,
    batch-norm statistics) is hashed again.
    """
    memo = getattr(backbone, "_autoft_stage_digests", None)
    ids, versions = _tensor_ids(backbone), _versions(backbone)
    if memo is not None and memo[0] == ids and memo[1] == versions:
        return memo[2]
    out = []
    for st in backbone.stages:
        h = hashlib.sha256()
        for name, t in _module_tensors(st):
            t = t.detach()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out.append(h.hexdigest()[:16])
    object.__setattr__(backbone, "_autoft_stage_digests", (ids, versions, out))
    return out


def prefix_weights_digest(backbone: Backbone, split: int) -> str:
    """A digest of the weights of stages [0, split) (plus the pool when every stage is frozen)."""
    h = hashlib.sha256("|".join(stage_digests(backbone)[:split]).encode())
    if split == backbone.num_stages:
        h.update(f"pool:{type(backbone.pool).__qualname__}".encode())
    return h.hexdigest()[:16]


# -- disk -----------------------------------------------------------------------------------------
def default_cache_dir() -> Path | None:
    """``AUTOFT_CACHE_DIR`` (``off`` disables the disk cache), else ``$XDG_CACHE_HOME/autoft/features``
    or ``~/.cache/autoft/features``.  Deliberately not under ``AUTOFT_HOME``, which may be a
    read-only folder of shared weights and data."""
    env = os.environ.get("AUTOFT_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "autoft" / "features"


def default_disk_bytes() -> int:
    env = os.environ.get("AUTOFT_CACHE_MAX_GB")
    if env:
        try:
            return int(float(env) * (1 << 30))
        except ValueError:
            log.warning("AUTOFT_CACHE_MAX_GB=%r is not a number; using %d GB", env, DEFAULT_DISK_BYTES >> 30)
    return DEFAULT_DISK_BYTES


class DiskCache:
    """Frozen-prefix outputs as files, shared by every process that uses the same folder.

    * **Key.** A file holds one entry; its name is the sha256 of the full key, and the key itself is
      stored inside the file and compared on every read.  The key covers everything the stored
      tensors depend on: backbone name, a sha256 of the weights of the frozen stages, the split
      point, a digest of the encoded input tensors and of the rows (examples) computed, the
      preprocessing, the torch version, the device type and the cache format version.  A change in
      any of them is a different key, so a stale entry can never be read.
    * **Format.** ``torch.save`` of plain tensors, read back with ``torch.load(weights_only=True)``
      (no pickled code runs).  Unreadable or mismatching files are deleted and recomputed.
    * **Writes are atomic**: to a temporary file in the same folder, then ``os.replace``; readers
      never see a partial file, and concurrent writers of the same key just replace each other.
    * **Eviction: least recently used, by file modification time**, which every read refreshes.
      After each write, the oldest files are deleted until the folder holds at most ``max_bytes``.
      An entry larger than ``max_bytes`` on its own is not stored.  Temporary files older than an
      hour (left by a crashed writer) are removed too.
    * **Only its own files** are ever counted, evicted or cleared: names of exactly the two forms
      it writes (``<40 hex>.pt`` entries, ``.<40 hex>.<pid>.<8 hex>.tmp`` temporary files).  Any
      other file in the folder (a user's ``model.pt``) is left alone.
    """

    SUFFIX = ".pt"
    ENTRY_NAME = re.compile(r"[0-9a-f]{40}\.pt")
    TMP_NAME = re.compile(r"\.[0-9a-f]{40}\.[0-9]+\.[0-9a-f]{8}\.tmp")

    def __init__(self, folder: str | Path, max_bytes: int = DEFAULT_DISK_BYTES):
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self.enabled = True
        self.reads = self.writes = self.evictions = 0

    def path(self, key: str) -> Path:
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:40] + self.SUFFIX)

    def get(self, key: str) -> State | None:
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # unreadable folder: compute, keep going
            log.warning("feature cache: cannot read %s (%s); recomputing", path, exc)
            return None
        except Exception as exc:  # corrupt or foreign file: drop it, recompute
            log.warning("feature cache: unreadable file %s (%s); recomputing", path, exc)
            _unlink(path)
            return None
        if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("tensors"), list):
            log.warning("feature cache: %s does not hold the expected entry; recomputing", path)
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        self.reads += 1
        tensors = doc["tensors"]
        return tuple(tensors) if doc.get("tuple") else tensors[0]

    def put(self, key: str, state: State) -> bool:
        if not self.enabled:
            return False
        size = state_nbytes(state)
        if size > self.max_bytes:
            log.info("feature cache: entry of %.1f MB exceeds the disk bound (%.1f MB); not stored",
                     size / 1e6, self.max_bytes / 1e6)
            return False
        tensors = [t.contiguous() for t in (state if isinstance(state, tuple) else (state,))]
        doc = {"key": key, "tuple": isinstance(state, tuple), "tensors": tensors}
        path = self.path(key)
        tmp = self.folder / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(doc, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink(tmp)
            log.warning("feature cache: cannot write to %s (%s); disk cache disabled for this run",
                        self.folder, exc)
            self.enabled = False
            return False
        self.writes += 1
        self.evict(keep=path)
        return True

    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry this cache wrote (by name), oldest first."""
        out = []
        try:
            files = list(self.folder.iterdir())
        except OSError:
            return []
        now = time.time()
        for p in files:
            entry, tmp = self.ENTRY_NAME.fullmatch(p.name), self.TMP_NAME.fullmatch(p.name)
            if not (entry or tmp):
                continue  # not ours: never counted, never deleted
            try:
                st = p.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # a link or folder under our name pattern: not something we wrote
            if entry:
                out.append((st.st_mtime, st.st_size, p))
            elif now - st.st_mtime > 3600:
                _unlink(p)  # left behind by a writer that died
        return sorted(out)

    def size(self) -> int:
        return sum(s for _, s, _ in self.entries())

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until the folder holds at most ``max_bytes``."""
        entries = self.entries()
        total = sum(s for _, s, _ in entries)
        removed = 0
        for _, size, p in entries:
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            _unlink(p)
            total -= size
            removed += 1
        self.evictions += removed
        if removed:
            log.info("feature cache: evicted %d least recently used entries from %s", removed, self.folder)
        return removed

    def clear(self) -> None:
        for _, _, p in self.entries():
            _unlink(p)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


# -- the cache ------------------------------------------------------------------------------------
class FeatureCache:
    """Backbones, encoded inputs and frozen-prefix outputs, shared by the trials of a process.

    ``disk``: ``None`` (default) uses :func:`default_cache_dir` (``AUTOFT_CACHE_DIR=off`` disables
    it), ``False`` keeps everything in memory, a path or :class:`DiskCache` uses that folder.
    ``max_disk_bytes`` bounds the folder (default ``AUTOFT_CACHE_MAX_GB`` or 4 GB).
    """

    keep_share = 0.125  # of max_bytes: what one pass may keep of shallower splits (prefix(..., keep=))

    def __init__(self, max_bytes: int = 4 << 30, disk: str | Path | bool | DiskCache | None = None,
                 max_disk_bytes: int | None = None):
        self.max_bytes = max_bytes
        self._backbones: dict[str, Backbone] = {}
        self._encoded: dict[tuple, tuple[State, str]] = {}
        self._prefix: OrderedDict[str, State] = OrderedDict()
        self.hits = self.misses = self.disk_hits = 0
        self.kept = 0  # entries stored by another split's pass (``prefix(..., keep=)``)
        self._arrays: dict[str, DiskArray] = {}  # streamed features on disk (stream_prefix)
        self._store: ArrayStore | None = None
        self._tmp = None
        self.feature_dtype = cache_dtype()
        if isinstance(disk, DiskCache):
            self.disk: DiskCache | None = disk
        elif disk is False:
            self.disk = None
        else:
            folder = default_cache_dir() if disk is None or disk is True else Path(disk)
            self.disk = DiskCache(folder, max_disk_bytes or default_disk_bytes()) if folder else None

    # -- backbones -------------------------------------------------------------------------
    def backbone(self, name: str) -> Backbone:
        if name not in self._backbones:
            self._backbones[name] = get_backbone(name)
            stage_digests(self._backbones[name])
        pristine = self._backbones[name]
        bb = copy.deepcopy(pristine)
        # an exact copy: carry the weights fingerprint over (checked against the copy's own tensors)
        object.__setattr__(bb, "_autoft_stage_digests",
                           (_tensor_ids(bb), _versions(bb), list(stage_digests(pristine))))
        return bb

    # -- encoded inputs --------------------------------------------------------------------
    def encoded(self, data: LabelledData, pre: Preprocessing) -> tuple[State, str]:
        """The whole dataset encoded for ``pre``, and a digest of those tensors.

        Text with a disk cache: the token ids and attention mask are tokenized once, written to the cache
        folder as an int32 ``.npy`` and memory-mapped (:meth:`tokens`); other processes and later runs
        sharing the folder map the same file without calling the tokenizer."""
        key = (data.fingerprint(), pre.key())
        if key not in self._encoded:
            if pre.modality == "text" and self.disk is not None and self.disk.enabled:
                state = self.tokens(data, pre)
            else:
                state = encode(data.inputs, pre)
            self._encoded[key] = (state, state_digest(state))
        return self._encoded[key]

    def tokens(self, data: LabelledData, pre: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` of every text of ``data``, int32 views of one memory-mapped ``(N, 2, L)`` file in
        the cache folder (``arrays/<40 hex>.npy`` + its key, the :class:`ArrayStore` rules), tokenized only
        when the file is not there.  Batches are widened back to int64 by :func:`trim_text`."""
        import warnings

        import numpy as np

        parts = {"format": FORMAT_VERSION, "kind": "tokens", "data": data.fingerprint(),
                 "preprocessing": pre.key(), "transformers": _version("transformers"),
                 "tokenizers": _version("tokenizers")}
        key = repr(sorted(parts.items()))
        store = self._array_store()
        arr = store.get_array(key)
        if arr is not None:
            log.info("token ids of %d texts memory-mapped from %s", len(arr), arr.path)
        else:
            t0 = time.perf_counter()
            ids, mask = encode(data.inputs, pre)
            if len(ids) and int(ids.max()) > np.iinfo(np.int32).max:  # no real vocabulary is this large
                return ids, mask
            path = store.path(key)
            writer = _ArrayWriter(path, len(ids), "int32")
            try:
                writer.write(torch.stack([ids, mask.to(ids.dtype)], 1))
                writer.close()
                arr = store.commit(key, path)
            except OSError as exc:  # a folder that cannot be written: keep them in memory
                writer.abort()
                log.warning("token ids not cached in %s (%s); kept in memory", store.folder, exc)
                return ids, mask
            except BaseException:
                writer.abort()
                raise
            log.info("tokenized %d texts in %.2fs; token ids cached in %s (%.1f MB)", len(ids),
                     time.perf_counter() - t0, path, arr.nbytes / 1e6)
        with warnings.catch_warnings():  # read-only mapping: nothing writes into these tensors
            warnings.simplefilter("ignore", UserWarning)
            both = torch.from_numpy(arr.memmap())
        return both[:, 0], both[:, 1]

    # -- frozen prefix ---------------------------------------------------------------------
    def prefix_key(self, backbone: Backbone, digest: str, split: int, rows: torch.Tensor | None = None,
                   device: torch.device | str = "cpu") -> str:
        """Everything the prefix output depends on, as one string."""
        parts = {"format": FORMAT_VERSION, "backbone": backbone.name,
                 "weights": prefix_weights_digest(backbone, split), "split": split,
                 "pooled": split == backbone.num_stages, "inputs": digest, "rows": rows_digest(rows),
                 "preprocessing": backbone.preprocessing.key(), "torch": torch.__version__,
                 "device": torch.device(device).type}
        return repr(sorted(parts.items()))

    def prefix(self, backbone: Backbone, state: State, digest: str, split: int,
               device: torch.device | str = "cpu", batch_size: int = 64,
               rows: torch.Tensor | None = None, keep: tuple[int, ...] | list[int] = ()) -> State:
        """Output of stages [0, split) (pooled when split == num_stages) for the examples ``rows``
        of ``state`` (all when None), in the order of ``rows``.

        ``keep``: shallower splits (``0 < s < split``) whose outputs the same pass also stores, as entries of
        their own, when it has to run (the ranking's pass over the whole frozen backbone keeps the splits
        that the space's trials will start from, so a trial at those depths computes nothing). One pass keeps
        at most :attr:`keep_share` of ``max_bytes``, splits taken in the order of ``keep`` (the caller's
        priority); kept entries live in memory only and are evicted like any other. A pass that is not
        needed (the entry is cached) computes nothing for ``keep``."""
        key = self.prefix_key(backbone, digest, split, rows, device)
        if key in self._prefix:
            self.hits += 1
            self._prefix.move_to_end(key)
            return self._prefix[key]
        out = self.disk.get(key) if self.disk is not None else None
        if out is not None:
            self.disk_hits += 1
            log.debug("feature cache: %s split %d read from disk", backbone.name, split)
        else:
            self.misses += 1
            t0 = time.perf_counter()
            sub = state if rows is None else index_state(state, rows)
            extra = {s: self.prefix_key(backbone, digest, s, rows, device) for s in dict.fromkeys(keep)
                     if 0 < s < split}
            extra = {s: k for s, k in extra.items() if k not in self._prefix}
            out, kept = compute_prefix(backbone, sub, split, device, batch_size, keep=tuple(extra),
                                       keep_bytes=int(self.keep_share * self.max_bytes))
            log.info("feature cache: %s split %d computed for %d examples in %.2fs%s", backbone.name, split,
                     len(sub[0]) if isinstance(sub, tuple) else len(sub), time.perf_counter() - t0,
                     f" (splits {sorted(kept)} kept from the same pass)" if kept else "")
            if self.disk is not None:
                self.disk.put(key, out)
            for s, state_s in kept.items():  # in memory only: written to disk they would cost the pass time
                self.kept += 1
                self._prefix[extra[s]] = state_s
        self._prefix[key] = out
        self._evict()
        return out

    def _evict(self) -> None:
        total = sum(state_nbytes(s) for s in self._prefix.values())
        while total > self.max_bytes and len(self._prefix) > 1:
            _, old = self._prefix.popitem(last=False)
            total -= state_nbytes(old)

    # -- streamed data: features on disk --------------------------------------------------
    def stream_prefix(self, backbone: Backbone, data: LabelledData, split: int, rows: torch.Tensor,
                       device="cpu", num_workers: int | None = None, batch_size: int = 64,
                       dtype: str | None = None, compute: bool = True) -> DiskArray | None:
        """Stages [0, split) (pooled when split == num_stages) of the examples ``rows``, computed once by
        streaming the images through the backbone's evaluation transform (DataLoader workers) and written to
        a feature file on disk; later trials (and processes sharing the folder) read it per batch.
        ``compute=False`` only looks: None when no such file exists yet."""
        from autoft.core.gpu import to_device
        from autoft.core.precision import no_autocast
        from autoft.data.stream import StreamDataset, eval_keys, eval_transform, loader

        dtype = dtype or self.feature_dtype
        pre = backbone.preprocessing
        parts = {"format": FORMAT_VERSION, "kind": "stream", "backbone": backbone.name,
                 "weights": prefix_weights_digest(backbone, split), "split": split,
                 "pooled": split == backbone.num_stages, "data": data.fingerprint(), "rows": rows_digest(rows),
                 "preprocessing": pre.key(), "torch": torch.__version__, "device": torch.device(device).type,
                 "dtype": dtype}
        key = repr(sorted(parts.items()))
        if key in self._arrays:
            self.hits += 1
            return self._arrays[key]
        if not compute and self.disk is None and self._store is None:
            return None  # no folder yet: nothing was streamed
        store = self._array_store()
        arr = store.get_array(key)
        if arr is not None:
            self.disk_hits += 1
        elif not compute:
            return None
        else:
            self.misses += 1
            t0 = time.perf_counter()
            device = torch.device(device)
            backbone.to(device)
            was_training = backbone.training
            backbone.eval()
            ds = StreamDataset(data.inputs, data.labels, eval_transform(pre))
            path = store.path(key)
            writer = _ArrayWriter(path, len(rows), dtype)
            try:
                with torch.no_grad():
                    for xb, _ in loader(ds, eval_keys(rows, batch_size), num_workers):
                        with no_autocast(device):
                            out = backbone.forward_stages(to_device(xb, device), 0, split)
                            if split == backbone.num_stages:
                                out = backbone.pool(out)
                        writer.write(out)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                backbone.train(was_training)
            arr = store.commit(key, path)
            log.info("feature cache: %s split %d streamed for %d examples in %.2fs (%.1f MB on disk)", backbone.name,
                     split, len(rows), time.perf_counter() - t0, arr.nbytes / 1e6)
        self._arrays[key] = arr
        return arr


    def _array_store(self) -> ArrayStore:
        if self._store is None:
            if self.disk is not None:
                folder = self.disk.folder / "arrays"
                bound = self.disk.max_bytes
            else:  # no disk cache configured: a private temporary folder, removed with this cache
                import tempfile

                self._tmp = tempfile.TemporaryDirectory(prefix="autoft-features-")
                folder, bound = Path(self._tmp.name), 1 << 50
            self._store = ArrayStore(folder, bound)
        return self._store

    def stats(self) -> dict[str, int]:
        return {"memory_hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses, "kept": self.kept,
                "memory_entries": len(self._prefix),
                "memory_bytes": sum(state_nbytes(s) for s in self._prefix.values())}


@torch.no_grad()
def compute_prefix(backbone: Backbone, state: State, split: int, device="cpu", batch_size: int = 64, *,
                   keep: tuple[int, ...] = (), keep_bytes: int | None = None):
    """Stages [0, split) of ``backbone`` on ``device`` (the backbone is moved there and left there: the
    trial that asked trains it there next), in float32 with autocast off whatever the trial's precision,
    so the entry is exact and the same for every precision; outputs are kept on the CPU.

    ``keep`` (shallower splits, ``0 < s < split``): the same pass also returns the outputs of stages [0, s),
    exactly what a pass to ``s`` gives (the same stages on the same batches); then the result is
    ``(output, {s: output_s})`` (whenever ``keep`` or ``keep_bytes`` is given). ``keep_bytes`` bounds what is
    kept (measured on the first batch): splits are taken in the order of ``keep`` (the caller's priority),
    each kept if it still fits."""
    from autoft.core.gpu import to_device
    from autoft.core.precision import no_autocast

    with_keep = bool(keep) or keep_bytes is not None  # the shape of the result follows the call, not the filter
    priority = list(dict.fromkeys(int(s) for s in keep if 0 < int(s) < split))
    keep = tuple(sorted(priority))
    device = torch.device(device)
    backbone.to(device)
    was_training = backbone.training
    backbone.eval()
    n = len(state[0]) if isinstance(state, tuple) else len(state)
    order = None
    mask = text_mask(state)
    if mask is not None:
        # text: batch examples of similar length so that little padding is computed (exact: padding
        # is masked out of attention and pooling); the outputs are put back in dataset order below
        order = torch.argsort(mask.sum(1), stable=True)
    width = state[1].shape[1] if isinstance(state, tuple) else None

    def _cpu(out, pad: bool):
        if pad and isinstance(out, tuple) and width is not None:
            # keep the full padded width so that examples can be batched together later
            out = tuple(_pad_to(o, width) for o in out)
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

    parts, kept_parts = [], {s: [] for s in keep}
    for i in range(0, n, batch_size):
        xb = index_state(state, slice(i, i + batch_size) if order is None else order[i:i + batch_size])
        xb = to_device(trim_text(xb), device)
        out, at = xb, 0
        with no_autocast(device):
            for s in kept_parts:
                out, at = backbone.forward_stages(out, at, s), s
                kept_parts[s].append(_cpu(out, True))
            out = backbone.forward_stages(out, at, split)
            if split == backbone.num_stages:
                out = backbone.pool(out)
        parts.append(_cpu(out, split != backbone.num_stages))
        if i == 0 and kept_parts and keep_bytes is not None:
            # what keeping each split costs for all n examples, from this first batch: splits are taken in
            # the order asked (the caller's priority) and each one is kept if it still fits
            per = {s: state_nbytes(p[0]) * n / max(1, len(p[0][0]) if isinstance(p[0], tuple) else len(p[0]))
                   for s, p in kept_parts.items()}
            total, fit = 0.0, set()
            for s in priority:
                if total + per[s] <= keep_bytes:
                    total += per[s]
                    fit.add(s)
            kept_parts = {s: p for s, p in kept_parts.items() if s in fit}
    backbone.train(was_training)

    def _gather(ps):
        o = cat_states(ps)
        return o if order is None else index_state(o, torch.argsort(order))

    out = _gather(parts)
    if not with_keep:
        return out
    return out, {s: _gather(p) for s, p in kept_parts.items()}


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.dim() >= 2 and t.shape[1] < width:
        pad = torch.zeros((t.shape[0], width - t.shape[1], *t.shape[2:]), dtype=t.dtype, device=t.device)
        return torch.cat([t, pad], 1)
    return t


# -- features on disk, read per batch (streamed data) ---------------------------------------------
class DiskArray:
    """An ``(N, ...)`` array in a ``.npy`` file, read per batch of rows.

    The file is a plain NumPy ``.npy`` (``np.load(path, mmap_mode="r")`` memory-maps it); rows are read
    here with positioned reads (``os.preadv``) into a fresh batch, so the file's pages stay in the
    operating system's page cache instead of the process's resident memory: reading a 10 GB feature file
    costs a batch of memory, whatever its size."""

    def __init__(self, path: str | Path):
        import numpy as np

        self._fd: int | None = None
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if fortran:
                raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
            self.offset = f.tell()
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64)))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.row_bytes * len(self)

    def read(self, rows) -> torch.Tensor:
        """Rows ``rows`` (in that order) as a float32 tensor."""
        import numpy as np

        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
        if self._fd is None or getattr(self, "_pid", None) != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for j, r in enumerate(rows.tolist()):
            if not 0 <= r < len(self):
                raise IndexError(f"row {r} out of range for {len(self)} rows")
            got = os.preadv(self._fd, [flat[j]], self.offset + r * self.row_bytes)
            if got != self.row_bytes:
                raise OSError(f"{self.path}: short read at row {r} (file truncated?)")
        t = torch.from_numpy(out)
        return t.float() if t.dtype != torch.float32 else t

    def memmap(self):
        import numpy as np

        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None and getattr(self, "_pid", None) == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def __del__(self):
        self.close()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"] = None
        return d


class _ArrayWriter:
    """Writes an ``.npy`` file row block by row block (never holding the whole array), atomically."""

    def __init__(self, path: Path, n: int, dtype):
        import numpy as np

        self.path, self.n, self.dtype = path, int(n), np.dtype(dtype)
        self.tmp = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        self.f = None
        self.written = 0

    def write(self, block: torch.Tensor) -> None:
        import numpy as np

        arr = block.detach().cpu().numpy().astype(self.dtype, copy=False)
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.tmp, "wb")
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (self.n, *arr.shape[1:])}
            np.lib.format.write_array_header_1_0(self.f, header)
        self.f.write(np.ascontiguousarray(arr).tobytes())
        self.written += len(arr)

    def close(self) -> Path:
        if self.f is None or self.written != self.n:
            self.abort()
            raise RuntimeError(f"feature file {self.path}: wrote {self.written} of {self.n} rows")
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
        _unlink(self.tmp)


class ArrayStore(DiskCache):
    """The folder of :class:`DiskArray` feature files: same key, atomic-write and LRU rules as
    :class:`DiskCache` (entries ``<40 hex>.npy``, each with its key in ``<40 hex>.key``)."""

    SUFFIX = ".npy"
    ENTRY_NAME = re.compile(r"[0-9a-f]{40}\.npy")

    def get_array(self, key: str) -> DiskArray | None:
        path = self.path(key)
        try:
            if path.with_suffix(".key").read_text(encoding="utf-8") != key:
                return None
            arr = DiskArray(path)
            os.utime(path)
        except (OSError, ValueError):
            return None
        self.reads += 1
        return arr

    def commit(self, key: str, path: Path) -> DiskArray:
        """Record the key of the entry just written to ``path`` (atomically, by its writer), then evict."""
        path.with_suffix(".key").write_text(key, encoding="utf-8")
        self.writes += 1
        self.evict(keep=path)
        return DiskArray(path)

    def evict(self, keep: Path | None = None) -> int:
        removed = super().evict(keep)
        for p in self.folder.glob("*.key"):
            if not p.with_suffix(".npy").exists():
                _unlink(p)
        return removed


def cache_dtype() -> str:
    """dtype of features written to disk: ``AUTOFT_CACHE_DTYPE`` float32 (default, exact) or float16."""
    v = os.environ.get("AUTOFT_CACHE_DTYPE", "float32").strip().lower()
    return "float16" if v in ("float16", "fp16", "half") else "float32"
