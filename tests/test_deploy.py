"""Deployment files: every command the images and compose services run exists in ``gsp``,
the Dockerfile passes hadolint and the compose file matches the compose specification."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import tomllib
import yaml

from app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} is missing: install the test extra (pip install -e '.[test]')"
    return str(path)


def _instructions() -> list[tuple[str, str]]:
    """Dockerfile instructions (keyword, arguments) with continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    values = [rest for key, rest in stage if key == keyword]
    assert values, f"the final stage has no {keyword}"
    return json.loads(values[-1])


def _installed_files(stage: list[tuple[str, str]]) -> dict[str, Path]:
    """Image path -> repository file, from the final stage's COPY instructions."""
    installed = {}
    for keyword, rest in stage:
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, target = rest.split()
        for source in sources:
            destination = target + Path(source).name if target.endswith("/") else target
            installed[destination] = ROOT / source
    return installed


def _script_gsp_lines(script: Path) -> list[list[str]]:
    """The argument lists of every ``gsp ...`` command line in a shell script."""
    lines = []
    for line in script.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["exec", "gsp"]:
            words = words[1:]
        if words and words[0] == "gsp":
            lines.append(words[1:])
    return lines


def _interpolate(value: str) -> str:
    """Compose ``${VAR:-default}`` substitution, with the defaults (the environment unset)."""
    return _VARIABLE.sub(lambda match: match.group(2) or "", value)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _assert_gsp_accepts(argv: list[str], where: str) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"{where}: `gsp {shlex.join(argv)}` is not a valid gsp command ({error})")
    assert getattr(args, "handler", None), f"{where}: `gsp {shlex.join(argv)}` runs nothing"


def _gsp_argv(entrypoint: list[str], command: list[str], where: str) -> list[str]:
    """The gsp arguments that an entrypoint + command pair of the image ends up running."""
    installed = _installed_files(_final_stage())
    program = entrypoint[0]
    scripts = {Path(path).name: source for path, source in installed.items()}
    assert program in scripts, f"{where}: {program} is not installed by the Dockerfile"
    lines = _script_gsp_lines(scripts[program])
    assert lines, f"{where}: {scripts[program]} runs no gsp command"
    template = lines[-1]  # the script's main command; "$@" is where the arguments go
    assert template[-1] == "$@", f'{scripts[program]}: the gsp command must end with "$@"'
    return template[:-1] + entrypoint[1:] + command


def test_image_default_command_is_a_gsp_command() -> None:
    stage = _final_stage()
    entrypoint = _exec_form(stage, "ENTRYPOINT")
    command = _exec_form(stage, "CMD")
    _assert_gsp_accepts(_gsp_argv(entrypoint, command, "Dockerfile"), "Dockerfile CMD")
    assert command[0] == "serve" and "0.0.0.0" in command, "the image serves on all interfaces"


def test_compose_service_commands_are_gsp_commands() -> None:
    image_entrypoint = _exec_form(_final_stage(), "ENTRYPOINT")
    services = _compose()["services"]
    assert {"api", "indexer", "trainer"} <= set(services)
    for name, service in services.items():
        entrypoint = service.get("entrypoint", image_entrypoint)
        command = [_interpolate(str(word)) for word in service["command"]]
        argv = _gsp_argv(entrypoint, command, f"service {name}")
        _assert_gsp_accepts(argv, f"compose service {name}")
    indexer = _gsp_argv(services["indexer"]["entrypoint"], services["indexer"]["command"], "")
    assert indexer[:2] == ["index", "build"]


def test_every_script_gsp_line_names_a_real_subcommand() -> None:
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)  # the registered subcommands
    installed = _installed_files(_final_stage()).values()
    for script in sorted(path for path in installed if path.suffix == ".sh"):
        for words in _script_gsp_lines(script):
            first = words[0] if words else ""
            if first.startswith("$"):
                continue  # forwarded arguments: checked against the compose commands
            if first.startswith("-"):
                with pytest.raises(SystemExit) as stop:
                    parser.parse_args(words)
                assert stop.value.code == 0, f"{script.name}: `gsp {shlex.join(words)}` fails"
            else:
                assert first in known, f"{script.name}: gsp has no subcommand {first!r}"


