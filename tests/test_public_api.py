"""What a newcomer touches first: the import paths, the CLI's help and version, setting validation."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from radixlm.runtime.server_args import ServerArgs


def test_engine_import_paths_are_sglangs_and_lazy():
    import radixlm
    import radixlm.runtime
    from radixlm.runtime import Engine
    from radixlm.runtime.engine import Engine as EngineClass

    assert Engine is EngineClass and radixlm.Engine is EngineClass


def test_importing_the_packages_does_not_load_torch():
    import subprocess

    code = "import sys, radixlm, radixlm.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_serve_help_documents_every_flag():
    from radixlm.runtime.server.launcher import make_parser

    text = make_parser().format_help()
    for f in dataclasses.fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert "{lpm,dfs-weight,fcfs,lof,random}" in text and "(default: 2048)" in text


def test_choices_are_checked_at_parse_time_and_in_python(capsys):
    from radixlm.runtime.server.launcher import make_parser

    with pytest.raises(SystemExit):
        make_parser().parse_args(["--model-path", "m", "--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="attention_backend"):
        ServerArgs(model_path="m", attention_backend="flash")
    with pytest.raises(ValueError, match="model_path"):
        ServerArgs()


def test_version(capsys):
    from radixlm.runtime.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    import radixlm

    assert capsys.readouterr().out.strip() == f"radixlm {radixlm.__version__}"


def test_every_source_package_is_installed_by_a_regular_install():
    """The editable install finds sub-packages by itself; a wheel ships only what pyproject lists."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = {pkg: Path(folder) for pkg, folder in cfg["package-dir"].items()}
    on_disk = set()
    for pkg, folder in folder_of.items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder)
            on_disk.add(".".join((pkg, *rel.parts)))
    assert on_disk <= set(cfg["packages"]), sorted(on_disk - set(cfg["packages"]))
