"""Fuzz every SAE reader and the direction-file reader: only steer's own errors, never another exception or a hang.

Valid files in each format (SAELens v6 and v5, Gemma Scope ``params.npz``,
sparsify, a direction file) are written with the formats' own libraries
(`tests.test_sae_formats`' writers), then hypothesis damages one file per case:
truncates it, flips bits, rewrites a tensor in another dtype or shape, puts a
NaN or an infinity in it, or replaces a config value by an arbitrary JSON
value. The reader must either return a valid object (e.g. a flip in a float's
low bits) or raise a `SteerError`; anything else — an exception of another type,
a NaN that slips through, or a case running over 10 s — fails. Derandomised, so
CI runs the same cases every time; the counts are printed (``-s``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from steer.errors import SteerError
from steer.plan.compile import read_direction
from steer.sae import SAE, load_sae
from tests.test_sae_formats import (
    D_IN, random_weights, sparsify_tensors, write_gemmascope, write_saelens_v5, write_saelens_v6, write_sparsify,
)

EXAMPLES = int(os.environ.get("STEER_FUZZ_EXAMPLES", "1000"))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)


def _make_valid(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """format → (the directory to read, the files in it to damage)."""
    v6 = write_saelens_v6(root / "v6", "jumprelu", random_weights(0, threshold=True),
                          sparsity=torch.full((48,), -2.0))
    v5 = write_saelens_v5(root / "v5", random_weights(1), activation="topk", kwargs={"k": 8})
    gemma = write_gemmascope(root / "gs", random_weights(2, threshold=True)).parent
    sparsify = write_sparsify(root / "sp", sparsify_tensors(3))
    directions = root / "dirs" / "dirs.safetensors"
    directions.parent.mkdir()
    save_file({"u": torch.randn(D_IN), "v": torch.randn(D_IN)}, str(directions))
    return {
        "saelens_v6": (v6, ["sae_weights.safetensors", "cfg.json", "sparsity.safetensors"]),
        "saelens_v5": (v5, ["sae_weights.safetensors", "cfg.json"]),
        "gemmascope": (gemma, ["params.npz"]),
        "sparsify": (sparsify, ["sae.safetensors", "cfg.json"]),
        "direction": (directions.parent, ["dirs.safetensors"]),
    }


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return _make_valid(tmp_path_factory.mktemp("valid"))


def read(fmt: str, where: Path):
    if fmt == "direction":
        return read_direction(where / "dirs.safetensors", "u", D_IN, "fuzz")
    return load_sae(where)


def _reader_path(fmt: str, copy: Path) -> Path:
    return copy / "params.npz" if fmt == "gemmascope" else copy


# -- damage -----------------------------------------------------------------------------------------------------------

def truncate(path: Path, data, draw_fraction) -> str:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * draw_fraction)])
    return "truncated"


def flip_bits(path: Path, data) -> str:
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))
    return "bit-flipped"


def _tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {n: z[n] for n in z.files}
    return {n: t.numpy() for n, t in load_file(str(path)).items()}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    if path.suffix == ".npz":
        path.unlink()
        np.savez(path, **arrays)
    else:
        save_file({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()}, str(path))


def retype(path: Path, data) -> str:
    arrays = _tensors(path)
    name = data.draw(st.sampled_from(sorted(arrays)))
    dtype = data.draw(st.sampled_from(["int32", "int64", "uint8", "bool", "float16", "float64", "int8"]))
    arrays[name] = arrays[name].astype(dtype)
    _save(path, arrays)
    return "wrong dtype"


def reshape(path: Path, data) -> str:
    arrays = _tensors(path)
    name = data.draw(st.sampled_from(sorted(arrays)))
    shape = tuple(data.draw(st.lists(st.integers(0, 50), min_size=0, max_size=3)))
    arrays[name] = np.zeros(shape, dtype=arrays[name].dtype) + 0.5
    _save(path, arrays)
    return "wrong shape"


def poison(path: Path, data) -> str:
    arrays = _tensors(path)
    name = data.draw(st.sampled_from(sorted(n for n, a in arrays.items() if a.size)))
    flat = arrays[name].reshape(-1).copy()
    with np.errstate(over="ignore"):  # 1e39 is an infinity in float32: that is the point
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e39]))
    arrays[name] = flat.reshape(arrays[name].shape)
    _save(path, arrays)
    return "NaN/Inf"


def zero(path: Path, data) -> str:
    arrays = _tensors(path)
    name = data.draw(st.sampled_from(sorted(arrays)))
    arrays[name] = np.zeros_like(arrays[name])
    _save(path, arrays)
    return "zeros"


def rewrite_config(path: Path, data) -> str:
    cfg = json.loads(path.read_text())
    keys = sorted(cfg) + [f"metadata.{k}" for k in sorted(cfg.get("metadata", {}))]
    key = data.draw(st.sampled_from(keys))
    value = data.draw(JSON_VALUES)
    if key.startswith("metadata."):
        cfg["metadata"][key.removeprefix("metadata.")] = value
    else:
        cfg[key] = value
    path.write_text(json.dumps(cfg))
    return "config value"


@contextmanager
def time_limit(seconds: int):
    def fail(*_):
        raise TimeoutError(f"a reader ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_readers_answer_every_damaged_file_with_a_steer_error_or_a_valid_result(valid):
    tried: Counter = Counter()
    outcomes: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize="STEER_FUZZ_EXAMPLES" not in os.environ, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(fmt=st.sampled_from(sorted(valid)), data=st.data())
    def one(fmt, data):
        source, damageable = valid[fmt]
        name = data.draw(st.sampled_from(damageable))
        with tempfile.TemporaryDirectory(prefix="steer-fuzz-") as tmp:
            copy = Path(tmp) / source.name
            shutil.copytree(source, copy)
            path = copy / name
            if name.endswith(".json"):
                how = data.draw(st.sampled_from(["truncate", "flip", "value"]))
                kind = {"truncate": lambda: truncate(path, data, data.draw(st.floats(0, 0.99))),
                        "flip": lambda: flip_bits(path, data), "value": lambda: rewrite_config(path, data)}[how]()
            else:
                how = data.draw(st.sampled_from(["truncate", "flip", "retype", "reshape", "poison", "zero"]))
                kind = {"truncate": lambda: truncate(path, data, data.draw(st.floats(0, 0.99))),
                        "flip": lambda: flip_bits(path, data), "retype": lambda: retype(path, data),
                        "reshape": lambda: reshape(path, data), "poison": lambda: poison(path, data),
                        "zero": lambda: zero(path, data)}[how]()
            tried[f"{fmt} {kind}"] += 1
            with time_limit(10):
                try:
                    result = read(fmt, _reader_path(fmt, copy))
                except SteerError as exc:
                    assert str(exc).strip() and "\n" not in str(exc).strip(), repr(exc)
                    outcomes["SteerError"] += 1
                    return
            outcomes["read"] += 1
            if isinstance(result, SAE):  # what a reader accepts is usable: finite numbers of one float dtype
                for t in (result.W_enc, result.W_dec, result.b_enc, result.b_dec, result.threshold):
                    assert t is None or bool(torch.isfinite(t).all())
            else:
                assert result.shape == (D_IN,) and bool(torch.isfinite(result).all()) and float(result.norm()) > 0

    one()
    print(f"\nfuzzed {sum(tried.values())} damaged files: {dict(sorted(outcomes.items()))}")
    for case, n in sorted(tried.items()):
        print(f"  {case}: {n}")
    assert outcomes["SteerError"] > EXAMPLES // 2
