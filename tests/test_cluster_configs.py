"""The cluster definitions, checked offline (nothing is launched, no Ray is started).

- ray_cluster.yaml (AWS) and cluster/ray_cluster_gcp.yaml go through Ray's own defaults merge and JSON schema: the
  steps `ray up` takes before it calls the cloud.
- The KubeRay RayJobs in cluster/kuberay/ use only fields of KubeRay's ray.io/v1 types and run what cluster/README.md
  says they run; a failed attempt is retried and resumes the same run.
- MLflow: a server that other nodes can reach runs MLflow's basic-auth app, with the login from a file or a Kubernetes
  Secret, never a literal; the auth config the head writes is read back with MLflow's own reader.
- The 124M recipe's batch arithmetic goes through the project's config loader and gpt2.train.TrainConfig; the recipes
  checkpoint at least every 1,000 steps and the documents say what a checkpoint weighs.
- runtime_env.yaml's upload is walked with Ray's own traversal and exclude matching.

  python -m tests.test_cluster_configs    # print what `ray job submit --runtime-env runtime_env.yaml` would upload
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
import types
from importlib.metadata import entry_points, requires
from pathlib import Path

import jsonschema
import pytest
import ray  # noqa: E402
import torch
import yaml
from packaging.requirements import Requirement
from ray._private.runtime_env.packaging import FILE_SIZE_WARNING, _dir_travel, _get_excludes  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from cluster.config import load
from cluster.config.pretrain import PretrainConfig
from gpt2 import GPT
from tests.job_loader import load_job

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = {"aws": ROOT / "ray_cluster.yaml", "gcp": ROOT / "cluster" / "ray_cluster_gcp.yaml"}
GPU_MACHINE = {"aws": ("InstanceType", "p4d.24xlarge"), "gcp": ("machineType", "a2-highgpu-8g")}
KUBERAY = ROOT / "cluster" / "kuberay"
CLUSTER_README = ROOT / "cluster" / "README.md"
RECIPE = ROOT / "configs" / "gpt2-124m-fineweb-edu.yaml"
RECIPES = (RECIPE, ROOT / "configs" / "gpt2-350m-fineweb-edu.yaml")
SHARED = "/mnt/shared"
IMAGE_PROJECT_DIR = "/home/ray/gpt2-on-ray/"  # where the project image (cluster/README.md) keeps the repo
TOKEN_FILE = "~/.ray/auth_token"
MLFLOW_LOGIN = "~/.mlflow/credentials"  # where MLflow's client looks for a login (mlflow.utils.credentials)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)
# The limit Ray's documentation states for an uploaded working_dir, and llm.c's 8×A100 speed for the 124M recipe.
WORKING_DIR_LIMIT = 100 * 1024 * 1024
LLMC_TOKENS_PER_S = 1.75e6
PUBLIC_CIDRS = {"0.0.0.0/0", "::/0"}

# Field names of KubeRay's ray.io/v1 Go types (ray-operator/apis/ray/v1: RayJobSpec, RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec), authOptions from v1.5.1. kubectl would drop or reject anything else.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "authOptions",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template", "scaleStrategy",
}


def raw_launcher(cloud: str) -> dict:
    return yaml.safe_load(LAUNCHER[cloud].read_text())


def prepared_launcher(cloud: str) -> dict:
    """The config as `ray up` holds it before touching the cloud: merged with the provider's defaults, validated."""
    config = prepare_config(copy.deepcopy(raw_launcher(cloud)))
    validate_config(config)
    return config


def gpu_node_type(config: dict) -> tuple[str, dict]:
    (entry,) = [(name, t) for name, t in config["available_node_types"].items() if t["resources"].get("GPU")]
    return entry


def recipe(path: Path = RECIPE, *overrides: str) -> PretrainConfig:
    return load(PretrainConfig, path, list(overrides))


def all_commands(config: dict) -> list[str]:
    node_commands = [c for t in config["available_node_types"].values() for c in t.get("initialization_commands", [])]
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for key in keys for c in config.get(key, [])] + node_commands


def public_ingress(permissions: list[dict]) -> list[dict]:
    """Inbound rules open to the whole internet."""
    return [
        rule for rule in permissions
        if {r.get("CidrIp") for r in rule.get("IpRanges", [])} & PUBLIC_CIDRS
        or {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])} & PUBLIC_CIDRS
    ]


