"""Write the page template that `dvc plots show` fills, with Vega, Vega-Lite and Vega-Embed inside it.

dvc-render's own page loads these three libraries from a CDN, so without a network it draws no
chart. This script vendors them instead: it fetches the pinned versions below with `npm pack`
(npm's configured registry), checks each tarball against its pinned sha512 integrity, and writes
one self-contained page with each library's minified build inline in a `<script>` block, headed by
a comment that names the package, its version and its license (the license text in full).

Run it from the repository root (needs npm and the network; nothing else than Python's stdlib):

    python scripts/vendor_vega.py            # (re)writes .dvc/offline-plots.html
    python scripts/vendor_vega.py --check    # exits 1 if the committed page differs from what it writes

`.dvc/config` names the page (`[plots] html_template = offline-plots.html`, relative to .dvc/), so
plain `dvc plots show` and `dvc plots diff` use it. DVC fills `{plot_divs}` with the plots and
`{refresh_tag}` with a refresh tag (or nothing); the page has no `{scripts}` placeholder, which is
where DVC would put its CDN `<script>` tags. The output is byte-reproducible: it depends only on the
pinned tarballs (whose bytes the integrity check fixes) and on this file. The versions are the ones
the installed dvc-render asks the CDN for (dvc_render/vega.py, `VegaRenderer.SCRIPTS`): change them
together. tests/test_plots.py checks the rendered page (offline, each plot once).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / ".dvc" / "offline-plots.html"

# name, version, npm integrity (sha512 of the tarball), the browser build inside it, its license file.
# Order matters: Vega-Lite needs Vega, and Vega-Embed needs both.
PACKAGES = [
    (
        "vega",
        "5.20.2",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
        "build/vega.min.js",
        "LICENSE",
    ),
    (
        "vega-lite",
        "5.2.0",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
        "build/vega-lite.min.js",
        "LICENSE",
    ),
    (
        "vega-embed",
        "6.18.2",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
        "build/vega-embed.min.js",
        "LICENSE",
    ),
]

# What DVC replaces in the page (dvc_render/html.py): text like this inside the libraries would be
# replaced too, and `{scripts}` would bring the CDN tags back.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Pipeline plots</title>
<!-- Written by scripts/vendor_vega.py (do not edit by hand): `dvc plots show` fills this page.
     Vega, Vega-Lite and Vega-Embed are inline below, so the page draws without a network. -->
<style>
  body { margin: 0; padding: 24px 32px; background: #f6f7f9; color: #1f2328;
         font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
  h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
  header p { margin: 0 0 20px; color: #59636e; }
  main { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
  main > div { background: #fff; border: 1px solid #d1d9e0 !important; border-radius: 8px;
               padding: 16px; max-width: 100%; overflow-x: auto; box-sizing: border-box; }
  main > div > p:first-child { margin: 0 0 8px; font-weight: 600; }
  main img { max-width: 100%; height: auto; image-rendering: pixelated; }
</style>
__SCRIPTS__
</head>
<body>
<header>
<h1>Pipeline plots</h1>
<p>The plots declared in dvc.yaml, drawn from this workspace's files (or the revisions compared).</p>
</header>
<main>
{plot_divs}
</main>
</body>
</html>
"""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def npm_pack(name: str, version: str, dest: Path) -> Path:
    """Download `name@version` as a tarball into `dest` with `npm pack`; return its path."""
    spec = f"{name}@{version}"
    try:
        proc = subprocess.run(
            ["npm", "pack", spec, "--json", "--ignore-scripts", "--pack-destination", str(dest)],
            cwd=dest,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        fail("npm is not installed (it fetches the pinned Vega packages)")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"npm pack {spec} exited {proc.returncode}: {last}")
    try:
        (info,) = json.loads(proc.stdout)
        return dest / info["filename"]
    except (ValueError, KeyError, TypeError):
        fail(f"npm pack {spec}: unexpected output {proc.stdout[:200]!r}")


