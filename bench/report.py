"""results.json → report.md: each goal (issues 5 and 10) with its target, the measured ratio and whether
it was met, then the tables the ratios come from."""

from __future__ import annotations


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def under_load(r: dict) -> list[tuple[str, dict]]:
    """(model, served row with its /metrics figures and the in-process time at the same batch)."""
    rows = list(r["compute_bound"].items())
    rows += [(f"{m}, 2 workers", x) for m, x in r.get("compute_bound_2_workers", {}).items()]
    return rows + [(f"lenet5, {layout}", x["convserve"]) for layout, x in r["overhead_bound"].items()]


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
    for name, one in r["compute_bound"].items():
        layouts = {"1 worker": one, "2 workers": r.get("compute_bound_2_workers", {}).get(name)}
        layout, served = max(((k, v) for k, v in layouts.items() if v), key=lambda kv: kv[1]["rps"])
        best = r["throughput_inprocess"][name]["best_images_per_s"]
        ratio = served["rps"] / best
        others = "; ".join(f"{k}: {v['rps']:g}" for k, v in layouts.items() if v and k != layout)
        rows.append((f"compute-bound: {name} served img/s ÷ in-process best batch, best layout", "≥ 0.90",
                     f"{ratio:.2f} ({served['rps']:g} at {layout} ÷ {best:g}; {others}; inside the service "
                     f"the model ran at {served['compute_images_per_s']:g} img/s, busy "
                     f"{100 * served['compute_share']:.0f} % of the time, mean batch "
                     f"{served['mean_batch']:g})", ratio >= 0.9))
    for name, x in under_load(r):
        ratio = x["compute_ms_per_call"] / x["inprocess_ms_per_call"]
        rows.append((f"compute per call under load ÷ in-process at the same batch: {name}", "≤ 1.25",
                     f"{ratio:.2f} ({x['compute_ms_per_call']:g} vs {x['inprocess_ms_per_call']:g} ms at "
                     f"batch {max(1, round(x['mean_batch']))})", ratio <= 1.25))
    best = {server: max((rows[server] | {"layout": layout} for layout, rows in r["overhead_bound"].items()),
                        key=lambda x: x["rps"]) for server in ("convserve", "baseline")}
    conv, base = best["convserve"], best["baseline"]
    ratio = conv["rps"] / base["rps"]
    rows.append(("overhead-bound: LeNet req/s ÷ FastAPI baseline, each at its best worker count, 32 "
                 "connections", "≥ 1.5× at ≤ p99",
                 f"{ratio:.2f}× ({conv['rps']:g} at {conv['layout']} vs {base['rps']:g} at {base['layout']}; "
                 f"p99 {conv['p99_ms']:g} vs {base['p99_ms']:g} ms)",
                 ratio >= 1.5 and conv["p99_ms"] <= base["p99_ms"]))
    for layout, x in r["overhead_bound"].items():
        loop, thread = x["convserve"], x["convserve, engine thread"]
        rows.append((f"LeNet served req/s, window batches on the event loop ÷ on the inference thread, "
                     f"{layout} (information: the CPU default)", "—",
                     f"{loop['rps'] / thread['rps']:.2f} ({loop['rps']:g} vs {thread['rps']:g}; p99 "
                     f"{loop['p99_ms']:g} vs {thread['p99_ms']:g} ms)", True))
    engine = r["gil"]["lenet5"]["engine"]
    rows.append((f"engine under GIL pressure: LeNet batch {engine['batch']}, event loop busy in Python "
                 "(information)", "—",
                 f"{engine['busy_0.2ms']['call_ms']:g} ms per call (to_thread before the engine: "
                 f"{engine['to_thread_busy_5ms']['call_ms']:g}; engine at Python's 5 ms switch interval "
                 f"{engine['busy_5ms']['call_ms']:g}; loop idle {engine['idle_5ms']['call_ms']:g})", True))
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


def peer_goals(p: dict) -> list[tuple[str, str, str, bool]]:
    """convserve vs PyTriton (and /classify vs the FastAPI baseline) in the same rounds: req/s ratio ≥
    1.5× with a p99 no worse than the peer's."""
    names = {"v2 FP32": "/v2 req/s ÷ PyTriton's, FP32 tensor bodies",
             "v2 BYTES PNG": "/v2 req/s ÷ PyTriton's, BYTES PNG bodies",
             "classify": "/classify req/s ÷ FastAPI baseline's, 1 worker each, same rounds as PyTriton"}
    rows = []
    for key, x in p.get("ratios", {}).items():
        ours, theirs = x["p99_ms"]
        same = "identical bodies" if x["identical_bodies"] else "**bodies differ**"
        rows.append((names[key], "≥ 1.5× at ≤ p99", f"{x['rps_ratio']:.2f}× (p99 {ours:g} vs {theirs:g} ms; "
                     f"{same})", x["rps_ratio"] >= 1.5 and ours <= theirs))
    return rows