def mlflow_servers(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """(environment assignments, arguments) of each `mlflow server` that the shell commands start."""
    servers = []
    for command in commands:
        words = shlex.split(command)
        for i in range(len(words) - 1):
            if words[i].endswith("/mlflow") and words[i + 1] == "server":
                args = list(itertools.takewhile(lambda w: not w.startswith((">", "<", "&", "2>")), words[i + 2:]))
                assigned = [w.lstrip("(") for w in words[:i]]
                env = dict(w.split("=", 1) for w in assigned if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w))
                servers.append((env, args))
    return servers


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def open_mlflow_servers(commands: list[str]) -> list[list[str]]:
    """The `mlflow server`s that listen beyond loopback without MLflow's login (basic-auth) app."""
    return [args for _, args in mlflow_servers(commands)
            if option(args, "--host") not in LOOPBACK and option(args, "--app-name") != "basic-auth"]


def literal_secrets(commands: list[str]) -> list[str]:
    """Assignments of a password, secret key or token to a literal value (not `$VAR` or `$(read it from a file)`)."""
    assignments = [m for c in commands for w in shlex.split(c) if (m := re.fullmatch(r"\(?([A-Z_]+)=(.*)", w))]
    return [m.group(0) for m in assignments if SECRET_LIKE.search(m.group(1)) and not m.group(2).startswith("$")]


