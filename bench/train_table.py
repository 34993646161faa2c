"""The table of bench/train_gpu.py: each row's outside and in-process figures, and the
ratios and MFU by each."""

from __future__ import annotations

AGREE = (0.8, 1.25)  # wall/own outside this: the processes' start-up spread swamped the span


def settled(r: dict) -> bool:
    return r["own"] > 0 and AGREE[0] <= r["tokens_per_second"] / r["own"] <= AGREE[1]


def table(results: list[dict], ceiling: dict, not_run: dict[str, str]) -> str:
    """Both figures per row, and the ratios and MFU by each. `wall` is the outside
    figure; where it disagrees with `own` beyond AGREE (or is negative), the two processes
    were too few seconds apart for their start-up spread, and the row says `unsettled`."""
    head = (
        f"{'row':<10} {'impl':<13} {'wall tok/s':>10} {'own tok/s':>9} {'wall/own':>9} "
        f"{'MFU wall':>8} {'MFU own':>7} {'x peer wall':>11} {'x peer own':>10} "
        f"{'peak GiB':>8} {'loss@1':>8} {'loss@k':>8} {'k':>3} {'steps: wall s':>19}"
    )
    lines = [head, "-" * len(head)]
    for name in dict.fromkeys(r["row"] for r in results):
        rows = [r for r in results if r["row"] == name]
        peers = [r for r in rows if not r["impl"].startswith("llmft") and not r.get("error")]
        # the loss after the same step for every tool: the last step they all ran
        k = min((len(r["losses"]) for r in rows if not r.get("error")), default=0)
        best = {  # the fastest peer by each figure; by `wall` only where it settled
            "own": max((r["own"] for r in peers if r["own"] > 0), default=None),
            "tokens_per_second": max(
                (r["tokens_per_second"] for r in peers if settled(r)), default=None
            ),
        }
        for r in rows:
            if r.get("error"):
                lines.append(f"{name:<10} {r['impl']:<13} {r['error'][:110]}")
                continue
            wall, own = r["tokens_per_second"], r["own"]

            def mfu(tps: float, r: dict = r) -> str:
                return f"{100 * tps * r['c'] * r['N'] / (ceiling['matmul_tflops'] * 1e12):.1f}%"

            def ratio(tps: float, k: str, best: dict = best) -> str:
                return f"{tps / best[k]:.2f}x" if best[k] and tps > 0 else "-"

            losses = r["losses"]
            walls = f"{r['short']}/{r['long']}: {r['wall_short']:.1f}/{r['wall_long']:.1f}"
            lines.append(
                f"{name:<10} {r['impl']:<13} {wall:>10.0f} {own:>9.0f} "
                f"{(f'{wall / own:.2f}' if settled(r) else 'unsettled'):>9} "
                f"{mfu(wall) if wall > 0 else '-':>8} {mfu(own):>7} "
                f"{ratio(wall, 'tokens_per_second') if settled(r) else '-':>11} {ratio(own, 'own'):>10} "
                f"{r['peak_gib']:>8.2f} {losses[0]:>8.4f} {losses[k - 1]:>8.4f} {k:>3} {walls:>19}"
            )
    lines.append("")
    lines += [f"{'(all rows)':<10} {k:<9} {v}" for k, v in not_run.items()]
    return "\n".join(lines)
