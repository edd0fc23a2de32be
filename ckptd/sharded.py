"""Sharded state (FSDP2 / DTensor) through torch.distributed.checkpoint, with ckptd's guarantees.

PyTorch provides the planning: which rank writes which shard (replicated tensors once), and on load
which bytes each rank needs whatever the world size was (resharding), through
``torch.distributed.checkpoint`` (DCP) ``save``/``load`` with the default planners, and the model and
optimizer state dicts through ``torch.distributed.checkpoint.state_dict.get_state_dict/set_state_dict``.
ckptd provides the storage: :class:`Writer` and :class:`Reader` implement DCP's ``StorageWriter`` and
``StorageReader`` so that

* only tensors go through DCP, as raw bytes (never ``torch.save``/``torch.load``, never pickle); the
  non-tensor part of the state dicts (optimizer hyperparameters) goes to ``state.json`` like every other
  value; DCP's metadata is written as JSON (``dcp.json``), not pickled;
* each rank writes its shard file (``shard-NNNNN.bin``) into the checkpoint's temporary directory, with
  fsync and an xxh3-128 checksum; the records reach rank 0 through DCP's own gather, and rank 0 commits
  the one manifest (persist.write) only when every rank's files are durable;
* the tensors are staged into host copies made once and reused (:func:`host_copies`,
  ``_copy_state_dict``), and the write runs in the background on ckptd's private gloo group.

On restore every rank verifies the checksums of a share of the files (file i: rank i mod world), the
ranks agree, and only then is the checkpoint read (into host copies) and applied with set_state_dict.
"""

from __future__ import annotations

import json
import os
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from . import store
from .errors import CorruptCheckpointError
from .state import DTYPES, TORCH_DTYPES

# ----------------------------------------------------------------------------- state dicts


