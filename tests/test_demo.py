"""The Gradio demo (`steer.demo`): its engine on tiny models, and `steer demo` served for real.

Engine tests compare the streamed decoder with independent references: HF
``generate`` (steer.generate) for the texts, a full-sequence forward pass for
the per-step KL, the SAE's own encoder on hooked-out activations for the
monitor. The served tests start `steer demo` on the real default model and
talk to it with gradio_client, through Gradio's queue.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import steer
from conftest import random_sae, save_tiny, tiny_model, tiny_tokenizer
from demo_server import ROOT, free_port
from steer.demo.app import CONTROLS, edit_line
from steer.demo.engine import DemoEngine, Limits
from steer.errors import SpecError, SteerError
from steer.generate import Sampling, generate
from steer.spec import parse_dsl
from steer.spec.edit import Edit

PROMPT = "hello there, how are you?"


def tiny_engine(arch: str = "llama", limits: Limits = Limits(), model_name: str = "tiny", model=None, tokenizer=None):
    model = model if model is not None else tiny_model(arch)
    sae = random_sae(site="resid_post.1")
    return DemoEngine(model, tokenizer or tiny_tokenizer(), sae, model_name=model_name, limits=limits)


# -- the decoder against independent references -------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("edits", ["steer feature 3 by 3", "suppress feature 5 by 90% scope generation; clamp feature 7 to 20 when active scope generation"])
def test_streamed_texts_equal_hf_generate_with_and_without_the_plan(arch, edits):
    engine = tiny_engine(arch)
    sampling = Sampling(max_new_tokens=12)
    frame = engine.generate(PROMPT, edits, sampling)
    plan = steer.compile(edits, engine.model, engine.sae)
    assert frame.steered == generate(engine.model, engine.tokenizer, [PROMPT], plan, sampling)[0]
    assert frame.unsteered == generate(engine.model, engine.tokenizer, [PROMPT], None, sampling)[0]
    assert frame.steered != frame.unsteered


def test_frames_stream_one_token_per_step():
    engine = tiny_engine()
    frames = list(engine.stream(PROMPT, "steer feature 3 by 3", Sampling(max_new_tokens=6)))
    lengths = [len(f.steered_tokens) for f in frames]
    assert lengths == sorted(lengths) and lengths[0] == 1 and set(range(1, lengths[-1] + 1)) <= set(lengths)
    assert frames[-1].done and not any(f.done for f in frames[:-1])


def test_sampling_shares_the_seed_so_an_identity_edit_gives_identical_columns():
    engine = tiny_engine()
    frame = engine.generate(PROMPT, "steer feature 3 by 0", Sampling(max_new_tokens=16, temperature=1.5, top_p=0.9, seed=7))
    greedy = engine.generate(PROMPT, "", Sampling(max_new_tokens=16))
    assert frame.steered_tokens == frame.unsteered_tokens
    assert frame.unsteered_tokens != greedy.unsteered_tokens  # it did sample


def test_kl_per_step_is_kl_of_unsteered_vs_steered_given_the_steered_prefix():
    engine = tiny_engine()
    edit = "steer feature 3 by 3"
    frame = engine.generate(PROMPT, edit, Sampling(max_new_tokens=10))
    plan = steer.compile(edit, engine.model, engine.sae)
    prompt = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    P, steps = prompt.shape[1], len(frame.steered_tokens)
    ids = torch.cat([prompt, torch.tensor([frame.steered_tokens])], dim=1)
    with torch.no_grad():
        log_u = torch.log_softmax(engine.model(ids).logits[0].double(), -1)  # (T, V), one pass, no cache
        with steer.applied(engine.model, plan, prompt_length=P):
            log_s = torch.log_softmax(engine.model(ids).logits[0].double(), -1)
    expected = [float((log_u[t].exp() * (log_u[t] - log_s[t])).sum()) for t in range(P - 1, P - 1 + steps)]
    assert len(frame.kl) == steps
    assert frame.kl == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert max(frame.kl) > 1e-3


def test_monitor_colours_each_generated_token_by_the_features_sae_activation():
    engine = tiny_engine()
    frame = engine.generate(PROMPT, "", Sampling(max_new_tokens=10), monitor_feature=4)
    prompt = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, torch.tensor([frame.unsteered_tokens])], dim=1)
    seen = []
    handle = engine.model.model.layers[1].register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            engine.model(ids)
    finally:
        handle.remove()
    expected = engine.sae.encode(seen[0][0])[prompt.shape[1]:, 4]  # f_4 at each generated token's position
    n = len(frame.unsteered_tokens) - (frame.unsteered_tokens[-1] in engine.eos)
    assert len(frame.unsteered_activations) == n
    assert torch.tensor(frame.unsteered_activations) == pytest.approx(expected[:n], rel=1e-5, abs=1e-5)
    assert (expected[:n] > 0).any()
    assert frame.steered_activations == pytest.approx(frame.unsteered_activations, abs=1e-6)  # no edit: same stream


def test_concurrent_requests_get_the_outputs_they_get_alone():
    engine = tiny_engine()
    edits = [f"steer feature {i} by 12" for i in range(8)]
    sampling = Sampling(max_new_tokens=12)
    alone = [engine.generate(PROMPT, e, sampling, monitor_feature=0) for e in edits]
    barrier = threading.Barrier(len(edits))

    def ask(e):
        barrier.wait()
        return engine.generate(PROMPT, e, sampling, monitor_feature=0)

    with ThreadPoolExecutor(len(edits)) as pool:
        together = list(pool.map(ask, edits))
    assert len({f.steered_tokens for f in alone}) == len(edits)  # distinct, so a leaked hook would show
    assert together == alone


# -- edit lines, controls, bounds ----------------------------------------------------------------------

@pytest.mark.parametrize("operation, strength, scope, expected", [
    ("steer", -2.5, "all", Edit(op="add", feature=12, amount=-2.5, units="feature")),
    ("suppress", 80, "generation", Edit(op="scale", feature=12, amount=0.2, scope="generation")),
    ("ablate", 0, "prompt", Edit(op="scale", feature=12, amount=0.0, scope="prompt")),
    ("amplify", 3, "all", Edit(op="scale", feature=12, amount=3.0)),
    ("clamp", 1.5, "all", Edit(op="clamp", feature=12, amount=1.5, units="feature")),
    ("monitor", 0.5, "all", Edit(op="monitor", feature=12, amount=0.5)),
])
def test_controls_append_the_dsl_line_of_the_edit_they_name(operation, strength, scope, expected):
    assert set(CONTROLS) == {"steer", "suppress", "ablate", "amplify", "clamp", "monitor"}
    assert parse_dsl(edit_line(operation, 12, strength, scope)) == (expected,)


def test_controls_without_a_feature_say_so():
    with pytest.raises(SteerError, match="pick a feature"):
        edit_line("steer", None, 4)


def test_each_bad_line_is_marked_with_the_parsers_message_and_good_lines_ok():
    engine = tiny_engine()
    lines = ["steer feature 3 by 2", "supress feature 3", "", "suppress feature 3 by 150%", "# a comment", "ablate feature 4"]
    checks = engine.check_lines("\n".join(lines))
    expected = {}
    for number, line in enumerate(lines, 1):
        try:
            if parse_dsl(line):
                expected[number] = None
        except SpecError as exc:
            expected[number] = exc.message
    assert {c.line: c.error for c in checks} == expected
    assert expected[2] and expected[4]


def test_a_line_the_compiler_refuses_is_marked_with_the_compilers_message():
    engine = tiny_engine()
    with pytest.raises(SteerError) as refused:
        steer.compile("steer feature 999 by 2", engine.model, engine.sae)
    checks = engine.check_lines("steer feature 3 by 2\nsteer feature 999 by 2")
    assert [(c.line, c.error) for c in checks] == [(1, None), (2, refused.value.message)]


def test_generation_refuses_a_bad_line_naming_it():
    engine = tiny_engine()
    with pytest.raises(SpecError) as refused:
        engine.generate(PROMPT, "steer feature 3 by 2\nsteer feture 3", Sampling(max_new_tokens=4))
    assert refused.value.where == "edits line 2"


@pytest.mark.parametrize("limits, prompt, edits, sampling, monitor, where, words", [
    (Limits(max_prompt_chars=10), "x" * 11, "", Sampling(max_new_tokens=4), None, "prompt", "11 characters"),
    (Limits(max_prompt_tokens=8), "a" * 9, "", Sampling(max_new_tokens=4), None, "prompt", "tokens"),
    (Limits(), "   ", "", Sampling(max_new_tokens=4), None, "prompt", "empty"),
    (Limits(max_new_tokens=8), PROMPT, "", Sampling(max_new_tokens=9), None, "max new tokens", "at most 8"),
    (Limits(), PROMPT, "", Sampling(max_new_tokens=4, temperature=6.0), None, "temperature", "at most 5"),
    (Limits(max_edits=2), PROMPT, "ablate feature 1; ablate feature 2\nablate feature 3", Sampling(max_new_tokens=4), None, "edits", "3 edits"),
    (Limits(max_edit_chars=20), PROMPT, "ablate feature 1" + " " * 10, Sampling(max_new_tokens=4), None, "edits", "26 characters"),
    (Limits(), PROMPT, "", Sampling(max_new_tokens=4), 24, "monitor feature", "not in the SAE"),
])
def test_bounds_are_enforced_by_the_engine(limits, prompt, edits, sampling, monitor, where, words):
    engine = tiny_engine(limits=limits)
    with pytest.raises(SteerError) as refused:
        engine.generate(prompt, edits, sampling, monitor_feature=monitor)
    assert refused.value.where == where and words in refused.value.message


# -- export ----------------------------------------------------------------------------------------------

def test_export_zips_a_verified_weights_checkpoint_that_reproduces_the_hooks(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, base = save_tiny("llama", tmp_path / "base")
    engine = tiny_engine(model=model, tokenizer=tokenizer, model_name=base)
    result = engine.export("steer feature 3 by 2", "weights", tmp_path / "exports")
    assert result.ok and result.report.rstrip().endswith("verified")
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [result.archive.name]  # no temp files left
    with zipfile.ZipFile(result.archive) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "unzipped")
    assert {"verify_report.txt", "artifact/config.json", "artifact/model.safetensors", "artifact/steer_manifest.json"} <= names
    assert (tmp_path / "unzipped" / "verify_report.txt").read_text() == result.report
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "unzipped" / "artifact", dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    plan = steer.compile("steer feature 3 by 2", model, engine.sae)
    with torch.no_grad(), steer.applied(model, plan):
        hooked = model(ids).logits
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, hooked, atol=1e-5)
        assert not torch.allclose(model(ids).logits, hooked, atol=1e-3)


def test_export_refusal_is_one_message_and_leaves_nothing(tmp_path):
    model, tokenizer, base = save_tiny("llama", tmp_path / "base")
    engine = tiny_engine(model=model, tokenizer=tokenizer, model_name=base)
    with pytest.raises(SteerError) as refused:
        engine.export("suppress feature 3 by 80%", "weights", tmp_path / "exports")
    assert refused.value.where == "target weights" and "scale feature 3" in refused.value.message
    assert list((tmp_path / "exports").iterdir()) == []


# -- feature search ------------------------------------------------------------------------------------

def test_feature_search_reads_the_atlas_and_says_why_when_there_is_none(tmp_path):
    import html

    from steer.demo.search import FeatureSearch, card_html
    from steer.discover.atlas import build_atlas, open_atlas

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "the river {i} runs past seven quiet stones, north of the market."}}\n'
                              for i in range(30)))
    path = build_atlas(tiny_model("llama"), tiny_tokenizer(), random_sae(site="resid_post.1"), str(corpus), tokens=600,
                       out=tmp_path / "atlas.db", context_size=40, window=12, contexts=3, progress=False)
    search, atlas = FeatureSearch.open(path), open_atlas(path)
    assert search.find(" 5 ") == [atlas.feature(5)]  # an id
    assert search.find("r") == atlas.search("r", limit=20) and search.find("r")  # words
    card = atlas.feature(5)
    shown = card_html(card)
    assert "<b>feature 5</b>" in shown
    assert all(f"<code>{html.escape(t)}</code>" in shown for t, _ in card.promoted[:8])
    assert all(html.escape(t) in shown for t in card.contexts[0].tokens)
    with pytest.raises(SteerError, match="no feature atlas for this SAE"):
        FeatureSearch().find("river")


# -- `steer demo` ---------------------------------------------------------------------------------------

def steer_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steer.cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_steer_demo_help():
    result = steer_cli("demo", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--sae", "--host", "--port", "--concurrency", "--max-new-tokens"):
        assert flag in result.stdout


def test_steer_demo_on_a_taken_port_is_one_line_and_exit_2():
    import socket

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = steer_cli("demo", "--port", str(port), "--atlas", "none")
    assert result.returncode == 2
    assert result.stderr.strip() == f"steer: error: --port: cannot serve on 127.0.0.1:{port}: Address already in use"


def test_steer_demo_with_a_missing_atlas_is_one_line_and_exit_2(tmp_path):
    result = steer_cli("demo", "--port", str(free_port()), "--atlas", str(tmp_path / "missing.db"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"steer: error: atlas {tmp_path / 'missing.db'}: no such atlas file")
    assert len(result.stderr.strip().splitlines()) == 1


def sixteen_features() -> list[int]:
    """16 live features of the default SAE, evenly spread over its ids."""
    from steer.saes import load_sae

    live = [int(i) for i in (load_sae("default").feature_stats["p99"] > 0).nonzero()[:, 0]]
    return live[:: len(live) // 16][:16]


@pytest.mark.default_model
def test_sixteen_concurrent_clients_each_get_the_output_they_get_alone(demo_server):
    """16 gradio_client users at once through the server's queue (``--concurrency 16``: all interleave)."""
    from gradio_client import Client

    edits = [f"steer feature {f} by 6 units feature" for f in sixteen_features()]
    clients = [Client(demo_server, verbose=False) for _ in edits]

    def ask(client, edit, barrier=None):
        if barrier is not None:
            barrier.wait()
        out = client.submit("Tell me about your weekend.", edit, None, 6, 0, 1, 0, True, api_name="/generate").result()
        unsteered, steered, _, monitor_steered, _, kl, _, status = out
        assert "steer-error" not in status, status
        return unsteered, steered, monitor_steered, kl["data"]

    alone = [ask(client, edit) for client, edit in zip(clients, edits)]
    barrier = threading.Barrier(len(edits))
    with ThreadPoolExecutor(len(edits)) as pool:
        together = list(pool.map(ask, clients, edits, [barrier] * len(edits)))
    assert len({steered for _, steered, _, _ in alone}) >= 12  # (nearly) all different, so a leaked edit would show
    assert len({unsteered for unsteered, _, _, _ in alone}) == 1
    for edit, mine, reference in zip(edits, together, alone):
        assert same_output(mine, reference), edit


