"""Compare mergekit-lrp's AttnLRP relevance with lxt's own implementation, on one checkpoint.

    python scripts/compare_lxt.py --lxt-source DIR [--model DIR] [--prompt TEXT]

DIR is a checkout of lxt's repository (its main branch patches Llama, Qwen2/3 and Gemma3
for transformers 5; the PyPI release does not import there); lxt's package imports zennit,
so give its folder too with --extra-path when it is not installed. lxt runs in a
subprocess (its ``monkey_patch`` changes transformers' classes for the whole process), our
rules in this one; both load the same checkpoint with ``from_pretrained``, embed the same
prompt, seed the backward pass from the top logit at the last position and read out
gradient x input. Without --model a tiny random Llama is built (seeded). Prints the target,
each side's input relevance sum (conservation = sum / target), and the largest difference
of the per-token input relevance and of every parameter's relevance, relative to the
largest magnitude on lxt's side, for our rules and, as the control that shows the
comparison can see a difference, for plain gradient x input without rules.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def relevance(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Target, per-token input relevance and per-parameter relevance (p * grad)."""
    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(ids[None]).detach().requires_grad_()
    logits = model(inputs_embeds=embeddings, use_cache=False).logits
    target = logits[0, -1].max()
    target.backward()
    found = {
        "target": target.detach().reshape(1),
        "input": (embeddings * embeddings.grad).sum(-1)[0].detach(),
    }
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            found[f"param.{name}"] = (parameter * parameter.grad).detach()
    return found


def lxt_side(model_dir: str, ids: list[int], out: str) -> None:
    """Run in the subprocess: lxt's monkey_patch, then :func:`relevance`."""
    import importlib

    import transformers
    from lxt.efficient import monkey_patch

    config = transformers.AutoConfig.from_pretrained(model_dir)
    kind = config.model_type
    monkey_patch(importlib.import_module(f"transformers.models.{kind}.modeling_{kind}"))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    save_file(relevance(model.eval(), torch.tensor(ids)), out)


def our_side(model_dir: str, ids: list[int]) -> tuple[dict, dict]:
    """Our rules' relevance, and plain gradient x input (no rules) as the control."""
    import transformers

    from mergekit_lrp.scoring.attnlrp import attnlrp_rules

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    plain = relevance(model.eval(), torch.tensor(ids))
    with attnlrp_rules(model):
        return relevance(model, torch.tensor(ids)), plain


def tiny_llama(folder: Path) -> Path:
    """A seeded random 2-layer Llama with GQA, saved with ``save_pretrained``."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lxt-source", required=True, help="a checkout of lxt's repository")
    parser.add_argument("--extra-path", action="append", default=[], help="more PYTHONPATH")
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random Llama)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--lxt-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lxt_child:
        model_dir, ids, out = args.lxt_child
        lxt_side(model_dir, json.loads(ids), out)
        return

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model or str(tiny_llama(Path(work) / "tiny-llama"))
        if args.model:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(model_dir)(args.prompt)["input_ids"]
        else:
            ids = list(torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(1)))
            ids = [int(i) for i in ids]
        out = Path(work) / "lxt.safetensors"
        env = dict(os.environ)
        # lxt's package, then ours (for this script's own imports), never this checkout's
        # src first: the subprocess must not see mergekit-lrp's rules
        env["PYTHONPATH"] = os.pathsep.join([args.lxt_source, *args.extra_path])
        env["MERGEKIT_LRP_DISABLE"] = "1"
        subprocess.run(
            [sys.executable, __file__, "--lxt-source", args.lxt_source,
             "--lxt-child", model_dir, json.dumps(ids), str(out)],
            check=True, env=env,
        )  # fmt: skip
        theirs = load_file(out)
        ours, plain = our_side(model_dir, ids)

    target = float(theirs["target"])
    print(f"checkpoint: {args.model or 'tiny random Llama (2 layers, hidden 64, GQA 4/2)'}")
    print(f"tokens: {len(ids)}; target logit: lxt {target:.6f}, ours {float(ours['target']):.6f}")
    for side, found in (("lxt", theirs), ("ours", ours), ("plain gradient x input", plain)):
        total = float(found["input"].sum())
        print(f"{side}: input relevance sum {total:.6f}, conservation {total / target:.4f}")
    assert theirs.keys() == ours.keys(), sorted(theirs.keys() ^ ours.keys())

    for label, found in (("ours", ours), ("plain gradient x input (control)", plain)):

        def relative(name: str, found=found) -> float:
            scale = theirs[name].abs().max().clamp_min(1e-30)
            return float((found[name] - theirs[name]).abs().max() / scale)

        params = sorted(n for n in theirs if n.startswith("param."))
        worst = max(params, key=relative)
        print(
            f"{label} against lxt: per-token input relevance differs by at most "
            f"{relative('input'):.2e}, per-parameter relevance ({len(params)} tensors) by at "
            f"most {relative(worst):.2e} ({worst.removeprefix('param.')}), relative to lxt's "
            "largest magnitude"
        )


if __name__ == "__main__":
    main()
