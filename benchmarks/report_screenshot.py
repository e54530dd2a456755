"""Render `optimize --report` and `search --report` pages in a real headless browser and screenshot them.

On glyph_resnet with the calibration split: `optimize -p default --report optimize.html` and a small
`search --trials 8 --report search.html`; each page is opened by Chromium (Debian's `chromium` package:
`apt-get install chromium`) with networking off, so a page that needed anything from outside would show
it missing. Checks per page: Chromium exits 0, the screenshot is not blank, and the page holds no
reference to a remote resource. Screenshots go to benchmarks/out/report_<kind>.png.

    python benchmarks/report_screenshot.py [--chromium /usr/bin/chromium] [--out-dir benchmarks/out]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _onnxcomp(*args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "onnxcomp", *args], capture_output=True, text=True)
    if p.returncode not in (0, 1):  # 1: nothing held; the report still says why
        raise SystemExit(f"onnxcomp {args[0]} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")


def _screenshot(chromium: str, page: Path, png: Path, height: int) -> None:
    profile = tempfile.mkdtemp(prefix="onnxcomp-chromium-")
    try:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--window-size=1280,{height}", f"--screenshot={png}", page.as_uri()]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if p.returncode or not png.exists():
            raise SystemExit(f"chromium failed on {page.name} (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _ink(png: Path) -> float:
    """Share of pixels that are not (near) white: 0 for a blank page."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(png)[..., :3]
    return float(np.mean(img.min(axis=-1) < 0.9))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--out-dir", default=str(HERE / "out"))
    args = ap.parse_args()
    if not Path(args.chromium).exists():
        print(f"no Chromium at {args.chromium}: apt-get install chromium", file=sys.stderr)
        return 2
    from onnxcomp import evaldata

    out = Path(args.out_dir)
    with tempfile.TemporaryDirectory(prefix="onnxcomp-report-") as tmp_name:
        tmp = Path(tmp_name)
        calib = tmp / "calib.npz"
        x, y = evaldata.glyph_dataset("calib", "all")
        evaldata.save_npz(str(calib), x, y, "input")
        src = str(ROOT / "models" / "glyph_resnet.onnx")
        _onnxcomp("optimize", src, "-o", str(tmp / "default.onnx"), "-p", "default", "--data", str(calib), "-q",
                  "--report", str(tmp / "optimize.html"))
        _onnxcomp("search", src, "--data", str(calib), "--objective", "lzma", "--max-top1-drop", "1", "--trials", "8",
                  "--workers", "2", "--no-cache", "-o", str(tmp / "search.onnx"), "-q",
                  "--report", str(tmp / "search.html"))
        for kind, height in (("optimize", 2400), ("search", 1800)):
            page = tmp / f"{kind}.html"
            text = page.read_text()
            remote = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//[^"'\s>]+""", text)
            png = out / f"report_{kind}.png"
            _screenshot(args.chromium, page, png, height)
            ink = _ink(png)
            print(f"{kind}: {page.stat().st_size:,} B of HTML, {len(remote)} remote references, "
                  f"screenshot {png} ({ink:.1%} of pixels inked)")
            if remote or ink < 0.01:
                print(f"{kind}: the page is not self-contained or rendered blank", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