def test_files_the_image_runs_are_installed() -> None:
    stage = _final_stage()
    installed = _installed_files(stage)
    for keyword, rest in _instructions():  # every stage's build-context files exist
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} is missing"
    healthcheck = next(rest for key, rest in stage if key == "HEALTHCHECK")
    probe = json.loads(healthcheck.split("CMD", 1)[1])
    assert probe[-1] in installed
    compose_probe = _compose()["services"]["api"]["healthcheck"]["test"]
    assert compose_probe[-1] in installed
    assert any(key == "USER" and not rest.startswith(("root", "0")) for key, rest in stage)


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = _compose()
    broken["services"]["api"]["restart_policy"] = "always"  # not a compose key
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    assert _check_compose(bad).returncode != 0, "the schema check must reject unknown keys"


def test_compose_reserves_a_gpu_and_uses_the_committed_env_file() -> None:
    services = _compose()["services"]
    devices = services["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    env_files = [entry["path"] for entry in services["api"]["env_file"]]
    assert ".env.example" in env_files
    assert (ROOT / ".env.example").is_file()
    for job in ("indexer", "trainer"):
        assert services[job]["profiles"] == ["jobs"]


class _Reset:
    """compose's ``!reset`` tag: the key is dropped from the merged service."""


class _OverrideLoader(yaml.SafeLoader):
    pass


_OverrideLoader.add_constructor("!reset", lambda loader, node: _Reset())


def _merge(base: dict, override: dict) -> dict:
    """Compose's merge of an override file for what ours use: mappings merged key by key,
    other values replaced, ``!reset`` keys dropped."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, _Reset):
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_cpu_override_drops_every_gpu_reservation(tmp_path: Path) -> None:
    override = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), Loader=_OverrideLoader)
    base = _compose()
    assert set(override["services"]) == set(base["services"])
    merged = _merge(base, {"services": override["services"]})
    for name, service in merged["services"].items():
        assert "deploy" not in service, f"{name} still reserves a GPU"
        assert service["image"].endswith(":cpu") and service["build"]["args"]["TARGET"] == "cpu"
        assert service["command"] == base["services"][name]["command"]
    merged_file = tmp_path / "merged.yml"
    merged_file.write_text(yaml.safe_dump(merged))
    result = _check_compose(merged_file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_api_serves_read_only_so_the_indexer_can_write() -> None:
    from app.service.settings import Settings

    services = _compose()["services"]
    read_only = services["api"]["environment"]["GSP_GALLERY_READ_ONLY"]
    assert Settings.model_validate(
        {"checkpoint": "c", "gallery": "g", "gallery_read_only": read_only}
    ).gallery_read_only
    indexer_volumes = {v.split(":")[1]: v for v in services["indexer"]["volumes"]}
    assert not indexer_volumes["/data/gallery"].endswith(":ro")
    assert services["indexer"]["environment"]["GSP_API_URL"] == "http://api:8000"


def test_env_example_holds_only_known_service_settings() -> None:
    from app.service.settings import Settings

    fields = {f"GSP_{name.upper()}" for name in Settings.model_fields}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key = line.split("=", 1)[0]
            assert key in fields, f".env.example sets {key}, which the service does not read"


def test_entrypoint_runs_gsp_subcommands_and_other_programs(tmp_path: Path) -> None:
    (tmp_path / "gsp-preflight").symlink_to(ROOT / "docker" / "preflight.py")  # as installed
    env = {**os.environ, "PATH": os.pathsep.join([str(BIN), str(tmp_path), os.environ["PATH"]])}
    script = str(ROOT / "docker" / "entrypoint.sh")
    version = subprocess.run(
        ["sh", script, "--version"], capture_output=True, text=True, env=env, check=True
    )
    assert version.stdout.startswith("gsp ")
    helped = subprocess.run(
        ["sh", script, "serve", "--help"], capture_output=True, text=True, env=env, check=True
    )
    assert "usage: gsp serve" in helped.stdout
    other = subprocess.run(
        ["sh", script, "echo", "hello"], capture_output=True, text=True, env=env, check=True
    )
    assert other.stdout.strip() == "hello"
    env["GSP_CHECKPOINT"] = str(tmp_path / "no-model")
    refused = subprocess.run(["sh", script, "serve"], capture_output=True, text=True, env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("gsp container: model checkpoint") and not refused.stdout


def _docker_module(name: str):
    """A module of docker/ (scripts, not a package), imported by file name."""
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_image_requirements_differ_by_target_only_in_the_torch_index() -> None:
    requirements = _docker_module("requirements").requirements
    pyproject = ROOT / "pyproject.toml"
    with pyproject.open("rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert requirements(pyproject, "cpu", cpu_index) == [
        f"--extra-index-url {cpu_index}",
        *dependencies,
    ]
    # the CUDA target keeps the package index's (CUDA) torch; without its index the CPU target
    # installs the same, so the two images share their layers
    assert requirements(pyproject, "cuda", cpu_index) == dependencies
    assert requirements(pyproject, "cpu", "") == dependencies
    names = [re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower() for line in dependencies]
    assert "faiss-cpu" in names and "torch" in names
    assert not [name for name in names if "cu12" in name or name.startswith("faiss-gpu")]
    printed = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "requirements.py"), str(pyproject), "cpu", "X"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert printed.stdout.splitlines() == ["--extra-index-url X", *dependencies]
    with pytest.raises(SystemExit):
        requirements(pyproject, "rocm")


def test_pip_build_args_mount_local_sources_and_pass_remote_ones(tmp_path: Path) -> None:
    pip_build_args = _docker_module("pip_build_args")
    index_root, wheels = tmp_path / "pypi", tmp_path / "wheels"
    (index_root / "simple").mkdir(parents=True)
    wheels.mkdir()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    options = pip_build_args.build_options(
        {
            "extra-index-url": f"file://{index_root}/simple https://mirror.example/simple",
            "find-links": f"{wheels} {tmp_path / 'absent'}",
            "constraint": str(constraints),
        }
    )
    assert f"--build-arg=PIP_FIND_LINKS={wheels} {tmp_path / 'absent'}" in options
    assert f"--build-arg=PIP_CONSTRAINT={constraints}" in options
    mounts = [option for option in options if option.startswith("--volume=")]
    # a file:// index is mounted with its parent (the files its pages link to); remote URLs
    # and paths that do not exist are not mounted
    assert mounts == [
        f"--volume={index_root}:{index_root}:ro",
        f"--volume={wheels}:{wheels}:ro",
        f"--volume={constraints}:{constraints}:ro",
    ]
    bundle = tmp_path / "ca.crt"
    assert pip_build_args.ca_options(bundle) == []
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert f"--build-arg=SSL_CERT_FILE={pip_build_args.BUILD_CA_BUNDLE}" in (
        pip_build_args.ca_options(bundle)
    )


def test_preflight_names_the_mount_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preflight = _docker_module("preflight")
    checkpoint, gallery, images = tmp_path / "model", tmp_path / "gallery", tmp_path / "images"
    for directory in (checkpoint, gallery, images):
        directory.mkdir()
    serve = ["serve", "--checkpoint", str(checkpoint), "--gallery", str(gallery)]
    build = ["index", "build", "--images", str(images), "--checkpoint", str(checkpoint)]
    build += ["--out", str(gallery)]
    with pytest.raises(preflight.MountProblem, match=r"has no config\.json"):
        preflight.check(serve)
    (checkpoint / "config.json").write_text("{}")
    with pytest.raises(preflight.MountProblem, match=r"no gallery in .* yet"):
        preflight.check(serve)
    (gallery / "current").mkdir()
    preflight.check(serve)
    (images / "notes.txt").write_text("no image")
    with pytest.raises(preflight.MountProblem, match="holds no images"):
        preflight.check(build)
    (images / "sub").mkdir()
    (images / "sub" / "photo.JPG").write_bytes(b"")
    preflight.check(build)
    checked: list[Path] = []
    monkeypatch.setattr(preflight, "check_gallery_writable", checked.append)
    preflight.check([word if word != "--out" else "--gallery" for word in build])
    assert checked == [gallery], "--gallery, the newer spelling of --out, names the gallery"
    missing = ["serve", "--checkpoint", str(tmp_path / "absent"), "--gallery", str(gallery)]
    with pytest.raises(preflight.MountProblem, match="absent does not exist"):
        preflight.check(missing)
    assert preflight.main(["train", "--config", "x.yaml"]) == 0  # nothing to check


class _ReloadHandler(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_POST(self) -> None:
        type(self).seen.append((self.path, self.headers.get("X-API-Key")))
        body = json.dumps({"previous_size": 1, "gallery_size": 2}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_reload_script_posts_with_the_api_key() -> None:
    server = HTTPServer(("127.0.0.1", 0), _ReloadHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            **os.environ,
            "GSP_API_URL": f"http://127.0.0.1:{server.server_port}",
            "GSP_API_KEYS": "first-key,second-key",
        }
        script = str(ROOT / "docker" / "reload.py")
        result = subprocess.run(
            [sys.executable, script], capture_output=True, text=True, env=env, check=False
        )
        assert result.returncode == 0, result.stderr
        assert _ReloadHandler.seen == [("/v1/admin/reload-gallery", "first-key")]
        env["GSP_API_KEYS"] = ""
        refused = subprocess.run(
            [sys.executable, script], capture_output=True, text=True, env=env, check=False
        )
        assert refused.returncode == 2 and "GSP_API_KEYS" in refused.stderr
    finally:
        server.shutdown()
        thread.join()


def test_readme_compose_commands_name_real_services_and_files() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deployment with compose", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines() if "docker compose" in line]
    assert len(lines) >= 4
    services = _compose()["services"]
    for line in lines:
        words = shlex.split(line.split("docker compose", 1)[1], comments=True)
        files = [words[i + 1] for i, word in enumerate(words) if word == "-f"]
        assert all((ROOT / file).is_file() for file in files), line
        action = next(word for word in words if word in ("run", "up"))
        service = next(word for word in words[words.index(action) + 1 :] if word in services)
        if "profiles" in services[service]:
            assert "--profile" in words, f"{line}: {service} needs its profile"


def test_the_ray_compose_file_runs_the_indexer_job_on_the_cluster() -> None:
    """docker-compose.ray.yml: valid compose, an image with the ray extra for every service,
    and an indexer that runs the usual job (gsp-reindex) with --engine ray on the cluster."""
    path = ROOT / "docker-compose.ray.yml"
    result = _check_compose(path)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(path.read_text())["services"]
    assert {"ray-head", "ray-worker", "indexer"} <= set(services)
    for service in services.values():
        assert service["build"]["args"]["EXTRAS"] == "ray"
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
    indexer = services["indexer"]
    script = indexer["entrypoint"][2]
    assert "ray start --address=ray-head:6379" in script and 'exec gsp-reindex "$$@"' in script
    argv = _gsp_argv(["gsp-reindex"], indexer["command"], "ray indexer")
    _assert_gsp_accepts(argv, "docker-compose.ray.yml indexer")
    assert option_value(argv, "--engine") == "ray" and option_value(argv, "--address") == "auto"
    requirements = _docker_module("requirements").requirements
    pyproject = ROOT / "pyproject.toml"
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["ray"]
    assert requirements(pyproject, "cuda", "", "ray")[-len(extra) :] == extra
    assert not any("ray" in line for line in requirements(pyproject, "cuda", ""))
    with pytest.raises(SystemExit):
        requirements(pyproject, "cuda", "", "no-such-extra")


def option_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_the_replicas_compose_file_serves_publications_behind_the_load_balancer() -> None:
    path = ROOT / "docker-compose.replicas.yml"
    result = _check_compose(path)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(path.read_text())["services"]
    image_entrypoint = _exec_form(_final_stage(), "ENTRYPOINT")
    argv = {
        name: _gsp_argv(image_entrypoint, [_interpolate(str(w)) for w in s["command"]], name)
        for name, s in services.items()
        if name != "lb"
    }
    for name, words in argv.items():
        _assert_gsp_accepts(words, f"replicas compose service {name}")
    assert argv["publisher"][:2] == ["index", "publish"]
    published = argv["publisher"][-3]
    for name in ("replica-1", "replica-2"):
        assert "--read-only" in argv[name] and published in argv[name]
    nginx = (ROOT / "docker" / "loadbalancer" / "nginx.conf").read_text()
    assert "server replica-1:8000" in nginx and "server replica-2:8000" in nginx
