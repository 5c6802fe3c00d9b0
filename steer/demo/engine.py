"""The demo's model side: side-by-side decoding, monitor, KL, edit checks, bounds, exports.

No Gradio here; `steer.demo.app` is the page over it.

**Concurrent users share one batch** (`steer.demo.batch`). One scheduler thread owns the model's forward
passes: a request queues its three continuations and reads its frames as they come; at every step the scheduler
feeds every active user's continuations — each with its own plan (`steer.applied` with one plan per row), its own
KV cache and its own sampling generator — as the rows of one forward call, so K users cost one call per step, not
3·K. A row's numbers do not depend on the other rows (each row attends to its own cache alone, the batch is padded
to a size whose products are row-invariant, each row's plan is its own object; see `steer.demo.batch`): every
user gets, bit for bit, the tokens, KL and monitor read-outs the same request gets alone.

**Isolation (why requests never see each other's edits).** `steer.applied` installs forward hooks on the shared
model; they are installed and removed inside one hold of the model lock (`DemoEngine._lock`), around one forward
call, and steer each row by that row's plan only (a row whose plan is None is untouched). No other forward pass
runs while they are in place: everything that runs the model holds that lock. The tokenizer, whose padding side
`prompt_ids` flips, has its own lock. Exports load their own copy of the model (`load_model` of a cached
checkpoint is fast), so a long export never holds the lock. ``DemoEngine(batched=False)`` keeps the earlier path —
each request feeds its continuations one forward call each, under the lock, step by step — for comparison
(bench/demo.py).

**Per step** a request feeds three continuations of the same prompt:

* *unsteered* — the model as it is (with a monitor-only plan when a feature is monitored: a monitor writes nothing,
  so the logits are the unhooked ones);
* *steered* — under the user's plan;
* *reference* — the unsteered model fed the *steered* tokens, so that at steered step t, KL(unsteered ‖ steered)
  compares the two next-token distributions (temperature 1) given the same prefix: the prompt and the steered
  tokens before t. That is the readout of the edit's side effect.

Both visible continuations sample with the same settings and seed (a generator each, seeded alike), so an
identity edit gives identical text.

**Monitor**: a ``monitor feature J site S`` edit is added to both plans; each generated token is coloured by f_J
(the feature of the SAE at S) at that token's own position (the last token is fed once more, without sampling, to
read it).

**Sites**: the engine holds one SAE per site (each SAE reads at the site its config names). An edit line picks its
SAE with ``site S`` (canonical, SAELens or HF module name); without one it is at the first SAE's site
(`DemoEngine.site`, the spec's default site). Compiling, the monitor and exports use the same SAEs.

**Bounds** (`Limits`) are checked here, server-side, whatever the page allows.
Never leaves a hook installed after a step; never mutates the model's weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from steer.demo.batch import Request, Scheduler, Snapshot, kl_divergence, next_token  # noqa: F401 (re-exported)
from steer.errors import SAEError, SpecError, SteerError
from steer.generate import Sampling, context_length, prompt_ids, stop_ids
from steer.lower.targets import TARGETS
from steer.plan.ir import Plan
from steer.spec import Spec, parse_dsl
from steer.spec.edit import Condition, Edit

EXPORT_TARGETS = tuple(TARGETS)
"""What "Export" can write: every artifact target (`steer.lower.targets`)."""


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on one request (the page's controls stop at the same values)."""

    max_prompt_chars: int = 2000
    """Longest prompt, in characters."""
    max_prompt_tokens: int = 512
    """Longest prompt in tokens, chat template included."""
    max_new_tokens: int = 128
    """Most tokens generated per continuation."""
    max_edits: int = 16
    """Most edits (DSL lines or ;-separated edits) in one request."""
    max_edit_chars: int = 4000
    """Longest edit list, in characters."""
    max_temperature: float = 5.0
    """Highest sampling temperature."""


@dataclass(frozen=True)
class LineCheck:
    """One non-blank line of the edit list and what the parser (or the compiler) said about it."""

    line: int
    """1-based line number in the edit list."""
    text: str
    error: str | None
    """The SteerError message for this line; None when it is a valid edit."""

    def describe(self) -> str:
        return f"line {self.line}: " + (self.error if self.error else "ok")