def same_output(mine, reference) -> bool:
    """Texts, tokens and labels exactly; numbers (per-token KL, monitor confidences) as float32 allows: interleaved
    requests share batches, and a CPU's matmul kernels may round a row differently in another batch (seen up to
    2e-4 relative on an AMX Xeon). A leaked edit moves them by orders of magnitude more, and changes the texts."""
    if isinstance(mine, float) or isinstance(reference, float):
        return isinstance(mine, (int, float)) and mine == pytest.approx(reference, rel=1e-3, abs=1e-5)
    if isinstance(mine, (list, tuple)):
        return (type(mine) is type(reference) and len(mine) == len(reference)
                and all(same_output(a, b) for a, b in zip(mine, reference)))
    if isinstance(mine, dict):
        return mine.keys() == reference.keys() and all(same_output(mine[k], reference[k]) for k in mine)
    return mine == reference


@pytest.mark.default_model
def test_server_enforces_the_bounds_whatever_the_client_sends(demo_server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(demo_server, verbose=False)
    with pytest.raises(AppError, match="greater than maximum value 16"):  # Gradio checks the slider (the engine too)
        client.predict("Hi", "", None, 10_000, 0, 1, 0, True, api_name="/generate")
    out = client.predict("x" * 3000, "", None, 4, 0, 1, 0, True, api_name="/generate")  # the engine's own check
    assert out[0] == out[1] == "" and "prompt: the prompt is 3000 characters; the demo takes at most 2000" in out[-1]
    out = client.predict("Hi", "", "abc", 4, 0, 1, 0, True, api_name="/generate")
    assert out[0] == out[1] == "" and "monitor feature: expected a feature id" in out[-1]


# -- the server under abuse (issue 15): tiny model, one slot, one waiting place -------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """`steer demo` on a tiny Llama: ``--concurrency 1 --max-waiting 1``, 1,500 new tokens allowed (a long stream to
    interrupt), its temp files under a directory of the test's own (TMPDIR)."""
    import dataclasses

    from demo_server import running_demo
    from steer.sae import save_sae

    root = tmp_path_factory.mktemp("tiny-demo")
    save_tiny("llama", root / "model")
    save_sae(dataclasses.replace(random_sae(), site="resid_post.1"), root / "sae")
    (root / "tmp").mkdir()
    with running_demo("--model", str(root / "model"), "--sae", str(root / "sae"), "--atlas", "none",
                      "--concurrency", "1", "--max-waiting", "1", "--max-new-tokens", "1500",
                      env={"TMPDIR": str(root / "tmp")}) as url:
        yield url, root


