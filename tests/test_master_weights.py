"""bf16 compute weights with fp32 masters: the same training as autocast over fp32 weights, checkpoints in fp32."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mot.config import ConfigError, TrainConfig
from mot.data.synthetic import tokens_for_layout
from mot.flops import dense_baseline
from mot.model import ModelInputs, MoTTransformer
from mot.objectives.ar import next_token_loss
from mot.train.master_weights import MasterWeightAdamW, compute_weight_names
from mot.train.optim import build_optimizer, clip_gradients, parameter_groups
from mot.train.trainer import Trainer, train
from tests.conftest import reset_accelerator, tiny_config
from tests.runs import make_shards, run_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # these tests use bf16, the others fp32


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 5)
        self.gain = nn.Parameter(torch.ones(5))


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left alone
def test_update_equals_torch_adamw_on_the_fp32_values(max_norm):
    """Masters follow torch.optim.AdamW (single-tensor) given the same gradients; the model's bf16 weights are
    the masters rounded; other parameters stay fp32 and follow it too."""
    gen = torch.Generator().manual_seed(0)
    reference = _Tiny()
    for p in reference.parameters():
        nn.init.normal_(p, generator=gen)
    ours = copy.deepcopy(reference)
    opt_ref = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=0.05, betas=(0.9, 0.95), foreach=False)
    opt = MasterWeightAdamW(ours, parameter_groups(ours, 0.1), lr=0.05, betas=(0.9, 0.95))
    assert sorted(compute_weight_names(ours)) == ["proj.bias", "proj.weight"]
    assert ours.proj.weight.dtype == torch.bfloat16 and ours.embed.weight.dtype == torch.float32
    named_ref = dict(reference.named_parameters())
    for _ in range(4):
        for name, p in ours.named_parameters():
            g = (3 * torch.randn(p.shape, generator=gen)).to(p.dtype)
            p.grad = g
            named_ref[name].grad = g.float().clone()  # what autocast's backward hands an fp32 weight
        norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        norm = clip_gradients(opt, ours.parameters(), max_norm)
        assert float(norm) == pytest.approx(float(norm_ref), rel=1e-6)
        opt_ref.step()
        opt.step()
        masters = opt.master_state_dict()
        for name, p in ours.named_parameters():
            value = masters.get(name, p)
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, named_ref[name].detach(), rtol=1e-6, atol=1e-7)
            if name in masters:
                assert torch.equal(p, value.to(torch.bfloat16))


def _loss(model, tokens, modality, n):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ModelInputs(tokens, modality)).logits
    return next_token_loss(logits, tokens, modality, n)[0]


@pytest.mark.parametrize("accumulation", ["stash", "in_backward", "in_backward_grouped", "in_backward_dense"])
def test_training_equals_autocast_over_fp32_weights_with_accumulation(accumulation):
    """3 steps of 3 micro-batches: the same losses and weights as fp32 weights under bf16 autocast + AdamW.
    Gradients of the micro-batches are summed in fp32 in both (stash_gradients), so they agree to rounding.
    in_backward: the blocks' GEMMs add into the fp32 sums themselves, without rounding each micro-batch's
    weight gradient to bf16 first as autocast does; the step's gradients then agree to that rounding.
    in_backward_grouped: the projections run a kernel without the accumulation (grouped matmul, as small GEMMs
    on CUDA do), so their gradients are stashed into the same sums: exactly the stash path.
    in_backward_dense: the dense baseline (one tower), whose projections accumulate in the same op."""
    in_backward = accumulation in ("in_backward", "in_backward_dense")
    cfg = tiny_config(kernels="grouped" if accumulation == "in_backward_grouped" else "auto")
    cfg = dense_baseline(cfg) if accumulation == "in_backward_dense" else cfg
    torch.manual_seed(0)
    reference = MoTTransformer(cfg)
    ours = copy.deepcopy(reference)
    train_cfg = TrainConfig(lr=3e-3, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=3e-3, betas=(0.9, 0.95), foreach=False)
    opt = build_optimizer(ours, train_cfg, master_weights=True)
    assert isinstance(opt, MasterWeightAdamW)
    assert all(p.dtype == torch.bfloat16 for n, p in ours.named_parameters() if n in opt.master_state_dict())
    assert ours.embed.weight.dtype == torch.float32 and ours.blocks[0].attn_norm.weight.dtype == torch.float32
    if accumulation != "stash":
        opt.accumulate_in_backward(ours)
        assert len(opt.backward_sums) == 4 * cfg.n_layers  # qkv, out, w13, w2 of every block
    gen = torch.Generator().manual_seed(1)
    n = cfg.n_modalities
    vocab = ours.vocab
    named = dict(ours.named_parameters())
    losses_ref, losses = [], []
    for step in range(3):
        for micro in range(3):
            modality = torch.randint(0, n, (2, 12), generator=gen)
            tokens = tokens_for_layout(modality, vocab, gen)
            loss_ref = _loss(reference, tokens, modality, n) / 3
            loss = _loss(ours, tokens, modality, n) / 3
            loss_ref.backward()
            loss.backward()
            if in_backward:  # the sums hold every micro-batch so far, and the weights get no .grad
                qkv = ours.blocks[0].attn.qkv.weight
                assert qkv.grad is None and torch.count_nonzero(opt.backward_sums[qkv]) > 0
            if accumulation == "in_backward_grouped":
                assert ours.blocks[0].attn.qkv.weight.grad is not None
            if micro < 2:
                opt.stash_gradients()
            losses_ref.append(loss_ref.item())
            losses.append(loss.item())
        if step == 0:  # the same weights so far: the step's gradients, parameter by parameter
            opt.gradients()  # folds the last micro-batch in
            grads = {name: opt.grad_sums.get(p, p.grad) for name, p in named.items()}
            for name, p in reference.named_parameters():
                scale = p.grad.abs().max()
                tolerance = 4e-3 if in_backward and named[name] in opt.backward_sums else 1e-6
                torch.testing.assert_close(grads[name].float(), p.grad, rtol=0, atol=tolerance * scale, msg=name)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        clip_gradients(opt, ours.parameters(), 0.5)
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    assert losses[:3] == losses_ref[:3]  # the first step's forward passes see the same bf16 weights
    if in_backward:
        # Adam's update of a near-zero gradient flips with its rounding: only the losses are compared on.
        np.testing.assert_allclose(losses, losses_ref, rtol=1e-3)
        assert all(torch.count_nonzero(total) == 0 for total in opt.backward_sums.values())  # zero_grad
        return
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-4)
    masters = opt.master_state_dict()
    # Within 1% of one step's largest move (lr): the gradients agree to rounding, but where one is near Adam's
    # eps the update's size follows that rounding (1.07e-5 seen on 1 of 4096 elements on some CPUs).
    for name, p in reference.named_parameters():
        torch.testing.assert_close(masters.get(name, named[name]), p.detach(), rtol=1e-4, atol=0.01 * train_cfg.lr)


def test_trainer_resumes_exactly_and_checkpoints_fp32_masters(shards, tmp_path):
    kw = dict(steps=6, checkpoint_every=3, precision="bf16", master_weights=True, micro_batch_size=2)
    straight = train(run_config(shards, tmp_path / "straight", **kw), progress=False)
    cut = run_config(shards, tmp_path / "cut", **kw)
    first_half = Trainer(cut, progress=False).fit(until=3)
    second_half = train(cut, resume=True, progress=False)
    assert first_half.losses + second_half.losses == straight.losses  # bit for bit
    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(second_half.checkpoint / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    weight = a["blocks.0.attn.qkv.weight"]
    assert weight.dtype == torch.float32
    assert not torch.equal(weight, weight.bfloat16().float())  # the masters, not their bf16 copies
    # The same run with fp32 weights under autocast trains the same curve.
    plain = train(run_config(shards, tmp_path / "plain", **{**kw, "master_weights": False}), progress=False)
    np.testing.assert_allclose(straight.losses, plain.losses, rtol=2e-3)


def test_master_weights_need_bf16_and_one_process(shards, tmp_path):
    with pytest.raises(ConfigError, match="train.master_weights needs bf16"):
        Trainer(run_config(shards, tmp_path / "a", master_weights=True, precision="auto"), progress=False)
    reset_accelerator()
    auto = Trainer(run_config(shards, tmp_path / "b", precision="bf16"), progress=False)
    assert not auto.state.master_weights  # "auto": CUDA only


def test_diffusion_training_with_master_weights(tmp_path):
    """Transfusion setting: the latent projections' linears are compute weights too; the run trains as fp32
    weights under autocast do, and its checkpoint holds their fp32 masters."""
    from tests.test_transfusion import _pair_corpus, _run, tiny_vqgan

    tokenizer = tiny_vqgan(tmp_path / "tok" / "image")
    shards, _ = _pair_corpus(tmp_path, tokenizer, copies=8)
    ours = _run(tmp_path, shards, precision="bf16", master_weights=True)
    trainer = Trainer(ours, progress=False)
    optimizer = trainer.state.inner_optimizer
    names = optimizer.master_state_dict().keys()
    assert {"latent_io.image.inp.weight", "latent_io.image.time.mlp.0.bias", "head.weight"} <= set(names)
    result = trainer.fit()
    plain = _run(tmp_path, shards, precision="bf16", master_weights=False)
    plain.name = "tf-plain"
    reference = Trainer(plain, progress=False).fit()
    np.testing.assert_allclose(result.losses, reference.losses, rtol=2e-3)
    weights = load_file(result.checkpoint / "model.safetensors")
    assert weights["latent_io.image.inp.weight"].dtype == torch.float32
