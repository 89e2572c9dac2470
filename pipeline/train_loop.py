"""The training loop, without Ray: runs inside a Ray Train worker (:mod:`pipeline.ray_train`), under ``torchrun``
(``python -m pipeline.train_loop``) or in one process (a Tune trial in its actor, tests).

Data order (why every rank reads the whole stream): each worker iterates the full train split in file order,
shuffles rows inside windows of ``train.length_group_window`` global batches (seeded by seed, epoch, window),
groups them by length, and cuts *global* batches of ``micro_batch_size × grad_accum × num_workers`` pairs;
micro-step ``j`` of a step gives rank ``r`` the slice ``[r·m, (r+1)·m)`` of the ``j``-th block. So the pairs
of every optimizer step are the same whatever the worker count or accumulation (the invariance tests), and a
resumed run skips exactly the global batches already consumed. The incomplete last global batch is dropped.

NormBT's μ is updated once per optimizer step from the all-reduced mean distance of the whole global batch.
With ``grad_accum > 1`` that needs the distances before the first backward, so a no-grad pre-pass computes
them (one extra forward per step, only for NormBT with accumulation).

Checkpoints: every rank calls DeepSpeed ``save_checkpoint`` into its own temp folder and then ``report(...,
checkpoint_dir=...)``; Ray merges them. ``client_state`` carries the step, consumed global batches, the EMA
state and the RNG states. A NaN/Inf loss stops the run naming the step (``train.nan_policy=stop``) or skips the
step (``skip``); it never reaches a checkpoint. The final checkpoint holds ``model/``, the exported
``save_pretrained`` folder.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline import lora, losses, modeling, tracking
from pipeline.config import PipelineConfig, from_flat
from pipeline.distributed import Collectives, compute_device

CKPT_TAG = "ckpt"
VALIDATION_REWARDS = "validation_rewards.parquet"  # beside model/ in the final checkpoint
GRADIENT_PAIRS = "gradient_pairs.csv"  # beside model/ too: (distance, score-head gradient norm) per recorded pair
TRAIN_COLUMNS = ["chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "margin"]


@dataclass(frozen=True, kw_only=True)
class LoopPlan:
    """Everything the loop needs besides the model config: sizes derived on the driver."""

    max_steps: int
    steps_per_epoch: int
    world_size: int
    rank: int


def global_batches(windows: Iterable[list[dict]], *, global_batch: int, seed: int, epoch: int) -> Iterator[list[dict]]:
    """Windows of rows (file order) → shuffled, length-grouped global batches; the incomplete tail is dropped."""
    carry: list[dict] = []
    for w, window in enumerate(windows):
        rows = carry + list(window)
        rng = random.Random(f"{seed}:{epoch}:{w}")
        rng.shuffle(rows)
        full = len(rows) - len(rows) % global_batch
        rows, carry = rows[:full], rows[full:]
        rows.sort(key=lambda r: max(r["chosen_len"], r["rejected_len"]))
        batches = [rows[i: i + global_batch] for i in range(0, full, global_batch)]
        rng.shuffle(batches)
        yield from batches


def timed(items: Iterable, waits: list[float]) -> Iterator:
    """Yield from ``items``, appending to ``waits`` the seconds each item took to arrive (data-wait time)."""
    it = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        waits.append(time.perf_counter() - start)
        yield item


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``items`` in a background thread started now, at most ``depth`` items ahead; errors re-raise here.

    The loop starts reading its first epoch this way before DeepSpeed builds the engine, so the stream's
    start-up (Ray Data planning, Parquet reads) overlaps model set-up instead of showing up as data wait.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer went away

    def fill() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(err))

    threading.Thread(target=fill, name="train-prefetch", daemon=True).start()

    def drain() -> Iterator:
        try:
            while (item := buffer.get()) is not end:
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()

    consumer = drain()
    weakref.finalize(consumer, stop.set)  # never iterated (the caller failed first): stop the thread anyway
    return consumer


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def micro_slices(batch: list[dict], *, micro: int, accum: int, world: int, rank: int) -> list[list[dict]]:
    """The ``accum`` micro-batches this rank trains on within one global batch."""
    block = micro * world
    return [batch[j * block + rank * micro: j * block + (rank + 1) * micro] for j in range(accum)]


def collate(rows: list[dict], pad_token_id: int, device: torch.device, packing: bool = False
            ) -> dict[str, torch.Tensor]:
    """Chosen then rejected, padded together (one forward), or packed in one row without padding
    (:func:`modeling.pack_pairs`); ``margin [B]`` with NaN where a pair has none."""
    join = modeling.pack_pairs if packing else modeling.collate_pairs
    batch = join([r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows], pad_token_id)
    margins = [math.nan if r.get("margin") is None else float(r["margin"]) for r in rows]
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["margin"] = torch.tensor(margins, dtype=torch.float32, device=device)
    return batch


def uses_bf16(cfg: PipelineConfig, use_gpu: bool) -> bool:
    """DeepSpeed's bf16 mode (bf16 weights, activations and gradients; fp32 master weights and Adam state)."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_gpu)