def check_integrity(tarball: Path, name: str, version: str, integrity: str) -> None:
    """Compare the tarball's own sha512 (not what npm says about it) with the pinned integrity."""
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != integrity:
        fail(f"{name}@{version}: tarball integrity {digest} differs from the pinned {integrity}")


def member(tarball: Path, path: str) -> str:
    """A text file of the npm tarball (under its `package/` folder), read without extracting."""
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            f = tar.extractfile(f"package/{path}")
        except KeyError:
            f = None
        if f is None:
            fail(f"{tarball.name}: no file package/{path}")
        return f.read().decode("utf-8")


def inline_js(js: str, label: str) -> str:
    """The library's code, made safe to put inside a `<script>` element of the page."""
    # The source map is not shipped: drop its reference (developer tools would try to fetch it).
    js = re.sub(r"\n//# sourceMappingURL=\S*\s*$", "\n", js)
    for placeholder in PLACEHOLDERS:
        if placeholder in js:
            fail(f"{label} contains the DVC placeholder {placeholder}; it would be replaced in the page")
    # `</script` would end the element and `<!--` could change how the HTML parser reads the rest
    # of it; in JavaScript (strings, regular expressions) `<\/` and `<\!` mean the same as `</`, `<!`.
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    js = js.replace("<!--", "<\\!--")
    if re.search(r"</script|<!--", js, flags=re.IGNORECASE):
        fail(f"{label} still contains '</script' or '<!--' after escaping")
    return js.rstrip("\n")


def script_block(name: str, version: str, license_name: str, license_text: str, js: str) -> str:
    label = f"{name}@{version}"
    text = license_text.strip().replace("\r\n", "\n")
    if "*/" in text or re.search(r"</script|<!--", text, flags=re.IGNORECASE) or any(p in text for p in PLACEHOLDERS):
        fail(f"{label}: its license text cannot go inside a script comment as it is")
    header = f"/*! {name} {version} (npm), license {license_name}:\n\n{text}\n*/"
    return f"<script>\n{header}\n{inline_js(js, label)}\n</script>"


def build_page() -> str:
    """Fetch, check and inline the pinned packages; return the page template."""
    blocks = []
    with tempfile.TemporaryDirectory(prefix="vendor-vega-") as tmp:
        for name, version, integrity, build, license_file in PACKAGES:
            tarball = npm_pack(name, version, Path(tmp))
            check_integrity(tarball, name, version, integrity)
            meta = json.loads(member(tarball, "package.json"))
            if (meta.get("name"), meta.get("version")) != (name, version):
                fail(f"{tarball.name} holds {meta.get('name')}@{meta.get('version')}, not {name}@{version}")
            license_name = meta.get("license") or "see below"
            license_text, js = member(tarball, license_file), member(tarball, build)
            blocks.append(script_block(name, version, license_name, license_text, js))
    return assemble(blocks)


def assemble(blocks: list[str]) -> str:
    """The page with the libraries' `<script>` blocks in its head (tests/test_plots.py rebuilds it offline)."""
    page = PAGE.replace("__SCRIPTS__", "\n".join(blocks))
    for placeholder in ("{plot_divs}", "{refresh_tag}"):
        if page.count(placeholder) != 1:
            fail(f"the page has {page.count(placeholder)} {placeholder} placeholders, not 1")
    if "{scripts}" in page:
        fail("the page has a {scripts} placeholder (DVC would put its CDN tags there)")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the page (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --output differs from the page")
    args = parser.parse_args(argv)
    data = build_page().encode("utf-8")
    if args.check:
        if not args.output.is_file() or args.output.read_bytes() != data:
            fail(f"{args.output} differs from what scripts/vendor_vega.py writes: run it and commit the page")
        print(f"{args.output}: up to date ({len(data):,} bytes)")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    print(f"wrote {args.output} ({len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