def mlflow_auth_module(name: str) -> types.ModuleType:
    """A module of mlflow.server.auth loaded on its own: the package's __init__ is the server app, which needs
    Flask-WTF (installed on the head, not here)."""
    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mlflow_server_auth_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_commands(marker: str) -> list[str]:
    """Shell commands in cluster/README.md's code blocks that contain `marker` (continuation lines joined)."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", CLUSTER_README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line for line in lines if marker in line]


def after_dashes(command: str) -> list[str]:
    """The entrypoint of a `ray job submit ... -- ENTRYPOINT` command."""
    argv = shlex.split(command)
    return argv[argv.index("--") + 1:]


def overrides_of(argv: list[str]) -> list[str]:
    return [a for a in argv if re.fullmatch(r"[a-z_]+\.[a-z_]+=.*", a)]


def kuberay_docs() -> list[dict]:
    return [d for f in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def rayjob(entry_script: str) -> dict:
    (job,) = [d for d in kuberay_docs() if d["kind"] == "RayJob" and entry_script in d["spec"]["entrypoint"]]
    return job


def repo_path(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_PROJECT_DIR), image_path
    return ROOT / image_path.removeprefix(IMAGE_PROJECT_DIR)


def pod_specs(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def uploaded_files() -> list[Path]:
    """What `ray job submit --runtime-env runtime_env.yaml` packs: Ray's traversal with the file's excludes only
    (include_gitignore=False: the excludes alone must keep local state out)."""
    runtime_env = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    root = (ROOT / runtime_env["working_dir"]).resolve()
    files: list[Path] = []
    _dir_travel(root, [_get_excludes(root, runtime_env["excludes"])], lambda p: p.is_file() and files.append(p),
                include_gitignore=False)
    return files


# ------------------------------------------------------------------------------------------ Ray cluster launcher


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_passes_ray_up_validation(cloud):
    config = prepared_launcher(cloud)
    assert config["cluster_name"] == "gpt2-on-ray"
    assert config["provider"]["type"] == cloud
    assert config["provider"]["region"]
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["head_node_type"] in config["available_node_types"]
    machine_key = GPU_MACHINE[cloud][0]
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"][machine_key]
        assert "CPU" in node_type["resources"]
    if cloud == "aws":
        assert all(t["node_config"]["ImageId"] for t in config["available_node_types"].values())
    else:
        assert config["provider"]["project_id"] and config["provider"]["availability_zone"]

    broken = copy.deepcopy(raw_launcher(cloud))
    del broken["available_node_types"][config["head_node_type"]]["resources"]
    with pytest.raises(jsonschema.ValidationError):  # the schema check is real: a node type needs its resources
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_gpu_worker_node_fits_the_recipes(cloud):
    config = prepared_launcher(cloud)
    name, gpu = gpu_node_type(config)
    assert name != config["head_node_type"]
    assert gpu["resources"]["GPU"] == 8
    machine_key, machine = GPU_MACHINE[cloud]
    assert gpu["node_config"][machine_key] == machine
    for path in RECIPES:
        cfg = recipe(path)
        assert cfg.scaling.use_gpu and cfg.scaling.num_workers == gpu["resources"]["GPU"]
        assert cfg.scaling.num_workers * cfg.scaling.cpus_per_worker <= gpu["resources"]["CPU"]
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert all(t["max_workers"] >= t["min_workers"] >= 0 for t in workers.values())
    assert gpu["max_workers"] >= 1
    assert config["max_workers"] >= sum(t["min_workers"] for t in workers.values())
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())
    if cloud == "gcp":  # GPU VMs cannot live-migrate; the Compute API wants `scheduling` as an object
        assert gpu["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_nodes_install_requirements_and_the_project_as_make_setup_does(cloud):
    config = prepared_launcher(cloud)
    setup = " && ".join(config["setup_commands"])
    match = re.search(r"(\S+)/bin/pip install [^&]*-r (\S+)/requirements\.txt", setup)
    assert match, "setup_commands must install requirements.txt"
    venv, project = match.groups()
    assert re.search(rf"{re.escape(venv)}/bin/pip install [^&]*--no-deps -e {re.escape(project)}(\s|$)", setup)
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.txt" in makefile and "--no-deps -e ." in makefile

    mounts = config["file_mounts"]
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [pattern.removesuffix("*") for pattern in include]  # "gpt2*": gpt2 and its sub-packages
    for needed in ["requirements.txt", "pyproject.toml", *packages]:
        assert mounts.get(f"{project}/{needed}") == needed
    for remote, local in mounts.items():
        if remote not in (TOKEN_FILE, MLFLOW_LOGIN):  # those two are secrets from the user's home, never the repo
            assert (ROOT / local).exists(), f"file_mounts: {local} is not in the repository"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if " start " in command:  # the Ray that pip installed, first on PATH for jobs' `python` entrypoints
            assert f"{venv}/bin/ray start" in command and 'PATH="$HOME/venv/bin:$PATH"' in command
    assert venv == "~/venv"


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_token_auth_on_every_node_and_dashboard_not_public(cloud):
    config = prepared_launcher(cloud)
    assert config["file_mounts"][TOKEN_FILE] == TOKEN_FILE
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert not any(re.search(r"--dashboard-host[= ]0\.0\.0\.0", c) for c in all_commands(config))

    permissions = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert public_ingress(permissions) == []
    opened = [{"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    assert public_ingress(opened) == opened  # the check above would catch a public dashboard rule


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_mlflow_reachable_from_other_nodes_requires_a_login(cloud):
    """Rank 0 of Ray Train logs from the GPU node (and Serve replicas load models:/ URIs wherever they run), so the
    head's MLflow listens beyond loopback: then only with MLflow's basic-auth app, whose login every node holds."""
    config = prepared_launcher(cloud)
    commands = all_commands(config)
    ((env, args),) = mlflow_servers(config["head_start_ray_commands"])
    assert mlflow_servers(config["worker_start_ray_commands"] + config["setup_commands"]) == []
    port = option(args, "--port")
    (worker_start,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert f"MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{port}" in worker_start  # why loopback alone would not do
    assert option(args, "--host") is not None  # stated, not left to MLflow's default
    assert open_mlflow_servers(commands) == []
    assert option(args, "--app-name") in {e.name for e in entry_points(group="mlflow.app")}
    unauthenticated = [c.replace("--app-name basic-auth ", "") for c in commands]
    assert open_mlflow_servers(unauthenticated) != []  # the check above would catch a server without a login

    # The auth app's own requirements (mlflow's `auth` extra) on the head, at a version that extra accepts.
    (needed,) = [Requirement(r) for r in requires("mlflow") if 'extra == "auth"' in r]
    pins = dict(re.findall(r"\b(\S+)==(\S+)", " ".join(config["head_setup_commands"])))
    assert needed.specifier.contains(pins[needed.name]), (needed, pins)

    # The login: a file from the user's home on every node, private; the server's settings read from files.
    assert config["file_mounts"][MLFLOW_LOGIN].startswith("~/")
    assert any(re.search(rf"chmod 600 .*{re.escape(MLFLOW_LOGIN)}", c) for c in config["setup_commands"])
    assert env["MLFLOW_AUTH_CONFIG_PATH"] and env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("$(cat ")
    assert literal_secrets(commands) == []
    assert literal_secrets(["MLFLOW_TRACKING_PASSWORD=hunter2 python x.py"]) != []  # the check is real


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_head_writes_the_auth_config_mlflow_reads_from_the_documented_login(cloud, tmp_path, monkeypatch):
    """The README's login command, then the head's setup command, run as written in a scratch home; MLflow's own
    readers then find the same user and password on both sides, the users' database on the head's disk, and files
    only their owner can read."""
    from mlflow.utils.credentials import read_mlflow_creds

    read_auth_config = mlflow_auth_module("config").read_auth_config
    permissions = mlflow_auth_module("permissions").ALL_PERMISSIONS
    config = prepared_launcher(cloud)
    home = tmp_path / "home"
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "python").symlink_to(sys.executable)  # the head's ~/venv
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    in_home = lambda path: Path(path.replace("$HOME", str(home)).replace("~", str(home)))  # noqa: E731
    (make_login,) = documented_commands("mlflow_tracking_password = ")
    (write_ini,) = [c for c in config["head_setup_commands"] if "basic_auth.ini" in c]
    ((server_env, _),) = mlflow_servers(config["head_start_ray_commands"])
    login, node_login = in_home(config["file_mounts"][MLFLOW_LOGIN]), in_home(MLFLOW_LOGIN)
    ini = in_home(server_env["MLFLOW_AUTH_CONFIG_PATH"])
    key_file = in_home(server_env["MLFLOW_FLASK_SERVER_SECRET_KEY"].removeprefix("$(cat ").removesuffix(")"))

    def set_up() -> tuple[str, str]:
        subprocess.run(["bash", "-c", make_login], env=env, check=True)
        node_login.parent.mkdir(exist_ok=True)
        node_login.write_bytes(login.read_bytes())  # what `ray up` copies to every node
        subprocess.run(["bash", "-c", write_ini], env=env, check=True)
        return login.read_text(), key_file.read_text()

    assert set_up() == set_up()  # running the commands again keeps the login and the Flask key

    for name in ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME",
                 "MLFLOW_AUTH_ADMIN_PASSWORD"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    client, server = read_mlflow_creds(), read_auth_config()
    assert client.username and len(client.password) >= 32
    assert (server.admin_username, server.admin_password) == (client.username, client.password)
    assert server.database_uri == f"sqlite:///{home}/mlflow/basic_auth.db"  # the head's disk, not /mnt/shared
    assert server.default_permission == "NO_PERMISSIONS" and server.default_permission in permissions
    assert len(key_file.read_text().strip()) >= 64
    for secret in [login, ini, key_file]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_documented_jobs_use_the_shared_mount(cloud):
    config = prepared_launcher(cloud)
    assert any(re.search(rf"\bmount\b.* {SHARED}\)?( |$)", c) for c in config["setup_commands"])

    (pretrain,) = documented_commands("ray job submit --address http://127.0.0.1:8265 --runtime-env runtime_env.yaml"
                                      " -- python jobs/pretrain.py --config configs/gpt2-124m-fineweb-edu.yaml")
    argv = after_dashes(pretrain)
    cfg = recipe(ROOT / argv[argv.index("--config") + 1], *overrides_of(argv))
    assert cfg.data.shards.startswith(SHARED + "/") and cfg.run.root.startswith(SHARED + "/")

    (prepare,) = documented_commands("python jobs/prepare_data.py --source fineweb-edu")
    args = load_job("prepare_data").parse_args(after_dashes(prepare)[2:])
    assert args.output == cfg.data.shards


def test_every_placeholder_is_explained_in_the_readme():
    readme = CLUSTER_README.read_text()
    files = [LAUNCHER["aws"], LAUNCHER["gcp"], *sorted(KUBERAY.glob("*.yaml"))]
    placeholders = {p for f in files for p in re.findall(r"[\w.-]*REPLACE_ME[\w.-]*", f.read_text())}
    assert placeholders  # the scan finds them
    assert sorted(p for p in placeholders if p not in readme) == []


# -------------------------------------------------------------------------------------------------------- KubeRay


def test_kuberay_pretrain_rayjob_runs_the_124m_recipe_on_8_gpus():
    job = rayjob("jobs/pretrain.py")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and repo_path(argv[1]) == ROOT / "jobs" / "pretrain.py"
    config_path = repo_path(argv[argv.index("--config") + 1])
    assert config_path == RECIPE
    cfg = recipe(config_path, *overrides_of(argv))
    assert cfg.data.shards.startswith(SHARED + "/") and cfg.run.root.startswith(SHARED + "/")

    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) == int(requests["nvidia.com/gpu"]) == 8 == cfg.scaling.num_workers
    assert group["replicas"] == group["minReplicas"] == 1
    assert float(limits["cpu"]) >= cfg.scaling.num_workers * cfg.scaling.cpus_per_worker


@pytest.mark.parametrize("script", ["jobs/pretrain.py", "jobs/prepare_data.py"])
def test_kuberay_rayjobs_use_known_fields_token_auth_and_a_private_head(script):
    job = rayjob(script)
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert all(set(g) <= WORKER_GROUP_FIELDS for g in cluster["workerGroupSpecs"])
    assert all(isinstance(v, str) for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
               for v in g["rayStartParams"].values())  # the CRD types rayStartParams as map[string]string

    requirements = (ROOT / "requirements.txt").read_text()
    assert cluster["rayVersion"] == ray.__version__ and f"]=={ray.__version__}" in requirements
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not cluster["headGroupSpec"].get("enableIngress", False)
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0

    (claim,) = [d for d in kuberay_docs() if d["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in pod_specs(job):
        shared = {v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        (container,) = pod["containers"]
        assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == SHARED} & shared


@pytest.mark.parametrize("script", ["jobs/pretrain.py", "jobs/prepare_data.py"])
def test_kuberay_jobs_retry_and_a_retry_resumes_the_same_run(script):
    """KubeRay retries a failed RayJob on a new Ray cluster (spec.backoffLimit, KubeRay ≥ 1.2) with the same
    entrypoint; the run resumes because everything that names it is in that fixed text and on the shared volume."""
    job = rayjob(script)
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1
    assert not re.search(r"[$`]", spec["entrypoint"])  # no date, no random name: every attempt runs the same command
    assert "jobId" not in spec and "runtimeEnvYAML" not in spec
    if script != "jobs/pretrain.py":
        return
    argv = shlex.split(spec["entrypoint"])
    cfg = recipe(repo_path(argv[argv.index("--config") + 1]), *overrides_of(argv))
    assert cfg.run_dir() == f"{SHARED}/runs/pretrain/gpt2-124m-fineweb-edu"
    # Ray Train resumes from RunConfig(storage_path, name): both follow from the config alone.
    from cluster.train.pretrain import make_trainer
    first, again = make_trainer(cfg).run_config, make_trainer(cfg).run_config
    assert (first.storage_path, first.name) == (again.storage_path, again.name) == (cfg.run_dir(), "train")
    assert cfg.run.max_failures >= 1  # a lost worker is first retried inside the attempt
    # KubeRay does not retry an attempt that ran out of activeDeadlineSeconds: give a whole run room to finish.
    minutes = cfg.train.max_steps * cfg.train.total_batch_tokens / LLMC_TOKENS_PER_S / 60
    assert spec["activeDeadlineSeconds"] >= 2 * minutes * 60


def test_kuberay_mlflow_login_comes_from_a_secret():
    """The pod where Ray Train's rank 0 logs to MLflow (the GPU pod) gets the login from a Secret; no container of any
    RayJob carries a password, secret or token as a literal."""
    job = rayjob("jobs/pretrain.py")
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        login = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert set(login) >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert len({ref["name"] for ref in login.values()}) == 1
    assert "@" not in job["spec"]["entrypoint"]  # no user:password@ in a tracking URI either
    for doc in kuberay_docs():
        if doc["kind"] != "RayJob":
            continue
        for pod in pod_specs(doc):
            for container in pod["containers"]:
                for entry in container.get("env", []):
                    if SECRET_LIKE.search(entry["name"]) or entry["name"].endswith("USERNAME"):
                        assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry


def test_kuberay_prepare_job_writes_where_the_pretrain_job_reads():
    argv = shlex.split(rayjob("jobs/prepare_data.py")["spec"]["entrypoint"])
    assert repo_path(argv[1]) == ROOT / "jobs" / "prepare_data.py"
    args = load_job("prepare_data").parse_args(argv[2:])
    assert args.source == "fineweb-edu"
    pretrain = shlex.split(rayjob("jobs/pretrain.py")["spec"]["entrypoint"])
    assert args.output == recipe(RECIPE, *overrides_of(pretrain)).data.shards


# --------------------------------------------------------------------------------------------- recipe arithmetic


def test_124m_batch_arithmetic_through_the_config_loader():
    cfg = recipe()
    workers = cfg.scaling.num_workers
    accum = cfg.train.grad_accum_steps(workers)
    assert (cfg.train.micro_batch, cfg.train.seq_len, workers, accum) == (64, 1024, 8, 1)
    assert cfg.train.micro_batch * cfg.train.seq_len * workers * accum == cfg.train.total_batch_tokens == 524_288
    # cluster/README.md's fallback for 40 GB A100s: half the micro-batch, twice the accumulation, same step.
    half = recipe(RECIPE, "train.micro_batch=32")
    assert half.train.grad_accum_steps(workers) == 2
    assert half.train.micro_batch * half.train.seq_len * workers * 2 == 524_288
    assert recipe(RECIPES[1]).train.grad_accum_steps(workers) == 4


def test_readme_cost_figures_follow_from_the_recipe():
    cfg = recipe()
    tokens = cfg.train.max_steps * cfg.train.total_batch_tokens
    minutes = tokens / LLMC_TOKENS_PER_S / 60
    assert cfg.train.max_steps == 19_073 and 9.99e9 < tokens < 1.001e10
    readme = CLUSTER_README.read_text()
    assert f"{cfg.train.max_steps:,} steps × {cfg.train.total_batch_tokens:,} tokens = {tokens:,} tokens" in readme
    assert f"**{round(minutes)} min**" in readme
    price = float(re.search(r"\*\*\$(\d+\.\d+)/h\*\*", readme).group(1))
    assert f"≈ **${round(price * minutes / 60)}**" in readme


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_checkpoint_every_1000_steps_and_say_what_one_weighs(path):
    """A failure costs at most 999 steps; the recipe and cluster/README.md state a checkpoint's size, which follows
    from the parameter count: fp32 weights (the padding rows of the vocabulary left out) + AdamW's two fp32 moments."""
    cfg = recipe(path)
    assert 0 < cfg.checkpoint.every <= 1000 and cfg.checkpoint.keep >= 2
    assert (cfg.checkpoint.every - 1) / cfg.train.max_steps < 0.055
    model_config = cfg.model.build()
    with torch.device("meta"):  # the shapes only
        n = sum(p.numel() for p in GPT(model_config).parameters())
    weights = 4 * (n - (model_config.padded_vocab_size - model_config.vocab_size) * model_config.n_embd)
    gb = lambda n_bytes: f"{n_bytes / 1e9:.1f} GB"  # noqa: E731
    one = weights + 2 * 4 * n
    text = re.sub(r"\s*\n\s*#\s*", " ", path.read_text())  # the comment's lines joined
    assert f"One checkpoint is {gb(one)}" in text
    assert f"holds {gb(cfg.checkpoint.keep * one)} ({gb((cfg.checkpoint.keep + 1) * one)} while" in text
    assert f"every {cfg.checkpoint.every:,} steps" in CLUSTER_README.read_text()
    assert f"{gb(one)}" in CLUSTER_README.read_text()


