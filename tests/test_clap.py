"""CLAP audio encoders in our model (issue 11, part 1): presets, laion-clap and transformers checkpoints,
the joint embedding, and laion-clap's clip-length rule (repeatpad; deterministic windows past 10 s)."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from original_htsat import load_original_module
from torch import nn

import htsat
from htsat.clap import clap_embedding_from_features, repeat_pad

with contextlib.suppress(ImportError):  # before original_htsat stubs torchvision (see test_integrations.py)
    import transformers  # noqa: F401

SR = 48000
CLIP = 480000  # laion-clap's max_len: 10 s at 48 kHz
TOL = dict(rtol=1e-4, atol=1e-4)


def _perturb(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # not the frozen STFT / mel weights
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 5 - 40)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 50 + 20)


def _laion_audio(size: str):
    """laion-clap's audio branch (create_htsat_model with its 48 kHz audio_cfg) and its audio_projection."""
    module = load_original_module()
    audio_cfg = SimpleNamespace(
        model_name=size, class_num=527, sample_rate=SR, window_size=1024, hop_size=480, mel_bins=64, fmin=50, fmax=14000
    )
    torch.manual_seed(0)
    branch = module.create_htsat_model(audio_cfg)
    projection = nn.Sequential(nn.Linear(branch.num_features, 512), nn.ReLU(), nn.Linear(512, 512))  # CLAP's, relu
    _perturb(branch)
    _perturb(projection, seed=2)
    return branch.eval(), projection.eval()


def _as_laion_checkpoint(branch, projection) -> dict:
    """As distributed: {"epoch", "state_dict"} with DDP's 'module.' prefix and the text side alongside."""
    sd = {f"module.audio_branch.{k}": v.clone() for k, v in branch.state_dict().items()}
    sd.update({f"module.audio_projection.{k}": v.clone() for k, v in projection.state_dict().items()})
    sd["module.text_branch.embeddings.word_embeddings.weight"] = torch.randn(50, 8)
    sd["module.text_projection.0.weight"] = torch.randn(512, 8)
    sd["module.logit_scale_a"] = torch.tensor(2.6)
    sd["module.logit_scale_t"] = torch.tensor(2.6)
    return {"epoch": 45, "state_dict": sd}


def _laion_reference(branch, projection, wave: torch.Tensor):
    """laion-clap's embedding rule, computed independently: repeatpad below 10 s; past 10 s (where laion
    crops at random) our documented rule: 10 s windows every 5 s, the last ending at the end, projections
    averaged before normalisation."""
    S = wave.shape[1]
    if S <= CLIP:
        n = CLIP // S
        clips = [torch.cat([wave] * n + [wave.new_zeros(1, CLIP - n * S)], dim=1)]
    else:
        starts = list(range(0, S - CLIP + 1, SR * 5))
        if starts[-1] + CLIP < S:
            starts.append(S - CLIP)
        clips = [wave[:, s : s + CLIP] for s in starts]
    with torch.no_grad():
        latents = [branch({"waveform": c})["embedding"] for c in clips]
        projections = [projection(e) for e in latents]
    return torch.stack(latents).mean(0), F.normalize(torch.stack(projections).mean(0), dim=-1)


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_laion_checkpoint_reproduces_laion_embeddings(size):
    branch, projection = _laion_audio(size)
    ours = htsat.create_model(f"clap-htsat-{size}").eval()
    report = htsat.load_checkpoint(ours, _as_laion_checkpoint(branch, projection))
    assert report.source_format.startswith("laion-clap")
    assert sorted(report.skipped_other) == [
        "logit_scale_a", "logit_scale_t", "text_branch.embeddings.word_embeddings.weight", "text_projection.0.weight"
    ]  # fmt: skip
    assert len(report.loaded) + len(report.derived_checked) == len(branch.state_dict()) + 4
    g = torch.Generator().manual_seed(3)
    for seconds in (3.0, 10.0, 14.0):
        wave = 0.1 * torch.randn(1, int(seconds * SR), generator=g)
        want_latent, want_embedding = _laion_reference(branch, projection, wave)
        with torch.no_grad():
            got = ours(wave)
        torch.testing.assert_close(got["latent_output"], want_latent, **TOL, msg=f"embedding at {seconds} s")
        torch.testing.assert_close(got["clap_embedding"], want_embedding, **TOL, msg=f"CLAP embedding at {seconds} s")
        assert got["clap_embedding"].shape == (1, 512)
        # framewise output covers the real clip (not its repeats) in frames of 10 / 1024 s
        assert got["framewise_output"].shape[1] == math.ceil(seconds * 1024 / 10 - 1e-9)


