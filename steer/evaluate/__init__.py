"""Evaluation: what an edit does to behaviour and what it costs, and how good an SAE is.

- `steer.evaluate.suites` — behaviour suites (YAML: prompts, a scoring rule, dev/held-out marks);
- `steer.evaluate.scoring` — running a suite on a model, with or without a Plan;
- `steer.evaluate.report` — `evaluate`: base vs steered, suites plus KL / perplexity / top-1 on neutral text;
- `steer.evaluate.sweep`, `steer.evaluate.tune` — grids of spec parameters, and Optuna search over them;
- `steer.evaluate.sae_metrics` — SAE quality (FVU, L0, delta LM loss) on held-out text.
"""

from steer.evaluate.report import Baseline, Report, evaluate, evaluate_many, evaluation_for_export, measure_baseline
from steer.evaluate.suites import Suite, SuiteError, load_suite, shipped_suites

__all__ = [
    "Baseline", "Report", "Suite", "SuiteError", "evaluate", "evaluate_many", "evaluation_for_export", "load_suite", "measure_baseline",
    "shipped_suites",
]
