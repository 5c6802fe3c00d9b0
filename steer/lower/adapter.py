"""Lower linear edits into a PEFT LoRA adapter (DESIGN §6, "adapter").

``project_out`` (p, û) on a writer W is exactly rank 1: ``W − p·û ûᵀW = W + B A``
with ``B = −p·û``, ``A = ûᵀW``, ``r = 1``, ``lora_alpha = 1`` (scaling 1); k edits
on one module stack into rank k (``rank_pattern``/``alpha_pattern`` keep the
scaling 1). Sites: ``attn_out.L``/``mlp_out.L`` → the writer; ``resid_pre.0`` →
the token embedding (``lora_embedding_A/B``; and GPT-2's wpe). A writer with a
bias that has a component along û is only approximated (LoRA carries no bias);
``add`` has no adapter lowering for the same reason (vLLM serves no LoRA bias).

The files follow PEFT's checkpoint layout — ``adapter_config.json`` (written by
peft's own LoraConfig) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` ``[r, in]``, ``….lora_B.weight``
``[out, r]``, and for embeddings ``….lora_embedding_A`` ``[r, vocab]``,
``….lora_embedding_B`` ``[d, r]`` — so ``PeftModel.from_pretrained`` and vLLM
load it. Reads the writers' weights from the model; never changes the model.
The target reloads the adapter through PEFT on the base checkpoint and
measures it against the hooks (`steer.verify.fidelity`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from steer.lower.targets import (
    EditLowering,
    Loaded,
    LoweringError,
    Outcome,
    Target,
    Unlowerable,
    WriteOptions,
    Written,
    lower_each,
    outcome_of,
    register,
)
from steer.models.adapters import Site, adapter_for
from steer.ops import OPERATIONS, Primitive
from steer.plan.ir import Plan, SiteEdit

BIAS_TOLERANCE = 1e-6
BIAS_NOTE = "LoRA cannot change the writer bias: its component along û remains"


def _rule(se: SiteEdit, site: Site, arch) -> str | None:
    """The module kind this edit lowers onto ("writer", "embedding", None for monitor)."""
    primitive = OPERATIONS[se.op].lowers_to
    if primitive is Primitive.NOTHING:
        return None
    if se.scope != "all" or se.when_slot is not None:
        raise Unlowerable("it applies only at some tokens (scope/when): no weight delta does that")
    if primitive is Primitive.CONSTANT:
        raise Unlowerable(f"LoRA carries no bias, so a constant `{se.op}` has no adapter lowering (use weights or cvec)")
    if primitive is not Primitive.PROJECTION:
        raise Unlowerable(f"{se.op} is {primitive.value}: no LoRA expresses it")
    if arch.writers_renormalised:
        raise Unlowerable(f"{arch.name} renormalises writer outputs: a low-rank writer change cannot remove a direction")
    if site.kind == "resid_pre" and site.layer == 0:
        return "embedding"
    if site.kind in ("attn_out", "mlp_out"):
        return "writer"
    raise Unlowerable(f"project_out at {site} is not a change of one writer; use site `writers`")


@dataclass
class _Module:
    kind: str  # "linear" | "conv1d" | "embedding"
    A: list[torch.Tensor] = field(default_factory=list)  # rows (in,) / (vocab,)
    B: list[torch.Tensor] = field(default_factory=list)  # columns (out,) / (d,)


def lower_to_adapter(plan: Plan, model: nn.Module) -> tuple[dict[str, _Module], list[EditLowering]]:
    arch = adapter_for(model)
    config = model.config.to_dict()
    modules: dict[str, _Module] = {}

    def rule(se: SiteEdit, site: Site, low: EditLowering) -> list[str] | None:
        kind = _rule(se, site, arch)
        if kind is None:
            return None
        u, p = se.write.double(), se.amount
        if kind == "embedding":
            if config.get("tie_word_embeddings"):
                low.note = ("the token embedding is tied to the output layer: serve this adapter unmerged "
                            "(merge_and_unload would change the output layer too; the weights target unties instead)")
            names = [arch.embedding] + ([arch.position_embedding] if arch.position_embedding else [])
            for name in names:
                E = model.get_submodule(name).weight.detach().double()  # (vocab, d)
                m = modules.setdefault(name, _Module("embedding"))
                m.A.append(E @ u)
                m.B.append(-p * u)
            return names
        relative = arch.attn_writer if site.kind == "attn_out" else arch.mlp_writer
        name = f"{arch.layers}.{site.layer}.{relative}"
        writer = model.get_submodule(name)
        W = writer.weight.detach().double()
        m = modules.setdefault(name, _Module("conv1d" if arch.conv1d_writers else "linear"))
        m.A.append(W @ u if arch.conv1d_writers else u @ W)
        m.B.append(-p * u)
        bias = getattr(writer, "bias", None)
        if bias is not None and abs(float(bias.double() @ u)) > BIAS_TOLERANCE * max(1.0, float(bias.norm())):
            low.kind = "approximate"
            low.note = BIAS_NOTE
        return [name]

    lowerings = lower_each(plan, "adapter", config, rule)
    return modules, lowerings


def write_adapter(plan: Plan, model: nn.Module, directory: Path, base_model_name: str) -> list[EditLowering]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules, lowerings = lower_to_adapter(plan, model)
    if not modules:
        raise LoweringError("no edit changes the model's outputs: an empty adapter artifact is refused (there is "
                            "nothing to put in a LoRA)", where="target adapter")
    dtype = next(model.parameters()).dtype
    tensors = {}
    for name, m in sorted(modules.items()):
        A = torch.stack(m.A).to(dtype).contiguous()        # (r, in) / (r, vocab)
        B = torch.stack(m.B, dim=1).to(dtype).contiguous()  # (out, r) / (d, r)
        prefix = f"base_model.model.{name}"
        if m.kind == "embedding":
            tensors[f"{prefix}.lora_embedding_A"], tensors[f"{prefix}.lora_embedding_B"] = A, B
        else:
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
    ranks = {name: len(m.A) for name, m in modules.items()}
    config = LoraConfig(
        r=1, lora_alpha=1, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=sorted(modules), rank_pattern={n: r for n, r in ranks.items() if r > 1},
        alpha_pattern={n: r for n, r in ranks.items() if r > 1},
        fan_in_fan_out=adapter_for(model).conv1d_writers, base_model_name_or_path=base_model_name,
    )
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return lowerings


def load_adapter(base_dir: Path, directory: Path):
    """An adapter export applied by PEFT to the base checkpoint, fp32, eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, str(directory)).eval()


