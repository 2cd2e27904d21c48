"""Build plots/offline.html, the HTML template `dvc plots show/diff` renders into (.dvc/config: plots.html_template),
with vega, vega-lite and vega-embed inlined, so that the plots draw without a network connection. DVC's own page
loads them from cdn.jsdelivr.net (dvc_render/vega.py, VegaRenderer.SCRIPTS), and is blank offline.

    cd plots && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 && python build_template.py *.tgz && rm *.tgz

The versions are the ones DVC's page asks for (dvc_render 1.x). Each package's LICENSE is copied to
plots/licenses/; the template names each package, its version and the sha256 of the tarball it came from.
The template keeps DVC's placeholders {refresh_tag} and {plot_divs}, and leaves out {scripts} (the CDN tags).
"""
from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>nanopipe plots</title>
    <!-- {provenance} -->
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def build(tarballs: list[Path]) -> str:
    found: dict[str, tuple[str, str, str]] = {}
    for tgz in tarballs:
        with tarfile.open(tgz) as tar:
            meta = json.load(tar.extractfile("package/package.json"))
            name = meta["name"]
            if name not in PACKAGES:
                raise SystemExit(f"{tgz}: package {name!r} is not one of {sorted(PACKAGES)}")
            js = tar.extractfile(f"package/{PACKAGES[name]}").read().decode()
            license_text = tar.extractfile("package/LICENSE").read().decode()
        if "</script" in js.lower() or any(f"{{{p}}}" in js for p in ("plot_divs", "scripts", "refresh_tag")):
            raise SystemExit(f"{tgz}: the script cannot be inlined (it contains </script> or a DVC placeholder)")
        sha = hashlib.sha256(tgz.read_bytes()).hexdigest()
        found[name] = (meta["version"], sha, js)
        (HERE / "licenses").mkdir(exist_ok=True)
        (HERE / "licenses" / f"{name}-LICENSE").write_text(license_text)
    missing = sorted(set(PACKAGES) - set(found))
    if missing:
        raise SystemExit(f"missing tarballs for {', '.join(missing)} (npm pack them first)")
    provenance = "; ".join(f"{n}@{found[n][0]} (npm tarball sha256 {found[n][1]}, {PACKAGES[n]})" for n in PACKAGES)
    scripts = "\n".join(f"    <script>/* {n}@{found[n][0]}, license: plots/licenses/{n}-LICENSE */\n{found[n][2]}\n    </script>"
                        for n in PACKAGES)  # order matters: vega-lite needs vega, vega-embed needs both
    return PAGE.format(provenance=provenance, scripts=scripts)


if __name__ == "__main__":
    page = build([Path(a) for a in sys.argv[1:]])
    (HERE / "offline.html").write_text(page)
    print(f"wrote {HERE / 'offline.html'} ({len(page):,} bytes)")
