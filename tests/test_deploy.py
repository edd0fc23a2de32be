"""deploy/ recipes, checked as far as this machine allows.

YAML parses; Kubernetes manifests validate against the `kubernetes` client's models (every field known,
required fields present); shell scripts (files and cloud-init runcmd) pass `bash -n` and `shellcheck`; every
embedded ckptd config passes `ckptd config check`; the unit and drop-in each cloud recipe installs (through
`ckptd install-unit`, into an image root here) pass `systemd-analyze verify` with nothing on stderr.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from fixtures.sup_helpers import TRAINER

pytestmark = pytest.mark.kind("unit")  # the tests marked kind("system") start processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
CLOUD_INIT = {"aws-spot": "user-data.yaml", "azure-spot": "cloud-init.yaml"}
RECIPES = ("aws-spot", "gcp-spot", "azure-spot", "kubernetes", "slurm")


def read(*parts: str) -> str:
    with open(os.path.join(DEPLOY, *parts)) as f:
        return f.read()


def yaml_files() -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), DEPLOY) for d, _, fs in os.walk(DEPLOY)
                  for f in fs if f.endswith((".yaml", ".yml")))


def cloud_init(recipe: str) -> dict:
    text = read(recipe, CLOUD_INIT[recipe])
    assert text.startswith("#cloud-config\n")  # cloud-init ignores user data without it
    return yaml.safe_load(text)


def embedded_configs() -> dict[str, str]:
    """Every ckptd config a recipe writes, by where it comes from."""
    out = {}
    for recipe in CLOUD_INIT:
        (entry,) = [w for w in cloud_init(recipe)["write_files"] if w["path"].endswith("ckptd.yaml")]
        out[f"{recipe} write_files {entry['path']}"] = entry["content"]
    gcp = re.search(r"<<'YAML'\n(.*?)\nYAML\n", read("gcp-spot", "startup.sh"), re.S)
    out["gcp-spot startup.sh heredoc"] = gcp.group(1) + "\n"
    (cm,) = [d for d in yaml.safe_load_all(read("kubernetes", "job.yaml")) if d["kind"] == "ConfigMap"]
    out["kubernetes ConfigMap"] = cm["data"]["ckptd.yaml"]
    out["slurm ckptd.yaml"] = read("slurm", "ckptd.yaml")
    return out


def shell_scripts() -> dict[str, str]:
    out = {"gcp-spot/startup.sh": read("gcp-spot", "startup.sh"), "slurm/train.sbatch": read("slurm", "train.sbatch")}
    for recipe in CLOUD_INIT:
        for i, cmd in enumerate(cloud_init(recipe)["runcmd"]):
            assert isinstance(cmd, list) and cmd[:2] == ["bash", "-c"], cmd  # one bash script, checkable
            out[f"{recipe} runcmd[{i}]"] = "#!/bin/bash\n" + cmd[2]
    return out


@pytest.mark.parametrize("name", yaml_files())
def test_yaml_parses(name):
    docs = list(yaml.safe_load_all(read(name)))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_every_recipe_has_a_readme_and_the_main_readme_links_it():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for recipe in RECIPES:
        assert os.path.getsize(os.path.join(DEPLOY, recipe, "README.md")) > 200
        assert f"deploy/{recipe}" in readme, f"README.md does not link deploy/{recipe}"


@pytest.mark.parametrize("where", sorted(embedded_configs()))
@pytest.mark.kind("system")
def test_embedded_ckptd_config_passes_config_check(where, tmp_path):
    path = tmp_path / "ckptd.yaml"
    path.write_text(embedded_configs()[where])
    r = subprocess.run([sys.executable, "-m", "ckptd", "config", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"{where}: {r.stderr}"


@pytest.mark.parametrize("name", sorted(shell_scripts()))
@pytest.mark.kind("system")
def test_shell_script_passes_bash_n_and_shellcheck(name, tmp_path):
    path = tmp_path / "script.sh"
    path.write_text(shell_scripts()[name])
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package `shellcheck`; .ci/run installs it)")
    r = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"{name}:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("recipe", ["aws-spot", "gcp-spot", "azure-spot"])
@pytest.mark.kind("system")
def test_unit_a_cloud_recipe_installs_passes_systemd_analyze_verify(recipe, tmp_path):
    from fixtures.systemd_user import under_tmp_reason

    under_tmp = under_tmp_reason()
    if under_tmp:
        pytest.skip(under_tmp)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`; .ci/run installs it)")
    script = shell_scripts()[f"{recipe} runcmd[0]"] if recipe in CLOUD_INIT else read(recipe, "startup.sh")
    call = re.search(r"ckptd install-unit (\S+) --config (\S+) --run-as (\S+) --now", script)
    assert call, "the recipe installs the unit with `ckptd install-unit JOB --config FILE --run-as USER --now`"
    job = call.group(1).replace('"$JOB"', re.search(r"^JOB=(\S+)", script, re.M).group(1) if "$JOB" in call.group(1)
                                else call.group(1))
    (config,) = [v for k, v in embedded_configs().items() if k.startswith(recipe)]
    cfg = tmp_path / "ckptd.yaml"
    cfg.write_text(config)
    image = tmp_path / "image"
    # The recipe's account does not exist here: an existing system account stands in (systemd-analyze warns
    # about `nobody`, install-unit refuses it). The script is the fixture trainer.
    stand_in = _system_account()
    r = subprocess.run([sys.executable, "-m", "ckptd", "install-unit", job, "--config", str(cfg), "--root", str(image),
                        "--run-as", stand_in, TRAINER], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    units = image / "etc" / "systemd" / "system"
    dropin = (units / f"ckptd@{job}.service.d" / "50-install-unit.conf").read_text()
    ckpt_dir = yaml.safe_load(config)["dir"]
    assert f"ReadWritePaths={ckpt_dir}" in dropin and f"RequiresMountsFor={ckpt_dir}" in dropin
    assert f"User={stand_in}" in dropin and "DynamicUser=no" in dropin
    assert (units / "multi-user.target.wants" / f"ckptd@{job}.service").is_symlink()  # starts at every boot
    verify = tmp_path / "verify"
    verify.mkdir()
    shutil.copy(units / "ckptd@.service", verify)
    shutil.copytree(units / f"ckptd@{job}.service.d", verify / f"ckptd@{job}.service.d")
    r = subprocess.run(["systemd-analyze", "verify", str(verify / f"ckptd@{job}.service")], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def _system_account() -> str:
    import pwd

    for name in ("daemon", "bin", "sys"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    pytest.skip("no system account (daemon, bin, sys) to stand in for the recipe's `ckptd` account")


def test_slurm_script_requeues_through_ckptd_on_usr1():
    text = read("slurm", "train.sbatch")
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
    assert re.search(r"^exec ckptd run --config ckptd\.yaml", text, re.M)  # ckptd is the batch shell: B: reaches it
    cfg = yaml.safe_load(read("slurm", "ckptd.yaml"))
    assert cfg["requeue_signal"] == "USR1" and cfg["slurm"]["requeue"] is True and cfg["grace"] < 120


# --- Kubernetes ---------------------------------------------------------------------------------------------


def k8s_docs() -> list[dict]:
    return list(yaml.safe_load_all(read("kubernetes", "job.yaml")))


def _unknown_fields(data, type_name: str, where: str, client) -> list[str]:
    """Keys the Kubernetes model of ``type_name`` does not know, anywhere below ``data``."""
    listed = re.fullmatch(r"[lL]ist\[(.*)\]", type_name)  # "list[V1Container]" (older clients: lower case)
    if listed:
        return [u for i, item in enumerate(data or [])
                for u in _unknown_fields(item, listed[1], f"{where}[{i}]", client)]
    mapped = re.fullmatch(r"dict\(str, (.*)\)|Dict\[str, (.*)\]", type_name)
    if mapped:
        inner = mapped[1] or mapped[2]
        return [u for k, v in (data or {}).items() for u in _unknown_fields(v, inner, f"{where}.{k}", client)]
    model = getattr(client, type_name, None)
    if model is None or not hasattr(model, "attribute_map"):
        return []  # a primitive, or `object`
    if not isinstance(data, dict):
        return [f"{where}: expected a {type_name} mapping, got {data!r}"]
    by_json = {v: k for k, v in model.attribute_map.items()}
    out = [f"{where}.{key}: unknown field of {type_name}" for key in data if key not in by_json]
    for key, value in data.items():
        if key in by_json:
            out += _unknown_fields(value, model.openapi_types[by_json[key]], f"{where}.{key}", client)
    return out


@pytest.mark.parametrize("kind", ["ServiceAccount", "ConfigMap", "Job"])
def test_kubernetes_manifest_validates_against_the_kubernetes_models(kind):
    kubernetes = pytest.importorskip("kubernetes", reason="the `kubernetes` package (test extra) is not installed")
    client = kubernetes.client
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind]
    type_name = f"V1{kind}"
    assert not _unknown_fields(doc, type_name, kind, client)
    obj = client.ApiClient()._ApiClient__deserialize(doc, type_name)  # required fields and enums are checked
    assert obj.kind == kind and obj.api_version == doc["apiVersion"]


def test_kubernetes_job_gives_ckptd_time_to_checkpoint_and_runs_it_as_pid_1():
    docs = {d["kind"]: d for d in k8s_docs()}
    pod = docs["Job"]["spec"]["template"]["spec"]
    (train,) = pod["containers"]
    grace = yaml.safe_load(docs["ConfigMap"]["data"]["ckptd.yaml"])["grace"]
    assert pod["terminationGracePeriodSeconds"] > grace  # the kubelet's SIGKILL comes after ckptd's own
    assert train["command"][:2] == ["ckptd", "run"]  # exec form: ckptd is PID 1 and gets SIGTERM
    assert train["lifecycle"]["preStop"]["exec"]["command"][:3] == ["ckptd", "stop", "--wait"]
    # The recommended layout: the node's local disk, with the object store as the durable tier reached through
    # the pod's ServiceAccount; no credential anywhere in the manifest.
    (ckpt,) = [m for m in train["volumeMounts"] if m["name"] == "checkpoints"]
    cfg = yaml.safe_load(docs["ConfigMap"]["data"]["ckptd.yaml"])
    assert cfg["dir"].startswith(ckpt["mountPath"] + "/") and cfg["remote"].startswith("s3://")
    assert any(v["name"] == "checkpoints" and "emptyDir" in v for v in pod["volumes"])
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert "Secret" not in docs and not [v for v in pod["volumes"] if "secret" in v]
    assert not [e for e in train["env"] if "valueFrom" in e or re.search(r"KEY|SECRET|TOKEN|PASSWORD", e["name"])]
    rules = docs["Job"]["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "values": [2, 78]} == {"action": rules[0]["action"],
                                                        "values": rules[0]["onExitCodes"]["values"]}


# --------------------------------------------------------------------------- the install step

PIP_INSTALL = re.compile(r"^\s*/opt/ckptd/bin/pip install --quiet (\S+)\s*(?:#.*)?$", re.M)


def install_steps() -> dict[str, list[str]]:
    """What each cloud recipe's install step passes to pip, by recipe."""
    scripts = {"aws-spot": shell_scripts()["aws-spot runcmd[0]"], "azure-spot": shell_scripts()["azure-spot runcmd[0]"],
               "gcp-spot": read("gcp-spot", "startup.sh").replace("$MNT", "/mnt/ckptd")}
    return {recipe: [w.strip('"') for w in PIP_INSTALL.findall(text)] for recipe, text in scripts.items()}


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> str:
    """The wheel built from this checkout, as `python -m build` would name it (pip wheel: no network needed)."""
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(out), ROOT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("ckptd-*.whl")
    return str(wheel)


