#!/usr/bin/env python3
"""Decode tokens/s under `vllm serve` on this machine: FlashHead vs dense (FLASHHEAD_ENABLED=0).

    python scripts/bench_e2e.py MODEL_DIR [--batch 1 8] [--tokens 128] [--repeats 3]
                                [--compiled] [--json OUT.json] [--speculative-config JSON]
                                [--tensor-parallel-size N]

MODEL_DIR is a FlashHead model folder; the dense run serves the same folder with
FLASHHEAD_ENABLED=0 (same weights, same process layout). The servers run one after the other.

Decode rate: each measurement sends B concurrent greedy requests (ignore_eos) twice, with a
short and a long max_tokens; rate = B * (long - short) / (t_long - t_short), which cancels
prefill, HTTP and scheduling overhead. The median of --repeats is reported, with the load
average at the start and end so that a busy machine shows in the figures.

With --speculative-config (e.g. n-gram), both servers speculate, the prompts are ones whose
continuations repeat their input (code, a repeated passage), the draft acceptance rate comes
from each server's /metrics, and a third from a third server measures dense without speculation.

With --tensor-parallel-size N both servers run N workers, one core each
(VLLM_CPU_OMP_THREADS_BIND "0|1|..."), and the FlashHead server's rank lines are printed: each
rank's extra memory, and the bytes it sends per logits row against vLLM's gather of the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.server import VllmServer, common_prefix_lengths, run_concurrently  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works.",
    "List some fun things to do on a rainy day:",
    "def quicksort(xs):",
    "The history of the printing press",
    "Describe the water cycle.",
    "Once upon a time,",
]
# Continuations that repeat the input: n-gram drafts get accepted.
REPEATING_PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef add(a, b):\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The",
    "one, two, three, four, five, one, two, three, four, five, one, two,",
    "Roses are red, violets are blue.\nRoses are red, violets are blue.\nRoses are",
    "import os\nimport sys\nimport json\n\nimport os\nimport sys\n",
    "<li>apple</li>\n<li>banana</li>\n<li>cherry</li>\n<li>apple</li>\n<li>",
    "SELECT name FROM users WHERE id = 1;\nSELECT name FROM users WHERE id = 2;\nSELECT",
    "A B C D E F G A B C D E F G A B C",
]
SHORT = 16
AGREEMENT_TOKENS = 32


def timed_batch(server: VllmServer, batch: int, max_tokens: int) -> float:
    pool = server.bench_prompts
    prompts = [pool[i % len(pool)] for i in range(batch)]
    t0 = time.perf_counter()
    out = run_concurrently(
        [
            lambda p=p: server.complete(p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            for p in prompts
        ]
    )
    dt = time.perf_counter() - t0
    for r in out:
        n = len(r["choices"][0]["token_ids"])
        if n != max_tokens:
            raise RuntimeError(f"asked for {max_tokens} tokens, got {n}")
    return dt


def measure(server: VllmServer, batches: list[int], tokens: int, repeats: int) -> dict:
    timed_batch(server, max(batches), SHORT)  # warm-up
    res = {}
    for b in batches:
        rates = []
        for _ in range(repeats):
            t_short = timed_batch(server, b, SHORT)
            t_long = timed_batch(server, b, tokens)
            rates.append(b * (tokens - SHORT) / max(t_long - t_short, 1e-9))
        res[b] = {"decode_tok_s": statistics.median(rates), "all": rates}
    return res


def spec_counts(server: VllmServer) -> dict:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()

    def total(name: str) -> float:
        found = re.findall(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
        return sum(float(v) for v in found)

    return {
        "draft": total("spec_decode_num_draft_tokens_total"),
        "accepted": total("spec_decode_num_accepted_tokens_total"),
    }


def run_one(model: Path, label: str, env: dict, args, log_dir: Path, spec: str | None) -> dict:
    extra = ("--speculative-config", spec) if spec else ()
    tp = args.tensor_parallel_size
    if tp > 1:
        extra += ("--tensor-parallel-size", str(tp))
        env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp)), **env}
    server = VllmServer(model, log_dir / f"bench-{label}.log", env=env, args=extra)
    server.bench_prompts = REPEATING_PROMPTS if args.speculative_config else PROMPTS
    if args.compiled:
        server.args = [a for a in server.args if a != "--enforce-eager"]
    load0 = os.getloadavg()[0]
    server.start()
    try:
        server.wait_ready()
        res = measure(server, args.batch, args.tokens, args.repeats)
        counts = spec_counts(server) if spec else None
        greedy = server.greedy_ids(server.bench_prompts, AGREEMENT_TOKENS)
        log = server.log()
        if label == "flashhead" and "FlashHead: serving decode steps of" not in log:
            raise RuntimeError(f"FlashHead did not serve decode steps; see {server.log_path}")
        ranks = sorted(set(re.findall(r"FlashHead: (tensor parallel rank .*)", log)))
    finally:
        server.stop()
    return {
        "results": res,
        "spec": counts,
        "greedy": greedy,
        "ranks": ranks,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg()[0],
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    prefix = common_prefix_lengths(a, b)
    return {
        "first_token": sum(p > 0 for p in prefix) / len(prefix),
        "identical": sum(p == AGREEMENT_TOKENS for p in prefix) / len(prefix),
        "mean_common_prefix": sum(prefix) / len(prefix),
    }


def write_plot(summary: dict, path: Path, title: str) -> str:
    """Tokens/s against batch size, FlashHead and dense (and dense without speculation), as a
    PNG at ``path``; returns what was done (matplotlib is optional: without it, a note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib), not {path}"
    batches = sorted(int(b) for b in summary)
    series = [("flashhead", "FlashHead"), ("dense", "dense"), ("dense_no_spec", "dense, no spec")]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for key, label in series:
        if all(key in summary[b] for b in summary):
            values = [summary[b if b in summary else str(b)][key] for b in batches]
            ax.plot(batches, values, marker="o", label=label)
    ax.set_xlabel("concurrent requests (batch)")
    ax.set_ylabel("decode tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot written: {path}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compiled", action="store_true", help="torch.compile (default: eager)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="also write tokens/s vs batch as a PNG (matplotlib)")
    ap.add_argument(
        "--plot-from",
        type=Path,
        metavar="JSON",
        help="only draw --plot from an earlier --json result (no servers)",
    )
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="vLLM's --tensor-parallel-size for both servers (one core per worker)",
    )
    ap.add_argument(
        "--speculative-config",
        help="vLLM's --speculative-config JSON for both servers (plus a dense run without it)",
    )
    args = ap.parse_args()
    if args.plot_from:
        if not args.plot:
            ap.error("--plot-from needs --plot OUT.png")
        saved = json.loads(args.plot_from.read_text())
        print(write_plot(saved["summary"], args.plot, _title(saved["model"], saved.get("args"))))
        return 0
    if args.model is None:
        ap.error("MODEL_DIR is required (a FlashHead model folder)")
    cfg_file = args.model / "config.json"
    if not cfg_file.exists():
        ap.error(
            f"{cfg_file}: not found (pass a FlashHead model folder, e.g. from `flashhead convert`)"
        )
    if "flash_head_cache_dir" not in json.loads(cfg_file.read_text()):
        ap.error(
            f"{cfg_file}: no flash_head_cache_dir (not a FlashHead model; run `flashhead convert`)"
        )
    if args.tensor_parallel_size < 1:
        ap.error("--tensor-parallel-size must be >= 1")
    if args.tokens <= SHORT:
        ap.error(f"--tokens must be > {SHORT}")

    spec = args.speculative_config
    if spec:
        try:
            json.loads(spec)
        except ValueError as exc:
            ap.error(f"--speculative-config: not JSON ({exc})")
    dense_env = {"FLASHHEAD_ENABLED": "0"}
    runs = {
        "flashhead": run_one(args.model, "flashhead", {}, args, args.log_dir, spec),
        "dense": run_one(args.model, "dense", dense_env, args, args.log_dir, spec),
    }
    if spec:
        runs["dense-no-spec"] = run_one(args.model, "dense-no-spec", dense_env, args,
                                        args.log_dir, None)  # fmt: skip
    print(
        f"\nmodel {args.model} ({'compiled' if args.compiled else 'eager'}), "
        f"decode tokens/s (median of {args.repeats})"
    )
    if spec:
        print(f"speculative config {spec} on both (dense-no-spec: without it)")
    if args.tensor_parallel_size > 1:
        print(f"tensor parallel size {args.tensor_parallel_size} on both")
        for line in runs["flashhead"]["ranks"]:
            print(f"  {line.strip()}")
    head = f"{'batch':>5} {'flashhead':>10} {'dense':>10} {'ratio':>7}"
    print(head + (f" {'dense-no-spec':>14} {'fh/no-spec':>10}" if spec else ""))
    summary = {}
    for b in args.batch:
        fh = runs["flashhead"]["results"][b]["decode_tok_s"]
        dn = runs["dense"]["results"][b]["decode_tok_s"]
        summary[b] = {"flashhead": fh, "dense": dn, "ratio": fh / dn}
        line = f"{b:>5} {fh:>10.1f} {dn:>10.1f} {fh / dn:>6.2f}x"
        if spec:
            ns = runs["dense-no-spec"]["results"][b]["decode_tok_s"]
            summary[b].update(dense_no_spec=ns, ratio_vs_no_spec=fh / ns)
            line += f" {ns:>14.1f} {fh / ns:>9.2f}x"
        print(line)
    for label, r in runs.items():
        if r["spec"] and r["spec"]["draft"]:
            rate = r["spec"]["accepted"] / r["spec"]["draft"]
            print(f"draft acceptance, {label}: {rate:.1%} of {r['spec']['draft']:.0f} drafts")
    agree = agreement(runs["flashhead"]["greedy"], runs["dense"]["greedy"])
    print(
        f"greedy agreement with dense over {len(runs['dense']['greedy'])} prompts x "
        f"{AGREEMENT_TOKENS} tokens: "
        f"first token {agree['first_token']:.0%}, identical {agree['identical']:.0%}, "
        f"mean common prefix {agree['mean_common_prefix']:.1f}"
    )
    for label, r in runs.items():
        print(f"load average during {label}: {r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f}")
    settings = {
        "compiled": args.compiled,
        "tokens": args.tokens,
        "speculative_config": spec,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "args": settings,
                    "summary": summary,
                    "agreement": agree,
                    "runs": runs,
                },
                indent=2,
            )
        )
    if args.plot:
        print(write_plot(summary, args.plot, _title(str(args.model), settings)))
    return 0


def _title(model: str, settings: dict | None) -> str:
    settings = settings or {}
    mode = "compiled" if settings.get("compiled") else "eager"
    spec = ", n-gram speculation" if settings.get("speculative_config") else ""
    tp = settings.get("tensor_parallel_size") or 1
    layout = f", TP={tp}" if tp > 1 else ""
    return f"{Path(model).name}: vllm serve on this CPU ({mode}{spec}{layout})"


if __name__ == "__main__":
    sys.exit(main())
