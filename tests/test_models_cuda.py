"""CUDA paths of prefalign.models: dtype "auto", device placement, scores and LoRA on the GPU.
Skipped where torch sees no GPU (CI); run on a GPU machine with pytest tests/test_models_cuda.py."""
import pytest
import torch

from prefalign.errors import ModelError
from prefalign.models import apply_lora, disabled_adapter, load_causal_lm, load_scalar_model, resolve_device, resolve_dtype
from prefalign.tiny import save_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["The movie was great.", "Boring plot, weak ending and dull script overall.", "I loved it"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m"
    save_tiny_model(path)
    return str(path)


def test_auto_device_and_dtype(tiny_dir):
    assert resolve_device("auto").type == "cuda"
    assert resolve_dtype("auto", "cuda", trainable=True) == torch.float32  # fp32 masters, bf16 autocast in the loop
    assert resolve_dtype("auto", "cuda", trainable=False) in (torch.bfloat16, torch.float16)
    with pytest.raises(ModelError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    frozen, tok = load_causal_lm(tiny_dir, device="auto", trainable=False)
    train, _ = load_causal_lm(tiny_dir, device="cuda")
    assert frozen.device.type == "cuda" and frozen.dtype != torch.float32 and train.dtype == torch.float32
    x = torch.tensor([tok(TEXTS[1])["input_ids"]], device="cuda")
    with torch.no_grad():
        assert (frozen(x).logits.float() - train(x).logits).abs().max() < 0.05


@pytest.mark.parametrize("trainable, atol", [(True, 1e-5), (False, 3e-2)])
@torch.no_grad()
def test_scores_on_gpu_agree_across_padding_and_packing(tiny_dir, trainable, atol):
    model, tok = load_scalar_model(tiny_dir, device="cuda", trainable=trainable)
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    alone = torch.stack([model(torch.tensor([s], device="cuda"))[0] for s in seqs])
    T = max(map(len, seqs))
    for side in ("left", "right"):
        ids = torch.full((3, T), tok.pad_token_id)
        mask = torch.zeros(3, T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[i, sl], mask[i, sl] = torch.tensor(s), True
        scores = model(ids.cuda(), mask.cuda())
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, alone, rtol=0, atol=atol)
    ids = torch.tensor([sum(seqs, [])], device="cuda")
    positions = torch.tensor([sum((list(range(len(s))) for s in seqs), [])], device="cuda")
    segments = torch.tensor([sum(([i] * len(s) for i, s in enumerate(seqs)), [])], device="cuda")
    torch.testing.assert_close(model(ids, position_ids=positions, segment_ids=segments), alone, rtol=0, atol=atol)


def test_lora_autocast_step_keeps_the_reference_exact(tiny_dir):
    pytest.importorskip("peft")
    model, tok = load_causal_lm(tiny_dir, device="cuda")
    model = apply_lora(model, r=4, alpha=8)
    x = torch.tensor([tok(TEXTS[1])["input_ids"]], device="cuda")
    with torch.no_grad(), disabled_adapter(model):
        base = model(x).logits
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert (model(x).logits - base).abs().max() > 1e-4
        with disabled_adapter(model):
            torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
