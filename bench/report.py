"""results.json → report.md: each goal of issue 5 with its target, the measured ratio and whether it
was met, then the tables the ratios come from."""

from __future__ import annotations


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def goals(r: dict) -> list[tuple[str, str, str, bool]]:
    """(goal, target, measured, met) rows."""
    rows = []
    for d, target in zip(r["dense_inprocess"], (5, 7), strict=True):
        need = max(target, d["flop_ratio"])
        rows.append((f"dense vs windows in-process, {d['model']} {d['image'][0]}²",
                     f"≥ {need:g}× (FLOP ratio {d['flop_ratio']:g}×)", f"{d['speedup']:g}×",
                     d["speedup"] >= need))
    for d, inproc in zip(r["dense_http"], r["dense_inprocess"], strict=True):
        if d["model"] == "alexnet":  # compute-bound: HTTP can only add cost to the in-process ratio
            rows.append((f"dense vs windows via HTTP, {d['model']} {d['image'][0]}² (information)",
                         f"none (in-process: {inproc['speedup']:g}×)", f"{d['speedup']:g}×", True))
            continue
        rows.append((f"dense vs windows via HTTP, {d['model']} {d['image'][0]}²", "≥ 30×",
                     f"{d['speedup']:g}×", d["speedup"] >= 30))
    for name, served in r["compute_bound"].items():
        best = r["throughput_inprocess"][name]["best_images_per_s"]
        ratio = served["rps"] / best
        rows.append((f"compute-bound: {name} served img/s ÷ in-process best batch", "≥ 0.90",
                     f"{ratio:.2f} ({served['rps']:g} ÷ {best:g}; inside the service the model ran at "
                     f"{served['compute_images_per_s']:g} img/s, busy {100 * served['compute_share']:.0f} % "
                     f"of the time, mean batch {served['mean_batch']:g})", ratio >= 0.9))
    conv, base = r["overhead_bound"]["convserve"], r["overhead_bound"]["baseline"]
    ratio = conv["rps"] / base["rps"]
    rows.append(("overhead-bound: LeNet req/s ÷ FastAPI baseline, 32 users", "≥ 1.5× at ≤ p99",
                 f"{ratio:.2f}× (p99 {conv['p99_ms']:g} vs {base['p99_ms']:g} ms)",
                 ratio >= 1.5 and conv["p99_ms"] <= base["p99_ms"]))
    tp = r["throughput_inprocess"]
    speed = tp["alexnet-int8"]["best_images_per_s"] / tp["alexnet"]["best_images_per_s"]
    rows.append(("int8 AlexNet img/s ÷ fp32 (in-process, best batch)", "≥ 3×", f"{speed:.2f}×", speed >= 3))
    served_speed = r["compute_bound"]["alexnet-int8"]["rps"] / r["compute_bound"]["alexnet"]["rps"]
    rows.append(("int8 AlexNet img/s ÷ fp32 (served)", "≥ 3×", f"{served_speed:.2f}×", served_speed >= 3))
    agree = r["int8_agreement"]["alexnet"]
    trained = "" if r["alexnet_trained"] else " (random weights)"
    rows.append((f"int8 AlexNet top-1 agreement with fp32{trained}", "≥ 0.99",
                 f"{agree['top1_agreement']:.3f} on {agree['images']} photo crops",
                 agree["top1_agreement"] >= 0.99))
    lenet = r["int8_agreement"]["lenet5"]
    drop = 100 * (lenet["fp32_accuracy"] - lenet["int8_accuracy"])
    rows.append(("int8 LeNet accuracy drop (1,000 held-out digits)", "≤ 0.3 pt",
                 f"{drop:.1f} pt ({100 * lenet['fp32_accuracy']:.1f} → {100 * lenet['int8_accuracy']:.1f} %)",
                 drop <= 0.3))
    return rows


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Benchmark report\n",
             f"{m['cpus']} CPUs ({m['processor']}), {m['provider']}, onnxruntime {m['onnxruntime']}, "
             f"bentoml {m['bentoml']}, Python {m['python']}; {r['threads']} onnxruntime threads; "
             f"took {r['seconds']} s. AlexNet weights: {'trained' if r['alexnet_trained'] else 'random'}.\n",
             "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {v} | {_met(ok)} |" for g, t, v, ok in goals(r)]
    lines += ["\n## Dense one pass vs every window as a crop\n",
              "| where | model | image | windows | one pass ms | every window ms | speed-up | FLOP ratio |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| in-process | {d['model']} | {d['image'][0]}×{d['image'][1]} | {d['windows']} | "
              f"{d['one_pass_ms']} | {d['windows_ms']} | {d['speedup']}× | {d['flop_ratio']}× |"
              for d in r["dense_inprocess"]]
    lines += [f"| HTTP | {d['model']} | {d['image'][0]}×{d['image'][1]} | {d['windows']} | "
              f"{d['score_map_ms']} | {d['classify_all_windows_ms']} | {d['speedup']}× | |"
              for d in r["dense_http"]]
    lines += ["\n## In-process images/s by batch size\n"]
    batches = list(next(iter(r["throughput_inprocess"].values()))["images_per_s"])
    lines += ["| model | " + " | ".join(f"batch {b}" for b in batches) + " | best |",
              "|---" * (len(batches) + 2) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v:g}" for v in t["images_per_s"].values()) +
              f" | {t['best_images_per_s']:g} (batch {t['best_batch']}) |"
              for name, t in r["throughput_inprocess"].items()]
    lines += ["\n## Served, locust on the same machine\n",
              "| scenario | server | users | req/s | p50 | p90 | p95 | p99 ms | failures |",
              "|---|---|---|---|---|---|---|---|---|"]

    def row(scenario: str, server: str, x: dict) -> str:
        return (f"| {scenario} | {server} | {x['users']} | {x['rps']:g} | {x['p50_ms']:g} | "
                f"{x['p90_ms']:g} | {x['p95_ms']:g} | {x['p99_ms']:g} | {x['failures']} |")

    lines += [row(f"AlexNet 224 JPEG ({name})", "convserve", x) for name, x in r["compute_bound"].items()]
    lines += [row("LeNet PNG, median of rounds " + str(x["rounds_rps"]), name, x)
              for name, x in r["overhead_bound"].items()]
    lines += [row("LeNet PNG latency", name, x) for name, xs in r["latency"].items() for x in xs]
    return "\n".join(lines) + "\n"
