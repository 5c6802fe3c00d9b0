"""Bad input through the real `steer` CLI: one line, exit 2, no traceback, nothing written.

Every user mistake must print exactly one line ``steer: error: …`` on stderr
that names the problem and the field (and the file and line where there is
one), exit with code 2, show no traceback and write nothing. The cases run on a
tiny random Llama saved as a Hugging Face directory with an offline-built
tokenizer, and an SAE saved by `steer.sae.save_sae` at resid_post.1. Most run
in-process through `steer.cli.main.main`; a few run as real processes, to
prove the exit status and the absence of a traceback for real.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from steer.cli.main import main
from steer.sae import save_sae
from tests.conftest import D, random_sae, save_tiny

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tell me a story"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The files every case reads, made once: model, SAEs, direction file, spec files."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny("llama", root / "model")
    save_sae(dataclasses.replace(random_sae(), site="resid_post.1"), root / "sae")
    save_sae(dataclasses.replace(random_sae(d_in=D // 2), site="resid_post.1"), root / "sae16")
    g = torch.Generator().manual_seed(3)
    save_file({"v": torch.randn(D, generator=g), "w": torch.randn(D // 2, generator=g)}, str(root / "dirs.safetensors"))
    (root / "bad.yaml").write_text("edits:\n  - scale: 1\n\tfactor: 0.5\n")  # a tab: malformed YAML on line 3
    (root / "negative.yaml").write_text("sae: sae\nedits:\n  - scale: 1\n    factor: -2\n")
    (root / "good.yaml").write_text("sae: sae\nedits:\n  - suppress: 1\n    by: 80%\n  - monitor: 4\n")
    # valid specs whose second edit fails only when compiled: the error names the line it was written on
    (root / "far.yaml").write_text("sae: sae\nedits:\n  - monitor: 4\n\n  - scale: 24   # d_sae is 24\n    factor: 0.5\n")
    (root / "wide.yaml").write_text("edits:\n  - monitor: 4\n  - project_out: dirs.safetensors:w\n")
    (root / "nosite.yaml").write_text("edits:\n  - monitor: 4\n  - add: dirs.safetensors:v\n    strength: 1\n"
                                      "    site: resid_post.99\n")
    (root / "far.steer").write_text("# two edits\nmonitor feature 4\n\nscale feature 3 by 0 when feature 99 above 0\n")
    (root / "corrupt_sae").mkdir()
    (root / "corrupt_sae" / "cfg.json").write_text('{"d_in": 32, ')
    (root / "corrupt_sae" / "sae_weights.safetensors").write_bytes((root / "sae" / "sae_weights.safetensors").read_bytes())
    (root / "junk.gguf").write_text("not a GGUF file\n")
    (root / "cache").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEER_CACHE", str(root / "cache"))  # a model that slipped into the cache would show here
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield SimpleNamespace(root=root, model=str(root / "model"), sae=str(root / "sae"))


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, words: tuple[str, ...]) -> None:
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n") and "\r" not in err, f"not one line on stderr:\n{err}"
    assert lines[0].startswith("steer: error: ") and lines[0] != "steer: error: ", lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    assert out == "", f"wrote to stdout: {out!r}"


def generate_args(env, spec: str, *extra: str, model: str | None = None, sae: str | None = None) -> list[str]:
    return ["generate", "--model", model or env.model, "--sae", sae or env.sae, "--spec", spec,
            "--max-new-tokens", "2", *extra, PROMPT]


# case → (argv from env, words the one line must hold)
CASES = {
    "feature_id_out_of_range": (
        lambda e: generate_args(e, "scale feature 24 by 0.5"),
        ("edits[0]", "feature 24", "out of range", "d_sae=24")),
    "when_feature_out_of_range": (
        lambda e: generate_args(e, "scale feature 3 by 0 when feature 99 above 0"),
        ("edits[0]", "when.feature 99", "d_sae=24")),
    "sae_d_in_differs_from_hidden_size": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", sae=f"{e.root}/sae16"),
        ("sae16", "d_in is 16", "hidden size is 32")),
    "site_layer_out_of_range": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", "--site", "resid_post.99"),
        ("site", "resid_post.99", "3 layers")),
    "site_unknown": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", "--site", "bogus.3"),
        ("unknown site", "bogus.3", "resid_post.L")),
    "spec_yaml_malformed": (
        lambda e: generate_args(e, f"{e.root}/bad.yaml"),
        ("bad.yaml:3", "malformed YAML")),
    "spec_yaml_negative_factor": (
        lambda e: generate_args(e, f"{e.root}/negative.yaml"),
        ("negative.yaml:4", "edits[0].factor", "≥ 0", "-2")),
    "spec_dsl_negative_factor": (
        lambda e: generate_args(e, "scale feature 1 by -2"),
        ("line 1", "`factor`", "≥ 0", "-2")),
    "spec_dsl_unknown_operation": (
        lambda e: generate_args(e, "frobnicate feature 3"),
        ("line 1", "frobnicate", "scale", "suppress")),
    "spec_file_missing": (
        lambda e: generate_args(e, "nope.yaml"),
        ("nope.yaml", "no such spec file")),
    "sae_dir_missing": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", sae=f"{e.root}/no-sae"),
        ("/no-sae", "no such SAE file or directory")),
    "model_dir_missing": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", model=f"{e.root}/no-model"),
        ("model", "no such model file or directory", "no-model")),
    "model_not_a_checkpoint": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", model=f"{e.root}/sae"),
        ("model", "without config.json")),
    "model_file_not_gguf": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", model=f"{e.root}/dirs.safetensors"),
        ("model", "not a .gguf model")),
    "model_gguf_corrupt": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", model=f"{e.root}/junk.gguf"),
        ("model", "junk.gguf", "not a GGUF file")),
    "direction_file_missing": (
        lambda e: generate_args(e, f"add direction {e.root}/nope.safetensors:v by 1"),
        ("edits[0]", "direction file", "nope.safetensors", "does not exist")),
    "direction_key_missing": (
        lambda e: generate_args(e, f"add direction {e.root}/dirs.safetensors:x by 1"),
        ("edits[0]", "no tensor 'x'", "it has: v, w")),
    "direction_wrong_size": (
        lambda e: generate_args(e, f"project out direction {e.root}/dirs.safetensors:w"),
        ("edits[0]", "direction 'w'", "(16,)", "[32]")),
    "direction_not_safetensors": (
        lambda e: generate_args(e, f"add direction {e.root}/bad.yaml:v by 1"),
        ("edits[0]", "cannot read direction file", "bad.yaml")),
    "compile_error_names_yaml_line": (
        lambda e: generate_args(e, f"{e.root}/far.yaml"),
        ("far.yaml:5: edits[1] (scale feature 24)", "out of range", "d_sae=24")),
    "compile_error_names_yaml_line_of_direction": (
        lambda e: generate_args(e, f"{e.root}/wide.yaml"),
        ("wide.yaml:3: edits[1] (project_out direction dirs.safetensors:w)", "(16,)", "[32]")),
    "compile_error_names_yaml_line_of_site": (
        lambda e: generate_args(e, f"{e.root}/nosite.yaml"),
        ("nosite.yaml:3: edits[1]", "resid_post.99", "3 layers")),
    "compile_error_names_dsl_file_line": (
        lambda e: generate_args(e, f"{e.root}/far.steer"),
        ("far.steer:4: edits[1] (scale feature 3)", "when.feature 99", "d_sae=24")),
    "compile_error_names_dsl_text_line": (
        lambda e: generate_args(e, "monitor feature 4\nscale feature 24 by 0.5"),
        ("line 2: edits[1] (scale feature 24)", "out of range")),
    "max_new_tokens_zero": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", "--max-new-tokens", "0"),
        ("--max-new-tokens", "1..4096", "got 0")),
    "temperature_negative": (
        lambda e: generate_args(e, "scale feature 1 by 0.5", "--temperature", "-1"),
        ("--temperature", "≥ 0")),
    "sae_inspect_missing_path": (
        lambda e: ["sae", "inspect", f"{e.root}/no-sae"],
        ("/no-sae", "no such SAE file or directory")),
    "sae_inspect_corrupt_cfg": (
        lambda e: ["sae", "inspect", f"{e.root}/corrupt_sae"],
        ("corrupt_sae/cfg.json", "not valid JSON")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_line_and_exit_2(case, env, capsys):
    make_argv, words = CASES[case]
    before = files_under(env.root)
    code, out, err = cli(capsys, *make_argv(env))
    assert_user_error(code, out, err, words)
    assert files_under(env.root) == before, "an error wrote or touched files"


def run_steer(env, *argv: str, console_script: bool = False) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("steer")
    command = [str(script)] if console_script else [sys.executable, "-m", "steer.cli.main"]
    process_env = {**os.environ, "HF_HUB_OFFLINE": "1", "STEER_CACHE": str(env.root / "cache"),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([*command, *argv], capture_output=True, text=True, cwd=env.root, env=process_env, timeout=300)


@pytest.mark.parametrize("case", ["feature_id_out_of_range", "spec_yaml_malformed", "model_gguf_corrupt",
                                  "compile_error_names_yaml_line"])
def test_user_mistake_in_a_real_process(case, env):
    make_argv, words = CASES[case]
    before = files_under(env.root)
    result = run_steer(env, *make_argv(env))
    assert_user_error(result.returncode, result.stdout, result.stderr, words)
    assert files_under(env.root) == before


# -- positive controls ------------------------------------------------------------

def test_valid_spec_generates(env, capsys):
    code, out, err = cli(capsys, *generate_args(env, "suppress feature 1 by 80%; monitor feature 4"))
    assert code == 0, err
    assert out.strip() and err == ""


def test_valid_yaml_spec_with_relative_sae_and_compare_json(env, capsys, monkeypatch):
    monkeypatch.chdir(env.root.parent)  # `sae: sae` resolves against the spec file's directory, not the cwd
    code, out, err = cli(capsys, "generate", "--model", env.model, "--spec", str(env.root / "good.yaml"),
                         "--compare", "--json", "--max-new-tokens", "3", PROMPT)
    assert code == 0, err
    result = json.loads(out)
    assert result["steered"].strip() and result["unsteered"].strip()
    assert "resid_post.1" in result["plan"]


def test_valid_spec_in_a_real_process_via_the_console_script(env):
    if not Path(sys.executable).with_name("steer").is_file():
        pytest.skip("the `steer` console script is not installed beside this interpreter")
    result = run_steer(env, *generate_args(env, "scale feature 1 by 0.5"), console_script=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [[], ["generate"], ["sae"], ["sae", "inspect"]], ids=lambda a: " ".join(["steer", *a]))
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['steer', *argv])}")
    if argv == ["generate"]:
        assert "--spec" in out and "--max-new-tokens" in out and "PROMPT" in out
    if argv == ["sae", "inspect"]:
        assert "PATH" in out


def test_a_multi_line_message_is_printed_on_one_line(monkeypatch, capsys):
    from steer.cli import generate
    from steer.errors import ModelError

    def fails(args):
        raise ModelError("cannot load x: first line\n\n  second line\n", where="model")

    monkeypatch.setattr(generate, "run", fails)
    code, out, err = cli(capsys, "generate", "--spec", "ablate feature 1", PROMPT)
    assert_user_error(code, out, err, ())
    assert err == "steer: error: model: cannot load x: first line second line\n"


def test_a_bug_in_steer_still_raises(monkeypatch):
    """Only user mistakes become one-line errors: a bug keeps its traceback."""
    from steer.cli import generate

    def crashes(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(generate, "run", crashes)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--spec", "ablate feature 1", PROMPT])


def _command_paths(parser, path=()):
    """Every command path of the parser: (), ("generate",), ("sae",), ("sae", "inspect"), …"""
    import argparse

    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*path, name))


def test_help_works_for_every_command(capsys):
    """Help text is %-formatted by argparse: a bare % in any help string breaks --help."""
    from steer.cli.main import build_parser

    paths = list(_command_paths(build_parser()))
    assert {(), ("generate",), ("sae",), ("sae", "inspect")} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as info:
            main([*path, "--help"])
        assert info.value.code == 0, path
        assert capsys.readouterr().out.startswith(f"usage: {' '.join(['steer', *path])}")