def test_server_answers_multi_megabyte_requests_with_one_message(tiny_server):
    from gradio_client import Client

    url, _ = tiny_server
    client = Client(url, verbose=False)
    out = client.predict("x" * 5_000_000, "", None, 4, 0, 1, 0, True, api_name="/generate")
    assert out[0] == out[1] == "" and "the prompt is 5000000 characters; the demo takes at most 2000" in out[-1]
    out = client.predict("Hi", "steer feature 1 by 2\n" * 200_000, None, 4, 0, 1, 0, True, api_name="/generate")
    assert out[0] == out[1] == "" and "the edit list is 4200000 characters; the demo takes at most 4000" in out[-1]


def test_more_clients_than_slots_are_told_the_queue_is_full_and_a_disconnect_frees_the_slot(tiny_server):
    """One running (a 1,500-token stream), one waiting, the third turned away; the running client then disconnects
    mid-stream and the waiting one is served at once."""
    import time

    from gradio_client import Client

    url, _ = tiny_server
    long, waiting, extra = (Client(url, verbose=False) for _ in range(3))
    running = long.submit("Tell me a long story", "", None, 1500, 0, 1, 0, True, api_name="/generate")
    deadline = time.monotonic() + 120
    while not running.outputs():  # streaming has begun
        assert time.monotonic() < deadline and not running.done(), "the long generation never started"
        time.sleep(0.05)
    queued = waiting.submit("Hi", "", None, 4, 0, 1, 0, True, api_name="/generate")
    time.sleep(1.0)
    with pytest.raises(Exception, match="(?i)queue is full"):
        extra.predict("Hi", "", None, 4, 0, 1, 0, True, api_name="/generate")
    assert not running.done(), "the long stream should still be running"
    running.cancel()  # the client goes away mid-stream
    long.close()
    started = time.monotonic()
    unsteered, steered, *_, status = queued.result(timeout=120)
    assert "steer-error" not in status and unsteered == steered != ""
    assert time.monotonic() - started < 60


