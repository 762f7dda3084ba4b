"""`ff plan` for the diffusers policies: the tiny FLUX plan equals the bytes of a real tiny run's tensors; every
tiny preset's plan agrees with its built policy; the stored configs of FLUX.1-dev, Qwen-Image and Wan 2.1 T2V
1.3B (tests/data/model-configs, config files only) give the models' real parameter counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flowfactory import config as ff_config
from flowfactory.plan import DTYPE_BYTES, PolicyPlan, dtype_name, plan_memory
from flowfactory.plugins import get_registry
from flowfactory.registry import BuildContext

CONFIGS = Path(__file__).parents[1] / "data" / "model-configs"
FLUX_DEV_TRANSFORMER = 11_901_408_320
QWEN_IMAGE_TRANSFORMER = 20_430_401_088
WAN_1_3B_TRANSFORMER = 1_418_996_800


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def module_bytes(module: torch.nn.Module) -> int:
    return nbytes(*module.parameters(), *module.buffers())


def run_config(policy: str, options: dict[str, Any], kl_beta: float = 0.0, **train: Any) -> tuple[Any, Any]:
    data = {"policy": {"name": policy, "options": options},
            "sampler": {"name": "flow-sde", "options": {"steps": 3}},
            "rewards": [{"name": "brightness"}], "optimizer": {"name": "grpo", "options": {"kl_beta": kl_beta}},
            "data": {"train": "colours", "eval": None},
            "train": {"prompts_per_epoch": 2, "group_size": 2, **train}}
    return ff_config.validate(data, "<test>", get_registry())


@pytest.mark.parametrize("lora", [None, {"rank": 4}], ids=["full", "lora"])
def test_tiny_flux_plan_equals_a_real_runs_bytes(lora: dict[str, Any] | None) -> None:
    """Trainable parameters, gradients, AdamW state after a step, frozen parts, a real rollout and conditioning."""
    registry = get_registry()
    cfg, options = run_config("flux", {"preset": "tiny", "lora": lora}, kl_beta=0.01)
    plan = plan_memory(cfg, options, registry)
    policy = registry.get("policy", "flux").create(options["policy"], BuildContext(seed=0, reference=True))
    params = policy.trainable_parameters()
    trainable = nbytes(*params)
    assert plan.row("trainable parameters").bytes == trainable == (4 * 45_056 if lora else 4 * 7_076_752)

    prompts = ["a red square", "a blue square", "a red square", "a blue square"]
    cond = policy.encode(prompts)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    noise = policy.noise(gens)
    policy.velocity(noise, torch.full((4,), 0.5), cond).float().pow(2).mean().backward()
    assert plan.row("gradients").bytes == nbytes(*(p.grad for p in params))
    opt = torch.optim.AdamW(params, lr=1e-4)
    opt.step()
    assert plan.row("optimizer state (AdamW)").bytes == nbytes(*(t for s in opt.state.values() for t in s.values()))

    pipe = policy.pipe
    assert plan.row("text encoders").bytes == module_bytes(pipe.text_encoder) + module_bytes(pipe.text_encoder_2)
    assert plan.row("VAE").bytes == module_bytes(pipe.vae)
    if lora:
        frozen = [p for n, p in policy.transformer.named_parameters() if "lora_" not in n]
        assert plan.row("frozen transformer weights").bytes == nbytes(*frozen, *policy.transformer.buffers())
    else:
        assert plan.row("reference copy").bytes == module_bytes(policy._frozen_copy) == 4 * 7_076_752

    sampler = registry.get("sampler", "flow-sde").create(options["sampler"], BuildContext(seed=0))
    with torch.no_grad():
        traj = sampler.rollout(policy, cond, noise.detach(), gens, keep="steps")
        images = policy.decode(traj.final)
    assert plan.row("rollout buffer").bytes == nbytes(traj.latents, traj.final, traj.log_probs, traj.sigmas,
                                                      traj.stochastic)
    assert plan.row("decoded samples").bytes == nbytes(images)
    assert plan.row("epoch conditioning").bytes == nbytes(*cond.values())


@pytest.mark.parametrize("policy_name,options", [
    ("flux", {"preset": "tiny"}), ("sd3", {"preset": "tiny"}), ("qwen-image", {"preset": "tiny", "lora": {"rank": 2}}),
    ("wan", {"preset": "tiny", "tiny_experts": 2}), ("wan", {"preset": "tiny", "guidance_scale": 3.0}),
])
def test_tiny_presets_plan_like_their_built_policy(policy_name: str, options: dict[str, Any]) -> None:
    spec = get_registry().get("policy", policy_name)
    opts = spec.validate_options(options)
    plan: PolicyPlan = spec.plan(opts, BuildContext(seed=0, reference=True))
    policy = spec.create(opts, BuildContext(seed=0, reference=True))
    assert plan.latent_shape == tuple(policy.latent_shape)
    noise = policy.noise([torch.Generator().manual_seed(0)])
    assert plan.latent_dtype == dtype_name(noise.dtype)
    cond = policy.encode(["a red square"])
    assert {k: (tuple(v.shape[1:]), dtype_name(v.dtype)) for k, v in cond.items()} == dict(plan.conditioning)
    trained = [p for p in plan.parts if p.role == "trained"]
    assert sum(p.trainable_bytes for p in trained) == nbytes(*policy.trainable_parameters())
    frozen = {p.name: p.frozen_bytes for p in plan.parts if p.role in ("text encoder", "vae")}
    assert frozen == {n: module_bytes(getattr(policy.pipe, n)) for n in frozen}
    with torch.no_grad():
        sample = policy.decode(noise)
    assert plan.sample_shape == tuple(sample.shape[1:])


def plan_of(model: str, processes: int = 1, **options: Any) -> Any:
    cfg, opts = run_config("flux" if "flux" in model else "qwen-image" if "qwen" in model else "wan",
                           {"model": str(CONFIGS / model), **options}, prompts_per_epoch=8)
    return plan_memory(cfg, opts, get_registry(), processes)


def parts(plan: Any) -> dict[str, tuple[int, int]]:
    return {p.name: (p.parameters, p.trainable_elements) for p in plan.parts}


def test_flux_dev_config_has_11_9b_transformer_parameters() -> None:
    full = plan_of("flux.1-dev")
    assert parts(full) == {"transformer": (FLUX_DEV_TRANSFORMER, FLUX_DEV_TRANSFORMER),
                           "text_encoder": (123_060_480, 0), "text_encoder_2": (4_762_310_656, 0),
                           "vae": (83_819_683, 0)}
    assert full.row("trainable parameters").bytes == 4 * FLUX_DEV_TRANSFORMER  # float32 master weights
    lora = plan_of("flux.1-dev", lora={"rank": 32})
    assert parts(lora)["transformer"] == (FLUX_DEV_TRANSFORMER + 52_297_728, 52_297_728)
    assert lora.row("frozen transformer weights").bytes == 2 * FLUX_DEV_TRANSFORMER  # bfloat16 base
    assert lora.row("text encoders").bytes == 2 * (123_060_480 + 4_762_310_656) + 8 * 77  # + CLIP's position ids
    # FLUX.1-dev: packed 512x512 latents [1024, 64], T5 [512, 4096] + pooled [768] bfloat16 per prompt
    assert "[1024, 64] bfloat16" in lora.row("rollout buffer").detail
    from flowfactory.train.data import load_prompts

    prompts = len(set(load_prompts("colours", None, "data.train")))
    assert lora.row("conditioning cache").bytes == prompts * 2 * (512 * 4096 + 768)


def test_flux_dev_fsdp_over_8_divides_the_sharded_parts() -> None:
    one = plan_of("flux.1-dev")
    cfg, opts = run_config("flux", {"model": str(CONFIGS / "flux.1-dev")}, prompts_per_epoch=8,
                           parallel={"strategy": "fsdp"})
    eight = plan_memory(cfg, opts, get_registry(), 8)
    for item in ("trainable parameters", "gradients"):
        assert eight.row(item).bytes == one.row(item).bytes // 8 == FLUX_DEV_TRANSFORMER // 2
    assert eight.row("optimizer state (AdamW)").bytes == FLUX_DEV_TRANSFORMER + 4 * 1160
    assert eight.row("text encoders").bytes == one.row("text encoders").bytes  # replicated
    assert eight.row("rollout buffer").bytes * 8 == one.row("rollout buffer").bytes + 7 * (4 * 4 + 3)  # sigmas, mask


def test_qwen_image_and_wan_configs() -> None:
    qwen = plan_of("qwen-image")
    assert qwen.parts[0].parameters == QWEN_IMAGE_TRANSFORMER
    assert parts(qwen)["text_encoder"] == (8_292_166_656, 0)  # Qwen2.5-VL-7B
    # the last block's text-stream output path never gets a gradient: frozen under a full finetune
    assert parts(qwen)["transformer"][1] == QWEN_IMAGE_TRANSFORMER - 94_393_472
    wan = plan_of("wan2.1-t2v-1.3b", lora={"rank": 32})
    assert wan.parts[0].parameters - wan.parts[0].trainable_elements == WAN_1_3B_TRANSFORMER
    assert parts(wan)["text_encoder"] == (5_680_910_336, 0)  # UMT5-XXL encoder
    assert "[16, 21, 60, 104] float32" in wan.row("rollout buffer").detail  # 81 frames of 480x832
    assert wan.row("decoded samples").bytes == 16 // 1 * 81 * 3 * 480 * 832 * DTYPE_BYTES["float32"]
