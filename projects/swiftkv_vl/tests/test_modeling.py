"""SwiftKV models: teacher equivalence, init rules, freezing, cached generation, prefill saving, save/reload."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("swiftkv_vl") is None:  # running from a checkout without the plugin installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import swiftkv_vl
import torch
from swiftkv_vl import (
    LlamaSwiftKVConfig,
    LlamaSwiftKVForCausalLM,
    Qwen2SwiftKVConfig,
    Qwen2SwiftKVForCausalLM,
    convert_to_swiftkv,
    freeze_all_but_swiftkv,
    init_swiftkv_from_teacher,
    set_swiftkv,
    swiftkv_distill_loss_sums,
)
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
)

torch.set_num_threads(1)
swiftkv_vl.register_auto()

VOCAB = 96
IMAGE_TOKEN = 95
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _llama(m: int = 1, g: int = 2, **kw) -> LlamaSwiftKVForCausalLM:
    torch.manual_seed(0)
    return LlamaSwiftKVForCausalLM(
        LlamaSwiftKVConfig(**{**TEXT, **kw}, num_key_value_layers=m, key_value_group_size=g)
    ).eval()


def _qwen2(m: int = 1, g: int = 2, **kw) -> Qwen2SwiftKVForCausalLM:
    torch.manual_seed(0)
    return Qwen2SwiftKVForCausalLM(
        Qwen2SwiftKVConfig(**{**TEXT, **kw}, num_key_value_layers=m, key_value_group_size=g)
    ).eval()


def _randomise_swiftkv(model: torch.nn.Module) -> None:
    """Make the student visibly different from the teacher (tests must not pass by accident of init)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_swiftkv" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "norm" in name else 0.0))


def _randomise_teacher_biases(model: torch.nn.Module) -> None:
    """transformers initialises biases to zero; give them values so that averaging them is observable."""
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "_swiftkv" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _vision() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )


def _llava_next(text_config) -> LlavaNextForConditionalGeneration:
    cfg = LlavaNextConfig(
        text_config=text_config,
        vision_config=_vision(),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]],
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(cfg).eval()


def _llava_inputs(model: LlavaNextForConditionalGeneration, text_len: int = 9) -> dict:
    """One image (16x32 -> base tile + 2 tiles) plus text; the image-token count comes from the model itself."""
    gen = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(1, 3, 3, 16, 16, generator=gen)
    image_sizes = torch.tensor([[16, 32]])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    n_image = sum(f.shape[0] for f in feats)
    text = torch.randint(3, IMAGE_TOKEN, (1, text_len), generator=gen)
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, n_image), IMAGE_TOKEN), text], dim=1)
    return {"input_ids": ids, "pixel_values": pixel_values, "image_sizes": image_sizes}


def _ids(batch: int = 2, length: int = 13, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- config


def test_config_validation_and_defaults():
    cfg = LlamaSwiftKVConfig(**TEXT, num_key_value_layers=3, key_value_group_size=2)
    assert cfg.model_type == "llama_swiftkv" and cfg.swiftkv is False
    assert (cfg.num_key_value_layers, cfg.key_value_group_size) == (3, 2)
    assert cfg.num_swiftkv_groups == 1
    default_m = LlamaSwiftKVConfig(**{**TEXT, "num_hidden_layers": 8}).num_key_value_layers
    assert default_m == 4  # M defaults to L // 2
    assert Qwen2SwiftKVConfig(**TEXT, num_key_value_layers=1).model_type == "qwen2_swiftkv"
    for cls in (LlamaSwiftKVConfig, Qwen2SwiftKVConfig):
        with pytest.raises(ValueError, match="0 < num_key_value_layers < num_hidden_layers"):
            cls(**TEXT, num_key_value_layers=5)
        with pytest.raises(ValueError, match="0 < num_key_value_layers"):
            cls(**TEXT, num_key_value_layers=0)
        with pytest.raises(ValueError, match=r"\(5 - 2\) % 2 = 1"):
            cls(**TEXT, num_key_value_layers=2, key_value_group_size=2)


# --------------------------------------------------------------------------- teacher equivalence


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("make", "teacher_cls", "teacher_cfg_cls"),
    [(_llama, LlamaForCausalLM, LlamaConfig), (_qwen2, Qwen2ForCausalLM, Qwen2Config)],
    ids=["llama", "qwen2"],
)
def test_swiftkv_off_is_the_teacher(make, teacher_cls, teacher_cfg_cls, attn):
    student = make()
    _randomise_swiftkv(student)
    teacher = teacher_cls(teacher_cfg_cls(**TEXT)).eval()
    missing, unexpected = teacher.load_state_dict(student.state_dict(), strict=False)
    per_linear = 2 if teacher_cls is Qwen2ForCausalLM else 1  # Qwen2: weight and bias
    assert missing == [] and all("_swiftkv" in k for k in unexpected)
    assert len(unexpected) == 1 + (4 + 2 * 2) * per_linear  # norm, q of layers 1-4, k/v of 2 groups
    student.config._attn_implementation = teacher.config._attn_implementation = attn
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on one row
    with torch.no_grad():
        ref = teacher(ids, attention_mask=mask).logits
        off = student(ids, attention_mask=mask).logits
        on = student.swiftkv(True)(ids, attention_mask=mask).logits
    assert (off - ref).abs().max().item() <= 1e-6
    assert (on - ref).abs().max().item() > 1e-2  # and the student path really is different


