"""Time pass 2's decoding per generated token: latentvl's ``generate()`` eager (dynamic cache, the default)
against the same on transformers' static cache, compiled (``GenerationSettings(compile=...)``), and both
against transformers' own stock Qwen2.5-VL decoding (dynamic cache eager, static cache compiled) on the same
weights and prompts without latents.

latentvl's rows decode after a stage-C pass 1 whose stop head halts some segments (the mask gates slots in
every layer). The per-token time is the marginal cost between two lengths of decoding, ``(t(n2) - t(n1)) /
(n2 - n1)``: the prefill and pass 1 cancel. Every variant is measured in this process, in interleaved
rounds; the first call of each compiled variant (which builds its graph) is timed apart ("compile").

Usage::

    python benchmarks/generation.py                  # tiny model on CPU, batch 8
    python benchmarks/generation.py --model 3b       # Qwen2.5-VL-3B architecture, random bf16 weights (GPU)
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from architectures import build, describe
from latent_pass import synthetic_batch, timed
from transformers import Qwen2_5_VLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

from latentvl import set_latent_fields
from latentvl.inference.generate import GenerationSettings


class StopAt(StoppingCriteria):
    """Stop every row once the sequence is ``length`` tokens long."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)


def stock_copy(model):
    """transformers' own Qwen2.5-VL with ``model``'s weights and stock sdpa attention."""
    config = copy.deepcopy(model.config)
    config._attn_implementation_internal = None
    config.text_config._attn_implementation_internal = None
    config.vision_config._attn_implementation_internal = None
    with torch.device(model.device):
        stock = Qwen2_5_VLForConditionalGeneration(config)
    stock.load_state_dict(model.state_dict(), strict=False)
    stock.set_attn_implementation("sdpa")
    return stock.to(model.dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "3b", "8b"], default="tiny",
                    help="tiny, Qwen2.5-VL-3B or Qwen3-VL-8B architecture (benchmarks/architectures.py)")
    ap.add_argument("--backbone", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl",
                    help="the tiny model's family")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64 tiny, 512 3b)")
    ap.add_argument("--segments", type=int, default=2)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs=2, default=[8, 40], help="the two decoding lengths n1 n2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="3b/8b only: fewer text layers (a quick check)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variants")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.model == "tiny" else torch.bfloat16
    prompt = args.prompt or (64 if args.model == "tiny" else 512)
    torch.manual_seed(0)
    model = build(args.model, device, dtype, args.layers, args.backbone)
    set_latent_fields(model.config, latent_mode_stage="C", latent_stop_loss_weight=1.0)
    with torch.no_grad():  # a stop head that halts some segments early: the mask gates slots
        head = model.latent_stop_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)).to(head.weight))
        head.bias.zero_()
    stock = stock_copy(model)
    ids, mask, segs, budgets = synthetic_batch(model, args.batch, prompt, args.segments, args.budget, device)
    with torch.no_grad():
        p1 = model.latent_pass(ids, mask, model.get_input_embeddings()(ids),
                               model.compute_position_ids(ids, mask, None, None), segs, budgets)
    latent_inputs = {"input_ids": ids, "attention_mask": mask, "ce_patch_pos": p1.ce_patch_pos,
                     "ce_patch_vec": p1.ce_patch_vec, "latent_kv_mask": p1.latent_kv_mask}
    plain = torch.randint(10, 90, (args.batch, ids.shape[1]), generator=torch.Generator().manual_seed(3)).to(device)
    plain_inputs = {"input_ids": plain, "attention_mask": torch.ones_like(plain)}

    n1, n2 = args.tokens

    def decode(m, inputs, compiled: bool, n: int):
        # Both lengths decode with room for n2 tokens (one static cache size, so one compiled graph) and
        # no end token; the shorter one stops after n tokens.
        settings = GenerationSettings(max_new_tokens=n2, compile=args.backend if compiled else False)
        config = settings.generation_config(0, [], torch.device(device))
        stop = StoppingCriteriaList([StopAt(inputs["input_ids"].shape[1] + n)])

        def run():
            with torch.no_grad():
                out = m.generate(**inputs, generation_config=config, stopping_criteria=stop)
            assert out.shape[1] == inputs["input_ids"].shape[1] + n
        return run

    variants = {
        "latentvl, dynamic cache, eager": (model, latent_inputs, False),
        "latentvl, static cache, compiled": (model, latent_inputs, True),
        "transformers, dynamic cache, eager": (stock, plain_inputs, False),
        "transformers, static cache, compiled": (stock, plain_inputs, True),
    }
    runs = {(name, n): decode(m, inputs, compiled, n) for name, (m, inputs, compiled) in variants.items()
            for n in (n1, n2)}
    first = {k: timed(fn, device) for k, fn in runs.items()}  # builds the compiled graphs
    times: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    per_token = {name: (med[(name, n2)] - med[(name, n1)]) / (n2 - n1) for name in variants}

    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; "
          f"model: {describe(args.model, args.backbone)} ({dtype}); batch {args.batch}; prompt {ids.shape[1]} tokens "
          f"({args.segments} segments x {args.budget} latents, used {p1.used_lens.sum().item()} of "
          f"{sum(map(sum, budgets))}); decoding {n1} and {n2} tokens; backend {args.backend}; "
          f"median of {args.repeats}")
    print(f"{'what':<40}{'ms per token':>14}{'compile s':>11}")
    for name, (_m, _i, compiled) in variants.items():
        compile_s = f"{first[(name, n1)] - med[(name, n1)]:.1f}" if compiled else ""
        print(f"{name:<40}{per_token[name] * 1e3:>14.2f}{compile_s:>11}")
    ours, stock_c = per_token["latentvl, static cache, compiled"], per_token["transformers, static cache, compiled"]
    print(f"latentvl compiled static over eager: {per_token['latentvl, dynamic cache, eager'] / ours:.2f}x faster; "
          f"per token, latentvl compiled / transformers compiled: {ours / stock_c:.2f}x")


if __name__ == "__main__":
    main()
