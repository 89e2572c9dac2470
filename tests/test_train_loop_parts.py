"""The train loop's pure parts: batching, rank slices and the data-wait clock (no Ray, no DeepSpeed)."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from pipeline.train_loop import global_batches, micro_slices, prefetched, timed

pytestmark = pytest.mark.unit


def _rows(n: int) -> list[dict]:
    return [{"i": i, "chosen_len": i % 7, "rejected_len": 3} for i in range(n)]


def test_global_batches_are_deterministic_full_and_drop_only_the_tail():
    windows = [_rows(20)[:10], _rows(20)[10:]]
    first = list(global_batches(windows, global_batch=4, seed=1, epoch=0))
    again = list(global_batches(windows, global_batch=4, seed=1, epoch=0))
    assert first == again and all(len(b) == 4 for b in first)
    assert len(first) == 5  # 10 + 10 rows: the 2-row remainder of window 0 is carried into window 1
    assert sorted(r["i"] for b in first for r in b) == list(range(20))
    assert list(global_batches(windows, global_batch=4, seed=1, epoch=1)) != first  # reshuffled per epoch


def test_micro_slices_partition_the_global_batch_across_ranks_and_accumulation():
    batch = _rows(12)
    parts = [micro_slices(batch, micro=2, accum=3, world=2, rank=r) for r in (0, 1)]
    assert [len(p) for p in parts] == [3, 3]
    seen = [r["i"] for p in parts for micro in p for r in micro]
    assert sorted(seen) == list(range(12))


def test_timed_records_how_long_each_item_took_to_arrive():
    def slow():
        yield "fast"
        time.sleep(0.05)
        yield "slow"

    waits: list[float] = []
    assert list(timed(slow(), waits)) == ["fast", "slow"]
    assert len(waits) == 2 and waits[1] >= 0.04 > waits[0]


def test_prefetched_reads_ahead_in_order_and_reraises_errors():
    pulled: list[int] = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield i

    items = prefetched(source(), depth=2)
    deadline = time.time() + 5
    while len(pulled) < 2 and time.time() < deadline:  # the thread starts reading before the first next()
        time.sleep(0.01)
    assert pulled[:2] == [0, 1]
    assert list(items) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise ValueError("row 7: bad chosen_ids")

    with pytest.raises(ValueError, match="row 7"):
        list(prefetched(broken()))


def test_prefetched_thread_stops_when_the_consumer_is_dropped_unread():
    import gc
    import threading

    def endless():
        while True:
            yield 0

    items = prefetched(endless(), depth=1)
    del items
    gc.collect()
    deadline = time.time() + 5
    while any(t.name == "train-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "train-prefetch" for t in threading.enumerate())


# ---------------------------------------------------------------- evaluation shares, weight decay, NaN order


@pytest.mark.parametrize("n_rows,world,size", [(17, 2, 4), (5, 2, 2), (1, 4, 3), (0, 2, 2), (64, 3, 8)])
def test_eval_batches_give_every_rank_the_same_number_of_forwards_and_each_row_once(n_rows, world, size):
    from pipeline.train_loop import eval_batches

    shares = [eval_batches(n_rows, world, rank, size) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1, "unequal forwards: a ZeRO-3 gather would hang under NCCL"
    rows = sorted(i for s in shares for chunk in s for i in chunk)
    assert rows == list(range(n_rows))
    assert all(len(chunk) <= size for s in shares for chunk in s)


def test_split_rows_slices_equal_the_whole_split_read_at_once(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.train_loop import SplitRows, read_rows

    table = pa.table({"chosen_ids": [[1, 2], [3], [4, 5, 6], [7], [8, 9]],
                      "rejected_ids": [[1], [2, 3], [4], [5, 6], [7]],
                      "chosen_len": [2, 1, 3, 1, 2], "rejected_len": [1, 2, 1, 2, 1],
                      "margin": [None, 0.5, None, 1.0, None]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    rows, lazy = read_rows(str(tmp_path)), SplitRows(str(tmp_path))
    assert len(lazy) == 5 and rows[1] == {"chosen_ids": [3], "rejected_ids": [2, 3], "chosen_len": 1,
                                          "rejected_len": 2, "margin": 0.5}
    assert [r for i in range(0, 5, 2) for r in lazy[i: i + 2]] == rows and lazy[4:9] == rows[4:] and lazy[6:8] == []


def test_eval_batches_group_similar_lengths_so_a_forward_pads_little():
    from pipeline.train_loop import eval_batches

    lengths = [10, 90, 12, 88, 11, 91, 13, 89]
    chunks = eval_batches(8, 1, 0, 4, lengths)
    assert sorted(i for c in chunks for i in c) == list(range(8))
    padded = sum(max(lengths[i] for i in c) * len(c) for c in chunks)
    assert padded == 4 * 13 + 4 * 91  # in row order every chunk would pad to ~90: 720 tokens


@pytest.mark.parametrize("arch", ["tiny:bert", "tiny:llama"])
def test_weight_decay_spares_biases_norm_weights_and_the_score_head(arch):
    from pipeline import modeling
    from pipeline.train_loop import param_groups

    tok = modeling.load_tokenizer(arch)
    model = modeling.build_reward_model(arch, tok)
    decay, plain = param_groups(model, 0.1)
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert plain_names | decay_names == set(names.values()) and not plain_names & decay_names
    head = {names[id(p)] for p in modeling.score_head(model).parameters()}
    assert head <= plain_names
    assert all(n.endswith("bias") or "norm" in n.lower() or n in head for n in plain_names), plain_names
    assert any("norm" in n.lower() for n in plain_names) and any(n.endswith("bias") for n in plain_names) == (
        arch == "tiny:bert")  # Llama has no biases
    assert all(p.ndim == 2 for p in decay["params"])


def test_a_skipped_nan_step_leaves_mu_alone_and_keeps_the_lr_schedule_on_the_step_counter(monkeypatch):
    from pipeline import losses, modeling
    from pipeline.config import load_config
    from pipeline.distributed import Collectives
    from pipeline.train_loop import train_one_step
    from tests.helpers import PlainEngine

    cfg = load_config(None, ["model.name_or_path=tiny:bert", "train.nan_policy=skip"])
    tok = modeling.load_tokenizer("tiny:bert")
    model = modeling.build_reward_model("tiny:bert", tok)
    engine = PlainEngine(model, lr_lambda=lambda step: 1.0 / (1 + step))
    ema, comm = losses.DistanceEMA(0.5), Collectives(torch.device("cpu"))
    ids = [tok(t)["input_ids"] for t in ("one two", "three four five", "six", "seven eight")]
    rows = [{"chosen_ids": ids[i], "rejected_ids": ids[i + 1], "chosen_len": 1, "rejected_len": 1, "margin": None}
            for i in range(3)]
    assert train_one_step(cfg, engine, model, [rows], ema, tok.pad_token_id, torch.device("cpu"), 0, comm)
    mu, steps = ema.mu, ema.steps
    monkeypatch.setenv("NORMBT_NAN_AT_STEP", "1")
    assert train_one_step(cfg, engine, model, [rows], ema, tok.pad_token_id, torch.device("cpu"), 1, comm) is None
    assert (ema.mu, ema.steps) == (mu, steps), "a skipped step must not move NormBT's EMA"
    assert engine.get_lr() == [pytest.approx(1.0 / 3)], "the schedule stays at the step counter (2 steps done)"


def test_forced_collectives_run_through_the_process_group_at_world_size_one(tmp_path, monkeypatch):
    """The GPU check sets NORMBT_FORCE_COLLECTIVES so a single GPU still exercises NCCL's device rule."""
    import torch.distributed as dist

    from pipeline.distributed import Collectives

    # An in-process train_local earlier in the suite keeps its one-rank group (DeepSpeed outlives a destroyed one)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: calls.append(t.device) or real(t, op=op))
        assert Collectives(torch.device("cpu")).all_reduce([1.0, 2.0]) == [1.0, 2.0] and calls == []
        monkeypatch.setenv("NORMBT_FORCE_COLLECTIVES", "1")
        comm = Collectives(torch.device("cpu"))
        assert comm.all_reduce([1.0, 2.0], "max") == [1.0, 2.0] and calls == [torch.device("cpu")]
        assert comm.all_gather_rows(np.ones((3, 2))).shape == (3, 2)
    finally:
        if created:
            dist.destroy_process_group()


