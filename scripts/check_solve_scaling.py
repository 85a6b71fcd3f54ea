"""regmean's solve at the layer shapes of 7B and 70B models on this machine, against
mergekit's ``dare_ties`` on the same layer in the same run.

    python scripts/check_solve_scaling.py [--threads 2] [--models 2] [--ranks 512 1024]
        [--shapes 7b 70b] [--out bench-out/solve-scaling.json]

One decoder layer of Llama-2-7B (hidden 4096, MLP 11008) and of Llama-3-70B (8192, 28672,
grouped k/v of 1024 rows): q, k, v, o, gate, up and down, a bfloat16 base and ``--models``
fine-tunes (base plus small noise), and for each model and layer input a Gram matrix
G = F F^T + diag(d) of rank r (what ``lrp-compute --gram-form factored`` stores). Timed,
one after another, alone (one process, ``--threads`` threads):

* ``dare_ties``: mergekit's own ``merge_group`` for the seven weights (density 0.5), once
  before and once after the solves (the ratio's baseline is their mean);
* the dense solve (``gram_solve.solve``, float64, what ``regmean`` runs from dense Gram
  files; 7B only: at 70B it is extrapolated from its operation count at the 7B rate);
* the low-rank solve (``low_rank_solve.solve_low_rank``, what ``regmean`` runs from
  factored files whose ranks sum to at most half the width) at each rank of ``--ranks``;
  where the ranks sum to more, regmean takes the dense solve and the row says so;
* ``lrp-compute``'s factorization of one model's Gram matrix (``gram_forms.factor_gram``,
  float64): the whole spectrum at the 7B widths (the 70B widths extrapolated by n^3), and
  under ``--gram-max-rank`` (``--leading-rank``) the leading eigenpairs alone, measured
  at ``--leading`` widths up to 70B's.

Prints a table per shape and a whole-model estimate (layer times x layers; the other
tensors are averaged by every method and cost the same); ``--out`` keeps the raw rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import mergekit.merge_methods
import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_lrp.merging.gram_solve import forget_factors, solve
from mergekit_lrp.merging.low_rank_solve import solve_low_rank, uses_low_rank
from mergekit_lrp.merging.methods.regmean import DEFAULTS
from mergekit_lrp.scores.gram_forms import Factored, factor_gram


@dataclass(frozen=True)
class Shape:
    label: str
    hidden: int
    intermediate: int
    kv: int  # rows of k_proj and v_proj
    layers: int

    def weights(self) -> dict[str, tuple[int, int, str]]:
        """weight -> (rows, features, the layer input it reads)."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, h, "attention"), "k_proj": (self.kv, h, "attention"),
            "v_proj": (self.kv, h, "attention"), "o_proj": (h, h, "o_proj"),
            "gate_proj": (i, h, "mlp"), "up_proj": (i, h, "mlp"), "down_proj": (h, i, "down_proj"),
        }  # fmt: skip


SHAPES = {
    "7b": Shape("Llama-2-7B", 4096, 11008, 4096, 32),
    "70b": Shape("Llama-3-70B", 8192, 28672, 1024, 80),
    "tiny": Shape("tiny (checks the script in seconds)", 256, 688, 256, 2),
}


def inputs(shape: Shape) -> dict[str, int]:
    return {source: n for _, n, source in shape.weights().values()}


