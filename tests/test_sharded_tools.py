"""`ckptd inspect`, `ls`, `verify`, `prune` and `export` on real sharded (FSDP2) checkpoints.

One 2-rank gloo job (tests/fixtures/dist_sharded.py) writes sharded checkpoints of steps 1-3; the
commands then run on them as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

from ckptd import exitcodes, store
from conftest import resign
from fixtures.sup_helpers import FIXTURES, ckptd, run_ranks

WORKER = os.path.join(FIXTURES, "dist_sharded.py")
# dist_trainer.build("fsdp", 2, 16): Linear(8, 16), ReLU, Dropout, Linear(16, 16), ReLU, Linear(16, 4)
SHAPES = {"0.weight": [16, 8], "0.bias": [16], "3.weight": [16, 16], "3.bias": [16], "5.weight": [4, 16],
          "5.bias": [4]}


def sharded_job(root: str, steps: int, world: int = 2) -> list[dict]:
    return run_ranks([WORKER, root, str(steps)], world)


def test_commands_understand_sharded_checkpoints_inspect_lists_every_logical_tensor_with_its_global_shape(tmp_path):
    root = str(tmp_path / "ck")
    digests = {o["step"]: o["digest"] for o in sharded_job(root, 3)}
    assert sorted(digests) == [1, 2, 3]
    step3 = os.path.join(root, store.checkpoint_name(3))

    # inspect --json: every logical tensor (model and AdamW state) with its global shape, its chunks, the
    # rank files holding them and the bytes stored; together they account for every byte of the shard files
    r = ckptd("inspect", step3, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    shards = doc["sharded_tensors"]
    for name, shape in SHAPES.items():
        assert shards[f"model/{name}"]["shape"] == shape and shards[f"model/{name}"]["dtype"] == "F32"
        for moment in ("exp_avg", "exp_avg_sq"):
            assert shards[f"optimizer/state/{name}/{moment}"]["shape"] == shape
        assert shards[f"optimizer/state/{name}/step"]["shape"] == []
    assert len(shards) == 6 * 4
    assert shards["model/3.weight"] == {"dtype": "F32", "shape": [16, 16], "shards": 2, "ranks": [0, 1],
                                        "files": ["shard-00000.bin", "shard-00001.bin"], "bytes": 16 * 16 * 4}
    files = doc["manifest"]["files"]
    assert sum(v["bytes"] for v in shards.values()) == files["shard-00000.bin"]["bytes"] + \
        files["shard-00001.bin"]["bytes"]
    assert not any("__shard" in k or "__shard" in json.dumps(v) for k, v in doc["state"].items()), doc["state"]

    # the table a person reads
    r = ckptd("inspect", f"{root}/latest")
    assert r.returncode == 0, r.stderr
    assert "sharded over 2 ranks" in r.stdout and "sharded tensors (24" in r.stdout
    row = next(line.split() for line in r.stdout.splitlines() if line.strip().startswith("model/5.weight "))
    assert row[:6] == ["model/5.weight", "F32", "[4,", "16]", "2", "0-1"], row

    # ls and verify: three valid checkpoints, every shard file checksummed
    r = ckptd("ls", root, "--json")
    assert r.returncode == 0 and [(c["step"], c["valid"]) for c in json.loads(r.stdout)] == \
        [(1, True), (2, True), (3, True)], r.stdout + r.stderr
    r = ckptd("verify", root, "--json")
    assert r.returncode == 0 and all(c["valid"] for c in json.loads(r.stdout)), r.stdout + r.stderr

    # export consolidates both ranks' shards into the full weights of step 3
    out = str(tmp_path / "model.safetensors")
    r = ckptd("export", step3, "-o", out)
    assert r.returncode == 0 and "consolidated from 2 shards" in r.stdout, r.stdout + r.stderr
    from safetensors.numpy import load_file

    tensors = load_file(out)
    assert {k: list(v.shape) for k, v in tensors.items()} == SHAPES
    h = hashlib.sha256()
    for name, value in sorted(tensors.items()):
        h.update(name.encode())
        h.update(value.tobytes())
    assert h.hexdigest()[:16] == digests[3]

    # verify names a damaged shard (flipped bytes in step 1's, a truncated one in step 2's); prune deletes
    # whole checkpoints only, and never one the listing finds invalid (the truncated one)
    with open(os.path.join(root, store.checkpoint_name(1), "shard-00001.bin"), "r+b") as f:
        f.write(b"\xff\xfe\xfd")
    os.truncate(os.path.join(root, store.checkpoint_name(2), "shard-00000.bin"), 100)
    r = ckptd("verify", root)
    assert r.returncode == exitcodes.INVALID, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "INVALID" in lines[0] and "shard-00001.bin checksum mismatch" in lines[0], lines
    assert "INVALID" in lines[1] and "shard-00000.bin is 100 bytes" in lines[1] and lines[2].endswith(": ok"), lines
    r = ckptd("prune", root, "--keep-last", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["deleted"] == [store.checkpoint_name(1)], r.stdout + r.stderr
    assert sorted(os.listdir(root)) == [store.checkpoint_name(2), store.checkpoint_name(3)]

    # a crafted tensor map (re-signed manifest) pointing outside the listed files: one line, exit INVALID
    crafted = str(tmp_path / "crafted" / store.checkpoint_name(3))
    shutil.copytree(step3, crafted)
    dcp = json.load(open(os.path.join(crafted, "dcp.json")))
    dcp["storage"][0][1] = "not-listed.bin"
    resign(crafted, {"dcp.json": json.dumps(dcp).encode()})
    r = ckptd("inspect", crafted)
    assert r.returncode == exitcodes.INVALID and "dcp.json" in r.stderr and len(r.stderr.splitlines()) == 1, \
        r.stdout + r.stderr


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_a_crafted_tensor_map_claiming_more_than_the_shard_files_hold_is_refused_before_any_allocation(tmp_path):
    root = str(tmp_path / "ck")
    sharded_job(root, 1)
    real = os.path.join(root, store.checkpoint_name(1))
    doc = json.load(open(os.path.join(real, "dcp.json")))
    cases = {
        # the 116-byte map: one tensor of 2**40 elements and no storage at all (re-signed, so checksums match)
        "no storage": {"tensors": {"model\x1fw": {"dtype": "F32", "size": [1 << 40], "chunks": []}}, "storage": []},
        # a real map whose first model tensor claims a 2**40 x 8 shape (its chunks no longer cover it)
        "grown": {**doc, "tensors": {**doc["tensors"], "model\x1f0.weight": {
            **doc["tensors"]["model\x1f0.weight"], "size": [1 << 40, 8]}}},
        # a chunk stored twice: the entries overlap in the shard file
        "overlap": {**doc, "storage": doc["storage"] + [doc["storage"][0]]},
    }
    assert len(json.dumps(cases["no storage"], separators=(",", ":"))) <= 116
    for name, crafted_doc in cases.items():
        crafted = str(tmp_path / name.replace(" ", "-") / store.checkpoint_name(1))
        shutil.copytree(real, crafted)
        resign(crafted, {"dcp.json": json.dumps(crafted_doc).encode()})
        r = ckptd("verify", crafted)  # was: ok
        assert r.returncode == exitcodes.INVALID and "dcp.json does not describe the shard files" in r.stdout, \
            (name, r.stdout + r.stderr)
        out = str(tmp_path / f"{name}.safetensors")
        r = subprocess.run([sys.executable, "-m", "ckptd", "export", crafted, "-o", out], capture_output=True,
                           text=True, timeout=120, preexec_fn=_limit_memory)
        # was: 1.6 GB of RSS and of zeros written (N = 4e8), or a numpy traceback (N = 2**40)
        assert r.returncode == exitcodes.INVALID, (name, r.stdout + r.stderr[-2000:])
        assert len(r.stderr.splitlines()) == 1 and "dcp.json does not describe the shard files" in r.stderr, \
            (name, r.stderr)
        assert not os.path.exists(out)