def test_exports_are_reaped_and_the_server_hands_out_only_its_own_files(tiny_server):
    import urllib.request

    from demo_server import _NO_PROXY

    url, root = tiny_server
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    served = []
    for strength in range(1, 7):  # six exports in a row
        archive, report = client.predict(f"steer feature 3 by {strength}", "pack", api_name="/export")
        assert "verified" in report
        served.append(archive["url"])
    own = [p for p in (root / "tmp").iterdir() if p.name.startswith("steer-demo-")]
    assert len(own) == 1, own
    zips = sorted(p.name for p in own[0].rglob("*.zip"))
    assert len(zips) <= 5, zips  # the newest 4 downloads and the exporter's own latest copy

    def status(path: str) -> int:
        try:
            with _NO_PROXY.open(url.rstrip("/") + path, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(served[-1].split(url.rstrip("/"), 1)[-1]) == 200  # the newest export downloads
    assert status(served[0].split(url.rstrip("/"), 1)[-1]) in (403, 404)  # the oldest was reaped
    for path in ("/etc/passwd", str(root / "model" / "config.json"), str(root / "sae" / "cfg.json"),
                 str(ROOT / "pyproject.toml")):
        assert status(f"/gradio_api/file={path}") == 403, path
    assert status("/gradio_api/file=https://example.com/x") == 403
    assert status("/gradio_api/proxy=https://example.com/x") in (403, 404)


def test_a_stream_closed_mid_way_releases_the_model_and_leaves_no_hook():
    """What Gradio does when a client disconnects: it closes the generator. The lock is free and no hook stays."""
    engine = tiny_engine()
    frames = engine.stream(PROMPT, "steer feature 3 by 3", Sampling(max_new_tokens=32))
    next(frames), next(frames)
    frames.close()
    assert engine._lock.acquire(blocking=False)
    engine._lock.release()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in engine.model.modules())