def models(shape: Shape, count: int, seed: int) -> dict[str, list[torch.Tensor]]:
    """weight -> [base, fine-tune 1, ...] in bfloat16."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, features, _) in shape.weights().items():
        base = torch.randn(rows, features, generator=g) * 0.02
        tuned = [base + 1e-3 * torch.randn(rows, features, generator=g) for _ in range(count)]
        out[name] = [t.to(torch.bfloat16) for t in (base, *tuned)]
    return out


def gram_forms(n: int, rank: int, count: int, seed: int) -> list[Factored]:
    """One factored Gram matrix of rank ``rank`` per model, with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, rank)
    return [
        Factored(torch.randn(n, rank, generator=g) * scale, 0.01 * torch.rand(n, generator=g), 0.0)
        for _ in range(count)
    ]


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def dare_ties_layer(layer: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    method = mergekit.merge_methods.get("dare_ties")
    out = {}
    for name, tensors in layer.items():
        ids = list(range(1, len(tensors)))
        parameters = {
            "weight": {i: 1.0 for i in ids}, "density": {i: 0.5 for i in ids},
            "rescale": True, "normalize": True, "lambda": 1.0, "int8_mask": False,
        }  # fmt: skip
        torch.manual_seed(0)
        group = TensorGroup.from_tensors(tensors, base_index=0)
        out[name] = method.merge_group(group, **parameters)
    return out


def gram_readers(forms: dict[str, list[Factored]], low_rank: bool) -> dict[str, list]:
    """Per layer input, what regmean reads of each model: the factored form, or the dense
    matrix (built here, outside the timing, as a dense Gram file holds it)."""
    if low_rank:
        return {source: [lambda f=f: f for f in per_model] for source, per_model in forms.items()}
    dense = {source: [f.dense() for f in per_model] for source, per_model in forms.items()}
    return {source: [lambda m=m: m for m in matrices] for source, matrices in dense.items()}


def regmean_layer(shape, layer, readers) -> dict[str, torch.Tensor]:
    """regmean's solve of every weight of the layer, each layer input factored once and
    reused by the weights reading it (as in a merge)."""
    low_rank = isinstance(next(iter(readers.values()))[0](), Factored)
    sharing = {}
    for name, (_, _, source) in shape.weights().items():
        sharing.setdefault(source, set()).add(name)
    out = {}
    for name, (_, _, source) in shape.weights().items():
        base, *thetas = layer[name]
        out[name] = (solve_low_rank if low_rank else solve)(
            base, thetas, readers[source], [1.0] * len(thetas), DEFAULTS.alpha, DEFAULTS.ridge,
            torch.float64, where=name, key=source, name=name, users=frozenset(sharing[source]),
        )  # fmt: skip
    forget_factors()
    return out


def dense_flops(shape: Shape, count: int) -> float:
    """The dense solve's multiply-adds x 2: n^3 / 3 per input, per weight 2 out n^2 per
    model for the numerator and 2 out n^2 for the triangular solves."""
    total = sum(n**3 / 3 for n in inputs(shape).values())
    for rows, n, _ in shape.weights().values():
        total += 2 * rows * n**2 * (count + 1)
    return total


def factoring_seconds(n: int, max_rank: int | None, seed: int) -> float:
    """Seconds to factor one Gram matrix of width n (4,096 tokens' inputs) as lrp-compute
    does: the whole spectrum, or under a rank cap the leading eigenpairs alone."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, min(n, 4096), generator=g)
    gram = (x @ x.T) / x.shape[1]
    del x
    return timed(lambda: factor_gram(gram, 1e-3, max_rank))


def measure(shape: Shape, count: int, ranks: list[int], seed: int) -> dict:
    layer = models(shape, count, seed)
    rows = []
    baseline = [timed(lambda: dare_ties_layer(layer))]
    exact = None
    if shape.hidden <= 4096:
        forms = {s: gram_forms(n, ranks[0], count, seed + 1) for s, n in inputs(shape).items()}
        readers = gram_readers(forms, low_rank=False)
        seconds = timed(lambda: rows.append(regmean_layer(shape, layer, readers)))
        exact = rows.pop()
        del readers
        dense = {"solve": "dense (float64 Cholesky)", "seconds": seconds, "measured": True}
    low = []
    for rank in ranks:
        forms = {s: gram_forms(n, rank, count, seed + 1) for s, n in inputs(shape).items()}
        chosen = all(uses_low_rank([{"rank": rank}] * count, n) for n in inputs(shape).values())
        if not chosen:
            note = f"{count} x {rank} exceeds half a width: regmean solves dense"
            low.append({"solve": "low-rank", "rank": rank, "seconds": None, "note": note})
            continue
        readers = gram_readers(forms, low_rank=True)
        started = time.perf_counter()
        result = regmean_layer(shape, layer, readers)
        seconds = time.perf_counter() - started
        row = {"solve": "low-rank (Woodbury)", "rank": rank, "seconds": seconds, "measured": True}
        if exact is not None and rank == ranks[0]:
            row["largest difference from dense"] = max(
                float((result[k].float() - exact[k].float()).abs().max()) for k in result
            )
        low.append(row)
    baseline.append(timed(lambda: dare_ties_layer(layer)))
    reference = statistics.mean(baseline)
    if exact is None:
        rate = None
        dense = {"solve": "dense (float64 Cholesky)", "measured": False,
                 "flops": dense_flops(shape, count)}  # fmt: skip
    else:
        rate = dense_flops(shape, count) / dense["seconds"]
        dense["flops"], dense["gflops_per_s"] = dense_flops(shape, count), rate / 1e9
    return {"shape": shape.label, "models": count, "dare_ties": baseline,
            "dense": dense, "low_rank": low, "reference": reference}  # fmt: skip


def report(results: list[dict], eighs: dict[int, float], leading: dict[int, float], args):
    measured = [r["dense"]["gflops_per_s"] for r in results if r["dense"]["measured"]]
    print(f"threads {args.threads}, {args.models} fine-tunes, torch {torch.__version__}")
    for result in results:
        shape = next(s for s in SHAPES.values() if s.label == result["shape"])
        ref = result["reference"]
        baseline = ", ".join(f"{s:.1f}" for s in result["dare_ties"])
        print(f"\n{shape.label}, one layer: dare_ties {baseline} s (before, after)")
        print("| solve | rank per model | seconds | x dare_ties | whole model (x layers) |")
        print("|---|---|---|---|---|")
        dense = result["dense"]
        if dense["measured"]:
            seconds, how = dense["seconds"], ""
        elif measured:
            seconds = dense["flops"] / (measured[0] * 1e9)
            how = f" (extrapolated: {dense['flops'] / 1e12:.0f} TFLOP at {measured[0]:.0f} GFLOP/s)"
            dense["seconds_extrapolated"] = seconds
        else:
            seconds = None
        if seconds is not None:
            whole = seconds * shape.layers / 60
            print(f"| dense{how} | any | {seconds:.1f} | {seconds / ref:.1f} | {whole:.0f} min |")
        for row in result["low_rank"]:
            if row["seconds"] is None:
                print(f"| low-rank | {row['rank']} | | | {row['note']} |")
                continue
            whole = row["seconds"] * shape.layers / 60
            difference = row.get("largest difference from dense")
            extra = "" if difference is None else (
                f"; largest difference from dense (bfloat16 weights) {difference:.1e}")
            print(f"| low-rank | {row['rank']} | {row['seconds']:.1f} | "
                  f"{row['seconds'] / ref:.2f} | {whole:.1f} min{extra} |")  # fmt: skip
    print("\nfactoring one Gram matrix in float64 (lrp-compute --gram-form factored)")
    print("| width | whole spectrum, seconds | leading eigenpairs (--gram-max-rank "
          f"{args.leading_rank}), seconds | ratio |")  # fmt: skip
    print("|---|---|---|---|")
    n0 = max(eighs) if eighs else None
    for n in sorted(set(eighs) | set(leading) | ({8192, 28672} if n0 else set())):
        whole = eighs.get(n)
        label = f"{whole:.1f}" if whole is not None else ""
        if whole is None and n0:
            whole = eighs[n0] * (n / n0) ** 3
            label = f"{whole:.0f} (extrapolated from {n0} by n^3)"
        part = leading.get(n)
        ratio = f"{whole / part:.0f}x faster" if part and whole else ""
        print(f"| {n} | {label} | {'' if part is None else f'{part:.1f}'} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=["7b", "70b"])
    parser.add_argument("--eigh", type=int, nargs="*", default=[4096, 11008],
                        help="widths whose factorization is measured")  # fmt: skip
    parser.add_argument("--leading", type=int, nargs="*", default=[11008, 28672],
                        help="widths factored under --gram-max-rank --leading-rank")  # fmt: skip
    parser.add_argument("--leading-rank", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("bench-out/solve-scaling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(SHAPES[s], args.models, args.ranks, 0) for s in args.shapes]
    eighs = {n: factoring_seconds(n, None, 3) for n in args.eigh}
    leading = {n: factoring_seconds(n, args.leading_rank, 3) for n in args.leading}
    report(results, eighs, leading, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"results": results, "eigh": eighs, "leading": leading}, indent=1)
    )


if __name__ == "__main__":
    main()