BASE_ADAPTER = "__base__"
"""PEFT's name for "no adapter" in a mixed batch's ``adapter_names``."""


def load_adapters(base_dir: Path, adapters: dict[str, Path]):
    """Several adapter exports of one base in one PeftModel (fp32, eval), each under its name, for mixed batches.

    Each row of a batch runs its own adapter, or none — PEFT's mixed-adapter inference, the CPU counterpart of
    vLLM's multi-LoRA serving (README "Several adapters in one batch")::

        model = load_adapters(base_dir, {"a": "out/a", "b": "out/b"})
        model.generate(**inputs, adapter_names=["a", "__base__", "b"], do_sample=False)  # one name per row

    Row i then equals the base with adapter ``adapter_names[i]`` alone (``BASE_ADAPTER``: the unedited base),
    so each row's greedy tokens are those of its edit's hooks. The adapters are never merged (merging would
    apply to every row; with tied embeddings it would change the output layer too). Each export must name the
    same base (``base_model_name_or_path``, which `steer compile --target adapter` writes from ``--base``); a
    name may not be ``__base__``. PEFT warns once per adapter that targets a tied embedding
    (``ensure_weight_tying``): only the input side is adapted, which is what steer's lowering means."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steer.errors import SteerError

    if not adapters:
        raise SteerError("no adapters given: name at least one (name → adapter export directory)")
    bases = {}
    for name, directory in adapters.items():
        if name == BASE_ADAPTER:
            raise SteerError(f"`{BASE_ADAPTER}` is PEFT's name for the unadapted base: choose another name",
                                where=str(directory))
        config = Path(directory) / "adapter_config.json"
        if not config.is_file():
            raise SteerError("not an adapter export: no adapter_config.json", where=str(directory))
        bases[name] = json.loads(config.read_text()).get("base_model_name_or_path")
    if len(set(bases.values())) > 1:
        raise SteerError("the adapters name different base models: "
                            + ", ".join(f"{name}: {base}" for name, base in bases.items()), where="load_adapters")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    (first, directory), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, str(directory), adapter_name=first)
    for name, directory in rest:
        model.load_adapter(str(directory), adapter_name=name)
    _retie_output_layer(model)
    unloaded = _on_meta(model)
    if unloaded:
        raise SteerError(f"{len(unloaded)} tensor(s) were left unloaded (on the meta device) after loading the base and "
                         f"its adapters: {', '.join(unloaded[:5])}", where=str(base_dir))
    return model.eval()


def _retie_output_layer(model) -> None:
    """Tie a tied-embedding base's output layer back to the (unadapted) input embedding where PEFT left it on the
    meta device: seen in CI (3 clean-clone runs, never reproduced outside that full run) after loading adapters
    that target the tied embedding, as ``base_model.model.lm_head.weight``. Tying is what the base means, and
    steer's adapters adapt the input side only."""
    inner = model.get_base_model()
    output = inner.get_output_embeddings()
    if output is None or not output.weight.is_meta or not getattr(inner.config, "tie_word_embeddings", False):
        return
    embedding = inner.get_input_embeddings()
    output.weight = getattr(embedding, "base_layer", embedding).weight


