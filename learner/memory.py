"""A learner worker's memory, worked out from the config and each model's config.json.

The models are built on the meta device by the learner's own code (`learner.loading.skeleton`),
so the parameters counted are the ones the learner will hold, for a 7B model in a second. One
worker of `learner.num_workers` holds 1/N of every sharded tensor:
- weights: policy and critic in float32 (4 bytes a parameter), the reference's linear layers
  in the dtype they compute in (`learner.loading`); gradients (4); AdamW's two moments (8).
  With `learner.lora`, the policy's base in the compute dtype (and no reference: the base is
  it) and a float32 adapter, whose parameters alone have gradients and moments;
- the rollback snapshot (`learner.rollback`: 4 + 8 a trained parameter) when an update makes
  more than one optimizer step: pinned host memory beside a GPU, the same memory on a CPU;
- sharded only: the units FSDP2 gathers while computing (the current and the prefetched
  one, with the current one's whole gradient), and the root, gathered from the forward to
  the end of the backward;
- one micro-batch's activations (`ppo.micro_batch_size` rows of the longest prompt plus
  response): per decoder layer and token, the tensors its backward keeps
  (`Shape.activation_bytes_per_token`); with `learner.gradient_checkpointing`, a layer's
  input per layer plus one layer recomputed;
- the logits of one micro-batch: rows x response tokens x vocabulary, about five float32
  copies at the loss's peak (the head's output, the selected rows, the log-softmax and its
  exponential, which the backward keeps, and their product);
- the process itself: Python, torch, transformers and Ray on a CPU; the CUDA context, NCCL's
  buffers and the allocator's slack on a GPU.
Start-up holds the weights, plus the checkpoint being read (a worker's share of the largest
file, mapped while its tensors are copied out). An update's peak is the largest of the
policy's backward (its activations and logits), the critic's (the policy's gradients are
there by then) and the optimizer step (AdamW's temporaries on a GPU, where it runs all
tensors at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cluster.shared.config import TameConfig
from cluster.shared.hf_folder import file_headers, safetensors_files
from cluster.shared.lora import adapter_layout
from cluster.shared.transport import BUCKET_BYTES
from learner.loading import reference_dtype, roles, skeleton
from learner.sharding import sharding_units

GIB = 2**30
CPU_PROCESS = int(0.5 * GIB)
"""A learner or reward process on a CPU before its models: Python, torch, transformers, Ray's
worker (benchmarks/memory.py compares the plan with what each worker holds)."""
GPU_PROCESS = int(2.0 * GIB)
"""Device memory a GPU process holds beyond its tensors: CUDA context, NCCL buffers, the
caching allocator's slack. An estimate: not measured on a GPU here."""
LOGIT_COPIES = 5
"""Float32 vocabulary-sized tensors of one micro-batch at the loss's peak (module docstring)."""


@dataclass(frozen=True)
class Line:
    what: str
    nbytes: int


@dataclass(frozen=True)
class Shape:
    """What the plan needs of one model, counted on its meta-device build."""

    parameters: int
    weight_bytes: int
    largest_unit: int
    """Parameters of the largest unit FSDP2 gathers at once (a decoder layer, the embeddings)."""
    root: int
    """Parameters left in the root unit."""
    hidden: int
    intermediate: int
    layers: int
    kv_width: int
    """Key/value heads x head dim: one token's keys (or values) in one layer."""
    vocab: int
    checkpoint_bytes: int
    """Size of the largest safetensors file of its folder (0 without one: a config-only folder)."""
    checkpoint_float32: bool
    """Whether its checkpoint holds float32 weights."""

    def activation_bytes_per_token(self, element: int) -> int:
        """What one decoder layer's backward keeps per token: the two RMSNorms' float32
        input, normalised and scaled tensors (6h); q, k, v, their rotated copies, the
        attention output and its re-laid copy (4h + 4 kv); the MLP's gate, up, activation and
        product (4i), in the compute dtype."""
        return 4 * 6 * self.hidden + element * (4 * self.hidden + 4 * self.kv_width + 4 * self.intermediate)


@dataclass(frozen=True)
class Budget:
    nbytes: int | None
    source: str