@dataclass(frozen=True)
class Frame:
    """What the page shows after one decode step."""

    unsteered: str
    steered: str
    unsteered_tokens: tuple[int, ...]
    """The generated token ids (the last may be an end-of-turn token)."""
    steered_tokens: tuple[int, ...]
    unsteered_pieces: tuple[str, ...]
    """The text of each generated token (special tokens as empty strings)."""
    steered_pieces: tuple[str, ...]
    kl: tuple[float, ...]
    """KL(unsteered ‖ steered) in nats at each steered step, same prefix (see the module docstring)."""
    monitor_feature: int | None
    unsteered_activations: tuple[float, ...] = ()
    """f_J at each generated token of the continuation (as many as have been fed back)."""
    steered_activations: tuple[float, ...] = ()
    done: bool = False
    monitor_site: str | None = None
    """The site whose SAE's feature is monitored (canonical name); None when nothing is monitored."""


@dataclass(frozen=True)
class ExportResult:
    archive: Path
    """The zip: ``artifact/`` (the export directory) and ``verify_report.txt``."""
    report: str
    """`steer verify`'s lines for the artifact, then its verdict."""
    ok: bool


class DemoEngine:
    """One model, one SAE per site, one decoding scheduler; see the module docstring.

    ``sae`` is an `SAE` or a sequence of them, each reading at the site its config names (no two at one site);
    the first one's site is the default site of the edit list (`site`), and `sae` is that SAE. ``batched=False``:
    the earlier serial path (each request's continuations one forward call each, under the lock)."""

    def __init__(self, model, tokenizer, sae, *, model_name: str, limits: Limits = Limits(), batched: bool = True):
        from steer.models.adapters import adapter_for, hidden_size

        self.model = model
        self.tokenizer = tokenizer
        self._adapter = adapter_for(model)
        self.saes: dict[str, object] = {}
        """The SAEs by canonical site name (``resid_post.7``), in the order given."""
        for one in (list(sae) if isinstance(sae, (list, tuple)) else [sae]):
            where = f"sae {one.source or '<memory>'}"
            if one.site is None:
                raise SAEError("the SAE's config names no site; the demo reads each SAE at the site its config names",
                               where=where)
            try:
                site = str(self._adapter.parse_site(one.site, model))
            except SteerError as exc:
                raise SAEError(exc.message, where=where) from None
            if one.d_in != hidden_size(model):
                raise SAEError(f"SAE d_in is {one.d_in} but the model's hidden size is {hidden_size(model)}", where=where)
            if site in self.saes:
                raise SAEError(f"two SAEs read at site {site}; give one per site", where=where)
            self.saes[site] = one
        if not self.saes:
            raise SAEError("the demo needs at least one SAE", where="sae")
        self.sites: tuple[str, ...] = tuple(self.saes)
        self.site: str = self.sites[0]
        """The default site: edit lines without ``site`` are edits there."""
        self.sae = self.saes[self.site]
        self.model_name = model_name
        self.limits = limits
        self._lock = threading.Lock()
        """Held by whatever runs the model (a forward call, a compile)."""
        self._tokenizer_lock = threading.Lock()
        self._export_lock = threading.Lock()
        self.batched = batched
        self._scheduler = Scheduler(model, self._lock)
        self._plans: OrderedDict[tuple[Edit, ...], Plan] = OrderedDict()
        self.eos = set(stop_ids(model, tokenizer))

    @classmethod
    def load(cls, model: str | None = None, sae=None, *, limits: Limits = Limits()) -> DemoEngine:
        """The engine for a model (default: the embedded default model) and SAEs: a path or name, or a list of them
        (`steer.saes.load_sae`: ``default``, ``default:SITE``); default: `default_sae_names`."""
        from steer.models import DEFAULT_MODEL, load_model
        from steer.saes import load_sae

        names = [sae] if isinstance(sae, (str, Path)) else list(sae or default_sae_names())
        name = model or DEFAULT_MODEL
        loaded, tokenizer = load_model(name)
        return cls(loaded, tokenizer, [load_sae(n) for n in names], model_name=name, limits=limits)

    # -- sites ---------------------------------------------------------------------------------

    def site_name(self, name: str | None, *, where: str = "site") -> str:
        """The canonical name of a site (any name `steer` reads; None: the default site); a `SteerError` when the
        model has no such site."""
        if name is None:
            return self.site
        try:
            return str(self._adapter.parse_site(str(name), self.model))
        except SteerError as exc:
            raise SpecError(exc.message, where=where) from None

    def sae_at(self, name: str | None, *, where: str = "site"):
        """The SAE reading at site ``name`` (None: the default site); a `SteerError` naming the SAE sites if none."""
        site = self.site_name(name, where=where)
        if site not in self.saes:
            raise SpecError(f"no SAE reads at {site}; the demo's SAEs read at {', '.join(self.sites)}", where=where)
        return self.saes[site]

    def check_site(self, edit: Edit) -> None:
        """A `SpecError` when the edit's ``site`` is no site of the model, or a feature edit's site has no SAE here
        (``site writers`` is left to the compiler)."""
        from steer.plan.compile import WRITERS

        if edit.site == WRITERS:
            return
        site = self.site_name(edit.site)
        if (edit.feature is not None or isinstance(edit.when, Condition)) and site not in self.saes:
            raise SpecError(f"feature edit at {site}, but no SAE reads there; the demo's SAEs read at "
                            f"{', '.join(self.sites)}", where="site")

    def site_of(self, edit: Edit) -> str | None:
        """The canonical site an edit is at (its ``site`` or the default), or None when the name is no site."""
        try:
            return self.site_name(edit.site)
        except SteerError:
            return None

    # -- the edit list --------------------------------------------------------------------

    def check_lines(self, text: str) -> list[LineCheck]:
        """Every non-blank line checked: parser and site messages per line (`check_site`), then the compiler's first
        complaint."""
        self._check_edit_text(text)
        checks, edits, line_of = [], [], []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                parsed = _parse_line(line, number)
                for edit in parsed:
                    self.check_site(edit)
            except SpecError as exc:
                checks.append(LineCheck(number, line, exc.message))
                continue
            if parsed:
                checks.append(LineCheck(number, line, None))
                edits.extend(parsed)
                line_of.extend([number] * len(parsed))
        if edits and all(c.error is None for c in checks) and len(edits) <= self.limits.max_edits:
            try:
                self.plan(tuple(edits))
            except SteerError as exc:
                number = _line_of_error(exc, line_of)
                checks = [LineCheck(c.line, c.text, exc.message) if c.line == number else c for c in checks]
        return checks

    def edits(self, text: str) -> tuple[Edit, ...]:
        """The edits of the list; a `SpecError` naming the first bad line."""
        self._check_edit_text(text)
        edits: list[Edit] = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                parsed = _parse_line(line, number)
                for edit in parsed:
                    self.check_site(edit)
                edits.extend(parsed)
            except SpecError as exc:
                raise SpecError(exc.message, where=f"edits line {number}") from None
        if len(edits) > self.limits.max_edits:
            raise SpecError(f"{len(edits)} edits; the demo takes at most {self.limits.max_edits}", where="edits")
        return tuple(edits)

    def _check_edit_text(self, text: str) -> None:
        if len(text) > self.limits.max_edit_chars:
            raise SpecError(f"the edit list is {len(text)} characters; the demo takes at most {self.limits.max_edit_chars}",
                            where="edits")

    def spec(self, edits: tuple[Edit, ...], **fields) -> Spec:
        """The spec the demo compiles ``edits`` as: edits without ``site`` are at the default site."""
        return Spec(edits=edits, site=self.site, **fields)

    def plan(self, edits: tuple[Edit, ...]) -> Plan | None:
        """The compiled plan of ``edits`` against the model and SAEs (cached; None for no edits). A compiler error
        about an edit of the list names its line (``edits line N``)."""
        if not edits:
            return None
        with self._lock, self._tokenizer_lock:
            plan = self._plans.get(edits)
            if plan is None:
                from steer.plan import compile as compile_plan

                try:
                    plan = compile_plan(self.spec(edits), self.model, list(self.saes.values()), tokenizer=self.tokenizer)
                except SteerError as exc:
                    raise _naming_the_line(exc, edits) from None
                self._plans[edits] = plan
                while len(self._plans) > 64:
                    self._plans.popitem(last=False)
            return plan

    # -- one request --------------------------------------------------------------------------

    def check_sampling(self, sampling: Sampling) -> None:
        if sampling.max_new_tokens > self.limits.max_new_tokens:
            raise SteerError(f"max new tokens is {sampling.max_new_tokens}; the demo allows at most "
                             f"{self.limits.max_new_tokens}", where="max new tokens")
        if sampling.temperature > self.limits.max_temperature:
            raise SteerError(f"temperature is {sampling.temperature}; the demo allows at most {self.limits.max_temperature}",
                             where="temperature")

    def prompt_tokens(self, prompt: str, *, chat: bool = True) -> torch.Tensor:
        """``(1, T)`` prompt ids (chat template for instruct models), within the bounds."""
        if not prompt.strip():
            raise SteerError("the prompt is empty", where="prompt")
        if len(prompt) > self.limits.max_prompt_chars:
            raise SteerError(f"the prompt is {len(prompt)} characters; the demo takes at most {self.limits.max_prompt_chars}",
                             where="prompt")
        with self._tokenizer_lock:
            ids = prompt_ids(self.tokenizer, [prompt], chat=chat)["input_ids"]
        if ids.shape[1] > self.limits.max_prompt_tokens:
            raise SteerError(f"the prompt is {ids.shape[1]} tokens with its template; the demo takes at most "
                             f"{self.limits.max_prompt_tokens}", where="prompt")
        return ids

    def stream(self, prompt: str, edits_text: str, sampling: Sampling = Sampling(max_new_tokens=48), *,
               monitor_feature: int | None = None, monitor_site: str | None = None, chat: bool = True) -> Iterator[Frame]:
        """Unsteered and steered continuations, one `Frame` per decode step (the last has ``done``); the monitor
        reads ``monitor_feature`` of the SAE at ``monitor_site`` (default: the default site)."""
        self.check_sampling(sampling)
        ids = self.prompt_tokens(prompt, chat=chat)
        context = context_length(self.model)
        if context is not None and ids.shape[1] + sampling.max_new_tokens > context:
            raise SteerError(f"the prompt is {ids.shape[1]} tokens with its template and {sampling.max_new_tokens} new "
                             f"tokens are asked for: {ids.shape[1] + sampling.max_new_tokens}, over the model's context of "
                             f"{context}; ask for fewer new tokens or shorten the prompt", where="prompt")
        edits = self.edits(edits_text)
        monitor: tuple[Edit, ...] = ()
        if monitor_feature is not None:
            monitor_site = self.site_name(monitor_site, where="monitor site")
            sae = self.sae_at(monitor_site, where="monitor site")
            if not 0 <= monitor_feature < sae.d_sae:
                at = f" at {monitor_site}" if len(self.saes) > 1 else ""
                raise SteerError(f"feature {monitor_feature} is not in the SAE{at} (0..{sae.d_sae - 1})",
                                 where="monitor feature")
            monitor = parse_dsl(f"monitor feature {int(monitor_feature)} site {monitor_site}")
        else:
            monitor_site = None
        request = Request(ids, self.plan(edits + monitor), self.plan(monitor), len(edits) if monitor else None,
                          sampling, self.eos)
        steps = self._scheduler.run(request) if self.batched else self._serial(request)
        snapshot = None
        try:
            for snapshot in steps:
                yield self._frame(snapshot, monitor_feature, monitor_site, done=False)
        finally:
            steps.close()  # a reader gone mid-way (Gradio closes the generator): the request is dropped
        yield self._frame(snapshot, monitor_feature, monitor_site, done=True)

    def _serial(self, request: Request) -> Iterator[Snapshot]:
        """The earlier path: each step feeds the request's continuations one forward call each, under the lock."""
        while feeding := request.feeding():
            with self._lock:
                for c in feeding:
                    c.feed(self.model)
            request.advance(feeding)
            yield request.snapshot()

    def _frame(self, snapshot: Snapshot, monitor_feature, monitor_site, *, done: bool) -> Frame:
        columns = (snapshot.unsteered_tokens, snapshot.steered_tokens)
        with self._tokenizer_lock:
            texts = [self.tokenizer.decode(list(tokens), skip_special_tokens=True) for tokens in columns]
            pieces = [tuple(self.tokenizer.decode([t], skip_special_tokens=True) for t in tokens) for tokens in columns]
        return Frame(texts[0], texts[1], snapshot.unsteered_tokens, snapshot.steered_tokens, pieces[0], pieces[1],
                     snapshot.kl, monitor_feature, snapshot.unsteered_activations, snapshot.steered_activations, done,
                     monitor_site)

    def generate(self, prompt: str, edits_text: str, sampling: Sampling = Sampling(max_new_tokens=48), **kwargs) -> Frame:
        """The last frame of `stream`."""
        frame = None
        for frame in self.stream(prompt, edits_text, sampling, **kwargs):
            pass
        return frame

    # -- export ----------------------------------------------------------------------------------

    def export(self, edits_text: str, target: str, directory) -> ExportResult:
        """Export the edit list as ``target``, verify it, and zip both into ``directory``."""
        from steer.export.atomic import atomic_file
        from steer.export.checkpoint import export
        from steer.models import load_model
        from steer.plan import compile as compile_plan
        from steer.verify.artifact import verify_artifact

        if target not in EXPORT_TARGETS:
            raise SteerError(f"unknown export target {target!r}; allowed: {', '.join(EXPORT_TARGETS)}", where="export")
        edits = self.edits(edits_text)
        if not edits:
            raise SteerError("the edit list is empty: nothing to export", where="edits")
        spec = self.spec(edits, model=self.model_name)
        digest = hashlib.sha256(f"{target}\n{spec}".encode()).hexdigest()[:10]
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._export_lock:
            work = Path(tempfile.mkdtemp(prefix=".export-", dir=directory))
            try:
                model, tokenizer = load_model(self.model_name)  # our own copy: the shared model stays free
                try:
                    plan = compile_plan(spec, model, list(self.saes.values()), tokenizer=tokenizer)
                except SteerError as exc:
                    raise _naming_the_line(exc, edits) from None
                export(plan, model, tokenizer, target, work / "artifact", base=self.model_name)
                del model
                verdict = verify_artifact(work / "artifact")
                report = "\n".join([*verdict.lines, "verified" if verdict.ok else "verification FAILED"]) + "\n"
                (work / "verify_report.txt").write_text(report)
                archive = directory / f"steer-{target}-{digest}.zip"
                with atomic_file(archive, what="export zip") as partial:
                    _zip_directory(work, partial)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return ExportResult(archive, report, verdict.ok)