def grpc_table(rows: dict[str, dict]) -> list[str]:
    """One race's rows (bench/grpc_race.py summary()): req/s median and range, p50, p99, errors."""
    lines = ["", "| payload | side | req/s median (range) | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|"]
    for payload, sides in rows.items():
        for side, x in sides.items():
            if isinstance(x, dict):
                lines.append(f"| {payload} | {side} | {x['req_s']} ({x['req_s_min']}–{x['req_s_max']}) | "
                             f"{x['p50_ms']:g} | {x['p99_ms']:g} | {x['errors']} |")
    return lines


def grpc(r: dict) -> list[str]:
    """gRPC vs HTTP /v2 on one convserve, and convserve's gRPC vs PyTriton's (where raced)."""
    lines = ["\n## gRPC ModelInfer vs HTTP /v2, one convserve, identical tensors (grpc_race.py clients)\n"]
    for payload, sides in r.get("grpc_vs_http", {}).items():
        g, h = sides["gRPC"], sides["HTTP"]
        lines.append(f"- {payload}: gRPC ÷ HTTP req/s {g['req_s'] / h['req_s']:.2f}× (p99 {g['p99_ms']:g} vs "
                     f"{h['p99_ms']:g} ms)")
    lines += grpc_table(r.get("grpc_vs_http", {}))
    peer = r.get("pytriton", {}).get("grpc")
    if peer:
        ours, theirs = peer["convserve gRPC"], peer["PyTriton gRPC"]
        same = "identical requests" if peer["identical_requests"] else "**requests differ**"
        lines += [f"\nconvserve gRPC ÷ PyTriton gRPC, FP32: {ours['req_s'] / theirs['req_s']:.2f}× the req/s "
                  f"(p99 {ours['p99_ms']:g} vs {theirs['p99_ms']:g} ms; {same})"]
        lines += grpc_table({"FP32 [1,1,28,28]": peer})
    return lines


def engine_process(e: dict) -> list[str]:
    """CONVSERVE_ENGINE=process vs per-worker engines (bench/ipc.py): the goals, then the layouts."""
    h = e["handoff"]
    lines = ["\n## One engine process per device vs per-worker engines (bench/ipc.py)\n",
             "| goal | target | measured | met |", "|---|---|---|---|",
             "| hand-off per LeNet request, 32 in flight | ≤ 20 µs | "
             f"{h['ipc_us_per_request_32_in_flight']:g} µs wall, "
             f"{h['ipc_cpu_us_per_request_32_in_flight']:g} µs CPU (one at a time: "
             f"{h['ipc_us_per_request']:g} µs; per image at 8: {h['ipc_us_per_image_at_8']:g} µs) | "
             f"{_met(h['ipc_us_per_request_32_in_flight'] <= 20)} |"]
    for model, layouts in e["served"].items():
        process = layouts["process_2_workers"]["rps"]
        best = max(("local_1_worker", "local_2_workers"), key=lambda k: layouts[k]["rps"])
        top = layouts[best]["rps"]
        lines.append(f"| {model} served, one engine process at 2 workers ÷ the best per-worker layout | "
                     f"≥ 1.0 | {process / top:.2f} ({process:g} vs {top:g} at {best}) | "
                     f"{_met(process >= top)} |")
    lines += ["", "| model | layout | req/s (rounds) | p99 ms | mean batch | failures |",
              "|---|---|---|---|---|---|"]
    for model, layouts in e["served"].items():
        lines += [f"| {model} | {name} | {x['rps']:g} ({', '.join(f'{v:g}' for v in x['rounds_rps'])}) | "
                  f"{x['p99_ms']:g} | {x['mean_batch']:g} | {x['failures']} |" for name, x in layouts.items()]
    return lines


