"""Authenticated checkpoints (key_file / --key-file / $CKPTD_KEY_FILE): a keyed BLAKE3 of every file and a MAC
of the manifest, so whoever rewrites a checkpoint without the key cannot make it authenticate.

The attack docs/reliability.md describes (edit a tensor, re-checksum it with xxh3, re-digest the manifest:
conftest.resign) still verifies without the key; with it, restore, `ckptd verify`, `inspect` and `export`
refuse it with one line, and restore falls back to the previous checkpoint, as for corruption.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import pytest

import ckptd
from ckptd import exitcodes, store
from ckptd.errors import CkptdError, ConfigError, CorruptCheckpointError
from conftest import EXAMPLES, resign, small_model, train_steps
from fixtures.state_digest import digest
from fixtures.sup_helpers import FIXTURES, run_ranks
from fixtures.sup_helpers import ckptd as ckptd_cli

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes


def make_key(path, mode: int = 0o600, content: bytes | None = None) -> str:
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content if content is not None else os.urandom(32).hex().encode() + b"\n")
    os.chmod(str(path), mode)
    return str(path)


def save_two(root: str, key_file: str | None, **kw) -> tuple[str, str]:
    """Checkpoints of steps 1 and 2 with different values; (digest of step 1's state, of step 2's)."""
    model, opt = small_model()
    ck = ckptd.Checkpointer(model, opt, dir=root, key_file=key_file, async_save=False, handle_signals=False,
                            save_on_close=False, **kw)
    digests = []
    for step in (1, 2):
        train_steps(model, opt, 2)
        ck.step(step)
        ck.save()
        digests.append(digest(model, opt))
    ck.close()
    return digests[0], digests[1]


def restore_fresh(root: str, key_file: str | None, **kw) -> tuple[int, str]:
    model, opt = small_model(seed=7)
    ck = ckptd.Checkpointer(model, opt, dir=root, key_file=key_file, handle_signals=False, save_on_close=False, **kw)
    step = ck.restore()
    ck.close()
    return step, digest(model, opt)


def forge_tensor(ckpt: str) -> None:
    """Set the first float of the first tensor to 1337.0 and re-checksum and re-digest as conftest.resign does."""
    tpath = os.path.join(ckpt, store.TENSORS)
    data = bytearray(open(tpath, "rb").read())
    header, start = store.read_safetensors_header(open(tpath, "rb"), tpath, len(data))
    first = min((v for k, v in header.items() if k.startswith("model/")), key=lambda v: v["data_offsets"][0])
    at = start + first["data_offsets"][0]
    data[at : at + 4] = struct.pack("<f", 1337.0)
    resign(ckpt, {store.TENSORS: bytes(data)})


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, store.checkpoint_name(step))


def rewrite_manifest(ckpt: str, edit) -> None:
    """Change the manifest as someone without the key can: edit it, then give it a correct xxh3 digest."""
    mpath = os.path.join(ckpt, store.MANIFEST)
    m = json.load(open(mpath))
    edit(m)
    m["digest"] = store.manifest_digest(m)
    with open(mpath, "w") as f:
        json.dump(m, f)


def test_a_keyed_checkpoint_carries_a_mac_per_file_and_one_over_its_manifest_and_restores_bit_identically(tmp_path):
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    _, second = save_two(root, key)
    m = json.load(open(os.path.join(step_dir(root, 2), store.MANIFEST)))
    assert set(m["auth"]) == {"alg", "key_id", "mac"} and m["auth"]["alg"] == store.ALG
    assert all(len(rec[store.MAC_FIELD]) == 64 for rec in m["files"].values())
    # the MAC is the keyed BLAKE3 of the file's bytes, computed while it was written
    k = store.Key.load(key)
    size, hashes = store.hash_file_with(os.path.join(step_dir(root, 2), store.TENSORS), k)
    assert hashes.mac() == m["files"][store.TENSORS][store.MAC_FIELD]
    assert open(key, "rb").read().strip().decode() not in json.dumps(m)  # the key itself is nowhere
    assert restore_fresh(root, key) == (2, second)
    assert store.verify(step_dir(root, 2), key=k).valid


def test_a_tensor_edited_and_rechecksummed_verifies_without_the_key_and_is_refused_with_it(tmp_path):
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    first, _ = save_two(root, key)
    forge_tensor(step_dir(root, 2))
    # what the checksums promise today: the forgery verifies and restores
    assert store.verify(step_dir(root, 2)).valid
    assert ckptd.load_state(step_dir(root, 2))["model"]["0.weight"].reshape(-1)[0].item() == 1337.0
    # with the key: refused, one line naming the file; restore falls back to step 1, exactly
    info = store.verify(step_dir(root, 2), key=store.Key.load(key))
    assert not info.valid and info.reason.startswith(f"{store.MANIFEST} does not authenticate"), info.reason
    assert restore_fresh(root, key) == (1, first)
    assert os.listdir(os.path.join(root, store.QUARANTINE_DIR))  # set aside like a corrupt one
    with pytest.raises(CorruptCheckpointError, match="does not authenticate"):
        ckptd.load_state(os.path.join(root, ".quarantine", os.listdir(os.path.join(root, ".quarantine"))[0]),
                         key_file=key)


def test_a_forged_tensor_that_keeps_its_old_mac_field_is_refused(tmp_path):
    """A cleverer forger keeps the record's MAC (and the manifest's) untouched and fixes only the xxh3."""
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    save_two(root, key)
    ckpt = step_dir(root, 2)
    m = json.load(open(os.path.join(ckpt, store.MANIFEST)))
    forge_tensor(ckpt)  # resign drops the MAC fields: put them back as they were
    rewrite_manifest(ckpt, lambda new: [new["files"][f].update({store.MAC_FIELD: rec[store.MAC_FIELD]})
                                        for f, rec in m["files"].items()])
    assert store.verify(ckpt).valid
    k = store.Key.load(key)
    assert store.inspect_checkpoint(ckpt, k).valid is False  # the manifest's MAC covers the new xxh3 too
    assert "MAC mismatch" in store.inspect_checkpoint(ckpt, k).reason


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m["metrics"].update(val_loss=0.01), id="metric-changed"),
    pytest.param(lambda m: m.update(kind="emergency"), id="field-changed"),
    pytest.param(lambda m: m.update(note="x"), id="field-added"),
    pytest.param(lambda m: m.pop("run_id"), id="field-removed"),
    pytest.param(lambda m: m["files"].pop(store.STATE), id="file-removed"),
    pytest.param(lambda m: m["auth"].update(key_id="0" * 16), id="key-id-changed"),
])
def test_a_manifest_edited_by_someone_without_the_key_is_refused(tmp_path, edit):
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    first, _ = save_two(root, key)
    ckpt = step_dir(root, 2)
    rewrite_manifest(ckpt, edit)
    if store.STATE in json.load(open(os.path.join(ckpt, store.MANIFEST)))["files"]:
        assert store.inspect_checkpoint(ckpt).valid  # the xxh3 digest alone is satisfied
    info = store.inspect_checkpoint(ckpt, store.Key.load(key))
    assert not info.valid and ("does not authenticate" in info.reason or "another key" in info.reason), info.reason
    assert restore_fresh(root, key) == (1, first)


def test_a_stripped_mac_makes_an_unkeyed_checkpoint_which_a_key_refuses_unless_unkeyed_ones_are_allowed(tmp_path):
    """The downgrade: drop the MACs and write a plain checksummed manifest. Refused with a key by default."""
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    first, _ = save_two(root, key)
    forge_tensor(step_dir(root, 2))
    rewrite_manifest(step_dir(root, 2), lambda m: m.pop("auth"))
    info = store.inspect_checkpoint(step_dir(root, 2), store.Key.load(key))
    assert not info.valid and "written without a key" in info.reason and "allow_unkeyed" in info.reason
    assert restore_fresh(root, key) == (1, first)


@pytest.mark.kind("system")
def test_unkeyed_checkpoints_are_refused_with_a_key_unless_allowed_and_then_restore_unauthenticated(tmp_path):
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    _, second = save_two(root, None)  # a run from before the key
    assert restore_fresh(root, key, allow_unkeyed=True) == (2, second)
    assert not os.path.exists(os.path.join(root, store.QUARANTINE_DIR))
    r = ckptd_cli("verify", root, "--key-file", key)
    assert r.returncode == exitcodes.INVALID and r.stdout.count("written without a key") == 2, r.stdout
    r = ckptd_cli("verify", root, "--key-file", key, "--allow-unkeyed")
    assert r.returncode == 0 and r.stdout.count("ok (not authenticated: written without a key") == 2, r.stdout
    step, _ = restore_fresh(root, key)
    assert step == 0  # both set aside, said in the quarantine note
    assert len(os.listdir(os.path.join(root, store.QUARANTINE_DIR))) == 2


def test_the_wrong_key_is_refused_naming_both_key_ids(tmp_path):
    key, other = make_key(tmp_path / "key"), make_key(tmp_path / "other")
    root = str(tmp_path / "ck")
    save_two(root, key)
    info = store.inspect_checkpoint(step_dir(root, 2), store.Key.load(other))
    assert not info.valid and "another key" in info.reason
    assert store.Key.load(key).id in info.reason and store.Key.load(other).id in info.reason
    with pytest.raises(CorruptCheckpointError, match="another key"):
        model, opt = small_model()
        ckptd.Checkpointer(model, opt, dir=root, key_file=other, handle_signals=False).restore(step_dir(root, 2))


def test_report_keeps_a_keyed_manifest_authenticated_and_add_metrics_without_the_key_is_refused(tmp_path,
                                                                                               monkeypatch):
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    model, opt = small_model()
    ck = ckptd.Checkpointer(model, opt, dir=root, key_file=key, async_save=False, handle_signals=False)
    ck.step(1)
    ck.save()
    ck.report(1, val_loss=0.25)
    ck.close()  # marks it finished: another rewrite
    info = store.verify(step_dir(root, 1), key=store.Key.load(key))
    assert info.valid and info.metrics["val_loss"] == 0.25 and info.finished
    monkeypatch.delenv(store.KEY_ENV, raising=False)
    with pytest.raises(CkptdError, match="needs its key"):
        ckptd.add_metrics(step_dir(root, 1), acc=0.9)
    monkeypatch.setenv(store.KEY_ENV, key)
    assert ckptd.add_metrics(step_dir(root, 1), acc=0.9).metrics["acc"] == 0.9
    assert store.verify(step_dir(root, 1), key=store.Key.load(key)).valid


@pytest.mark.parametrize("case", ["group-readable", "world-readable", "group-writable", "symlink", "directory",
                                  "fifo", "too-short", "missing"])
def test_a_key_file_that_is_not_private_or_not_a_regular_file_is_refused_naming_the_fix(tmp_path, case):
    path = tmp_path / "key"
    if case in ("group-readable", "world-readable", "group-writable"):
        make_key(path, {"group-readable": 0o640, "world-readable": 0o604, "group-writable": 0o620}[case])
        fix = f"chmod 600 {path}"
    elif case == "symlink":
        os.symlink(make_key(tmp_path / "real"), path)
        fix = "symlink"
    elif case == "directory":
        os.mkdir(path, 0o700)
        fix = "not a regular file"
    elif case == "fifo":
        os.mkfifo(path, 0o600)  # opened without blocking, then refused
        fix = "not a regular file"
    elif case == "too-short":
        make_key(path, content=b"0123456789abcdef\n")
        fix = "openssl rand -hex 32"
    else:
        fix = "openssl rand -hex 32"
    model, opt = small_model()
    with pytest.raises(ConfigError, match="key file") as exc:
        ckptd.Checkpointer(model, opt, dir=str(tmp_path / "ck"), key_file=str(path), handle_signals=False)
    assert fix in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.kind("system")
def test_the_commands_refuse_what_does_not_authenticate_with_one_line_and_say_what_an_ok_rests_on(tmp_path):
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    save_two(root, key)
    forge_tensor(step_dir(root, 2))
    r = ckptd_cli("verify", root)  # without the key: checksums only, and said so
    assert r.returncode == 0 and r.stdout.count("authenticity not checked") == 2, r.stdout + r.stderr
    r = ckptd_cli("verify", root, env={store.KEY_ENV: key})
    assert r.returncode == exitcodes.INVALID, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("ok (authenticated)") and "INVALID: manifest.json does not authenticate" in lines[1]
    r = ckptd_cli("export", step_dir(root, 2), "-o", str(tmp_path / "w.safetensors"), "--key-file", key)
    assert r.returncode == exitcodes.INVALID and len(r.stderr.splitlines()) == 1 and "authenticate" in r.stderr
    assert not os.path.exists(tmp_path / "w.safetensors")
    rewrite_manifest(step_dir(root, 1), lambda m: m["metrics"].update(val_loss=0.0))
    r = ckptd_cli("inspect", step_dir(root, 1), "--key-file", key)
    assert r.returncode == exitcodes.INVALID and len(r.stderr.splitlines()) == 1 and "MAC mismatch" in r.stderr
    os.chmod(key, 0o644)
    r = ckptd_cli("verify", root, "--key-file", key)
    assert r.returncode == exitcodes.CONFIG and r.stderr.strip().endswith(f"chmod 600 {key}"), r.stderr


@pytest.mark.kind("system")
def test_ckptd_run_with_a_key_file_gives_it_to_the_trainer_and_every_checkpoint_authenticates(tmp_path):
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    r = ckptd_cli("run", "--dir", root, "--key-file", key, "--metrics-addr", "off", "--notices", "off",
                  os.path.join(EXAMPLES, "train_toy.py"), "--steps", "20", "--every-steps", "10", timeout=180)
    assert r.returncode == 0, r.stderr
    assert open(key, "rb").read().strip().decode() not in r.stderr + r.stdout  # never logged
    infos = store.list_checkpoints(root)
    assert infos and all(i.keyed for i in infos)
    r = ckptd_cli("verify", root, "--key-file", key)
    assert r.returncode == 0 and r.stdout.count("ok (authenticated)") == len(infos), r.stdout
    bad = make_key(tmp_path / "bad", 0o644)
    r = ckptd_cli("run", "--dir", root, "--key-file", bad, os.path.join(EXAMPLES, "train_toy.py"))
    assert r.returncode == exitcodes.USAGE and "chmod 600" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.kind("system")
@pytest.mark.slow
def test_sharded_ranks_mac_their_own_shards_and_a_forged_shard_is_refused_on_every_rank(tmp_path):
    key = make_key(tmp_path / "key")
    root = str(tmp_path / "ck")
    worker = os.path.join(FIXTURES, "dist_sharded.py")
    first = run_ranks([worker, root, "2"], 2, env={store.KEY_ENV: key})
    m = json.load(open(os.path.join(step_dir(root, 2), store.MANIFEST)))
    shards = [f for f in m["files"] if store.SHARD_FILE_RE.match(f)]
    assert len(shards) == 2 and all(store.MAC_FIELD in m["files"][f] for f in m["files"]) and "auth" in m
    k = store.Key.load(key)
    assert store.verify(step_dir(root, 2), key=k).valid
    shard = os.path.join(step_dir(root, 2), shards[1])  # rank 1's file, verified by rank 1 (file i: rank i mod 2)
    data = bytearray(open(shard, "rb").read())
    data[0] ^= 0x40
    resign(step_dir(root, 2), {shards[1]: bytes(data)})
    assert store.verify(step_dir(root, 2)).valid  # checksums alone accept it
    again = run_ranks([worker, root, "3"], 2, env={store.KEY_ENV: key})
    assert [line["step"] for line in again] == [2, 3]  # resumed from step 1: step 2 was refused
    assert again[0]["digest"] == [line for line in first if line["step"] == 2][0]["digest"]
    assert any(n.startswith(store.checkpoint_name(2)) for n in os.listdir(os.path.join(root, store.QUARANTINE_DIR)))


def test_keyed_blake3_of_the_writer_equals_a_fresh_one_over_the_file_for_an_o_direct_write(tmp_path):
    """write_aligned hashes in its helper thread, piece by piece: the MAC must be the whole file's."""
    k = store.Key(os.urandom(32))
    body = os.urandom((40 << 20) + 123)  # three O_DIRECT requests and an unaligned tail
    aligned = mmap.mmap(-1, len(body))  # page-aligned, as the snapshot buffer
    aligned.write(body)
    header = b"h" * store.ALIGN
    with store.PendingCheckpoint(str(tmp_path), 1, k) as p:
        rec = p.write_aligned(store.TENSORS, header, memoryview(aligned))
        whole = store.Hashes(k)
        whole.update(header + body)
        assert rec.mac == whole.mac() and rec.xxh3_128 == whole.hexdigest()
        assert rec.mac == store.hash_file_with(os.path.join(p.tmp, store.TENSORS), k)[1].mac()


def test_a_file_whose_checksum_matches_but_whose_mac_does_not_is_refused():
    """xxh3 is not collision-resistant: a forger who finds data with the listed xxh3 still needs the key."""
    k = store.Key(os.urandom(32))
    good, forged = store.Hashes(k), store.Hashes(k)
    good.update(b"the real tensor bytes")
    forged.update(b"the forged bytes, same length")
    rec = {"bytes": 29, store.HASH: forged.hexdigest(), store.MAC_FIELD: good.mac()}  # as if the xxh3 collided
    assert store.record_problem(store.TENSORS, rec, 29, forged) == (
        f"{store.TENSORS} does not authenticate with this key (keyed BLAKE3 mismatch: altered without the key)")
    assert store.record_problem(store.TENSORS, rec, 29, store.Hashes(None)) != ""  # its own xxh3 differs anyway
    rec[store.MAC_FIELD] = forged.mac()
    assert store.record_problem(store.TENSORS, rec, 29, forged) == ""
