"""README examples run as tests (after onnx-graphsurgeon's and Polygraphy's test_examples)."""

import os
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxslim_kit.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands():
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("onnxslim-kit "):
                    cmds.append(part)
    return cmds


@pytest.fixture
def in_checkout_copy(tmp_path, monkeypatch):
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_first_two_commands_are_install_and_run():
    first, second = [b.strip() for b in _blocks("bash")[:2]]
    assert first.startswith("pip install -e . && onnxslim-kit optimize models/")
    assert second == 'pip install -e ".[test]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "pytest" in ci


@pytest.mark.slow
def test_readme_cli_examples_run(in_checkout_copy):
    commands = _commands()
    assert len(commands) >= 5
    for cmd in commands:
        args = shlex.split(cmd)[1:]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, f"{cmd}\n{result.output}"
    assert (in_checkout_copy / "bert_tiny.slim.onnx").exists()
    assert (in_checkout_copy / "bert_tiny.report.json").exists()
    assert (in_checkout_copy / "bert_int4.onnx").exists()
    # the search example: its recipe replays to the same bytes; the analysis JSON has its evaluations
    auto = (in_checkout_copy / "bert_auto.onnx").read_bytes()
    assert auto == (in_checkout_copy / "bert_replay.onnx").read_bytes()
    import json
    analysis = json.loads((in_checkout_copy / "digits_analysis.json").read_text())
    assert {e["technique"] for e in analysis["evaluations"]} == {"quantize-int8", "prune-channels:ratio=0.5"}


@pytest.mark.slow
def test_readme_python_example_runs(in_checkout_copy):
    (code,) = _blocks("python")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["report"].parity.ok and namespace["parity"].ok
    assert os.path.exists("mobilenetv2_fp16.onnx")
    assert namespace["stats"].op_histogram.get("Cast", 0) >= 2


def test_readme_recipe_example_parses(tmp_path):
    from onnxslim_kit.pipeline import Pipeline

    toml = _blocks("toml")[0]
    path = tmp_path / "r.toml"
    path.write_text(toml)
    pipe = Pipeline.from_recipe(path)
    assert [p.name for p in pipe.passes] == ["cleanup", "quantize-weights"]
    assert pipe.passes[1].bits == 4 and pipe.passes[0].cse is False


def test_readme_lists_every_registered_pass():
    from onnxslim_kit.registry import available_passes

    for name in available_passes():
        if not name.startswith("test-"):
            assert f"`{name}`" in README, name