def test_no_documented_install_asks_the_package_index_for_ckptd():
    """`pip install ckptd` fails: ckptd is not on the package index. Every doc installs what exists."""
    bare = re.compile(r"pip install (--quiet )?['\"]?ckptd['\"]?(\s|$|`)")
    docs = [os.path.join(ROOT, "README.md")] + [os.path.join(d, f) for d, _, fs in os.walk(DEPLOY) for f in fs]
    for path in docs:
        with open(path, errors="replace") as f:
            text = f.read()
        assert not bare.search(text), f"{os.path.relpath(path, ROOT)} installs ckptd from the package index"


@pytest.mark.parametrize("recipe", ["aws-spot", "gcp-spot", "azure-spot"])
@pytest.mark.kind("system")
def test_a_cloud_recipes_install_step_installs_the_wheel_built_from_this_repository(recipe, built_wheel, tmp_path):
    steps = install_steps()[recipe]
    assert steps[0].startswith("torch=="), steps  # torch first: the build for the machine's GPUs
    (target,) = steps[1:]
    target, extras = target.removesuffix("]").split("[")  # with the object-store client: checkpoints go to a bucket
    assert extras == "remote", steps
    assert os.path.basename(target) == os.path.basename(built_wheel) == f"ckptd-{project_version()}-py3-none-any.whl"
    # The step as the recipe runs it, on a fresh venv, with the wheel where the recipe expects it (under a
    # temporary root; --no-deps: the dependencies come from the package index, not from this repository).
    share = tmp_path / target.lstrip("/")
    share.parent.mkdir(parents=True)
    shutil.copy(built_wheel, share)
    venv = tmp_path / "opt-ckptd"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                        "--no-deps", str(share)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    probe = ("import ckptd, importlib.metadata as m, importlib.resources as r; print(ckptd.__file__); "
             "print(m.version('ckptd')); print(m.metadata('ckptd')['License-Expression']); "
             "print((r.files('ckptd') / 'units' / 'ckptd@.service').is_file())")
    out = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    where, version, license_, unit = out.stdout.split()
    assert where.startswith(str(venv)) and version == project_version() and license_ == "Apache-2.0"
    assert unit == "True" and os.access(venv / "bin" / "ckptd", os.X_OK)  # the console script and the unit file
