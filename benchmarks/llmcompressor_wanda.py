"""Time llm-compressor's Wanda (WandaPruningModifier via `oneshot`, sequential pipeline) on a
local fp32 safetensors copy of SmolLM2-135M-Instruct, using calibration tokens read from a .npy
file so that llmprune's Wanda can be run on exactly the same tokens.

Runs in a separate venv that has llmcompressor installed (not llmprune's venv):

    /work/llmc-venv/bin/python benchmarks/llmcompressor_wanda.py \
        --tokens calib.npy --out llmc_masks.safetensors

Only the `oneshot` call is timed (model/tokenizer loading and dataset building are not).
Output: the boolean keep-mask (weight != 0) of every pruned Linear, keyed by module name
(e.g. model.layers.0.self_attn.q_proj), written to --out (.safetensors or .pt), and one JSON
line on stdout: {"tool": "llmcompressor", "version": ..., "prune_s": ..., ...}.
"""

from __future__ import annotations

import os

# Nothing may reach the network: everything is local.
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def default_model_dir() -> str | None:
    hits = sorted(glob.glob(os.path.expanduser("~/.cache/llmprune/gguf/SmolLM2-135M-Instruct.Q4_1-*")))
    hits = [h for h in hits if os.path.isfile(os.path.join(h, "model.safetensors"))]
    return hits[0] if hits else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_dir(),
                    help="folder with config.json, model.safetensors and tokenizer files")
    ap.add_argument("--tokens", required=True, help=".npy int array [nsamples, seqlen]")
    ap.add_argument("--out", required=True, help="keep-masks: .safetensors or .pt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pipeline", default="sequential")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true", help="lower llm-compressor's log level to WARNING")
    args = ap.parse_args()
    if not args.model or not os.path.isdir(args.model):
        ap.error(f"model folder not found: {args.model!r}")

    import numpy as np
    import torch
    from loguru import logger
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    if args.quiet:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)

    tokens = np.load(args.tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        ap.error(f"--tokens must be a 2-D integer array, got {tokens.dtype} {tokens.shape}")
    nsamples, seqlen = (int(d) for d in tokens.shape)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        ap.error(f"token ids must lie in [0, {vocab})")

    # Modules expected to be pruned: every Linear inside a decoder layer.
    expected = {n for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    lm_head = model.get_output_embeddings()
    lm_head_before = lm_head.weight.detach().clone()

    # Already-tokenized dataset: oneshot returns it unchanged when it has an input_ids column
    # (llmcompressor/datasets/utils.py:get_processed_dataset).
    ids = tokens.astype(np.int64).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seqlen for _ in range(nsamples)]})

    recipe = WandaPruningModifier(
        sparsity=args.sparsity,
        mask_structure="0:0",  # unstructured
        targets=[r"re:model\.layers\.\d+$"],  # decoder layers; their Linear submodules are pruned
        ignore=["re:.*lm_head"],
    )

    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=ds,
        pipeline=args.pipeline,
        batch_size=args.batch_size,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        output_dir=None,
    )
    prune_s = time.perf_counter() - t0

    masks: dict[str, torch.Tensor] = {}
    zeros = total = 0
    worst = 0.0
    for name, mod in model.named_modules():
        if name in expected:
            keep = (mod.weight.detach() != 0).cpu().contiguous()
            masks[name] = keep
            z = int((~keep).sum())
            zeros += z
            total += keep.numel()
            worst = max(worst, abs(z / keep.numel() - args.sparsity))
    if set(masks) != expected:
        raise SystemExit(f"missing masks for {sorted(expected - set(masks))[:5]}")
    if worst > 0.01:
        raise SystemExit(f"a pruned Linear is {worst:.4f} away from sparsity {args.sparsity}")
    if not torch.equal(model.get_output_embeddings().weight.detach(), lm_head_before):
        raise SystemExit("lm_head weights changed")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.out.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(masks, args.out, metadata={"tool": "llmcompressor", "version": llmcompressor.__version__})
    else:
        torch.save(masks, args.out)

    print(json.dumps({
        "tool": "llmcompressor",
        "version": llmcompressor.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prune_s": round(prune_s, 4),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "sparsity": round(zeros / total, 6),
        "n_pruned_linears": len(masks),
        "pipeline": args.pipeline,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
