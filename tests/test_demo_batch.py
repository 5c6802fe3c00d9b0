"""The demo's shared decoding (`steer.demo.batch`): concurrent users are rows of one forward call per step, and
each user gets bit for bit what the same request gets alone.

Each test runs every request alone first (one at a time: the scheduler's batch holds that request's rows only),
then all of them at once — together at a barrier, or joining while others are mid-way — and compares every
streamed frame exactly (`Frame` equality: token ids, texts, KL floats, monitor floats). Requests differ in prompt
(length), edits (sites, scope, ``when``), sampling (greedy; temperature and top-p with their own seeds), length,
and monitored feature and site, so a row that saw another row's plan, cache, position or generator would show.
A wrapper on `decode_rows` records how many rows each decode call carried, so the tests also prove the requests
were batched.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import random_sae, tiny_model, tiny_tokenizer

from steer.demo import batch
from steer.demo.engine import DemoEngine
from steer.generate import Sampling

PROMPT = "hello there, how are you?"

USERS = [  # (prompt, edit list, sampling, monitored feature, its site)
    (PROMPT, "steer feature 3 by 12", Sampling(max_new_tokens=12), 0, None),
    ("tell me a long story about the river and the stones, please",
     ("suppress feature 5 by 90% scope generation\n"
      "clamp feature 7 to 20 when active scope generation"),
     Sampling(max_new_tokens=9, temperature=1.3, top_p=0.9, seed=3), 4, None),
    ("hi", "", Sampling(max_new_tokens=7, temperature=0.8, seed=11), 2, "resid_post.2"),
    (PROMPT, "steer feature 9 by 10 site resid_post.2\nablate feature 1", Sampling(max_new_tokens=10), None, None),
    ("what is the capital of france?", "steer feature 3 by 12", Sampling(max_new_tokens=12, temperature=1.0, seed=5),
     6, "resid_post.2"),
    (PROMPT, "steer feature 11 by -8 scope prompt", Sampling(max_new_tokens=5), 11, None),
    ("a", "steer feature 3 by 12", Sampling(max_new_tokens=8), 0, None),  # the same edits as user 0: its own Plan
]


def engine_for(arch: str) -> DemoEngine:
    saes = [random_sae(site="resid_post.1"), random_sae(site="resid_post.2", seed=2)]
    return DemoEngine(tiny_model(arch), tiny_tokenizer(), saes, model_name="tiny")


def frames(engine, user, **kwargs):
    prompt, edits, sampling, feature, site = user
    return list(engine.stream(prompt, edits, sampling, monitor_feature=feature, monitor_site=site, chat=False, **kwargs))


@pytest.fixture
def decode_sizes(monkeypatch):
    """The number of rows (idle ones excluded) of every decode call."""
    sizes: list[int] = []
    decode = batch.decode_rows

    def recording(model, rows):
        sizes.append(len(rows))
        decode(model, rows)

    monkeypatch.setattr(batch, "decode_rows", recording)
    return sizes


def clean(engine) -> None:
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in engine.model.modules())
    assert engine.model.config._attn_implementation != batch.ROWS_ATTENTION
    assert engine._lock.acquire(blocking=False)
    engine._lock.release()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_users_together_get_exactly_what_they_get_alone(arch, decode_sizes):
    engine = engine_for(arch)
    alone = [frames(engine, user) for user in USERS]
    assert max(decode_sizes) <= 3
    assert len({f[-1].steered_tokens for f in alone}) >= 5  # mostly different, so a leaked edit would show
    assert any(f[-1].steered_tokens != f[-1].unsteered_tokens for f in alone)
    decode_sizes.clear()
    barrier = threading.Barrier(len(USERS))

    def together(user):
        barrier.wait()
        return frames(engine, user)

    with ThreadPoolExecutor(len(USERS)) as pool:
        mine = list(pool.map(together, USERS))
    assert max(decode_sizes) > 3 * 2, f"the requests were not batched: {decode_sizes}"
    for user, got, expected in zip(USERS, mine, alone):
        assert got == expected, user
    clean(engine)


def test_users_joining_and_leaving_mid_way_change_nobody_elses_output(decode_sizes):
    """Requests start while others are decoding (staggered on the first user's frames), and one reader goes away
    after two frames: every other user's frames equal theirs alone."""
    engine = engine_for("llama")
    alone = [frames(engine, user) for user in USERS]
    decode_sizes.clear()
    progress = threading.Condition()
    seen = [0]

    def first():
        out = []
        for frame in engine.stream(*USERS[0][:3], monitor_feature=USERS[0][3], chat=False):
            out.append(frame)
            with progress:
                seen[0] += 1
                progress.notify_all()
        return out

    def later(k):
        with progress:
            progress.wait_for(lambda: seen[0] >= k)
        if k == 2:  # leaves after two frames
            stream = engine.stream(*USERS[k][:3], monitor_feature=USERS[k][3], monitor_site=USERS[k][4], chat=False)
            taken = [next(stream), next(stream)]
            stream.close()
            return taken
        return frames(engine, USERS[k])

    with ThreadPoolExecutor(len(USERS)) as pool:
        futures = [pool.submit(first)] + [pool.submit(later, k) for k in range(1, len(USERS))]
        mine = [f.result() for f in futures]
    assert max(decode_sizes) > 6 and len(set(decode_sizes)) > 2, decode_sizes
    for k, (got, expected) in enumerate(zip(mine, alone)):
        assert got == (expected[:2] if k == 2 else expected), USERS[k]
    clean(engine)


def test_batched_decoding_equals_the_serial_path_within_rounding():
    """The earlier serial path (``batched=False``) computes each continuation alone with other kernels: the same
    greedy tokens and monitor read-outs, KL equal to rounding."""
    engine = engine_for("llama")
    for user in USERS:
        if user[2].temperature:
            continue
        engine.batched = True
        rows = frames(engine, user)[-1]
        engine.batched = False
        serial = frames(engine, user)[-1]
        assert (rows.steered_tokens, rows.unsteered_tokens) == (serial.steered_tokens, serial.unsteered_tokens)
        assert rows.kl == pytest.approx(serial.kl, rel=1e-4, abs=1e-6)
        assert rows.steered_activations == pytest.approx(serial.steered_activations, rel=1e-4, abs=1e-5)


def test_a_failed_step_reaches_its_readers_and_the_scheduler_serves_on(monkeypatch):
    engine = engine_for("llama")
    expected = frames(engine, USERS[0])

    def broken(model, rows):
        raise RuntimeError("boom")

    monkeypatch.setattr(batch, "decode_rows", broken)
    with pytest.raises(RuntimeError, match="boom"):
        frames(engine, USERS[0])
    monkeypatch.undo()
    assert frames(engine, USERS[0]) == expected
    clean(engine)


def test_the_idle_scheduler_thread_ends_and_a_new_request_starts_it_again():
    engine = engine_for("llama")
    engine._scheduler.idle_s = 0.05
    first = frames(engine, USERS[5])
    thread = engine._scheduler._thread
    if thread is not None:
        thread.join(5)
        assert not thread.is_alive()
    assert frames(engine, USERS[5]) == first


def test_rows_attention_refuses_to_run_outside_a_decode_call():
    with pytest.raises(RuntimeError, match="only inside"):
        batch.rows_attention(None, None, None, None, None)


@pytest.mark.default_model
def test_default_model_users_together_get_exactly_what_they_get_alone(decode_sizes):
    """The real default model and its shipped SAEs: four users with different edits and sites, two monitoring,
    one sampling; together (batched) equal to alone, bit for bit."""
    engine = DemoEngine.load()
    live = [int(i) for i in (engine.sae.feature_stats["p99"] > 0).nonzero()[:, 0]]
    a, b, c = live[10], live[len(live) // 2], live[-10]
    other = engine.sites[-1]
    users = [
        ("Tell me about your weekend.", f"steer feature {a} by 6 units feature", Sampling(max_new_tokens=8), a, None),
        ("What is the capital of France?", f"suppress feature {b} by 100%", Sampling(max_new_tokens=6), None, None),
        ("Write a haiku about rain.", f"steer feature {c} by 4 units feature scope generation",
         Sampling(max_new_tokens=7, temperature=1.0, top_p=0.9, seed=4), c, None),
        ("Hi!", "", Sampling(max_new_tokens=6), 5, other),
    ]

    def run(user):
        prompt, edits, sampling, feature, site = user
        return list(engine.stream(prompt, edits, sampling, monitor_feature=feature, monitor_site=site))

    alone = [run(user) for user in users]
    decode_sizes.clear()
    barrier = threading.Barrier(len(users))

    def together(user):
        barrier.wait()
        return run(user)

    with ThreadPoolExecutor(len(users)) as pool:
        mine = list(pool.map(together, users))
    assert max(decode_sizes) > 6, decode_sizes
    for user, got, expected in zip(users, mine, alone):
        assert got == expected, user
    assert alone[0][-1].steered_tokens != alone[0][-1].unsteered_tokens
    clean(engine)