def test_repeat_pad():
    x = torch.arange(1.0, 4.0).view(1, 3)
    assert repeat_pad(x, 8).tolist() == [[1, 2, 3, 1, 2, 3, 0, 0]]
    assert repeat_pad(x, 3) is x


def test_presets():
    for size, width, depths in (("tiny", 96, (2, 2, 6, 2)), ("base", 128, (2, 2, 12, 2)), ("large", 256, (2, 2, 12, 2))):
        cfg = htsat.load_config(f"clap-htsat-{size}")
        assert (cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.mel_bins, cfg.fmin, cfg.fmax) == (48000, 1024, 480, 64, 50, 14000)
        assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.num_classes) == (width, depths, (4, 8, 16, 32), 527)
        assert (cfg.clip_seconds, cfg.clip_fill, cfg.projection_dim) == (10.0, "repeatpad", 512)
    assert htsat.load_config("htsat-audioset").projection_dim == 0


def _small_clap_model(**kw):
    overrides = dict(htsat.TINY_OVERRIDES, clip_fill="repeatpad", projection_dim=16)
    overrides.update(kw)
    return htsat.create_model("htsat-audioset", **overrides).eval()


def test_projection_size_is_read_from_the_checkpoint_and_text_is_skipped():
    src = _small_clap_model(projection_dim=24)
    _perturb(src)
    ckpt = {"state_dict": {f"audio_branch.{k}": v for k, v in src.state_dict().items() if not k.startswith("audio_projection.")}}
    ckpt["state_dict"].update({k: v for k, v in src.state_dict().items() if k.startswith("audio_projection.")})
    ckpt["state_dict"]["text_branch.w"] = torch.zeros(2)
    dst = htsat.create_model("htsat-audioset", **dict(htsat.TINY_OVERRIDES, clip_fill="repeatpad"))  # no projection
    assert dst.audio_projection is None
    report = htsat.load_checkpoint(dst, ckpt)
    assert report.skipped_other == ["text_branch.w"] and "1 non-audio" in str(report)
    assert dst.config.projection_dim == 24 and dst.audio_projection[2].weight.shape == (24, 24)
    x = 0.1 * torch.randn(2, 16000 * 3)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x)["clap_embedding"], src(x)["clap_embedding"], **TOL)


def test_laion_checkpoint_is_strict_and_refuses_fusion():
    src = _small_clap_model()
    sd = {f"module.audio_branch.{k}": v for k, v in src.state_dict().items() if not k.startswith("audio_projection.")}
    sd.update({f"module.{k}": v for k, v in src.state_dict().items() if k.startswith("audio_projection.")})
    missing = dict(sd)
    del missing["module.audio_branch.layers.0.blocks.0.attn.qkv.weight"]
    with pytest.raises(htsat.CheckpointError, match=r"missing from the checkpoint: \['layers.0.blocks.0.attn.qkv.weight'\]"):
        htsat.load_checkpoint(_small_clap_model(), {"state_dict": missing})
    fused = dict(sd, **{"module.audio_branch.fusion_model.local_att.0.weight": torch.zeros(1),
                        "module.audio_branch.patch_embed.mel_conv2d.weight": torch.zeros(1)})  # fmt: skip
    dst = _small_clap_model()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(htsat.CheckpointError, match="fusion.*fusion_model.local_att.0.weight.*mel_conv2d"):
        htsat.load_checkpoint(dst, {"state_dict": fused})
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())  # no partial load


