"""Hardening (issue 15): faults, full disks, bad files, limits and checkpoint shapes, each one clear answer.

Process faults run as real processes: an export SIGKILLed mid-write, two
exports to one target at once, an overwrite watched by another process. A full
disk is a real one — a 64 KiB tmpfs mounted for the test (root), else a child
whose RLIMIT_FSIZE is below the export's size; a read-only target is a tmpfs
mounted read-only. A test skips only where neither can be made. Every bad case
checks the three things a user sees: one ``steer: error:`` line, exit 2, no
traceback — and that nothing is left beside the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import steer
from steer.errors import SteerError
from steer.export.atomic import atomic_directory
from tests.conftest import D, save_tiny

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
SPEC = "project out direction {dirs}:u site writers"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama checkpoint and a direction file, in a world-readable directory (a child may drop root)."""
    root = Path(tempfile.mkdtemp(prefix="steer-hardening-"))
    os.chmod(root, 0o755)
    save_tiny("llama", root / "model")
    g = torch.Generator().manual_seed(3)
    save_file({"u": torch.randn(D, generator=g), "v": torch.randn(D, generator=g)}, str(root / "dirs.safetensors"))
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def export_argv(files: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "steer.cli.main", "export", SPEC.format(dirs=files / "dirs.safetensors"),
            "--model", str(files / "model"), "-o", str(out), *extra]


def start_slow_export(files: Path, out: Path, seconds: float) -> subprocess.Popen:
    """A child running `steer export` that pauses ``seconds`` once its first shard is written (returns by then)."""
    proc = subprocess.Popen([sys.executable, "-c", slow_export_script(files, out, seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    if proc.stdout.readline().strip() != "writing":
        proc.kill()
        raise AssertionError(proc.stderr.read())
    return proc


def slow_export_script(files: Path, out: Path, seconds: float) -> str:
    """The child's script: `steer export` with a pause after the first shard is written (printing "writing")."""
    argv = export_argv(files, out)[3:]
    return textwrap.dedent(f"""
        import sys, time, steer.export.merge as merge
        from steer.cli.main import main
        real = merge.write_file
        def slow(*a, **k):
            n = real(*a, **k)
            print("writing", flush=True)
            time.sleep({seconds})
            return n
        merge.write_file = slow
        sys.exit(main({argv!r}))
    """)


def assert_one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("steer: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@contextlib.contextmanager
def tmpfs(size: str, *options: str):
    """A fresh tmpfs of ``size`` mounted on a temp directory (yields it), or None where mounting is refused."""
    point = Path(tempfile.mkdtemp(prefix="steer-tmpfs-"))
    opts = ",".join((f"size={size}", "mode=0755", *options))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True).returncode == 0
    try:
        yield point if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(point)], capture_output=True)
        os.rmdir(point)


# -- item 3: exports under faults -----------------------------------------------------------------------------------

def test_sigkill_mid_export_leaves_a_partial_that_the_next_export_removes(files, tmp_path):
    out = tmp_path / "out"
    proc = start_slow_export(files, out, 60)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith(".out.partial-") for name in left), left  # what SIGKILL leaves: nobody could clean up
    result = subprocess.run(export_argv(files, out), capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "removed 1 leftover(s) of an interrupted write" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "steer_manifest.json").is_file()


def test_two_exports_to_one_target_at_once_one_wins_the_other_says_so(files, tmp_path):
    out = tmp_path / "out"
    first = start_slow_export(files, out, 8)
    try:
        second = subprocess.run(export_argv(files, out, "--overwrite"), capture_output=True, text=True, env=ENV,
                                timeout=300)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
    assert_one_line_error(second, str(out), f"(pid {first.pid}) is writing this output right now")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "steer_manifest.json").is_file()