def test_swiftkv_off_is_the_teacher_inside_llava_next():
    student = _llava_next(LlamaSwiftKVConfig(**TEXT, num_key_value_layers=3, key_value_group_size=1))
    _randomise_swiftkv(student)
    teacher = _llava_next(LlamaConfig(**TEXT))
    missing, unexpected = teacher.load_state_dict(student.state_dict(), strict=False)
    assert missing == [] and len(unexpected) == 1 + 2 + 2 * 2
    inputs = _llava_inputs(student)
    with torch.no_grad():
        ref = teacher(**inputs).logits
        off = student(**inputs).logits
        on = set_swiftkv(student, True)(**inputs).logits
    assert ref.shape[1] == inputs["input_ids"].shape[1]
    assert (off - ref).abs().max().item() <= 1e-6
    assert (on - ref).abs().max().item() > 1e-2
    assert student.config.text_config.swiftkv and student.model.language_model.config.swiftkv


# --------------------------------------------------------------------------- init / freeze


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("group", [1, 2])
def test_init_from_teacher(make, group):
    model = make(m=3, g=group)
    _randomise_swiftkv(model)
    _randomise_teacher_biases(model)
    init_swiftkv_from_teacher(model)
    lm = model.model
    assert torch.equal(lm.norm_swiftkv.weight, lm.layers[3].input_layernorm.weight)
    for i in (3, 4):
        a = lm.layers[i].self_attn
        assert torch.equal(a.q_proj_swiftkv.weight, a.q_proj.weight)
        if a.q_proj.bias is not None:
            assert torch.equal(a.q_proj_swiftkv.bias, a.q_proj.bias)
    heads = [3, 4] if group == 1 else [3]
    assert [i for i in range(5) if hasattr(lm.layers[i].self_attn, "k_proj_swiftkv")] == heads
    for head in heads:
        members = [lm.layers[i].self_attn for i in range(head, head + group)]
        a = lm.layers[head].self_attn
        for proj in ("k_proj", "v_proj"):
            mean_w = sum(getattr(m, proj).weight for m in members) / group
            assert (getattr(a, f"{proj}_swiftkv").weight - mean_w).abs().max().item() < 1e-7
            if make is _qwen2:  # Qwen2 has q/k/v biases; they are averaged too
                mean_b = sum(getattr(m, proj).bias for m in members) / group
                assert getattr(a, f"{proj}_swiftkv").bias.abs().sum().item() > 0
                assert (getattr(a, f"{proj}_swiftkv").bias - mean_b).abs().max().item() < 1e-7
    if group == 2:  # a real mean, not a copy of the first layer
        assert not torch.equal(
            lm.layers[3].self_attn.k_proj_swiftkv.weight, lm.layers[3].self_attn.k_proj.weight
        )
    with torch.no_grad():
        ids = _ids()
        hs_off = model(ids, output_hidden_states=True).hidden_states
        hs_on = model.swiftkv(True)(ids, output_hidden_states=True).hidden_states
    assert len(hs_on) == 6
    for k in range(4):  # inputs of layers 0..3: SwiftKV changes layers >= M = 3 only
        assert torch.equal(hs_off[k], hs_on[k])
    # The first SwiftKV layer: with G=1 its init reproduces the teacher exactly (norm_swiftkv = its input norm,
    # k/v_swiftkv = its own k/v, q_swiftkv = q); with G=2 its K/V are the group mean, so it differs.
    diff_layer3 = (hs_off[4] - hs_on[4]).abs().max().item()
    assert diff_layer3 <= 1e-6 if group == 1 else diff_layer3 > 1e-4
    # layer 4 reads K/V made from layer 3's input, never its own: it differs in both cases
    assert (hs_off[5] - hs_on[5]).abs().max().item() > 1e-4


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_freeze_trains_only_swiftkv(gradient_checkpointing):
    model = _qwen2(m=2, g=3)
    init_swiftkv_from_teacher(model)
    trainable = freeze_all_but_swiftkv(model)
    assert sorted(trainable) == sorted(
        ["model.norm_swiftkv.weight"]
        + [f"model.layers.{i}.self_attn.q_proj_swiftkv.{p}" for i in (2, 3, 4) for p in ("weight", "bias")]
        + [f"model.layers.2.self_attn.{k}_proj_swiftkv.{p}" for k in "kv" for p in ("weight", "bias")]
    )
    if gradient_checkpointing:  # reentrant: the SwiftKV K/V must still get their gradient through the layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = _ids()
    labels = ids.clone()
    with torch.no_grad():
        teacher = model.swiftkv(False).model(ids, output_hidden_states=True)
    model.train().swiftkv(True)
    student = model.model(ids, output_hidden_states=True)
    sums = swiftkv_distill_loss_sums(
        student.last_hidden_state,
        teacher.last_hidden_state,
        model.lm_head.weight,
        labels,
        None,
        None,
        temperature=2.0,
        student_mid=student.hidden_states[-2],
        teacher_mid=teacher.hidden_states[-2],
    )
    (sums["kl_sum"] / sums["label_tokens"] + sums["mse_sum"] / sums["hidden_tokens"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if n not in trainable)
    for n in trainable:
        assert grads[n] is not None and grads[n].abs().sum().item() > 0, n


def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _llama(m=2, g=1)
        _randomise_swiftkv(model)
        freeze_all_but_swiftkv(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train().swiftkv(True)
        model(_ids(), labels=_ids()).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt) and len(plain) == 1 + 3 + 6
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) < 1e-5