def test_model_from_checkpoint_picks_the_clap_preset():
    branch, projection = _laion_audio("tiny")
    model = htsat.model_from_checkpoint(_as_laion_checkpoint(branch, projection))
    assert model.config.name == "clap-htsat-tiny" and model.config.projection_dim == 512


# -------------------------------------------------------------------------------------------------
# transformers
# -------------------------------------------------------------------------------------------------


def _hf_and_ours():
    tf = pytest.importorskip("transformers")
    cfg = tf.ClapAudioConfig(
        spec_size=64, num_mel_bins=16, window_size=4, depths=[2, 2, 2], num_attention_heads=[2, 4, 8],
        patch_embeds_hidden_size=16, hidden_size=64, projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tf.ClapAudioModelWithProjection(cfg).eval()
    _perturb(hf)
    ours = htsat.create_model(
        "clap-htsat-tiny", spec_size=64, mel_bins=16, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 8),
        window_size=4, clip_seconds=2.0, long_hop_seconds=1.0, num_classes=5,
    ).eval()  # fmt: skip
    return tf, hf, ours


def test_transformers_checkpoint_reproduces_clap_audio_model(tmp_path):
    tf, hf, ours = _hf_and_ours()
    report = htsat.load_checkpoint(ours, hf.state_dict())
    assert report.source_format.startswith("transformers CLAP")
    assert ours.config.projection_dim == 8
    feats = torch.randn(2, 1, 201, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(feats)
        got = clap_embedding_from_features(ours, feats)
    torch.testing.assert_close(got["latent_output"], hf.audio_model(feats).pooler_output, **TOL)
    torch.testing.assert_close(got["clap_projection"], want.audio_embeds, **TOL)
    torch.testing.assert_close(got["clap_embedding"], F.normalize(want.audio_embeds, dim=-1), **TOL)
    # the same from model.safetensors, as transformers saves it
    hf.save_pretrained(tmp_path)
    again = _hf_and_ours()[2]
    htsat.load_checkpoint(again, tmp_path / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(clap_embedding_from_features(again, feats)["clap_embedding"], got["clap_embedding"], **TOL)


def test_transformers_clap_model_skips_text_and_refuses_fusion():
    tf, hf, ours = _hf_and_ours()
    text = tf.ClapTextConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                             max_position_embeddings=16, projection_dim=8)  # fmt: skip
    clap = tf.ClapModel(tf.ClapConfig(text_config=text.to_dict(), audio_config=hf.config.to_dict(), projection_dim=8))
    report = htsat.load_checkpoint(ours, clap.state_dict())
    assert report.skipped_other and all(k.startswith(("text_", "logit_scale")) for k in report.skipped_other)
    sd = dict(hf.state_dict())
    sd["audio_model.audio_encoder.patch_embed.fusion_model.local_att.0.weight"] = torch.zeros(1)
    with pytest.raises(htsat.CheckpointError, match="fusion"):
        htsat.load_checkpoint(ours, sd)


def test_failed_load_of_another_projection_size_leaves_the_model_as_it_was():
    """A laion-clap checkpoint with a 24-wide projection and a missing key: the load fails after the projection
    was sized from the checkpoint; the model keeps its own projection module, weights and projection_dim."""
    src = _small_clap_model(projection_dim=24)
    sd = {f"audio_branch.{k}": v for k, v in src.state_dict().items() if not k.startswith("audio_projection.")}
    sd.update({k: v for k, v in src.state_dict().items() if k.startswith("audio_projection.")})
    del sd["audio_branch.norm.bias"]
    dst = _small_clap_model()  # projection_dim 16
    projection, before = dst.audio_projection, {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(htsat.CheckpointError, match=r"missing from the checkpoint: \['norm.bias'\]"):
        htsat.load_checkpoint(dst, {"state_dict": sd})
    assert dst.audio_projection is projection and dst.config.projection_dim == 16
    after = dst.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
