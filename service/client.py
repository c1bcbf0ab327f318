"""Command-line client for a running convserve server.

    python -m service.client classify digit.png [more.png ...] [--top-k 3]
    python -m service.client score page.png --heatmap heat.png --boxes boxes.png [--scales 0.5,1,2]
    python -m service.client models

Prints answers as text; `score` can save the server's heat map and a copy of the image with the
detections drawn. Server errors print their JSON message and exit with status 2.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path

import httpx
from PIL import Image, ImageDraw


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def call(method: str, url: str, **kwargs) -> dict:
    try:
        response = httpx.request(method, url, timeout=300, **kwargs)
    except httpx.ConnectError:
        fail(f"no server at {url.rsplit('/', 1)[0]}; start one with `make serve`")
    body = response.json()
    if response.status_code >= 400:
        fail(f"{response.status_code} {body['error']['type']}: {body['error']['message']}")
    return body


def read(path: Path) -> bytes:
    if not path.is_file():
        fail(f"{path} does not exist")
    return path.read_bytes()


def draw_boxes(image_bytes: bytes, detections: list[dict]) -> Image.Image:
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    pen = ImageDraw.Draw(image)
    for d in detections:
        pen.rectangle(d["box"], outline=(255, 60, 60), width=max(1, image.width // 400))
        pen.text((d["box"][0] + 2, d["box"][1] + 1), f"{d['label']} {d['score']:.2f}", fill=(255, 255, 0))
    return image


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m service.client", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="top-k labels of images")
    c.add_argument("images", nargs="+", type=Path)
    c.add_argument("--model", default="")
    c.add_argument("--top-k", type=int, default=1)
    c.add_argument("--invert", action="store_true", help="dark ink on light paper")
    s = sub.add_parser("score", help="dense scoring of one image: detections, heat map")
    s.add_argument("image", type=Path)
    s.add_argument("--model", default="")
    s.add_argument("--heatmap", type=Path, help="save the heat-map PNG here")
    s.add_argument("--heatmap-class", default="", help="one class (default: the strongest per cell)")
    s.add_argument("--boxes", type=Path, help="save the image with detections drawn here")
    s.add_argument("--threshold", type=float, default=0.8)
    s.add_argument("--classes", default="", help="comma-separated labels to detect (default: all)")
    s.add_argument("--scales", default="1", help="digit sizes ÷ training size, e.g. 0.5,0.71,1,1.41,2")
    s.add_argument("--stride-factor", type=int, default=1)
    s.add_argument("--invert", action="store_true", help="dark ink on light paper")
    s.add_argument("--json", action="store_true", help="print the whole response")
    sub.add_parser("models", help="the served models' cards")
    args = p.parse_args(argv)

    if args.command == "models":
        for m in call("GET", f"{args.url}/models")["models"]:
            print(f"{m['name']}:{m['version']}  {m['arch']}  {len(m['labels'])} labels  window "
                  f"{m['dense']['window']} stride {m['dense']['stride']}  exact={m['dense']['exact']}  "
                  f"{m['provider']}")
    elif args.command == "classify":
        files = [("image", (path.name, read(path))) for path in args.images]
        body = call("POST", f"{args.url}/classify", files=files,
                    data={"model": args.model, "top_k": str(args.top_k), "invert": json.dumps(args.invert)})
        for prediction in body["predictions"]:
            top = ", ".join(f"{t['label']} ({t['probability']:.3f})" for t in prediction["top_k"])
            print(f"{prediction['filename']}: {top}")
    else:
        data = read(args.image)
        outputs = ["detections"] + (["heatmap"] if args.heatmap else [])
        form = {"model": args.model, "outputs": ",".join(outputs), "threshold": str(args.threshold),
                "classes": args.classes, "scales": args.scales, "stride_factor": str(args.stride_factor),
                "heatmap_class": args.heatmap_class, "invert": json.dumps(args.invert)}
        body = call("POST", f"{args.url}/score_map", files={"image": (args.image.name, data)}, data=form)
        if args.json:
            print(json.dumps(body, indent=1))
        geo = body["geometry"]
        print(f"{body['model']}: {body['image']['width']}×{body['image']['height']} px, map "
              f"{geo['map_height']}×{geo['map_width']} (stride {geo['stride']}, scales {body['scales']}), "
              f"{len(body['detections'])} detections")
        for d in body["detections"]:
            print(f"  {d['label']:>10}  {d['score']:.3f}  box {d['box']}")
        if args.heatmap:
            args.heatmap.write_bytes(base64.b64decode(body["heatmap"]["data"]))
            print(f"heat map → {args.heatmap}")
        if args.boxes:
            draw_boxes(data, body["detections"]).save(args.boxes)
            print(f"detections drawn → {args.boxes}")


if __name__ == "__main__":
    main()