# --------------------------------------------------------------------------- generation and prefill


def _greedy_recompute(model, ids: torch.Tensor, steps: int, **extra) -> torch.Tensor:
    """Greedy decoding with no cache: each step runs the full sequence and takes argmax at the last position."""
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=out, use_cache=False, **extra).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_cached_generation_matches_recompute(make):
    model = make(m=1, g=2).swiftkv(True)
    _randomise_swiftkv(model)
    # No EOS: run every step (min_new_tokens would mask EOS, which is not plain argmax).
    model.generation_config.eos_token_id = None
    ids = _ids(batch=2, length=11)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, _greedy_recompute(model, ids, 8))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen2_sliding_window_layers(attn):
    """Sliding-window layers >= M keep their own mask type on the SwiftKV path (and in the prefill shortcut)."""
    window = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)
    model = _qwen2(m=1, g=2, **window)
    assert model.config.layer_types[2:] == ["sliding_attention"] * 3
    teacher = Qwen2ForCausalLM(Qwen2Config(**TEXT, **window)).eval()
    teacher.load_state_dict(model.state_dict(), strict=False)
    model.config._attn_implementation = teacher.config._attn_implementation = attn
    ids = _ids(batch=2, length=12)
    with torch.no_grad():
        assert (model(ids).logits - teacher(ids).logits).abs().max().item() <= 1e-6
    _randomise_swiftkv(model.swiftkv(True))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, _greedy_recompute(model, ids, 6))