def peers(p: dict) -> list[str]:
    """The race's section: its goals and, per server, the median and range over rounds."""
    lines = ["\n## convserve /v2 vs PyTriton (Triton's HTTP front and dynamic batcher), same ONNX file\n"]
    if "skipped" in p:
        return [*lines, p["skipped"]]
    c, first = p["pytriton"], next(iter(p["rows"].values()))
    lines += [f"wrk, {first['connections']} connections, {first['rounds']} alternating rounds of "
              f"{first['seconds']} s. PyTriton 0.7.0: max_batch_size {c['max_batch_size']}, "
              f"max_queue_delay {c['max_queue_delay_us']} µs, onnxruntime threads "
              f"{c['onnxruntime_threads']}; convserve: 1 worker, onnxruntime threads "
              f"{c.get('convserve_threads') or 'cores ÷ workers (its default)'}.\n",
              "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {v} | {_met(ok)} |" for g, t, v, ok in peer_goals(p)]
    lines += ["", "| server, bodies | req/s median (range) | p50 ms median (range) | p99 ms median (range) | "
              "failures | bodies sha256 |", "|---|---|---|---|---|---|"]

    def spread(x: dict, key: str) -> str:
        low, high = x[f"{key}_range"]
        return f"{x[key]:g} ({low:g}-{high:g})"

    def server(name: str, x: dict) -> str:  # PyTriton's rows: its batcher's mean batch (its /metrics)
        return f"{name} (mean batch {x['mean_batch']:g})" if "mean_batch" in x else name

    lines += [f"| {server(name, x)} | {spread(x, 'rps')} | {spread(x, 'p50_ms')} | {spread(x, 'p99_ms')} | "
              f"{x['failures']} | "
              f"{', '.join(x['bodies_sha256'])} |" for name, x in p["rows"].items()]
    return lines


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Benchmark report\n",
             f"{m['cpus']} CPUs ({m['processor']}), {m['provider']}, onnxruntime {m['onnxruntime']}, "
             f"bentoml {m['bentoml']}, Python {m['python']}; {r['threads']} onnxruntime threads; "
             f"took {r['seconds']} s. AlexNet weights: {'trained' if r['alexnet_trained'] else 'random'}.\n",
             "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {v} | {_met(ok)} |" for g, t, v, ok in goals(r)]
    if "pytriton" in r:
        lines += peers(r["pytriton"])
    lines += grpc(r)
    if "engine_process" in r:
        lines += engine_process(r["engine_process"])
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
    lines += ["\n## Served, wrk on the same machine\n",
              "| scenario | server | connections | req/s | p50 | p90 | p99 ms | failures |",
              "|---|---|---|---|---|---|---|---|"]

    def row(scenario: str, server: str, x: dict) -> str:
        return (f"| {scenario} | {server} | {x['connections']} | {x['rps']:g} | {x['p50_ms']:g} | "
                f"{x['p90_ms']:g} | {x['p99_ms']:g} | {x['failures']} |")

    lines += [row(f"AlexNet 224 JPEG ({name})", "convserve", x) for name, x in r["compute_bound"].items()]
    lines += [row(f"AlexNet 224 JPEG ({name}), 2 workers", "convserve", x)
              for name, x in r.get("compute_bound_2_workers", {}).items()]
    lines += [row(f"LeNet PNG, {layout}, median of rounds {x['rounds_rps']}", name, x)
              for layout, rows in r["overhead_bound"].items() for name, x in rows.items()]
    lines += [row("LeNet PNG latency", name, x) for name, xs in r["latency"].items() for x in xs]
    lines += [row(f"LeNet PNG, {front}, median of rounds {x['rounds_rps']}", "convserve", x)
              for front, x in r.get("protocols", {}).items()]
    lines += ["\n## Inside the server under load (its /metrics) vs in-process\n",
              "| model | mean batch | compute ms/call | in-process ms/call, same batch | model busy |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {x['mean_batch']:g} | {x['compute_ms_per_call']:g} | "
              f"{x['inprocess_ms_per_call']:g} | {100 * x['compute_share']:.0f} % |"
              for name, x in under_load(r)]
    lines += ["\n## The engine under GIL pressure (in-process)\n",
              "Per call, ms. `engine`: `await engine.infer` from an asyncio loop that is idle or busy in "
              "Python (2 ms slices), the model on the engine's inference thread; `compute` is what /metrics "
              "reports. `callers`: `session.run` from each kind of caller (bench/gil.py): call / run ms.\n",
              "| model | batch | to_thread, busy, 5 ms | engine idle | engine busy, 5 ms "
              "| engine busy, 0.2 ms |",
              "|---|---|---|---|---|---|"]
    for name, g in r["gil"].items():
        e = g["engine"]
        lines.append(f"| {name} | {e['batch']} | {e['to_thread_busy_5ms']['call_ms']:g} | "
                     + " | ".join(f"{e[k]['call_ms']:g} (compute {e[k]['compute_ms']:g})"
                                  for k in ("idle_5ms", "busy_5ms", "busy_0.2ms")) + " |")
    callers = list(next(iter(r["gil"].values()))["callers"])
    lines += ["", "| model | " + " | ".join(callers) + " |", "|---" * (len(callers) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{g['callers'][c]['call_ms']:g} / {g['callers'][c]['run_ms']:g}"
                                           for c in callers) + " |" for name, g in r["gil"].items()]
    lines += ["\n## Batch shapes on this CPU: why `auto` buckets mean no padding here\n",
              "| model | fixed size µs/img | cycling sizes ÷ fixed | first call at a new smaller size, "
              "extra ms | padded to pow2 ÷ exact | padding n → pow2, extra % |", "|---|---|---|---|---|---|"]
    for name, g in r["gil"].items():
        c = g["shapes"]
        pads = ", ".join(f"{n}→{p['pow2']}: {p['extra_pct']:+.0f} %" for n, p in c["padding"].items())
        lines.append(f"| {name} | {c['fixed_us_per_image']:g} | {c['cycling_over_fixed']:g} | "
                     f"{c['new_size']['extra_ms']:g} | {c['pow2_padded_over_fixed']:g} | {pads} |")
    return "\n".join(lines) + "\n"