@pytest.mark.parametrize("stray", [{"RANK": "0"}, {"RANK": "3", "WORLD_SIZE": "8"}])
def test_a_stray_rank_variable_is_not_taken_for_a_torchrun_rendezvous(monkeypatch, stray, capsys):
    from pipeline.train_loop import single_process_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in stray.items():
        monkeypatch.setenv(key, value)
    single_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert int(os.environ["MASTER_PORT"]) > 0
    assert "not this process's rendezvous" in capsys.readouterr().out


def test_a_one_process_trial_ignores_an_inherited_rendezvous(monkeypatch, capsys):
    """A Tune actor inherits the environment of whatever started Ray; a trial in it is rank 0 of 1 on its own
    port whatever that says (a CI run failed on a port taken by the test process that had trained before)."""
    import torch.distributed as dist

    from pipeline.train_loop import single_process_env

    if dist.is_initialized():
        pytest.skip("this test process already has a process group")
    inherited = {"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards, like the four below
    for key, value in inherited.items():
        monkeypatch.setenv(key, value)
    single_process_env(one_process=True)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert os.environ["MASTER_PORT"] != "29500"
    assert "RANK=3" in capsys.readouterr().out


def test_a_torchrun_rendezvous_is_left_alone(monkeypatch):
    from pipeline.train_loop import single_process_env

    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    single_process_env()
    assert {k: os.environ[k] for k in torchrun} == torchrun


@pytest.mark.parametrize("overrides, expected", [
    (["loss.name=bt", "loss.head_input_norm=layernorm"], "layernorm"),
    (["loss.name=bt_clip", "loss.clip=0.01"], "clipped_share"),
    (["loss.name=normbt", "loss.distance=cosine"], "mu"),
    (["loss.name=normbt", "loss.beta=0.0"], "mu"),
    (["loss.name=normbt", "loss.representation=mean_pooled"], "mu"),
])
def test_every_loss_setting_trains_a_step_with_its_own_distance_and_weights(overrides, expected):
    """Each baseline / ablation goes through the loop's step: its loss, its distance for μ (NormBT), and the
    gradient diagnostics (none under the mean-pooled representation, whose forward has no head input)."""
    from pipeline import losses, modeling
    from pipeline.config import load_config
    from pipeline.distributed import Collectives
    from pipeline.train_loop import collate, pooled, reward_model_for, train_one_step
    from tests.helpers import PlainEngine

    cfg = load_config(None, ["model.name_or_path=tiny:bert", *overrides])
    tok = modeling.load_tokenizer("tiny:bert")
    model = reward_model_for(cfg, tok)
    engine = PlainEngine(model, lr_lambda=lambda step: 1.0)
    ema, comm = losses.DistanceEMA(cfg.loss.beta), Collectives(torch.device("cpu"))
    ids = [tok(t)["input_ids"] for t in ("one two", "three four five", "six", "seven eight nine ten")]
    rows = [{"chosen_ids": ids[i], "rejected_ids": ids[i + 1], "chosen_len": 1, "rejected_len": 1, "margin": None}
            for i in range(3)]
    batch = collate(rows, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        _, _, hc, hr = modeling.forward_pairs(model, batch, pooled=pooled(cfg))
    diagnostics: list = []
    metrics = train_one_step(cfg, engine, model, [rows], ema, tok.pad_token_id, torch.device("cpu"), 0, comm,
                             diagnostics)
    assert metrics is not None and math.isfinite(metrics["loss"])
    if expected == "layernorm":
        assert getattr(model.config, modeling.HEAD_INPUT_NORM) == "layernorm"
        assert hc.mean(-1).abs().max() < 1e-4  # the head reads (and the loop sees) the normalised input
    else:
        assert expected in metrics
    if cfg.loss.name == "normbt":  # μ after the first step is that step's mean distance, of the configured kind
        assert ema.mu == pytest.approx(float(losses.pair_distances(hc, hr, kind=cfg.loss.distance).mean()), rel=1e-5)
    assert diagnostics[0].shape == ((0, 2) if pooled(cfg) else (3, 2))
