"""mot against transformers' own Chameleon: import, export and generation give what its code computes.

Tiny random configs built here; nothing is downloaded. Every parameter (norm gains and q/k norm biases
included) is randomised, so a misplaced tensor shows.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers  # a dev dependency (`pip install -e '.[dev]'`): missing, these tests fail rather than skip
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from mot import runs
from mot.config import ModalityConfig, ModelConfig, RunConfig, TrainConfig, config_to_dict
from mot.generate import GenerationConfig, generate
from mot.interop.chameleon import ChameleonImportError, export_hf, import_hf
from mot.interop.chameleon_vocab import ChameleonVocab, image_code_of, image_token_name
from mot.model import ModelInputs, MoTTransformer
from mot.runs import load_for_inference
from mot.train import checkpoint as ckpt


def load_file_state(run):
    return runs.load_model_state(runs.resolve_checkpoint(run))

N_CODES = 16
HF_VOCAB = 64
BOS, PAD, EOS, BOI, EOI, IMAGE = 0, 1, 2, 21, 20, 22


def vocabulary_map() -> dict[str, int]:
    """Chameleon's layout in miniature: specials first, image codes 4.., then break/eoss and the rest BPE."""
    names = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": 3, "<eoss>": EOI, "<racm3:break>": BOI, "<image>": IMAGE}
    names.update({image_token_name(c): 4 + c for c in range(N_CODES)})
    return names


