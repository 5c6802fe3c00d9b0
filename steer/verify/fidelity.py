"""Translation validation: how closely an artifact reproduces the hooked reference (DESIGN §7).

On calibration texts, per token: KL(reference ‖ artifact) of the next-token
distributions and whether their top-1 tokens agree; on a few prompts, whether
the greedy continuations match. The reference is the base model under
``steer.applied(model, plan)``; the artifact is any model-like callable
(a merged checkpoint, a PEFT model). Exact lowerings must reach
KL < 1e-6 nats/token in fp32 and 100% top-1 agreement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources

import torch
import torch.nn.functional as F

from steer.lower.hooks import applied
from steer.plan.ir import Plan

EXACT_KL = 1e-6
GREEDY_PROMPTS = (
    "The capital of France is",
    "Here is a short story about a dog:",
    "def fibonacci(n):",
    "My favourite season is",
    "Three facts about the ocean:",
)


@dataclass(frozen=True)
class Fidelity:
    kl_mean: float
    """Mean per-token KL(reference ‖ artifact), nats."""
    kl_max: float
    top1: float
    """Fraction of tokens whose argmax agrees."""
    greedy_match: float
    """Fraction of prompts whose greedy continuation is identical."""
    tokens: int
    prompts: int

    def is_exact(self) -> bool:
        return self.kl_max < EXACT_KL and self.top1 == 1.0

    def as_dict(self) -> dict:
        rounded = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in asdict(self).items()}
        return rounded

    def describe(self) -> str:
        return (f"KL(ref‖artifact) mean {self.kl_mean:.3g} max {self.kl_max:.3g} nats/token over {self.tokens} tokens; "
                f"top-1 agreement {100 * self.top1:.2f}%; greedy continuations match {100 * self.greedy_match:.0f}% "
                f"of {self.prompts} prompts")


def calibration_texts() -> list[str]:
    return [t for t in resources.files("steer.data").joinpath("calibration.txt").read_text().splitlines() if t]


@torch.no_grad()
def measure(model, plan: Plan, artifact, tokenizer, *, texts=None, prompts=GREEDY_PROMPTS, new_tokens: int = 16) -> Fidelity:
    texts = calibration_texts() if texts is None else texts
    kls, agree = [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
        with applied(model, plan):
            ref = model(ids).logits[0].double()
        art = artifact(ids).logits[0].double()
        ref_logp, art_logp = F.log_softmax(ref, -1), F.log_softmax(art, -1)
        kls.append((ref_logp.exp() * (ref_logp - art_logp)).sum(-1).clamp(min=0))
        agree.append(ref.argmax(-1) == art.argmax(-1))
    kl, agreement = torch.cat(kls), torch.cat(agree)
    matches = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                      pad_token_id=tokenizer.pad_token_id)
        with applied(model, plan):
            ref = model.generate(ids, **kwargs)
        art = artifact.generate(ids, **kwargs)
        matches += int(torch.equal(ref, art))
    return Fidelity(kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1=float(agreement.double().mean()),
                    greedy_match=matches / max(1, len(prompts)), tokens=int(kl.numel()), prompts=len(prompts))


@dataclass
class Verdict:
    """What `steer verify` found: ``ok`` and one line per check (``ok   …``, ``note …``, ``FAIL …``)."""

    ok: bool = True
    lines: list[str] = field(default_factory=list)
    fidelity: Fidelity | None = None

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append(f"FAIL {line}")


def judge(verdict: Verdict, manifest: dict, plan: Plan, judged: Fidelity) -> None:
    """The verification contract for an artifact run in transformers (DESIGN §7), on ``judged`` (the fidelity the
    lowering is judged by; ``verdict.fidelity`` is the artifact as stored): exact lowerings must be exact, and
    approximate ones within the spec's ``max_kl`` when it has one."""
    approximate = [e for e in manifest["edits"] if e["lowering"] != "exact"]
    if not approximate and not judged.is_exact():
        verdict.fail(f"every edit was lowered exactly, but the artifact is not exact (KL max {judged.kl_max:.3g} ≥ 1e-6 "
                     f"or top-1 {100 * judged.top1:.2f}% < 100%)")
    max_kl = plan.spec.max_kl
    if approximate and max_kl is not None:
        if verdict.fidelity.kl_mean > max_kl:
            verdict.fail(f"mean KL(ref‖artifact) {verdict.fidelity.kl_mean:.4g} is above the spec's max_kl {max_kl:g}")
        else:
            verdict.lines.append(f"ok   mean KL(ref‖artifact) {verdict.fidelity.kl_mean:.4g} ≤ the spec's max_kl {max_kl:g}")
    elif approximate:
        verdict.lines.append(f"note {len(approximate)} edit(s) were lowered approximately (accepted with --allow-approximate)")
