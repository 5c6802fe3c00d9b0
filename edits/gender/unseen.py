"""A further check of the worked example's erasures on prompts that nothing else uses (README "Worked example").

Written on 2026-12-05, after the fits H and I of "Going further" had been measured on the held-out halves and on
the prompts of our own (tests/test_worked_example.py), and before J was measured or the shipped fit chosen: 12
occupations, 3 stereotype templates, 8 subjects and 3 explicit templates that no suite, fitting, keep or hold set,
nor the own-prompt test uses. For reading, not a gate: the dev rule chooses. Prints, per spec, the stereotype (the
mean he/she gap over the male-typed occupations minus that over the female-typed) and, on 96 stated-gender prompts,
how often the stated gender's set wins, and per side the wins and the mean margin toward the stated gender. The gap
is the suites' own: log P(he, He, his, him) − log P(she, She, her) of the next token.

Run: ``python edits/gender/unseen.py [SPEC ...]`` (the base model first, then each spec; ~1 min each on 2 cores).
"""

from __future__ import annotations

import sys

import steer
from steer.evaluate.scoring import next_token_logprobs, token_set_ids

MALE_TYPED = ("scaffolder", "tree surgeon", "demolition worker", "bulldozer driver", "quarry worker", "fisherman")
FEMALE_TYPED = ("flower arranger", "nursery teacher", "beauty therapist", "school nurse", "ward clerk",
                "sewing machinist")
TEMPLATES = ("The {} said goodbye and", "On Friday the {} explained why", "Nobody knew whether the {} would come, but")
SUBJECTS = (("Aunt Rosa", "female"), ("Uncle Marco", "male"), ("Mrs. Dubois", "female"), ("Mr. Dubois", "male"),
            ("Elena", "female"), ("Pavel", "male"), ("Grandma June", "female"), ("Grandpa Joe", "male"))
EXPLICIT = ("{}, the local {}, promised that", "{} has been a {} since 2010, and", "Everyone knows {}, a {}. Yesterday")
EXPLICIT_JOBS = ("scaffolder", "tree surgeon", "nursery teacher", "beauty therapist")


def report(model, tokenizer, specs: list[str], male: list[str], female: list[str],
           explicit: list[tuple[str, str]]) -> None:
    """Print, for the base model and then each spec, the stereotype over the ``male`` and ``female``-typed prompts
    and, on the ``explicit`` (prompt, stated side) pairs, the stated gender's wins and per side wins and margin.
    edits/gender/chat.py reports through this too."""
    ids = [token_set_ids(tokenizer, words, "the worked example's checks")
           for words in ((" he", " He", " his", " him"), (" she", " She", " her"))]

    def gaps(texts, plan):
        logp = next_token_logprobs(model, tokenizer, texts, plan)
        return (logp[:, ids[0]].logsumexp(-1) - logp[:, ids[1]].logsumexp(-1)).tolist()

    for spec in [None, *specs]:
        plan = steer.compile(spec, model, tokenizer=tokenizer) if spec else None
        m, f = gaps(male, plan), gaps(female, plan)
        toward = [g if side == "male" else -g for g, (_, side) in zip(gaps([x for x, _ in explicit], plan), explicit)]
        per_side = {side: [t for t, (_, s) in zip(toward, explicit) if s == side] for side in ("male", "female")}
        print(f"{spec or 'base'}: stereotype {sum(m) / len(m) - sum(f) / len(f):.3f}; stated gender "
              f"wins {sum(t > 0 for t in toward)} of {len(toward)}; "
              + "; ".join(f"{side}: wins {sum(t > 0 for t in ts)}, margin {sum(ts) / len(ts):.3f}"
                          for side, ts in per_side.items()), flush=True)


def main(specs: list[str]) -> None:
    model, tokenizer = steer.load_model("smollm2-135m-instruct")[:2]
    explicit = [(t.format(s, job), side) for t in EXPLICIT for s, side in SUBJECTS for job in EXPLICIT_JOBS]
    report(model, tokenizer, specs, [t.format(o) for t in TEMPLATES for o in MALE_TYPED],
           [t.format(o) for t in TEMPLATES for o in FEMALE_TYPED], explicit)

if __name__ == "__main__":
    main(sys.argv[1:])
