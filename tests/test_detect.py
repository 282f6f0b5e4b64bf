"""Tests for image auto-detection, Dockerfile naming and image-reference validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentkernel import detect
from agentkernel.detect import (
    DEFAULT_IMAGE,
    RUNTIMES,
    detect_from_command,
    detect_from_procfile,
    detect_from_project,
    detect_image,
    dockerfile_hash,
    dockerfile_image_name,
    find_dockerfile,
    resolve_run_image,
    validate_image_ref,
)
from agentkernel.errors import UsageError

# (row label, image, a command, a project file) for each of the 14 rows of upstream §5.1.
TABLE = [
    ("node", "node:22-alpine", "npm", "package.json"),
    ("rust", "rust:1.85-alpine", "cargo", "Cargo.toml"),
    ("go", "golang:1.23-alpine", "go", "go.mod"),
    ("python", "python:3.12-alpine", "python3", "pyproject.toml"),
    ("ruby", "ruby:3.3-alpine", "bundle", "app.gemspec"),
    ("java", "eclipse-temurin:21-alpine", "mvn", "pom.xml"),
    ("kotlin", "eclipse-temurin:21-alpine", None, "Main.kt"),
    ("dotnet", "mcr.microsoft.com/dotnet/sdk:8.0", "dotnet", "App.csproj"),
    ("c", "gcc:14-bookworm", "gcc", "CMakeLists.txt"),
    ("php", "php:8.3-alpine", "php", "index.php"),
    ("elixir", "elixir:1.16-alpine", "mix", "mix.exs"),
    ("shell", "alpine:3.20", "bash", "build.sh"),
    ("lua", "nickblah/lua:5.4-alpine", "luajit", ".luacheckrc"),
    ("terraform", "hashicorp/terraform:1.10", "terraform", "main.tf"),
]


def test_table_is_upstream_order() -> None:
    assert [r.label for r in RUNTIMES] == [row[0] for row in TABLE]
    assert [r.image for r in RUNTIMES] == [row[1] for row in TABLE]
    assert RUNTIMES[6].commands == ()  # Kotlin has no commands


@pytest.mark.parametrize(("label", "image", "command", "_file"), TABLE)
def test_detect_each_row_by_command(
    label: str, image: str, command: str | None, _file: str
) -> None:
    if command is None:
        # Kotlin has no commands of its own: kotlinc is not in the table, java is row 6.
        assert detect_from_command(["kotlinc"]) is None
        assert detect_from_command(["java", "-jar", "x.jar"]) == image
        return
    assert detect_from_command([command, "--version"]) == image


@pytest.mark.parametrize(("label", "image", "_command", "project_file"), TABLE)
def test_detect_each_row_by_project_file(
    tmp_path: Path, label: str, image: str, _command: str | None, project_file: str
) -> None:
    (tmp_path / project_file).write_text("x")
    assert detect_from_project(tmp_path) == image


def test_every_command_and_literal_file_of_the_table(tmp_path: Path) -> None:
    for runtime in RUNTIMES:
        for cmd in runtime.commands:
            # A command may only map to an earlier row's image if it is listed there too.
            assert detect_from_command([cmd]) == runtime.image, cmd
        for pattern in runtime.project_files:
            d = tmp_path / f"{runtime.label}-{abs(hash(pattern))}"
            d.mkdir()
            (d / (("x" + pattern[1:]) if pattern.startswith("*") else pattern)).write_text("")
            assert detect_from_project(d) == runtime.image, pattern


def test_command_uses_basename() -> None:
    assert detect_from_command(["/usr/bin/python3", "-c", "1"]) == "python:3.12-alpine"
    assert detect_from_command(["./node_modules/.bin/tsx"]) == "node:22-alpine"


def test_command_no_match() -> None:
    assert detect_from_command([]) is None
    assert detect_from_command([""]) is None
    assert detect_from_command(["gunicorn", "app"]) is None
    assert detect_from_command(["Python3"]) is None  # exact, case-sensitive
    assert detect_from_command(["python3.12"]) is None


def test_project_order_node_beats_python(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text("{}")
    (tmp_path / "pyproject.toml").write_text("")
    assert detect_from_project(tmp_path) == "node:22-alpine"


def test_project_order_python_beats_makefile(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("")
    (tmp_path / "requirements.txt").write_text("")
    assert detect_from_project(tmp_path) == "python:3.12-alpine"


def test_suffix_patterns(tmp_path: Path) -> None:
    (tmp_path / "util.h").write_text("")
    assert detect_from_project(tmp_path) == "gcc:14-bookworm"
    # Row order still wins over the position of the pattern inside a row.
    (tmp_path / "mylib.gemspec").write_text("")
    assert detect_from_project(tmp_path) == "ruby:3.3-alpine"


def test_suffix_pattern_is_not_recursive(tmp_path: Path) -> None:
    sub = tmp_path / "src"
    sub.mkdir()
    (sub / "main.c").write_text("")
    assert detect_from_project(tmp_path) is None


def test_suffix_matches_whole_name_end(tmp_path: Path) -> None:
    # "*.c" must not match "x.cs", but "*.sh" does match "x.zsh"-style suffixes like upstream.
    (tmp_path / "x.cs").write_text("")
    assert detect_from_project(tmp_path) is None
    (tmp_path / "deploy.bash.sh").write_text("")
    assert detect_from_project(tmp_path) == "alpine:3.20"


def test_project_empty_and_missing_dir(tmp_path: Path) -> None:
    assert detect_from_project(tmp_path) is None
    assert detect_from_project(tmp_path / "nope") is None


def test_procfile_examples_from_spec(tmp_path: Path) -> None:
    proc = tmp_path / "Procfile"
    proc.write_text("web: bundle exec rails s\n")
    assert detect_from_procfile(tmp_path) == "ruby:3.3-alpine"
    proc.write_text("web: python manage.py\n")
    assert detect_from_procfile(tmp_path) == "python:3.12-alpine"
    proc.write_text("web: gunicorn app\n")
    assert detect_from_procfile(tmp_path) is None


def test_procfile_skips_comments_blanks_and_empty_commands(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text(
        "# web: node x\n\n   \nrelease:\nnocolon line\nweb: gunicorn app\nworker: rake jobs:work\n"
    )
    # "release:" has no command; upstream gave up on the whole file there, we skip the line.
    assert detect_from_procfile(tmp_path) == "ruby:3.3-alpine"


def test_procfile_is_exact_match(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("web: /usr/bin/python3 app.py\n")
    assert detect_from_procfile(tmp_path) is None


def test_procfile_missing_or_binary(tmp_path: Path) -> None:
    assert detect_from_procfile(tmp_path) is None
    (tmp_path / "Procfile").write_bytes(b"\xff\xfe web: node\x00 x\n")
    assert detect_from_procfile(tmp_path) is None


def test_detect_image_order(tmp_path: Path) -> None:
    assert detect_image(["ls"], tmp_path) == DEFAULT_IMAGE
    assert detect_image(["cargo", "build"], tmp_path) == "rust:1.85-alpine"
    (tmp_path / "Procfile").write_text("web: node server.js\n")
    assert detect_image(["cargo", "build"], tmp_path) == "node:22-alpine"  # Procfile > command
    (tmp_path / "go.mod").write_text("")
    assert detect_image(["cargo", "build"], tmp_path) == "golang:1.23-alpine"  # project first


def test_resolve_run_image_order(tmp_path: Path) -> None:
    (tmp_path / "go.mod").write_text("")

    def run(argv: list[str], **kw: str | None) -> tuple[str, str]:
        args: dict[str, str | None] = {
            "cli_image": None,
            "config_image_from_flag": None,
            "project_config_image": None,
        }
        args.update(kw)
        return resolve_run_image(argv, tmp_path, **args)

    all_set = {
        "cli_image": "busybox:1.36",
        "config_image_from_flag": "debian:12",
        "project_config_image": "ubuntu:24.04",
    }
    assert run(["python3"], **all_set) == ("busybox:1.36", "--image")
    del all_set["cli_image"]
    assert run(["python3"], **all_set) == ("debian:12", "--config image")
    del all_set["config_image_from_flag"]
    # For `run` the command beats both the project config and the project files.
    assert run(["/usr/bin/python3", "x.py"], **all_set) == (
        "python:3.12-alpine",
        "detected from command 'python3'",
    )
    assert run(["ls"], **all_set) == ("ubuntu:24.04", "./agentkernel.toml image")
    assert run(["ls"]) == ("golang:1.23-alpine", "detected from project file go.mod")
    os.remove(tmp_path / "go.mod")
    (tmp_path / "Procfile").write_text("web: bundle exec puma\n")
    assert run(["ls"]) == ("ruby:3.3-alpine", "detected from Procfile command 'bundle'")
    os.remove(tmp_path / "Procfile")
    assert run(["ls"]) == (DEFAULT_IMAGE, "default image")
    assert run([]) == (DEFAULT_IMAGE, "default image")


def test_resolve_run_image_validates_explicit_images(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        resolve_run_image(
            ["ls"], tmp_path, cli_image="x; rm -rf /", config_image_from_flag=None,
            project_config_image=None,
        )  # fmt: skip


def test_find_dockerfile(tmp_path: Path) -> None:
    assert find_dockerfile(tmp_path) is None
    (tmp_path / "Dockerfile").mkdir()  # a directory is not a Dockerfile
    assert find_dockerfile(tmp_path) is None
    (tmp_path / "Dockerfile.prod").write_text("FROM alpine")
    assert find_dockerfile(tmp_path) == tmp_path / "Dockerfile.prod"
    (tmp_path / "Dockerfile.dev").write_text("FROM alpine")
    assert find_dockerfile(tmp_path) == tmp_path / "Dockerfile.dev"
    (tmp_path / "dockerfile").write_text("FROM alpine")
    assert find_dockerfile(tmp_path) == tmp_path / "dockerfile"


def test_dockerfile_names_order() -> None:
    assert detect.DOCKERFILE_NAMES == (
        "Dockerfile",
        "dockerfile",
        "Dockerfile.dev",
        "Dockerfile.development",
        "Dockerfile.prod",
        "Dockerfile.production",
    )


def _reference_hash(text: str) -> str:
    h = 0
    for b in text.encode():
        h = (h * 31 + b) % 2**64
    return format(h, "016x")[:12]


def test_dockerfile_hash() -> None:
    assert dockerfile_hash("") == "000000000000"  # zero-padded, like upstream {:016x}
    assert dockerfile_hash("A") == "000000000000"  # 0x41 fits in the last 4 hex digits
    text = "FROM alpine:3.20\nRUN apk add python3\n" * 50  # long enough to wrap
    assert dockerfile_hash(text) == _reference_hash(text)
    assert len(dockerfile_hash(text)) == 12
    assert dockerfile_hash(text) != dockerfile_hash(text + " ")


@pytest.mark.parametrize(
    ("dirname", "project"),
    [
        ("my-project", "agentkernel-my-project"),
        ("My Project", "agentkernel-my-project"),
        ("snake_case", "agentkernel-snake_case"),
        ("trailing_", "agentkernel-trailing"),
        ("_lead", "agentkernel-lead"),
        ("a___b", "agentkernel-a-b"),
        ("café", "agentkernel-caf"),
        ("...", "agentkernel-project"),
    ],
)
def test_dockerfile_image_name(dirname: str, project: str) -> None:
    name = dockerfile_image_name(Path("/src") / dirname, "FROM alpine\n")
    assert name == f"{project}:{dockerfile_hash('FROM alpine' + chr(10))}"
    assert validate_image_ref(name) == name


VALID_REFS = [
    "alpine",
    "alpine:3.20",
    "library/alpine:latest",
    "docker.io/library/alpine:3.20",
    "mcr.microsoft.com/dotnet/sdk:8.0",
    "localhost/foo",
    "localhost:5000/team/app:v1.2.3-rc_1",
    "registry.example.com:443/a/b/c",
    "my__app/x.y-z",
    "a---b",
    "Registry.Example.com/app",
    "[::1]:5000/app",
    "alpine@sha256:" + "a" * 64,
    "alpine:3.20@sha256:" + "0123456789abcdef" * 4,
    "nickblah/lua:5.4-alpine",
]


@pytest.mark.parametrize("ref", VALID_REFS)
def test_valid_image_refs(ref: str) -> None:
    assert validate_image_ref(ref) == ref


def test_table_images_are_valid() -> None:
    for runtime in RUNTIMES:
        validate_image_ref(runtime.image)


INVALID_REFS = [
    "",
    "Alpine",
    "alpine:",
    "alpine:-x",
    "alpine:.x",
    "alpine:" + "x" * 129,
    ":tag",
    "/alpine",
    "alpine/",
    "a//b",
    "a_-b",
    "a...b",
    "a___b",
    "_a",
    "a-",
    "alpine@sha256:abc",
    "alpine@sha256:" + "A" * 64,
    "alpine@md5:" + "a" * 32,
    "alpine latest",
    "alpine\n",
    "$(id)",
    "alpine;rm",
    "a|b",
    "bad_host.com/app",
    "-host.com/app",
    "host.com:port/app",
    "ålpine",
    "a" * 256,
]


@pytest.mark.parametrize("ref", INVALID_REFS)
def test_invalid_image_refs(ref: str) -> None:
    with pytest.raises(UsageError):
        validate_image_ref(ref)


def test_invalid_ref_message_is_one_line() -> None:
    with pytest.raises(UsageError) as info:
        validate_image_ref("evil\nline")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="lowercase"):
        validate_image_ref("library/Alpine")
