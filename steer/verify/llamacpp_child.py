"""llama.cpp in a process of its own: the only steer module that imports ``llama_cpp``.

`steer.verify.llamacpp.LlamaCppModel` starts ``python -m steer.verify.llamacpp_child``
and talks to it over its stdin/stdout, so a fatal signal inside llama.cpp (a
segfault in a CPU kernel, an abort) ends this process and never the caller
(a test runner, ``steer compile``, the demo server). The parent turns that
into one clear error.

**How the model is loaded.** Through llama.cpp's C API (``llama_cpp.llama_cpp``,
which mirrors ``llama.h``), not the high-level ``Llama`` class, because only the
C API reaches ``llama_model_params.use_extra_bufts``, which steer sets to false:
no weight repacking into "extra" buffer types. On CPUs with AMX (Intel Sapphire
Rapids and later) llama.cpp repacks Q4_1 weights into its AMX buffer type and
segfaulted on the first decode of the default model (llama-cpp-python 0.3.36
built from its sdist, which tunes ggml for the build machine's CPU); with
repacking off the same decode works. llama.cpp's ``--no-repack`` flag sets the
same switch. The C API names that changed across llama-cpp-python versions are
looked up with fallbacks (model/context constructors, KV-memory clearing, the
control-vector setter, vocabulary size, flash-attention switch); a version
whose params have no ``use_extra_bufts`` still runs, and says so in its
``repacking`` answer.

**Protocol.** Every message, both ways, is a 4-byte big-endian length, a JSON
header of that length and then ``header["nbytes"]`` raw bytes (0 if absent).
Requests: ``open`` (path, n_ctx, n_threads, f32_kv_cache) → model facts;
``cvec`` (layer_start, layer_end, float32 payload, or no payload to clear);
``logits`` (ids) → float32 ``(T, n_vocab)`` payload; ``close``. A failure that
llama.cpp reports is answered with ``{"error": message}``. The real stdout is
kept for the protocol; file descriptor 1 is pointed at stderr, so nothing
llama.cpp prints can corrupt a frame.

``STEER_LLAMACPP_FAULT=decode`` (for steer's own tests only) makes this process
die of SIGSEGV where it would call ``llama_decode``: the parent's handling of a
crashed llama.cpp is tested with a real fatal signal.

Never writes files.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import sys

import numpy as np


def read_message(stream) -> tuple[dict, bytes] | None:
    """One framed message from ``stream``, or None at a clean end of stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (length,) = struct.unpack(">I", head)
    header = json.loads(stream.read(length).decode())
    nbytes = int(header.get("nbytes", 0))
    payload = stream.read(nbytes) if nbytes else b""
    if len(payload) != nbytes:
        return None
    return header, payload


def write_message(stream, header: dict, payload: bytes = b"") -> None:
    data = json.dumps({**header, "nbytes": len(payload)}).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    if payload:
        stream.write(payload)
    stream.flush()