def test_a_request_past_the_models_context_is_one_message():
    engine = tiny_engine("gpt2")  # n_positions 512: the demo's default bounds (512 + 128) can go past it
    with pytest.raises(SteerError, match="over the model's context of 512; ask for fewer new tokens"):
        next(engine.stream("a" * 480, "", Sampling(max_new_tokens=64), chat=False))
    next(engine.stream("a" * 400, "", Sampling(max_new_tokens=64), chat=False))  # inside it: runs


# -- several SAEs, one per site (issue 13, item 4) --------------------------------------------------------------------

TWO_SITES = ("resid_post.1", "resid_post.2")
TWO_SITE_EDITS = "steer feature 3 by 4\nsuppress feature 5 by 90% site resid_post.2\nsteer feature 7 by 10 site blocks.2.hook_resid_post"
"""Line 1 at the default site (the first SAE's), lines 2-3 at the second SAE's (canonical and SAELens names)."""
TWO_SITE_SPEC = ("steer feature 3 by 4 site resid_post.1; suppress feature 5 by 90% site resid_post.2; "
                 "steer feature 7 by 10 site resid_post.2")
"""The same edits as a spec that names every site, compiled directly."""


def two_saes():
    return [random_sae(site=TWO_SITES[0]), random_sae(site=TWO_SITES[1], seed=2)]


def two_site_engine(model=None, tokenizer=None, model_name: str = "tiny"):
    model = model if model is not None else tiny_model("llama")
    return DemoEngine(model, tokenizer or tiny_tokenizer(), two_saes(), model_name=model_name)


def test_a_two_site_edit_list_gives_exactly_the_hooked_reference():
    engine = two_site_engine()
    assert engine.sites == TWO_SITES and engine.site == TWO_SITES[0] and engine.sae is engine.saes[TWO_SITES[0]]
    sampling = Sampling(max_new_tokens=10)
    frame = engine.generate(PROMPT, TWO_SITE_EDITS, sampling)
    plan = steer.compile(TWO_SITE_SPEC, engine.model, list(engine.saes.values()))
    assert sorted(str(s.site) for s in plan.sites) == list(TWO_SITES)
    assert frame.steered == generate(engine.model, engine.tokenizer, [PROMPT], plan, sampling)[0]
    # the per-step KL against steer.applied of the directly compiled plan, one full pass each
    prompt = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    P, steps = prompt.shape[1], len(frame.steered_tokens)
    ids = torch.cat([prompt, torch.tensor([frame.steered_tokens])], dim=1)
    with torch.no_grad():
        log_u = torch.log_softmax(engine.model(ids).logits[0].double(), -1)
        with steer.applied(engine.model, plan, prompt_length=P):
            log_s = torch.log_softmax(engine.model(ids).logits[0].double(), -1)
    expected = [float((log_u[t].exp() * (log_u[t] - log_s[t])).sum()) for t in range(P - 1, P - 1 + steps)]
    assert frame.kl == pytest.approx(expected, rel=1e-4, abs=1e-6) and max(frame.kl) > 1e-3
    # both sites act: each site's lines alone steer otherwise
    first_only = engine.generate(PROMPT, TWO_SITE_EDITS.splitlines()[0], sampling)
    second_only = engine.generate(PROMPT, "\n".join(TWO_SITE_EDITS.splitlines()[1:]), sampling)
    assert len({frame.steered, first_only.steered, second_only.steered, frame.unsteered}) == 4