def test_cached_generation_matches_recompute_llava_next():
    model = set_swiftkv(
        _llava_next(LlamaSwiftKVConfig(**TEXT, num_key_value_layers=2, key_value_group_size=3)), True
    )
    _randomise_swiftkv(model)
    model.generation_config.eos_token_id = None
    inputs = _llava_inputs(model)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 6
    ref = _greedy_recompute(
        model, inputs["input_ids"], 6, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    )
    assert torch.equal(cached, ref)


def _record_lengths(model, layers) -> tuple[dict[int, list[int]], list]:
    seen: dict[int, list[int]] = {i: [] for i in range(len(layers))}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].shape[1]))
        for i, layer in enumerate(layers)
    ]
    return seen, handles


def test_prefill_runs_only_the_last_token_through_layers_after_m():
    model = _llama(m=2, g=1)
    _randomise_swiftkv(model)
    model.generation_config.eos_token_id = None
    ids = _ids(batch=2, length=12)

    seen, handles = _record_lengths(model, model.model.layers)
    with torch.no_grad():
        model.swiftkv(True).generate(ids, max_new_tokens=3, do_sample=False)
    assert [seen[i] for i in range(5)] == [[12, 1, 1]] * 2 + [[1, 1, 1]] * 3
    # the teacher prefills every layer with the full prompt
    seen.update({i: [] for i in seen})
    with torch.no_grad():
        model.swiftkv(False).generate(ids, max_new_tokens=3, do_sample=False)
    assert [seen[i] for i in range(5)] == [[12, 1, 1]] * 5
    # training / scoring (no cache, full sequence): every token runs every layer with SwiftKV on
    seen.update({i: [] for i in seen})
    model.swiftkv(True)(ids, labels=ids)
    assert [seen[i] for i in range(5)] == [[12]] * 5
    for h in handles:
        h.remove()


