"""Translation validation: how closely an artifact reproduces the hooked reference (DESIGN §7).

On calibration texts, per token: KL(reference ‖ artifact) of the next-token
distributions and whether their top-1 tokens agree; on a few prompts, whether
the greedy continuations match. The reference is the base model under
``steer.applied(model, plan)``; the artifact is any model-like callable
(a merged checkpoint, a PEFT model). Exact lowerings must reach
KL < 1e-6 nats/token in fp32 and 100% top-1 agreement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