@dataclass(frozen=True)
class WorkerPlan:
    """One learner worker: what it holds always, and its peaks."""

    workers: int
    device: str
    held: list[Line]
    """From the start on: the process and the weights."""
    trained: list[Line]
    """From the first update on: optimizer states, the snapshot."""
    startup_extra: list[Line]
    phases: dict[str, list[Line]]
    """Each phase of an update and what it adds to `held`."""
    budget: Budget
    host: list[Line]
    """Host memory beside a GPU (on a CPU, all of it is in the lines above)."""

    @property
    def startup_bytes(self) -> int:
        return sum(x.nbytes for x in self.held + self.startup_extra)

    @property
    def update_bytes(self) -> int:
        return sum(x.nbytes for x in self.held + self.trained) + max(
            sum(x.nbytes for x in lines) for lines in self.phases.values()
        )

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: sum(x.nbytes for x in self.phases[k]))

    def fits(self) -> bool:
        return self.budget.nbytes is None or self.update_bytes <= self.budget.nbytes

    def render(self) -> str:
        out = [f"learner worker (1 of {self.workers}, {self.device}; {describe(self.budget)})"]
        out += [row(x) for x in self.held + self.trained]
        out += [row(Line(f"{x.what} (start-up)", x.nbytes)) for x in self.startup_extra if x.nbytes]
        peak = self.peak_phase
        out += [row(Line(f"{x.what} ({peak})", x.nbytes)) for x in self.phases[peak] if x.nbytes]
        out.append(row(Line("= start-up", self.startup_bytes)))
        out.append(row(Line(f"= update peak ({peak})", self.update_bytes)) + verdict(self.fits()))
        out += [row(Line(f"host memory: {x.what}", x.nbytes)) for x in self.host]
        return "\n".join(out)


def row(line: Line) -> str:
    return f"  {line.what:<78}{line.nbytes / GIB:>7.2f} GiB"


def describe(budget: Budget) -> str:
    return f"{budget.nbytes / GIB:.1f} GiB, {budget.source}" if budget.nbytes is not None else budget.source


def verdict(ok: bool) -> str:
    return "  fits" if ok else "  DOES NOT FIT"


# --------------------------------------------------------------------------- shapes