# ---------------------------------------------------------------------------------------------- runtime_env upload


def test_runtime_env_excludes_keep_local_state_out():
    runtime_env = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    excluded = _get_excludes(ROOT, runtime_env["excludes"])
    for local_state in [".venv/bin/python", "data/fineweb-edu/fineweb-edu_train_000001.bin",
                        "runs/pretrain/x/train/checkpoint_000001/model.safetensors", "mlflow/mlflow.db", ".git/HEAD"]:
        assert excluded(ROOT / local_state), local_state
    for needed in ["jobs/pretrain.py", "configs/gpt2-124m-fineweb-edu.yaml", "gpt2/model.py", "cluster/train/pretrain.py"]:
        assert not excluded(ROOT / needed), needed


def test_uploaded_working_dir_is_well_under_the_limit():
    files = uploaded_files()
    names = {str(f.relative_to(ROOT)) for f in files}
    assert {"jobs/pretrain.py", "configs/gpt2-124m-fineweb-edu.yaml", "runtime_env.yaml"} <= names
    assert not [n for n in names if n.split("/")[0] in {".venv", "data", "runs", "mlflow", ".git"}]
    assert [str(f) for f in files if f.stat().st_size >= FILE_SIZE_WARNING] == []
    total = sum(f.stat().st_size for f in files)
    print(f"runtime_env.yaml uploads {len(files)} files, {total / 2**20:.2f} MiB")
    assert total < WORKING_DIR_LIMIT / 4


if __name__ == "__main__":
    files = uploaded_files()
    total = sum(f.stat().st_size for f in files)
    by_top: dict[str, int] = {}
    for f in files:
        top = f.relative_to(ROOT).parts[0]
        by_top[top] = by_top.get(top, 0) + f.stat().st_size
    for top, size in sorted(by_top.items(), key=lambda kv: -kv[1]):
        print(f"{size / 1024:10.1f} KiB  {top}")
    print(f"runtime_env.yaml would upload {len(files)} files, {total / 2**20:.2f} MiB"
          f" (Ray's documented working_dir limit: {WORKING_DIR_LIMIT / 2**20:.0f} MiB)")