def default_sae_names() -> list[str]:
    """The SAEs the demo loads when none is named: every shipped SAE (``default`` — the manifest's default site —
    first, then ``default:SITE`` for the other sites) where the package ships them, else the one ``default``."""
    from steer.sae.shipped import shipped_available, shipped_manifest
    from steer.saes import DEFAULT_SAE

    if not shipped_available():
        return [DEFAULT_SAE]
    manifest = shipped_manifest()
    first = manifest.get("default_site")
    return [DEFAULT_SAE if site == first else f"{DEFAULT_SAE}:{site}"
            for site in sorted(manifest["saes"], key=lambda s: s != first)]


def _parse_line(line: str, number: int) -> tuple[Edit, ...]:
    """The edits of one line of the list, each remembering its line (``line N``, for compiler errors)."""
    return tuple(dataclasses.replace(e, origin=f"line {number}") for e in parse_dsl(line, source=None))


def _naming_the_line(exc: SteerError, edits: tuple[Edit, ...]) -> SteerError:
    """A compiler error about ``edits[i]`` as the same message at ``edits line N`` (where that edit was written)."""
    match = _EDIT_INDEX.search(exc.where or "")
    if not match or int(match.group(1)) >= len(edits):
        return exc
    origin = edits[int(match.group(1))].origin or ""
    number = origin.removeprefix("line ")
    return type(exc)(exc.message, where=f"edits line {number}" if number.isdigit() else exc.where)


_EDIT_INDEX = re.compile(r"edits\[(\d+)\]")
_EDIT_LINE = re.compile(r"^edits line (\d+)$")


def _line_of_error(exc: SteerError, line_of: list[int]) -> int | None:
    """The edit-list line a compiler error is about (its ``where`` names ``edits line N`` or ``edits[i]``), or the
    first line."""
    named = _EDIT_LINE.search(exc.where or "")
    if named and int(named.group(1)) in line_of:
        return int(named.group(1))
    match = _EDIT_INDEX.search(exc.where or "")
    if match and int(match.group(1)) < len(line_of):
        return line_of[int(match.group(1))]
    return line_of[0] if line_of else None


def _zip_directory(source: Path, archive: Path) -> None:
    """Zip ``source``'s files; weights are stored (they do not compress), the rest deflated."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                stored = path.suffix in (".safetensors", ".gguf", ".bin")
                zf.write(path, path.relative_to(source).as_posix(),
                         compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