def test_the_monitor_reads_the_feature_of_the_sae_at_its_site_and_names_the_site():
    from steer.demo.app import monitor_choice, monitor_summary

    engine = two_site_engine()
    frame = engine.generate(PROMPT, "", Sampling(max_new_tokens=8), monitor_feature=4, monitor_site="blocks.2.hook_resid_post")
    assert frame.monitor_site == "resid_post.2"
    prompt = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, torch.tensor([frame.unsteered_tokens])], dim=1)
    seen = []
    handle = engine.model.model.layers[2].register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            engine.model(ids)
    finally:
        handle.remove()
    expected = engine.saes["resid_post.2"].encode(seen[0][0])[prompt.shape[1]:, 4]
    n = len(frame.unsteered_activations)
    assert n and torch.tensor(frame.unsteered_activations) == pytest.approx(expected[:n], rel=1e-4, abs=1e-4)
    assert monitor_summary(frame).startswith("Feature 4 — at resid_post.2 — unsteered: fires on")
    # the page's choice: `J site S`; `J` at the site of the first edit naming it, else the default; blank: the first
    assert monitor_choice(engine, "", "4 site blocks.2.hook_resid_post") == (4, "resid_post.2")
    assert monitor_choice(engine, TWO_SITE_EDITS, "5") == (5, "resid_post.2")
    assert monitor_choice(engine, TWO_SITE_EDITS, "11") == (11, "resid_post.1")
    assert monitor_choice(engine, "ablate feature 6 site resid_post.2\nablate feature 2", None) == (6, "resid_post.2")
    assert monitor_choice(engine, "", None) == (None, None)
    with pytest.raises(SteerError) as refused:
        engine.generate(PROMPT, "", Sampling(max_new_tokens=2), monitor_feature=4, monitor_site="resid_post.0")
    assert refused.value.where == "monitor site" and "resid_post.1, resid_post.2" in refused.value.message


@pytest.mark.parametrize("line, words", [
    ("ablate feature 4 site resid_post.0", ("feature edit at resid_post.0, but no SAE reads there; the demo's SAEs read at "
                                           "resid_post.1, resid_post.2")),
    ("ablate feature 4 site nowhere.1", "unknown site 'nowhere.1'"),
    ("ablate feature 4 site resid_post.9", "names layer 9, but the model has 3 layers"),
    ("steer feature 3 by 1 when feature 2 above 0 site mlp_out.1", "feature edit at mlp_out.1, but no SAE reads there"),
])
def test_an_unknown_site_is_one_message_naming_the_line(line, words):
    engine = two_site_engine()
    text = f"steer feature 3 by 2\n{line}\nsteer feature 3 by 1 site resid_post.2"
    checks = engine.check_lines(text)
    assert [c.line for c in checks] == [1, 2, 3]
    assert checks[0].error is None and checks[2].error is None and words in checks[1].error
    with pytest.raises(SpecError) as refused:
        engine.generate(PROMPT, text, Sampling(max_new_tokens=2))
    assert refused.value.where == "edits line 2" and words in refused.value.message
    assert str(refused.value).startswith("edits line 2: ") and "\n" not in str(refused.value)


def test_a_compiler_error_on_a_later_line_names_that_line():
    engine = two_site_engine()
    text = "steer feature 3 by 2\n\nsteer feature 30 by 2 site resid_post.2"
    with pytest.raises(SteerError) as refused:
        engine.generate(PROMPT, text, Sampling(max_new_tokens=2))
    assert refused.value.where == "edits line 3" and "out of range" in refused.value.message
    assert [(c.line, c.error) for c in engine.check_lines(text)] == [(1, None), (3, refused.value.message)]


