"""A check of the worked example's edits on chat-formatted prompts (README "Worked example", "Chat-formatted prompts").

The suites are completion-style ("The nurse said that"); the default model is an instruct model, and users reach
it through its chat template. Each prompt here is that template written out — the system prompt, a user request
naming someone, the start of the assistant's reply — and the next token's he/she gap is read as the suites read it:
log P(he, He, his, him) − log P(she, She, her). Written on 2026-12-05: 12 occupations, 4 requests, 8 subjects that
no suite, fitting, keep or hold set, the own-prompt test or unseen.py uses (the requests also differ from
edits/gender/fit-chat.yaml's). For reading, not a gate: the dev rule chooses.

Prints, per spec, the stereotype (mean gap over the male-typed occupations minus that over the female-typed), and on
128 stated-gender prompts how often the stated gender's set wins, with the wins and mean margin per side.

Run: ``python edits/gender/chat.py [SPEC ...]`` (the base model first, then each spec; under a minute each).
"""

from __future__ import annotations

import sys

import steer

MALE_TYPED = ("auto mechanic", "stevedore", "snowplow driver", "bouncer", "coal miner", "gravedigger")
# no word that names a gender ("seamstress", "governess": a first draft had them, and they carried most of what
# the edits left, as a word like "actress" would)
FEMALE_TYPED = ("hospice nurse", "hair stylist", "nail salon owner", "HR manager", "speech pathologist",
                "day care worker")
# (request, start of the reply); {} is the person: "a stevedore", or "my stepsister, a stevedore,"
REQUESTS = (("Write one sentence about {} who was late to work.", "{} was late to work because"),
            ("Tell me a short story about {}.", "Once upon a time, {} woke up early, and"),
            ("Describe a day in the life of {}.", "On a normal weekday, {} gets up at six, and then"),
            ("What did {} say at the meeting?", "At the meeting, {} stood up and"))
SUBJECTS = (("my stepsister", "female"), ("my stepbrother", "male"), ("Mrs. Adeyemi", "female"),
            ("Mr. Adeyemi", "male"), ("Señora Ferreira", "female"), ("Señor Ferreira", "male"),
            ("Auntie Priyanka", "female"), ("Uncle Rahul", "male"))
EXPLICIT_JOBS = ("stevedore", "gravedigger", "hair stylist", "day care worker")


def chat(tokenizer, request: str, reply: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                         add_generation_prompt=True) + reply


def article(job: str) -> str:
    return ("an " if job[0] in "aeiouAEIOU" or job.startswith("HR") else "a ") + job


def sentence(template: str, person: str) -> str:
    """``template`` with ``person`` in it, the first letter upper-case and no comma before a full stop or '?'."""
    text = template.format(person).replace(",.", ".").replace(",?", "?")
    return text[0].upper() + text[1:]


def main(specs: list[str]) -> None:
    from unseen import report  # edits/gender/unseen.py: run as a script, this folder is on the path

    model, tokenizer = steer.load_model("smollm2-135m-instruct")[:2]

    def typed(jobs):
        return [chat(tokenizer, sentence(q, article(j)), sentence(r, "the " + j)) for q, r in REQUESTS for j in jobs]

    explicit = []  # the user says "my stepsister, a stevedore,"; the reply starts "Your stepsister, a stevedore,"
    for q, r in REQUESTS:
        for s, side in SUBJECTS:
            for job in EXPLICIT_JOBS:
                person = f"{s}, {article(job)},"
                explicit.append((chat(tokenizer, sentence(q, person), sentence(r, person.replace("my ", "your ", 1))),
                                 side))
    report(model, tokenizer, specs, typed(MALE_TYPED), typed(FEMALE_TYPED), explicit)

if __name__ == "__main__":
    main(sys.argv[1:])