def test_prefill_shortcut_fills_the_cache_like_the_full_forward():
    """Prefill with the shortcut vs. without it (no prefill signal): same last logits, same cache everywhere."""
    model = _qwen2(m=2, g=3).swiftkv(True)
    _randomise_swiftkv(model)
    ids = _ids(batch=2, length=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for attn in ("sdpa", "eager"):
        model.config._attn_implementation = attn
        with torch.no_grad():
            fast_cache, full_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
            fast = model(ids, attention_mask=mask, past_key_values=fast_cache, logits_to_keep=1).logits
            full = model(ids, attention_mask=mask, past_key_values=full_cache).logits
        assert fast.shape == (2, 1, VOCAB) and full.shape == (2, 10, VOCAB)
        assert (fast[:, -1] - full[:, -1]).abs().max().item() < 1e-5
        for layer in range(5):
            assert fast_cache.layers[layer].keys.shape[2] == 10
            assert (fast_cache.layers[layer].keys - full_cache.layers[layer].keys).abs().max().item() < 1e-6
            assert (
                fast_cache.layers[layer].values - full_cache.layers[layer].values
            ).abs().max().item() < 1e-6


def test_prefill_shortcut_inside_llava_next():
    model = set_swiftkv(
        _llava_next(LlamaSwiftKVConfig(**TEXT, num_key_value_layers=2, key_value_group_size=1)), True
    )
    model.generation_config.eos_token_id = None
    inputs = _llava_inputs(model)
    prompt_len = inputs["input_ids"].shape[1]
    seen, handles = _record_lengths(model, model.model.language_model.layers)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    for h in handles:
        h.remove()
    assert [seen[i] for i in range(5)] == [[prompt_len, 1]] * 2 + [[1, 1]] * 3


# --------------------------------------------------------------------------- save / reload / convert


def test_llava_next_save_reload(tmp_path):
    model = set_swiftkv(
        _llava_next(LlamaSwiftKVConfig(**TEXT, num_key_value_layers=3, key_value_group_size=2)), True
    )
    _randomise_swiftkv(model)
    inputs = _llava_inputs(model)
    model.save_pretrained(tmp_path)
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.text_config.model_type == "llama_swiftkv"
    assert type(reloaded.model.language_model).__name__ == "LlamaSwiftKVModel"
    assert (
        reloaded.config.text_config.num_key_value_layers,
        reloaded.config.text_config.key_value_group_size,
    ) == (3, 2)
    assert reloaded.config.text_config.swiftkv is True
    sd, sd2 = model.state_dict(), reloaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        for on in (True, False):
            a = set_swiftkv(model, on)(**inputs).logits
            b = set_swiftkv(reloaded, on)(**inputs).logits
            assert (a - b).abs().max().item() == 0.0


def test_llava_onevision_qwen2_save_reload(tmp_path):
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    cfg = LlavaOnevisionConfig(
        text_config=Qwen2SwiftKVConfig(**TEXT, num_key_value_layers=1, key_value_group_size=4),
        vision_config=vision,
        image_token_index=IMAGE_TOKEN,
        video_token_index=IMAGE_TOKEN - 1,
        image_grid_pinpoints=[[16, 16], [16, 32]],
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    _randomise_swiftkv(model)
    model.save_pretrained(tmp_path)
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.text_config.model_type == "qwen2_swiftkv"
    sd, sd2 = model.state_dict(), reloaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = _ids(batch=1, length=9)
    with torch.no_grad():
        for on in (False, True):
            a = set_swiftkv(model, on)(input_ids=ids).logits
            b = set_swiftkv(reloaded, on)(input_ids=ids).logits
            assert (a - b).abs().max().item() == 0.0


def test_convert_text_teacher_and_checkpoint_loading(tmp_path):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**TEXT, rms_norm_eps=1e-5)).eval()
    student = convert_to_swiftkv(teacher, num_key_value_layers=3, key_value_group_size=2)
    assert isinstance(student, LlamaSwiftKVForCausalLM) and student.config.model_type == "llama_swiftkv"
    assert student.config.rms_norm_eps == 1e-5 and student.config.num_key_value_layers == 3
    ids = _ids()
    with torch.no_grad():
        assert (student(ids).logits - teacher(ids).logits).abs().max().item() <= 1e-6
    assert torch.equal(student.model.norm_swiftkv.weight, teacher.model.layers[3].input_layernorm.weight)

    # A teacher checkpoint loads into the SwiftKV class with only the SwiftKV parameters missing.
    teacher.save_pretrained(tmp_path)
    cfg = convert_to_swiftkv(teacher.config, 3, 2)
    loaded, info = LlamaSwiftKVForCausalLM.from_pretrained(tmp_path, config=cfg, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(n for n, _ in loaded.named_parameters() if "_swiftkv" in n)
    assert info["unexpected_keys"] == [] or not info["unexpected_keys"]
    assert type(AutoModelForCausalLM.from_config(cfg)) is LlamaSwiftKVForCausalLM

    with pytest.raises(ValueError, match="num_key_value_layers"):
        convert_to_swiftkv(teacher.config, 5, 1)


def test_convert_llava_next_teacher():
    teacher = _llava_next(LlamaConfig(**TEXT))
    student = convert_to_swiftkv(teacher, num_key_value_layers=2, key_value_group_size=3)
    assert type(student) is LlavaNextForConditionalGeneration
    assert student.config.text_config.model_type == "llama_swiftkv"
    drop_dtype = lambda cfg: {k: v for k, v in cfg.to_dict().items() if k != "dtype"}  # noqa: E731
    assert drop_dtype(student.config.vision_config) == drop_dtype(teacher.config.vision_config)
    assert student.config.image_grid_pinpoints == teacher.config.image_grid_pinpoints
    inputs = _llava_inputs(teacher)
    with torch.no_grad():
        assert (student(**inputs).logits - teacher(**inputs).logits).abs().max().item() <= 1e-6
    lm = student.model.language_model
    k_mean = sum(lm.layers[i].self_attn.k_proj.weight for i in (2, 3, 4)) / 3
    assert (lm.layers[2].self_attn.k_proj_swiftkv.weight - k_mean).abs().max().item() < 1e-7
