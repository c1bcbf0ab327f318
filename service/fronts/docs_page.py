"""GET /: a plain HTML reference of the API, rendered once from the completed OpenAPI document.

BentoML's page at / is Swagger UI, which loads Google Tag Manager from the internet: it failed (or
phoned home) on an offline or locked-down host. This page is one HTML document with no script and no
URL outside this server: the routes, what each takes and answers, and links to /ui (the demo),
/docs.json (the full document, for Swagger UI or any client generator) and the probes.
"""

from __future__ import annotations

from html import escape

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}
th,td{text-align:left;vertical-align:top;border-bottom:1px solid #ddd;padding:.35rem .5rem}
.method{font-weight:600;text-transform:uppercase}
.status{color:#555;font-size:.9em}
"""


def _fields(operation: dict) -> str:
    """The body's fields, from its first media type's schema."""
    content = operation.get("requestBody", {}).get("content", {})
    for media_type, item in content.items():
        properties = item.get("schema", {}).get("properties", {})
        names = ", ".join(f"<code>{escape(name)}</code>" for name in properties)
        return f"{escape(media_type)}{': ' + names if names else ''}"
    return ""


def render(document: dict) -> bytes:
    info = document.get("info", {})
    rows = []
    for path, item in sorted(document.get("paths", {}).items()):
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            summary = operation.get("summary") or operation.get("description", "").split("\n")[0]
            statuses = ", ".join(sorted(operation["responses"]))
            rows.append(f"<tr><td class=method>{escape(method)}</td><td><code>{escape(path)}</code></td>"
                        f"<td>{escape(summary)}</td><td>{_fields(operation)}</td>"
                        f"<td class=status>{escape(statuses)}</td></tr>")
    page = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width,initial-scale=1">
<title>{escape(info.get("title", "convserve"))} API</title><style>{STYLE}</style></head>
<body>
<h1>{escape(info.get("title", "convserve"))} <small>{escape(str(info.get("version", "")))}</small></h1>
<p>Try it in the browser: <a href="ui">the demo page</a>. The full OpenAPI document, with every
schema and error: <a href="docs.json">docs.json</a> (load it into any OpenAPI viewer or client
generator). Probes: <a href="readyz">readyz</a>, <a href="livez">livez</a>; Prometheus:
<a href="metrics">metrics</a>.</p>
<p>Every error is JSON: <code>{{"error": {{"status", "type", "message", "request_id"}}}}</code>
(under <code>/v2</code>, the Open Inference Protocol's <code>{{"error": "message"}}</code>).</p>
<table><thead><tr><th>method</th><th>path</th><th>what</th><th>body</th><th>statuses</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p>Also: <code>/v2/…</code>, the Open Inference Protocol (KServe v2 / Triton HTTP): health, model
metadata, config and infer.</p>
</body></html>
"""
    return page.encode()