def _on_meta(model) -> list[str]:
    """Names of parameters and buffers with no data (meta device): a model that would compute nothing."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in tensors if t.is_meta]


class AdapterTarget(Target):
    name = "adapter"
    help = "a PEFT LoRA (transformers + PEFT, vLLM --enable-lora)"
    reads_base_files = True
    hub_relation = "adapter"
    hub_library = "peft"
    writes_unchanged = False

    def check(self, se: SiteEdit, site: Site, config: dict) -> Outcome:
        arch = adapter_for(config.get("model_type", ""))

        def rule(se: SiteEdit, site: Site, low: EditLowering) -> list[str] | None:
            kind = _rule(se, site, arch)
            if kind == "writer" and arch.writer_bias == "native":  # exact only where the bias has no part along û
                low.kind, low.note = "approximate", BIAS_NOTE
            return None if kind is None else [kind]
        return outcome_of(rule, se, site)

    def write(self, plan: Plan, model, tokenizer, out: Path, options: WriteOptions) -> Written:
        from steer.verify.fidelity import measure

        lowerings = write_adapter(plan, model, out, base_model_name=options.base)
        return Written(lowerings, fidelity=measure(model, plan, load_adapter(options.base_dir, out), tokenizer))

    def load(self, directory: Path, manifest: dict) -> Loaded:
        from steer.export.merge import base_directory

        return Loaded(model=load_adapter(base_directory(manifest["base_model"]["name"]), directory))

    def verify(self, directory: Path, manifest: dict, model, tokenizer, plan: Plan, verdict) -> None:
        from steer.verify.fidelity import judge, measure

        verdict.fidelity = measure(model, plan, self.load(directory, manifest).model, tokenizer)
        verdict.lines.append(("ok   " if verdict.fidelity.is_exact() else "note ") + verdict.fidelity.describe())
        judge(verdict, manifest, plan, verdict.fidelity)


ADAPTER = register(AdapterTarget())
