"""Building blocks of convlens's HTML pages: one CSS, escaped cells, figures, and inlined images.

A page is self-contained: every ``<img src="relative.png">`` is replaced by a ``data:`` URI, so the
single HTML file, mailed or attached alone, shows every figure.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330;line-height:1.5}
header{background:#1d2b4f;color:#fff;padding:28px 40px}header h1{margin:0;font-size:28px}header p{margin:6px 0 0;opacity:.85}
nav{background:#fff;border-bottom:1px solid #dde1e8;padding:10px 40px;position:sticky;top:0}nav a{margin-right:18px;color:#1d4ed8;text-decoration:none;font-weight:600}
main{max-width:1180px;margin:0 auto;padding:20px 40px 60px}section{background:#fff;border:1px solid #e3e6ec;border-radius:10px;padding:18px 26px;margin:22px 0}
h2{margin-top:4px;border-bottom:2px solid #e7eaf0;padding-bottom:6px}h3{margin-bottom:6px}
figure{margin:14px 0}figure img{max-width:100%;border:1px solid #e3e6ec;border-radius:6px;background:#fff}figcaption{font-size:14px;color:#4a5262;margin-top:4px}
table{border-collapse:collapse;margin:10px 0;font-size:14px}th,td{border:1px solid #dde1e8;padding:4px 9px;text-align:left}th{background:#f0f2f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
.cards{display:flex;gap:14px;flex-wrap:wrap}.card{background:#f3f6fb;border-radius:8px;padding:10px 16px;min-width:150px}.card b{font-size:22px;display:block}
.obs{background:#fffbea;border-left:4px solid #f0b429;padding:8px 14px;margin:10px 0}.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.note{font-size:13px;color:#5b6474}
"""
_IMG_SRC = re.compile(r'<img src="([^":]+\.png)"')


def esc(value) -> str:
    return html.escape(str(value))


def fig(src: str, caption: str) -> str:
    return (f'<figure><img src="{esc(src)}" alt="{esc(caption[:80])}" loading="lazy">'
            f"<figcaption>{caption}</figcaption></figure>")


def table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def inline_images(page: str, base: Path) -> str:
    """Replace each relative PNG source by a data URI of the file under ``base`` (missing files stay links)."""
    def data_uri(match: re.Match) -> str:
        path = base / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode("ascii")}"'
    return _IMG_SRC.sub(data_uri, page)


def document(title: str, heading: str, subtitle: str, nav: list[tuple[str, str]], body: str, base: Path) -> str:
    """A whole page with the shared CSS and every image inlined."""
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body><header><h1>{esc(heading)}</h1><p>{esc(subtitle)}</p></header>
<nav>{links}</nav>
<main>{body}</main></body></html>
"""
    return inline_images(page, base)