def hf_model(gqa: bool, swin: bool, seed: int = 0) -> ChameleonForConditionalGeneration:
    config = ChameleonConfig(
        vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4, swin_norm=swin, vocabulary_map=vocabulary_map(),
        max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        vq_config=dict(embed_dim=8, num_embeddings=N_CODES, latent_channels=8, resolution=32, base_channels=32,
                       channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[]),
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    return model


def interleaved_hf_ids() -> torch.Tensor:
    """<s> text <break> 6 image codes <eoss> text, in Chameleon ids; two rows."""
    image = [4 + c for c in (3, 15, 0, 7, 7, 12)]
    row = [BOS, 30, 41, 25, 63, BOI, *image, EOI, 33, 50, 26]
    other = [BOS, 44, 45, 60, BOI, *reversed(image), EOI, 62, 24, 31, 40]
    return torch.tensor([row, other])


def hf_logits(model: ChameleonForConditionalGeneration, ids: torch.Tensor) -> torch.Tensor:
    """Chameleon's logits before its forward masks the image columns (its own modules, unmasked)."""
    with torch.no_grad():
        return model.lm_head(model.model(input_ids=ids).last_hidden_state)


def mot_logits(model: MoTTransformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ModelInputs(ids)).logits


def imported(tmp_path, gqa: bool, swin: bool) -> tuple[ChameleonForConditionalGeneration, MoTTransformer, torch.Tensor]:
    hf = hf_model(gqa, swin)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, _, _ = load_for_inference(tmp_path / "run")
    mapping = ChameleonVocab.from_dict(json.loads((tmp_path / "run" / "chameleon_vocab.json").read_text())["mapping"])
    return hf, model, mapping.mot_to_hf(model.vocab)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("swin", [False, True])
def test_imported_model_gives_chameleons_logits(tmp_path, gqa, swin):
    hf, model, table = imported(tmp_path, gqa, swin)
    assert model.cfg.is_dense and model.cfg.kv_heads == (2 if gqa else 4)
    assert model.cfg.norm_placement == ("chameleon" if swin else "pre")
    hf_ids = interleaved_hf_ids()
    to_mot = torch.full((HF_VOCAB,), -1, dtype=torch.long)
    mapped = (table >= 0).nonzero().squeeze(1)
    to_mot[table[mapped]] = mapped
    ours = mot_logits(model, to_mot[hf_ids])
    theirs = hf_logits(hf, hf_ids)
    # Every Chameleon id has a mot id; the column of mot id r is Chameleon's column table[r].
    assert (to_mot >= 0).all()
    torch.testing.assert_close(ours[..., mapped], theirs[..., table[mapped]], rtol=0, atol=1e-5)
    assert theirs.abs().max() > 1  # the logits are not all near zero
    # The image tokens are mot's image range, in code order; the specials are mot's.
    image = model.vocab["image"]
    assert table[image.start : image.stop].tolist() == [4 + c for c in range(N_CODES)]
    assert table[model.vocab.special_id("<boi>")] == BOI and table[model.vocab.special_id("<bod>")] == BOS


def native_dense_run(tmp_path, gqa: bool, swin: bool) -> MoTTransformer:
    """A model trained here (random weights), dense, with Chameleon's options; saved as a run folder."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2 if gqa else 0, ffn_dim=48, untie=[],
                      modalities=[ModalityConfig("text", 40), ModalityConfig("image", 16)], qk_norm=True,
                      qk_norm_type="layernorm_per_head", norm_placement="chameleon" if swin else "pre", max_seq_len=64)
    torch.manual_seed(3)
    model = MoTTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    run = RunConfig(name="native", model=cfg, train=TrainConfig(seq_len=64))
    ckpt.save_checkpoint(tmp_path / "native" / "checkpoints", 5, model.state_dict(), {},
                         {"config": config_to_dict(run), "tokenizers": ""}, keep=1)
    return model


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("swin", [False, True])
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, gqa, swin):
    model = native_dense_run(tmp_path, gqa, swin)
    export_hf(tmp_path / "native", tmp_path / "hf")
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_key_value_heads == (2 if gqa else 4) and hf.config.swin_norm == swin
    vocab = model.vocab
    text, image = vocab["text"], vocab["image"]
    ids = torch.tensor([[vocab.special_id("<bod>"), 3, 17, 39, vocab.special_id("<boi>"),
                         *range(image.start, image.start + 5), vocab.special_id("<eoi>"), 8, 0]])
    ours, theirs = mot_logits(model, ids), hf_logits(hf, ids)  # identity layout: the ids are the same
    used = text.stop + image.size
    torch.testing.assert_close(ours[..., :used], theirs[..., :used], rtol=0, atol=1e-5)
    # transformers reads the image tokens from the written vocabulary_map
    assert hf.model.vocabulary_mapping.image_tokens == list(range(image.start, image.stop))


def test_import_export_import_is_the_identity(tmp_path):
    hf = hf_model(gqa=True, swin=False)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf2")
    import_hf(tmp_path / "hf2", tmp_path / "run2")
    from safetensors.torch import load_file

    original, again = (load_file(tmp_path / hf / "model.safetensors") for hf in ("hf", "hf2"))
    assert original.keys() == again.keys()  # the VQVAE's tensors too
    assert all(torch.equal(original[k], again[k]) for k in original)
    a = runs.load_model_state(runs.resolve_checkpoint(tmp_path / "run"))
    b = runs.load_model_state(runs.resolve_checkpoint(tmp_path / "run2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = [json.loads((tmp_path / run / "chameleon_vocab.json").read_text()) for run in ("run", "run2")]
    assert saved[0] == saved[1]  # the mapping, and the config.json the export wrote back
    reloaded = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf2").eval()
    ids = interleaved_hf_ids()
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(hf, ids), rtol=0, atol=0)


class _Allow(transformers.LogitsProcessor):
    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.allowed] = scores[:, self.allowed]
        return out


def test_greedy_generation_matches_transformers(tmp_path):
    hf, model, table = imported(tmp_path, gqa=True, swin=False)
    hf_prompt = [BOS, 30, 41, 25, 63, 26]
    to_mot = {int(h): r for r, h in enumerate(table.tolist()) if h >= 0}
    prompt = [to_mot[h] for h in hf_prompt]
    # Text only: an image span (16 codes) cannot fit in 10 tokens, so mot allows text ids and <eod>;
    # transformers gets the same rule as a logits processor.
    config = GenerationConfig(max_new_tokens=10, temperature=0, image_tokens=N_CODES)
    ours = generate(model, [prompt], config)[0].tokens
    text = model.vocab["text"]
    allowed = torch.tensor([*table[text.start : text.stop].tolist(), EOS])
    out = hf.generate(torch.tensor([hf_prompt]), max_new_tokens=10, do_sample=False, eos_token_id=EOS,
                      pad_token_id=PAD, logits_processor=transformers.LogitsProcessorList([_Allow(allowed)]))
    theirs = out[0, len(hf_prompt):].tolist()
    assert [int(table[t]) for t in ours] == theirs
    assert len(set(theirs)) > 2  # not one token repeated


def test_image_token_names_round_trip():
    assert [image_code_of(image_token_name(c)) for c in (0, 7, 10, 8191)] == [0, 7, 10, 8191]
    assert image_token_name(10) == "IMGIMGBAZ"  # transformers' bpe2img: digits as letters, one closing letter


def test_unsupported_chameleon_options_fail_by_name(tmp_path):
    hf = hf_model(gqa=False, swin=False)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["attention_bias"] = True
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ChameleonImportError, match="attention_bias"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    with pytest.raises(ChameleonImportError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "run")


def test_mot_runs_do_not_export_as_chameleon(tmp_path):
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, ffn_dim=48, qk_norm=True, qk_norm_type="layernorm_per_head",
                      modalities=[ModalityConfig("text", 40), ModalityConfig("image", 16)])
    run = RunConfig(name="mot", model=cfg, train=TrainConfig(seq_len=64))
    ckpt.save_checkpoint(tmp_path / "mot" / "checkpoints", 1, MoTTransformer(cfg).state_dict(), {},
                         {"config": config_to_dict(run), "tokenizers": ""}, keep=1)
    with pytest.raises(ChameleonImportError, match="Chameleon is dense"):
        export_hf(tmp_path / "mot", tmp_path / "hf")


def chameleon_style_tokenizer():
    """A tokenizer.json in Chameleon's id layout: specials, IMGIMG tokens, then text pieces (characters)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    by_id = {i: n for n, i in vocabulary_map().items()}
    pieces = iter("abcdefghijklmnopqrstuvwxyz .,!?ABCDEFGHIJKLMNOP")
    vocab = {by_id.get(i) or next(pieces): i for i in range(HF_VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tok


def test_imported_text_tokenizer_speaks_mots_ids(tmp_path):
    from mot.tokenize.load import load_tokenizer

    hf = hf_model(gqa=False, swin=False)
    hf.save_pretrained(tmp_path / "hf")
    theirs = chameleon_style_tokenizer()
    theirs.save(str(tmp_path / "hf" / "tokenizer.json"))
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, _, folder = load_for_inference(tmp_path / "run")
    ours = load_tokenizer("text", folder / "text")
    table = ChameleonVocab.from_dict(json.loads((tmp_path / "run" / "chameleon_vocab.json").read_text())["mapping"]
                                     ).mot_to_hf(model.vocab)
    text = "a cab, fed!"
    ids = ours.encode(text)
    assert ours.vocab_size == model.vocab["text"].size
    assert int(ids.max()) < model.vocab["text"].stop  # mot's text range
    assert table[ids].tolist() == theirs.encode(text).ids
    assert ours.decode(ids) == theirs.decode(theirs.encode(text).ids)
    import pickle  # prepare's worker processes get the tokenizer pickled

    assert torch.equal(pickle.loads(pickle.dumps(ours)).encode(text), ids)
    export_hf(tmp_path / "run", tmp_path / "hf2")
    assert (tmp_path / "hf2" / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()


def test_upcycled_import_computes_what_chameleon_does(tmp_path):
    from mot import grow

    hf, dense, table = imported(tmp_path, gqa=True, swin=True)
    source = grow.read_source(tmp_path / "run")
    cfg, state, optimizer = grow.upcycle(source)
    grow.write_derived(tmp_path / "mot", source, cfg, state, optimizer, "upcycle", {})
    model, cfg, _ = load_for_inference(tmp_path / "mot")
    assert cfg.model.untie and not cfg.model.is_dense
    assert model.blocks[0].attn.q_norm.bias.shape == (2, 4, 8)  # per tower, per head
    ids = torch.tensor([[0, 30, 41, 21, 4, 9, 20, 33]])  # Chameleon ids: text, an image span, text
    to_mot = dense.vocab.size * [0]
    for r, h in enumerate(table.tolist()):
        if h >= 0:
            to_mot[h] = r
    mot_ids = torch.tensor([[to_mot[i] for i in row] for row in ids.tolist()])
    mapped = (table >= 0).nonzero().squeeze(1)
    torch.testing.assert_close(mot_logits(model, mot_ids)[..., mapped], hf_logits(hf, ids)[..., table[mapped]],
                               rtol=0, atol=1e-5)


def test_import_and_export_commands(tmp_path, capsys):
    from mot.cli import main

    hf_model(gqa=False, swin=False).save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--dtype", "bf16"]) == 0
    assert "dense model" in capsys.readouterr().out
    state = runs.load_model_state(runs.resolve_checkpoint(tmp_path / "run"))
    assert state["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf2")]) == 0
    assert ChameleonConfig.from_pretrained(tmp_path / "hf2").num_hidden_layers == 2
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2  # never overwrites
    assert "already holds checkpoints" in capsys.readouterr().err


def test_imported_image_tokenizer_gives_chameleons_codes(tmp_path):
    from mot.tokenize.base import TokenizerError
    from mot.tokenize.load import load_tokenizer

    hf, model, table = imported(tmp_path, gqa=False, swin=False)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tokenizer = load_tokenizer("image", tmp_path / "run" / "tokenizers" / "image")
    codes = tokenizer.encode(images)  # [0, 1] images; Chameleon's processor gives the VQVAE [-1, 1]
    with torch.no_grad():
        theirs = hf.model.vqmodel.encode(images * 2 - 1).image_tokens.view(3, -1)
        bpe = hf.model.get_image_tokens(images * 2 - 1)
    assert codes.shape == (3, 16 * 16) and len(set(codes.flatten().tolist())) > 4
    assert torch.equal(codes, theirs)
    assert torch.equal(table[model.vocab["image"].start + codes], bpe.long())  # the same ids in the sequence
    with pytest.raises(TokenizerError, match="no decoder"):
        tokenizer.decode(codes[0])


def test_the_released_taming_vqgan_adds_the_decoder(tmp_path):
    """--vqgan: the taming checkpoint of the same VQGAN (Chameleon ships one) supplies the decoder; a VQGAN
    whose encoder differs from the VQVAE's is refused."""
    import dataclasses

    import yaml
    from safetensors.torch import save_file

    from mot.interop.chameleon import image_tokenizer_from_hf, read_hf_folder
    from mot.tokenize.image import ImageTokenizer
    from mot.tokenize.load import load_tokenizer

    hf = hf_model(gqa=False, swin=False)
    hf.save_pretrained(tmp_path / "hf")
    encoder_only = image_tokenizer_from_hf(*read_hf_folder(tmp_path / "hf"))
    torch.manual_seed(6)
    full = ImageTokenizer(dataclasses.replace(encoder_only.config, has_decoder=True))
    full.load_state_dict(encoder_only.state_dict(), strict=False)  # the same encoder; a random decoder
    c = full.config
    ddconfig = dict(double_z=False, z_channels=c.z_channels, resolution=c.resolution, in_channels=3, out_ch=3,
                    ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_resolutions=[], dropout=0.0)
    params = dict(embed_dim=c.embed_dim, n_embed=c.n_embed, ddconfig=ddconfig)
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                                    "params": params}}))
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "vqgan.safetensors"))
    import_hf(tmp_path / "hf", tmp_path / "run", vqgan=(tmp_path / "vqgan.safetensors", tmp_path / "vqgan.yaml"))
    tokenizer = load_tokenizer("image", tmp_path / "run" / "tokenizers" / "image")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    codes = tokenizer.encode(images)
    with torch.no_grad():
        assert torch.equal(codes, hf.model.vqmodel.encode(images * 2 - 1).image_tokens.view(2, -1))
        torch.testing.assert_close(tokenizer.decode(codes), full.decode(codes), rtol=0, atol=0)
    with torch.no_grad():
        full.encoder.conv_in.weight.add_(0.01)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ChameleonImportError, match="encoder.conv_in.weight differs"):
        import_hf(tmp_path / "hf", tmp_path / "run2", vqgan=(tmp_path / "other.safetensors", tmp_path / "vqgan.yaml"))
    assert not (tmp_path / "run2").exists()  # refused before anything is written