def shape(cfg: TameConfig, role: str, path: str | Path) -> Shape:
    """Count `role`'s model ("policy", "reference", "critic") as the learner builds it."""
    model = skeleton(cfg, role, path)
    params = {id(p): p for p in model.parameters()}.values()
    units = [sum(p.numel() for p in unit.parameters()) for unit in sharding_units(model)]
    c = model.config
    c = getattr(c, "text_config", c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    files = safetensors_files(path)
    float32 = bool(files) and all(h.dtype == "F32" for h in file_headers(files[0]).values())
    return Shape(
        parameters=sum(p.numel() for p in params),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        largest_unit=max(units),
        root=sum(p.numel() for p in params) - sum(units),
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        layers=c.num_hidden_layers,
        kv_width=kv_heads * head_dim,
        vocab=c.vocab_size,
        checkpoint_bytes=max((f.stat().st_size for f in files), default=0),
        checkpoint_float32=float32,
    )


# --------------------------------------------------------------------------- the learner


def learner_worker(cfg: TameConfig, budget: Budget | None = None) -> WorkerPlan:
    """What one learner worker holds (module docstring)."""
    lc, p = cfg.learner, cfg.ppo
    n = lc.num_workers
    cuda = lc.device == "cuda"
    shapes = {role: shape(cfg, role, path) for role, path in roles(cfg).items()}
    trained = {role: s for role, s in shapes.items() if role != "reference"}
    compute = 2 if "bfloat16" in (lc.compute_dtype, lc.param_dtype) else 4
    # Parameters that train, by role: a LoRA policy's adapter alone (its base is frozen).
    adapter = sum(math.prod(x) for x in adapter_layout(cfg).values()) if lc.lora else 0
    learns = {role: adapter if role == "policy" and lc.lora else s.parameters for role, s in trained.items()}

    held = [
        Line(
            "the process (" + ("CUDA context, NCCL, allocator" if cuda else "Python, torch, Ray") + ")",
            GPU_PROCESS if cuda else CPU_PROCESS,
        )
    ]
    states: list[Line] = []
    for role, s in shapes.items():
        share = f"{s.parameters / 1e9:.2f}B parameters" + (f", 1/{n}" if n > 1 else "")
        if role == "reference":
            linears = str(reference_dtype(cfg)).removeprefix("torch.")
            held.append(Line(f"reference weights, linear layers in {linears} ({share})", s.weight_bytes // n))
        elif role == "policy" and lc.lora:
            held.append(
                Line(f"policy base, frozen, {lc.compute_dtype}, the reference too ({share})", compute * s.parameters)
            )
            held.append(Line(f"policy LoRA adapter, float32 ({adapter / 1e6:.2f}M parameters)", 4 * adapter))
        else:
            held.append(Line(f"{role} weights, float32 ({share})", 4 * s.parameters // n))
        if role != "reference":
            states.append(Line(f"{role} AdamW moments, float32", 8 * learns[role] // n))
    minibatches = math.ceil(cfg.train.rollout_batch_size / p.minibatch_size)
    host = []
    if p.epochs * minibatches > 1:
        snapshot = Line("rollback snapshot of weights and moments", 12 * sum(learns.values()) // n)
        (host if cuda else states).append(snapshot)

    gathered: list[Line] = []
    if n > 1:
        gathered_bytes = 2 if lc.param_dtype == "bfloat16" else 4
        largest = max(s.largest_unit for s in shapes.values())
        root = max(s.root for s in shapes.values())
        gathered = [
            Line("gathered by FSDP2: two units and one unit's gradient", largest * (2 * gathered_bytes + 4)),
            Line("gathered by FSDP2: the root and its gradient", root * (gathered_bytes + 4)),
        ]
    rows = p.micro_batch_size
    tokens = min(cfg.rollout.max_model_len, cfg.data.max_prompt_tokens + cfg.rollout.sampling.max_new_tokens)
    response = min(tokens, cfg.rollout.sampling.max_new_tokens)

    def activations(s: Shape) -> Line:
        per_layer = s.activation_bytes_per_token(compute)
        if lc.gradient_checkpointing:
            nbytes = rows * tokens * (s.layers * 4 * s.hidden + per_layer)
            return Line(f"activations, {rows} x {tokens} tokens, checkpointed", nbytes)
        return Line(f"activations, {rows} x {tokens} tokens", rows * tokens * s.layers * per_layer)

    policy = shapes["policy"]
    grads = {role: Line(f"{role} gradients, float32", 4 * learns[role] // n) for role in trained}
    phases = {
        "policy backward": [
            grads["policy"],
            activations(policy),
            *gathered,
            Line(
                f"logits, {rows} x {response} x {policy.vocab} x 4 bytes x {LOGIT_COPIES}",
                LOGIT_COPIES * 4 * rows * response * policy.vocab,
            ),
        ]
    }
    if "critic" in trained:
        phases["critic backward"] = [grads["policy"], grads["critic"], activations(trained["critic"]), *gathered]
    step = [*grads.values()]
    if cuda:  # foreach AdamW: a temporary the size of the largest optimizer's parameters
        step.append(Line("AdamW step temporaries", 4 * max(learns.values()) // n))
    phases["optimizer step"] = step
    # The update's last step publishes the policy (`cluster.shared.transport`): rank 0 gathers
    # it a bucket at a time when sharded, and writes the object store's copy, shared memory
    # that Ray holds once per node whatever the number of workers (host memory here, counted
    # apart); a cast for the transport is staged in buffers kept from one version to the next.
    sent_dtype = cfg.learner.transport_dtype or cfg.model.dtype
    sent = learns["policy"] * (4 if sent_dtype == "float32" else 2)
    what = "the LoRA adapter" if lc.lora else "the policy"
    host.append(Line(f"the object store's copy of {what}, {sent_dtype} (Ray's, once per node)", sent))
    if n > 1:
        phases["publication"] = [Line("publication: one bucket of gathered tensors", min(BUCKET_BYTES, sent))]
    if sent_dtype != "float32" or cuda:
        (host if cuda else states).append(Line(f"{what} staged in {sent_dtype} for publication", sent))
    # One worker on a CPU maps a float32 checkpoint into float32 weights without copying it:
    # they are in memory once first used (the reference's linear layers are copies when
    # they compute in another dtype).
    mapped = {
        role: s
        for role, s in shapes.items()
        if n == 1
        and not cuda
        and s.checkpoint_float32
        and (role != "reference" or s.weight_bytes == 4 * s.parameters)
        and (role != "policy" or not lc.lora or compute == 4)
    }
    read = [s.checkpoint_bytes for role, s in shapes.items() if role not in mapped]
    startup = [Line("the checkpoint file being read", max(read, default=0) // n)]
    if mapped:
        startup.append(
            Line(
                f"less the {', '.join(mapped)} weights, mapped from float32 files until first used",
                -sum(s.weight_bytes if role == "reference" else 4 * s.parameters for role, s in mapped.items()),
            )
        )
    return WorkerPlan(n, lc.device, held, states, startup, phases, budget or Budget(None, "memory unknown"), host)


def check_device(cfg: TameConfig, device) -> None:
    """Refuse to load models that would not fit this worker's GPU: the check a run without
    cluster.gpu_memory_gib gets, made by each worker before it loads anything."""
    import torch

    from cluster.shared.errors import UserError

    total = torch.cuda.get_device_properties(device).total_memory
    worker = learner_worker(cfg, Budget(total, f"{torch.cuda.get_device_name(device)}"))
    if not worker.fits():
        raise UserError(
            f"a learner worker needs {worker.update_bytes / GIB:.1f} GiB at its update peak, its GPU has "
            f"{total / GIB:.1f} GiB: `tame plan` shows the layouts that fit\n" + worker.render()
        )
