"""The trainer on CPU: schedule, decay groups, weighted loss, accumulation, exact resume, faults, logs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mot import runs
from mot.config import TrainConfig, config_from_dict, config_to_dict
from mot.model import ModelInputs
from mot.stats import ratio_standard_error
from mot.train import checkpoint as ckpt
from mot.train.errors import NonFiniteError, TrainingStopped
from mot.train.metrics_log import read_log
from mot.train.optim import clip_gradients, lr_factor, parameter_groups
from mot.train.step import device_batch, micro_batch_losses
from mot.train.trainer import Trainer, train
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config
from tests.runs import make_shards, run_config, write_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))




# ---------------------------------------------------------------- optimizer pieces


def test_warmup_then_cosine_to_the_floor_by_hand():
    cfg = TrainConfig(steps=11, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(11)]
    assert factors[:2] == [0.5, 1.0]  # (step + 1) / warmup
    assert factors[2] == pytest.approx(1.0)  # cosine starts at the peak ...
    # ... is half way at step 2 + 8/2 = 6: 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2)) = 0.55
    assert factors[6] == pytest.approx(0.55)
    assert factors[10] == pytest.approx(0.1)  # ... and ends at lr * min_lr_ratio on the last step
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    constant = dataclasses.replace(cfg, schedule="constant")
    assert [lr_factor(s, constant) for s in (0, 1, 5, 10)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left alone
def test_clip_folded_into_the_step_equals_clip_then_step(fused, max_norm):
    """clip_gradients + step (the fused kernel's grad_scale, or in place) = torch's clip_grad_norm_ + step."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    reference = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    opt_ref = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.1)
    opt = torch.optim.AdamW(ours, lr=0.1, weight_decay=0.1, fused=fused or None, foreach=not fused)
    for _ in range(3):  # a few steps: the moments carry the clipped gradients forward
        grads = [3 * torch.randn(s, generator=gen) for s in shapes]
        for a, b, g in zip(reference, ours, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        norm_ref = torch.nn.utils.clip_grad_norm_(reference, max_norm)
        norm = clip_gradients(opt, ours, max_norm)
        assert float(norm) == pytest.approx(float(norm_ref), rel=1e-6)
        assert float(norm) == pytest.approx(math.sqrt(sum(float((g * g).sum()) for g in grads)), rel=1e-5)
        assert hasattr(opt, "grad_scale") == fused
        opt_ref.step()
        opt.step()
        for a, b in zip(reference, ours, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_weight_decay_reaches_matrices_only():
    from mot.model import MoTTransformer

    model = MoTTransformer(tiny_config())
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    kept = sorted(names[id(p)] for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(("qkv.weight", "out.weight", "w13.weight", "w2.weight")) or n == "head.weight"
               for n in decayed)
    assert all("norm" in n or n == "embed.weight" for n in kept)
    assert len(decayed) + len(kept) == len(names)


# ---------------------------------------------------------------- the step


def test_weighted_loss_equals_a_per_token_loop(shards, tmp_path):
    weights = [1.0, 0.5, 2.0]
    cfg = run_config(shards, tmp_path)
    for mod, w in zip(cfg.model.modalities, weights, strict=True):
        mod.loss_weight = w
    trainer = Trainer(cfg, progress=False)
    batch = next(trainer.state.train_batches)
    with torch.no_grad():
        loss_sum, count = micro_batch_losses(trainer.state, batch)
        inputs = ModelInputs(batch.tokens, batch.modality, batch.positions, batch.attn_mask())
        logits = trainer.state.model(inputs).logits.double()
    expected_sum, expected_count, total = torch.zeros(3, dtype=torch.float64), torch.zeros(3), 0.0
    for b in range(batch.tokens.shape[0]):
        for t in range(batch.tokens.shape[1] - 1):
            target = batch.tokens[b, t + 1]
            m = int(batch.modality[b, t + 1])
            nll = -F.log_softmax(logits[b, t], -1)[target]
            expected_sum[m] += nll
            expected_count[m] += 1
            total += weights[m] * nll.item()
    torch.testing.assert_close(loss_sum.double(), expected_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(count, expected_count)
    assert count.min() > 0, "the fixture should put every modality in a batch"
    predictions = batch.tokens.shape[0] * (batch.tokens.shape[1] - 1)
    weighted = (loss_sum * trainer.state.objective.loss_weights).sum() / predictions  # what train_step back-propagates
    assert weighted.item() == pytest.approx(total / predictions, rel=1e-5)


def test_the_trainer_hands_the_model_tokens_per_modality_counted_on_the_host(shards, tmp_path, monkeypatch):
    """What lets the GPU blocks run one GEMM per tower without reading the counts back (mot.model.routing)."""
    from mot.model import transformer

    seen = []
    route_tokens = transformer.route_tokens
    monkeypatch.setattr(transformer, "route_tokens",
                        lambda modality, n, permute, host_counts: seen.append(host_counts)
                        or route_tokens(modality, n, permute, host_counts))
    trainer = Trainer(run_config(shards, tmp_path), progress=False)
    batch = device_batch(trainer.state, next(trainer.state.train_batches))
    micro_batch_losses(trainer.state, batch)
    expected = tuple(torch.bincount(batch.modality.reshape(-1), minlength=3).tolist())
    assert batch.tower_counts == expected and seen == [expected]


def test_gradient_accumulation_matches_one_large_batch(shards, tmp_path):
    one = train(run_config(shards, tmp_path / "a", micro_batch_size=4, steps=3), progress=False)
    two = train(run_config(shards, tmp_path / "b", micro_batch_size=2, steps=3), progress=False)
    np.testing.assert_allclose(one.losses, two.losses, rtol=1e-5)
    # Evaluation reads the same held-out sequences however the batch is split.
    assert one.eval_loss.keys() == two.eval_loss.keys()
    for key in one.eval_loss:
        assert one.eval_loss[key] == pytest.approx(two.eval_loss[key], rel=1e-5), key
    a, b = load_file(one.checkpoint / "model.safetensors"), load_file(two.checkpoint / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_changes_nothing_but_memory(shards, tmp_path):
    plain = train(run_config(shards, tmp_path / "plain", steps=3), progress=False)
    recomputed = train(run_config(shards, tmp_path / "ac", steps=3, activation_checkpointing=True), progress=False)
    np.testing.assert_allclose(plain.losses, recomputed.losses, rtol=1e-6)
    a = load_file(plain.checkpoint / "model.safetensors")
    b = load_file(recomputed.checkpoint / "model.safetensors")
    assert a.keys() == b.keys()  # the composable API keeps parameter names
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_each_process_takes_its_rows_of_the_same_global_batch(shards):
    from mot.data.loader import PackedLoader
    from mot.train.data import RankSlice

    vocab = UnifiedVocab(tiny_config())
    whole = [next(PackedLoader(shards, vocab, 6, 32, seed=1)) for _ in range(1)][0]
    parts = [next(RankSlice(PackedLoader(shards, vocab, 6, 32, seed=1), rank, 3)) for rank in range(3)]
    for field_name in ("tokens", "modality", "positions", "document_ids"):
        joined = torch.cat([getattr(p, field_name) for p in parts])
        assert torch.equal(joined, getattr(whole, field_name)), field_name
    with pytest.raises(ValueError, match="does not split over 4"):
        RankSlice(PackedLoader(shards, vocab, 6, 32), 0, 4)


def test_training_lowers_the_held_out_loss_of_every_modality(shards, tmp_path):
    result = train(run_config(shards, tmp_path, steps=40, eval_every=40, checkpoint_every=0), progress=False)
    rows = [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "train"]
    first = rows[0]
    for name in ("text", "image", "speech"):
        assert result.eval_loss[f"loss/{name}"] < first[f"loss/{name}"] - 0.3, name


def test_ratio_standard_error_against_the_plain_formula_and_by_simulation():
    rng = np.random.default_rng(0)
    # equal counts: the ratio is a mean of per-batch means, whose standard error is their sd / sqrt(B)
    per_batch = rng.normal(2.0, 0.3, size=16)
    counts = torch.full((16,), 50.0, dtype=torch.float64)
    se = ratio_standard_error(torch.tensor(per_batch) * counts, counts)
    assert se == pytest.approx(np.std(per_batch, ddof=1) / np.sqrt(16), rel=1e-12)
    # unequal counts: over many simulated eval sets of 40 batches of 20-200 tokens, the estimated standard error
    # matches the spread of the ratio itself
    ratios, estimates = [], []
    for _ in range(2000):
        c = rng.integers(20, 201, size=40).astype(np.float64)
        token_losses = [rng.gamma(2.0, 1.0, size=int(n)) + rng.normal(0, 0.5) for n in c]  # a batch-level shift
        sums = torch.tensor([t.sum() for t in token_losses])
        ratios.append(float(sums.sum()) / c.sum())
        estimates.append(ratio_standard_error(sums, torch.tensor(c)))
    assert np.median(estimates) == pytest.approx(np.std(ratios), rel=0.1)
    assert math.isnan(ratio_standard_error(torch.tensor([1.0]), torch.tensor([1.0])))


def held_out_losses_by_hand(state, batches: int) -> tuple[np.ndarray, np.ndarray]:
    """Per micro-batch and modality, the loss sums and prediction counts of the first `batches` global batches
    of the held-out stream: the model's logits and a float64 cross-entropy, one process."""
    state.eval_loader.load_state_dict(state.eval_start)
    sums, counts = [], []
    for _ in range(batches * state.accum):
        batch = next(state.eval_loader)
        with torch.no_grad():
            logits = state.model(ModelInputs(batch.tokens, batch.modality, batch.positions,
                                             batch.attn_mask())).logits
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), batch.tokens[:, 1:].flatten(),
                                 reduction="none")
        target_modality = batch.modality[:, 1:].flatten()
        sums.append([float(losses[target_modality == m].sum()) for m in range(len(state.names))])
        counts.append([float((target_modality == m).sum()) for m in range(len(state.names))])
    return np.array(sums), np.array(counts)


def test_evaluation_reports_the_standard_error_over_its_micro_batches(shards, tmp_path, monkeypatch):
    cfg = run_config(shards, tmp_path, steps=2, eval_batches=6, micro_batch_size=2)
    cfg.data.eval_fraction = 0.6  # enough held-out documents for 6 batches without repeating them
    trainer = Trainer(cfg, progress=False)
    from mot.train import step

    grad_modes = []

    def recorded(state, batch):
        grad_modes.append(torch.is_grad_enabled())
        return micro_batch_losses(state, batch)

    monkeypatch.setattr(step, "micro_batch_losses", recorded)
    out = trainer.evaluate()
    assert grad_modes == [False] * 12  # no autograd graph is built for evaluation
    state = trainer.state
    sums, counts = held_out_losses_by_hand(state, cfg.train.eval_batches)
    assert len(sums) == 12  # 6 eval batches of 4 sequences in micro-batches of 2
    for m, name in enumerate(state.names):
        mean = sums[:, m].sum() / counts[:, m].sum()
        reference = math.sqrt(12 / 11 * ((sums[:, m] - mean * counts[:, m]) ** 2).sum()) / counts[:, m].sum()
        assert out[f"loss/{name}"] == pytest.approx(mean, rel=1e-5)
        assert out[f"se/{name}"] == pytest.approx(reference, rel=1e-3)
    total = sums.sum(1)
    mean = total.sum() / counts.sum()
    assert out["se"] == pytest.approx(math.sqrt(12 / 11 * ((total - mean * counts.sum(1)) ** 2).sum())
                                      / counts.sum(), rel=1e-3)
    assert out["se"] > 0 and state.eval_loader.epoch == 0
    np.testing.assert_allclose(out["micro_batches"]["sums"], sums, rtol=1e-5)  # logged for paired comparisons
    assert out["micro_batches"]["counts"] == counts.tolist()


@pytest.mark.parametrize(("eval_fraction", "eval_batches", "micro"), [(0.1, 6, 2), (0.6, 1, 4)])
def test_no_standard_error_from_repeated_or_single_micro_batches(shards, tmp_path, eval_fraction, eval_batches,
                                                                 micro):
    """A held-out set shorter than the evaluation repeats its batches (they are not new clusters); one
    micro-batch has no spread to measure."""
    cfg = run_config(shards, tmp_path, steps=2, eval_batches=eval_batches, micro_batch_size=micro)
    cfg.data.eval_fraction = eval_fraction
    trainer = Trainer(cfg, progress=False)
    out = trainer.evaluate()
    assert "loss" in out and not any(k == "se" or k.startswith("se/") for k in out)
    if eval_batches > 1:
        assert trainer.state.eval_loader.epoch > 0  # it did run out


def test_final_evaluation_reads_more_held_out_batches_that_start_with_the_periodic_ones(shards, tmp_path):
    cfg = run_config(shards, tmp_path, steps=4, eval_every=2, eval_batches=2, final_eval_batches=5,
                     micro_batch_size=2)
    cfg.data.eval_fraction = 0.5  # 6 global batches held out: the final evaluation's 5 do not repeat
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit()
    rows = read_log(result.run_dir / "log.jsonl")
    assert [(r["kind"], r["step"]) for r in rows if r["kind"] != "train"] == [
        ("eval", 2), ("eval", 4), ("final_eval", 4)]  # once, after the last step's periodic evaluation
    last_eval, final = (r for r in rows if r["kind"] != "train" and r["step"] == 4)
    state = trainer.state
    sums, counts = held_out_losses_by_hand(state, 5)  # the trained model, as it was at the final evaluation
    assert len(sums) == 10  # 5 batches of 4 sequences in micro-batches of 2
    np.testing.assert_allclose(final["micro_batches"]["sums"], sums, rtol=1e-5)
    assert final["micro_batches"]["counts"] == counts.tolist()
    for m, name in enumerate(state.names):
        assert final[f"loss/{name}"] == pytest.approx(sums[:, m].sum() / counts[:, m].sum(), rel=1e-5)
        assert final[f"tokens/{name}"] == counts[:, m].sum()
    # the periodic evaluation's micro-batches come first: the larger set holds the smaller one
    assert final["micro_batches"]["counts"][:4] == last_eval["micro_batches"]["counts"]
    np.testing.assert_allclose(final["micro_batches"]["sums"][:4], last_eval["micro_batches"]["sums"], rtol=1e-6)
    assert sum(final[f"tokens/{n}"] for n in state.names) > sum(last_eval[f"tokens/{n}"] for n in state.names)
    assert final["se"] > 0 and (final["flops"], final["tokens"]) == (last_eval["flops"], last_eval["tokens"])
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["final_eval"] == {k: v for k, v in final.items() if k.split("/")[0] in ("loss", "se")}
    assert summary["eval"]["loss"] == last_eval["loss"]
    log = (result.run_dir / "log.jsonl").read_text()
    again = train(cfg, resume=True, progress=False)  # a finished run resumed: nothing is evaluated again
    assert again.losses == [] and (result.run_dir / "log.jsonl").read_text() == log
    assert json.loads((result.run_dir / "summary.json").read_text()) == summary


@pytest.mark.parametrize("cut", ["signal", "until"])
def test_no_final_evaluation_before_the_last_step(shards, tmp_path, monkeypatch, cut):
    """A run stopped by a signal, or fitted up to a step short of train.steps, has no final evaluation; resumed
    to the end it has one."""
    from mot.train import loop

    cfg = run_config(shards, tmp_path, steps=6, eval_every=3, checkpoint_every=3, final_eval_batches=3)
    cfg.data.eval_fraction = 0.5
    if cut == "signal":
        real_update = loop.update

        def signalled(state, log):
            out = real_update(state, log)
            if state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return out

        monkeypatch.setattr(loop, "update", signalled)
        with pytest.raises(TrainingStopped, match="after step 3 of 6"):
            train(cfg, progress=False)
        monkeypatch.setattr(loop, "update", real_update)
    else:
        Trainer(cfg, progress=False).fit(until=3)
    run_dir = tmp_path / "tiny"
    assert not [r for r in read_log(run_dir / "log.jsonl") if r["kind"] == "final_eval"]
    if cut == "signal":
        assert "final_eval" not in json.loads((run_dir / "summary.json").read_text())
    rest = train(cfg, resume=True, progress=False)
    assert [r["step"] for r in read_log(run_dir / "log.jsonl") if r["kind"] == "final_eval"] == [6]
    assert json.loads((run_dir / "summary.json").read_text())["final_eval"] == rest.final_eval


def test_the_train_command_shows_the_final_evaluation_with_its_standard_errors(shards, tmp_path, capsys,
                                                                              monkeypatch):
    from mot.cli import main

    monkeypatch.setenv("COLUMNS", "220")  # rich's table at full width
    cfg = run_config(shards, tmp_path / "runs", steps=2, eval_every=0, final_eval_batches=3)
    cfg.data.eval_fraction = 0.5
    write_recipe(tmp_path / "tiny.toml", cfg)
    assert main(["train", str(tmp_path / "tiny.toml")]) == 0
    out = capsys.readouterr().out
    (final,) = (r for r in read_log(tmp_path / "runs" / "tiny" / "log.jsonl") if r["kind"] == "final_eval")
    assert "final eval loss +- se (3 batches)" in out
    assert f"{final['loss/image']:.4f} +- {final['se/image']:.4f}" in out


def test_a_final_evaluation_past_the_held_out_set_is_refused_before_any_step(shards, tmp_path):
    from mot.config import ConfigError
    from mot.data.loader import ShardedCorpus, held_out

    cfg = run_config(shards, tmp_path, steps=2, eval_every=0, eval_batches=1, final_eval_batches=4,
                     micro_batch_size=2)
    cfg.data.eval_fraction = 0.3
    corpus = ShardedCorpus(shards)  # by hand: the held-out documents' tokens over a global batch's
    held = int(corpus.lengths[held_out(corpus.ids, 0.3)].sum()) // (4 * 32)
    assert 1 < held < 4  # the periodic evaluation fits, the final one does not
    with pytest.raises(ConfigError, match=rf"final_eval_batches \(4\) asks for more .* holds \({held} of"):
        train(cfg, progress=False)
    assert not list(tmp_path.rglob("log.jsonl"))  # refused before the first step
    cfg.data.eval_fraction = 0.0  # the recipe's checks
    with pytest.raises(ConfigError, match="needs a held-out set: data.eval_fraction is 0"):
        config_from_dict(config_to_dict(cfg))


# ---------------------------------------------------------------- checkpoints and resume


def test_resume_continues_exactly(shards, tmp_path):
    straight = train(run_config(shards, tmp_path / "straight", steps=8, checkpoint_every=4), progress=False)
    cut = run_config(shards, tmp_path / "cut", steps=8, checkpoint_every=4)
    first_half = Trainer(cut, progress=False).fit(until=4)  # as if killed right after the checkpoint
    second_half = train(cut, resume=True, progress=False)
    assert first_half.losses + second_half.losses == straight.losses  # bit for bit
    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(second_half.checkpoint / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_log(second_half.run_dir / "log.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_continues_exactly(shards, tmp_path,
                                                                                    monkeypatch, signum):
    straight = train(run_config(shards, tmp_path / "straight", steps=8, checkpoint_every=4, log_every=2),
                     progress=False)
    cut = run_config(shards, tmp_path / "cut", steps=8, checkpoint_every=4, log_every=2)
    from mot.train import loop

    real_update = loop.update

    def signalled(state, log):  # `timeout -s INT` arriving during the third step
        out = real_update(state, log)
        if state.step == 3:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(loop, "update", signalled)
    # what the process had before (SIGINT is ignored, not Python's handler, in a job put in the background by a shell)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match=rf"stopped by {signal.Signals(signum).name} after step 3 of 8") as err:
        train(cut, progress=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # the loop's are gone
    assert err.value.result.checkpoint.name == "step-0000003"
    assert [p.name for p in runs.list_checkpoints(tmp_path / "cut" / "tiny" / "checkpoints")] == ["step-0000003"]
    summary = json.loads((tmp_path / "cut" / "tiny" / "summary.json").read_text())
    assert (summary["step"], summary["steps"]) == (3, 8)
    monkeypatch.setattr(loop, "update", real_update)
    rest = train(cut, resume=True, progress=False)
    assert err.value.result.losses + rest.losses == straight.losses  # bit for bit
    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(rest.checkpoint / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in read_log(rest.run_dir / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 8]  # the stop logged its partial window (step 3 alone)
    assert rows[1]["loss"] == pytest.approx(straight.losses[2])


def test_stop_signal_is_one_request_until_a_later_second_signal_interrupts(monkeypatch):
    from mot.train.loop import StopSignal

    before = {s: signal.getsignal(s) for s in StopSignal.SIGNALS}
    with StopSignal() as outer:
        with StopSignal():
            os.kill(os.getpid(), signal.SIGTERM)
        assert outer.received == signal.SIGTERM  # nested uses share the note
        os.kill(os.getpid(), signal.SIGINT)  # at once: a launcher forwarding the same request to its workers
        assert outer.received == signal.SIGTERM
        monkeypatch.setattr(StopSignal, "REPEAT_S", -1.0)  # now as if seconds later: stop at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
    assert {s: signal.getsignal(s) for s in StopSignal.SIGNALS} == before
    with StopSignal() as fresh:  # a new use starts with no note
        assert fresh.received is None


def test_two_processes_signalled_as_timeout_does_stop_at_the_same_log_step_and_resume(shards, tmp_path):
    """`timeout -s INT` signals the launcher's process group, and the launcher forwards the signal to its
    workers: both processes must stop after the same step (the next log step, which a collective decides),
    checkpoint it, and `--resume` must finish the run on two processes."""
    cfg = run_config(shards, tmp_path, steps=400, micro_batch_size=2, log_every=5, eval_every=0,
                     checkpoint_every=0)
    write_recipe(tmp_path / "r.toml", cfg)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "mot.cli", "train", str(tmp_path / "r.toml")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = tmp_path / "tiny" / "log.jsonl"
    deadline = time.time() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert "stopped by SIGINT after step" in output, output[-3000:]
    saved = runs.list_checkpoints(tmp_path / "tiny" / "checkpoints")
    assert len(saved) == 1, output[-3000:]
    stopped_at = int(saved[0].name[5:])
    assert 0 < stopped_at < 400 and stopped_at % 5 == 0  # a log step: where the processes can agree
    assert runs.read_meta(saved[0])["step"] == stopped_at
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert summary["step"] == stopped_at
    done = subprocess.run([*launch, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["step"] for r in read_log(log) if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 400 and stopped_at in steps


def test_only_the_last_k_checkpoints_are_kept_and_load_for_inference(shards, tmp_path):
    result = train(run_config(shards, tmp_path, steps=8, checkpoint_every=2, keep_checkpoints=2), progress=False)
    names = [p.name for p in runs.list_checkpoints(result.run_dir / "checkpoints")]
    assert names == ["step-0000006", "step-0000008"]
    model, cfg, _ = runs.load_for_inference(result.run_dir)
    assert cfg.model == tiny_config()
    tokens = torch.randint(0, 80, (2, 16), generator=torch.Generator().manual_seed(0))
    weights = load_file(result.checkpoint / "model.safetensors")
    assert torch.equal(model.state_dict()["embed.weight"], weights["embed.weight"])
    assert model(ModelInputs(tokens)).logits.shape == (2, 16, UnifiedVocab(tiny_config()).size)


def test_existing_run_needs_resume_or_overwrite_and_resume_needs_the_same_model(shards, tmp_path):
    from mot.config import ConfigError

    cfg = run_config(shards, tmp_path, steps=4)
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False)
    other = run_config(shards, tmp_path, steps=8)
    other.model.dim = 64
    with pytest.raises(ConfigError, match="dim: 32 -> 64"):
        train(other, resume=True, progress=False)
    # model.kernels chooses how the same products run, not what they are: a run resumes with another choice
    split = run_config(shards, tmp_path, steps=6)
    split.model.kernels = "split"
    assert train(split, resume=True, progress=False).step == 6
    assert train(cfg, overwrite=True, progress=False).step == 4


def test_non_finite_loss_stops_naming_step_and_modality_and_keeps_the_checkpoint(shards, tmp_path, monkeypatch):
    cfg = run_config(shards, tmp_path, steps=8, checkpoint_every=2)
    trainer = Trainer(cfg, progress=False)
    from mot.train import step

    def poisoned(state, batch):
        loss_sum, count = micro_batch_losses(state, batch)
        if state.step == 2:  # the third update
            loss_sum = loss_sum + torch.tensor([0.0, float("nan"), 0.0])
        return loss_sum, count

    monkeypatch.setattr(step, "micro_batch_losses", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss for modality image") as err:
        trainer.fit()
    assert "step-0000002" in str(err.value)
    saved = runs.list_checkpoints(tmp_path / "tiny" / "checkpoints")
    assert [p.name for p in saved] == ["step-0000002"]
    state = runs.load_model_state(saved[0])
    assert all(torch.isfinite(t).all() for t in state.values())
    rows = read_log(tmp_path / "tiny" / "log.jsonl")
    assert rows[-1]["kind"] == "error" and rows[-1]["step"] == 3

    skip = Trainer(run_config(shards, tmp_path / "skip", steps=6, on_nonfinite="skip"), progress=False)
    result = skip.fit()
    assert result.step == 6 and result.skipped_steps == 1
    assert math.isnan(result.losses[2]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert all(torch.isfinite(p).all() for p in skip.state.model.parameters())


def test_killing_the_process_while_it_writes_a_checkpoint_leaves_the_previous_one_loadable(shards, tmp_path):
    cfg = run_config(shards, tmp_path / "runs", steps=100000, checkpoint_every=1, keep_checkpoints=2,
                     eval_every=0, log_every=50)
    cfg.model.dim, cfg.model.ffn_dim = 128, 512  # a few MB per checkpoint, so a write takes a while
    recipe = tmp_path / "recipe.toml"
    write_recipe(recipe, cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    folder = tmp_path / "runs" / "tiny" / "checkpoints"
    killed_mid_write = False
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "mot.cli", "train", str(recipe), "--overwrite"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                done = len(runs.list_checkpoints(folder))
                if done >= 2 and any(p.name.startswith(".tmp-") for p in folder.iterdir()):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_mid_write = True
                    break
                time.sleep(0.0005)
        finally:
            proc.kill()
            stderr = proc.communicate()[1].decode()
        assert proc.returncode == -signal.SIGKILL, stderr
        if killed_mid_write:
            break
    assert killed_mid_write, "never caught the process inside a checkpoint write"
    complete = runs.list_checkpoints(folder)
    assert complete, "the kill left no complete checkpoint"
    for path in complete:  # every listed checkpoint loads
        ckpt.load_training_state(path)
        state = runs.load_model_state(path)
        assert state["embed.weight"].shape[1] == 128
    # ... and the run resumes from the newest one, clearing the half-written folder.
    last = int(complete[-1].name[5:])
    cfg.train.steps = last + 1
    result = train(cfg, resume=True, progress=False)
    assert result.step == last + 1
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())


# ---------------------------------------------------------------- logs and the command line


def test_logs_tensorboard_plot_and_summary(shards, tmp_path):
    result = train(run_config(shards, tmp_path, steps=8, eval_every=4, tensorboard=True), progress=False)
    rows = read_log(result.run_dir / "log.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in eval_rows] == [4, 8]
    for key in ("loss", "loss/text", "loss/image", "loss/speech", "lr", "grad_norm", "tokens_per_s", "flops"):
        assert key in train_rows[-1], key
    assert eval_rows[-1]["ppl/text"] == pytest.approx(math.exp(eval_rows[-1]["loss/text"]))
    # Attention is counted under each batch's document mask, so the halves differ by their batches' documents.
    assert eval_rows[1]["flops"] > eval_rows[0]["flops"] > 0
    assert eval_rows[1]["flops"] == pytest.approx(2 * eval_rows[0]["flops"], rel=0.05)
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["step"] == 8 and summary["eval"]["loss/image"] == result.eval_loss["loss/image"]
    assert "final_eval" not in summary and not [r for r in rows if r["kind"] == "final_eval"]  # batches 0: none


def test_train_command_prepares_the_demo_corpus_and_trains(tmp_path, monkeypatch):
    """The README's main job, shrunk: a tiny demo corpus is generated, prepared with the shipped tokenizers
    and trained on through the command line."""
    from mot.cli import main

    recipe = ROOT / "recipes" / "demo.toml"
    overrides = [f"--data.documents={tmp_path}/demo/documents.jsonl", f"--data.shards={tmp_path}/demo/shards",
                 f"--data.tokenizers={ROOT}/tokenizers/demo", f"--train.out_dir={tmp_path}/runs",
                 "--train.steps=4", "--train.warmup_steps=1", "--train.eval_every=2", "--train.batch_size=2",
                 "--train.seq_len=128", "--train.tensorboard=false"]
    from mot.data import demo

    real = demo.generate_demo_corpus
    monkeypatch.setattr(demo, "generate_demo_corpus", lambda out, **kw: real(out, scale=0.01, progress=False))
    assert main(["train", str(recipe), *overrides]) == 0
    run = tmp_path / "runs" / "demo"
    assert (tmp_path / "demo" / "shards" / "manifest.json").is_file()
    assert runs.latest_checkpoint(run / "checkpoints").name == "step-0000004"
    assert (run / "loss_curves.png").is_file() and (run / "tokenizers" / "image" / "vqgan.safetensors").is_file()
    manifest = json.loads((tmp_path / "demo" / "shards" / "manifest.json").read_text())
    assert manifest["documents"] > 0 and set(manifest["tokenizers"]) == {"text", "image", "speech"}

    # The main job's samples: colour-match score, grid and pages, from the checkpoint just written.
    from mot.generate.demo_eval import write_demo_samples

    report = write_demo_samples(run, per_colour=1)
    assert report["images"] == 6 and 0 <= report["rate"] <= 1 and report["chance"] == pytest.approx(1 / 6)
    assert (run / "samples" / "colour_grid.png").is_file()
    assert all(Path(p).is_file() for p in report["pages"])


def test_init_from_starts_a_new_run_from_other_weights(shards, tmp_path):
    source = train(run_config(shards, tmp_path / "a", steps=4), progress=False)
    fresh = run_config(shards, tmp_path / "b", steps=4)
    trainer = Trainer(fresh, progress=False, init_from=str(source.checkpoint))
    saved = load_file(source.checkpoint / "model.safetensors")
    assert all(torch.equal(trainer.state.model.state_dict()[k], v) for k, v in saved.items())
    assert trainer.state.step == 0 and trainer.state.scheduler.last_epoch == 0  # a new schedule, not a resume
    other = run_config(shards, tmp_path / "c", steps=4)
    other.model.dim = 64
    from mot.config import ConfigError

    with pytest.raises(ConfigError, match="dim"):
        Trainer(other, progress=False, init_from=str(source.checkpoint))