def split(model: Any, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(every tensor by flat key, the rest as a tree with those tensors left out) of model + optimizer."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], {})
    tensors: dict[str, torch.Tensor] = {}
    rest = {"model": _strip(msd, "model", tensors), "optimizer": _strip(osd, "optimizer", tensors)}
    return tensors, rest


def _strip(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"__shard": path}
    if isinstance(value, dict):
        return {k: _strip(v, f"{path}{store.SHARD_SEP}{k}", tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip(v, f"{path}{store.SHARD_SEP}{i}", tensors) for i, v in enumerate(value)]
    return value


def join(rest: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(rest, dict):
        if set(rest) == {"__shard"}:
            return tensors[rest["__shard"]]
        return {k: join(v, tensors) for k, v in rest.items()}
    if isinstance(rest, list):
        return [join(v, tensors) for v in rest]
    return rest


def host_copies(tensors: dict[str, torch.Tensor], pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Empty host tensors like ``tensors``; a DTensor's keeps its mesh and placements (its spec).

    What ``torch.distributed._state_dict_utils._create_cpu_state_dict`` returns, without the deepcopy (or
    device-to-host copy) it makes of every DTensor's data only to replace it: that copy was over half of a
    256 MiB 2-rank restore here (docs/performance.md, "Sharded save and restore against DCP")."""
    out: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        local = t._local_tensor if isinstance(t, DTensor) else t
        pin = pin_memory and local.numel() > 0  # as torch: no empty pinned tensor
        host = torch.empty(tuple(local.size()), dtype=local.dtype, pin_memory=pin)
        out[k] = DTensor(host, t._spec, requires_grad=False) if isinstance(t, DTensor) else host
    return out


class Staging:
    """Host copies of the sharded tensors, made once and reused by every save (the save's stall is the copy)."""

    def __init__(self) -> None:
        self._cpu: dict[str, torch.Tensor] | None = None
        self._signature: Any = None

    def take(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from torch.distributed._state_dict_utils import _copy_state_dict

        signature = tuple((k, t.dtype, tuple(t.shape)) for k, t in tensors.items())
        if self._cpu is None or signature != self._signature:
            self._cpu = host_copies(tensors, pin_memory=any(t.is_cuda for t in tensors.values()))
            self._signature = signature
        _copy_state_dict(tensors, self._cpu)
        return self._cpu


# ----------------------------------------------------------------------------- storage


class Writer(StorageWriter):
    """Every rank's shard into one file of the checkpoint's temporary directory (``part``)."""

    def __init__(self, part: store.PendingCheckpoint, rank: int, pace: Any = None) -> None:
        super().__init__()
        self.part, self.rank, self.pace = part, rank, pace
        self.is_coordinator = False

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results, chunks, offset = [], [], 0
        name = store.shard_file(self.rank)
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise CorruptCheckpointError(self.part.tmp, f"{item.index.fqn} is not a tensor; ckptd stores "
                                                            "non-tensor values in state.json")
            t = cast(torch.Tensor, planner.resolve_data(item)).detach()  # BYTE_IO items were refused above
            if not t.is_contiguous() or t.device.type != "cpu":
                t = t.to("cpu").contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
            chunks.append(data)
            results.append(WriteResult(index=item.index, size_in_bytes=len(data),
                                       storage_data={"file": name, "offset": offset, "length": len(data)}))
            offset += len(data)
        rec = self.part.write_file(name, chunks, self.pace)
        for r in results:  # the coordinator lists this rank's file from here (DCP gathers the results)
            r.storage_data["record"] = (rec.bytes, rec.xxh3_128, rec.mac)  # mac: this rank's keyed BLAKE3 or None
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)  # written synchronously: this runs in ckptd's writer thread already
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files: dict[str, tuple[int, str, str | None]] = {}
        storage: list[list[Any]] = []
        for rank_results in results:
            for r in rank_results:
                info = r.storage_data
                files[info["file"]] = info["record"]
                storage.append([_index_json(r.index), info["file"], info["offset"], info["length"]])
        for name, (nbytes, digest, mac) in files.items():
            if name != store.shard_file(self.rank):
                self.part.add_file(name, store.FileRecord(nbytes, digest, mac))
            else:
                self.part.files[name] = store.FileRecord(nbytes, digest, mac)
        doc = {"tensors": {fqn: _tensor_md_json(md) for fqn, md in metadata.state_dict_metadata.items()},
               "storage": storage}
        self.part.write_file(store.DCP_JSON, [json.dumps(doc, separators=(",", ":")).encode()])

    def storage_meta(self) -> Any:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class Reader(StorageReader):
    """Reads raw shard bytes of a committed checkpoint whose files were verified (see :func:`verify_share`)."""

    def __init__(self, path: str, files: dict[str, Any]) -> None:
        super().__init__()
        self.path, self.files = path, files
        self.storage: dict[MetadataIndex, tuple[str, int, int]] = {}
        self.md: Metadata | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        doc = store.read_dcp_json(self.path)
        problem = store.dcp_problem(doc, self.files)  # before any size in it is believed
        if problem:
            raise CorruptCheckpointError(self.path, f"{store.DCP_JSON} does not describe the shard files: {problem}")
        try:
            tensors: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {
                fqn: _tensor_md(v) for fqn, v in doc["tensors"].items()}
            storage = {_index(i): (str(f), int(o), int(n)) for i, f, o, n in doc["storage"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(self.path, f"{store.DCP_JSON} is not DCP metadata ({exc})") from None
        self.md = Metadata(state_dict_metadata=tensors, storage_data=storage)
        return self.md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        from torch.distributed._shard._utils import narrow_tensor_by_index as narrow

        assert self.md is not None
        fds: dict[str, int] = {}
        try:
            for req in plan.items:
                fname, offset, length = self.storage[req.storage_index]
                store.check_name(fname)
                if fname not in fds:
                    fds[fname] = os.open(os.path.join(self.path, fname), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                # read_metadata made every entry a tensor, and DCP plans each read by a chunk's index
                md = cast(TensorStorageMetadata, self.md.state_dict_metadata[req.storage_index.fqn])
                chunk = md.chunks[cast(int, req.storage_index.index)]
                t = torch.empty(tuple(chunk.sizes), dtype=md.properties.dtype)
                if t.numel() * t.element_size() != length:
                    raise CorruptCheckpointError(self.path, f"{req.storage_index.fqn}: {length} bytes for a "
                                                            f"{list(chunk.sizes)} {md.properties.dtype} chunk")
                if length:
                    n = os.preadv(fds[fname], [t.reshape(-1).view(torch.uint8).numpy().data], offset)
                    if n != length:
                        raise CorruptCheckpointError(self.path, f"{fname} ends early (truncated)")
                src = narrow(t, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                target.copy_(src)
                planner.commit_tensor(req, target)
        finally:
            for fd in fds.values():
                os.close(fd)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def _index_json(i: MetadataIndex) -> list[Any]:
    return [i.fqn, list(i.offset) if i.offset is not None else None, i.index]


def _index(v: list[Any]) -> MetadataIndex:
    fqn, offset, index = v
    return MetadataIndex(str(fqn), torch.Size(offset) if offset is not None else None, index)


def _tensor_md_json(md: Any) -> dict[str, Any]:
    if not isinstance(md, TensorStorageMetadata):
        raise CorruptCheckpointError("", "a non-tensor value reached DCP")
    return {"dtype": DTYPES[md.properties.dtype], "size": list(md.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks]}


def _tensor_md(v: dict[str, Any]) -> TensorStorageMetadata:
    return TensorStorageMetadata(properties=TensorProperties(dtype=TORCH_DTYPES[v["dtype"]]),
                                 size=torch.Size(v["size"]),
                                 chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                                         for o, s in v["chunks"]])


# ----------------------------------------------------------------------------- save / load


def save(cpu: dict[str, torch.Tensor], part: store.PendingCheckpoint, rank: int, group: Any, pace: Any) -> None:
    """DCP save of the staged tensors into the temporary directory (every rank; collectives on ``group``)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    dcp.save(cpu, storage_writer=Writer(part, rank, pace), planner=DefaultSavePlanner(flatten_state_dict=False),
             process_group=group)


def verify_share(info: store.CheckpointInfo, rank: int, world: int) -> None:
    """Checksum this rank's share of the checkpoint's files (file i: rank i mod world), and with the checkpoint's
    key their MACs from the same read; raises CorruptCheckpointError. Together the ranks verify every file once."""
    for i, (fname, rec) in enumerate(sorted(info.manifest["files"].items())):
        if i % world != rank:
            continue
        size, hashes = store.hash_file_with(os.path.join(info.path, fname), info.mac_key)
        problem = store.record_problem(fname, rec, size, hashes)
        if problem:
            raise CorruptCheckpointError(info.path, problem)


def load(info: store.CheckpointInfo, model: Any, optimizer: Any, rest: dict[str, Any], group: Any) -> None:
    """Read a verified sharded checkpoint (resharding to this world size) and apply it."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_state_dict

    live, _ = split(model, optimizer)
    cpu = host_copies(live)  # read into copies: the live state changes only once all is read
    dcp.load(cpu, storage_reader=Reader(info.path, info.manifest["files"]),
             planner=DefaultLoadPlanner(flatten_state_dict=False), process_group=group)
    tree = join(rest, cpu)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=tree["model"], optim_state_dict=tree["optimizer"])
    else:
        set_state_dict(model, [], model_state_dict=tree["model"], optim_state_dict={})