def _first(module, *names):
    """The first of ``names`` that this llama-cpp-python defines (its C API renames things between versions)."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise RuntimeError(f"this llama-cpp-python has none of {', '.join(names)}")


class Session:
    """One GGUF model and one context in llama.cpp, answering the protocol's requests."""

    def __init__(self, path: str, n_ctx: int, n_threads: int, f32_kv_cache: bool):
        import llama_cpp
        from llama_cpp import llama_cpp as C

        self.C = C
        self.version = getattr(llama_cpp, "__version__", "unknown")
        C.llama_backend_init()
        params = C.llama_model_default_params()
        params.n_gpu_layers = 0
        self.repacking = "off"
        if any(name == "use_extra_bufts" for name, _ in params._fields_):
            params.use_extra_bufts = False
        else:
            self.repacking = "not switchable in this llama-cpp-python"
        self.model = _first(C, "llama_model_load_from_file", "llama_load_model_from_file")(path.encode(), params)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path}")
        ctx_params = C.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_ctx
        ctx_params.n_ubatch = n_ctx
        ctx_params.n_threads = n_threads
        ctx_params.n_threads_batch = n_threads
        names = {name for name, _ in ctx_params._fields_}
        if "flash_attn_type" in names:
            ctx_params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        elif "flash_attn" in names:
            ctx_params.flash_attn = False
        if f32_kv_cache:
            ctx_params.type_k = C.GGML_TYPE_F32
            ctx_params.type_v = C.GGML_TYPE_F32
        self.ctx = _first(C, "llama_init_from_model", "llama_new_context_with_model")(self.model, ctx_params)
        if not self.ctx:
            raise ValueError(f"llama.cpp could not create a context for {path}")
        self.n_ctx = n_ctx
        self.n_layer = int(C.llama_model_n_layer(self.model))
        self.n_embd = int(_first(C, "llama_model_n_embd", "llama_n_embd")(self.model))
        if hasattr(C, "llama_vocab_n_tokens"):
            self.n_vocab = int(C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model)))
        else:
            self.n_vocab = int(C.llama_n_vocab(self.model))
        self.set_cvec = _first(C, "llama_set_adapter_cvec", "llama_apply_adapter_cvec")
        self.cvec_buffer = None

    def facts(self) -> dict:
        info = self.C.llama_print_system_info()
        return {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_vocab": self.n_vocab, "version": self.version,
                "repacking": self.repacking, "system_info": info.decode(errors="replace").strip() if info else ""}

    def control_vector(self, header: dict, payload: bytes) -> None:
        if not payload:
            self.cvec_buffer = None
            err = self.set_cvec(self.ctx, None, 0, self.n_embd, -1, -1)
        else:
            self.cvec_buffer = np.frombuffer(payload, dtype=np.float32).copy()  # kept alive while applied
            data = self.cvec_buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            err = self.set_cvec(self.ctx, data, self.cvec_buffer.size, self.n_embd,
                                int(header["layer_start"]), int(header["layer_end"]))
        if err:
            raise ValueError(f"llama.cpp refused the control vector (error {err})")

    def clear_memory(self) -> None:
        C = self.C
        if hasattr(C, "llama_memory_clear"):
            C.llama_memory_clear(C.llama_get_memory(self.ctx), True)
        else:
            _first(C, "llama_kv_self_clear", "llama_kv_cache_clear")(self.ctx)

    def logits(self, ids: list[int]) -> np.ndarray:
        C, T = self.C, len(ids)
        if not 0 < T <= self.n_ctx:
            raise ValueError(f"{T} tokens; llama.cpp's context here holds 1..{self.n_ctx}")
        self.clear_memory()  # a fresh sequence: drop the previous one's KV cache
        batch = C.llama_batch_init(T, 0, 1)
        try:
            for i, token in enumerate(ids):
                batch.token[i] = int(token)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = T
            if os.environ.get("STEER_LLAMACPP_FAULT") == "decode":
                os.kill(os.getpid(), signal.SIGSEGV)
            err = C.llama_decode(self.ctx, batch)
            if err != 0:
                raise ValueError(f"llama_decode failed with code {err} on {T} tokens")
            pointer = C.llama_get_logits(self.ctx)
            return np.ctypeslib.as_array(pointer, shape=(T, self.n_vocab)).astype(np.float32, copy=True)
        finally:
            C.llama_batch_free(batch)

    def close(self) -> None:
        self.C.llama_free(self.ctx)
        _first(self.C, "llama_model_free", "llama_free_model")(self.model)


def serve(inp, out) -> None:
    session = None
    while (message := read_message(inp)) is not None:
        header, payload = message
        op = header.get("op")
        try:
            if op == "open":
                session = Session(header["path"], int(header["n_ctx"]), int(header["n_threads"]),
                                  bool(header["f32_kv_cache"]))
                write_message(out, session.facts())
            elif op == "cvec":
                session.control_vector(header, payload)
                write_message(out, {})
            elif op == "logits":
                values = session.logits(header["ids"])
                write_message(out, {"shape": list(values.shape)}, values.tobytes())
            elif op == "close":
                break
            else:
                write_message(out, {"error": f"unknown request {op!r}"})
        except ImportError as exc:
            write_message(out, {"error": f"llama-cpp-python does not import ({exc}); `pip install llama-cpp-python`"})
        except (ValueError, RuntimeError) as exc:
            write_message(out, {"error": str(exc)})
    if session is not None:
        session.close()


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")  # the protocol's channel …
    os.dup2(2, 1)  # … and anything printed to stdout (llama.cpp's own logs) goes to stderr instead
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
