"""The real `dvc plots show` draws every plot offline, each once.

The page template (.dvc/offline-plots.html, named by `.dvc/config`) carries Vega, Vega-Lite and
Vega-Embed inline, written by scripts/vendor_vega.py; dvc.yaml declares each plot once, in its
top-level `plots:` list (the stages list the files as plain outs). `dvc plots show` runs in a
throwaway copy of the project and writes to a temporary folder: the checkout is not touched.
Re-running the vendor script is not part of the tests (it needs the network).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import configobj
import pytest
import yaml
from dvc_render.base import Renderer
from dvc_render.image import ImageRenderer
from dvc_render.vega import VegaRenderer

from tests.conftest import ROOT, dvc, make_project

TEMPLATE = ROOT / ".dvc/offline-plots.html"
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
# Attributes that make a browser load something (or go somewhere).
URL_ATTRS = {"src", "href", "srcset", "action", "formaction", "data", "poster", "background", "xlink:href", "manifest"}
# A remote address: http(s), another scheme, or protocol-relative (`//host/...`); `data:` is inline.
REMOTE = re.compile(r"^\s*(?!data:)(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)
# Loads written in code or style: `import ... from "//..."`, `import("https:...")`, `fetch("https:...")`,
# `importScripts(...)`, `url(//...)`, `@import`.
REMOTE_IN_CODE = re.compile(
    r"""(?:\bimport\b[^;'"`]*?\bfrom|\bimport\s*\(?|\bfetch\s*\(|\burl\s*\()\s*['"`]?\s*(?:https?:)?//"""
    r"""|\bimportScripts\s*\(|@import\b""",
    re.IGNORECASE,
)
VEGA_CALL = re.compile(r"var spec = (\{.*?\});\s*vegaEmbed\('#([^']+)', spec\);", re.DOTALL)


def load_vendor_script():
    spec = importlib.util.spec_from_file_location("vendor_vega", ROOT / "scripts/vendor_vega.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Page(HTMLParser):
    """What a browser would see in the page: elements, their attributes, and inline code."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.code: list[tuple[str, str]] = []  # (tag, text) of every <script> and <style>
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._open = tag
            self.code.append((tag, ""))

    def handle_endtag(self, tag):
        if tag == self._open:
            self._open = None

    def handle_data(self, data):
        if self._open:
            tag, text = self.code[-1]
            self.code[-1] = (tag, text + data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]


def declared_plots() -> dict[str, dict]:
    """dvc.yaml's top-level plots: each plot's id (its file here) and its properties."""
    plots = {}
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        name, props = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        assert name not in plots, f"{name} declared twice in the top-level plots"
        plots[name] = props or {}
    return plots


def is_image(name: str) -> bool:
    return Path(name).suffix in ImageRenderer.EXTENSIONS


def cdn_versions() -> list[tuple[str, str]]:
    """The libraries and versions that the installed dvc-render would load from its CDN."""
    return re.findall(r"/npm/([a-z-]+)@([0-9.]+)\"", VegaRenderer.SCRIPTS)


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dvc plots show` in a copy of the project (code, config, template and plot files): the output folder."""
    tmp = tmp_path_factory.mktemp("plots")
    path = make_project(tmp / "project")
    shutil.copy2(TEMPLATE, path / TEMPLATE.relative_to(ROOT))
    shutil.copytree(ROOT / "plots", path / "plots")
    dvc("plots", "show", "-o", str(tmp / "out"), cwd=path)
    return tmp / "out"


@pytest.fixture(scope="module")
def page(shown: Path) -> tuple[str, Page]:
    html = (shown / "index.html").read_text(encoding="utf-8")
    parsed = Page()
    parsed.feed(html)
    parsed.close()
    return html, parsed


def test_config_names_the_vendored_template():
    config = configobj.ConfigObj(str(ROOT / ".dvc/config"))
    assert config["plots"]["html_template"] == TEMPLATE.name  # relative to .dvc/
    assert config["core"]["analytics"] == "false"


def test_the_page_loads_nothing_from_the_network(page, shown: Path):
    html, parsed = page
    for tag, attrs in parsed.tags:
        for attr, value in attrs.items():
            if attr in URL_ATTRS and value is not None:
                assert not REMOTE.match(value), f"<{tag} {attr}={value!r}> loads from the network"
    assert all("src" not in attrs for attrs in parsed.all("script")), "a <script src=...>: every script is inline"
    assert parsed.all("link") == [] and parsed.all("iframe") == [] and parsed.all("base") == []
    assert not any((a.get("http-equiv") or "").lower() == "refresh" for a in parsed.all("meta"))
    assert all(attrs.get("type") in (None, "text/javascript") for attrs in parsed.all("script")), "no module scripts"
    for tag, text in parsed.code:
        found = REMOTE_IN_CODE.search(text)
        assert found is None, f"<{tag}> loads {text[found.start() : found.start() + 80]!r}"
    # dvc-render's CDN tags are not there (they would go where the template has no `{scripts}`).
    for src in re.findall(r'src="([^"]+)"', VegaRenderer.SCRIPTS):
        assert src not in html
    for placeholder in PLACEHOLDERS:
        assert placeholder not in html
    # The images are files next to the page.
    for attrs in parsed.all("img"):
        assert (shown / attrs["src"]).is_file(), attrs["src"]


def test_the_libraries_are_inline_before_the_plots(page):
    html, parsed = page
    scripts = [text for tag, text in parsed.code if tag == "script"]
    headers = [re.match(r"\s*/\*! (\S+) (\S+) \(npm\), license ", text) for text in scripts[:3]]
    vendored = [h.groups() for h in headers if h]
    assert vendored == cdn_versions() == [("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2")]
    assert ".vega={}" in scripts[0] and ".vegaLite={}" in scripts[1] and ".vegaEmbed=" in scripts[2]
    assert html.index(scripts[2]) < html.index("vegaEmbed('#")


def test_each_declared_plot_is_drawn_once(page):
    html, parsed = page
    plots = declared_plots()
    ids = [attrs.get("id") for attrs in parsed.all("div") if attrs.get("id")]
    calls = VEGA_CALL.findall(html)
    specs = {div_id: json.loads(spec) for spec, div_id in calls}
    images = [attrs["src"] for attrs in parsed.all("img")]

    assert sorted(ids) == sorted(Renderer.remove_special_chars(name) for name in plots)
    assert len(calls) == len(specs) == sum(not is_image(name) for name in plots)
    assert len(images) == sum(is_image(name) for name in plots)
    for name, props in plots.items():
        div_id = Renderer.remove_special_chars(name)
        if is_image(name):
            # dvc copies the image next to the page as static/<rev>_<path with "/" as "_">
            assert sum(src.endswith("_" + name.replace("/", "_")) for src in images) == 1, name
        else:
            spec = specs[div_id]
            title = spec["title"]["text"] if isinstance(spec["title"], dict) else spec["title"]
            assert title == props.get("title", name)
            assert '"url"' not in json.dumps(spec), f"{name}: its data must be inline, not loaded"


def test_the_template_is_what_the_vendor_script_writes():
    """The committed page is the script's page around the three library blocks (checked offline)."""
    vendor = load_vendor_script()
    template = TEMPLATE.read_text(encoding="utf-8")
    blocks = re.findall(r"<script>\n/\*! .*?</script>", template, flags=re.DOTALL)
    assert len(blocks) == len(vendor.PACKAGES) == 3
    assert vendor.assemble(blocks) == template
    assert [(name, version) for name, version, *_ in vendor.PACKAGES] == cdn_versions()
    assert template.index("{refresh_tag}") < template.index("</head>") < template.index("{plot_divs}")
    for block in blocks:
        code = block.removeprefix("<script>").removesuffix("</script>")
        assert not re.search(r"</script|<!--", code, flags=re.IGNORECASE)
        assert not any(placeholder in code for placeholder in PLACEHOLDERS)
        assert "sourceMappingURL" not in code


def test_the_vendor_script_escapes_what_would_break_the_page():
    vendor = load_vendor_script()
    js = vendor.inline_js("a='</script>';b=/<\\/SCRIPT>/;c='<!--';\n//# sourceMappingURL=x.js.map\n", "x")
    assert "</script" not in js.lower() and "<!--" not in js and "sourceMappingURL" not in js
    assert js.startswith("a='<\\/script>';")
    with pytest.raises(SystemExit):
        vendor.inline_js("var t = '{plot_divs}';", "x")


def test_every_plot_draws_in_a_browser_without_network(page, shown: Path, tmp_path: Path):
    """Chromium, headless, with every network request sent to a closed port: each chart still draws."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here")
    html, _ = page
    offline = [
        "--proxy-server=127.0.0.1:9",  # nothing listens there: any request fails
        "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ]
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}", *offline]
        + ["--virtual-time-budget=15000", "--dump-dom", (shown / "index.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    drawn = set(re.findall(r'<div id="([^"]+)" class="vega-embed', proc.stdout))
    assert drawn == {div_id for _, div_id in VEGA_CALL.findall(html)}
    assert proc.stdout.count('class="marks"') == len(drawn), "a chart did not draw its marks"