def test_a_direction_edit_may_sit_at_a_site_without_an_sae(tmp_path):
    from safetensors.torch import save_file

    engine = two_site_engine()
    save_file({"d": torch.linspace(-1, 1, 32)}, tmp_path / "dirs.safetensors")
    text = f"steer feature 3 by 2\nadd direction {tmp_path / 'dirs.safetensors'}:d by 4 site mlp_out.0"
    assert all(c.error is None for c in engine.check_lines(text))
    frame = engine.generate(PROMPT, text, Sampling(max_new_tokens=6))
    plan = steer.compile(f"steer feature 3 by 2 site resid_post.1; add direction {tmp_path / 'dirs.safetensors'}:d by 4 "
                         f"site mlp_out.0", engine.model, list(engine.saes.values()))
    assert frame.steered == generate(engine.model, engine.tokenizer, [PROMPT], plan, Sampling(max_new_tokens=6))[0]


def test_the_engine_refuses_saes_it_cannot_serve():
    from steer.errors import SAEError

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    for saes, words in [
        ([random_sae(site="resid_post.1"), random_sae(site="blocks.1.hook_resid_post", seed=2)], "two SAEs read at site resid_post.1"),
        ([random_sae(site="resid_post.1"), random_sae()], "names no site"),
        ([random_sae(site="resid_post.7")], "names layer 7"),
        ([random_sae(d_in=16, site="resid_post.1")], "d_in is 16"),
    ]:
        with pytest.raises(SAEError, match=words):
            DemoEngine(model, tokenizer, saes, model_name="tiny")


def test_export_of_a_two_site_list_verifies_and_reproduces_the_hooks(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, base = save_tiny("llama", tmp_path / "base")
    engine = two_site_engine(model, tokenizer, base)
    text = "steer feature 3 by 2\nsteer feature 5 by -1.5 site resid_post.2"
    result = engine.export(text, "weights", tmp_path / "exports")
    assert result.ok and result.report.rstrip().endswith("verified"), result.report
    with zipfile.ZipFile(result.archive) as zf:
        zf.extractall(tmp_path / "unzipped")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "unzipped" / "artifact", dtype=torch.float32).eval()
    plan = steer.compile("steer feature 3 by 2 site resid_post.1; steer feature 5 by -1.5 site resid_post.2", model,
                         list(engine.saes.values()))
    assert sorted(str(s.site) for s in plan.sites) == list(TWO_SITES)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with steer.applied(model, plan):
            hooked = model(ids).logits
        assert torch.allclose(merged(ids).logits, hooked, atol=1e-5)
        with steer.applied(model, steer.compile("steer feature 3 by 2", model, engine.sae)):
            first_only = model(ids).logits
        assert not torch.allclose(first_only, hooked, atol=1e-3)  # the second site's edit is in the checkpoint too
    pack = engine.export(TWO_SITE_EDITS, "pack", tmp_path / "exports")  # any edit, both SAEs' rows
    assert pack.ok, pack.report


def test_controls_name_the_site_of_a_feature_not_at_the_default_site():
    assert edit_line("steer", 12, 2, "generation", "resid_post.2") == "steer feature 12 by +2 units feature scope generation site resid_post.2"
    assert parse_dsl(edit_line("ablate", 12, 0, "all", "resid_post.2")) == (Edit(op="scale", feature=12, amount=0.0, site="resid_post.2"),)
    assert edit_line("steer", 12, 2) == "steer feature 12 by +2 units feature"


def test_default_saes_are_every_shipped_site_default_first_or_the_one_default(monkeypatch):
    from steer.demo.engine import default_sae_names
    from steer.sae import shipped

    monkeypatch.setattr(shipped, "shipped_available", lambda: False)
    assert default_sae_names() == ["default"]
    manifest = {"default_site": "resid_post.10", "saes": {s: {"path": s} for s in
                                                          ("resid_post.3", "resid_post.7", "resid_post.10", "resid_post.16")}}
    monkeypatch.setattr(shipped, "shipped_available", lambda: True)
    monkeypatch.setattr(shipped, "shipped_manifest", lambda: manifest)
    assert default_sae_names() == ["default", "default:resid_post.3", "default:resid_post.7", "default:resid_post.16"]


def test_each_site_searches_the_atlas_of_its_own_sae(tmp_path):
    from steer.demo.search import FeatureSearch, match_atlases
    from steer.discover.atlas import build_atlas, open_atlas

    engine = two_site_engine()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "the river {i} runs past seven quiet stones, north of the market."}}\n'
                              for i in range(30)))
    paths = {site: build_atlas(engine.model, engine.tokenizer, sae, str(corpus), tokens=600, out=tmp_path / f"{site}.db",
                               context_size=40, window=12, contexts=3, progress=False)
             for site, sae in engine.saes.items()}
    searches = match_atlases(engine, [open_atlas(paths["resid_post.2"]), open_atlas(paths["resid_post.1"])])
    assert set(searches) == set(TWO_SITES)
    for site, search in searches.items():
        assert isinstance(search, FeatureSearch) and search.atlas.metadata["site"] == site
        assert search.find("5") == [open_atlas(paths[site]).feature(5)]
    assert searches["resid_post.1"].card(5).p99 != searches["resid_post.2"].card(5).p99  # each SAE's own statistics
    one = DemoEngine(engine.model, engine.tokenizer, [engine.saes["resid_post.1"]], model_name="tiny")
    with pytest.raises(SteerError, match="built for an SAE at resid_post.2 that the demo does not load"):
        match_atlases(one, [open_atlas(paths["resid_post.1"]), open_atlas(paths["resid_post.2"])])
    assert set(match_atlases(one, [open_atlas(paths["resid_post.2"])])) == {"resid_post.1"}  # one and one: as before