def padding_fraction(rows: list[dict], *, packing: bool) -> float:
    """Share of the micro-batch's token slots that are padding: chosen and rejected rows padded to the longest
    side of any pair, or none when packed."""
    if packing or not rows:
        return 0.0
    lengths = [n for r in rows for n in (r["chosen_len"], r["rejected_len"])]
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))


def deepspeed_config(cfg: PipelineConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config. Offload (ZeRO-Offload / ZeRO-Infinity to CPU) moves the optimizer partition (and under
    ZeRO-3 the weights) to pinned CPU memory; DeepSpeed then insists on its own CPU Adam unless told otherwise,
    which :func:`_optimizer` uses on GPU. On a CPU-only node the partition already lives in CPU memory and the plain
    torch AdamW steps it (DeepSpeed's CPU Adam would JIT-compile for about 70 s)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    offloaded = t.offload_optimizer or t.offload_params
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        **({"zero_force_ds_cpu_optimizer": t.use_gpu} if offloaded else {}),
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """transformers' convention: weight decay on weight matrices only. Biases and norm weights (every parameter
    with fewer than two dimensions) and the score head (its scale is the reward scale) are not decayed."""
    head = {id(p) for p in modeling.score_head(model).parameters()}
    decay, plain = [], []
    for param in model.parameters():
        if param.requires_grad:
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitions keep their full shape here
            (plain if len(shape) < 2 or id(param) in head else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _optimizer(cfg: PipelineConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    if (t.offload_optimizer or t.offload_params) and t.use_gpu:
        # The offloaded partition lives in CPU memory: DeepSpeed's vectorised CPU Adam steps it (built on first use).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, adamw_mode=True)
    # A plain torch optimizer: DeepSpeed's fused/CPU Adam would JIT-compile for ~70 s on CPU. torch's own
    # fused kernel needs no compile and runs on CPU and CUDA; on CPU torch would otherwise pick its per-tensor
    # loop, 18% of a MiniLM step (benchmarks/README.md).
    return torch.optim.AdamW(groups, lr=t.lr, fused=True)


def skip_shared_memory_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op (``deepspeed_shm_comm``).

    On a CPU node every new environment compiles it when the first process group starts (45-53 s on 2 cores),
    under a lock file in torch's extensions folder. A process killed while it compiles (a trial stopped by ASHA,
    a killed worker or driver) leaves that lock behind, and every later start of DeepSpeed in that environment
    waits on it forever. The op serves DeepSpeed's inference all-reduce only; training reduces through
    torch.distributed (gloo, NCCL), so it is marked unavailable and never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(cfg: PipelineConfig, plan: LoopPlan, use_gpu: bool) -> tuple[Any, Any, Any]:
    """``(engine, model, tokenizer)``: the reward-model contract wrapped by ``deepspeed.initialize``."""
    import deepspeed
    from transformers import get_scheduler

    skip_shared_memory_comm_build()

    ds_config = deepspeed_config(cfg, uses_bf16(cfg, use_gpu))
    tok = modeling.load_tokenizer(cfg.model.name_or_path, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code, template_date=cfg.data.template_date)
    hf_ds = None
    if cfg.train.zero_stage == 3 and not modeling.tiny_arch(cfg.model.name_or_path):
        # Pretrained weights are loaded straight into ZeRO-3 partitions (transformers' init context), so no rank
        # holds the whole model. Random tiny models are small: built whole, they start from the same weights as
        # under ZeRO 0-2 (a partitioned random init draws differently).
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)
    model = reward_model_for(cfg, tok)
    if cfg.train.packing and modeling.is_encoder(model):
        raise ValueError(f"train.packing applies to decoders only; {cfg.model.name_or_path} is an encoder "
                         f"({model.config.model_type}: bidirectional attention over absolute positions, which "
                         f"transformers cannot split by position_ids): set train.packing=false")
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = _optimizer(cfg, model)
    warmup = int(round(cfg.train.warmup_ratio * plan.max_steps))
    scheduler = get_scheduler(cfg.train.scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=plan.max_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    del hf_ds  # alive, it would make any later model construction run ZeRO collectives (a hang)
    engine.eval()  # dropout off in training too (modeling.disable_dropout): eval mode is the rule, not a flag
    if cfg.train.gradient_checkpointing:
        modeling.engage_checkpointing(model)  # eval mode would skip it (modeling.enable_checkpointing)
    return engine, model, tok


def reward_model_for(cfg: PipelineConfig, tok: Any) -> torch.nn.Module:
    """The model a run trains: the configured backbone with its score head, and the head-input LayerNorm when
    ``loss.head_input_norm`` asks for it (recorded in the model's config, so the export scores the same way);
    LoRA adapters on it when ``lora.r`` > 0 (:mod:`pipeline.lora`).

    fp32 whatever the checkpoint's dtype: under 'fp32' the run trains fp32; under bf16 DeepSpeed casts the
    weights to bf16 itself and keeps the fp32 master copies (transformers 5 would otherwise load a bf16 hub
    checkpoint in bf16, and an 'fp32' run would train pure bf16 with no fp32 master weights)."""
    model = modeling.build_reward_model(cfg.model.name_or_path, tok, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code, seed=cfg.model.seed,
                                        dtype=torch.float32, attn_implementation=cfg.model.attn_implementation,
                                        head_input_norm=cfg.loss.head_input_norm, load_kwargs=lora.load_kwargs(cfg.lora))
    return lora.apply_lora(model, cfg.lora)  # unchanged when lora.r is 0


def _fault_injection(step: int) -> None:
    """Test hook: ``NORMBT_FAIL_AT_STEP=k:/path/marker`` kills this worker once at step ``k``."""
    spec = os.environ.get("NORMBT_FAIL_AT_STEP")
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if step == int(at) and marker and not os.path.exists(marker):
        Path(marker).write_text(str(step))
        os._exit(17)  # a hard crash: no clean-up, like a killed process


def _loss(cfg: PipelineConfig, out: tuple, batch: dict, mu: float | None) -> tuple[torch.Tensor, dict]:
    rc, rr, hc, hr = out
    margin = batch["margin"] if cfg.loss.use_margin else None
    if margin is not None and bool(torch.isnan(margin).any()):
        # The data stage refuses or zero-fills margin-less pairs under loss.use_margin; never fall back to BT here.
        raise ValueError(f"loss.use_margin=true but {int(torch.isnan(margin).sum())} pair(s) of this batch have no "
                         f"margin; rerun the data stage (data.missing_margin decides what happens to them)")
    kw = {"margin": margin, "label_smoothing": cfg.loss.label_smoothing, "center_coef": cfg.loss.center_coef}
    if cfg.loss.name == "bt":
        return losses.bt_loss(rc, rr, **kw)
    if cfg.loss.name == "bt_clip":
        return losses.clipped_bt_loss(rc, rr, hc, hr, clip=cfg.loss.clip, **kw)
    return losses.normbt_loss(rc, rr, hc, hr, mu=mu, eps=cfg.loss.eps, distance=cfg.loss.distance, **kw)


def pooled(cfg: PipelineConfig) -> bool:
    """Whether the loop's forwards return mean-pooled hidden states (NormBT's mean-pooled-distance ablation)
    instead of the score head's input: the distances of the loss, μ and validation are then measured on them."""
    return cfg.loss.representation == "mean_pooled"


def _gradient_pairs(cfg: PipelineConfig, out: tuple, batch: dict, mu: float | None) -> np.ndarray:
    """``[B, 2]``: each pair's distance and the norm of the gradient its loss term sends to the score head
    (the head-input L2 distance; none under the mean-pooled representation, whose forward does not return the
    head's input, so the slope would not be the head's)."""
    rc, rr, hc, hr = out
    if pooled(cfg):
        return np.zeros((0, 2))
    d = losses.pair_distances(hc, hr).float()
    margin = batch["margin"] if cfg.loss.use_margin else None
    weights = None
    if cfg.loss.name == "normbt" and mu is not None and mu > 0:
        weights = mu / (losses.pair_distances(hc, hr, kind=cfg.loss.distance).float() + cfg.loss.eps)
    elif cfg.loss.name == "bt_clip":
        weights = losses.clip_weights(rc, rr, d, clip=cfg.loss.clip, margin=margin,
                                      label_smoothing=cfg.loss.label_smoothing)
    norms = losses.pair_gradient_norms(rc, rr, d, weights=weights, margin=margin,
                                       label_smoothing=cfg.loss.label_smoothing)
    return torch.stack([d.cpu(), norms.cpu()], dim=1).numpy().astype(np.float64)


def _step_distance(cfg, engine, model, micro_batches, pad, device, first_out, comm: Collectives) -> float | None:
    """The all-reduced global batch-mean distance of this optimizer step (NormBT only; μ is not touched here)."""
    if cfg.loss.name != "normbt":
        return None
    outs = [first_out] if first_out is not None else []
    if first_out is None or len(micro_batches) > 1:
        with torch.no_grad():
            outs = [modeling.forward_pairs(model, collate(mb, pad, device, cfg.train.packing), engine=engine,
                                           pooled=pooled(cfg)) for mb in micro_batches]
    local = [float(losses.pair_distances(o[2], o[3], kind=cfg.loss.distance).sum()) for o in outs]
    total, count = comm.all_reduce([sum(local), float(sum(len(mb) for mb in micro_batches))])
    return total / count


def _mean_metrics(per_micro: list[dict], comm: Collectives) -> dict[str, float]:
    """Average over micro-batches and ranks (equal sizes), min/max for the extremes."""
    keys = sorted(per_micro[0])
    means = comm.all_reduce([sum(m[k] for m in per_micro) / len(per_micro) for k in keys])
    out = {k: v / comm.world for k, v in zip(keys, means, strict=True)}
    for suffix, op in (("_min", "min"), ("_max", "max")):
        ks = [k for k in keys if k.endswith(suffix)]
        if ks:
            reduce = min if op == "min" else max
            out.update(zip(ks, comm.all_reduce([reduce(m[k] for m in per_micro) for k in ks], op), strict=True))
    return out


def train_one_step(cfg, engine, model, micro_batches, ema, pad, device, step, comm: Collectives,
                   diagnostics: list[np.ndarray] | None = None) -> dict[str, float] | None:
    """Forward/backward every micro-batch, one optimizer step. None when a non-finite loss was skipped.

    Order: the candidate μ is computed from this step's distances, every loss is checked (all ranks agree) before
    its backward, and μ is committed only once the step has been taken, so a skipped step leaves μ as it was.
    A skipped step still advances the LR schedule, which stays a function of the step counter.
    ``diagnostics``, when given, receives ``[B, 2]`` = (distance, score-head gradient norm) of micro-batch 0."""
    first = modeling.forward_pairs(model, collate(micro_batches[0], pad, device, cfg.train.packing), engine=engine,
                                   pooled=pooled(cfg))
    distance = _step_distance(cfg, engine, model, micro_batches, pad, device,
                              first if len(micro_batches) == 1 else None, comm)
    mu = ema.peek(distance) if distance is not None else None
    per_micro = []
    for j, rows in enumerate(micro_batches):
        batch = collate(rows, pad, device, cfg.train.packing)
        out = first if j == 0 else modeling.forward_pairs(model, batch, engine=engine, pooled=pooled(cfg))
        if os.environ.get("NORMBT_NAN_AT_STEP") == str(step):  # test hook for the NaN guard
            out = (out[0] * float("nan"), *out[1:])
        loss, metrics = _loss(cfg, out, batch, mu)
        bad = comm.all_reduce([0.0 if torch.isfinite(loss) else 1.0], "max")[0]
        if bad:
            if cfg.train.nan_policy == "stop":
                raise FloatingPointError(f"non-finite loss at optimizer step {step} (micro-batch {j}); "
                                         f"stopping before any update or checkpoint (train.nan_policy=stop)")
            # Nothing was backpropagated this step (nan_policy=skip requires grad_accum=1).
            engine.lr_scheduler.step()
            return None
        if j == 0 and diagnostics is not None:  # a step that is taken (a skipped one trains nothing)
            diagnostics.append(_gradient_pairs(cfg, out, batch, mu))
        engine.backward(loss)
        if j == len(micro_batches) - 1 and cfg.train.zero_stage == 0:
            # the boundary's reduced gradients (ZeRO-0 keeps them whole on the parameters), before the step clips
            own_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        engine.step()
        per_micro.append({**metrics, "padding_fraction": padding_fraction(rows, packing=cfg.train.packing)})
    if distance is not None:
        ema.update(distance)
    metrics = _mean_metrics(per_micro, comm)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None and cfg.train.zero_stage == 0:
        grad_norm = own_norm  # DeepSpeed's stage 0 clips in fp32 without keeping the norm
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = float(engine.get_lr()[0])
    return metrics


def eval_batches(n_rows: int, world: int, rank: int, size: int, lengths: list[int] | None = None) -> list[list[int]]:
    """Row indices of this rank's validation forwards: rows ``rank, rank + world, ...`` in chunks of ``size``,
    padded with empty chunks so every rank runs the same number of forwards (under ZeRO-3 each forward gathers
    parameters collectively: a rank with one forward more would wait forever, or meet the wrong collective).
    With ``lengths`` (a pair's padded length), a rank's rows go shortest first, so a chunk pads little (on
    the default's validation split, 31% fewer tokens than in row order); results are put back in row order."""
    mine = list(range(rank, n_rows, world))
    if lengths is not None:
        mine.sort(key=lambda i: lengths[i])
    forwards = math.ceil(math.ceil(n_rows / world) / size) if n_rows else 0
    return [mine[i * size: (i + 1) * size] for i in range(forwards)]


@torch.no_grad()
def evaluate(cfg, engine, model, rows: list[dict], pad, device, comm: Collectives) -> tuple[dict[str, Any], np.ndarray]:
    """Validation metrics (loss, accuracy, reward mean/std, accuracy by distance quartile: the paper's diagnosis)
    and the per-pair table ``[n, 4]`` = ``(row, r_chosen, r_rejected, distance)`` in row order, the same on
    every rank. A padding forward (see :func:`eval_batches`) scores the first row and discards the result."""
    local: list[tuple[float, float, float, float]] = []
    lengths = [max(r["chosen_len"], r["rejected_len"]) for r in rows]  # chosen and rejected pad together
    for chunk in eval_batches(len(rows), comm.world, comm.rank, max(1, cfg.train.micro_batch_size * 2), lengths):
        batch_rows = [rows[i] for i in chunk] or rows[:1]
        rc, rr, hc, hr = modeling.forward_pairs(model, collate(batch_rows, pad, device, cfg.train.packing),
                                                engine=engine, pooled=pooled(cfg))
        if chunk:
            d = losses.pair_distances(hc, hr, kind=cfg.loss.distance)
            local += list(zip(chunk, rc.tolist(), rr.tolist(), d.float().tolist(), strict=True))
    table = comm.all_gather_rows(np.array(local, dtype=np.float64).reshape(-1, 4))
    table = table[np.argsort(table[:, 0], kind="stable")]
    return validation_metrics(table[:, 1:]), table


def validation_metrics(table: np.ndarray) -> dict[str, Any]:
    """``table`` rows are ``(r_chosen, r_rejected, distance)``; BT loss = mean softplus(-(r_c - r_r))."""
    if len(table) == 0:
        return {"val_accuracy": float("nan"), "val_loss": float("nan"), "val_pairs": 0}
    delta = table[:, 0] - table[:, 1]
    rewards = table[:, :2].reshape(-1)
    out: dict[str, Any] = {"val_accuracy": float((delta > 0).mean()), "val_loss": float(np.logaddexp(0, -delta).mean()),
                           "val_pairs": int(len(table)), "val_reward_mean": float(rewards.mean()),
                           "val_reward_std": float(rewards.std()), "val_distance_mean": float(table[:, 2].mean())}
    edges = np.quantile(table[:, 2], [0.25, 0.5, 0.75])
    quartile = np.searchsorted(edges, table[:, 2], side="right")
    for q in range(4):
        sel = quartile == q
        if sel.any():
            out[f"val_accuracy_dq{q + 1}"] = float((delta[sel] > 0).mean())
    return out


def run_loop(cfg: PipelineConfig, plan: LoopPlan, *, train_windows: Callable[[int], Iterable[list[dict]]],
             validation_rows: Callable[[], list[dict]], report: Callable[..., None],
             restore_dir: str | None, use_gpu: bool, logger: tracking.RunLogger, started: float | None = None) -> None:
    """The training loop. ``train_windows(epoch)`` yields windows of rows in file order; ``report(metrics,
    checkpoint_dir=None, final=False)`` publishes metrics (and a checkpoint folder written by every rank).
    ``started``: when this run began (default: this process's start; a reused process passes its own)."""
    device = compute_device(use_gpu)
    marks = {"loop_start": time.time()}  # where a run's wall time goes: reported as phase/* in the final metrics
    if started is not None:
        marks["started"] = started
    first_epoch = prefetched(train_windows(0)) if restore_dir is None else None  # reads while the engine builds
    engine, model, tok = build_engine(cfg, plan, use_gpu)
    marks["engine_built"] = time.time()
    comm = Collectives(device)  # after deepspeed.initialize, which creates the process group under torchrun
    ema = losses.DistanceEMA(cfg.loss.beta)
    step = consumed = 0
    if restore_dir:
        _, client = engine.load_checkpoint(restore_dir, tag=CKPT_TAG)
        step, consumed = client["step"], client["consumed"]
        ema.load_state_dict(client["ema"])
        torch.set_rng_state(client["torch_rng"])
        if plan.rank == 0:
            print(f"resumed from the checkpoint at step {step} ({consumed} global batches consumed)", flush=True)
    t = cfg.train
    last = last_step(cfg, plan.max_steps)  # the schedule (build_engine) spans plan.max_steps either way
    global_batch = t.micro_batch_size * t.grad_accum * plan.world_size
    start, seen = time.time(), step
    waits: list[float] = []  # seconds each global batch took to arrive: the loop's data-wait time
    wait_s = busy_s = eval_s = 0.0
    diagnostics: list[np.ndarray] = []  # since this worker group started (a restart begins a new record)
    for epoch in range(step // plan.steps_per_epoch, max(1, math.ceil(plan.max_steps / plan.steps_per_epoch))):
        windows = first_epoch if epoch == 0 and first_epoch is not None else train_windows(epoch)
        batches = global_batches(windows, global_batch=global_batch, seed=t.seed, epoch=epoch)
        for index, batch in enumerate(timed(batches, waits)):
            if epoch * plan.steps_per_epoch + index < consumed:
                continue  # consumed before a restart: skip, never train twice
            if step >= last:
                break
            _fault_injection(step)
            micro = micro_slices(batch, micro=t.micro_batch_size, accum=t.grad_accum, world=plan.world_size,
                                 rank=plan.rank)
            tick = time.time()
            due = plan.rank == 0 and t.grad_diag_every > 0 and step % t.grad_diag_every == 0
            metrics = train_one_step(cfg, engine, model, micro, ema, tok.pad_token_id, device, step, comm,
                                     diagnostics if due else None)
            step, consumed = step + 1, epoch * plan.steps_per_epoch + index + 1
            took = max(time.time() - tick, 1e-9)
            wait_s, busy_s = wait_s + waits[-1], busy_s + took
            if metrics is None:
                continue
            metrics.update(step=step, pairs_per_s=global_batch / took,
                           tokens_per_s=sum(r["chosen_len"] + r["rejected_len"] for r in batch) / took,
                           data_wait_fraction=wait_s / (wait_s + busy_s))
            evaluated = bool(t.eval_every) and step % t.eval_every == 0 and step < last
            if evaluated:
                tock = time.time()
                metrics.update(evaluate(cfg, engine, model, validation_rows(), tok.pad_token_id, device, comm)[0])
                eval_s += time.time() - tock
            publish = evaluated or step % t.log_every == 0  # validation results always go out (Tune's ASHA)
            if plan.rank == 0 and publish:
                logger.log_metrics(metrics, step=step)
                _progress(step, last, metrics, start, seen)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < last:
                _checkpoint(engine, step, consumed, ema, metrics, report)
            elif publish:
                report(metrics)
        if step >= last:
            break
    marks["steps_done"] = time.time()
    final, table = evaluate(cfg, engine, model, validation_rows(), tok.pad_token_id, device, comm)
    final["step"] = step
    final.update(lora.run_metrics(cfg.lora, model))  # r, alpha, trainable/total parameters (also without LoRA)
    final["data_wait_fraction"] = wait_s / max(wait_s + busy_s, 1e-9)
    final.update(_phases(marks, time.time(), steps_s=busy_s, wait_s=wait_s, eval_s=eval_s))
    final["phase/end_unix"] = time.time()  # when the final validation ended: consecutive runs' wall times
    gradient_pairs = np.concatenate(diagnostics) if diagnostics else np.zeros((0, 2))
    if plan.rank == 0 and len(gradient_pairs):
        from pipeline.metrics import loglog_slope

        final["grad/distance_slope"] = loglog_slope(gradient_pairs[:, 0], gradient_pairs[:, 1])
        final["grad/pairs"] = len(gradient_pairs)
    if plan.rank == 0:
        logger.log_metrics(final, step=step)
    _checkpoint(engine, step, consumed, ema, final, report,
                export=(model, tok, final, cfg, table, gradient_pairs))


def _phases(marks: dict[str, float], now: float, *, steps_s: float, wait_s: float, eval_s: float) -> dict[str, float]:
    """Seconds of each phase of this worker's run: process start to the loop (interpreter, imports, Ray Train's
    worker set-up), the engine (tokenizer, model, deepspeed.initialize), steps and the waits for data between
    them, the evaluations during the loop (``train.eval_every``; a Tune trial's ASHA rungs), everything else in
    the loop (reports, intermediate checkpoints), the final evaluation. The final checkpoint and export come in
    ``phase/checkpoint_s``."""
    try:
        import psutil

        process_s = marks["loop_start"] - marks.get("started", psutil.Process().create_time())
    except (ImportError, OSError):
        process_s = float("nan")
    loop_s = marks["steps_done"] - marks["engine_built"]
    return {"phase/process_s": process_s, "phase/engine_s": marks["engine_built"] - marks["loop_start"],
            "phase/steps_s": steps_s, "phase/data_wait_s": wait_s,
            "phase/mid_validation_s": eval_s, "phase/loop_other_s": max(0.0, loop_s - steps_s - wait_s - eval_s),
            "phase/validation_s": now - marks["steps_done"]}


def _progress(step: int, total: int, m: dict, start: float, seen: int) -> None:
    rate = (step - seen) / max(time.time() - start, 1e-9)
    eta = (total - step) / rate if rate > 0 else float("inf")
    # A weighted loss (NormBT) also shows the plain BT loss of the same pairs: the one that falls as the model learns.
    plain = f" (BT {m['pair_loss']:.4f})" if abs(m.get("pair_loss", m["loss"]) - m["loss"]) > 1e-6 else ""
    print(f"step {step}/{total}  loss {m['loss']:.4f}{plain}  acc {m['accuracy']:.3f}  {m['pairs_per_s']:.1f} "
          f"pairs/s  ETA {eta:.0f}s", flush=True)


def _checkpoint(engine, step, consumed, ema, metrics, report, export=None) -> None:
    """Every rank saves (a rank-0-only DeepSpeed save hangs) into its own folder, then reports it. The folder
    goes whatever ends this: ``report`` copies it to storage, and Tune ends a stopped trial by raising
    ``SystemExit`` from inside that report; a failed save leaves a half checkpoint there too."""
    folder = tempfile.mkdtemp(prefix="normbt-ckpt-")
    try:
        started = time.time()
        client = {"step": step, "consumed": consumed, "ema": ema.state_dict(), "torch_rng": torch.get_rng_state()}
        engine.save_checkpoint(folder, tag=CKPT_TAG, client_state=client)
        if export is not None:
            model, tok, final, cfg, table, gradient_pairs = export
            state = engine._zero3_consolidated_16bit_state_dict() if cfg.train.zero_stage == 3 else None
            if engine.global_rank == 0:
                lora.save_export(model, tok, Path(folder) / "model", cfg.lora, state=state, extra_config={
                    "reward_mean": final.get("val_reward_mean"), "reward_std": final.get("val_reward_std")})
                write_validation_rewards(table, Path(folder) / VALIDATION_REWARDS)
                np.savetxt(Path(folder) / GRADIENT_PAIRS, gradient_pairs, delimiter=",",
                           header="distance,grad_norm", comments="")
            metrics = {**metrics, "phase/checkpoint_s": time.time() - started}
        report(metrics, checkpoint_dir=folder, final=export is not None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be resumed from, or None when it reads back. Cheap: a torch file
    (a zip archive) must have its central directory at its end, which a truncated copy lacks, and a safetensors
    file a header and the size it declares; nothing is loaded."""
    import struct
    import zipfile

    folder = Path(folder)
    if not any((folder / CKPT_TAG).glob("*model_states.pt")):
        return f"no DeepSpeed model states in {folder / CKPT_TAG}"
    for path in sorted(folder.rglob("*")):
        try:
            if path.suffix == ".pt":
                with zipfile.ZipFile(path):
                    pass
            elif path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    size = struct.unpack("<Q", f.read(8))[0]
                    header = json.loads(f.read(size))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if path.stat().st_size < 8 + size + end:
                    return f"{path} is truncated ({path.stat().st_size} of {8 + size + end} bytes)"
        except (OSError, ValueError, struct.error, zipfile.BadZipFile) as err:
            return f"{path} is unreadable ({type(err).__name__}: {err})"
    return None


def plan_steps(cfg: PipelineConfig, n_train: int) -> tuple[int, int]:
    """``(max_steps, steps_per_epoch)`` from the train row count (drop-last global batches); ``max_steps`` is the
    schedule's horizon (:func:`last_step`: where a run stops)."""
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum * t.num_workers
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has {n_train} pairs, fewer than one global batch ({global_batch} = "
                         f"train.micro_batch_size × train.grad_accum × train.num_workers)")
    max_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
    return max_steps, steps_per_epoch


def last_step(cfg: PipelineConfig, max_steps: int) -> int:
    """The step a run stops at: ``max_steps``, or earlier with ``train.stop_after_steps`` (the lr schedule still
    spans ``max_steps``, so the run is exactly the first steps of the longer one)."""
    stop = cfg.train.stop_after_steps
    return min(max_steps, stop) if stop > 0 else max_steps


def write_validation_rewards(table: np.ndarray, path: Path) -> None:
    """The final evaluation per pair, in the validation split's row order: ``row, reward_chosen,
    reward_rejected, distance`` (fp32 rewards, as scored at the end of training)."""
    import pandas as pd

    frame = pd.DataFrame(table[:, 1:], columns=["reward_chosen", "reward_rejected", "distance"])
    frame.insert(0, "row", table[:, 0].astype(np.int64))
    frame.to_parquet(path, index=False)


def rows_from_columns(batch: dict[str, np.ndarray]) -> list[dict]:
    """Columns of a train split (numpy) as the loop's row dicts; a NaN margin means none."""
    n = len(batch["chosen_len"])
    out = []
    for i in range(n):
        margin = batch["margin"][i]
        out.append({"chosen_ids": batch["chosen_ids"][i].tolist(), "rejected_ids": batch["rejected_ids"][i].tolist(),
                    "chosen_len": int(batch["chosen_len"][i]), "rejected_len": int(batch["rejected_len"][i]),
                    "margin": None if margin is None or margin != margin else float(margin)})
    return out


# ============================================================================ without Ray (torchrun, tests)


def single_process_env(one_process: bool = False) -> None:
    """DeepSpeed outside torchrun/Ray looks for MPI unless the usual rendezvous variables exist. Under torchrun
    all four are set; a partial set (a stray ``RANK`` in a shell or a CI runner) is not a rendezvous, so this
    process runs as rank 0 of 1, and says so. ``one_process`` (a Tune trial in its actor): always rank 0 of 1 on
    a free port, whatever the environment says: the actor inherits the variables of whatever started Ray (a
    torchrun or batch job, a test process that trained before), and their port may be taken. A process group
    this process already made (an earlier trial in a reused actor) is kept."""
    rendezvous = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    present = [k for k in rendezvous if k in os.environ]
    if one_process and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise RuntimeError("a one-process trial found a process group of "
                               f"{torch.distributed.get_world_size()} ranks in its actor")
        return
    if len(present) == len(rendezvous) and not one_process:
        return
    if present:
        inherited = ", ".join(f"{k}={os.environ[k]}" for k in present)
        print(f"train_local: {inherited} in the environment: not this process's rendezvous; training as one "
              f"process", flush=True)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


class SplitRows:
    """A data-stage split as the loop's rows, in file order, made a slice at a time: the split stays one Arrow
    table in memory (a token is 8 bytes there, over 30 as a Python int in a list)."""

    def __init__(self, path: str) -> None:
        import pyarrow.dataset as pads

        self._table = pads.dataset(path, format="parquet").to_table(columns=TRAIN_COLUMNS)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: slice) -> list[dict]:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("SplitRows takes contiguous slices only")
        part = self._table.slice(start, max(0, stop - start))
        return rows_from_columns({c: part.column(c).to_numpy(zero_copy_only=False) for c in TRAIN_COLUMNS})


def read_rows(path: str) -> list[dict]:
    """A data-stage split as training rows, in file order."""
    return SplitRows(path)[:]


def one_process_config(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` trained by one process: ``train.num_workers`` ranks of ``m`` pairs become one rank of
    ``m × num_workers``. The global batch, the steps and the pairs of every step stay the same (the module
    docstring), and so does the loss curve (``test_one_worker_matches_two_workers``). The gradient diagnostics
    record the first micro-batch of the step, so ``num_workers`` times as many pairs as rank 0 recorded."""
    t = cfg.train
    return from_flat({"train.micro_batch_size": t.micro_batch_size * t.num_workers, "train.num_workers": 1},
                     base=cfg)


def one_process_threads(cfg: PipelineConfig) -> int:
    """Threads for one process doing the work of ``train.num_workers`` workers: each worker computed with
    ``max(1, ⌊cpus_per_worker⌋)`` threads (Ray gives a worker with less than one CPU one thread)."""
    return cfg.train.num_workers * max(1, int(cfg.train.cpus_per_worker))


def train_local(cfg: PipelineConfig, train_rows: list[dict] | SplitRows, validation_rows: list[dict], *,
                report: Callable[..., None], restore_dir: str | None = None,
                logger: tracking.RunLogger | None = None, started: float | None = None,
                one_process: bool = False) -> None:
    """Run the same loop in this process (one rank, or one rank of ``torchrun``), fed by lists of rows (or a
    :class:`SplitRows` for the train split: its windows are made as they are read). ``one_process``: never a
    torchrun rank, whatever the environment says (:func:`single_process_env`)."""
    single_process_env(one_process)
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world, rank = (1, 0) if one_process else (int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))
    cfg = from_flat({"train.num_workers": world}, base=cfg)
    max_steps, steps_per_epoch = plan_steps(cfg, len(train_rows))
    window = cfg.train.micro_batch_size * cfg.train.grad_accum * world * cfg.train.length_group_window
    windows = lambda epoch: (train_rows[i: i + window] for i in range(0, len(train_rows), window))  # noqa: E731
    run_loop(cfg, LoopPlan(max_steps=max_steps, steps_per_epoch=steps_per_epoch, world_size=world, rank=rank),
             train_windows=windows, validation_rows=lambda: validation_rows, report=report,
             restore_dir=restore_dir, use_gpu=cfg.train.use_gpu, logger=logger or tracking.RunLogger(None, None),
             started=started)


def main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m pipeline.train_loop --data DIR --out DIR [--config F] [key=value ...]``:
    the training loop without Ray (e.g. to check a GPU node that has only torch and transformers)."""
    import argparse

    from pipeline.config import load_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data", required=True, help="the data stage folder (with train/ and validation/)")
    parser.add_argument("--out", required=True, help="where the exported model and metrics go")
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    history: list[dict] = []

    def report(metrics: dict, checkpoint_dir: str | None = None, final: bool = False) -> None:
        history.append(metrics)
        if final and int(os.environ.get("RANK", "0")) == 0:
            shutil.copytree(Path(checkpoint_dir) / "model", Path(args.out) / "model", dirs_exist_ok=True)
            shutil.copy(Path(checkpoint_dir) / VALIDATION_REWARDS, Path(args.out) / VALIDATION_REWARDS)
            shutil.copy(Path(checkpoint_dir) / GRADIENT_PAIRS, Path(args.out) / GRADIENT_PAIRS)
            (Path(args.out) / "history.json").write_text(json.dumps(history, indent=1, default=float))

    train_local(cfg, read_rows(str(Path(args.data) / "train")), read_rows(str(Path(args.data) / "validation")),
                report=report)


if __name__ == "__main__":
    main()