def test_overwrite_never_leaves_the_target_missing(tmp_path):
    """A child replaces the target 300 times with --overwrite semantics while this process looks for it."""
    target = tmp_path / "out"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from steer.export.atomic import atomic_directory
        for i in range(300):
            with atomic_directory({str(target)!r}, overwrite=True) as tmp:
                (Path(tmp) / "marker").write_text(str(i))
            if i == 0:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "ready"
    looks = misses = 0
    while proc.poll() is None:
        looks += 1
        try:
            (target / "marker").read_text()
        except FileNotFoundError:
            misses += 1
    assert proc.returncode == 0
    assert looks > 100 and misses == 0, (looks, misses)
    assert (target / "marker").read_text() == "299"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_overwrite_keeps_the_old_directory(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("the export failed")
    assert sorted(os.listdir(target)) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_callers_own_lock_beside_the_target_does_not_block_the_write(tmp_path):
    """`steer.train.default` holds ``.NAME.lock`` while it trains the SAE it then saves with `atomic_directory`."""
    import fcntl

    with open(tmp_path / ".out.lock", "w") as outer:
        fcntl.flock(outer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_full_disk_gives_one_line_and_leaves_nothing(files, tmp_path):
    with tmpfs("64k") as disk:
        if disk is not None:
            out = disk / "out"
            result = subprocess.run(export_argv(files, out), capture_output=True, text=True, env=ENV, timeout=300)
            assert_one_line_error(result, str(out), "No space left on device", "nothing was written")
            assert os.listdir(disk) == []
            return
    limit = 48 * 1024  # no mount here: a child that may not write a file past 48 KiB (the export's shard is larger)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    result = subprocess.run(export_argv(files, out), capture_output=True, text=True, env=ENV, timeout=300,
                            preexec_fn=small_files)
    assert_one_line_error(result, str(out), "File too large", "nothing was written")
    assert os.listdir(tmp_path) == []


def test_read_only_and_permission_denied_targets_give_one_line(files, tmp_path):
    with tmpfs("1m", "ro") as disk:
        if disk is not None:
            result = subprocess.run(export_argv(files, disk / "out"), capture_output=True, text=True, env=ENV,
                                    timeout=300)
            assert_one_line_error(result, str(disk / "out"), "Read-only file system")
            assert os.listdir(disk) == []
    # a directory we may not write in: as root, a child without CAP_DAC_OVERRIDE (setpriv drops every capability)
    locked = Path(tempfile.mkdtemp(prefix="steer-locked-"))
    os.chmod(locked, 0o555)
    prefix = []
    if os.geteuid() == 0:
        if not Path("/usr/bin/setpriv").exists():
            pytest.skip("root without setpriv: cannot make a permission-denied directory")
        prefix = ["/usr/bin/setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    try:
        result = subprocess.run([*prefix, *export_argv(files, locked / "out")], capture_output=True, text=True,
                                env=ENV, timeout=300)
        assert_one_line_error(result, str(locked / "out"), "Permission denied")
        assert os.listdir(locked) == []
    finally:
        os.chmod(locked, 0o755)
        os.rmdir(locked)


def test_atomic_directory_turns_a_refusing_disk_into_a_steer_error(tmp_path):
    with tmpfs("16k") as disk:
        if disk is None:
            pytest.skip("mount refused")
        with pytest.raises(SteerError, match="No space left on device"):
            with atomic_directory(disk / "out") as tmp:
                (tmp / "big").write_bytes(b"x" * 65536)
        with pytest.raises(SteerError, match="No space left on device"):  # safetensors' own writer (Rust) too
            with atomic_directory(disk / "out") as tmp:
                save_file({"t": torch.zeros(65536)}, str(tmp / "t.safetensors"))
        assert os.listdir(disk) == []


# -- item 2: readers check what they read -----------------------------------------------------------------------------

def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from steer.cli.main import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("steer: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("tensor,index,value", [("W_dec", (3, 5), float("nan")), ("W_enc", (0, 0), float("inf"))])
def test_an_sae_with_one_nan_or_inf_is_refused_naming_file_and_tensor(files, tmp_path, capsys, tensor, index, value):
    import dataclasses

    from steer.sae import save_sae
    from tests.conftest import random_sae

    sae_dir = tmp_path / "sae"
    save_sae(dataclasses.replace(random_sae(), site="resid_post.1"), sae_dir)
    weights = sae_dir / "sae_weights.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    tensors[tensor][index] = value
    save_file(tensors, str(weights))
    code, out, err = run_cli(["generate", "--spec", "suppress feature 3 by 80%", "--model", str(files / "model"),
                              "--sae", str(sae_dir), "--max-new-tokens", "2", "Hello"], capsys)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert str(weights) in line and f"tensor {tensor!r} has 1 non-finite value(s)" in line, line


@pytest.mark.parametrize("values,needle", [
    (torch.zeros(D), "is all zeros"),
    (torch.full((D,), float("nan")), "non-finite"),
    (torch.ones(D, dtype=torch.float64) * 1e300, "too large for float32"),
    (torch.ones(D, dtype=torch.int32), "expected a float vector [32]"),
    (torch.ones(D + 1), "has shape (33,)"),
])
def test_a_bad_direction_is_refused_naming_file_and_key(files, tmp_path, capsys, values, needle):
    path = tmp_path / "bad.safetensors"
    save_file({"d": values}, str(path))
    code, out, err = run_cli(["compile", f"add direction {path}:d by 2 site resid_post.1", "--target", "pack",
                              "--model", str(files / "model"), "-o", str(tmp_path / "out")], capsys)
    assert code == 2
    line = one_error_line(err)
    assert needle in line and str(path) in line and "'d'" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


# -- item 1: no pickle runs -------------------------------------------------------------------------------------------

class _Payload:
    """A pickle that, if ever unpickled by a full Unpickler, creates the marker file (foreign code running)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, f)


def test_a_pickled_base_runs_no_code_and_cannot_be_exported(files, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil"
    shutil.copytree(files / "model", evil)
    (evil / "model.safetensors").unlink()
    _evil_pickle(evil / "pytorch_model.bin", marker)
    code, out, err = run_cli(["generate", "--spec", "add direction {}:v by 1 site resid_post.1".format(
        files / "dirs.safetensors"), "--model", str(evil), "--max-new-tokens", "2", "Hi"], capsys)
    assert code == 2 and "steer unpickles only plain tensors" in one_error_line(err)
    assert not marker.exists()

    plain = tmp_path / "plain"  # an honest .bin-only base: loads (weights_only), export says how to convert
    shutil.copytree(files / "model", plain)
    torch.save(AutoModelForCausalLM.from_pretrained(str(plain)).state_dict(), plain / "pytorch_model.bin")
    (plain / "model.safetensors").unlink()
    steer.load_model(str(plain))  # plain tensors: read with weights_only=True, so this loads
    code, out, err = run_cli(["export", SPEC.format(dirs=files / "dirs.safetensors"), "--model", str(plain),
                              "-o", str(tmp_path / "out")], capsys)
    line = one_error_line(err)
    assert code == 2 and "only pickled weights" in line and "Convert it once" in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_a_pickled_sae_is_refused_with_how_to_convert_and_runs_no_code(tmp_path, capsys, layout):
    marker = tmp_path / "code-ran"
    if layout == "file":
        target = tmp_path / "sae.pt"
        _evil_pickle(target, marker)
    else:
        target = tmp_path / "sae"
        target.mkdir()
        (target / "cfg.json").write_text('{"d_in": 32, "d_sae": 24}')
        _evil_pickle(target / "sae_weights.pt", marker)
    code, out, err = run_cli(["sae", "inspect", str(target)], capsys)
    line = one_error_line(err)
    assert code == 2 and "is a pickle (torch.save), which steer does not load" in line and "save_file" in line, line
    assert not marker.exists()


# -- item 4: limits with clear messages -------------------------------------------------------------------------------

def test_a_prompt_over_the_context_is_one_line_in_generate_and_eval(files, tmp_path, capsys):
    long = "word " * 500  # the tiny model's context is 2,048 tokens and its tokenizer reads characters
    code, out, err = run_cli(["generate", "--spec", SPEC.format(dirs=files / "dirs.safetensors"), "--model",
                              str(files / "model"), "--max-new-tokens", "4", "--no-chat", long], capsys)
    line = one_error_line(err)
    assert code == 2 and out == "" and "PROMPT: the prompt is 2,500 tokens" in line, line
    assert "over the model's context of 2,048 tokens" in line and "at most 2,044 tokens" in line, line
    suite = tmp_path / "long.yaml"
    suite.write_text(f"name: long\nscoring: {{rule: keyword_rate, keywords: [a], max_new_tokens: 4}}\n"
                     f"prompts: [\"short one\", {json.dumps(long)}]\n")
    code, out, err = run_cli(["eval", SPEC.format(dirs=files / "dirs.safetensors"), "--model", str(files / "model"),
                              "--suite", str(suite)], capsys)
    line = one_error_line(err)
    assert code == 2 and f"suite long ({suite}), prompt 2" in line and "over the model's context" in line, line


def test_unicode_and_crlf_specs_and_paths_work(files, tmp_path, capsys):
    import shutil

    odd = tmp_path / "répertoire ünï 東京"
    odd.mkdir()
    shutil.copy(files / "dirs.safetensors", odd / "dirs ✓.safetensors")
    save_file({"направление": torch.randn(D)}, str(odd / "dirs ✓.safetensors"))
    spec = odd / "spec ✓.yaml"
    spec.write_bytes(("edits:\r\n  - add: \"dirs ✓.safetensors:направление\"\r\n    strength: 2\r\n"
                      "    site: resid_post.1\r\n").encode())
    code, out, err = run_cli(["generate", "--spec", str(spec), "--model", str(files / "model"), "--max-new-tokens",
                              "2", "--no-chat", "Héllo ✓ 東京"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["compile", str(spec), "--target", "pack", "--model", str(files / "model"),
                              "-o", str(odd / "out ✓")], capsys)
    assert code == 0, err
    assert (odd / "out ✓" / "steer_manifest.json").is_file()


def test_a_spec_of_1000_edits_parses_compiles_and_runs_in_seconds(files, tmp_path):
    """No edit-count limit is needed: 1,000 edits cost well under a second to read and compile, and about 0.1 ms per
    edit per forward call in the hooks (the figures are printed with -s)."""
    import dataclasses

    import yaml

    from steer.spec import parse_spec
    from tests.conftest import random_sae, tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    sae = dataclasses.replace(random_sae(d_sae=1024), site="resid_post.1")
    kinds = [lambda i: {"scale": i, "factor": 0.2}, lambda i: {"clamp": i, "to": 1.0},
             lambda i: {"add": i, "strength": 0.5}, lambda i: {"project_out": f"{files / 'dirs.safetensors'}:u",
                                                                "fraction": 0.01, "site": "resid_post.2"}]
    spec_file = tmp_path / "many.yaml"
    spec_file.write_text(yaml.safe_dump({"edits": [kinds[i % 4](i) for i in range(1000)]}))
    started = time.perf_counter()
    spec = parse_spec(str(spec_file))
    parsed = time.perf_counter()
    plan = steer.compile(spec, model, sae, tokenizer=tokenizer)
    compiled = time.perf_counter()
    assert len(spec.edits) == 1000 and sum(len(sp.edits) for sp in plan.sites) == 1000
    ids = torch.randint(4, 90, (1, 64))

    def fastest(f, n=3):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():
        base = fastest(lambda: model(ids))
        with steer.applied(model, plan):
            hooked = fastest(lambda: model(ids))
    print(f"\n1,000 edits: parse {parsed - started:.2f} s, compile {compiled - parsed:.2f} s, forward of 64 tokens "
          f"{1e3 * base:.1f} ms unsteered vs {1e3 * hooked:.1f} ms hooked")
    assert parsed - started < 10 and compiled - parsed < 10 and hooked < 2.0


# -- item 5: sharded and 16-bit bases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,shard", [(torch.bfloat16, "40KB"), (torch.float16, None)])
def test_sharded_and_16_bit_bases_export_verify_and_reload_in_their_dtype(files, tmp_path, dtype, shard):
    from transformers import AutoModelForCausalLM

    from steer.export.checkpoint import export
    from steer.export.stream import read_index
    from steer.verify.artifact import verify_artifact
    from tests.conftest import tiny_model, tiny_tokenizer

    base = tmp_path / "base"
    tiny_model("llama").to(dtype).save_pretrained(str(base), **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(str(base))
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert (len(shards) > 1) == (shard is not None)
    model, tokenizer = steer.load_model(str(base))
    plan = steer.compile(SPEC.format(dirs=files / "dirs.safetensors") + "; add direction {}:v by 2 site resid_post.1"
                         .format(files / "dirs.safetensors"), model, tokenizer=tokenizer)
    out = tmp_path / "out"
    manifest = export(plan, model, tokenizer, "weights", out, base=str(base))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards

    touched = {t for e in manifest["edits"] for t in e["tensors"]}
    before = {k: v for s in shards for k, v in read_index(base / s)[0].items()}
    after = {k: v for s in shards for k, v in read_index(out / s)[0].items()}
    untouched = [k for k in before if k not in touched]
    assert untouched and set(before) <= set(after)
    for name, t in after.items():  # the base's dtype everywhere, new zero biases included
        assert t.torch_dtype == dtype, (name, t.dtype)
    for name in untouched:  # streamed: untouched tensors are the base's bytes
        assert b"".join(before[name].chunks()) == b"".join(after[name].chunks()), name

    verdict = verify_artifact(out)
    assert verdict.ok, verdict.lines
    assert manifest["rounding"]["stored_equals_rounded"] and manifest["rounding"]["fidelity_before_rounding"]
    assert any("before rounding" in line and line.startswith("ok") for line in verdict.lines), verdict.lines
    if dtype == torch.bfloat16:  # a file that is not the lowering rounded is caught, though rounding hides a lot
        from steer.export.merge import rounding_check
        from steer.lower.weights import load_merged
        from steer.lower.weights import lower_to_weights

        other = steer.compile(SPEC.format(dirs=files / "dirs.safetensors").replace("writers", "writers by 99%"),
                              model, tokenizer=tokenizer)
        check = rounding_check(load_merged(out), lower_to_weights(other, model.config.to_dict()), base, out)
        assert not check["stored_equals_rounded"] and check["mismatched"]

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert reloaded.dtype == dtype and reloaded.config.mlp_bias


def test_a_windows_style_direction_path_splits_on_the_last_colon(files, capsys):
    code, _, err = run_cli(["compile", r"add direction C:\dirs\v.safetensors:key by 2 site resid_post.1", "--target",
                            "pack", "--model", str(files / "model"), "-o", "/nonexistent/out"], capsys)
    line = one_error_line(err)
    assert code == 2 and r"direction file 'C:\\dirs\\v.safetensors' does not exist" in line, line


def test_training_state_round_trips_through_safetensors_and_json_without_pickle(tmp_path):
    from steer.data.state_file import load_state, save_state

    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"step": 7, "recipe": {"lr": 1e-3, "sites": ["a", "b"], "none": None}, "scale": float("inf"),
             "model": net.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "pair": (1, "x"), "bf16": torch.ones(3, dtype=torch.bfloat16)}
    save_state(tmp_path / "checkpoint.safetensors", state)
    back = load_state(tmp_path / "checkpoint.safetensors")
    assert back["step"] == 7 and back["recipe"] == state["recipe"] and back["scale"] == float("inf")
    assert back["pair"] == (1, "x") and back["bf16"].dtype == torch.bfloat16
    assert torch.equal(back["rng"], state["rng"])
    restored = torch.optim.Adam(net.parameters(), lr=1e-3)
    restored.load_state_dict(back["optimizer"])  # int keys and param groups come back as the optimizer wants them
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    marker = tmp_path / "code-ran"
    _evil_pickle(tmp_path / "evil.safetensors", marker)
    with pytest.raises(SteerError, match="cannot read evil.safetensors"):
        load_state(tmp_path / "evil.safetensors")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "evil.safetensors"]


def test_no_pickle_is_loaded_anywhere_in_steers_own_files():
    """Every way Python code can unpickle, searched in steer's sources: torch.load only with weights_only=True."""
    import re

    offenders = []
    for path in sorted((ROOT / "steer").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if (re.search(r"\b(pickle|cPickle|dill|joblib|marshal)\.loads?\(", code) or "allow_pickle=True" in code
                    or "weights_only=False" in code
                    or ("torch.load(" in code and "weights_only=True" not in code)):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
