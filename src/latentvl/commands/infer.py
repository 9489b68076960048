"""Answer a question about an image with a latent model.

One question: ``latentvl infer --model DIR --image Q.png --question "First move from start?"``.
Many: ``latentvl infer --model DIR --data records.jsonl --out answers.jsonl`` (batched, left padding).
Both run the two inference steps of design §9 (latent pass, then generation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..data.records import load_records
from ..errors import RecordError
from ..fileio import write_atomic
from ..inference.generate import LatentInference
from ..model.attention import LATENT_ATTENTION
from ..model.loading import DTYPES, load_latent_model

__all__ = ["ENGINES", "add_arguments", "add_model_arguments", "load_for_inference", "make_engine", "run"]

ENGINES = ("hf", "vllm")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``infer`` and ``eval``: which model, where it runs, how it thinks."""
    parser.add_argument("--model", type=Path, required=True, help="latentvl checkpoint directory")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="weights dtype (default: as saved)")
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa",
                        help="text attention implementation, latent-gated (default: sdpa)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="stage-C stop threshold (default: the model's latent_stop_threshold)")
    parser.add_argument("--no-latents", action="store_true",
                        help="prompt without latent segments (a model trained without latents)")
    parser.add_argument("--num-segments", type=int, default=1,
                        help="segments for a sample with no budgets and no CoT images (default: 1)")
    parser.add_argument("--engine", choices=ENGINES, default="hf",
                        help="where step 2 (generation) runs: hf (transformers' generate(), the default) or "
                             "vllm (vLLM, the 'vllm' extra; needs latent_null_scale 0)")
    parser.add_argument("--vllm-gpu-memory", type=float, default=None, metavar="FRACTION",
                        help="with --engine vllm on a GPU: the share of GPU memory vLLM may take (vLLM's "
                             "gpu_memory_utilization; leave room for step 1's model; default: vLLM's)")


def load_for_inference(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from ``args.model`` onto ``args.device``, in eval mode."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_latent_model(args.model, dtype=DTYPES[args.dtype],
                                         attn_implementation=LATENT_ATTENTION[args.attn])
    return model.to(device).eval(), processor


def make_engine(args: argparse.Namespace, model: Any, processor: Any, **kwargs: Any) -> LatentInference:
    """The inference engine ``args.engine`` names, on ``model`` (step 1) and, for vllm, ``args.model``."""
    if getattr(args, "engine", "hf") == "vllm":
        from ..inference.vllm_engine import VLLMInference

        llm_kwargs = {}
        if getattr(args, "vllm_gpu_memory", None) is not None:
            llm_kwargs["gpu_memory_utilization"] = args.vllm_gpu_memory
        return VLLMInference(model, processor, args.model, llm_kwargs=llm_kwargs, **kwargs)
    return LatentInference(model, processor, **kwargs)


def _budgets(text: str) -> list[int]:
    text = text.strip()
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated integers, got {text!r}") from err


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from err
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``latentvl infer``."""
    add_model_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--question", help="the question (with --image for its images)")
    what.add_argument("--data", type=Path, help="JSONL records to answer in batches (the records format)")
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="a question image; repeat for several")
    parser.add_argument("--budgets", type=_budgets, default=None,
                        help="explicit latent budgets, one per segment, e.g. 4,4 ('' = no segments)")
    parser.add_argument("--cot-image-size", type=_size, action="append", default=None, metavar="WxH",
                        help="size of a planned CoT image; one segment each, budget from its size")
    parser.add_argument("--out", type=Path, default=None, help="with --data: write results here (JSONL)")
    parser.add_argument("--batch-size", type=int, default=8, help="with --data: samples per batch")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default: 32)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --sample (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="with --sample; 0 = off (default: 0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")


def _describe(res: Any) -> str:
    if not res.ok:
        return f"{res.id}: error ({res.error_kind}): {res.error}"
    t = res.timings
    lines = [f"answer: {res.answer}",
             f"  budgets {res.budgets} ({res.budget_source}), used {res.used_lens}",
             f"  encode {t['encode_s']:.3f} s, latent pass {t['latent_pass_s']:.3f} s, "
             f"generation {t['generation_s']:.3f} s"
             f"{'' if res.finished else ' (stopped at max-new-tokens)'}"]
    if res.stop_probs:
        probs = "; ".join(", ".join(f"{p:.2f}" for p in seg) for seg in res.stop_probs)
        lines.insert(2, f"  stop probabilities {probs}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``latentvl infer``; exit status 1 when any sample failed."""
    if args.question is not None:
        sample: dict[str, Any] = {"id": "question", "question": args.question, "images": list(args.image)}
        if args.budgets is not None:
            sample["latent_budgets"] = args.budgets
        elif args.cot_image_size:
            sample["cot_image_sizes"] = args.cot_image_size
        samples: list[Any] = [sample]
        skipped = []
    else:
        if args.image or args.budgets is not None or args.cot_image_size:
            print("infer: error: --image/--budgets/--cot-image-size go with --question, not --data",
                  file=sys.stderr)
            return 2
        try:
            samples, skipped = load_records(args.data, skip_invalid=True, check_images=False)
        except RecordError as err:
            print(f"infer: error: {err}", file=sys.stderr)
            return 2
        if not samples:
            print(f"infer: error: {args.data}: no valid records"
                  + (f" ({len(skipped)} skipped)" if skipped else ""), file=sys.stderr)
            return 2
    try:
        model, processor = load_for_inference(args)
        engine = make_engine(args, model, processor, threshold=args.threshold, use_latents=not args.no_latents,
                             default_num_segments=args.num_segments)
        results = engine.run(samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed)
    except (OSError, ValueError, ImportError) as err:
        print(f"infer: error: {err}", file=sys.stderr)
        return 2
    for s in skipped:
        print(f"infer: skipped {s.source} (id {s.id!r}): {s.reason}", file=sys.stderr)
    rows = [r.to_dict() for r in results]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif args.out is None or args.question is not None:
        for res in results:
            print(_describe(res) if args.question is not None or not res.ok else f"{res.id}: {res.answer}")
    else:
        n_err = sum(not r.ok for r in results)
        print(f"wrote {len(rows)} results ({n_err} errors) to {args.out}")
    return 1 if skipped or any(not r.ok for r in results) else 0
