"""The two open GPU findings of benchmarks/GPU.md, as measurements gpu_check.py records.

1. bf16 autocast was 1.4-3.6x *slower* than fp32 at 25 M parameters (reward, DPO, PPO steps on an
   H200). ``autocast_steps`` times one training step (forward, backward, AdamW) of a model in three
   precisions: fp32, fp32 weights under bf16 autocast (what `--dtype auto` does), and bf16 weights,
   and profiles one step of each: device kernels launched, and the time in dtype casts
   (aten::_to_copy / aten::copy_). If autocast's extra kernels are the cause, the gap shrinks as the
   model grows (the real model) and the cast time and kernel count explain it.
2. The bf16 sampler was ~7x slower than fp32 after warm-up. ``sampler_speed`` times
   ``rollout.sample`` per weight dtype and attention kernel (sdpa, eager), counts both the sampled
   tokens and the decode steps the loop actually ran (B x R row-steps: a batch runs until its last
   row stops, so a dtype whose samples stop later costs more per sampled token), and lists the ops
   with the most device time in one bf16 and one fp32 call.

Both run on any device (the CPU under ``gpu_check.py --dry-run``); only GPU numbers answer the question.
"""
from __future__ import annotations

import statistics
import time


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _profile(fn, device: str, top: int = 8) -> dict:
    """Device kernels launched, time in dtype casts and the top ops by self time of one call of fn."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    on_device = device.startswith("cuda")

    def self_us(e) -> float:
        return (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) if on_device \
            else e.self_cpu_time_total

    kernels = sum(e.count for e in events if on_device and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    casts = sum(self_us(e) for e in events if e.key in ("aten::_to_copy", "aten::copy_"))
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return {"device_kernels": int(kernels), "cast_self_ms": round(casts / 1e3, 3),
            "top_ops": [{"op": e.key, "calls": e.count, "self_ms": round(self_us(e) / 1e3, 3)} for e in ranked]}


def autocast_steps(model_fn, device: str, batch: int = 8, tokens: int = 256, steps: int = 10) -> dict:
    """Median seconds of a training step per precision, with one profiled step each.
    model_fn() returns a fresh fp32 causal LM on the CPU."""
    import torch
    res = {}
    for mode in ("float32", "bf16-autocast", "bf16-weights"):
        model = model_fn().to(device)
        if mode == "bf16-weights":
            model = model.to(torch.bfloat16)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g).to(device)

        def step():
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # warm-up: first kernels, allocator, optimizer state
            step()
        times = []
        for _ in range(steps):
            _sync(device)
            t = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t)
        res[mode] = {"step_s": round(statistics.median(times), 5), "tokens_per_s": round(batch * tokens / statistics.median(times)),
                     **_profile(step, device)}
        model = opt = None  # free before the next precision
    res["autocast_over_fp32"] = round(res["bf16-autocast"]["step_s"] / res["float32"]["step_s"], 3)
    res["bf16_weights_over_fp32"] = round(res["bf16-weights"]["step_s"] / res["float32"]["step_s"], 3)
    return res


def sampler_speed(base, device: str, prompts_text: list[str], max_new_tokens: int = 64, repeats: int = 3) -> dict:
    """rollout.sample per weight dtype x attention kernel: sampled tokens/s and row-steps/s (B x R / s)."""
    import torch
    from prefalign.models import load_causal_lm
    from prefalign.rollout import sample
    res = {}
    for dtype in ("float32", "bfloat16"):
        for attn in ("sdpa", "eager"):
            model, tok = load_causal_lm(str(base), dtype=dtype, device=device, trainable=False, attn_implementation=attn)
            prompts = [tok(t)["input_ids"] for t in prompts_text]

            def run(seed: int):
                g = torch.Generator(device=device).manual_seed(seed)
                with torch.no_grad():
                    return sample(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, temperature=1.0, generator=g)

            run(0)  # warm-up
            rows = []
            for seed in range(1, repeats + 1):
                _sync(device)
                t = time.perf_counter()
                ro = run(seed)
                _sync(device)
                dt = time.perf_counter() - t
                rows.append({"s": dt, "tokens": int(ro.response_mask.sum()), "steps": ro.response_ids.shape[1]})
            s = sum(r["s"] for r in rows)
            res[f"{dtype}/{attn}"] = {
                "tokens_per_s": round(sum(r["tokens"] for r in rows) / s, 1),
                "row_steps_per_s": round(len(prompts) * sum(r["steps"] for r in rows) / s, 1),
                "decode_steps": [r["steps"] for r in rows], "sampled_tokens": [r["tokens"] for r in rows],
                **({"profile": _profile(lambda: run(99), device)} if attn == "sdpa" else {})}
            model = None
    fp32, bf16 = res["float32/sdpa"], res["bfloat16/sdpa"]
    res["bf16_over_fp32_tokens_per_s"] = round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 3)
    res["bf16_over_fp32_row_steps_per_s"] = round(bf16["row_steps_per_s"] / fp32["row_steps_per_s"], 3)
    return res