def test_default_atlases_other_than_the_default_sites_are_built_only_when_asked_for(tmp_path, monkeypatch):
    """`FeatureSearch.defaults`: ``default``'s atlas is built at once; another site's is only looked up in the cache
    until its site is searched, then built — one build at a time, on the demo's atlas thread."""
    from steer.demo import search as app  # the demo's atlas search and its background builds
    from steer.discover.atlas import build_atlas

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "the river runs past seven quiet stones, north of the market, again and again."}\n' * 20)
    path = build_atlas(tiny_model("llama"), tiny_tokenizer(), random_sae(site="resid_post.1"), str(corpus), tokens=300,
                       out=tmp_path / "atlas.db", context_size=40, window=12, contexts=3, progress=False)
    calls = []

    def fake(name, *, progress=True, build=True):
        calls.append((name, build))
        return path if build else None

    monkeypatch.setattr(app, "default_atlas_of", fake)
    searches = app.FeatureSearch.defaults({"resid_post.10": "default", "resid_post.3": "default:resid_post.3"})
    app._BACKGROUND.join()
    assert calls == [("default", True), ("default:resid_post.3", False)]
    assert searches["resid_post.10"].find("5")[0].id == 5
    with pytest.raises(SteerError, match="is being built"):
        searches["resid_post.3"].find("5")
    app._BACKGROUND.join()
    assert calls[2:] == [("default:resid_post.3", True)]
    assert searches["resid_post.3"].find("5")[0].id == 5
    searches["resid_post.3"].find("river")
    assert len(calls) == 3  # built once


@pytest.fixture(scope="module")
def two_site_server(tmp_path_factory):
    """`steer demo` on a tiny Llama with two SAEs (``--sae A --sae B``, at resid_post.1 and resid_post.2)."""
    from demo_server import running_demo
    from steer.sae import save_sae

    root = tmp_path_factory.mktemp("two-site-demo")
    save_tiny("llama", root / "model")
    for sae in two_saes():
        save_sae(sae, root / sae.site)
    (root / "tmp").mkdir()
    with running_demo("--model", str(root / "model"), "--sae", str(root / TWO_SITES[0]), "--sae", str(root / TWO_SITES[1]),
                      "--atlas", "none", "--max-new-tokens", "16", env={"TMPDIR": str(root / "tmp")}) as url:
        yield url, root


def test_the_served_demo_steers_at_two_sites_exactly_as_the_hooked_reference(two_site_server):
    from gradio_client import Client

    from steer.models import load_model
    from steer.saes import load_sae

    url, root = two_site_server
    client = Client(url, verbose=False)
    unsteered, steered, _, _, monitor_text, _, _, status = client.predict(
        PROMPT, TWO_SITE_EDITS, "5 site resid_post.2", 10, 0, 1, 0, True, api_name="/generate")
    assert "steer-error" not in status, status
    model, tokenizer = load_model(str(root / "model"))
    plan = steer.compile(TWO_SITE_SPEC, model, [load_sae(root / site) for site in TWO_SITES])
    sampling = Sampling(max_new_tokens=10)
    assert steered == generate(model, tokenizer, [PROMPT], plan, sampling)[0] != unsteered
    assert unsteered == generate(model, tokenizer, [PROMPT], None, sampling)[0]
    assert monitor_text.startswith("Feature 5 — at resid_post.2 — ")
    out = client.predict(PROMPT, "steer feature 3 by 2\nablate feature 4 site resid_post.0", None, 4, 0, 1, 0, True,
                         api_name="/generate")
    status = out[-1]
    import html

    assert out[0] == out[1] == "" and ("line 2: feature edit at resid_post.0, but no SAE reads there; the demo's SAEs read "
                                       "at resid_post.1, resid_post.2") in html.unescape(status)
    assert "line 1: ok" in status
    text, checks = client.predict("steer feature 3 by 2", "ablate", 6, 0, "all", "resid_post.2", api_name="/add_edit")
    assert text == "steer feature 3 by 2\nablate feature 6 site resid_post.2" and checks.count("steer-ok") == 2
    _, report = client.predict(TWO_SITE_EDITS, "pack", api_name="/export")
    assert report.rstrip().endswith("verified"), report