def test_derived_runs_keep_the_mapping_and_export_refuses_without_it(tmp_path):
    from mot import grow
    from mot.generate.loop import Generation
    from mot.generate.page import write_page
    from mot.generate.prompt import load_tokenizers

    hf, model, table = imported(tmp_path, gqa=False, swin=False)
    source = grow.read_source(tmp_path / "run")
    cfg, state, _ = grow.upcycle(source)
    grow.write_derived(tmp_path / "mot", source, cfg, state, {}, "upcycle", {})
    for name in ("chameleon_vocab.json", "chameleon_vqvae.safetensors"):
        assert (tmp_path / "mot" / name).read_bytes() == (tmp_path / "run" / name).read_bytes()
    # A page with an image span from the encoder-only VQGAN: a note in its place, the rest of the page written.
    vocab = model.vocab
    tokenizers = load_tokenizers(tmp_path / "run" / "tokenizers", vocab)
    codes = [vocab["image"].start + c % N_CODES for c in range(256)]
    result = Generation([vocab.special_id("<bod>")], [vocab.special_id("<boi>"), *codes, vocab.special_id("<eoi>")],
                        False)
    page = write_page(tmp_path / "page.html", vocab, tokenizers, [result])[0].read_text()
    assert "no decoder" in page and "<img" not in page
    # Without the mapping, an imported run's ids cannot be written back as Chameleon's.
    (tmp_path / "run" / "chameleon_vocab.json").unlink()
    with pytest.raises(ChameleonImportError, match="no chameleon_vocab.json"):
        export_hf(tmp_path / "run", tmp_path / "hf2")  # known from the checkpoint: written by import-hf
    chameleon_style_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    import_hf(tmp_path / "hf", tmp_path / "run3")
    ckpt.save_checkpoint(tmp_path / "tuned" / "checkpoints", 7, load_file_state(tmp_path / "run3"), {},
                         {"config": runs.read_meta(runs.resolve_checkpoint(tmp_path / "run3"))["config"],
                          "tokenizers": ""}, keep=1)  # as `mot train --init-from` would, minus the mapping
    shutil.copytree(tmp_path / "run3" / "tokenizers", tmp_path / "tuned" / "tokenizers")
    with pytest.raises(ChameleonImportError, match="no chameleon_vocab.json"):
        export_hf(tmp_path / "tuned", tmp_path / "hf2")  # known from its imported text tokenizer
